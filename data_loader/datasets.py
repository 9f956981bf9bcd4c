"""Datasets, each a plain `torch.utils.data.Dataset` with __init__/__len__/__getitem__."""
from __future__ import annotations

import copy
import csv
import pickle
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from data_loader.sampler import mix_seed
from errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class StackedBatch(tuple):
    """A batch that a dataset's `get_batch` built in one indexing operation: already collated.

    BaseDataLoader's collate function passes it through; any other batch goes to default_collate.
    """


def _bundled_digits():
    """(pixels (1797, 64) float64, labels (1797,)) exactly as `sklearn.datasets.load_digits` gives them.

    The file scikit-learn ships is read directly: importing `sklearn.datasets` (SciPy with it) costs
    about 1.5 s of CPU at every start, several times the rest of a small run's data work. Where the file
    is not at its usual place (another scikit-learn layout), load_digits reads it.
    """
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data, digits.target
    with gzip.open(path, "rt") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, pixel values 0..16; no download).

    A fixed 360-image test split (drawn with its own seed, whatever the run's seed) is held out.
    The whole set is 460 KB, so it is kept in memory as two tensors.
    """

    TEST_SIZE = 360

    def __init__(self, train: bool = True, transform: Callable | None = None):
        pixels, labels = _bundled_digits()
        images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8)
        targets = torch.tensor(labels, dtype=torch.long)
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


class DiabetesDataset(Dataset):
    """scikit-learn's bundled diabetes data: 442 patients, 10 features, a disease-progression score
    one year later (25..346). Regression; no download.

    A fixed 88-patient test split (drawn with its own seed, whatever the run's seed) is held out.
    Features and target are standardised with the mean and std of the other 354 patients (the
    training part, validation split included), so train and test use the same statistics and the
    test split leaks nothing into them. Targets have shape (1,) per sample, (N, 1) per batch, to
    match a model with one output (mse_loss refuses mismatched shapes rather than broadcasting).
    `target_mean` and `target_std` turn predictions back into the original score.
    """

    TEST_SIZE = 88

    def __init__(self, train: bool = True):
        from sklearn.datasets import load_diabetes  # imported here: scikit-learn takes ~1 s to import

        features, target = load_diabetes(return_X_y=True, scaled=False)
        features = torch.tensor(features, dtype=torch.float32)           # (442, 10)
        target = torch.tensor(target, dtype=torch.float32).unsqueeze(1)  # (442, 1)
        order = torch.randperm(len(target), generator=torch.Generator().manual_seed(20261126))
        train_part, test_part = order[self.TEST_SIZE:], order[: self.TEST_SIZE]
        mean, std = features[train_part].mean(0), features[train_part].std(0)
        self.target_mean, self.target_std = target[train_part].mean().item(), target[train_part].std().item()
        keep = train_part if train else test_part
        self.features = (features[keep] - mean) / std
        self.targets = (target[keep] - self.target_mean) / self.target_std

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.features[index], self.targets[index]


class ShapesDataset(Dataset):
    """Generated images of circles and squares on a noisy background, with their masks, for semantic
    segmentation: each item is {"image": (1, H, W) float, "mask": (H, W) long}, mask classes
    0 = background, 1 = circle, 2 = square.

    Image i is drawn from its own seed, mix_seed(split, i): the same index always gives the same
    image, whatever `n_samples`, and the train and test splits come from different seeds. All
    images are drawn at construction (500 images of 32x32 take ~0.1 s and 2.5 MB).
    """

    CLASSES = ("background", "circle", "square")
    classes = list(CLASSES)  # the names predict.py and export.py report, as other datasets' `classes`
    SPLIT_SEEDS = {True: 0x5A9E, False: 0x7E57}  # train, test

    def __init__(self, n_samples: int = 400, image_size: int = 32, max_shapes: int = 3, noise: float = 0.15,
                 train: bool = True):
        if n_samples < 1 or image_size < 16 or max_shapes < 1:
            raise ValueError("ShapesDataset needs n_samples >= 1, image_size >= 16 and max_shapes >= 1")
        drawn = [self._draw(mix_seed(self.SPLIT_SEEDS[train], i), image_size, max_shapes, noise)
                 for i in range(n_samples)]
        self.images = torch.stack([image for image, _ in drawn])  # (N, 1, H, W)
        self.masks = torch.stack([mask for _, mask in drawn])     # (N, H, W)

    @staticmethod
    def _draw(seed: int, size: int, max_shapes: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * torch.rand((), generator=generator).item()

        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        image = torch.zeros(size, size)
        mask = torch.zeros(size, size, dtype=torch.long)
        n_shapes = int(torch.randint(1, max_shapes + 1, (), generator=generator))
        for _ in range(n_shapes):  # later shapes are drawn over earlier ones
            kind = int(torch.randint(1, 3, (), generator=generator))
            half = uniform(size / 10, size / 5)  # radius, or half the side
            centre_row, centre_col = uniform(half, size - 1 - half), uniform(half, size - 1 - half)
            if kind == 1:
                inside = (rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= half ** 2
            else:
                inside = ((rows - centre_row).abs() <= half) & ((cols - centre_col).abs() <= half)
            image[inside] = uniform(0.5, 1.0)
            mask[inside] = kind
        image += noise * torch.randn(size, size, generator=generator)
        return image.unsqueeze(0), mask

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "mask": self.masks[index]}


class TokenSequenceDataset(Dataset):
    """Generated token sequences of varying length, for classification: which of the tokens
    1..num_classes occurs most often? Tokens are drawn uniformly from 1..vocab_size (0 is kept for
    padding); sequences whose count of tokens 1..num_classes has no unique maximum are redrawn.
    Each item is {"tokens": (L,) long, "label": () long} with L in [min_length, max_length];
    `pad_tokens` (data_loader/collate.py) pads a batch of them.

    Sequence i is drawn from its own seed, mix_seed(split, i), as in ShapesDataset.
    """

    SPLIT_SEEDS = {True: 0x5E9, False: 0x7E5}  # train, test

    def __init__(self, n_samples: int = 2000, vocab_size: int = 12, num_classes: int = 4, min_length: int = 5,
                 max_length: int = 40, train: bool = True):
        if not 2 <= num_classes <= vocab_size or not 1 <= min_length <= max_length:
            raise ValueError("TokenSequenceDataset needs 2 <= num_classes <= vocab_size and "
                             "1 <= min_length <= max_length")
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.sequences: list[torch.Tensor] = []
        labels = []
        for i in range(n_samples):
            generator = torch.Generator().manual_seed(mix_seed(self.SPLIT_SEEDS[train], i))
            while True:
                length = int(torch.randint(min_length, max_length + 1, (), generator=generator))
                tokens = torch.randint(1, vocab_size + 1, (length,), generator=generator)
                counts = torch.bincount(tokens, minlength=vocab_size + 1)[1: num_classes + 1]
                if (counts == counts.max()).sum() == 1:
                    break
            self.sequences.append(tokens)
            labels.append(int(counts.argmax()))
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.sequences[index], "label": self.labels[index]}


class TorchvisionDataset(Dataset):
    """MNIST, FashionMNIST or CIFAR10 from torchvision, in their standard on-disk formats under `root`.

    torchvision downloads the files when they are missing and the machine is online; offline, the
    files must already be there (MNIST: <root>/MNIST/raw/*-ubyte, uncompressed; FashionMNIST:
    <root>/FashionMNIST/raw/*-ubyte; CIFAR10: <root>/cifar-10-batches-py/). torchvision checks the
    md5 sum of every CIFAR-10 file on load; `verify_checksums=False` skips that check, for a
    CIFAR-format set of your own (the files are Python pickles: only use files you trust).
    """

    NAMES = ("MNIST", "FashionMNIST", "CIFAR10")
    MODES = {"MNIST": "L", "FashionMNIST": "L", "CIFAR10": "RGB"}  # of the PIL images torchvision hands out

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
        self.mode = self.MODES[name]  # predict.py reads a new image file in this mode, then applies `transform`
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
        path, label = self.samples[index]
        image = read_image(path, self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.class_to_idx[label]


def read_image(path: str | Path, mode: str):
    """The image file as a PIL image in `mode` ("L", "RGB"); UserError naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except OSError as exc:  # missing, unreadable or not an image (PIL.UnidentifiedImageError)
        raise UserError(f"{path}: cannot read image ({exc.strerror or exc})") from None


def _class_key(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
