"""What a config's `type` may name, and checks of `args` against the constructor's signature.

A name resolves only among this project's models, data loaders, trainers, losses and metrics,
`torch.optim`, `torch.optim.lr_scheduler` and `torchvision.models`: never an arbitrary import path,
so a config cannot reach os.system, eval or torch.load.
"""
from __future__ import annotations

import importlib
import inspect
import math
import typing
import pkgutil
from functools import lru_cache
from typing import Any, Callable

from config.schema import short, suggest


@lru_cache(maxsize=None)
def project_classes(package: str, base_name: str) -> dict[str, type]:
    """Non-abstract subclasses of `base_name` defined in any module of `package` (imported here)."""
    import base
    import torch.nn as nn

    base_cls = {"Module": nn.Module, "BaseDataLoader": base.BaseDataLoader, "BaseTrainer": base.BaseTrainer}[base_name]
    pkg = importlib.import_module(package)
    found: dict[str, type] = {}
    duplicates = DUPLICATES.setdefault(package, {})
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for name, obj in vars(module).items():
            # Abstract trainers too: one that implements pytorch-template's _train_epoch instead of `step` is
            # refused with a message saying what to override (trainer.trainer.loop_override), not "unknown".
            if (isinstance(obj, type) and issubclass(obj, base_cls) and obj is not base_cls
                    and (not inspect.isabstract(obj) or base_name == "BaseTrainer")
                    and obj.__module__.startswith(package + ".") and not name.startswith("_")):
                if name in found and found[name] is not obj:  # two classes, one name: neither may be guessed
                    duplicates.setdefault(name, {_file_of(found[name])}).add(_file_of(obj))
                found[name] = obj
    return found


# package -> class name -> the files that define a class of that name (see `resolve`).
DUPLICATES: dict[str, dict[str, set[str]]] = {}


def _file_of(cls: type) -> str:
    import os

    return os.path.relpath(inspect.getsourcefile(cls) or cls.__module__)


@lru_cache(maxsize=None)
def module_functions(module_name: str) -> dict[str, Callable]:
    module = importlib.import_module(module_name)
    return {name: fn for name, fn in vars(module).items()
            if inspect.isfunction(fn) and fn.__module__ == module_name and not name.startswith("_")}


@lru_cache(maxsize=None)
def torch_classes(section: str) -> dict[str, type]:
    import torch.optim
    import torch.optim.lr_scheduler as schedulers

    if section == "optimizer":
        module, bases = torch.optim, (torch.optim.Optimizer,)
    else:
        module, bases = schedulers, (schedulers.LRScheduler, schedulers.ReduceLROnPlateau)
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, bases) and obj is not bases[0]  # ReduceLROnPlateau is usable
            and not name.startswith("_")}


@lru_cache(maxsize=None)
def metric_classes() -> dict[str, type]:
    """torchmetrics' metric classes (top level, classification, regression, segmentation, aggregation) and
    the torchmetrics.Metric subclasses of model/metric.py."""
    import importlib

    import torchmetrics

    found: dict[str, type] = {}
    for module_name in ("torchmetrics", "torchmetrics.classification", "torchmetrics.regression",
                        "torchmetrics.segmentation", "torchmetrics.aggregation", "model.metric"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, torchmetrics.Metric) and obj is not torchmetrics.Metric \
                    and not name.startswith("_"):
                found[name] = obj
    return found


@lru_cache(maxsize=None)
def torchvision_models() -> tuple[str, ...]:
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def candidates(section: str) -> dict[str, Any]:
    if section == "arch":
        return project_classes("model", "Module")
    if section == "data_loader":
        return project_classes("data_loader", "BaseDataLoader")
    if section == "trainer":
        return project_classes("trainer", "BaseTrainer")
    if section == "loss":
        return module_functions("model.loss")
    if section == "metrics":
        return module_functions("model.metric")
    if section == "init":
        from model.init import SCHEMES

        return dict(SCHEMES)
    return torch_classes(section)


WHAT = {"arch": "model", "data_loader": "data loader", "trainer": "trainer", "loss": "loss",
        "metrics": "metric", "optimizer": "torch.optim optimizer", "lr_scheduler": "torch.optim.lr_scheduler class",
        "init": "init scheme"}
ARTICLE = {"arch": "a", "data_loader": "a", "trainer": "a", "loss": "a", "metrics": "a", "optimizer": "a",
           "lr_scheduler": "a", "init": "an"}


def resolve(section: str, name: Any, where: str) -> tuple[Any, str | None]:
    """(object, None) or (None, problem). Arch names fall back to torchvision.models (weights=None)."""
    if not isinstance(name, str):
        return None, f"{where}: expected a name, got {short(name)}"
    found = candidates(section)
    package = {"arch": "model", "data_loader": "data_loader", "trainer": "trainer"}.get(section)
    if package and name in DUPLICATES.get(package, {}):
        files = " and ".join(sorted(DUPLICATES[package][name]))
        return None, f"{where}: {name} is defined in both {files}; rename one of them"
    if name in found:
        return found[name], None
    if section == "arch" and "." not in name and name in torchvision_models():
        return name, None  # built by config.build through torchvision.models.get_model
    if section == "metrics" and name[:1].isupper() and name in metric_classes():
        return metric_classes()[name], None  # torchmetrics is imported only for class names (~1.5 s)
    valid = sorted(found)
    extra = " or any torchvision.models name (e.g. resnet18)" if section == "arch" else \
        " or a torchmetrics class (e.g. MulticlassF1Score)" if section == "metrics" else ""
    shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
    pool = valid + (list(torchvision_models()) if section == "arch" else
                    list(metric_classes()) if section == "metrics" and name[:1].isupper() else [])
    return None, (f"{where}: {short(name)} is not {ARTICLE[section]} {WHAT[section]}{suggest(name, pool)}; "
                  f"valid: {shown}{extra}")


MAX_WORKERS = 256
# Range checks for arguments that many constructors share, so `lr: -1` is caught before building.
ARG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf, "a number >= 0"),
    "batch_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    # Each worker is a process: a typo such as 100000 would fork until the machine gives out.
    "num_workers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_WORKERS,
                    f"an integer in [0, {MAX_WORKERS}]"),
    "validation_split": (
        lambda v: not isinstance(v, bool) and (isinstance(v, int) and v >= 0 or isinstance(v, float) and 0 <= v < 1),
        "a fraction in [0, 1) or a count >= 0"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce_number(value: Any, default: Any) -> Any:
    """A string such as '1e-3' where the parameter's default is a number becomes that number."""
    if isinstance(value, str) and _is_number(default):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        return int(number) if isinstance(default, int) and number.is_integer() else number
    return value


def _type_problem(value: Any, default: Any, annotation: Any = None) -> str | None:
    """What is wrong with `value` for a parameter whose default is `default`, judged by the default's type.

    Only scalars are judged: a number where the default is a number (a list is let through, as
    ReduceLROnPlateau's min_lr takes one per group), a boolean where it is a boolean, a string where
    it is a string. A default of None says nothing about the type. A `Literal[...]` annotation
    (torch's `mode='fan_in'`) gives the choices. Returns "expected ..." text, or None when fine.
    """
    if value is None or default is None or default is inspect.Parameter.empty:
        return None
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
    if choices and value not in choices:
        return f"one of {', '.join(map(str, choices))}, got {short(value)}{suggest(value, choices)}"
    if isinstance(default, bool):
        expected = None if isinstance(value, bool) else "true or false"
    elif _is_number(default):
        expected = None if _is_number(value) or isinstance(value, list) else "a number"
    elif isinstance(default, str):
        expected = None if isinstance(value, str) else "a string"
    else:
        expected = None
    return expected and f"{expected} (the default is {default!r}), got {short(value)}"


def check_args(target: Callable, args: dict, where: str, injected: tuple[str, ...] = (),
               skip_positional: int = 0) -> tuple[dict, list[str]]:
    """Check `args` against `target`'s signature; returns (coerced args, problems)."""
    problems: list[str] = []
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return dict(args), problems
    params = [p for p in signature.parameters.values() if p.name != "self"][skip_positional:]
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    out = {}
    title = getattr(target, "__name__", str(target))
    for key, value in args.items():
        if key in injected:
            problems.append(f"{where}.{key}: set by the builder, remove it from the config")
            continue
        if key not in named and not takes_any:
            problems.append(f"{where}.{key}: {title}() has no argument {key!r}{suggest(key, named)}")
            continue
        if key in named:
            value = _coerce_number(value, named[key].default)
        if key in ARG_RULES and not ARG_RULES[key][0](value):
            problems.append(f"{where}.{key}: expected {ARG_RULES[key][1]}, got {short(value)}")
            continue
        expected = _type_problem(value, named[key].default, named[key].annotation) if key in named else None
        if expected:
            problems.append(f"{where}.{key}: expected {expected}")
            continue
        out[key] = value
    for name, param in named.items():
        if param.default is inspect.Parameter.empty and name not in args and name not in injected:
            problems.append(f"{where}: {title}() needs argument {name!r}")
    return out, problems


def default_of(target: Callable, name: str, fallback: Any = None) -> Any:
    try:
        param = inspect.signature(target).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default
