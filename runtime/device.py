from __future__ import annotations

import re
import shlex
import sys

from errors import ConfigError


def device_option(spec: str, argv: list[str] | None = None, several: bool = True) -> str:
    """`-d` as pytorch-template spelled it: GPU indices. `-d 0` is cuda:0; several indices (`-d 0,1`) need one
    process per GPU, so the answer is the torchrun command that runs them."""
    if re.fullmatch(r"\d+", spec):
        return f"cuda:{spec}"
    if re.fullmatch(r"\d+(,\d+)+", spec) and not several:
        raise ConfigError(f"-d {spec}: this command runs on one device; name one (e.g. -d {spec.split(',')[0]})")
    if re.fullmatch(r"\d+(,\d+)+", spec):
        argv = list(sys.argv if argv is None else argv)
        kept, skip = [], False
        for item in argv:  # the same command without its -d
            if skip:
                skip = False
            elif item in ("-d", "--device"):
                skip = True
            elif not item.startswith(("-d", "--device=")):
                kept.append(item)
        count = len(spec.split(","))
        raise ConfigError(f"-d {spec}: one process per GPU (DistributedDataParallel); run: CUDA_VISIBLE_DEVICES={spec} "
                          f"torchrun --standalone --nproc_per_node={count} {shlex.join(kept)}")
    return spec


def resolve_device(spec: str, n_gpu: int | None = None, local_rank: int | None = None) -> "torch.device":
    """`auto|cpu|cuda|cuda:N|mps` -> a device that exists here; under torchrun, cuda means cuda:LOCAL_RANK."""
    import torch

    if n_gpu == 0:
        spec = "cpu"
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", spec):
        raise ConfigError(f"device: {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} requested but CUDA is not available here (use device: cpu or auto)")
        if ":" in spec and local_rank is not None:
            raise ConfigError(f"device: {spec!r} would put every torchrun process on one GPU; use device: cuda "
                              f"(each process takes cuda:LOCAL_RANK)")
        index = int(spec.split(":")[1]) if ":" in spec else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if n_gpu and n_gpu > torch.cuda.device_count():
            raise ConfigError(f"n_gpu: {n_gpu} requested but this machine has {torch.cuda.device_count()}")
        return torch.device("cuda", index)
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device: 'mps' requested but MPS is not available here")
    return torch.device(spec)


def check_amp(amp: str, device: "torch.device") -> None:
    """fp16 needs a GPU (CUDA or MPS); bf16 works on the CPU too."""
    import torch

    if amp == "fp16" and device.type == "cpu":
        raise ConfigError("trainer.amp: fp16 is not supported on the CPU; use bf16 or off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.amp: bf16 is not supported on {torch.cuda.get_device_name(device)}; use fp16")
