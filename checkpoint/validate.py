"""What a loaded checkpoint must hold before it is used: checked in one place, so that a file from
another tool, or one edited by hand, is refused in one line naming the file and the key (exit 2),
never a traceback halfway through a resume."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from errors import CheckpointError

MT_WORDS = 624  # Mersenne Twister state: 624 32-bit words and a position


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _tensor(value: Any, dtype: torch.dtype, numel: int | None = None) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype == dtype and value.dim() == 1
            and (numel is None or value.numel() == numel))


def _words(value: Any, count: int) -> bool:
    """`count` unsigned 32-bit words: an int64 tensor (how capture_rng stores them) or a tuple of ints."""
    if isinstance(value, (tuple, list)) and len(value) == count and all(type(w) is int for w in value):
        value = torch.tensor(value, dtype=torch.int64)
    return _tensor(value, torch.int64, count) and bool(((value >= 0) & (value < 2**32)).all())


def _state_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _dict(value: Any) -> bool:
    return isinstance(value, dict)


COUNT = "an int >= 0"
# What BaseTrainer.resume reads, and what it must be.
RESUME_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "state_dict": (_state_dict, "a dict of tensors"),
    "config": (_dict, "a dict"),
    "optimizer": (_dict, "an optimizer's state_dict"),
    "lr_scheduler": (_optional(_dict), "a scheduler's state_dict or null"),
    "scaler": (_optional(_dict), "a GradScaler's state_dict or null"),
    "epoch": (_count, COUNT),
    "epoch_finished": (lambda v: type(v) is bool, "true or false"),
    "batch_in_epoch": (_count, COUNT),
    "samples_in_epoch": (_count, COUNT),
    "global_step": (_count, COUNT),
    "monitor_best": (_number, "a number"),
    "not_improved_count": (_count, COUNT),
    "best_epoch": (_count, COUNT),
    "ranks": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list (one entry per process)"),
}

RNG_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "python": (lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and type(v[0]) is int
               and _words(v[1], MT_WORDS + 1) and int(v[1][-1]) <= MT_WORDS and _optional(_number)(v[2]),
               "(version, 625 words as an int64 tensor, gauss)"),  # the last word is the position
    "numpy": (lambda v: isinstance(v, dict) and v.get("key") == "MT19937" and _words(v.get("state"), MT_WORDS)
              and _count(v.get("pos")) and v["pos"] <= MT_WORDS and v.get("has_gauss") in (0, 1)
              and type(v.get("cached_gaussian")) is float, "NumPy's MT19937 state (624 words as an int64 tensor)"),
    "torch": (lambda v: _tensor(v, torch.uint8, torch.get_rng_state().numel()),
              f"a uint8 tensor of {torch.get_rng_state().numel()} bytes"),
    "cuda": (lambda v: isinstance(v, list) and all(_tensor(t, torch.uint8) for t in v), "a list of uint8 tensors"),
}

RANK_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rng": (_dict, "a dict of RNG states"),
    "epoch_totals": (_optional(_dict), "a dict of running sums or null"),
}


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check(state: dict, spec: dict, path: Path, prefix: str = "") -> None:
    for key, (ok, expected) in spec.items():
        if key not in state:
            hint = "; pass a config with -c CONFIG" if prefix + key == "config" else ""
            raise CheckpointError(f"{path}: '{prefix}{key}' is missing (a checkpoint written by another tool?){hint}")
        if not ok(state[key]):
            raise CheckpointError(f"{path}: '{prefix}{key}' is {_describe(state[key])}, expected {expected}")


def check_resume_state(state: dict, path: str | Path) -> None:
    """Everything a resume reads, in the types it needs (CheckpointError otherwise)."""
    path = Path(path)
    if isinstance(state.get("converted_from"), dict):  # checkpoint/convert.py: weights and config only
        raise CheckpointError(f"{path}: converted from a {state['converted_from'].get('tool')} checkpoint, it holds "
                              f"weights, not a run's state, and cannot be resumed; start a run from its weights: "
                              f"python train.py -c CONFIG arch.pretrained={path}")
    _check(state, RESUME_KEYS, path)
    for index, rank in enumerate(state["ranks"]):
        if not isinstance(rank, dict):
            raise CheckpointError(f"{path}: 'ranks.{index}' is {_describe(rank)}, expected a dict")
        _check(rank, RANK_KEYS, path, f"ranks.{index}.")
        _check(rank["rng"], RNG_KEYS, path, f"ranks.{index}.rng.")


def check_eval_state(state: dict, path: str | Path, need_config: bool) -> None:
    """What test.py reads: the weights, and the config unless one is given with -c."""
    _check(state, {key: RESUME_KEYS[key] for key in ("state_dict", "config") if key != "config" or need_config},
           Path(path))


def check_optimizer_fits(saved: dict, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """The saved optimizer state must fit the optimizer built for this model, as load_state_dict needs it:
    the same groups with the same number of parameters, each group with the optimizer's settings."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not (isinstance(state, dict) and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise CheckpointError(f"{path}: 'optimizer' is not an optimizer's state_dict (state, param_groups)")
    saved_sizes = [len(g["params"]) for g in groups]
    live_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != live_sizes:
        raise CheckpointError(f"{path}: 'optimizer.param_groups' hold {saved_sizes} parameters, the model's "
                              f"{type(optimizer).__name__} has {live_sizes}")
    # load_state_dict takes the saved groups as they are, then the optimizer's __setstate__ fills in the
    # settings that older torch versions did not save; a setting still missing fails at the first step.
    probe = object.__new__(type(optimizer))
    try:
        probe.__setstate__({"defaults": dict(optimizer.defaults), "state": {}, "param_groups": [dict(g) for g in groups]})
    except Exception as exc:  # noqa: BLE001 - whatever odd values make it raise, the file is at fault
        raise CheckpointError(f"{path}: 'optimizer.param_groups' do not load into {type(optimizer).__name__} "
                              f"({type(exc).__name__}: {exc})") from None
    for index, (group, live) in enumerate(zip(probe.param_groups, optimizer.param_groups)):
        missing = [key for key in live if key not in group]
        if missing:
            raise CheckpointError(f"{path}: 'optimizer.param_groups[{index}]' lacks {', '.join(map(repr, missing))} "
                                  f"(saved by another optimizer than {type(optimizer).__name__}?)")
    ids = [p for g in groups for p in g["params"]]
    if len(set(ids)) != len(ids) or not set(state) <= set(ids) or not all(isinstance(v, dict) for v in state.values()):
        raise CheckpointError(f"{path}: 'optimizer.state' does not match 'optimizer.param_groups' parameter ids")
    for index, (group, live) in enumerate(zip(groups, optimizer.param_groups)):
        for key, value in live.items():
            if key != "params" and key in group and not _same_kind(group[key], value):
                raise CheckpointError(f"{path}: 'optimizer.param_groups[{index}].{key}' is {group[key]!r}, "
                                      f"{type(optimizer).__name__} expects a value like {value!r}")


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) or isinstance(value, torch.Tensor) and value.numel() == 1


def _same_kind(saved: Any, live: Any) -> bool:
    """Could `saved` stand where the freshly built object holds `live`? A finite number for a number (a
    one-element tensor too: capturable lr), a sequence of the same length, the same kind otherwise."""
    if live is None or saved is None:
        return True  # optional settings (foreach, fused, ...) left to the optimizer
    if isinstance(live, bool) or isinstance(saved, bool):
        return isinstance(live, bool) and isinstance(saved, bool)
    if _is_number(live):
        return _is_number(saved) and bool(torch.isfinite(torch.as_tensor(saved, dtype=torch.float64)).all())
    if isinstance(live, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(live) and all(map(_same_kind, saved, live))
    if isinstance(live, dict):
        return isinstance(saved, dict)
    return type(saved) is type(live)


def check_scheduler_fits(saved: Any, scheduler, path: str | Path) -> None:
    """The saved LR scheduler state must belong to the scheduler the config builds: present when there is
    one, with each of its values of the kind the fresh scheduler holds."""
    if scheduler is None:
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: 'lr_scheduler' is {saved!r} but the config builds "
                              f"{type(scheduler).__name__}: its state would restart silently")
    for key, value in scheduler.state_dict().items():
        if key in saved and not _same_kind(saved[key], value):
            raise CheckpointError(f"{path}: 'lr_scheduler.{key}' is {saved[key]!r}, {type(scheduler).__name__} "
                                  f"expects a value like {value!r}")
