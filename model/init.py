"""Weight initialisation through `model.apply` (config: `arch.init: {type, args}`).

Conv and Linear weights get the scheme; their biases are zeroed; normalisation layers get weight 1
and bias 0. It runs before the optimizer is built, under the run's seed, so it is deterministic.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

SCHEMES = {
    "kaiming_normal": nn.init.kaiming_normal_,
    "kaiming_uniform": nn.init.kaiming_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "normal": nn.init.normal_,
    "trunc_normal": nn.init.trunc_normal_,
    "orthogonal": nn.init.orthogonal_,
    "zeros": nn.init.zeros_,
}

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _init_module(module: nn.Module, fill) -> None:
    if isinstance(module, _WEIGHTED):
        fill(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, _NORMS):
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def init_weights(model: nn.Module, scheme: str, **kwargs) -> nn.Module:
    model.apply(partial(_init_module, fill=partial(SCHEMES[scheme], **kwargs)))
    return model
