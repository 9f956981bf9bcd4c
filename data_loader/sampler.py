"""The one sampler behind every data loader: the order of an epoch is a pure function of
(seed, epoch), so a run can resume in the middle of an epoch without replaying it, and a
distributed run walks the data in the same order as a single process.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (stable across processes, unlike hash() of strings)."""
    state = 0x2545F4914F6CDD1D
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[int]):
    """Yields `indices` in an order fixed by (seed, epoch), from position `start` on.

    With `world_size` > 1, rank r takes items r, r+W, r+2W, ... of the remaining order, so that
    batch k of every rank holds items of batch k of a single process with a W times larger batch.
    Training pads the remainder by repeating items (all ranks must run the same number of steps);
    evaluation (`pad=False`) never counts a sample twice.
    """

    def __init__(self, indices: "torch.Tensor | list[int]", shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pad: bool = True):
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 1
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and how many samples of it (over all ranks) were already consumed."""
        self.epoch = epoch
        self.start = start

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return self.indices
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return self.indices[torch.randperm(len(self.indices), generator=generator)]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        remaining = order[self.start:]
        if self.world_size > 1:
            if self.pad and len(remaining) % self.world_size:
                # Padding repeats the first items of the epoch (not of the remaining part): a run
                # resumed mid-epoch then pads exactly as the uninterrupted run did.
                extra = self.world_size - len(remaining) % self.world_size
                remaining = torch.cat([remaining, order.repeat(extra)[:extra]])
            remaining = remaining[self.rank::self.world_size]
        return iter(remaining.tolist())

    def real_count(self) -> int:
        """How many of the items this rank yields in the current pass are not padding (the rest, at the
        end, repeat items of the epoch so that every rank takes as many steps)."""
        remaining = max(len(self.indices) - self.start, 0)
        return len(range(self.rank, remaining, self.world_size))

    def __len__(self) -> int:
        remaining = max(len(self.indices) - self.start, 0)
        if self.world_size == 1:
            return remaining
        if self.pad:
            return math.ceil(remaining / self.world_size)
        return len(range(self.rank, remaining, self.world_size))
