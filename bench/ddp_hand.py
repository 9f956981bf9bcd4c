"""A hand-written DDP loop (gloo, DistributedSampler) on the digits data with DigitsCNN, for
bench/scaling.py. Run under torchrun; rank 0 prints `samples/s: <median over epochs 2..N>`."""
from __future__ import annotations

import statistics
import sys
import time

from common import ROOT  # noqa: F401  (puts the project on sys.path)

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from data_loader.datasets import DigitsDataset
from model.model import DigitsCNN


def main() -> None:
    epochs, batch_size = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    dataset = DigitsDataset(train=True)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    model = torch.nn.parallel.DistributedDataParallel(DigitsCNN())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    rates = []
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        start, samples = time.perf_counter(), 0
        for data, target in loader:
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
            samples += target.shape[0]
        rates.append(samples * dist.get_world_size() / (time.perf_counter() - start))
    if dist.get_rank() == 0:
        print(f"samples/s: {statistics.median(rates[1:]):.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
