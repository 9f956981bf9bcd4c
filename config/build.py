"""Builders shared by train.py and test.py: every object comes from a validated config's {type, args}."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from config import NESTED_SCHEDULERS
from config.registry import candidates, resolve
from errors import ConfigError

if TYPE_CHECKING:
    import torch


def _construct(where: str, target: Callable, *args: Any, **kwargs: Any):
    """Call a constructor; argument errors it raises are the user's config problem (exit 2).

    torch reports impossible sizes (`num_classes: -3`) as RuntimeError, huge ones as OverflowError.
    """
    try:
        return target(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        name = getattr(target, "__name__", str(target))
        raise ConfigError(f"{where}: {name}: {' '.join(str(exc).split())}") from None


def build_model(config: dict):
    import torch.nn as nn

    arch = config["arch"]
    target, problem = resolve("arch", arch["type"], "arch.type")
    if problem:
        raise ConfigError(problem)
    if isinstance(target, str):
        import torchvision.models

        model = _construct("arch", torchvision.models.get_model, target, weights=None, **arch["args"])
    else:
        model = _construct("arch", target, **arch["args"])
    assert isinstance(model, nn.Module), type(model)
    if arch.get("init"):
        from model.init import init_weights

        _construct("arch.init", init_weights, model, arch["init"]["type"], **arch["init"]["args"])
    if arch.get("pretrained"):
        from checkpoint import load_checkpoint, load_model_state

        state = load_checkpoint(arch["pretrained"])
        from logger import get_logger

        skipped = load_model_state(model, state["state_dict"], strict=arch["strict"], source=arch["pretrained"])
        for note in skipped:  # only with arch.strict: false; strict loading raises instead
            get_logger().warning(f"arch.pretrained {arch['pretrained']}: not loaded: {note}")
    return model


def _loader_args(cls, args: dict, device: torch.device | None) -> dict:
    """The config's args, with pin_memory on where the device is CUDA and the config does not say: batches in
    page-locked memory are what makes the trainer's `.to(device, non_blocking=True)` asynchronous."""
    import inspect

    if device is not None and device.type == "cuda" and "pin_memory" not in args \
            and "pin_memory" in inspect.signature(cls).parameters:
        return {**args, "pin_memory": True}
    return args


def build_data_loaders(config: dict, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
    """(train loader, validation loader or None), split and ordered by the config's seed."""
    spec = config["data_loader"]
    cls, _ = resolve("data_loader", spec["type"], "data_loader.type")
    loader = _construct("data_loader.args", cls, **_loader_args(cls, spec["args"], device))
    loader.configure(config["seed"], rank, world_size, folds=spec.get("folds"), fold=spec.get("fold"))
    return loader, loader.split_validation()


def build_test_loader(config: dict, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
    """The test split: the same data loader type with training=False, unshuffled, no validation split."""
    import inspect

    spec = config["data_loader"]
    cls, _ = resolve("data_loader", spec["type"], "data_loader.type")
    accepted = inspect.signature(cls).parameters
    if "training" not in accepted:
        raise ConfigError(f"data_loader.type: {spec['type']} has no `training` argument, so it has no test split")
    args = {**_loader_args(cls, spec["args"], device), "training": False, "shuffle": False, "validation_split": 0.0}
    loader = _construct("data_loader.args", cls, **{k: v for k, v in args.items() if k in accepted})
    loader.configure(config["seed"], rank, world_size)
    loader.sampler.pad = False  # evaluation counts every sample exactly once
    return loader


def build_optimizer(config: dict, model):
    spec = config["optimizer"]
    return _construct("optimizer.args", candidates("optimizer")[spec["type"]], model.parameters(), **spec["args"])


def build_lr_scheduler(spec: dict | None, optimizer):
    if not spec:
        return None
    cls = candidates("lr_scheduler")[spec["type"]]
    args = dict(spec["args"])
    if spec["type"] in NESTED_SCHEDULERS:
        args["schedulers"] = [build_lr_scheduler(inner, optimizer) for inner in args["schedulers"]]
    return _construct("lr_scheduler.args", cls, optimizer, **args)


def build_loss(config: dict) -> Callable:
    spec = config["loss"]
    if isinstance(spec, str):
        return candidates("loss")[spec]
    fn = candidates("loss")[spec["type"]]
    return partial(fn, **spec["args"]) if spec["args"] else fn


def build_metrics(config: dict) -> list[tuple[str, Any]]:
    """(name, metric) pairs: a function (arguments bound), or a torchmetrics object (its own state)."""
    import inspect

    from config.schema import metric_spec

    metrics = []
    for i, item in enumerate(config["metrics"]):
        spec = metric_spec(item)
        target, _ = resolve("metrics", spec["type"], f"metrics[{i}]")
        if inspect.isclass(target):
            metric = _construct(f"metrics[{i}].args", target, **spec["args"])
        else:
            metric = partial(target, **spec["args"]) if spec["args"] else target
        metrics.append((spec["name"], metric))
    return metrics


def trainer_class(config: dict):
    return candidates("trainer")[config["trainer"]["type"]]
