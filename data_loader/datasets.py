"""Datasets, each a plain `torch.utils.data.Dataset` with __init__/__len__/__getitem__."""
from __future__ import annotations

import copy
import csv
import pickle
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class StackedBatch(tuple):
    """A batch that a dataset's `get_batch` built in one indexing operation: already collated.

    BaseDataLoader's collate function passes it through; any other batch goes to default_collate.
    """


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, pixel values 0..16; no download).

    A fixed 360-image test split (drawn with its own seed, whatever the run's seed) is held out.
    The whole set is 460 KB, so it is kept in memory as two tensors.
    """

    TEST_SIZE = 360

    def __init__(self, train: bool = True, transform: Callable | None = None):
        from sklearn.datasets import load_digits  # imported here: scikit-learn takes ~1 s to import

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
        targets = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(20261125))
        keep = order[self.TEST_SIZE:] if train else order[: self.TEST_SIZE]
        self.images, self.targets = images[keep], targets[keep]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def get_batch(self, indices: list[int]):
        """The whole batch in one indexing operation: ~5x cheaper than `batch_size` calls of
        __getitem__ and a stack (bench/data_pipeline.py). BaseDataLoader uses it when it exists; a
        plain DataLoader keeps using __getitem__."""
        if self.transform is not None:
            return [self[i] for i in indices]
        index = torch.as_tensor(indices)
        return StackedBatch((self.images[index], self.targets[index]))


class TorchvisionDataset(Dataset):
    """MNIST, FashionMNIST or CIFAR10 from torchvision, in their standard on-disk formats under `root`.

    torchvision downloads the files when they are missing and the machine is online; offline, the
    files must already be there (MNIST: <root>/MNIST/raw/*-ubyte, uncompressed; FashionMNIST:
    <root>/FashionMNIST/raw/*-ubyte; CIFAR10: <root>/cifar-10-batches-py/). torchvision checks the
    md5 sum of every CIFAR-10 file on load; `verify_checksums=False` skips that check, for a
    CIFAR-format set of your own (the files are Python pickles: only use files you trust).
    """

    NAMES = ("MNIST", "FashionMNIST", "CIFAR10")

    def __init__(self, name: str, root: str, train: bool = True, transform: Callable | None = None,
                 download: bool = True, verify_checksums: bool = True):
        if name not in self.NAMES:
            raise ValueError(f"dataset {name!r} is not one of {', '.join(self.NAMES)}")
        try:
            # The transform is applied here, not by torchvision, so that `with_transform` can give
            # the validation subset its own transform over the same arrays (no second copy in memory).
            self.data = _load_torchvision(name, root, train, download, verify_checksums)
        except (RuntimeError, OSError, AssertionError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            raise UserError(_missing_data_message(name, root, download, exc)) from None
        self.transform = transform
        self.classes = list(self.data.classes)

    def with_transform(self, transform: Callable | None) -> "TorchvisionDataset":
        """The same samples (shared, not copied) under another transform."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image, target = self.data[index]  # a PIL image and an int
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _load_torchvision(name: str, root: str, train: bool, download: bool, verify_checksums: bool):
    import torchvision.datasets as tv_datasets

    cls = getattr(tv_datasets, name)
    dataset = cls.__new__(cls)
    if not verify_checksums and hasattr(cls, "train_list"):  # MNIST-style sets check no sums on load
        # Instance attributes shadow torchvision's class-level md5 table; its check_integrity(path,
        # md5=None) then checks only that each file exists. The object stays a plain torchvision
        # dataset (it pickles into DataLoader workers under any start method).
        dataset.train_list = [[file, None] for file, _ in cls.train_list]
        dataset.test_list = [[file, None] for file, _ in cls.test_list]
        dataset.meta = {**cls.meta, "md5": None}
    cls.__init__(dataset, root, train=train, download=download)
    return dataset


def _missing_data_message(name: str, root: str, download: bool, exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    folder = Path(root) / ("cifar-10-batches-py" if name == "CIFAR10" else f"{name}/raw")
    expected = "cifar-10-batches-py/" if name == "CIFAR10" else f"{name}/raw/*-ubyte"
    present = folder.is_dir() and any(folder.iterdir())
    if present and name == "CIFAR10" and "corrupted" in reason:
        hint = (" (the files are there but their md5 sums are not the official ones; for a CIFAR-format set "
                "of your own, set data_loader.args.verify_checksums: false)")
    elif present:
        hint = " (a file is missing, truncated or not in the expected format)"
    elif download:
        hint = f" (offline? put the files under {str(folder)!r} yourself)"
    else:
        hint = " (set data_loader.args.download: true to fetch it)"
    return f"{name}: cannot load {expected} under {root!r}: {reason}{hint}"


class ImageFileDataset(Dataset):
    """Your own images: a folder per class (`root/<class>/*.png`), or a CSV of `path,label` rows.

    Only paths are listed in __init__; each image is opened in __getitem__, so a dataset larger
    than memory works. In a CSV, paths are relative to the CSV's folder and labels are class names
    (or integers); a header row `path,label` is optional.
    """

    def __init__(self, root: str, csv_file: str | None = None, transform: Callable | None = None,
                 grayscale: bool = False, classes: list[str] | None = None):
        self.transform = transform
        self.mode = "L" if grayscale else "RGB"
        root_path = Path(root)
        if csv_file is not None:
            self.samples, found = self._from_csv(Path(csv_file))
        else:
            if not root_path.is_dir():
                raise UserError(f"image folder {root!r} does not exist")
            found = sorted(p.name for p in root_path.iterdir() if p.is_dir())
            self.samples = [(str(path), name) for name in found for path in sorted((root_path / name).iterdir())
                            if path.suffix.lower() in IMAGE_SUFFIXES]
        self.classes = list(classes) if classes is not None else sorted(found, key=_class_key)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({label for _, label in self.samples} - set(self.class_to_idx))
        if unknown:
            raise UserError(f"{csv_file or root}: labels {unknown[:5]} are not among the classes {self.classes}")
        if not self.samples:
            raise UserError(f"{csv_file or root}: no images found")

    def with_transform(self, transform: Callable | None) -> "ImageFileDataset":
        """The same file list under another transform (the files are not listed again)."""
        view = copy.copy(self)
        view.transform = transform
        return view

    @staticmethod
    def _from_csv(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = [row for row in csv.reader(handle) if row]
        except OSError as exc:
            raise UserError(f"{path}: cannot read CSV ({exc.strerror or exc})") from None
        if rows and [c.strip().lower() for c in rows[0]] == ["path", "label"]:
            rows = rows[1:]
        samples = []
        for line, row in enumerate(rows, start=1):
            if len(row) != 2:
                raise UserError(f"{path}: row {line} must be `path,label`, got {row!r}")
            samples.append((str(path.parent / row[0].strip()), row[1].strip()))
        return samples, sorted({label for _, label in samples})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except OSError as exc:  # missing, unreadable or not an image (PIL.UnidentifiedImageError)
            raise UserError(f"{path}: cannot read image ({exc.strerror or exc})") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.class_to_idx[label]


def _class_key(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
