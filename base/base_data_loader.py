from __future__ import annotations

import random
import signal
import threading
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from data_loader.datasets import StackedBatch
from data_loader.sampler import EpochSampler, mix_seed
from errors import ConfigError
from runtime import signals


def seed_worker(worker_id: int) -> None:
    """torch seeds each worker with base_seed + worker_id; NumPy and `random` need the same.
    A worker also leaves SIGINT/SIGTERM sent to the process group to the main process."""
    signals.ignore_in_worker()
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)


def collate(batch):
    """default_collate, except for a batch that the dataset's __getitems__ already stacked."""
    return batch if isinstance(batch, StackedBatch) else default_collate(batch)


class BatchFetching(Dataset):
    """Wraps a dataset that has `get_batch(indices)`, so the DataLoader fetches a batch in one call
    (through `__getitems__`) instead of one `__getitem__` per sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, indices: list[int]):
        return self.dataset.get_batch(indices)


def split_indices(n: int, validation_split: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) indices; `validation_split` is a fraction (float) or a count (int).

    Drawn from a private generator: the same seed gives the same split, and no global RNG moves.
    """
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
        raise ValueError(f"validation_split must be a number, got {validation_split!r}")
    if isinstance(validation_split, int):
        if not 0 <= validation_split < n:
            raise ValueError(f"validation_split {validation_split} must be a count in [0, {n})")
        n_valid = validation_split
    else:
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split {validation_split} must be a fraction in [0, 1)")
        n_valid = int(round(n * validation_split))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 0x5011)))
    return order[n_valid:].sort().values, order[:n_valid].sort().values


def fold_indices(n: int, folds: int, fold: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) indices for k-fold cross-validation: a seeded permutation of range(n) cut into
    `folds` near-equal parts; part `fold` validates, the others train. The parts are disjoint and
    together cover range(n); the same seed gives the same parts, and no global RNG moves."""
    if not 2 <= folds <= n:
        raise ConfigError(f"data_loader.folds: {folds} folds of {n} samples (at least 2, at most one per sample)")
    if not 0 <= fold < folds:
        raise ConfigError(f"data_loader.fold: {fold} must be in [0, {folds})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 0xF01D)))
    parts = torch.tensor_split(order, folds)
    train = torch.cat([part for i, part in enumerate(parts) if i != fold])
    return train.sort().values, parts[fold].sort().values


class WorkerSafeDataLoader(DataLoader):
    """A DataLoader whose workers survive SIGINT/SIGTERM sent to the process group (`timeout`, Slurm,
    systemd, Ctrl-C), so the main process can save and exit 130/143 (see runtime/signals.py).

    Workers are forked when the iterator is created (every epoch, unless persistent_workers): with
    the signals blocked meanwhile, none can reach a worker before `seed_worker` made it ignore them.

    A worker that does die (SIGKILL, the OOM killer) is reported by `next()`: torch's iterator checks
    its workers whenever a fetch fails or waits 5 s. torch's SIGCHLD handler, which raised the same
    error wherever the main process was (inside a checkpoint write, or while reporting that error),
    is not kept.
    """

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        sigchld = signal.getsignal(signal.SIGCHLD)
        with signals.deferred_in_children():
            iterator = super().__iter__()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, sigchld)
        return iterator


class BaseDataLoader(WorkerSafeDataLoader):
    """A DataLoader with a deterministic validation split and a (seed, epoch)-ordered sampler.

    Subclasses build their Dataset and call `super().__init__`, as in pytorch-template. Pass
    `valid_dataset` (the same samples, built with a non-augmenting transform) to validate without
    augmentation. The builder calls `configure(seed, rank, world_size, folds, fold)` once after construction.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True,
                 validation_split: float | int = 0.0, num_workers: int = 0,
                 collate_fn: Callable = collate, valid_dataset: Dataset | None = None,
                 pin_memory: bool = False, drop_last: bool = False):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.validation_split = validation_split
        self.valid_dataset = dataset if valid_dataset is None else valid_dataset
        self.n_samples = len(dataset)
        train_idx, self.valid_indices = split_indices(self.n_samples, validation_split, seed=0)
        sampler = EpochSampler(train_idx, shuffle=shuffle)
        self._loader_kwargs = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                                   pin_memory=pin_memory, worker_init_fn=seed_worker)
        if hasattr(dataset, "get_batch"):
            dataset = BatchFetching(dataset)
        if hasattr(self.valid_dataset, "get_batch"):
            self.valid_dataset = BatchFetching(self.valid_dataset)
        super().__init__(dataset, sampler=sampler, drop_last=drop_last, generator=torch.Generator(),
                         **self._loader_kwargs)

    def configure(self, seed: int, rank: int = 0, world_size: int = 1, folds: int | None = None,
                  fold: int | None = None) -> None:
        """Redo the split with the run's seed (fold `fold` of `folds` validates, in place of
        validation_split) and select this process's share of every epoch."""
        if folds:
            train_idx, self.valid_indices = fold_indices(self.n_samples, folds, fold or 0, seed)
        else:
            train_idx, self.valid_indices = split_indices(self.n_samples, self.validation_split, seed)
        self.sampler.indices = train_idx
        self.sampler.seed, self.sampler.rank, self.sampler.world_size = seed, rank, world_size
        self.seed = seed

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Fix the order of `epoch` (and skip `start` samples of it); call before iterating."""
        self.sampler.set_epoch(epoch, start)
        # Worker seeds come from this generator when the iterator is created; seeding it from
        # (seed, epoch) keeps the global RNG untouched and makes workers reproducible.
        self.generator.manual_seed(mix_seed(self.sampler.seed, epoch, 0xDA7A))

    def split_validation(self) -> DataLoader | None:
        """The validation DataLoader (unshuffled, no padding across ranks), or None without a split."""
        if len(self.valid_indices) == 0:
            return None
        sampler = EpochSampler(self.valid_indices, shuffle=False, rank=self.sampler.rank,
                               world_size=self.sampler.world_size, pad=False)
        return WorkerSafeDataLoader(self.valid_dataset, sampler=sampler, generator=torch.Generator().manual_seed(0),
                          **self._loader_kwargs)
