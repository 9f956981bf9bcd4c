"""What `python train.py` does, step by step. Validation comes first and nothing is written
until the config, the model, the data and the optimizer have all been built."""
from __future__ import annotations

import argparse
import json
import signal
import time
import traceback
from pathlib import Path

from config import load_config, resolve_config
from config.files import plain_tree
from errors import ConfigError, Interrupted, TrainingError, UserError
from runtime.signals import StopSignal

# What a checkpoint's state belongs to: changing it on resume cannot carry the state over (an Adam
# checkpoint holds no SGD momentum, a scheduler's state is its own class's attributes).
FIXED_ON_RESUME = ("arch", "data_loader", "optimizer", "lr_scheduler")


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.lr is not None:
        extra.append(f"optimizer.args.lr={args.lr!r}")
    if args.bs is not None:
        extra.append(f"data_loader.args.batch_size={args.bs}")
    if args.device is not None:
        from runtime.device import device_option

        extra.append(f"device={device_option(args.device)}")
    return list(args.overrides) + extra


def _resolve_config(args: argparse.Namespace):
    """(config, resume state or None, run directory to continue or None, source suffix)."""
    overrides = _overrides(args)
    if not args.resume:
        _announce(args, overrides, Path(args.config))
        return load_config(args.config, overrides), None, None, Path(args.config).suffix.lower()
    given = Path(args.resume)
    # The first line before torch is imported (by checkpoint): the run directory found by its layout alone.
    _announce(args, overrides, next((p for p in (given, given.parent, given.parent.parent)
                                     if (p / "checkpoints").is_dir()), None))
    from checkpoint import check_resume_state, find_resume_checkpoint, load_checkpoint
    from checkpoint.sharded import POINTERS, find_sharded, is_checkpoint_dir, is_sharded_run, read_pointer
    from runtime.run_dir import checkpoints_stamp, locate_checkpoint

    if given.is_file() and given.name in POINTERS and is_sharded_run(given.parent):  # RUN/checkpoints/last
        given = read_pointer(given.parent, given.name)
    target, run_dir = (given, given.parent.parent) if is_checkpoint_dir(given) else locate_checkpoint(args.resume)
    # Taken before anything is loaded, compared once the run directory is locked: another train.py may save
    # into it until then, and this one would continue from the older checkpoint over the newer.
    stamp = checkpoints_stamp(run_dir) if run_dir is not None else None

    notes = []
    if is_checkpoint_dir(target) or is_sharded_run(target):  # trainer.strategy fsdp: checkpoint/sharded.py
        path, state, notes = find_sharded(target)
        if is_checkpoint_dir(target):  # one directory named, as one .pth file below
            run_dir = _continue_in(run_dir, path, state, args.run_id)
    elif target.is_dir():
        path, state, notes = find_resume_checkpoint(run_dir)  # checked like the file below
    else:
        path, state = target, load_checkpoint(target)
        check_resume_state(state, path)
        if run_dir is not None:
            run_dir = _continue_in(run_dir, path, state, args.run_id)
    source = f"{path} (config)"
    config = load_config(args.config, overrides) if args.config else resolve_config(state.get("config"), overrides, source)
    saved = plain_tree(state.get("config"), source)  # a tree: walks of pickle's shared lists stay linear
    saved = saved if isinstance(saved, dict) else None
    if saved is not None:
        _refuse_type_changes(saved, config, path)
    suffix = ".json" if run_dir is not None and (run_dir / "config.json").exists() else ".yaml"
    return config, {"state": state, "path": path, "notes": notes, "saved": saved, "stamp": stamp}, run_dir, suffix


def _build_trainer(cls, *args):
    """The trainer, or one line naming the user's file:line when a Trainer subclass's __init__ fails."""
    try:
        return cls(*args)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's __init__ (reading config["user"], say)
        from runtime.blame import describe_error, locate

        at = locate(exc)
        raise ConfigError(f"trainer.type: {cls.__name__}() failed{f' at {at[1]}' if at else ''}: "
                          f"{describe_error(exc)}") from None


def _continue_in(run_dir: Path, path: Path, state: dict, run_id: str | None) -> Path | None:
    """The run directory a checkpoint inside it continues, or None for a new one (`--run-id`). An older
    checkpoint (best.pth, epoch-N.pth, or a sharded checkpoints/epoch-N/) continued in place would overwrite
    the run's newer ones."""
    import os

    from checkpoint import load_checkpoint
    from checkpoint.sharded import TRAINER_FILE, read_pointer
    from errors import CheckpointError

    checkpoints = run_dir / "checkpoints"
    try:
        # A sharded run's newest checkpoint is the directory its pointer `last` names; its step is in trainer.pth.
        last = read_pointer(checkpoints, "last") if path.is_dir() else checkpoints / "last.pth"
    except CheckpointError:
        return run_dir  # a damaged pointer: this checkpoint is the newest that loads
    if last is None or not last.exists() or os.path.samefile(path, last):
        return run_dir
    try:
        newest = load_checkpoint(last / TRAINER_FILE if last.is_dir() else last)["global_step"]
    except (CheckpointError, KeyError):
        return run_dir  # a damaged last: this checkpoint is the newest that loads
    if state["global_step"] >= newest:
        return run_dir
    if run_id is not None:
        return None  # a new run, started from this checkpoint's state
    newest_name = "last.pth" if last.name == "last.pth" else f"`last` ({last.name})"
    raise UserError(f"-r {path}: an older checkpoint of {run_dir} (step {state['global_step']}; its {newest_name} is "
                    f"at step {newest}): continuing there would overwrite the run's newer checkpoints; to start a new "
                    f"run from it: python train.py -r {path} --run-id NEW_ID")


def _announce(args: argparse.Namespace, overrides: list[str], source: Path | None) -> None:
    """A first line within a second of the start, before torch is imported (validating the config imports
    the models; torch takes 1-2 s, 10 s and more on a busy machine): the command was understood and is
    working. `source`: the config file, or the run directory being resumed. Quiet at trainer.verbosity 0 as
    far as that shows without torch (an override, the file), and on ranks other than 0."""
    import os

    from config.files import read_config_file

    if args.print_config or os.environ.get("RANK", "0") != "0":
        return
    raw = None
    for path in ([source] if source is None or source.is_file() else [source / "config.yaml", source / "config.json"]):
        try:
            raw = read_config_file(path) if path is not None and path.is_file() else None
        except (UserError, OSError, ValueError):
            raw = None
        if raw is not None:
            break
    raw = raw if isinstance(raw, dict) else {}
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    verbosity = trainer.get("verbosity", 1)
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "trainer.verbosity":
            verbosity = value.strip()
    if str(verbosity) == "0":
        return
    if args.resume:
        print(f"resuming {args.resume}: loading torch and the checkpoint", flush=True)
    else:
        name = raw.get("name") if isinstance(raw.get("name"), str) else "training"
        print(f"{name}: loading torch, the data and the model", flush=True)


def _kind(section: str, spec) -> str:
    """What a section builds: its type, with nested schedulers ("SequentialLR(LinearLR, StepLR)")."""
    if not isinstance(spec, dict):
        return "none"
    inner = spec.get("args", {}).get("schedulers") if isinstance(spec.get("args"), dict) else None
    if section == "lr_scheduler" and isinstance(inner, list):
        return f"{spec.get('type')}({', '.join(_kind(section, item) for item in inner)})"
    return str(spec.get("type"))


def _refuse_type_changes(saved: dict, config: dict, path: Path) -> None:
    problems = []
    for section in FIXED_ON_RESUME:
        old, new = _kind(section, saved.get(section)), _kind(section, config.get(section))
        if old != new:
            where = section if section == "lr_scheduler" else f"{section}.type"
            instead = "start a new run with -c CONFIG" if section == "arch" else \
                f"start a new run from its weights: python train.py -c CONFIG arch.pretrained={path}"
            problems.append(f"{where}: {old} -> {new} cannot be resumed ({path} holds the state of {old}); "
                            f"{instead}")
    if problems:
        raise ConfigError(problems)


def train_run(args: argparse.Namespace, stop: StopSignal | None = None) -> int:
    """Installs `stop` when training starts (train.py installs it at once). A signal before anything is
    written stops the run there; later ones stop it at the next step, with a checkpoint. A caller that
    passes its own uninstalls it (train.py lets a finished run ignore signals up to the process's exit);
    one made here is uninstalled on return."""
    own_stop = stop is None
    stop = StopSignal() if stop is None else stop
    config, resume, run_dir, suffix = _resolve_config(args)
    from logger.writers import check_loggers

    check_loggers(config)  # mlflow named and not installed: a config error now, not after the run directory
    if resume and not args.print_config:
        done = _finished(resume["state"], config, run_dir or resume["path"])
        if done:
            print(done)
            return 0
    if args.run_id is not None:  # `--run-id ""` is refused, not taken for "no run id"
        from runtime.run_dir import check_run_id

        check_run_id(args.run_id)
    if args.print_config:
        print(json.dumps(config, indent=2) if suffix == ".json" else _yaml(config), end="")
        return 0

    import torch

    from base import model_summary
    from checkpoint import check_optimizer_fits, check_scheduler_fits, sweep_temporaries
    from config.build import (build_data_loaders, build_loss, build_lr_scheduler, build_metrics, build_model,
                              build_optimizer, trainer_class)
    from logger import setup_logging
    from logger.writers import make_writers
    from runtime.device import check_amp, resolve_device
    from runtime.distributed import (barrier, broadcast_object, check_fsdp_config, check_sync_batchnorm,
                                     distributed_context, init_process_group, shard_model, shutdown, wrap_model)
    from runtime.run_dir import RunLock, checkpoints_stamp, create_run_dir, write_config
    from runtime.seeding import seed_everything
    from trainer.callbacks import build_callbacks
    from trainer.sanity import sanity_pass

    cfg = config["trainer"]
    dist = distributed_context(config.get("n_gpu"))
    device = resolve_device(config["device"], config.get("n_gpu"), dist.local_rank if dist.enabled else None)
    check_amp(cfg["amp"], device)
    check_sync_batchnorm(cfg["sync_batchnorm"], device, dist)
    init_process_group(dist, cfg["ddp_backend"], device)
    lock = None
    try:
        seed_everything(config["seed"], cfg["deterministic"])
        model = build_model(config)
        train_loader, valid_loader = build_data_loaders(config, dist.rank, dist.world_size, device)
        model = model.to(device)
        optimizer = build_optimizer(config, model)
        if resume and "optimizer" in resume["state"]:  # (a sharded checkpoint's is checked as DCP loads it)
            check_optimizer_fits(resume["state"]["optimizer"], optimizer, resume["path"])
        lr_scheduler = build_lr_scheduler(config.get("lr_scheduler"), optimizer)
        if resume:
            check_scheduler_fits(resume["state"]["lr_scheduler"], lr_scheduler, resume["path"])
        criterion, metric_fns = build_loss(config), build_metrics(config)
        build_callbacks(config, model)  # trainer.watch/freeze module names are checked before anything is written
        check_fsdp_config(cfg, model, device, resume and resume["path"], resume and "optimizer" not in resume["state"])
        notes = _check_steps(train_loader, config, dist)
        # The first batches through the trainer's own step, loss and metrics (forward only, no trace left).
        probe = _build_trainer(trainer_class(config), model, criterion, metric_fns, optimizer, config, device,
                               train_loader, valid_loader, lr_scheduler)
        sanity_pass(probe)
        if stop.requested and not dist.enabled:  # (under torchrun the ranks agree at the first check point)
            raise Interrupted(stop.signum, "interrupted before training started; no checkpoint was written")
        if args.dry_run:
            return _dry_run(probe, config, args, run_dir)
        del probe

        # ---- side effects start here ----
        # The lock comes first: a second train.py on this run directory must not sweep the other's
        # temporaries nor write anything. Every rank learns the outcome (no rank waits for a dead one).
        problem, reused = None, False
        if dist.is_main:
            try:
                if run_dir is None:
                    run_dir, lock, reused = create_run_dir(config, args.run_id)
                else:
                    lock = RunLock(run_dir)
                    if resume and checkpoints_stamp(run_dir) != resume["stamp"]:
                        raise UserError(f"{run_dir / 'checkpoints'} changed while this resume loaded {resume['path']} "
                                        f"(another train.py saved into it); resume again with -r {run_dir}")
            except UserError as exc:
                problem = str(exc)
        run_dir, problem, reused = broadcast_object((run_dir and str(run_dir), problem, reused))
        if problem:
            raise UserError(problem)
        run_dir = Path(run_dir)
        logger = setup_logging(run_dir, cfg["verbosity"], dist.is_main)
        if reused:
            logger.info(f"starting {run_dir} afresh: an earlier start stopped before its first checkpoint")
        if dist.is_main:
            for temp in sweep_temporaries(run_dir) + sweep_temporaries(run_dir / "checkpoints"):
                logger.info(f"removed {temp.name} left by an interrupted save")
            write_config(config, run_dir, suffix)
        logger.info(f"run directory: {run_dir}")
        for note in notes:
            logger.warning(note)
        logger.info(model_summary(model))
        if dist.enabled and cfg["strategy"] == "fsdp":
            model = shard_model(model, cfg["fsdp"], device)
            optimizer = build_optimizer(config, model)  # over the sharded parameters (DTensors) that replaced them
            lr_scheduler = build_lr_scheduler(config.get("lr_scheduler"), optimizer)
            logger.info(f"FSDP2 (fully_shard): {dist.world_size} processes, backend "
                        f"{torch.distributed.get_backend()}, per-process batch {train_loader.batch_size}, units: "
                        f"{', '.join(cfg['fsdp']['wrap']) or 'the root only'}")
        elif dist.enabled:
            model, converted = wrap_model(model, device, cfg["sync_batchnorm"], find_unused=cfg["freeze"] is not None)
            logger.info(f"DistributedDataParallel: {dist.world_size} processes, backend "
                        f"{torch.distributed.get_backend()}, per-process batch {train_loader.batch_size}"
                        + (f", {converted} SyncBatchNorm layers" if cfg["sync_batchnorm"] else ""))
        if cfg["compile"]:
            from runtime.compile import compile_model

            model = compile_model(model, cfg["compile"])
            logger.info("model compiled with torch.compile (the first steps include compilation)")
        if dist.enabled and dist.rank != 0:
            # Per-rank random streams (dropout) differ; the model was initialised identically above.
            from data_loader.sampler import mix_seed

            torch.manual_seed(mix_seed(config["seed"], dist.rank))
        # A fresh start in a reused directory purges the curves of the start that left no checkpoint.
        purge = resume["state"]["global_step"] + 1 if resume else 0 if reused else None
        writer = make_writers(run_dir, config, dist.is_main, purge, resumed=resume is not None)
        # Every session (a resume's overrides included): hyperparameters, config and status for TensorBoard.
        writer.start_run(config, f"{config['name']}/{run_dir.name}")
        stop.install()
        trainer = trainer_class(config)(model, criterion, metric_fns, optimizer, config, device, train_loader,
                                        valid_loader, lr_scheduler, run_dir=run_dir, writer=writer, dist=dist,
                                        stop_signal=stop)
        resume_command = _resume_command(run_dir, dist)
        started = time.monotonic()
        try:
            if resume:
                for note in resume["notes"]:
                    logger.warning(f"skipped {note}")
                logger.info(f"resuming from {resume['path']}")
                trainer.resume(resume["state"], source=str(resume["path"]))
                if resume["saved"] is not None:
                    _apply_resume_overrides(resume["saved"], config, optimizer, lr_scheduler, logger)
            result = trainer.train()
            stop.finish()  # from here a late SIGINT/SIGTERM cannot turn the finished run into 130/143
        except Exception as exc:
            raise _ended(exc, trainer, resume_command) from None
        except KeyboardInterrupt as exc:
            _ended(exc, trainer, resume_command)
            raise
        finally:
            writer.close()
        _summary(logger, config, run_dir, trainer, result, time.monotonic() - started, resume is not None)
        if dist.enabled:
            # Leave together: a rank that tore its process group down while rank 0 was still writing the last
            # checkpoint aborted at exit now and then ("terminate called without an active exception").
            barrier()
        return 0
    finally:
        if lock is not None:
            lock.release()
        if cfg["strategy"] == "fsdp":
            # FSDP2's modules and DTensors hold the process group. Left to be freed at exit, after it was destroyed,
            # a rank aborted now and then ("terminate called without an active exception": 2 of 8 runs of a
            # minimal FSDP2 script, 1 of 4 training runs; none in 8 and 7 with this).
            import gc

            model = optimizer = lr_scheduler = trainer = None  # noqa: F841
            gc.collect()
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


def _dry_run(trainer, config: dict, args: argparse.Namespace, run_dir) -> int:
    """One batch through the trainer's own step, backward and the metrics: model, data, step, loss and
    metrics fit together, or one line says where they do not."""
    import torch

    from base import model_summary
    from runtime.batch import batch_size, describe, to_device
    from runtime.run_dir import new_run_id, run_root

    trainer.model.train()
    trainer.data_loader.set_epoch(1)
    batch = next(iter(trainer.data_loader))
    try:
        batch = to_device(batch, trainer.device)
        trainer.optimizer.zero_grad()
        out = trainer.step(batch)
        trainer._check_step_output(out, batch, training=True)
        out["loss"].backward()
        if trainer.train_metrics.enabled:
            with torch.no_grad():
                trainer.train_metrics.update(out["output"], out["target"], out.get("batch_size") or batch_size(batch))
                trainer.train_metrics.compute()
    except ConfigError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError, AssertionError) as exc:
        # Checking that model, data, step, loss and metrics fit together is what --dry-run is for: one line,
        # with where it happened (the innermost frame: often the user's own step or model).
        import traceback

        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise ConfigError(f"--dry-run: one batch ({describe(batch)}) through {type(trainer).__name__}.step, "
                          f"backward and the metrics failed: {exc.__class__.__name__}: "
                          f"{' '.join(str(exc).split())} (at {frame.filename}:{frame.lineno})") from None
    print(model_summary(trainer.model))
    print(f"one batch: {describe(batch)}, loss {out['loss'].item():.4f}, backward ok"
          + (", metrics ok" if trainer.train_metrics.enabled else ""))
    where = run_dir or run_root(config) / (args.run_id or f"<timestamp like {new_run_id()}>")
    print(f"run directory (not created): {where}")
    return 0


def _check_steps(loader, config: dict, dist) -> list[str]:
    """Refuse a run that cannot take an optimizer step; return warnings for one that takes surprising ones."""
    size, batch = len(loader.sampler), loader.batch_size
    share = " per process" if dist.enabled else ""
    if size == 0:
        raise ConfigError("data_loader: the training split is empty (data_loader.args.validation_split takes "
                          "every sample?)")
    if len(loader) == 0:
        raise ConfigError(f"data_loader.args.batch_size: {batch} with drop_last: true leaves no training batch: "
                          f"the training split has {size} samples{share}; lower the batch size or set "
                          f"data_loader.args.drop_last=false")
    if batch and batch > size:
        return [f"data_loader.args.batch_size: {batch} is larger than the training split ({size} samples{share}): "
                f"every epoch is one optimizer step"]
    return []


def _finished(state: dict, config: dict, where) -> str | None:
    """What to say instead of resuming a run that has nothing left to do, or None."""
    if not state.get("epoch_finished"):
        return None
    epoch, cfg = state["epoch"], config["trainer"]
    if epoch >= cfg["epochs"]:
        return (f"{where}: this run already finished {epoch} epoch{'s' if epoch != 1 else ''} (step "
                f"{state['global_step']}; trainer.epochs is {cfg['epochs']}); nothing to do. To train it further: "
                f"python train.py -r {where} trainer.epochs={epoch + 10}")
    if cfg["early_stop"] and state["not_improved_count"] >= cfg["early_stop"]:
        return (f"{where}: this run stopped early at epoch {epoch} ({cfg['monitor'].split()[-1]} did not improve "
                f"for {cfg['early_stop']} epochs); nothing to do. To train it further: python train.py -r {where} "
                f"trainer.early_stop={cfg['early_stop'] + 5}")
    return None


def _resume_command(run_dir: Path, dist) -> str:
    import shlex

    launcher = f"torchrun --standalone --nproc_per_node={dist.world_size} " if dist.enabled else "python "
    return f"{launcher}train.py -r {shlex.quote(str(run_dir))}"


def _ended(exc: BaseException, trainer, resume_command: str) -> BaseException:
    """Record in train.log how the run ended and return what train.py turns into the exit status: the
    reason, and the resume command when a checkpoint holds the run. An error in the user's code becomes one
    line naming the piece and file:line (TrainingError, exit 1); its traceback goes to train.log (and to
    the console at trainer.verbosity 2)."""
    from logger import log_file_only
    from runtime.blame import describe_error, locate, worker_died

    logger = trainer.logger
    # TensorBoard's HParams: failed runs must not look finished (train() records its own ends; this covers
    # a failure before it, in the resume).
    trainer.writer.record_status("interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed")
    saved = trainer.checkpoint_dir is not None and any((trainer.checkpoint_dir / name).exists()
                                                       for name in ("last.pth", "last"))  # "last": sharded
    where = f"epoch {trainer.epoch}, after step {trainer.global_step}"
    if isinstance(exc, Interrupted):
        name = signal.Signals(exc.signum).name if exc.signum in set(signal.Signals) else f"signal {exc.signum}"
        exc = Interrupted(exc.signum, f"{exc} ({name}); resume: {resume_command}")
        log_file_only(logger, str(exc), "WARNING")
        return exc
    if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: stopped at once
        log_file_only(logger, f"interrupted (second Ctrl-C) at {where}; the newest checkpoint on disk is intact"
                      + (f"; resume: {resume_command}" if saved else ""), "WARNING")
        return exc
    if isinstance(exc, UserError):  # found by the first real step (a detached loss): the directory exists
        exc = UserError(f"{' '.join(str(exc).split())}; {trainer.run_dir} was created"
                        + ("" if saved else " but holds no checkpoint (delete it, or fix and rerun with "
                                            f"--run-id {trainer.run_dir.name} to reuse it)"))
        log_file_only(logger, f"failed at {where}: {exc}", "ERROR")
        return exc
    if isinstance(exc, TrainingError):
        exc = TrainingError(f"{exc}" + (f"; resume from the newest checkpoint: {resume_command}" if saved else ""))
    elif worker_died(exc):
        exc = TrainingError(f"a DataLoader worker died at {where}: {describe_error(exc)}"
                            + (f"; resume: {resume_command}" if saved else ""))
    else:
        logger.debug("".join(traceback.format_exception(exc)).rstrip())  # the console too at verbosity 2
        from runtime.distributed import mixed_precision_hint

        piece, at = locate(exc) or ("training", None)
        hint = mixed_precision_hint(str(exc), trainer.config["trainer"])
        exc = TrainingError(f"{piece} failed at {where}{f' ({at})' if at else ''}: {describe_error(exc)}{hint}; "
                            f"traceback in {trainer.run_dir / 'train.log'}"
                            + (f"; after fixing it, resume: {resume_command}" if saved else ""))
    log_file_only(logger, str(exc), "ERROR")
    return exc


def _summary(logger, config: dict, run_dir: Path, trainer, result: dict, seconds: float, resumed: bool) -> None:
    from logger.console import duration, number

    how = "stopped early" if result["early_stopped"] else "finished"
    logger.info(f"{how}: run directory {run_dir} ({result['epochs_run']} epoch{'s' if result['epochs_run'] != 1 else ''}{' this session' if resumed else ''}, "
                f"step {trainer.global_step}, {duration(seconds)})")
    if trainer.monitor_mode != "off" and result["best_epoch"]:
        logger.info(f"best {trainer.monitor_metric}: {number(result['monitor_best'])} at epoch {result['best_epoch']}")
    checkpoints = run_dir / "checkpoints"
    best = checkpoints / ("best.pth" if (checkpoints / "best.pth").exists() else "last.pth")
    logger.info(f"checkpoints: {checkpoints}")
    if trainer.metrics_csv is not None:
        logger.info(f"metrics:     {run_dir / 'metrics.csv'}")
    if trainer.sharded_checkpoints:  # checkpoint directories: test.py reads one plain file
        from checkpoint.consolidate import suggested_output

        out = suggested_output(run_dir)
        logger.info(f"evaluate:    python -m checkpoint.consolidate {run_dir} {out} && python test.py -r {out}")
    else:
        logger.info(f"evaluate:    python test.py -r {best}")
    more = f"trainer.early_stop={trainer.early_stop + 5}" if result["early_stopped"] else \
        f"trainer.epochs={trainer.epochs + 10}"
    logger.info(f"train more:  {_resume_command(run_dir, trainer.dist)} {more}")
    if trainer.writer.draws:
        logger.info(f"tensorboard: tensorboard --logdir {config['trainer']['save_dir']}")
    if "mlflow" in config["trainer"]["loggers"]:
        from logger.mlflow_logger import read_run_file, shown_uri

        recorded = read_run_file(run_dir)
        if recorded is not None and recorded[1] is not None:
            logger.info(f"mlflow:      mlflow ui --backend-store-uri {shown_uri(recorded[1])}")
