"""Checkpoint load with verification against torch.load(mmap=True, weights_only=True) of the same file
followed by one read of every tensor (target <= 1.5, issue 21's measure).

load_checkpoint checks the zip structure and the pickle's CRC-32 over the mapped file, maps it with
torch.load(mmap=True), then checks each tensor's CRC-32 over the memory that load returned; it returns only
verified tensors, their pages already faulted in. The baseline maps the file without any check, then reads
every tensor once (`sum`): a mapped load alone reads nothing, and loading into a model reads every byte
anyway. Two more ratios are printed, with no target: both sides followed by a copy of every tensor into
tensors allocated beforehand (what a resume pays: `load_state_dict` copies), and both sides followed by the
read (whose floor is about 2 on this machine: the check and the read each bring every byte from memory).
Checkpoints of ~96 MiB and ~1 GiB (a stack of linear layers) are written to a temporary directory, read
from the page cache both ways, and deleted at the end.

    python bench/load.py [--rounds 9] [--sizes 96 1024]
"""
from __future__ import annotations

import argparse
import gc
import shutil

from common import paired_rounds, report, temp_dir, timed

import torch

import checkpoint.archive
from checkpoint import load_checkpoint, save_checkpoint

LAYERS = 24


def tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for value in values for t in tensors(value)]


def make_state(megabytes: int) -> dict:
    side = int((megabytes * 2**20 / 4 / LAYERS) ** 0.5)
    layers = torch.nn.Sequential(*(torch.nn.Linear(side, side) for _ in range(LAYERS)))
    return {"state_dict": layers.state_dict(), "epoch": 1, "global_step": 10, "config": {"name": "bench"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 1024], help="checkpoint sizes in MiB")
    args = parser.parse_args()
    print(f"CRC-32 from {checkpoint.archive.crc32.__module__}, torch threads {torch.get_num_threads()}")
    out = temp_dir()
    medians = []
    try:
        for megabytes in args.sizes:
            path = save_checkpoint(make_state(megabytes), out / f"{megabytes}.pth")
            gc.collect()
            size = path.stat().st_size / 2**20
            targets = [torch.empty_like(t) for t in tensors(torch.load(path, mmap=True, weights_only=True))]
            for t in targets:
                t.zero_()  # a model's parameters: allocated and written before the load

            def read(state: dict) -> None:
                for t in tensors(state):
                    t.sum()

            def copy(state: dict) -> None:
                for target, t in zip(targets, tensors(state)):
                    target.copy_(t)

            def nothing(state: dict) -> None:
                pass

            def ours(touch):
                return lambda: timed(lambda: touch(load_checkpoint(path)))

            def mapped(touch):
                return lambda: timed(lambda: touch(torch.load(path, mmap=True, weights_only=True)))

            for touch in (read, copy):  # one untimed pass each: page tables, allocator, thread pool
                ours(touch)(), mapped(touch)()
            base = sorted(mapped(read)() for _ in range(3))[1]
            print(f"{size:.0f} MiB: mmap load + read {base * 1000:.1f} ms")
            ratios = paired_rounds(ours(nothing), mapped(read), args.rounds)
            medians.append(report(f"{size:.0f} MiB, load + verify / mmap load + read", ratios, 1.5))
            copy_ratios = paired_rounds(ours(copy), mapped(copy), args.rounds)
            report(f"{size:.0f} MiB, load + verify + copy into a model / mmap load + copy", copy_ratios, None)
            read_ratios = paired_rounds(ours(read), mapped(read), args.rounds)
            report(f"{size:.0f} MiB, load + verify + read / mmap load + read", read_ratios, None)
            del targets
            path.unlink()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(" ".join(f"{m:.3f}" for m in medians))


if __name__ == "__main__":
    main()
