"""Trainers for tasks whose batches are not (input, target) pairs: each overrides only `step`.

`step` receives the batch as the DataLoader yields it, already on the device, and runs in training
and in evaluation alike; see Trainer.step for what its returned dict holds.
"""
from __future__ import annotations

import torch

from trainer.trainer import Trainer


class SegmentationTrainer(Trainer):
    """Batches {"image": (B, C, H, W), "mask": (B, H, W) long}; the model gives (B, K, H, W) logits."""

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        output = self.model(batch["image"])
        # cross_entropy takes (B, K, H, W) logits against (B, H, W) classes directly.
        return {"loss": self.criterion(output, batch["mask"]), "output": output, "target": batch["mask"],
                "input": batch["image"]}


class SequenceTrainer(Trainer):
    """Batches {"tokens": (B, L), "attention_mask": (B, L), "label": (B,)} from data_loader.collate.pad_tokens;
    the model takes two inputs."""

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        output = self.model(batch["tokens"], batch["attention_mask"])
        return {"loss": self.criterion(output, batch["label"]), "output": output, "target": batch["label"]}
