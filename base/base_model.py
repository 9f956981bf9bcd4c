from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch.nn as nn


class BaseModel(nn.Module, metaclass=ABCMeta):
    """A model of this project: implement `forward`; `summary()` is printed at the start of a run."""

    @abstractmethod
    def forward(self, *inputs):
        raise NotImplementedError

    def summary(self) -> str:
        return model_summary(self)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Element counts: trainable and frozen parameters, persistent and non-persistent buffers."""
    counts = {"trainable": 0, "frozen": 0, "buffers": 0, "non_persistent_buffers": 0}
    for param in model.parameters():
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is None:
                continue
            transient = name in module._non_persistent_buffers_set
            counts["non_persistent_buffers" if transient else "buffers"] += buffer.numel()
    return counts


def model_summary(model: nn.Module) -> str:
    """A table of the model's direct children and the totals, from named_modules/parameters/buffers."""
    rows = [("module", "type", "params", "buffers")]
    for name, child in model.named_children():
        params = sum(p.numel() for p in child.parameters())
        buffers = sum(b.numel() for b in child.buffers())
        rows.append((name, type(child).__name__, f"{params:,}", f"{buffers:,}"))
    own_buffers = [(n, b) for n, b in model.named_buffers(recurse=False)]
    for name, buffer in own_buffers:
        kind = "buffer" if name not in model._non_persistent_buffers_set else "buffer (not saved)"
        rows.append((name, kind, "0", f"{buffer.numel():,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{type(model).__name__}:"]
    lines += ["  " + "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                                enumerate(zip(row, widths))) for row in rows]
    counts = count_parameters(model)
    # Two lines: one would not fit an 80-column terminal.
    lines.append(f"  trainable parameters: {counts['trainable']:,}   frozen parameters: {counts['frozen']:,}   "
                 f"modules: {sum(1 for _ in model.named_modules())}")
    lines.append(f"  buffers: {counts['buffers']:,} saved + {counts['non_persistent_buffers']:,} not saved")
    return "\n".join(lines)
