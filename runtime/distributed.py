"""torchrun + DistributedDataParallel: one process per device, rank 0 writes, all ranks decide alike.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; this module reads them, joins the process group
(nccl for CUDA devices, gloo otherwise) and wraps the model. Without torchrun everything here is a
no-op, so the same code runs single-process.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

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


def torchrun_command(nproc: int, argv: list[str] | None = None) -> str:
    """The command line that runs this same invocation under torchrun with `nproc` processes."""
    argv = list(sys.argv if argv is None else argv)
    return f"torchrun --standalone --nproc_per_node={nproc} {shlex.join(argv)}"


def distributed_context(n_gpu: int | None) -> DistContext:
    """Rank, world size and local rank from torchrun's environment; a plain single process otherwise."""
    if not launched_by_torchrun():
        if n_gpu is not None and n_gpu > 1:
            # One process per GPU (DDP), never nn.DataParallel: tell the user the command that does it.
            raise ConfigError(f"n_gpu: {n_gpu} needs one process per GPU; run: {torchrun_command(n_gpu)}")
        return DistContext()
    return DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def check_sync_batchnorm(sync_batchnorm: bool, device: torch.device, context: DistContext) -> None:
    # DDP refuses SyncBatchNorm on CPU modules (and SyncBatchNorm CPU or MPS tensors): fail before the run starts.
    if sync_batchnorm and context.enabled and device.type in ("cpu", "mps"):
        raise ConfigError(f"trainer.sync_batchnorm: SyncBatchNorm needs GPUs (torch does not support it on "
                          f"{device.type}); set trainer.sync_batchnorm=false")


def init_process_group(context: DistContext, backend: str, device: torch.device) -> None:
    """Join torchrun's process group (a no-op for a single process)."""
    if not context.enabled or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def sync_batchnorm_layers(model: nn.Module) -> tuple[nn.Module, int]:
    """(model with every BatchNorm*d replaced by SyncBatchNorm, number of SyncBatchNorm layers)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def wrap_model(model: nn.Module, device: torch.device, sync_batchnorm: bool,
               find_unused: bool = False) -> tuple[nn.Module, int]:
    """(DDP-wrapped model, number of SyncBatchNorm layers in it). `find_unused`: some parameters get no
    gradient in some steps (trainer.freeze), which DDP must then look for."""
    converted = 0
    if sync_batchnorm:
        model, converted = sync_batchnorm_layers(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused), converted


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
