"""Epoch-level metrics: the loss and each metric of one split, accumulated over an epoch.

Two kinds of metric, used alike:
- a function `(output, target) -> value` (model/metric.py): its epoch value is the mean of the
  per-batch values weighted by the number of samples; it may return a float or a 0-d tensor;
- a `torchmetrics.Metric` (update/compute/reset): its epoch value is computed over every sample of
  the epoch, so F1, AUROC and R2 are the whole split's, not a mean of per-batch values.

Sums stay on the device (no host sync per batch). `compute` reduces over DDP processes: function
means in one all-reduce of device tensors, torchmetrics objects through their own synchronisation.
`state`/`load_states` put a half-done epoch into a mid-epoch checkpoint, so a resume continues it.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch

from config.schema import snake_case
from runtime.distributed import all_reduce


def metric_name(metric: Any) -> str:
    """`accuracy` for a function, `multiclass_f1_score` for a MulticlassF1Score object."""
    if isinstance(metric, functools.partial):
        metric = metric.func
    if hasattr(metric, "__name__"):
        return metric.__name__
    return snake_case(type(metric).__name__)


def is_stateful(metric: Any) -> bool:
    return all(callable(getattr(metric, attr, None)) for attr in ("update", "compute", "reset"))


class Mean:
    """A per-sample-weighted mean of per-batch values, kept on the device."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, value, n: int) -> None:
        if isinstance(value, torch.Tensor):
            self.total.add_(value.detach().reshape(()), alpha=n)
        else:
            self.total.add_(float(value) * n)
        self.count += n

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


class EpochMetrics:
    """The loss and the metrics of one split. `metrics`: functions, torchmetrics objects (copied, so
    each split has its own state), or (name, either) pairs."""

    def __init__(self, metrics: list, device: torch.device):
        self.device = device
        self.loss = Mean(device)
        self.functions: list[tuple[str, Callable, Mean]] = []
        self.objects: list[tuple[str, Any]] = []
        self.order: list[str] = []
        for item in metrics:
            name, metric = item if isinstance(item, tuple) else (metric_name(item), item)
            if is_stateful(metric):
                metric = copy.deepcopy(metric)
                self.objects.append((name, metric.to(device) if hasattr(metric, "to") else metric))
            else:
                self.functions.append((name, metric, Mean(device)))
            self.order.append(name)
        self.enabled = bool(self.order)

    def update(self, output, target, n: int) -> None:
        """Add one batch of `n` samples (`output`, `target` as the step returned them)."""
        if isinstance(output, torch.Tensor):
            output = output.detach()
        for name, fn, mean in self.functions:
            value = fn(output, target)
            try:
                mean.add(value, n)
            except (RuntimeError, TypeError, ValueError):
                shape = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:60]
                raise ValueError(f"metric {name!r} returned {shape}; a function metric returns one number per batch "
                                 f"(the batch mean)") from None
        for _, metric in self.objects:
            metric.update(output, target)

    def reset(self) -> None:
        self.loss.reset()
        for _, _, mean in self.functions:
            mean.reset()
        for _, metric in self.objects:
            metric.reset()

    def running_means(self) -> dict[str, float]:
        """This process's loss and function metrics so far (the progress bar: no sync, no torchmetrics
        compute, which may be costly and, under DDP, a collective)."""
        means = [("loss", self.loss)] + [(name, mean) for name, _, mean in self.functions]
        values = torch.stack([mean.total for _, mean in means]).tolist()
        return {name: value / max(mean.count, 1) for (name, mean), value in zip(means, values)}

    def compute(self, distributed: bool = False) -> dict[str, float]:
        """{"loss": ..., name: ...} over the epoch and, when `distributed`, over all processes."""
        sums = torch.stack([self.loss.total] + [mean.total for _, _, mean in self.functions])
        counts = torch.tensor([self.loss.count] + [mean.count for _, _, mean in self.functions],
                              dtype=torch.float64, device=self.device)
        if distributed:
            sums, counts = all_reduce(torch.cat([sums, counts])).split(len(counts))
        values = (sums / counts.clamp_min(1.0)).tolist()
        result = dict(zip(["loss"] + [name for name, _, _ in self.functions], values))
        for name, metric in self.objects:
            # torchmetrics gathers the states of every process itself (when a process group exists).
            metric._to_sync = metric.sync_on_compute = distributed
            result[name] = _as_float(metric.compute(), name)
        return {name: result[name] for name in ["loss"] + self.order}

    def state(self) -> dict:
        """Plain data (tensors, numbers, lists) for a checkpoint."""
        return {
            "loss": {"total": self.loss.total.clone(), "count": self.loss.count},
            "functions": {name: {"total": mean.total.clone(), "count": mean.count} for name, _, mean in self.functions},
            "objects": {name: {"state": {k: (list(v) if isinstance(v, list) else v.clone())
                                         for k, v in metric.metric_state.items()},
                               "updates": int(getattr(metric, "_update_count", 0))}
                        for name, metric in self.objects},
        }

    def load_states(self, states: list[dict]) -> None:
        """Continue from the state of one process, or from several merged (a resume with another number
        of processes: their sums add up, torchmetrics merges its states)."""
        self.reset()
        for state in states:
            self.loss.total.add_(state["loss"]["total"].to(self.device))
            self.loss.count += state["loss"]["count"]
            for name, _, mean in self.functions:
                saved = state["functions"].get(name)
                if saved is not None:
                    mean.total.add_(saved["total"].to(self.device))
                    mean.count += saved["count"]
            for name, metric in self.objects:
                saved = state["objects"].get(name)
                if saved is None:
                    continue
                values = {k: ([t.to(self.device) for t in v] if isinstance(v, list) else v.to(self.device))
                          for k, v in saved["state"].items()}
                if len(states) == 1:
                    for key, value in values.items():
                        setattr(metric, key, value)
                    metric._update_count = saved["updates"]
                    metric._computed = None
                else:
                    metric.merge_state(values)


def _as_float(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} computed a tensor of shape {tuple(value.shape)}; a logged metric "
                             f"must be one number (for per-class values set its `average` argument)")
        return value.item()
    return float(value)
