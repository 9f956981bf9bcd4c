"""Batches of any structure: tensors nested in tuples, lists, dicts, named tuples and dataclasses.

`to_device` moves every tensor and leaves everything else (strings, ids, numbers) as it is, keeping
the container types, so a step receives on the device exactly what its Dataset and collate built.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`batch` with `fn` applied to every tensor in it, containers rebuilt with their own types."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (list, tuple)):
        items = [map_tensors(item, fn) for item in batch]
        if hasattr(batch, "_fields"):  # a named tuple
            return type(batch)(*items)
        return _rebuild(type(batch), items, list if isinstance(batch, list) else tuple)
    if isinstance(batch, dict):
        return _rebuild(type(batch), {key: map_tensors(value, fn) for key, value in batch.items()}, dict)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: map_tensors(getattr(batch, f.name), fn)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def _rebuild(cls: type, items, fallback: type):
    try:
        return fallback(items) if cls is fallback else cls(items)
    except TypeError:  # a subclass with another constructor (defaultdict): the plain container
        return fallback(items)


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Every tensor of `batch` on `device` (non_blocking: asynchronous from pinned memory)."""
    # The common (input, target) pair of tensors without the general walk: it runs every step. (A
    # dataset's pre-stacked tuple subclass arrives as a plain tuple; a named tuple keeps its type.)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and type(batch[0]) is torch.Tensor \
            and type(batch[1]) is torch.Tensor and not hasattr(batch, "_fields"):
        pair = (batch[0].to(device, non_blocking=non_blocking), batch[1].to(device, non_blocking=non_blocking))
        return list(pair) if isinstance(batch, list) else pair
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))


def tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors of `batch`, in order (dicts by insertion order, dataclasses by field order)."""
    found: list[torch.Tensor] = []
    map_tensors(batch, found.append)
    return found


def first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if type(batch) in (tuple, list) and batch and type(batch[0]) is torch.Tensor:  # the common case, fast
        return batch[0]
    found = tensors(batch)
    return found[0] if found else None


def batch_size(batch: Any) -> int:
    """The first tensor's first dimension: the number of samples, unless the step says otherwise."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        raise ValueError("cannot tell the batch size: the batch holds no tensor with a batch dimension; "
                         "return \"batch_size\" from the trainer's step")
    return tensor.shape[0]


def head(batch: Any, n: int) -> Any:
    """The first `n` samples of every tensor with a batch dimension (for sample views and graphs)."""
    return map_tensors(batch, lambda t: t[:n] if t.dim() else t)


def describe(batch: Any) -> str:
    """A short structural description, e.g. "dict(image: (4, 1, 32, 32) float32, mask: (4, 32, 32) int64)"."""
    if isinstance(batch, torch.Tensor):
        return f"{tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, dict):
        return "dict(" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + ")"
    if isinstance(batch, (list, tuple)):
        parts = [describe(v) for v in batch]
        if len(parts) > 4 and len(set(parts)) == 1:  # 32 strings of a batch: say so once
            return f"{type(batch).__name__}({len(parts)} x {parts[0]})"
        return f"{type(batch).__name__}(" + ", ".join(parts) + ")"
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return f"{type(batch).__name__}(" + ", ".join(f"{f.name}: {describe(getattr(batch, f.name))}"
                                                      for f in dataclasses.fields(batch)) + ")"
    return type(batch).__name__
