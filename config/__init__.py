"""Config: read (JSON/YAML), override, validate whole, and only then hand out a plain dict.

Loading a config has no side effects: no directories, no files, no seeding.
"""
from __future__ import annotations

from pathlib import Path

from config.files import apply_overrides, plain_problems, plain_tree, read_config_file
from config.registry import check_args, default_of, resolve
from config.schema import is_known_path, metric_spec, short, validate
from errors import ConfigError

__all__ = ["load_config", "resolve_config", "check_config", "metric_names"]

NESTED_SCHEDULERS = ("SequentialLR", "ChainedScheduler")
# Set by config.build for torchvision models (weights=None), or a download torchvision would try.
TORCHVISION_BUILDER_ARGS = {"weights", "weights_backbone"}


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read `path`, apply `key.path=value` overrides, validate; raise ConfigError listing every problem."""
    return resolve_config(read_config_file(path), overrides, str(path))


def resolve_config(raw, overrides: list[str] = (), source: str = "config") -> dict:
    """A config file's or a checkpoint's stored config with overrides applied, validated."""
    raw = plain_tree(raw, source)  # first: every walk below assumes a small tree (no aliases, no deep nesting)
    if raw is None:  # a checkpoint written by another tool
        raise ConfigError(f"{source}: missing; pass a config with -c CONFIG")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level of a config must be a mapping, not {type(raw).__name__}")
    return check_config(apply_overrides(raw, list(overrides), known=is_known_path), source)


def check_config(raw: dict, source: str = "config") -> dict:
    raw = plain_tree(raw, source)
    problems = plain_problems(raw)
    if problems:  # sets or NaN would break the checks below; report them alone
        raise ConfigError([f"{source}: {p}" for p in problems])
    config = validate(raw, problems)
    _check_types(config, problems)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return config


def _check_typed(config: dict, section: str, problems: list[str], injected: tuple[str, ...] = (),
                 where: str | None = None, registry: str | None = None, skip_positional: int = 0):
    spec = config.get(section)
    where = where or section
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        return None
    target, problem = resolve(registry or section, spec["type"], f"{where}.type")
    if problem:
        problems.append(problem)
        return None
    if isinstance(target, str):  # a torchvision model: its **kwargs go to the model class
        args = spec.get("args") if isinstance(spec.get("args"), dict) else {}
        for key in TORCHVISION_BUILDER_ARGS & set(args):
            problems.append(f"{where}.args.{key}: not allowed: {spec['type']} is built with weights=None "
                            f"(nothing is downloaded); to start from trained weights set arch.pretrained "
                            f"to a checkpoint of this project")
        return target
    if isinstance(spec.get("args"), dict):
        spec["args"], found = check_args(target, spec["args"], f"{where}.args", injected, skip_positional)
        problems.extend(found)
    return target


def _check_types(config: dict, problems: list[str]) -> None:
    _check_typed(config, "arch", problems)
    arch = config.get("arch")
    if isinstance(arch, dict) and isinstance(arch.get("init"), dict):
        _check_typed(arch, "init", problems, where="arch.init", skip_positional=1)
    loader_cls = _check_typed(config, "data_loader", problems)
    _check_folds(config.get("data_loader"), problems)
    _check_typed(config, "optimizer", problems, injected=("params",))
    loss = config.get("loss")
    if isinstance(loss, str):
        _, problem = resolve("loss", loss, "loss")
        if problem:
            problems.append(problem)
    elif isinstance(loss, dict):
        _check_typed(config, "loss", problems, skip_positional=2)
    metrics = config.get("metrics") if isinstance(config.get("metrics"), list) else None
    if metrics is not None and not _check_metrics(metrics, problems):
        metrics = None
    _check_scheduler(config.get("lr_scheduler"), "lr_scheduler", problems)
    scheduler = config.get("lr_scheduler")
    if isinstance(scheduler, dict) and scheduler.get("type") == "ReduceLROnPlateau":
        if scheduler.get("interval") == "step":
            problems.append("lr_scheduler.interval: ReduceLROnPlateau is fed the monitored metric once per epoch; "
                            "use interval: epoch")
    trainer = config.get("trainer")
    if isinstance(trainer, dict):
        if isinstance(trainer.get("type"), str):
            target, problem = resolve("trainer", trainer["type"], "trainer.type")
            if target is not None:
                from trainer.trainer import loop_override

                problem = loop_override(target)
            if problem:
                problems.append(problem)
        if metrics is not None:  # with an unknown metric the list of what the run logs means nothing
            _check_monitor(config, loader_cls, problems)


def _check_folds(spec, problems: list[str]) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("fold"), int):
        return
    folds = spec.get("folds")
    if not isinstance(folds, int):
        problems.append("data_loader.fold: needs data_loader.folds (the number of folds)")
    elif spec["fold"] >= folds:
        problems.append(f"data_loader.fold: {spec['fold']} must be < data_loader.folds ({folds})")


def _check_scheduler(spec, where: str, problems: list[str]) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        return
    if spec["type"] in NESTED_SCHEDULERS and isinstance(spec.get("args"), dict):
        inner = spec["args"].get("schedulers")
        if not isinstance(inner, list) or not inner:
            problems.append(f"{where}.args.schedulers: expected a list of {{type, args}}")
        else:
            for i, item in enumerate(inner):
                if (not isinstance(item, dict) or set(item) - {"type", "args"} or not isinstance(item.get("type"), str)
                        or not isinstance(item.setdefault("args", {}), dict)):
                    problems.append(f"{where}.args.schedulers[{i}]: expected {{type: name, args: mapping}}, "
                                    f"got {short(item)}")
                    continue
                _check_scheduler(item, f"{where}.args.schedulers[{i}]", problems)
        rest = {k: v for k, v in spec["args"].items() if k != "schedulers"}
        target, problem = resolve("lr_scheduler", spec["type"], f"{where}.type")
        if target is not None:
            rest, found = check_args(target, rest, f"{where}.args", injected=("optimizer", "schedulers"))
            problems.extend(found)
            spec["args"] = {**rest, "schedulers": inner}
        return
    holder = {"lr_scheduler": spec}
    _check_typed(holder, "lr_scheduler", problems, injected=("optimizer",), where=where)


def _check_metrics(metrics: list, problems: list[str]) -> bool:
    """Each entry names a metric function or class, with arguments it takes; names are unique."""
    import inspect

    seen: dict[str, int] = {}
    ok = True
    for i, item in enumerate(metrics):
        where = f"metrics[{i}]"
        spec = metric_spec(item)
        if isinstance(item, dict):
            unknown = [k for k in item if k not in ("type", "args", "name")]
            if unknown or spec is None or not isinstance(item.get("args", {}), dict) \
                    or not isinstance(item.get("name", ""), str) or not (item.get("name") or "x").isidentifier():
                problems.append(f"{where}: expected {{type: metric, args: {{...}}, name: identifier}} (args and name "
                                f"optional), got {short(item)}")
                ok = False
                continue
        if spec is None:
            continue  # the schema reported it
        target, problem = resolve("metrics", spec["type"], f"{where}.type" if isinstance(item, dict) else where)
        if problem:
            problems.append(problem)
            ok = False
            continue
        if spec["args"] or inspect.isclass(target):
            args, found = check_args(target, spec["args"], f"{where}.args", skip_positional=0 if inspect.isclass(target) else 2)
            problems.extend(found)
            if isinstance(item, dict):
                item["args"] = args
            if inspect.isclass(target) and not found:
                # torchmetrics classes take **kwargs: their own checks run when one is built (cheap), so
                # build it now and report a bad argument with the other problems.
                try:
                    target(**args)
                except Exception as exc:  # noqa: BLE001 - any constructor error is this entry's problem
                    problems.append(f"{where}.args: {target.__name__}: {' '.join(str(exc).split())}")
                    ok = False
        if spec["name"] == "loss" or spec["name"].startswith("val_"):
            problems.append(f"{where}: the name {spec['name']!r} is the run's own (loss, val_*): pick another `name:`")
            ok = False
        if spec["name"] in seen:
            problems.append(f"{where}: a second metric named {spec['name']!r} (the first is metrics[{seen[spec['name']]}]); "
                            f"remove one, or tell them apart with `name:`")
            ok = False
        seen.setdefault(spec["name"], i)
    return ok


def metric_names(config: dict, loader_cls=None) -> list[str]:
    """Every name a run logs per epoch: loss and metrics, and val_ versions when there is a split."""
    metrics = config.get("metrics") if isinstance(config.get("metrics"), list) else []
    names = ["loss"] + [spec["name"] for spec in map(metric_spec, metrics) if spec is not None]
    args = config["data_loader"].get("args")
    args = args if isinstance(args, dict) else {}
    split = args.get("validation_split", default_of(loader_cls, "validation_split", 0.0) if loader_cls else 0.0)
    if split or config["data_loader"].get("folds"):
        names += [f"val_{name}" for name in names]
    return names


def _check_monitor(config: dict, loader_cls, problems: list[str]) -> None:
    monitor = config["trainer"].get("monitor")
    if not isinstance(monitor, str) or monitor == "off" or loader_cls is None:
        return
    mode, _, metric = monitor.partition(" ")
    if mode not in ("min", "max") or not metric:
        return
    produced = metric_names(config, loader_cls)
    if metric.strip() not in produced:
        hint = "" if any(n.startswith("val_") for n in produced) else \
            " (there is no validation split: set data_loader.args.validation_split)"
        problems.append(f"trainer.monitor: the run never produces {metric.strip()!r}; it logs "
                        f"{', '.join(produced)}{hint}")
