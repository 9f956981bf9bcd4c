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


def check_fsdp_config(cfg: dict, model: nn.Module, device: torch.device, resume_path=None,
                      resume_sharded: bool = False) -> None:
    """trainer.strategy fsdp: every name in trainer.fsdp.wrap is the class of some module of the model, the
    settings FSDP2 cannot honour here are refused, and a resume keeps its checkpoint format; all before
    anything is written."""
    if resume_path and resume_sharded != (cfg["strategy"] == "fsdp"):
        kind = "a sharded (strategy fsdp)" if resume_sharded else "a single-file"
        raise ConfigError(f"trainer.strategy: {cfg['strategy']} cannot resume {kind} checkpoint ({resume_path}); "
                          f"resume with the strategy it was written with"
                          + ("" if resume_sharded else f", or start a new run from its weights: "
                                                       f"arch.pretrained={resume_path}"))
    if cfg["strategy"] != "fsdp":
        return
    classes = {type(module).__name__ for module in model.modules()}
    unknown = [name for name in cfg["fsdp"]["wrap"] if name not in classes]
    if unknown:
        from config.schema import suggest

        raise ConfigError([f"trainer.fsdp.wrap: {name!r} is not the class of any module of "
                           f"{type(model).__name__}{suggest(name, classes)} (its module classes: "
                           f"{', '.join(sorted(classes))})" for name in unknown])
    # fully_shard hooks a unit's forward: a container that is never called (ModuleList, ModuleDict) failed
    # inside fully_shard, after the run directory was written.
    containers = {type(m).__name__: m for m in model.modules()
                  if type(m).__name__ in cfg["fsdp"]["wrap"] and type(m).forward is nn.Module.forward}
    if containers:
        raise ConfigError([f"trainer.fsdp.wrap: {name} has no forward of its own: name the class of its elements "
                           f"(e.g. {', '.join(sorted({type(c).__name__ for c in m.children()})) or 'Block'})"
                           for name, m in containers.items()])
    if cfg["sync_batchnorm"]:
        raise ConfigError("trainer.sync_batchnorm: SyncBatchNorm works with strategy ddp only")
    if cfg["fsdp"]["cpu_offload"] and device.type != "cuda":
        raise ConfigError(f"trainer.fsdp.cpu_offload: offloads from a CUDA device (the device is {device.type}); "
                          f"set trainer.fsdp.cpu_offload=false")
    if cfg["compile"]:
        raise ConfigError("trainer.compile: not supported with strategy fsdp yet; set trainer.compile=false")
    if cfg["freeze"] is not None:
        raise ConfigError("trainer.freeze: freezing modules works with strategy ddp only (FSDP2 shards "
                          "frozen and trainable parameters of one unit together)")


def shard_model(model: nn.Module, fsdp: dict, device: torch.device) -> nn.Module:
    """FSDP2: fully_shard on each module whose class is named in `fsdp["wrap"]` (innermost first; with mixed
    precision also each BatchNorm, kept in float32), then on the root. The model stays the same object (its
    class becomes an FSDP subclass; its parameters DTensors holding this rank's shard), so checkpoints keep
    the plain module's key names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if fsdp["cpu_offload"] else OffloadPolicy()}
    norms, norm_options = set(), options
    if fsdp["mixed_precision"] is not None:
        dtypes = {key: getattr(torch, value) for key, value in fsdp["mixed_precision"].items()}
        options = {**options, "mp_policy": MixedPrecisionPolicy(**dtypes)}
        # BatchNorm in float32, as FSDP1's MixedPrecision did by default: FSDP2 casts a unit's parameters to
        # param_dtype but never its buffers, and batch_norm refuses a bfloat16 weight with float32 running
        # statistics ("expected scalar type BFloat16 but found Float", at the first step). Each BatchNorm is
        # a unit of its own that gathers in float32, takes its input in float32 and hands param_dtype on.
        norms = {id(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        norm_options = {**options, "mp_policy": MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=dtypes["reduce_dtype"], output_dtype=dtypes["param_dtype"])}
    wrap = set(fsdp["wrap"])
    # Deepest first: fully_shard on a parent takes the parameters its sharded children do not hold.
    units = [module for module in model.modules()
             if (type(module).__name__ in wrap or id(module) in norms) and module is not model]
    for module in reversed(units):
        fully_shard(module, **(norm_options if id(module) in norms else options))
    fully_shard(model, **options)
    _broadcast_buffers_like_ddp(model)
    return model


def _broadcast_buffers_like_ddp(model: nn.Module) -> None:
    """DDP's broadcast_buffers for a sharded model. FSDP2 shards parameters only and leaves buffers alone: each
    rank kept its own (BatchNorm's running statistics, from its own batches only), validated with them, and a
    checkpoint (rank 0's) did not hold what the other ranks had. As DDP does, rank 0's buffers are broadcast
    before a training forward (one with gradients) when the previous training forward ran with gradient sync on,
    and before the first. Evaluation forwards (no_grad) broadcast nothing: the trainer evaluates DDP's inner
    module, which broadcasts nothing either, so both validate with the same buffers on every rank."""
    if not any(True for _ in model.buffers()):
        return
    pending = [True]  # DDP's require_forward_param_sync

    def before(module, args):
        if pending[0] and torch.is_grad_enabled():
            broadcast_buffers(module)

    def after(module, args, output):
        if torch.is_grad_enabled():
            # FSDP2's no_sync: set_requires_gradient_sync(False) clears reduce_grads on the units' parameter groups
            groups = [group for unit in module.modules() if hasattr(unit, "_get_fsdp_state")
                      for group in unit._get_fsdp_state()._fsdp_param_groups]
            pending[0] = all(group.reduce_grads for group in groups)

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)


def broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


def mixed_precision_hint(message: str, cfg: dict) -> str:
    """What to add to a training failure that FSDP's mixed precision and a float32 buffer caused, or "": FSDP2
    casts a unit's inputs to param_dtype but not the model's buffers."""
    import re

    if cfg.get("strategy") != "fsdp" or not (cfg.get("fsdp") or {}).get("mixed_precision"):
        return ""
    if not re.search(r"Input type \(float\) and (bias|weight) type \(c10::(BFloat16|Half)\)", message):
        return ""
    return ("; with trainer.fsdp.mixed_precision the input reached this layer in float32: FSDP2 casts each "
            "unit's inputs to param_dtype, never the model's buffers, so a float32 buffer used with the input "
            "(torch.cat, arithmetic) brings it back to float32: cast it in the model (buffer.to(x.dtype)), or "
            "name this layer's class in trainer.fsdp.wrap")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters, their gradients and optimizer state); a plain tensor as is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


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
