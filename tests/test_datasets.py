"""The Dataset classes read real files: MNIST/FashionMNIST IDX, CIFAR-10 pickles, PNG folders and CSVs,
written by tests/datafiles.py and loaded through torchvision and PIL (nothing mocked)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_script
from data_loader.data_loaders import Cifar10DataLoader, ImageFolderDataLoader, MnistDataLoader
from data_loader.datasets import ImageFileDataset, TorchvisionDataset
from datafiles import CIFAR_CLASSES, write_cifar10, write_image_csv, write_image_folder, write_mnist
from errors import UserError


def _pixels(image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_mnist_idx_files_load_through_torchvision(tmp_path, name):
    written = write_mnist(tmp_path, n_train=30, n_test=12, name=name)
    train = TorchvisionDataset(name, str(tmp_path), train=True, download=True)  # files present: no download
    test = TorchvisionDataset(name, str(tmp_path), train=False, download=False)
    assert (len(train), len(test)) == (30, 12)
    for split, dataset in (("train", train), ("t10k", test)):
        for i in (0, len(dataset) - 1):
            image, label = dataset[i]
            assert image.size == (28, 28) and image.mode == "L"
            np.testing.assert_array_equal(_pixels(image), written[f"{split}_images"][i])
            assert label == written[f"{split}_labels"][i]
    assert len(train.classes) == 10


def test_mnist_loader_batches_are_normalised_tensors(tmp_path):
    written = write_mnist(tmp_path, n_train=20, n_test=10)
    loader = MnistDataLoader(str(tmp_path), batch_size=8, shuffle=False, num_workers=0, download=False)
    loader.configure(seed=0)
    loader.set_epoch(1)
    data, target = next(iter(loader))
    assert data.shape == (8, 1, 28, 28) and data.dtype == torch.float32
    expected = (torch.from_numpy(written["train_images"][:8]).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(data[:, 0], expected)
    assert target.tolist() == written["train_labels"][:8].tolist()


def test_cifar10_pickles_load_through_torchvision(tmp_path):
    written = write_cifar10(tmp_path, n_per_batch=10, n_test=14)
    train = TorchvisionDataset("CIFAR10", str(tmp_path), train=True, download=False, verify_checksums=False)
    test = TorchvisionDataset("CIFAR10", str(tmp_path), train=False, download=False, verify_checksums=False)
    assert (len(train), len(test)) == (50, 14)
    assert train.classes == CIFAR_CLASSES
    image, label = train[23]  # third batch file, item 3: the batches are concatenated in order
    assert image.size == (32, 32) and image.mode == "RGB"
    np.testing.assert_array_equal(_pixels(image), written["data_batch_3"][3])
    assert label == written["data_batch_3_labels"][3]
    image, label = test[13]
    np.testing.assert_array_equal(_pixels(image), written["test_batch"][13])
    assert label == written["test_batch_labels"][13]


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    write_cifar10(tmp_path, n_per_batch=2, n_test=2)
    with pytest.raises(UserError, match="verify_checksums: false"):
        TorchvisionDataset("CIFAR10", str(tmp_path), train=True, download=False)


def test_cifar10_validation_subset_is_not_augmented(tmp_path):
    write_cifar10(tmp_path, n_per_batch=8, n_test=4)
    loader = Cifar10DataLoader(str(tmp_path), batch_size=4, validation_split=10, num_workers=0, download=False,
                               verify_checksums=False)
    loader.configure(seed=0)
    valid = loader.split_validation()
    index = int(loader.valid_indices[0])
    assert valid.dataset.data is loader.dataset.data  # one copy of the arrays, two transforms
    raw = torch.from_numpy(np.array(loader.dataset.data[index][0])).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(loader.MEAN)[:, None, None], torch.tensor(loader.STD)[:, None, None]
    for _ in range(3):
        torch.testing.assert_close(valid.dataset[index][0], (raw - mean) / std)
    with torch.random.fork_rng():  # the crop and flip draw from the global RNG
        torch.manual_seed(0)
        augmented = [loader.dataset[index][0] for _ in range(8)]
    assert any(not torch.equal(a, augmented[0]) for a in augmented[1:]), "training images are never augmented"


def test_image_folder_lists_classes_and_reads_pixels(tmp_path):
    written = write_image_folder(tmp_path, classes=("dog", "cat", "10", "9"), per_class=3, size=12)
    dataset = ImageFileDataset(str(tmp_path))
    assert dataset.classes == ["9", "10", "cat", "dog"]  # numeric names in numeric order, then sorted
    assert len(dataset) == 12
    for path, name in written:
        index = next(i for i, (p, _) in enumerate(dataset.samples) if p == str(path))
        image, label = dataset[index]
        assert label == dataset.classes.index(name)
        np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))


def test_image_folder_reads_lazily(tmp_path):
    written = write_image_folder(tmp_path, classes=("a", "b"), per_class=2, size=8)
    dataset = ImageFileDataset(str(tmp_path), grayscale=True)
    # Pixels are read in __getitem__, not in __init__: a file changed or removed after construction
    # shows up as changed or missing.
    first, second = written[0][0], written[1][0]
    Image.fromarray(np.full((8, 8), 123, dtype=np.uint8)).save(first)
    second.unlink()
    index_of = {p: i for i, (p, _) in enumerate(dataset.samples)}
    assert np.asarray(dataset[index_of[str(first)]][0]).tolist() == np.full((8, 8), 123).tolist()
    with pytest.raises(UserError, match="cannot read image"):
        dataset[index_of[str(second)]]
    assert len(dataset) == 4


def test_image_csv(tmp_path):
    written = write_image_folder(tmp_path / "images", classes=("x", "y"), per_class=3, size=8)
    csv_path = write_image_csv(tmp_path / "labels.csv", written[::-1], header=True)
    dataset = ImageFileDataset("unused", csv_file=str(csv_path))
    assert dataset.classes == ["x", "y"] and len(dataset) == 6
    image, label = dataset[0]  # the CSV's first row is the last image written
    assert label == 1
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(written[-1][0]).convert("RGB")))

    no_header = write_image_csv(tmp_path / "plain.csv", written, header=False)
    assert len(ImageFileDataset("unused", csv_file=str(no_header))) == 6

    (tmp_path / "bad.csv").write_text("path,label\nimages/x/000.png\n")
    with pytest.raises(UserError, match=r"bad.csv: row 1 must be `path,label`"):
        ImageFileDataset("unused", csv_file=str(tmp_path / "bad.csv"))
    with pytest.raises(UserError, match=r"labels \['y'\] are not among the classes \['x', 'w'\]"):
        ImageFileDataset("unused", csv_file=str(no_header), classes=["x", "w"])
    with pytest.raises(UserError, match="cannot read CSV"):
        ImageFileDataset("unused", csv_file=str(tmp_path / "missing.csv"))


def test_image_folder_test_split_keeps_training_classes(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=4, size=8)
    write_image_folder(tmp_path / "test", classes=("c",), per_class=2, size=8)  # only one class present
    loader = ImageFolderDataLoader(str(tmp_path / "train"), batch_size=4, image_size=8, test_dir=str(tmp_path / "test"),
                                   training=False, shuffle=False, validation_split=0.0, num_workers=0)
    assert loader.dataset.classes == ["a", "b", "c"]
    assert [loader.dataset[i][1] for i in range(len(loader.dataset))] == [2, 2]
    with pytest.raises(ValueError, match="test_dir or test_csv_file"):
        ImageFolderDataLoader(str(tmp_path / "train"), batch_size=4, training=False)


def test_missing_and_corrupt_data_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"MNIST: cannot load MNIST/raw/\*-ubyte under .*download: true"):
        TorchvisionDataset("MNIST", str(tmp_path / "nowhere"), download=False)
    with pytest.raises(UserError, match="does not exist"):
        ImageFileDataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        ImageFileDataset(str(tmp_path / "empty"))
    write_mnist(tmp_path, n_train=4, n_test=4)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])  # truncated download
    with pytest.raises(UserError, match="truncated or not in the expected format"):
        TorchvisionDataset("MNIST", str(tmp_path), download=False)


def test_missing_data_through_train_py(tmp_path):
    """Exit 2, one line on stderr naming the data directory, no traceback, no run directory."""
    shutil.copy(ROOT / "configs" / "mnist.yaml", tmp_path / "mnist.yaml")
    proc = run_script("train.py", "-c", "mnist.yaml", "trainer.save_dir=saved", "data_loader.args.download=false",
                      cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: MNIST: cannot load MNIST/raw/*-ubyte under 'data/'"), lines
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
def test_unreadable_image_in_a_worker_is_one_line_exit_2(tmp_path):
    # torch re-raises a worker's exception with the worker's traceback inside the message:
    # train.py must still print one line naming the file, and exit 2.
    write_image_folder(tmp_path / "data" / "images" / "train", classes=("a", "b"), per_class=6)
    broken = sorted((tmp_path / "data" / "images" / "train" / "a").iterdir())[0]
    broken.write_bytes(b"not an image")
    proc = run_script("train.py", "-c", str(ROOT / "configs" / "image_folder.yaml"), "trainer.epochs=1",
                      f"trainer.save_dir={tmp_path / 'saved'}", "arch.args.num_classes=2", "metrics=[accuracy]",
                      "data_loader.args.num_workers=2", "data_loader.args.batch_size=4",
                      "data_loader.args.validation_split=2", "data_loader.args.shuffle=false", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and broken.name in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_digits_read_without_importing_scikit_learn_equal_load_digits():
    """DigitsDataset reads scikit-learn's bundled file itself (importing sklearn.datasets costs ~1.5 s of
    CPU per start); the pixels and labels must be load_digits' own, and sklearn must stay unimported."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from data_loader.datasets import _bundled_digits

    pixels, labels = _bundled_digits()
    digits = load_digits()
    assert pixels.dtype == digits.data.dtype and np.array_equal(pixels, digits.data)
    assert np.array_equal(labels, digits.target) and labels.dtype.kind == "i"
    probe = ("import sys; from data_loader.datasets import DigitsDataset; d = DigitsDataset(); "
             "print(len(d), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1437", "False"], out
