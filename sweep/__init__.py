"""Many runs from one command: grid sweeps (`--sweep key=a,b`), k-fold cross-validation (`--folds K`)
and Optuna searches (`--sweep-trials N`), each resumable with `python train.py -r SWEEP_DIR`.

Every run is a plain `train.py` child process with its own run directory inside the sweep
directory, so each keeps a single run's guarantees (validation before side effects, exact resume,
130/143 on a signal). Every run's config is validated before anything is written.
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
from pathlib import Path

from errors import ConfigError, Interrupted, UserError

__all__ = ["sweep_requested", "run_sweep"]


def sweep_requested(args: argparse.Namespace) -> bool:
    from sweep.runner import is_sweep_dir

    if args.sweep or args.sweep_trials or args.folds is not None:
        return True
    if args.resume:
        return is_sweep_dir(args.resume)
    return not args.print_config and _config_folds(args) is not None


def _config_folds(args: argparse.Namespace) -> int | None:
    """`data_loader.folds: K` without a `fold` in the config (and its overrides): the k-fold runs."""
    from config.files import apply_overrides, plain_tree, read_config_file
    from config.schema import is_known_path

    try:  # plain_tree first: it refuses the deep or aliased trees that the copy in apply_overrides cannot walk
        raw = plain_tree(read_config_file(args.config), str(args.config))
        loader = apply_overrides(raw, list(args.overrides), known=is_known_path)["data_loader"]
        folds = loader.get("folds")
        return folds if isinstance(folds, int) and not isinstance(folds, bool) and loader.get("fold") is None else None
    except (UserError, KeyError, TypeError, AttributeError):
        return None  # reported by the single run's validation


def run_sweep(args: argparse.Namespace, stop) -> int:
    """`stop`: train.py's stop handler, installed from the start; a signal it caught before the sweep
    took over stops the sweep before anything is written."""
    from runtime.distributed import launched_by_torchrun
    from sweep.runner import Forwarder

    if launched_by_torchrun():
        raise UserError("a sweep starts its runs itself: run it as a single process, python train.py ... --nproc N "
                        "(each run then runs under torchrun with N processes)")
    if args.print_config:
        raise UserError("--print-config shows one run's config: leave out --sweep/--folds/--sweep-trials")
    if args.resume:
        sweep_dir, spec = _resumed(args)
    else:
        sweep_dir, spec = _planned(args)
        if sweep_dir is None:  # --dry-run
            return 0
    forwarder = Forwarder().install(stop.signum)
    lock = parent = None
    status = "FAILED"
    try:
        from runtime.run_dir import RunLock

        lock = RunLock(sweep_dir)
        if forwarder.signum is not None:
            from sweep.runner import stopped

            raise stopped(forwarder, sweep_dir)
        parent = _mlflow_parent(sweep_dir, spec)
        env = {**os.environ, **parent.env} if parent is not None else None
        if spec["kind"] == "search":
            from sweep.search import run_search

            code = run_search(sweep_dir, spec, forwarder, env)
        else:
            from sweep.runner import run_grid

            code = run_grid(sweep_dir, spec, forwarder, env)
        status = "FINISHED" if code == 0 else "FAILED"
        return code
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            from sweep.runner import CSV_NAME

            parent.close(status, sweep_dir / CSV_NAME)
        if lock is not None:
            lock.release()
        forwarder.uninstall()


def _mlflow_parent(sweep_dir: Path, spec: dict):
    """The sweep's own MLflow run when its runs log to MLflow (trainer.loggers), else None: in the experiment
    of the config's name, in the store of its save_dir (or MLFLOW_TRACKING_URI); the same run on resume."""
    from sweep.runner import CONFIG_NAME, read_yaml

    config = read_yaml(sweep_dir / CONFIG_NAME)
    if "mlflow" not in config["trainer"].get("loggers", ()):
        return None
    from logger.mlflow_logger import SweepParent

    root = Path(config["trainer"]["save_dir"])  # <save_dir>/<name> of the sweep's command (see _planned)
    size = len(spec["runs"]) if spec["kind"] == "grid" else spec["search"]["trials"]
    params = {"sweep.kind": spec["kind"], "sweep.keys": ",".join(spec["keys"]), "sweep.runs": size,
              "sweep.nproc": spec.get("nproc"), "sweep.command": spec["command"]}
    try:
        return SweepParent(sweep_dir, root.parent, root.name, params)
    except Exception as exc:  # noqa: BLE001 - a store that cannot be opened is the user's to fix
        from logger.mlflow_logger import tracking_uri

        raise UserError(f"trainer.loggers: mlflow: cannot log to {tracking_uri(root.parent)}: "
                        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None


def _resumed(args: argparse.Namespace) -> tuple[Path, dict]:
    from sweep.runner import read_spec

    extra = [f"-c {args.config}"] if args.config else []
    extra += [f"--{name.replace('_', '-')}" for name in ("sweep", "sweep_trials", "folds", "nproc", "lr", "bs",
                                                          "device", "run_id") if getattr(args, name)]
    if extra or args.overrides:
        raise UserError(f"-r {args.resume}: a sweep resumes as it was started ({' '.join(extra + args.overrides)} "
                        f"not allowed); start a new sweep to change it")
    sweep_dir = Path(args.resume).resolve()
    return sweep_dir, read_spec(sweep_dir)


def _planned(args: argparse.Namespace) -> tuple[Path | None, dict]:
    """Parse the sweep, validate every run's config, then (not for --dry-run) create the sweep directory."""
    from config import load_config, resolve_config
    from run import _overrides
    from runtime.run_dir import check_run_id, new_run_id, run_root
    from sweep.runner import CONFIG_NAME, SPEC_NAME, write_rows, write_yaml
    from sweep.spec import grid, overrides_of, parse_axes

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc: {args.nproc} must be at least 1")
    if args.folds is None and not args.sweep and not args.sweep_trials:
        args.folds = _config_folds(args)
    if args.folds is not None and args.folds < 2:
        raise UserError(f"--folds: {args.folds} must be at least 2")
    if args.folds and args.sweep_trials:
        # The folds would become one more searched value: trials compared on different validation sets.
        raise UserError("--folds with --sweep-trials would search over the folds (each trial validated on "
                        "another fold); cross-validate the best setting afterwards: python train.py -c CONFIG "
                        "--folds K key=value ...")
    if args.sweep_trials is not None and args.sweep_trials < 1:
        raise UserError(f"--sweep-trials: {args.sweep_trials} must be at least 1")
    axes, fixed = parse_axes(args.sweep or [])
    if args.folds:
        from sweep.spec import Axis

        if any(a.key.startswith("data_loader.fold") for a in axes):
            raise UserError("--folds K sets data_loader.folds and data_loader.fold itself: leave them out of --sweep")
        axes.append(Axis("data_loader.fold", "list", tuple(str(i) for i in range(args.folds))))
        fixed.append(f"data_loader.folds={args.folds}")
    sweep_id = args.run_id or f"sweep-{new_run_id()}"
    check_run_id(sweep_id)
    base = load_config(args.config, _overrides(args) + fixed)
    root = run_root(base).resolve()
    sweep_dir = root / sweep_id
    # The runs' base config: their run directories are <root>/<sweep id>/<run id>, whatever the working directory.
    child = copy.deepcopy(base)
    child["name"], child["trainer"]["save_dir"] = sweep_id, str(root)
    monitor = None if base["trainer"]["monitor"] == "off" else base["trainer"]["monitor"].split()[1]
    spec = {"format": 1, "kind": "grid", "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "nproc": args.nproc, "monitor": monitor, "keys": [a.key for a in axes]}
    if args.sweep_trials:
        from sweep.search import plan_search

        spec.update(plan_search(axes, args.sweep_trials, base))
        combinations = spec.pop("checks")
    else:
        combinations = grid(axes)
        prefix = "fold" if [a.key for a in axes] == ["data_loader.fold"] else "run"
        width = 1 if prefix == "fold" else 3
        spec["runs"] = [{"run_id": f"{prefix}-{i:0{width}d}", "values": values} for i, values in enumerate(combinations)]
    _validate(child, combinations)
    if args.dry_run:
        for run in spec.get("runs", []):
            print(f"{run['run_id']}: {' '.join(overrides_of(run['values']))}")
        if spec["kind"] == "search":
            print(f"{spec['search']['trials']} trials over {', '.join(spec['keys'])} (Optuna TPE, seed {spec['search']['seed']})")
        print(f"sweep directory (not created): {sweep_dir}; every run's config is valid")
        return None, spec
    try:
        sweep_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise UserError(f"sweep directory {sweep_dir} exists; resume it with python train.py -r {sweep_dir}, "
                        f"or pick another --run-id") from None
    except OSError as exc:
        raise UserError(f"cannot create sweep directory {sweep_dir}: {exc.strerror or exc}") from None
    write_yaml(sweep_dir / CONFIG_NAME, child)
    from sweep.runner import row_from_csv

    write_rows(sweep_dir, spec["keys"], [row_from_csv(None, run, monitor) for run in spec.get("runs", [])], monitor)
    write_yaml(sweep_dir / SPEC_NAME, spec)  # last: a directory with sweep.yaml is a whole sweep
    print(f"sweep directory: {sweep_dir} ({len(spec['runs']) if spec['kind'] == 'grid' else spec['search']['trials']} "
          f"runs{f', {args.nproc} processes each' if args.nproc else ''})", flush=True)
    return sweep_dir, spec


def _validate(child: dict, combinations: list[dict[str, str]]) -> None:
    """Every run's config, before anything is written; each problem once, with the first run that has it."""
    from config import resolve_config
    from logger.writers import check_loggers
    from sweep.spec import overrides_of

    problems: dict[str, str] = {}
    for values in combinations:
        overrides = overrides_of(values)
        try:
            check_loggers(resolve_config(child, overrides, "config"))
        except ConfigError as exc:
            for problem in exc.problems:
                problems.setdefault(problem.removeprefix("config: "), " ".join(overrides))
    if problems:
        raise ConfigError([f"--sweep {where}: {problem}" for problem, where in problems.items()])
