"""Small datasets written in the real on-disk formats torchvision and the image datasets read.

Nothing here imitates a loader: the files are byte-for-byte what the originals look like
(MNIST's big-endian IDX files, CIFAR-10's pickled batches, PNG files), only with fewer images.
Each image carries its class as a bright block at a class-specific place over noise, so a model
can learn it and a test can check which label came back with which image.
"""
from __future__ import annotations

import csv
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """uint8 images (N, size, size, channels): noise plus a block whose position encodes the label."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), size, size, channels), dtype=np.uint8)
    block = max(size // 4, 1)
    for i, label in enumerate(labels):
        row, col = divmod(int(label) % 16, 4)
        images[i, row * block:(row + 1) * block, col * block:(col + 1) * block, :] = 255
    return images


def _labels(n: int, classes: int, seed: int) -> np.ndarray:
    # Every class appears (n >= classes), in a shuffled order.
    labels = np.arange(n) % classes
    np.random.default_rng(seed).shuffle(labels)
    return labels.astype(np.uint8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic 0x0000 <type 0x08 = uint8> <ndim>, then each dimension as a big-endian int32."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: str | Path, n_train: int = 64, n_test: int = 32, name: str = "MNIST",
                seed: int = 0) -> dict[str, np.ndarray]:
    """The four uncompressed IDX files torchvision's MNIST/FashionMNIST look for under <root>/<name>/raw/.

    torchvision checks only that they exist (md5 sums are checked on download, not on load), so with
    them present `download=True` downloads nothing. Returns the arrays written.
    """
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n, offset in (("train", n_train, 0), ("t10k", n_test, 1)):
        labels = _labels(n, 10, seed + offset)
        images = class_images(labels, 28, 1, seed + offset)[..., 0]  # (N, 28, 28)
        _write_idx(raw / f"{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        written[f"{split}_images"], written[f"{split}_labels"] = images, labels
    return written


def write_cifar10(root: str | Path, n_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """<root>/cifar-10-batches-py/: data_batch_1..5, test_batch and batches.meta, pickled as in the original.

    Each batch is a dict with `data` (N, 3072) uint8 (the R, G and B planes of a 32x32 image, row
    after row), `labels`, `filenames` and `batch_label`. These files cannot match torchvision's
    md5 sums, so loading them needs `verify_checksums: false`.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        n = n_test if name == "test_batch" else n_per_batch
        labels = _labels(n, 10, seed + i)
        images = class_images(labels, 32, 3, seed + i)  # (N, H, W, C)
        data = images.transpose(0, 3, 1, 2).reshape(n, 3 * 32 * 32)  # (N, C*H*W): channel planes
        entry = {"batch_label": f"{name} (generated)", "labels": [int(v) for v in labels], "data": data,
                 "filenames": [f"{name}_{j}.png" for j in range(n)]}
        with (folder / name).open("wb") as handle:
            pickle.dump(entry, handle, protocol=2)
        written[name] = images
        written[f"{name}_labels"] = labels
    meta = {"label_names": CIFAR_CLASSES, "num_cases_per_batch": n_per_batch, "num_vis": 3072}
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return written


def write_image_folder(root: str | Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 6,
                       size: int = 16, mode: str = "RGB", seed: int = 0) -> list[tuple[Path, str]]:
    """PNG files <root>/<class>/<i>.png; returns [(path, class name)] in sorted order."""
    from PIL import Image

    channels = 1 if mode == "L" else 3
    written = []
    for c, name in enumerate(classes):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        images = class_images(np.full(per_class, c), size, channels, seed + c)
        for i, pixels in enumerate(images):
            path = folder / f"{i:03d}.png"
            Image.fromarray(pixels[..., 0] if mode == "L" else pixels).save(path)  # 2-D: L, 3-D: RGB
            written.append((path, name))
    return written


def write_image_csv(csv_path: str | Path, samples: list[tuple[Path, str]], header: bool = True) -> Path:
    """A CSV of `path,label` rows, paths relative to the CSV's folder."""
    csv_path = Path(csv_path)
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(["path", "label"])
        for path, label in samples:
            writer.writerow([Path(path).relative_to(csv_path.parent).as_posix(), label])
    return csv_path
