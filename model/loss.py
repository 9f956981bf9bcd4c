"""Losses: functions (output, target, **kwargs) -> scalar tensor. `loss: name` or {type, args}."""
import torch
import torch.nn.functional as F


def nll_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For models that output log-probabilities (log_softmax)."""
    return F.nll_loss(output, target)


def cross_entropy(output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """For models that output logits."""
    return F.cross_entropy(output, target, label_smoothing=label_smoothing)


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, for regression. Output and target must have the same shape: F.mse_loss
    would broadcast (N, 1) against (N,) into (N, N) with only a warning."""
    if output.shape != target.shape:
        raise ValueError(f"mse_loss: output shape {tuple(output.shape)} differs from target shape "
                         f"{tuple(target.shape)}")
    return F.mse_loss(output, target)
