"""What `python train.py` does, step by step. Validation comes first and nothing is written
until the config, the model, the data and the optimizer have all been built."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from config import check_config, load_config
from config.files import apply_overrides
from config.schema import is_known_path
from errors import ConfigError
from runtime.signals import StopSignal


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.lr is not None:
        extra.append(f"optimizer.args.lr={args.lr!r}")
    if args.bs is not None:
        extra.append(f"data_loader.args.batch_size={args.bs}")
    if args.device is not None:
        extra.append(f"device={args.device}")
    return list(args.overrides) + extra


def _resolve_config(args: argparse.Namespace):
    """(config, resume state or None, run directory to continue or None, source suffix)."""
    overrides = _overrides(args)
    if not args.resume:
        return load_config(args.config, overrides), None, None, Path(args.config).suffix.lower()
    from checkpoint import find_resume_checkpoint, load_checkpoint
    from runtime.run_dir import locate_resume

    target, run_dir = locate_resume(args.resume)
    notes = []
    if target.is_dir():
        path, state, notes = find_resume_checkpoint(target)
    else:
        path, state = target, load_checkpoint(target)
    if args.config:
        config = load_config(args.config, overrides)
    else:
        config = check_config(apply_overrides(state["config"], overrides, known=is_known_path),
                              source=f"{path} (config)")
    suffix = ".json" if run_dir is not None and (run_dir / "config.json").exists() else ".yaml"
    return config, {"state": state, "path": path, "notes": notes}, run_dir, suffix


def train_run(args: argparse.Namespace, stop: StopSignal | None = None) -> int:
    """Installs `stop` when training starts. A caller that passes its own uninstalls it (train.py does, to
    tell a Ctrl-C before training from a second one, and to let a finished run ignore signals up to the
    process's exit); one made here is uninstalled on return."""
    own_stop = stop is None
    stop = StopSignal() if stop is None else stop
    config, resume, run_dir, suffix = _resolve_config(args)
    if args.run_id is not None:  # `--run-id ""` is refused, not taken for "no run id"
        from runtime.run_dir import check_run_id

        check_run_id(args.run_id)
    if args.print_config:
        print(json.dumps(config, indent=2) if suffix == ".json" else _yaml(config), end="")
        return 0

    import torch

    from base import model_summary
    from checkpoint import sweep_temporaries
    from config.build import (build_data_loaders, build_loss, build_lr_scheduler, build_metrics, build_model,
                              build_optimizer, trainer_class)
    from logger import make_writer, setup_logging
    from runtime.device import check_amp, resolve_device
    from runtime.distributed import (barrier, broadcast_object, check_sync_batchnorm, distributed_context,
                                     init_process_group, shutdown, wrap_model)
    from runtime.run_dir import create_run_dir, write_config
    from runtime.seeding import seed_everything
    from trainer.callbacks import build_callbacks

    cfg = config["trainer"]
    dist = distributed_context(config.get("n_gpu"))
    device = resolve_device(config["device"], config.get("n_gpu"), dist.local_rank if dist.enabled else None)
    check_amp(cfg["amp"], device)
    check_sync_batchnorm(cfg["sync_batchnorm"], device, dist)
    init_process_group(dist, cfg["ddp_backend"], device)
    try:
        seed_everything(config["seed"], cfg["deterministic"])
        model = build_model(config)
        train_loader, valid_loader = build_data_loaders(config, dist.rank, dist.world_size)
        model = model.to(device)
        optimizer = build_optimizer(config, model)
        lr_scheduler = build_lr_scheduler(config.get("lr_scheduler"), optimizer)
        criterion, metric_fns = build_loss(config), build_metrics(config)
        build_callbacks(config, model)  # trainer.watch/freeze module names are checked before anything is written
        if args.dry_run:
            return _dry_run(model, train_loader, criterion, optimizer, device, config, args, run_dir)

        # ---- side effects start here ----
        if run_dir is None:
            run_dir = create_run_dir(config, args.run_id) if dist.is_main else None
            run_dir = Path(broadcast_object(str(run_dir) if run_dir else None))
        logger = setup_logging(run_dir, cfg["verbosity"], dist.is_main)
        if dist.is_main:
            for temp in sweep_temporaries(run_dir / "checkpoints"):
                logger.info(f"removed {temp.name} left by an interrupted save")
            write_config(config, run_dir, suffix)
        logger.info(f"run directory: {run_dir}")
        logger.info(model_summary(model))
        if dist.enabled:
            model, converted = wrap_model(model, device, cfg["sync_batchnorm"], find_unused=cfg["freeze"] is not None)
            logger.info(f"DistributedDataParallel: {dist.world_size} processes, backend "
                        f"{torch.distributed.get_backend()}, per-process batch {train_loader.batch_size}"
                        + (f", {converted} SyncBatchNorm layers" if cfg["sync_batchnorm"] else ""))
        if cfg["compile"]:
            model = torch.compile(model)
            logger.info("model compiled with torch.compile (the first steps include compilation)")
        if dist.enabled and dist.rank != 0:
            # Per-rank random streams (dropout) differ; the model was initialised identically above.
            from data_loader.sampler import mix_seed

            torch.manual_seed(mix_seed(config["seed"], dist.rank))
        purge = resume["state"]["global_step"] + 1 if resume else None
        writer = make_writer(run_dir, cfg["tensorboard"] and dist.is_main, purge_step=purge)
        if not resume:  # once per run, at step 0 (never purged): hyperparameters and config for TensorBoard
            writer.add_run_start(config)
        stop.install()
        trainer = trainer_class(config)(model, criterion, metric_fns, optimizer, config, device, train_loader,
                                        valid_loader, lr_scheduler, run_dir=run_dir, writer=writer, dist=dist,
                                        stop_signal=stop)
        if resume:
            for note in resume["notes"]:
                logger.warning(f"skipped {note}")
            logger.info(f"resuming from {resume['path']}")
            trainer.resume(resume["state"])
            _apply_resume_overrides(resume["state"]["config"], config, optimizer, lr_scheduler, logger)
        try:
            result = trainer.train()
            stop.finish()  # from here a late SIGINT/SIGTERM cannot turn the finished run into 130/143
        finally:
            writer.close()
        _summary(logger, config, run_dir, trainer, result)
        if dist.enabled:
            # Leave together: a rank that tore its process group down while rank 0 was still writing the last
            # checkpoint aborted at exit now and then ("terminate called without an active exception").
            barrier()
        return 0
    finally:
        shutdown()
        if own_stop:
            stop.uninstall()


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def _apply_resume_overrides(saved: dict, config: dict, optimizer, lr_scheduler, logger) -> None:
    """Changes given on resume are applied and logged; optimizer arguments reach the param groups
    (which the checkpoint has just restored), a new lr also the scheduler's base."""
    from runtime.run_dir import config_changes

    for key, old, new in config_changes(saved, config):
        logger.info(f"resume override: {key}: {old!r} -> {new!r}")
        if key.startswith("optimizer.args."):
            name = key.split(".", 2)[2]
            for group in optimizer.param_groups:
                if name in group:
                    group[name] = new
                    if name == "lr" and "initial_lr" in group:
                        group["initial_lr"] = new
            if name == "lr" and hasattr(lr_scheduler, "base_lrs"):
                lr_scheduler.base_lrs = [new] * len(optimizer.param_groups)


def _dry_run(model, loader, criterion, optimizer, device, config, args, run_dir) -> int:
    from base import model_summary
    from runtime.run_dir import new_run_id, run_root

    model.train()
    loader.set_epoch(1)
    data, target = next(iter(loader))
    optimizer.zero_grad()
    try:
        loss = criterion(model(data.to(device)), target.to(device))
        loss.backward()
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        # Checking that model, data and loss fit together is what --dry-run is for: say so in one line.
        raise ConfigError(f"--dry-run: one batch forward/backward failed: {exc.__class__.__name__}: "
                          f"{' '.join(str(exc).split())}") from None
    print(model_summary(model))
    print(f"one batch: input {tuple(data.shape)}, loss {loss.item():.4f}, backward ok")
    where = run_dir or run_root(config) / (args.run_id or f"<timestamp like {new_run_id()}>")
    print(f"run directory (not created): {where}")
    return 0


def _summary(logger, config: dict, run_dir: Path, trainer, result: dict) -> None:
    logger.info(f"finished: run directory {run_dir}")
    if trainer.monitor_mode != "off" and result["best_epoch"]:
        logger.info(f"best {trainer.monitor_metric}: {result['monitor_best']:.4f} at epoch {result['best_epoch']}")
    checkpoints = run_dir / "checkpoints"
    best = checkpoints / ("best.pth" if (checkpoints / "best.pth").exists() else "last.pth")
    logger.info(f"checkpoints: {checkpoints}")
    logger.info(f"evaluate:    python test.py -r {best}")
    if trainer.writer.enabled:
        logger.info(f"tensorboard: tensorboard --logdir {config['trainer']['save_dir']}")
