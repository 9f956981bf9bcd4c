"""Collate functions: turn a list of samples into a batch where default_collate cannot."""
from __future__ import annotations

import torch


def pad_tokens(samples: list[dict[str, torch.Tensor]], padding_token: int = 0) -> dict[str, torch.Tensor]:
    """Pads sequences of different lengths to the batch's longest.

    Takes samples {"tokens": (L_i,) long, "label": () long}; returns {"tokens": (B, L) long,
    "attention_mask": (B, L) bool, True at real tokens, "label": (B,) long}.
    """
    lengths = torch.tensor([len(sample["tokens"]) for sample in samples])
    tokens = torch.nn.utils.rnn.pad_sequence([sample["tokens"] for sample in samples], batch_first=True,
                                             padding_value=padding_token)
    attention_mask = torch.arange(tokens.shape[1]) < lengths.unsqueeze(1)
    return {"tokens": tokens, "attention_mask": attention_mask,
            "label": torch.stack([sample["label"] for sample in samples])}
