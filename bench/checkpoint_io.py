"""Checkpoint costs: atomic save (CRC-32 forced on, fsync, rename, fsync dir) against a plain torch.save of the same
dict for a ~100 MB model (target <= 1.5), and load + verify against a plain torch.load.

    python bench/checkpoint_io.py
"""
from __future__ import annotations

import argparse
import os

from common import paired_rounds, report, temp_dir, timed

import torch

from checkpoint import load_checkpoint, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--megabytes", type=int, default=100)
    args = parser.parse_args()
    side = int((args.megabytes * 2**20 / 4) ** 0.5)
    model = torch.nn.Linear(side, side)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "global_step": 10}
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    out = temp_dir()
    atomic_path, plain_path = out / "atomic.pth", out / "plain.pth"

    def plain_save():
        return timed(lambda: torch.save(state, plain_path))

    def atomic_save():
        return timed(lambda: save_checkpoint(state, atomic_path))

    print(f"model state: {size:.0f} MiB, directory {out}")
    save_ratios = paired_rounds(atomic_save, plain_save, args.rounds)
    load_ratios = paired_rounds(lambda: timed(lambda: load_checkpoint(atomic_path)),
                                lambda: timed(lambda: torch.load(plain_path, weights_only=True)), args.rounds)
    report("load + verify / plain torch.load", load_ratios, None)
    median = report("atomic save / plain torch.save", save_ratios, 1.5)
    for path in (atomic_path, plain_path):
        os.remove(path)
    print(f"{median:.3f}")


if __name__ == "__main__":
    main()
