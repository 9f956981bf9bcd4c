"""Mid-epoch resume cost: time from loading a checkpoint to the first batch of the resumed epoch,
for a checkpoint near the end of an epoch against one near its start (target <= 1.2: a resume
must not replay the consumed batches). MNIST-sized in-memory data (60,000 samples, batch 64).

    python bench/resume_cost.py
"""
from __future__ import annotations

import argparse
import statistics

from common import paired_rounds, report, temp_dir, timed
from overhead import BenchLoader, RandomImages, make_config

import torch

from checkpoint import load_checkpoint, save_checkpoint
from config.build import build_loss, build_metrics
from logger import setup_logging
from model.model import MnistModel
from trainer.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup_logging(None, verbosity=0)
    dataset = RandomImages(60000, (1, 28, 28))
    out = temp_dir()
    config = make_config("nll_loss", str(out), False)

    def trainer() -> Trainer:
        model = MnistModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return Trainer(model, build_loss(config), build_metrics(config), optimizer, config, torch.device("cpu"),
                       BenchLoader(dataset, 64), None, None, run_dir=out)

    source = trainer()
    steps = len(source.data_loader)
    paths = {}
    for name, batches in (("start", 2), ("end", steps - 2)):
        source.batch_in_epoch, source.samples_in_epoch, source.global_step = batches, batches * 64, batches
        paths[name] = save_checkpoint(source.checkpoint_state(epoch_finished=False), out / f"{name}.pth")

    def resume(name: str) -> float:
        target = trainer()

        def first_batch():
            target.resume(load_checkpoint(paths[name]))
            target.data_loader.set_epoch(target.epoch, start=target.samples_in_epoch)
            next(iter(target.data_loader))

        return timed(first_batch)

    ratios = paired_rounds(lambda: resume("end"), lambda: resume("start"), args.rounds)
    print(f"resume at batch 2 and at batch {steps - 2} of {steps}: median "
          f"{statistics.median(resume('start') for _ in range(5)) * 1e3:.1f} ms to the first batch")
    print(f"{report('resume near the end / near the start of an epoch', ratios, 1.2):.3f}")


if __name__ == "__main__":
    main()
