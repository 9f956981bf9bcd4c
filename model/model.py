"""Models. Any non-abstract nn.Module subclass defined in a module of this package can be named in
`arch.type`; so can every `torchvision.models` classification architecture (built with weights=None).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from base import BaseModel


class DigitsCNN(BaseModel):
    """A small CNN for scikit-learn's 8x8 digits (pixel values 0..16).

    It shows the three kinds of state a module holds besides parameters:
    - `pixel_mean`/`pixel_std`: persistent buffers (input normalisation), saved in checkpoints;
    - `coords`: a non-persistent buffer (two coordinate channels, CoordConv-style) rebuilt from the
      input size at construction, so it moves with `.to(device)` but is not saved;
    - BatchNorm running statistics: persistent buffers managed by torch.
    """

    def __init__(self, num_classes: int = 10, channels: int = 32, dropout: float = 0.25,
                 image_size: int = 8, pixel_mean: float = 4.88, pixel_std: float = 6.02):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(float(pixel_mean)))
        self.register_buffer("pixel_std", torch.tensor(float(pixel_std)))
        axis = torch.linspace(-1.0, 1.0, image_size)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))  # (2, H, W)
        self.register_buffer("coords", grid.unsqueeze(0), persistent=False)
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(2 * channels * (image_size // 2) ** 2, 128), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8)
        x = (x - self.pixel_mean) / self.pixel_std
        # In x's dtype: under FSDP's bfloat16 the input is cast and the buffer is not; float32 coordinates would
        # bring the concatenation back to float32, which the bfloat16 Conv2d refuses.
        x = torch.cat([x, self.coords.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)  # (B, 3, 8, 8)
        return F.log_softmax(self.classifier(self.features(x)), dim=1)


class MnistModel(BaseModel):
    """The classic MNIST CNN of pytorch/examples and pytorch-template (log-probabilities out)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(1)  # (B, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


class MLP(BaseModel):
    """A plain multilayer perceptron over flattened inputs (logits out)."""

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10, depth: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convolutions that keep the spatial size (a function, not a class: every nn.Module class
    in model/ can be named in `arch.type`, and a block alone is no model)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(),
    )


class UNet(BaseModel):
    """A small U-Net for semantic segmentation: two downsamplings, two upsamplings, skip connections.

    (B, in_channels, H, W) -> per-pixel logits (B, num_classes, H, W); H and W divisible by 4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, channels: int = 8):
        super().__init__()
        c = channels
        self.down1 = _conv_block(in_channels, c)
        self.down2 = _conv_block(c, 2 * c)
        self.bottom = _conv_block(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = _conv_block(4 * c, 2 * c)  # upsampled + skip from down2
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = _conv_block(2 * c, c)  # upsampled + skip from down1
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        skip1 = self.down1(x)                          # (B, c, H, W)
        skip2 = self.down2(F.max_pool2d(skip1, 2))     # (B, 2c, H/2, W/2)
        x = self.bottom(F.max_pool2d(skip2, 2))        # (B, 4c, H/4, W/4)
        x = self.dec2(torch.cat([self.up2(x), skip2], dim=1))  # (B, 2c, H/2, W/2)
        x = self.dec1(torch.cat([self.up1(x), skip1], dim=1))  # (B, c, H, W)
        return self.head(x)


class SequenceClassifier(BaseModel):
    """Token embeddings, averaged over the real (unpadded) positions, then an MLP: logits out.

    A model with two inputs: forward(tokens (B, L) long, attention_mask (B, L) bool, True at real tokens).
    """

    def __init__(self, vocab_size: int = 12, num_classes: int = 4, embedding_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size + 1, embedding_dim, padding_idx=0)  # token 0 is padding
        self.classifier = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.unsqueeze(-1).to(self.embedding.weight.dtype)  # (B, L, 1)
        summed = (self.embedding(tokens) * weights).sum(dim=1)               # (B, D)
        pooled = summed / weights.sum(dim=1).clamp(min=1.0)                   # mean over real tokens
        return self.classifier(pooled)
