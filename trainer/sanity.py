"""The sanity pass: before anything is written, the first training batch and the first validation batch
go through the dataset, the collate function, the trainer's own `step` (model forward, loss) and every
metric, forward only, on the real model and data. A shape, dtype or range mistake in user code then
stops the run with one line naming the piece and the user's file:line, and nothing is written.

It leaves no trace: evaluation mode (BatchNorm statistics untouched) under torch.no_grad(), every random
stream restored, and the data order untouched (batches are read through the loader's own batch sampler
in this process, not by an iterator that would draw a seed; no workers are started).
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import warnings
from typing import Any, Callable

import numpy as np
import torch

from errors import ConfigError, UserError
from runtime.batch import describe, to_device
from runtime.blame import describe_error, is_ours, locate, shown


DONE = "(checked before training; nothing was written)"


class SanityError(ConfigError):
    """A piece of the user's code fails on the first batch (exit 2, before any side effect)."""


def sanity_pass(trainer, splits: list[tuple[str, Any]] | None = None) -> None:
    """Run the first batch of each split through `trainer` (built, not yet training): by default the
    training and validation splits; test.py passes [("test", its loader)]."""
    from checkpoint import unwrap_model

    if splits is None:
        splits = [("training", trainer.data_loader, trainer.train_metrics),
                  ("validation", trainer.valid_data_loader, trainer.valid_metrics)]
    else:
        splits = [(name, loader, trainer.valid_metrics) for name, loader in splits]

    model = unwrap_model(trainer.model)
    modes = {module: module.training for module in model.modules()}
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        _checked(trainer, model, devices, splits)
    finally:
        for module, training in modes.items():
            module.training = training
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        trainer._step_checked = False  # the real first batch checks that the loss requires grad


def _checked(trainer, model, devices, splits) -> None:
    try:
        # Torch's warnings (a broadcasting loss) are reported here as errors, or shown by the first real step.
        with torch.random.fork_rng(devices=devices), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.eval()
            for split, loader, metrics in splits:
                if loader is not None:
                    _check_split(trainer, split, loader, metrics)
    except UserError as exc:
        if isinstance(exc, ConfigError) and str(exc).endswith(DONE):
            raise
        raise SanityError(f"{' '.join(str(exc).split())} {DONE}") from None


def _check_split(trainer, split: str, loader, metrics) -> None:
    batch = _first_batch(loader, split)
    if batch is None:
        return  # an empty split: run.py refuses a training split without batches, before this
    where = f"the first {split} batch ({describe(batch)})"
    batch = _attempt(f"{where}: moving it to {trainer.device}", lambda: to_device(batch, trainer.device))
    pieces = _StepPieces(trainer)
    with pieces:
        out = _attempt(where, lambda: trainer.step(batch), pieces)
    trainer._check_step_output(out, batch, training=False)
    if pieces.broadcast:
        raise SanityError(f"{where}: the loss {pieces.broadcast}")
    if not metrics.enabled:
        return
    output, target = out.get("output"), out.get("target")
    for name, fn, _ in metrics.functions:
        with _BroadcastWatch(output, target) as watch:
            value = _attempt(f"{where}: metric {name!r}", lambda: fn(output, target))
        if watch.found:
            raise SanityError(f"{where}: metric {name!r} {watch.found}")
        if isinstance(value, torch.Tensor) and value.numel() == 1 or type(value) in (int, float):
            continue
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:40]
        raise SanityError(f"{where}: metric {name!r} returned {got}; a function metric returns one number per "
                          f"batch (e.g. the batch mean)")
    for name, metric in metrics.objects:
        def run(metric=metric):  # a copy: the metric's own state stays empty
            import copy

            probe = copy.deepcopy(metric)
            probe.sync_on_compute = False  # every rank runs this alone: no collective
            probe.update(output.detach() if isinstance(output, torch.Tensor) else output, target)
            return probe.compute()
        _attempt(f"{where}: metric {name!r}", run)


class _BroadcastWatch(torch.overrides.TorchFunctionMode):
    """Sees every torch operation while a loss or metric runs: one that takes the output and the target,
    shaped as the step returned them, and broadcasts them to more elements than either has (a (B, 1)
    output against a (B,) target compares every output with every target) is the mistake to report.
    Operations on reshaped copies (output.squeeze(1)) or on other tensors (pairwise distances) are not."""

    def __init__(self, output, target):
        super().__init__()
        both = isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)
        self.shapes = (tuple(output.shape), tuple(target.shape)) if both and output.shape != target.shape else None
        self.found: str | None = None

    def __enter__(self):
        return super().__enter__() if self.shapes else self

    def __exit__(self, *exc):
        return super().__exit__(*exc) if self.shapes else False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None:
            found = [tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)][:2]
            if len(found) == 2 and set(found) == set(self.shapes):
                self._check()
        return func(*args, **kwargs)

    def _check(self) -> None:
        output, target = self.shapes
        try:
            shape = tuple(torch.broadcast_shapes(output, target))
        except RuntimeError:
            return  # e.g. class scores (B, C) against class indices (B,): not elementwise
        if math.prod(shape) <= max(math.prod(output), math.prod(target)):
            return
        frame = sys._getframe(2)
        while frame is not None and not is_ours(frame.f_code.co_filename):
            frame = frame.f_back
        at = f" at {shown(frame.f_code.co_filename)}:{frame.f_lineno}" if frame is not None else ""
        fix = next((f"{name}.squeeze({len(a) - 1})" for name, a, b in (("output", output, target),
                                                                        ("target", target, output))
                    if len(a) == len(b) + 1 and a[-1] == 1 and a[:-1] == b), None)
        self.found = (f"got output and target of shapes {output} and {target}, which broadcast{at} to {shape}: "
                      f"every output is compared with every target; make the shapes equal"
                      + (f" (e.g. {fix} in the model or the step)" if fix else ""))


def _first_batch(loader, split: str):
    """The loader's first batch, item by item and then collated, so a failure names the piece."""
    dataset, batches = loader.dataset, getattr(loader, "batch_sampler", None)
    if batches is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return _attempt(f"the first {split} batch: loading it", lambda: next(iter(loader), None))
    indices = next(iter(batches), None)
    if indices is None:
        return None
    owner = dataset
    while hasattr(owner, "dataset") and isinstance(owner, torch.utils.data.Dataset):  # Subset, BatchFetching
        owner = owner.dataset  # name the user's class
    if hasattr(owner, "get_batch"):  # fetched a batch at a time, as the DataLoader does
        items = _attempt(f"the first {split} batch: dataset items ({type(owner).__name__}.get_batch)",
                         lambda: dataset.__getitems__(list(indices)))
    else:
        items = [_attempt(f"the first {split} batch: dataset item {i} ({type(owner).__name__}.__getitem__)",
                          lambda i=i: dataset[i]) for i in indices]
    collate = getattr(loader.collate_fn, "__name__", type(loader.collate_fn).__name__)
    return _attempt(f"the first {split} batch: collate ({collate})", lambda: loader.collate_fn(items))


class _StepPieces(contextlib.AbstractContextManager):
    """While the step runs: is the model's forward running, is the loss, and did the loss get shapes
    that broadcast (a (B, 1) output against a (B,) target is a (B, B) comparison, and only a warning)?"""

    def __init__(self, trainer):
        from checkpoint import unwrap_model

        self.trainer, self.model = trainer, unwrap_model(trainer.model)
        self.current: str | None = None
        self.broadcast: str | None = None

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(lambda *_: self._enter("model forward")),
                        self.model.register_forward_hook(lambda *_: self._leave("model forward"))]
        self.criterion = self.trainer.criterion
        if callable(self.criterion):
            self.trainer.criterion = self._loss
        return self

    def _enter(self, piece: str) -> None:
        self.current = self.current or piece

    def _leave(self, piece: str) -> None:
        if self.current == piece:
            self.current = None

    def _loss(self, *args, **kwargs):
        self._enter("loss")
        with _BroadcastWatch(*(list(args[:2]) + [None, None])[:2]) as watch:
            value = self.criterion(*args, **kwargs)
        self.broadcast = self.broadcast or watch.found
        self._leave("loss")
        return value

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.trainer.criterion = self.criterion
        return False


def _attempt(where: str, action: Callable[[], Any], pieces: _StepPieces | None = None) -> Any:
    try:
        return action()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any error in user code is reported as one line
        located = locate(exc)
        piece = pieces.current if pieces is not None and pieces.current else None
        if piece is None and pieces is not None:
            piece = located[0] if located else "step"
        at = f" at {located[1]}" if located else ""
        what = f"{where}: {piece}" if piece else where
        raise SanityError(f"{what} failed{at}: {describe_error(exc)}{_hint(exc)} {DONE}") from None


def _hint(exc: Exception) -> str:
    """What to look at, for the mistakes new users make most."""
    text = str(exc)
    if "out of bounds" in text and "Target" in text:
        return "; the model has fewer outputs than the data has classes: check arch.args (e.g. num_classes)"
    if "stack expects each tensor to be equal size" in text:
        return ("; the items differ in size: give the data loader a collate_fn that pads them (e.g. "
                "data_loader/collate.py pad_tokens)")
    if "shapes cannot be multiplied" in text:
        return "; a layer's input size does not fit the data: check the model against the input shape"
    return ""
