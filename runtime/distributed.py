"""torchrun + DistributedDataParallel: one process per device, rank 0 writes, all ranks decide alike."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(backend: str, device_spec: str, n_gpu: int | None) -> DistContext:
    """Join the process group when started by torchrun; a plain single process otherwise."""
    if not launched_by_torchrun():
        if n_gpu is not None and n_gpu > 1:
            raise ConfigError(f"n_gpu: {n_gpu} GPUs need one process each; run: "
                              f"torchrun --standalone --nproc_per_node={n_gpu} train.py -c CONFIG")
        return DistContext()
    context = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if context.world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            wants_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
            backend = "nccl" if wants_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend=backend)
    return context


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
