"""Pieces of a checkpoint: RNG states as tensors and primitives, and strict model-state loading."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn

from errors import CheckpointError


def capture_rng() -> dict:
    """Python, NumPy, torch CPU and every CUDA device, in types that weights_only=True accepts."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        # 625 words as one tensor, not a tuple of ints: each int would be one more object to check and pickle.
        "python": (version, torch.tensor(internal, dtype=torch.int64), gauss),
        "numpy": {"key": key, "state": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist() if isinstance(internal, torch.Tensor) else internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["key"], numpy_state["state"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def load_model_state(model: nn.Module, state_dict: dict, strict: bool = True, source: str = "checkpoint") -> list[str]:
    """Load into the plain module; a mismatch lists missing, unexpected and shape-mismatched keys.

    With strict=False only the matching keys are loaded; the returned notes name the others.
    """
    model = unwrap_model(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and hasattr(state_dict[k], "shape")
                  and state_dict[k].shape != expected[k].shape]
    # load_state_dict casts silently: float16 into float32 is a fair conversion, integers into float weights
    # (or floats into integer buffers) are garbage.
    kinds = [f"{k} {str(state_dict[k].dtype).removeprefix('torch.')} vs model "
             f"{str(expected[k].dtype).removeprefix('torch.')}"
             for k in expected if k in state_dict and isinstance(state_dict[k], torch.Tensor)
             and state_dict[k].is_floating_point() != expected[k].is_floating_point()]
    notes = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched),
                        ("dtype-mismatched", kinds)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            notes.append(f"{label} keys: {shown}")
    if notes and strict:
        raise CheckpointError(f"{source}: the checkpoint does not fit {type(model).__name__}: " + "; ".join(notes))
    bad = set(unexpected) | {m.split(" ")[0] for m in mismatched + kinds}
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in bad}, strict=strict)
    return notes
