"""A hand-written DDP loop (gloo, DistributedSampler) for bench/scaling.py, on the same model, data and
optimizer as the scaffold's config: `mnist` (MnistModel, torchvision MNIST files under DATA_DIR, Adam
with amsgrad, as configs/mnist.yaml) or `digits` (DigitsCNN, Adam, as configs/digits.yaml). Run under
torchrun; rank 0 prints `samples/s: <median over epochs 2..N>`.

    torchrun --standalone --nproc_per_node=2 bench/ddp_hand.py WORKLOAD EPOCHS BATCH_SIZE [DATA_DIR]
"""
from __future__ import annotations

import statistics
import sys
import time

from common import ROOT  # noqa: F401  (puts the project on sys.path)

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler


def workload(name: str, data_dir: str | None):
    if name == "mnist":
        from torchvision import datasets, transforms

        from model.model import MnistModel

        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        dataset = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
        model = MnistModel()
        return dataset, model, torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    from data_loader.datasets import DigitsDataset
    from model.model import DigitsCNN

    model = DigitsCNN()
    return DigitsDataset(train=True), model, torch.optim.Adam(model.parameters(), lr=2e-3)


def main() -> None:
    name, epochs, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    dataset, model, optimizer = workload(name, sys.argv[4] if len(sys.argv) > 4 else None)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    model = torch.nn.parallel.DistributedDataParallel(model)
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
    # Leave together, as train.py does: a rank that tore its group down while the other was still in its last
    # all-reduce aborted now and then ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
