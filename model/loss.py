"""Losses: functions (output, target, **kwargs) -> scalar tensor. `loss: name` or {type, args}."""
import torch
import torch.nn.functional as F


def nll_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For models that output log-probabilities (log_softmax)."""
    return F.nll_loss(output, target)


def cross_entropy(output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """For models that output logits."""
    return F.cross_entropy(output, target, label_smoothing=label_smoothing)
