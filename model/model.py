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
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)  # (B, 3, 8, 8)
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
