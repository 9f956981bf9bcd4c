"""Data loaders: each builds its Dataset(s) and hands them to BaseDataLoader.

`training=False` selects the test split; test.py passes it with shuffle off and no validation split.
"""
from __future__ import annotations

from base import BaseDataLoader
from data_loader.collate import pad_tokens
from data_loader.datasets import (DiabetesDataset, DigitsDataset, ImageFileDataset, ShapesDataset,
                                  TokenSequenceDataset, TorchvisionDataset)


class DigitsDataLoader(BaseDataLoader):
    """scikit-learn's 8x8 digits; offline, in memory."""

    def __init__(self, batch_size: int = 64, shuffle: bool = True, validation_split: float | int = 0.1,
                 num_workers: int = 0, training: bool = True, pin_memory: bool = False):
        self.dataset = DigitsDataset(train=training)
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers, pin_memory=pin_memory)


class DiabetesDataLoader(BaseDataLoader):
    """scikit-learn's diabetes regression data (standardised features and target); offline, in memory."""

    def __init__(self, batch_size: int = 32, shuffle: bool = True, validation_split: float | int = 0.2,
                 num_workers: int = 0, training: bool = True, pin_memory: bool = False):
        self.dataset = DiabetesDataset(train=training)
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers, pin_memory=pin_memory)


class ShapesDataLoader(BaseDataLoader):
    """Generated circle and square images with segmentation masks; batches are dicts {"image", "mask"}.

    test.py (training=False) draws `n_test` images from the test split's seeds.
    """

    def __init__(self, batch_size: int = 16, n_samples: int = 400, n_test: int = 100, image_size: int = 32,
                 max_shapes: int = 3, noise: float = 0.15, shuffle: bool = True,
                 validation_split: float | int = 0.1, num_workers: int = 0, training: bool = True,
                 pin_memory: bool = False):
        self.dataset = ShapesDataset(n_samples if training else n_test, image_size, max_shapes, noise,
                                     train=training)
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers, pin_memory=pin_memory)


class TokenSequenceDataLoader(BaseDataLoader):
    """Generated variable-length token sequences, padded per batch by `pad_tokens` into dicts
    {"tokens", "attention_mask", "label"}. test.py (training=False) draws `n_test` sequences."""

    def __init__(self, batch_size: int = 64, n_samples: int = 2000, n_test: int = 500, vocab_size: int = 12,
                 num_classes: int = 4, min_length: int = 5, max_length: int = 40, shuffle: bool = True,
                 validation_split: float | int = 0.1, num_workers: int = 0, training: bool = True,
                 pin_memory: bool = False):
        self.dataset = TokenSequenceDataset(n_samples if training else n_test, vocab_size, num_classes, min_length,
                                            max_length, train=training)
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers, collate_fn=pad_tokens,
                         pin_memory=pin_memory)


class MnistDataLoader(BaseDataLoader):
    """MNIST through torchvision (same arguments as pytorch-template's MnistDataLoader)."""

    dataset_name = "MNIST"
    MEAN, STD = (0.1307,), (0.3081,)

    def __init__(self, data_dir: str, batch_size: int, shuffle: bool = True, validation_split: float | int = 0.0,
                 num_workers: int = 1, training: bool = True, download: bool = True, pin_memory: bool = False):
        from torchvision import transforms

        self.data_dir = data_dir
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.MEAN, self.STD)])
        self.dataset = TorchvisionDataset(self.dataset_name, data_dir, train=training, transform=transform,
                                          download=download)
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers, pin_memory=pin_memory)


class FashionMnistDataLoader(MnistDataLoader):
    """Fashion-MNIST through torchvision (same file format as MNIST, under <data_dir>/FashionMNIST/raw)."""

    dataset_name = "FashionMNIST"
    MEAN, STD = (0.2860,), (0.3530,)


class Cifar10DataLoader(BaseDataLoader):
    """CIFAR-10 through torchvision; random crop and flip for training, none for validation and test.

    `verify_checksums: false` loads CIFAR-format files whose md5 sums are not the official ones.
    """

    MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, data_dir: str, batch_size: int, shuffle: bool = True, validation_split: float | int = 0.0,
                 num_workers: int = 2, training: bool = True, augment: bool = True, download: bool = True,
                 verify_checksums: bool = True, pin_memory: bool = False):
        from torchvision import transforms

        plain = [transforms.ToTensor(), transforms.Normalize(self.MEAN, self.STD)]
        augmenting = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] + plain
        train_transform = transforms.Compose(augmenting if training and augment else plain)
        self.data_dir = data_dir
        self.dataset = TorchvisionDataset("CIFAR10", data_dir, train=training, transform=train_transform,
                                          download=download, verify_checksums=verify_checksums)
        valid = self.dataset.with_transform(transforms.Compose(plain))  # same arrays, no augmentation
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers, valid_dataset=valid,
                         pin_memory=pin_memory)


class ImageFolderDataLoader(BaseDataLoader):
    """Your own images, read lazily: a folder per class under `data_dir`, or `csv_file` rows `path,label`.

    test.py (training=False) reads `test_dir` or `test_csv_file` with the training classes.
    """

    def __init__(self, data_dir: str, batch_size: int, image_size: int = 32, grayscale: bool = False,
                 csv_file: str | None = None, test_dir: str | None = None, test_csv_file: str | None = None,
                 shuffle: bool = True, validation_split: float | int = 0.1, num_workers: int = 2,
                 training: bool = True, augment: bool = False, pin_memory: bool = False):
        from torchvision import transforms

        plain = [transforms.Resize((image_size, image_size)), transforms.ToTensor()]
        augmenting = [transforms.RandomHorizontalFlip()] + plain
        train_transform = transforms.Compose(augmenting if augment and training else plain)
        train_files = ImageFileDataset(data_dir, csv_file, train_transform, grayscale)
        if training:
            self.dataset = train_files
        else:
            if test_dir is None and test_csv_file is None:
                raise ValueError("the test split needs test_dir or test_csv_file in data_loader.args")
            # The test files are labelled with the training classes, so class indices agree.
            self.dataset = ImageFileDataset(test_dir or data_dir, test_csv_file, train_transform, grayscale,
                                            train_files.classes)
        valid = self.dataset.with_transform(transforms.Compose(plain))
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers, valid_dataset=valid,
                         pin_memory=pin_memory)
