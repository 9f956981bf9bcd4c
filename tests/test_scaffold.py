"""The scaffold end to end: every shipped config trains, the quickstart reaches its accuracy, test.py
evaluates, pytorch-template's config.json trains as it is, and the pure pieces (metrics, epoch
averages, model summary, abstract bases, validation split) match hand-computed values.

Runs go through the real entry points (train.py, test.py) in subprocesses, from a temporary working
directory, on data files written in the real formats (tests/datafiles.py).
"""
from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from base import BaseDataLoader, BaseModel, BaseTrainer
from base.base_data_loader import split_indices
from base.base_model import count_parameters, model_summary
from conftest import ROOT, run_script
from datafiles import write_cifar10, write_image_folder, write_mnist
from model.metric import accuracy, top_k_acc

SHIPPED = sorted(p.name for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def _read_config(path: Path) -> dict:
    import json

    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ---- every shipped config trains --------------------------------------------------------------

def _prepare_data(config: dict, cwd: Path) -> list[str]:
    """Write small files in the format the config's data loader reads; return the overrides it needs."""
    loader, args = config["data_loader"]["type"], config["data_loader"]["args"]
    if loader == "DigitsDataLoader":
        return []
    if loader in ("MnistDataLoader", "FashionMnistDataLoader"):
        write_mnist(cwd / args["data_dir"], n_train=64, n_test=32,
                    name="MNIST" if loader == "MnistDataLoader" else "FashionMNIST")
        return []
    if loader == "Cifar10DataLoader":
        write_cifar10(cwd / args["data_dir"], n_per_batch=16, n_test=16)
        # Generated files cannot match torchvision's md5 sums; 80 images cannot spare 5000 for validation.
        return ["data_loader.args.verify_checksums=false", "data_loader.args.validation_split=16"]
    if loader == "ImageFolderDataLoader":
        classes = tuple(f"class{i}" for i in range(config["arch"]["args"]["num_classes"]))
        write_image_folder(cwd / args["data_dir"], classes=classes, per_class=10, size=16)
        write_image_folder(cwd / args["test_dir"], classes=classes, per_class=3, size=16, seed=100)
        return []
    raise AssertionError(f"no test data for data loader {loader}: add it to _prepare_data")


_RUNS: dict[str, Path] = {}


def shipped_run(name: str, tmp_path_factory) -> Path:
    """Train configs/<name> for one epoch from a fresh working directory (once per session); the run dir."""
    if name not in _RUNS:
        cwd = tmp_path_factory.mktemp(Path(name).stem)
        shutil.copy(ROOT / "configs" / name, cwd / name)
        config = _read_config(cwd / name)
        extra = _prepare_data(config, cwd)
        run_script("train.py", "-c", name, "--run-id", "smoke", "trainer.epochs=1", "trainer.save_dir=saved",
                   *extra, cwd=cwd, check=True)
        _RUNS[name] = cwd / "saved" / config["name"] / "smoke"
    return _RUNS[name]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_trains(name, tmp_path_factory):
    run_dir = shipped_run(name, tmp_path_factory)
    state = _load(run_dir / "checkpoints" / "last.pth")
    assert state["epoch"] == 1 and state["epoch_finished"] and state["global_step"] >= 1
    log = (run_dir / "train.log").read_text()
    assert re.search(r"epoch 1/1 .*loss \d", log), log
    assert (run_dir / ("config.json" if name.endswith(".json") else "config.yaml")).exists()
    assert list(run_dir.glob("events.out.tfevents.*"))


def test_image_folder_test_split(tmp_path_factory):
    """test.py on the image-folder config reads test_dir, labelled with the training folders' classes.
    (CIFAR's and MNIST's test files are read in tests/test_datasets.py.)"""
    run_dir = shipped_run("image_folder.yaml", tmp_path_factory)
    proc = run_script("test.py", "-r", str(run_dir / "checkpoints" / "last.pth"), cwd=run_dir.parent.parent.parent,
                      check=True)
    values = dict(line.split(": ") for line in proc.stdout.strip().splitlines())
    assert list(values)[:2] == ["loss", "accuracy"]
    assert 0.0 <= float(values["accuracy"]) <= 1.0 and math.isfinite(float(values["loss"]))


def test_json_and_yaml_configs_are_the_same_run(tmp_path_factory):
    """configs/digits.json and configs/digits.yaml: same seed, bit-identical weights after an epoch."""
    from_yaml = _load(shipped_run("digits.yaml", tmp_path_factory) / "checkpoints" / "last.pth")
    from_json = _load(shipped_run("digits.json", tmp_path_factory) / "checkpoints" / "last.pth")
    assert from_yaml["config"] == from_json["config"]
    assert from_yaml["state_dict"].keys() == from_json["state_dict"].keys()
    for key, tensor in from_yaml["state_dict"].items():
        assert torch.equal(tensor, from_json["state_dict"][key]), key
    assert from_yaml["global_step"] == from_json["global_step"] > 0


def test_pytorch_template_config_trains_unchanged(tmp_path):
    """victoresque/pytorch-template's config.json, copied byte for byte, with MNIST files in data/.

    The only overrides: trainer.epochs=1 (its 100 epochs) and trainer.save_dir (the run stays in tmp).
    """
    reference = ROOT / "tests" / "fixtures" / "pytorch-template-config.json"
    shared = ROOT.parent / "shared" / "reference" / "pytorch-template-config.json"
    if shared.exists():  # the project's shared reference, where this checkout has it
        assert shared.read_bytes() == reference.read_bytes()
    shutil.copy(reference, tmp_path / "config.json")
    assert (tmp_path / "config.json").read_bytes() == reference.read_bytes()
    write_mnist(tmp_path / "data", n_train=64, n_test=16)
    run_script("train.py", "-c", "config.json", "trainer.epochs=1", f"trainer.save_dir={tmp_path / 'saved'}",
               cwd=tmp_path, check=True)
    (run_dir,) = (tmp_path / "saved" / "Mnist_LeNet").iterdir()
    for name in ("last.pth", "best.pth", "epoch-1.pth"):  # save_period 1, monitor min val_loss
        assert (run_dir / "checkpoints" / name).exists(), name
    state = _load(run_dir / "checkpoints" / "last.pth")
    assert state["arch"] == "MnistModel" and state["epoch"] == 1
    assert math.isfinite(state["monitor_best"])


# ---- the quickstart and test.py ----------------------------------------------------------------

@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> dict:
    """README's first command, `python train.py -c configs/digits.yaml`, full length (only save_dir moved)."""
    cwd = tmp_path_factory.mktemp("quickstart")
    started = time.perf_counter()
    proc = run_script("train.py", "-c", str(ROOT / "configs" / "digits.yaml"), f"trainer.save_dir={cwd / 'saved'}",
                      cwd=cwd, check=True)
    seconds = time.perf_counter() - started
    (run_dir,) = (cwd / "saved" / "digits").iterdir()
    print(f"\nquickstart: {seconds:.1f} s wall")
    return {"run_dir": run_dir, "seconds": seconds, "stdout": proc.stdout, "cwd": cwd}


def test_quickstart_reaches_095(quickstart):
    run_dir = quickstart["run_dir"]
    best = _load(run_dir / "checkpoints" / "best.pth")
    assert best["monitor_best"] >= 0.95, best["monitor_best"]
    logged = re.search(r"best val_accuracy: ([\d.]+) at epoch (\d+)", (run_dir / "train.log").read_text())
    assert logged and float(logged.group(1)) == pytest.approx(best["monitor_best"], abs=1e-4)
    assert int(logged.group(2)) == best["epoch"]
    # The run directory is printed at the start and at the end, with the evaluation command.
    assert f"run directory: {run_dir}" in quickstart["stdout"]
    assert f"python test.py -r {run_dir / 'checkpoints' / 'best.pth'}" in quickstart["stdout"]


def test_test_py_end_to_end(quickstart, tmp_path):
    best = quickstart["run_dir"] / "checkpoints" / "best.pth"
    proc = run_script("test.py", "-r", str(best), cwd=tmp_path, check=True)
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["loss", "accuracy", "top_k_acc"]
    assert all(re.fullmatch(r"\w+: \d+\.\d{4}", line) for line in lines), lines
    values = {k: float(v) for k, v in (line.split(": ") for line in lines)}
    assert values["accuracy"] >= 0.93, values
    assert values["accuracy"] <= values["top_k_acc"] <= 1.0

    # -c: another config (here: fewer metrics) decides what is evaluated; -d picks the device.
    other = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    other["metrics"] = ["accuracy"]
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    proc = run_script("test.py", "-r", str(best), "-c", "other.yaml", "-d", "cpu", cwd=tmp_path, check=True)
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["loss", "accuracy"]
    assert float(lines[1].split(": ")[1]) == values["accuracy"]
    assert list(tmp_path.iterdir()) == [tmp_path / "other.yaml"]  # evaluation writes nothing


# ---- bad input -----------------------------------------------------------------------------------

def _bad_type(tmp_path: Path, key: str, value: str) -> str:
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config[key]["type"] = value
    (tmp_path / "bad_type.yaml").write_text(yaml.safe_dump(config))
    return "bad_type.yaml"


BAD_INPUT = {
    "missing file": (lambda tmp: "absent.yaml", ["absent.yaml", "not found"]),
    "YAML syntax": (lambda tmp: (tmp / "broken.yaml").write_text("name: x\narch: [1,\n") and "broken.yaml",
                    ["broken.yaml", "invalid YAML at line"]),
    "JSON syntax": (lambda tmp: (tmp / "broken.json").write_text('{"name": "x",}') and "broken.json",
                    ["broken.json", "invalid JSON at line 1"]),
    "arch.type names nothing": (lambda tmp: _bad_type(tmp, "arch", "DigitsCN"), ["bad_type.yaml", "arch.type",
                                                                                  "did you mean 'DigitsCNN'"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_config_is_one_line_exit_2(case, tmp_path):
    make, expected = BAD_INPUT[case]
    name = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    proc = run_script("train.py", "-c", name, "trainer.save_dir=saved", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    assert sorted(tmp_path.iterdir()) == before  # no run directory, nothing else written


@pytest.mark.parametrize("key, value", [("data_loader.type", "Nothing"), ("optimizer.type", "Adamm"),
                                        ("lr_scheduler.type", "StepLRR"), ("loss", "nll")])
def test_every_type_name_is_checked(key, value, tmp_path):
    """The same check as arch.type above, for the other names, in-process (the message train.py prints)."""
    from config import load_config
    from errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "configs" / "digits.yaml", [f"{key}={value}"])
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{ROOT / 'configs' / 'digits.yaml'}: {key}: {value!r} is not a")


# ---- metrics and epoch averages ---------------------------------------------------------------

def test_metrics_against_hand_computed_values():
    output = torch.tensor([[0.1, 0.5, 0.2, 0.2],   # top-1: 1, top-3: {1, 2, 3} (tie broken by topk)
                           [0.9, 0.0, 0.05, 0.05],  # top-1: 0, top-3: {0, 2, 3}
                           [0.3, 0.2, 0.4, 0.1],    # top-1: 2, top-3: {2, 0, 1}
                           [0.25, 0.3, 0.15, 0.3]])  # top-1: 1 or 3, top-3: {1, 3, 0}
    target = torch.tensor([1, 1, 0, 2])
    # Row by row: top-1 right, wrong, wrong, wrong -> 1/4. Top-3: 1 in {1,2,3}; 1 not in {0,2,3};
    # 0 in {2,0,1}; 2 not in {1,3,0} -> 2/4.
    assert accuracy(output, target).item() == 0.25
    assert top_k_acc(output, target).item() == 0.5  # k=3 by default
    assert top_k_acc(output[:3], target[:3]).item() == pytest.approx(2 / 3)
    assert top_k_acc(output, target, k=1).item() == 0.25
    assert top_k_acc(output, target, k=2).item() == 0.5  # the third row's second choice is 0, its target
    assert top_k_acc(output, target, k=4).item() == 1.0
    assert top_k_acc(output[:, :2], target.clamp(max=1), k=3).item() == 1.0  # k larger than the classes


class FixedLogits(BaseModel):
    """Outputs log_softmax of its input: predictions are fixed by the data, whatever the weights."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.log_softmax(x + 0 * self.unused, dim=1)


def test_epoch_metrics_are_weighted_by_batch_size(tmp_path):
    from config import load_config
    from trainer.trainer import Trainer

    # 10 samples in batches of 4, 4, 2: the first 8 are classified right, the last 2 wrong.
    inputs = torch.zeros(10, 2)
    inputs[:, 0] = 2.0
    target = torch.tensor([0] * 8 + [1, 1])
    per_sample_loss = F.nll_loss(F.log_softmax(inputs, 1), target, reduction="none")
    config = load_config(ROOT / "configs" / "digits.yaml", [f"trainer.save_dir={tmp_path}", "trainer.epochs=1",
                                                           "trainer.verbosity=0", "metrics=[accuracy]"])
    train_loader = BaseDataLoader(TensorDataset(inputs, target), batch_size=4, shuffle=False)
    train_loader.configure(seed=0)
    valid_loader = DataLoader(TensorDataset(inputs, target), batch_size=4)
    model = FixedLogits()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = Trainer(model, F.nll_loss, [accuracy], optimizer, config, torch.device("cpu"), train_loader,
                      valid_loader)
    assert [len(t) for _, t in valid_loader] == [4, 4, 2]
    for result in (trainer._train_epoch(1), trainer._valid_epoch(1)):
        assert result["accuracy"] == pytest.approx(0.8)  # per batch: 1, 1, 0 -> a batch-count mean is 2/3
        assert result["loss"] == pytest.approx(per_sample_loss.mean().item())


# ---- base classes ---------------------------------------------------------------------------------

class Counted(BaseModel):
    def __init__(self):
        super().__init__()
        self.trainable = nn.Linear(3, 2)  # 6 + 2
        self.frozen = nn.Linear(2, 2)  # 4 + 2, frozen below
        self.frozen.requires_grad_(False)
        self.norm = nn.BatchNorm1d(2)  # 2 + 2 trainable; running_mean 2, running_var 2, num_batches_tracked 1
        self.register_buffer("scale", torch.ones(3))  # persistent
        self.register_buffer("cache", torch.zeros(7), persistent=False)
        self.tied = self.trainable  # the same module twice: counted once

    def forward(self, x):
        return self.norm(self.frozen(self.trainable(x)))


def test_model_summary_counts():
    model = Counted()
    counts = count_parameters(model)
    assert counts == {"trainable": 12, "frozen": 6, "buffers": 5 + 3, "non_persistent_buffers": 7}
    # What a checkpoint holds: parameters and persistent buffers (the tied module's tensors are shared).
    saved = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    assert sum(saved.values()) == 12 + 6 + 8 and not any("cache" in k for k in model.state_dict())
    summary = model.summary()
    assert summary == model_summary(model)
    assert "trainable parameters: 12   frozen parameters: 6   buffers: 8 saved + 7 not saved" in summary
    assert re.search(r"frozen\s+Linear\s+6\s+0", summary) and re.search(r"cache\s+buffer \(not saved\)", summary)


def test_abstract_methods_are_enforced():
    class NoForward(BaseModel):
        pass

    with pytest.raises(TypeError, match="forward"):
        NoForward()

    class OnlyTrain(BaseTrainer):
        def _train_epoch(self, epoch):
            return {}

    for cls in (BaseTrainer, OnlyTrain):
        with pytest.raises(TypeError, match="_valid_epoch"):
            cls(None, None, [], None, {}, None, None)


# ---- validation split -----------------------------------------------------------------------------

def test_validation_split_is_disjoint_and_seeded_without_touching_global_rng():
    import random

    import numpy as np

    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    train, valid = split_indices(100, 0.2, seed=7)
    assert len(valid) == 20 and len(train) == 80
    assert set(train.tolist()).isdisjoint(valid.tolist())
    assert set(train.tolist()) | set(valid.tolist()) == set(range(100))
    assert torch.equal(split_indices(100, 0.2, seed=7)[1], valid)
    assert not torch.equal(split_indices(100, 0.2, seed=8)[1], valid)
    assert len(split_indices(100, 13, seed=7)[1]) == 13  # a count
    assert len(split_indices(100, 0.0, seed=7)[1]) == 0

    # Through a data loader: build, split, iterate an epoch of each; the global RNGs never move.
    data = TensorDataset(torch.arange(50).float(), torch.arange(50))
    loader = BaseDataLoader(data, batch_size=8, validation_split=10,
                            valid_dataset=TensorDataset(-torch.arange(50).float(), torch.arange(50)))
    loader.configure(seed=3)
    loader.set_epoch(1)
    seen_train = torch.cat([x for x, _ in loader])
    valid_loader = loader.split_validation()
    seen_valid = torch.cat([x for x, _ in valid_loader])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state and (np.random.get_state()[1] == numpy_state).all()

    assert sorted(seen_train.long().tolist()) == sorted(set(range(50)) - set(loader.valid_indices.tolist()))
    # The validation subset reads its own dataset (here: negated values, standing in for another transform).
    assert torch.equal(-seen_valid, loader.valid_indices.float())
    assert torch.equal(loader.valid_indices, split_indices(50, 10, seed=3)[1])
