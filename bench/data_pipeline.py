"""Input pipeline: the fraction of a training epoch spent waiting for data, for the digits config
(in memory), fetching one sample at a time (`__getitem__` + default_collate) against the whole batch
at once (`get_batch`, which DigitsDataset has and BaseDataLoader uses), and the cost per batch of
each against slicing a tensor by index. Target: waiting <= 5% of step time for in-memory datasets.

    python bench/data_pipeline.py
"""
from __future__ import annotations

import argparse
import statistics

from common import ROOT, temp_dir, timed

import torch

from config import load_config
from config.build import build_data_loaders
from data_loader.datasets import DigitsDataset


class WaitingLoader:
    """Wraps a loader and adds up the time spent in its __next__."""

    def __init__(self, loader):
        self.loader, self.waiting = loader, 0.0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        import time

        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.waiting += time.perf_counter() - start
            yield batch


def epoch_fraction(batched: bool, epochs: int) -> float:
    """Waiting fraction of the Trainer's training epochs (digits config, logging on)."""
    import run
    from train import parse_args
    from trainer.trainer import Trainer

    saved = DigitsDataset.get_batch
    if not batched:
        del DigitsDataset.get_batch
    fractions = []
    original = Trainer._train_epoch

    def measured(self, epoch):
        wrapper = WaitingLoader(self.data_loader)
        self.data_loader = wrapper
        try:
            seconds = timed(lambda: measured.result.update(original(self, epoch)))
        finally:
            self.data_loader = wrapper.loader
        fractions.append(wrapper.waiting / seconds)
        return dict(measured.result)

    measured.result = {}
    Trainer._train_epoch = measured
    try:
        run.train_run(parse_args(["-c", str(ROOT / "configs" / "digits.yaml"), f"trainer.save_dir={temp_dir()}",
                                  f"trainer.epochs={epochs}", "trainer.early_stop=0", "trainer.verbosity=0"]))
    finally:
        Trainer._train_epoch = original
        DigitsDataset.get_batch = saved
    return statistics.median(fractions[1:])


def per_batch_cost(config: dict, batched: bool, rounds: int = 20) -> float:
    saved = DigitsDataset.get_batch
    if not batched:
        del DigitsDataset.get_batch
    try:
        loader, _ = build_data_loaders(config)
        loader.set_epoch(1)
        seconds = statistics.median(timed(lambda: list(loader)) for _ in range(rounds))
        return seconds / len(loader)
    finally:
        DigitsDataset.get_batch = saved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(ROOT / "configs" / "digits.yaml")
    dataset = DigitsDataset()
    index = torch.randperm(len(dataset))[:64]
    slicing = statistics.median(timed(lambda: (dataset.images[index], dataset.targets[index])) for _ in range(200))
    per_sample, batched = per_batch_cost(config, False), per_batch_cost(config, True)
    print(f"per batch of 64: __getitem__ + collate {per_sample * 1e6:.0f} us, get_batch {batched * 1e6:.0f} us, "
          f"tensor slicing {slicing * 1e6:.0f} us ({per_sample / batched:.1f}x faster batched)")
    waiting_sample, waiting_batched = epoch_fraction(False, args.epochs), epoch_fraction(True, args.epochs)
    print(f"digits training epoch, time waiting for data: per sample {waiting_sample:.1%}, batched "
          f"{waiting_batched:.1%} (target <= 5%)")
    print(f"{waiting_batched:.3f}")


if __name__ == "__main__":
    main()
