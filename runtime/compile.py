"""`trainer.compile`: torch.compile with the config's mode and dynamic-shape choice."""
from __future__ import annotations

import torch
import torch.nn as nn


def compile_model(model: nn.Module, spec: bool | dict) -> nn.Module:
    """torch.compile(model) for `trainer.compile: true` or `{mode, dynamic}`.

    With `dynamic: null` (the default) the first dimension of every tensor handed to the model is marked
    dynamic before each call, so the graph compiled on the first batch also serves the epoch's short last
    batch and validation's: torch's own default compiles for the first size and again, dynamic, at the
    first other size. `dynamic: true` makes every dimension dynamic, `false` none (one graph per size).
    """
    options = spec if isinstance(spec, dict) else {}
    dynamic = options.get("dynamic")
    compiled = torch.compile(model, mode=options.get("mode", "default"), dynamic=dynamic)
    if dynamic is None:
        compiled.register_forward_pre_hook(_dynamic_batch_dimension, with_kwargs=True)
    return compiled


def _dynamic_batch_dimension(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # maybe_mark_dynamic, not mark_dynamic: a model that needs the size fixed (a view to (64, -1), a batch
    # of 1) gets it specialised instead of an error.
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim():
            torch._dynamo.maybe_mark_dynamic(value, 0)
