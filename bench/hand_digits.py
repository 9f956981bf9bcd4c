"""configs/digits.yaml written by hand, pytorch/examples-style (mnist/main.py): the same model (DigitsCNN's
layers), data (scikit-learn's digits, the same 360 test images held out, 15% for validation), optimizer,
schedule and seed, with nothing but torch and scikit-learn. bench/first_step.py times it to its first
optimizer step against train.py.

    python bench/hand_digits.py [--epochs 20]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, channels: int = 32, dropout: float = 0.25):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(4.88))
        self.register_buffer("pixel_std", torch.tensor(6.02))
        axis = torch.linspace(-1.0, 1.0, 8)
        self.register_buffer("coords", torch.stack(torch.meshgrid(axis, axis, indexing="ij")).unsqueeze(0),
                             persistent=False)
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels * 16, 128), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        x = (x - self.pixel_mean) / self.pixel_std
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        return F.log_softmax(self.classifier(self.features(x)), dim=1)


def train(model, device, train_loader, optimizer, epoch, log_interval=10):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)}]\tLoss: {loss.item():.6f}")


def test(model, device, test_loader):
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += (output.argmax(dim=1) == target).sum().item()
    n = len(test_loader.dataset)
    print(f"Validation: average loss {test_loss / n:.4f}, accuracy {correct}/{n} ({100.0 * correct / n:.0f}%)")


def main():
    parser = argparse.ArgumentParser(description="digits, by hand")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(20261125))[360:]  # test held out
    n_valid = round(len(order) * 0.15)
    valid, training = order[:n_valid], order[n_valid:]
    train_loader = DataLoader(TensorDataset(images[training], targets[training]), batch_size=64, shuffle=True)
    valid_loader = DataLoader(TensorDataset(images[valid], targets[valid]), batch_size=64)

    model = Net().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=0)
    scheduler = StepLR(optimizer, step_size=10, gamma=0.5)
    for epoch in range(1, args.epochs + 1):
        train(model, device, train_loader, optimizer, epoch)
        test(model, device, valid_loader)
        scheduler.step()


if __name__ == "__main__":
    main()
