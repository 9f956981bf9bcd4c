"""The example tasks' pieces that need no trainer: datasets (shapes, dtypes, determinism, disjoint test
splits), the padding collate function, the loaders' batches and the models' output shapes."""
from __future__ import annotations

import pytest
import torch

from data_loader.collate import pad_tokens
from data_loader.data_loaders import DiabetesDataLoader, ShapesDataLoader, TokenSequenceDataLoader
from data_loader.datasets import DiabetesDataset, ShapesDataset, TokenSequenceDataset
from model.loss import mse_loss
from model.model import MLP, SequenceClassifier, UNet


def _first_batch(loader):
    loader.configure(seed=0)
    loader.set_epoch(1)
    return next(iter(loader))


def test_diabetes_splits_are_disjoint_and_standardised_on_the_training_part():
    train, test = DiabetesDataset(train=True), DiabetesDataset(train=False)
    assert (len(train), len(test)) == (354, 88)
    features, target = train[0]
    assert features.shape == (10,) and target.shape == (1,)
    assert features.dtype == target.dtype == torch.float32
    torch.testing.assert_close(train.features.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.features.std(0), torch.ones(10), atol=1e-5, rtol=0)
    assert abs(train.targets.mean().item()) < 1e-5 and abs(train.targets.std().item() - 1) < 1e-5
    assert (test.target_mean, test.target_std) == (train.target_mean, train.target_std)
    together = torch.cat([train.features, test.features])
    assert len(torch.unique(together, dim=0)) == 442  # no patient in both splits
    torch.testing.assert_close(DiabetesDataset(train=False).features, test.features, rtol=0, atol=0)


def test_diabetes_batches_match_a_one_output_model():
    data, target = _first_batch(DiabetesDataLoader(batch_size=8))
    output = MLP(in_features=10, hidden=8, num_classes=1)(data)
    assert output.shape == target.shape == (8, 1)
    mse_loss(output, target)
    with pytest.raises(ValueError, match="differs from target shape"):
        mse_loss(output, target[:, 0])  # (8, 1) against (8,) would broadcast to (8, 8)


def test_shapes_items_and_determinism():
    dataset = ShapesDataset(n_samples=20)
    item = dataset[3]
    assert set(item) == {"image", "mask"}
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.long
    assert set(torch.unique(dataset.masks).tolist()) == {0, 1, 2}
    # Image i comes from its own seed: the same whatever the dataset's size.
    again = ShapesDataset(n_samples=5)
    torch.testing.assert_close(again.images, dataset.images[:5], rtol=0, atol=0)
    assert torch.equal(again.masks, dataset.masks[:5])
    test = ShapesDataset(n_samples=20, train=False)
    assert not any(torch.equal(a, b) for a in test.masks for b in dataset.masks)


def test_shapes_loader_yields_dict_batches_and_unet_keeps_the_size():
    batch = _first_batch(ShapesDataLoader(batch_size=4, n_samples=24, n_test=8))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["mask"].shape == (4, 32, 32)
    logits = UNet(in_channels=1, num_classes=3, channels=4)(batch["image"])
    assert logits.shape == (4, 3, 32, 32)
    torch.nn.functional.cross_entropy(logits, batch["mask"])  # (N, K, H, W) against (N, H, W)
    assert len(ShapesDataLoader(batch_size=4, n_samples=24, n_test=8, training=False).dataset) == 8
    assert UNet(in_channels=3, num_classes=5, channels=4)(torch.randn(2, 3, 16, 24)).shape == (2, 5, 16, 24)


def test_token_sequences_are_labelled_by_their_most_frequent_class_token():
    dataset = TokenSequenceDataset(n_samples=200, vocab_size=12, num_classes=4, min_length=5, max_length=40)
    lengths = {len(dataset[i]["tokens"]) for i in range(len(dataset))}
    assert min(lengths) >= 5 and max(lengths) <= 40 and len(lengths) > 10
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["tokens"].dtype == torch.long and item["label"].dtype == torch.long
        assert item["tokens"].min() >= 1 and item["tokens"].max() <= 12  # 0 is left for padding
        counts = torch.bincount(item["tokens"], minlength=13)[1:5]
        assert counts.argmax() == item["label"] and (counts == counts.max()).sum() == 1
    assert len(set(dataset.labels.tolist())) == 4
    again = TokenSequenceDataset(n_samples=10)
    assert all(torch.equal(again[i]["tokens"], dataset[i]["tokens"]) for i in range(10))
    test = TokenSequenceDataset(n_samples=200, train=False)
    assert not any(torch.equal(a, b) for a in test.sequences for b in dataset.sequences if len(a) == len(b))


def test_pad_tokens_pads_to_the_longest_and_masks_the_padding():
    samples = [{"tokens": torch.tensor([3, 1, 2]), "label": torch.tensor(1)},
               {"tokens": torch.tensor([5]), "label": torch.tensor(0)},
               {"tokens": torch.tensor([4, 4, 4, 4, 4]), "label": torch.tensor(3)}]
    batch = pad_tokens(samples)
    assert batch["tokens"].tolist() == [[3, 1, 2, 0, 0], [5, 0, 0, 0, 0], [4, 4, 4, 4, 4]]
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 5]
    assert batch["attention_mask"].tolist()[0] == [True, True, True, False, False]
    assert batch["label"].tolist() == [1, 0, 3]


def test_sequence_loader_and_model_ignore_the_padding():
    loader = TokenSequenceDataLoader(batch_size=16, n_samples=64, n_test=16)
    batch = _first_batch(loader)
    assert set(batch) == {"tokens", "attention_mask", "label"}
    assert batch["tokens"].shape[1] == batch["attention_mask"].sum(1).max()  # padded to the batch's longest
    valid = next(iter(loader.split_validation()))  # the validation loader pads too
    assert valid["tokens"].shape == valid["attention_mask"].shape
    model = SequenceClassifier(vocab_size=12, num_classes=4).eval()
    logits = model(batch["tokens"], batch["attention_mask"])
    assert logits.shape == (16, 4)
    # More padding (any token under a False mask) changes nothing.
    longer = torch.cat([batch["tokens"], torch.full((16, 7), 9)], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.zeros(16, 7, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(longer, mask), logits)
