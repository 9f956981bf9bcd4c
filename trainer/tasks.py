"""Trainers for tasks whose batches are not (input, target) pairs: each overrides `step`, and
`predict_step` for inputs without labels.

`step` receives the batch as the DataLoader yields it, already on the device, and runs in training
and in evaluation alike; see Trainer.step for what its returned dict holds. `predict_step` gets a
batch of the same kind, without its labels (or with them, ignored), and returns the model's output:
predict.py and export.py call it.
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

    def predict_step(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """{"image": (B, C, H, W)} (a "mask" is ignored), or the (B, C, H, W) images alone -> logits."""
        return self.model(batch["image"] if isinstance(batch, dict) else batch)


class SequenceTrainer(Trainer):
    """Batches {"tokens": (B, L), "attention_mask": (B, L), "label": (B,)} from data_loader.collate.pad_tokens;
    the model takes two inputs."""

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        output = self.model(batch["tokens"], batch["attention_mask"])
        return {"loss": self.criterion(output, batch["label"]), "output": output, "target": batch["label"]}

    def predict_step(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """{"tokens", "attention_mask"} (a "label" is ignored), or a (B, L) tensor of tokens padded with 0
        (pad_tokens' padding token), whose mask is then where the tokens are not 0 -> logits."""
        if isinstance(batch, dict):
            return self.model(batch["tokens"], batch["attention_mask"])
        return self.model(batch, batch != 0)
