"""Inputs without labels, for predict.py: image files read the way the config's own dataset reads its
images (its `mode` and its `transform`, not a copy of them), and tensor files of one sample per row."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from data_loader.datasets import IMAGE_SUFFIXES, read_image
from errors import UserError

TENSOR_SUFFIXES = (".npy", ".pt", ".pth")


def list_images(path: Path) -> tuple[list[Path], list[Path]]:
    """(the image files under `path`, recursively, sorted; the other files there). `path` may be one image."""
    if path.is_file():
        return [path], []
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return ([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
            [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES])


class ImageFiles(Dataset):
    """Each item is the image as `transform` makes it from a `mode` PIL image, or, when the file cannot be
    read or transformed, a str saying why: one bad file among many is reported, not fatal."""

    def __init__(self, paths: list[Path], mode: str, transform: Callable | None):
        self.paths, self.mode, self.transform = paths, mode, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        path = self.paths[index]
        try:
            image = read_image(path, self.mode)
            image = self.transform(image) if self.transform is not None else image
        except UserError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever the transform makes of an odd image, it is this file's
            return f"{path}: the dataset's transform failed ({type(exc).__name__}: {' '.join(str(exc).split())})"
        if not isinstance(image, torch.Tensor):
            return f"{path}: the dataset's transform gives {type(image).__name__}, not a tensor"
        return image


def read_tensor_file(path: Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """A .npy array, or a .pt file holding a tensor or a dict of tensors (loaded with weights_only=True), with
    one sample per row: the same first dimension everywhere. Floating-point values become float32 (the
    models' dtype), integers int64 (token ids, class indices); booleans stay as they are."""
    try:
        if path.suffix.lower() == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a file that does not load is the user's input problem
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read {path.suffix} file ({first})") from None
    items = data if isinstance(data, dict) else {"": data}
    if not items or not all(isinstance(v, torch.Tensor) for v in items.values()):
        raise UserError(f"{path}: expected a tensor or a dict of tensors, got {_kind(data)}")
    rows = {tuple(v.shape[:1]) for v in items.values()}
    if any(v.dim() == 0 for v in items.values()) or len(rows) != 1 or rows == {(0,)}:
        shapes = ", ".join(f"{k + ': ' if k else ''}{tuple(v.shape)}" for k, v in items.items())
        raise UserError(f"{path}: expected one sample per row (the same first dimension, at least 1), got {shapes}")
    items = {k: v.float() if v.is_floating_point() else v if v.dtype == torch.bool else v.long()
             for k, v in items.items()}
    return items if isinstance(data, dict) else items[""]


def _kind(data) -> str:
    if isinstance(data, dict):
        return "a dict of " + ", ".join(sorted({type(v).__name__ for v in data.values()})) if data else "an empty dict"
    return type(data).__name__
