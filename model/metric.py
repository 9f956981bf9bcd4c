"""Metrics: functions (output, target) -> 0-d tensor, the mean over the batch.

They return tensors, not floats, so the trainer can sum them on the device (weighted by batch
size) and synchronise with the host once per epoch instead of once per step.
"""
import torch


@torch.no_grad()
def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.argmax(dim=1) == target).float().mean()


@torch.no_grad()
def top_k_acc(output: torch.Tensor, target: torch.Tensor, k: int = 3) -> torch.Tensor:
    k = min(k, output.shape[1])
    top = output.topk(k, dim=1).indices  # (B, k)
    return (top == target.unsqueeze(1)).any(dim=1).float().mean()
