"""Any task (issue 14): batches of any structure, one `step` to override, epoch-level metrics equal to
scikit-learn's on the same predictions (one process, two DDP processes, across a mid-epoch stop), the
pytorch-template-style `_train_epoch` refused, sample views by task, non-finite state kept out of
checkpoints (issue 20, item 3)."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from conftest import PYTHON, ROOT, run_script
from base import BaseDataLoader, BaseModel
from config import check_config
from errors import ConfigError, TrainingError
from runtime.batch import batch_size, to_device
from trainer.trainer import Trainer

TORCHRUN = Path(PYTHON).with_name("torchrun")
Pair = collections.namedtuple("Pair", "image mask")


@dataclasses.dataclass
class Sample:
    tokens: torch.Tensor
    name: str


def test_batches_of_any_structure_move_to_the_device_as_they_are():
    batch = {"pair": Pair(torch.zeros(4, 3), torch.ones(4, dtype=torch.long)), "ids": ["a", "b", "c", "d"],
             "nested": [(torch.arange(4), 7)], "sample": Sample(torch.ones(4, 2), "x"), "weight": 0.5}
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved["pair"], Pair) and moved["pair"].image.device.type == "meta"
    assert moved["ids"] == ["a", "b", "c", "d"] and moved["weight"] == 0.5
    assert isinstance(moved["nested"], list) and isinstance(moved["nested"][0], tuple) and moved["nested"][0][1] == 7
    assert moved["nested"][0][0].device.type == "meta"
    assert isinstance(moved["sample"], Sample) and moved["sample"].tokens.device.type == "meta"
    assert moved["sample"].name == "x"
    assert batch["pair"].image.device.type == "cpu"  # the original is untouched
    assert batch_size(moved) == 4
    plain = to_device((torch.zeros(3, 2), torch.zeros(3)), torch.device("meta"))
    assert type(plain) is tuple and all(t.device.type == "meta" for t in plain)
    with pytest.raises(ValueError, match="batch_size"):
        batch_size({"ids": ["a"]})


# ---- a small config and in-process trainers ---------------------------------------------------------

def make_config(tmp_path, metrics, **trainer) -> dict:
    return check_config({
        "name": "tasks", "seed": 0, "device": "cpu",
        "arch": {"type": "MLP", "args": {"in_features": 6, "hidden": 16, "num_classes": 3, "depth": 1}},
        "data_loader": {"type": "DigitsDataLoader", "args": {"batch_size": 8}},
        "optimizer": {"type": "SGD", "args": {"lr": 0.1}},
        "loss": "cross_entropy", "metrics": metrics,
        "trainer": {"epochs": 2, "save_dir": str(tmp_path), "verbosity": 0, "tensorboard": False,
                    "train_metric_batches": 0, **trainer},
    })


def blobs(n: int, seed: int = 0, regression: bool = False) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    if regression:
        return TensorDataset(x, (x @ torch.arange(1.0, 7.0) / 6 + 0.3 * torch.randn(n, generator=generator))[:, None])
    return TensorDataset(x, (x[:, 0] + 0.8 * torch.randn(n, generator=generator) > 0).long()
                         + (x[:, 1] > 0.7).long())


class Recording(Trainer):
    """The default step, keeping every training prediction (what the epoch's metrics saw)."""

    seen: list

    def step(self, batch):
        out = super().step(batch)
        if self.model.training:
            self.seen.append((out["output"].detach().clone(), out["target"].clone()))
        return out


def sklearn_values(seen: list, regression: bool = False) -> dict:
    from sklearn.metrics import f1_score, r2_score, roc_auc_score

    output = torch.cat([o for o, _ in seen]).double()
    target = torch.cat([t for _, t in seen])
    if regression:
        return {"r2_score": r2_score(target.numpy(), output.numpy())}
    probs = output.softmax(dim=1).numpy()
    return {"multiclass_f1_score": f1_score(target.numpy(), output.argmax(1).numpy(), average="macro"),
            "multiclass_auroc": roc_auc_score(target.numpy(), probs, multi_class="ovr", average="macro")}


CLASSIFICATION = [{"type": "MulticlassF1Score", "args": {"num_classes": 3, "average": "macro"}},
                  {"type": "MulticlassAUROC", "args": {"num_classes": 3}}]


def build(config, dataset, trainer_cls=Recording, run_dir=None, stop_signal=None, model=None):
    from config.build import build_loss, build_metrics, build_optimizer

    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, dataset.tensors[1].shape[1]
                                                                          if dataset.tensors[1].dim() > 1 else 3))
    loader = BaseDataLoader(dataset, batch_size=8, shuffle=True)
    loader.configure(seed=0)
    trainer = trainer_cls(model, build_loss(config), build_metrics(config), build_optimizer(config, model), config,
                          torch.device("cpu"), loader, None, run_dir=run_dir, stop_signal=stop_signal)
    trainer.seen = []
    return trainer


def test_epoch_metrics_equal_scikit_learn_on_the_same_predictions(tmp_path):
    trainer = build(make_config(tmp_path, CLASSIFICATION), blobs(203))  # 25 batches of 8 and one of 3
    result = trainer._train_epoch(1)
    expected = sklearn_values(trainer.seen)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-6), name
    # A mean of per-batch F1 values (what the scaffold reported before) is not the epoch's F1.
    from sklearn.metrics import f1_score

    per_batch = sum(f1_score(t, o.argmax(1), average="macro") * len(t) for o, t in trainer.seen) / 203
    assert abs(per_batch - expected["multiclass_f1_score"]) > 1e-3

    config = make_config(tmp_path, [{"type": "R2Score"}])
    config["loss"] = "mse_loss"
    trainer = build(config, blobs(203, regression=True))
    result = trainer._train_epoch(1)
    assert result["r2_score"] == pytest.approx(sklearn_values(trainer.seen, regression=True)["r2_score"], abs=1e-6)


def test_metrics_resume_bit_exact_after_a_mid_epoch_stop(tmp_path):
    """A real SIGTERM in the middle of epoch 2 saves the epoch's metric states; the resumed run reports the
    same epoch values, bit for bit, as the run that was never stopped."""
    from checkpoint import load_checkpoint
    from runtime.signals import StopSignal

    config = make_config(tmp_path, CLASSIFICATION + ["accuracy"], save_every_steps=0)

    class Reporting(Recording):
        def on_validation_end(self, epoch, result):
            self.results.append(dict(result))

    def run(run_dir, stop_at=None, resume=None):
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        stop = StopSignal().install()
        trainer = build(config, blobs(203), Reporting, run_dir=run_dir, stop_signal=stop)
        trainer.results = []
        if stop_at:
            trainer.on_batch_end = lambda batch_idx, loss: (trainer.global_step == stop_at
                                                            and os.kill(os.getpid(), signal.SIGTERM))
        if resume:
            trainer.resume(load_checkpoint(resume))
        try:
            trainer.train()
        finally:
            stop.uninstall()
        return trainer

    whole = run(tmp_path / "whole")
    from errors import Interrupted

    with pytest.raises(Interrupted):
        run(tmp_path / "stopped", stop_at=26 + 11)  # epoch 2, batch 11 of 26
    stopped = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pth")
    assert not stopped["epoch_finished"] and stopped["batch_in_epoch"] == 11
    assert stopped["ranks"][0]["epoch_totals"]["objects"]["multiclass_auroc"]["state"]["preds"]  # saved states
    resumed = run(tmp_path / "stopped", resume=tmp_path / "stopped" / "checkpoints" / "last.pth")
    assert resumed.results == whole.results[1:]  # epoch 2's values, exactly
    assert whole.results[1]["multiclass_auroc"] == pytest.approx(
        sklearn_values(whole.seen[26:])["multiclass_auroc"], abs=1e-6)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
@pytest.mark.slow
def test_epoch_metrics_over_two_processes_equal_scikit_learn_without_the_padding(tmp_path):
    """101 samples on 2 processes: rank 1's last batch repeats one sample; metrics leave it out."""
    out = tmp_path / "seen"
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "workers" / "ddp_epoch_metrics.py"), str(out)],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    seen = []
    for rank in (0, 1):
        output, target = torch.load(out / f"rank{rank}.pth", weights_only=True)
        real = len(range(rank, 101, 2))  # the padding comes last
        assert len(target) == 51
        seen.append((output[:real], target[:real]))
    expected = sklearn_values(seen)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-6), name
    padded = sklearn_values([(torch.load(out / f"rank{r}.pth", weights_only=True)) for r in (0, 1)])
    assert any(abs(padded[k] - expected[k]) > 1e-6 for k in expected)  # the padding would have shown


# ---- the step: override, errors, the refused pytorch-template epoch loop ------------------------------

class DictShapes(Dataset):
    """Dict samples: {"image": (1, 8, 8), "mask": (8, 8)}, the mask marks pixels above 0."""

    def __init__(self, n: int = 64):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(n, 1, 8, 8, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "mask": (self.images[index, 0] > 0).long(), "id": f"s{index}"}


class TinySegmenter(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class SegmentationStep(Trainer):
    def step(self, batch):
        output = self.model(batch["image"])
        return {"loss": F.cross_entropy(output, batch["mask"]), "output": output, "target": batch["mask"]}


def test_a_dict_batch_trains_and_evaluates_through_one_overridden_step(tmp_path):
    from config.build import build_metrics

    config = make_config(tmp_path, [{"type": "MulticlassJaccardIndex", "args": {"num_classes": 2}}], epochs=3)
    model = TinySegmenter()
    loader = BaseDataLoader(DictShapes(), batch_size=16, validation_split=16)
    loader.configure(seed=0)
    trainer = SegmentationStep(model, None, build_metrics(config), torch.optim.SGD(model.parameters(), lr=0.5),
                               config, torch.device("cpu"), loader, loader.split_validation())
    first = trainer.evaluate(trainer.valid_data_loader)
    trainer.train()
    last = trainer.evaluate(trainer.valid_data_loader)
    assert last["multiclass_jaccard_index"] > max(first["multiclass_jaccard_index"] + 0.2, 0.8)
    assert last["loss"] < first["loss"]

    # The default step on dict batches: one clear line, not "'str' object has no attribute 'to'".
    plain = Trainer(model, F.cross_entropy, [], torch.optim.SGD(model.parameters(), lr=0.1), config,
                    torch.device("cpu"), loader)
    with pytest.raises(ConfigError, match=r"default Trainer.step expects \(input, target\) batches, got "
                                          r"dict\(image: \(16, 1, 8, 8\) float32, mask: \(16, 8, 8\) int64, "
                                          r"id: list\(16 x str\)\); override step"):
        plain._train_epoch(1)


def test_a_step_that_returns_the_wrong_thing_is_one_line(tmp_path):
    config = make_config(tmp_path, [])

    class NoDict(Recording):
        def step(self, batch):
            return self.criterion(self.model(batch[0]), batch[1])

    class Detached(Recording):
        def step(self, batch):
            return {"loss": self.criterion(self.model(batch[0]), batch[1]).detach()}

    for cls, message in ((NoDict, "must return a dict"), (Detached, "does not require grad")):
        with pytest.raises(ConfigError, match=message):
            build(config, blobs(32), cls)._train_epoch(1)


LEGACY = '''
from base import BaseTrainer
from trainer.trainer import Trainer


class LegacyTrainer(Trainer):
    """pytorch-template's Trainer._train_epoch, ported as a user would."""

    def _train_epoch(self, epoch):
        self.model.train()
        for batch_idx, (data, target) in enumerate(self.data_loader):
            data, target = data.to(self.device), target.to(self.device)
            self.optimizer.zero_grad()
            output = self.model(data)
            loss = self.criterion(output, target)
            loss.backward()
            self.optimizer.step()
        log = {"loss": loss.item()}
        if self.valid_data_loader is not None:
            log.update({"val_" + k: v for k, v in self._valid_epoch(epoch).items()})
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return log


class TemplateTrainer(BaseTrainer):
    """Subclassing the base class directly, as pytorch-template's users do."""

    def _train_epoch(self, epoch):
        return {}

    def _valid_epoch(self, epoch):
        return {}
'''


@pytest.fixture(scope="module")
def new_project(tmp_path_factory) -> Path:
    """One `new_project.py` copy of the scaffold for the module; each test edits its own copy of it."""
    project = tmp_path_factory.mktemp("new_project") / "project"
    run_script("new_project.py", str(project), check=True)
    return project


@pytest.mark.parametrize("name", ["LegacyTrainer", "TemplateTrainer"])
def test_a_pytorch_template_train_epoch_is_refused_with_the_method_to_override(tmp_path, name, new_project):
    project = Path(shutil.copytree(new_project, tmp_path / "project", symlinks=True))
    (project / "trainer" / "legacy.py").write_text(LEGACY)
    proc = subprocess.run([PYTHON, "train.py", "-c", "configs/digits.yaml", f"trainer.type={name}",
                           f"trainer.save_dir={tmp_path / 'saved'}", "trainer.epochs=1"],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "override step(self, batch)" in proc.stderr and name in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "saved").exists()  # refused before anything was written


# ---- metrics in training and test.py alike ------------------------------------------------------------

@pytest.mark.slow
def test_a_float_metric_works_in_training_and_in_test_py(tmp_path, new_project):
    project = Path(shutil.copytree(new_project, tmp_path / "project", symlinks=True))
    with open(project / "model" / "metric.py", "a") as handle:
        handle.write("\n\ndef error_rate(output, target):\n"
                     "    return float((output.argmax(dim=1) != target).float().mean())  # a float, not a tensor\n")
    common = [f"trainer.save_dir={tmp_path / 'saved'}", "trainer.epochs=1", "--run-id", "f",
              "metrics=[accuracy, error_rate, {type: MulticlassF1Score, args: {num_classes: 10}, name: f1}]"]
    train = subprocess.run([PYTHON, "train.py", "-c", "configs/digits.yaml", *common], cwd=project,
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    log = (tmp_path / "saved" / "digits" / "f" / "train.log").read_text()
    assert re.search(r"epoch 1/1 val .*error_rate", log), log[-1500:]
    test = subprocess.run([PYTHON, "test.py", "-r", str(tmp_path / "saved" / "digits" / "f")], cwd=project,
                          capture_output=True, text=True, timeout=300)
    assert test.returncode == 0, test.stderr
    values = dict(line.split(": ") for line in test.stdout.strip().splitlines())
    assert set(values) == {"loss", "accuracy", "error_rate", "f1"}
    assert float(values["accuracy"]) + float(values["error_rate"]) == pytest.approx(1.0, abs=2e-4)


def test_duplicate_metric_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics\[1\]: a second metric named 'accuracy'"):
        make_config(tmp_path, ["accuracy", "accuracy"])
    with pytest.raises(ConfigError, match="a second metric named 'multiclass_f1_score'"):
        make_config(tmp_path, [{"type": "MulticlassF1Score", "args": {"num_classes": 3}},
                               {"type": "MulticlassF1Score", "args": {"num_classes": 3, "average": "micro"}}])
    make_config(tmp_path, [{"type": "MulticlassF1Score", "args": {"num_classes": 3}},
                           {"type": "MulticlassF1Score", "args": {"num_classes": 3, "average": "micro"},
                            "name": "f1_micro"}])
    with pytest.raises(ConfigError, match=r"metrics\[0\]\.args: MulticlassF1Score\(\) needs argument 'num_classes'"):
        make_config(tmp_path, [{"type": "MulticlassF1Score", "args": {"num_clases": 3}}])


# ---- non-finite state never reaches a checkpoint (issue 20, item 3) ----------------------------------

def test_a_non_finite_buffer_or_optimizer_state_never_reaches_a_checkpoint(tmp_path):
    from checkpoint import load_checkpoint

    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.norm = nn.Linear(6, 3), nn.BatchNorm1d(6)

        def forward(self, x):
            return self.linear(self.norm(x))

    data = blobs(64)
    data.tensors[0][5] *= 1e30  # one sample: BatchNorm's running_var overflows, the loss stays finite
    for allowed in ([], ["norm.running_*"]):
        run_dir = tmp_path / f"bn{len(allowed)}"
        (run_dir / "checkpoints").mkdir(parents=True)
        trainer = build(make_config(tmp_path, [], allow_nonfinite_buffers=allowed), data, Trainer, run_dir=run_dir,
                        model=Normed())
        if not allowed:
            with pytest.raises(TrainingError, match="non-finite buffer 'norm.running_var'"):
                trainer.train()
            assert not (run_dir / "checkpoints" / "last.pth").exists()
        else:
            trainer.train()
            state = load_checkpoint(run_dir / "checkpoints" / "last.pth")["state_dict"]
            assert not torch.isfinite(state["norm.running_var"]).all()

    config = make_config(tmp_path, [])
    config["optimizer"] = {"type": "Adam", "args": {"lr": 1e-3}}

    class HugeGradient(Trainer):
        def step(self, batch):
            output = self.model(batch[0])
            # A finite loss whose gradient (1e30) overflows Adam's exp_avg_sq (its square) to inf.
            return {"loss": output.mean() * 1e30 - (output.mean() * 1e30).detach(), "output": output,
                    "target": batch[1]}

    run_dir = tmp_path / "adam"
    (run_dir / "checkpoints").mkdir(parents=True)
    trainer = build(config, blobs(64), HugeGradient, run_dir=run_dir)
    with pytest.raises(TrainingError, match="non-finite optimizer state 'exp_avg_sq'"):
        trainer.train()
    assert not (run_dir / "checkpoints" / "last.pth").exists()


# ---- sample views by task -----------------------------------------------------------------------------

def test_views_follow_the_task_and_spread_over_the_split(caplog):
    from logger.views import SampleViews

    # A split sorted by class (a folder dataset): 3 classes of 40; the first 10 would show only class 0.
    target = torch.arange(3).repeat_interleave(40)
    images = torch.rand(120, 1, 8, 8)
    views = SampleViews(120)
    assert len(views.wanted) == 10 and views.wanted[0] == 0 and views.wanted[-1] == 119
    for start in range(0, 120, 32):
        views.collect(images[start:start + 32], target[start:start + 32], F.one_hot(target[start:start + 32], 3) * 5.0)
    picture, kind = views.picture()
    shown = torch.cat([row[1] for row in views.rows])  # spread over the classes, in class order
    assert sorted(shown.tolist()) == shown.tolist() and set(shown.tolist()) == {0, 1, 2} and len(shown) == 10
    assert kind == "classification" and picture.dtype == torch.uint8 and picture.shape[2] == 3

    segmentation = SampleViews(10)
    masks = torch.randint(0, 3, (10, 8, 8))
    segmentation.collect(torch.rand(10, 1, 8, 8), masks, F.one_hot(masks, 3).permute(0, 3, 1, 2).float())
    picture, kind = segmentation.picture()
    assert kind == "segmentation" and 2 * picture.shape[0] < picture.shape[1]  # rows: image, true, predicted
    regression = SampleViews(50)
    regression.collect(torch.rand(50, 6), torch.randn(50, 1), torch.randn(50, 1))
    picture, kind = regression.picture()
    assert kind == "regression" and picture.shape[1] == 256 and 256 < picture.shape[0] < 300  # plot and caption

    tokens = SampleViews(8)
    tokens.collect(torch.randint(0, 9, (8, 5)), torch.randint(0, 2, (8,)), torch.randn(8, 2))
    assert tokens.picture() == (None, "classification of inputs that are not images (shape (8, 5))")
    other = SampleViews(8)
    other.collect(torch.rand(8, 3), torch.rand(8, 4), torch.rand(8, 4, 2))
    assert other.picture()[0] is None and "fit no view" in other.picture()[1]

    from logger import NullWriter
    from logger.logging import NAME

    with caplog.at_level("INFO", logger=NAME):
        other.draw(NullWriter(), "samples/test-none", 1)
        other.draw(NullWriter(), "samples/test-none", 2)
    lines = [r.message for r in caplog.records if "samples/test-none" in r.message]
    assert len(lines) == 1 and "no sample view" in lines[0]  # one line, not one per epoch


@pytest.mark.slow
def test_a_regression_run_shows_predicted_against_true_in_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train

    # train.main in this process, as `python train.py` calls it: what is checked is the event files, not
    # the process (an interpreter of its own would cost ~3.5 s of CPU importing torch).
    code = train.main(["-c", str(ROOT / "configs" / "diabetes_regression.yaml"), "trainer.epochs=2",
                       f"trainer.save_dir={tmp_path}", "--run-id", "r"])
    assert code == 0, capsys.readouterr().err
    events = EventAccumulator(str(tmp_path / "diabetes_regression" / "r"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples/val")
    assert len(images) == 2 and images[0].width == 256
    for split, names in (("val", {"r2_score", "mean_absolute_error"}), ("train", {"r2_score"})):
        split_events = EventAccumulator(str(tmp_path / "diabetes_regression" / "r" / split))
        split_events.Reload()
        assert names <= set(split_events.Tags()["scalars"])


def test_a_metric_cannot_take_the_name_of_the_loss(tmp_path):
    for name in ("loss", "val_accuracy"):
        with pytest.raises(ConfigError, match=f"the name '{name}' is the run's own"):
            make_config(tmp_path, ["accuracy", {"type": "MulticlassAccuracy", "args": {"num_classes": 3},
                                                "name": name}])
