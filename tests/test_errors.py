"""Issue 15: errors a user can act on, and a run record that says how the run ended.

Each test runs the real train.py in a project made by new_project.py, with the user's own (broken) classes
written into it, as a user would.
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, ROOT, run_script
from datafiles import write_image_folder
from test_monitoring import hparams_record

USER_MODELS = '''

class BadShapes(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(60, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))  # digits have 64 pixels, not 60


class OneOutput(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 1)

    def forward(self, x):
        return self.fc(x.flatten(1))  # (B, 1) against a (B,) target


class FailsLater(BaseModel):
    def __init__(self, fail_after: int = 30):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.fail_after = fail_after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.fail_after:
            raise ValueError(f"call {int(self.calls)} went wrong")
        return torch.log_softmax(self.fc(x.flatten(1)), dim=1)
'''

USER_LOSSES = '''

def plain_mse(output, target):
    return F.mse_loss(output, target.float())


def squeezing_bce(output, target):
    return F.binary_cross_entropy_with_logits(output.squeeze(1), (target > 4).float())


def manual_mse(output, target):
    return ((output - target.float()) ** 2).mean()
'''

USER_METRICS = '''

def target_mean(output, target):
    return torch.mean(target)  # fails on a Long target


def per_sample(output, target):
    return (output.argmax(1) == target).float()
'''

DROP_LAST_LOADER = '''
from torch.utils.data import TensorDataset

from base import BaseDataLoader


class TinyDataLoader(BaseDataLoader):
    def __init__(self, batch_size: int = 8, drop_last: bool = False, n: int = 40):
        x, y = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 10
        super().__init__(TensorDataset(x, y), batch_size, validation_split=0.2, drop_last=drop_last)
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("errors") / "project"
    run_script("new_project.py", str(project), check=True)
    for name, text in (("model/model.py", USER_MODELS), ("model/loss.py", USER_LOSSES),
                       ("model/metric.py", USER_METRICS)):
        with open(project / name, "a") as handle:
            handle.write(text)
    (project / "data_loader" / "tiny.py").write_text("import torch\n" + DROP_LAST_LOADER)
    return project


# One finished run, and the same run trained on by `-r RUN trainer.epochs=2`, shared by the tests that only
# need "a finished run" (each train.py start costs ~3.5 s of CPU): the tests that change a run work on a copy.
@pytest.fixture(scope="module")
def finished(project, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One epoch of the user's own code: FailsLater (it never fails: 100000 calls) trained by UserTrainer, which
    logs the run's user values; a checkpoint every epoch: SAVE/digits/f. (run directory, its process)"""
    (project / "trainer" / "uses_user.py").write_text(
        "from trainer.trainer import Trainer\n\n\n"
        "class UserTrainer(Trainer):\n"
        "    def on_train_start(self):\n"
        "        self.logger.info(f\"user values: {self.config['user']}\")\n")
    save = tmp_path_factory.mktemp("finished") / "saved"
    proc = train(project, save, "-c", "configs/digits.yaml", "trainer.epochs=1", "trainer.save_period=1",
                 "arch.type=FailsLater", "arch.args={fail_after: 100000}", "metrics=[accuracy]",
                 "trainer.type=UserTrainer", "user={alpha: 0.5, tags: [a, b]}", "user.beta=3", "--run-id", "f")
    assert proc.returncode == 0, proc.stderr
    return save / "digits" / "f", proc


@pytest.fixture(scope="module")
def extended(project, finished, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of `finished` resumed with trainer.epochs=2 (what the "nothing to do" message proposes, as 11):
    epoch-1.pth at step 20, last.pth at step 40. (run directory, the resume's process)"""
    save = tmp_path_factory.mktemp("extended") / "saved"
    run = copy_run(finished[0], save)
    return run, train(project, save, "-r", str(run), "trainer.epochs=2")


def copy_run(run: Path, save: Path) -> Path:
    """A copy of a shared run at the same place under another save_dir (SAVE/digits/<run id>)."""
    return Path(shutil.copytree(run, save / "digits" / run.name))


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def train(project: Path, save_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "train.py", *args, f"trainer.save_dir={save_dir}", "trainer.verbosity=1"],
                          cwd=project, capture_output=True, text=True, timeout=timeout)


def one_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "UserWarning" not in line
             and not line.startswith("  ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- 1. the sanity pass: user mistakes stop the run before anything is written ---------------------

def test_too_few_classes_names_the_loss_and_the_key_to_check(project, tmp_path):
    proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "arch.args.num_classes=5")
    assert proc.returncode == 2
    line = line_of(project / "model" / "loss.py", "F.nll_loss")
    assert one_error(proc) == (
        "error: the first training batch (StackedBatch((64, 1, 8, 8) float32, (64,) int64)): loss failed at "
        f"model/loss.py:{line}: IndexError: Target 6 is out of bounds; the model has fewer outputs than the data "
        "has classes: check arch.args (e.g. num_classes) (checked before training; nothing was written)")
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
def test_an_image_folder_with_more_classes_than_the_model_stops_before_training(project, tmp_path):
    write_image_folder(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=6, size=16)
    proc = train(project, tmp_path / "saved", "-c", "configs/image_folder.yaml", "arch.args.num_classes=2",
                 f"data_loader.args.data_dir={tmp_path / 'images'}",
                 "data_loader.args.test_dir=null", "data_loader.args.image_size=16", "data_loader.args.num_workers=0",
                 "data_loader.args.batch_size=16", "device=cpu")
    assert proc.returncode == 2, proc.stderr
    error = one_error(proc)
    assert error.startswith("error: the first training batch (")
    assert "IndexError: Target 2 is out of bounds; the model has fewer outputs than the data has classes: " \
           "check arch.args (e.g. num_classes) (checked before training; nothing was written)" in error
    assert not (tmp_path / "saved").exists()


def test_a_shape_bug_in_forward_names_the_model_and_its_line(project, tmp_path):
    proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "arch.type=BadShapes", "arch.args={}")
    assert proc.returncode == 2
    line = line_of(project / "model" / "model.py", "# digits have 64 pixels, not 60")
    assert one_error(proc) == (
        "error: the first training batch (StackedBatch((64, 1, 8, 8) float32, (64,) int64)): model forward failed "
        f"at model/model.py:{line}: RuntimeError: mat1 and mat2 shapes cannot be multiplied (64x64 and 60x10); "
        "a layer's input size does not fit the data: check the model against the input shape (checked before "
        "training; nothing was written)")
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
def test_a_metric_that_fails_on_the_target_is_named(project, tmp_path):
    proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "metrics=[accuracy, target_mean]")
    assert proc.returncode == 2
    line = line_of(project / "model" / "metric.py", "fails on a Long target")
    error = one_error(proc)
    assert error.startswith("error: the first training batch (StackedBatch((64, 1, 8, 8) float32, (64,) int64)): "
                            f"metric 'target_mean' failed at model/metric.py:{line}: RuntimeError: mean(): ")
    assert error.endswith("Got: Long (checked before training; nothing was written)")
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
def test_an_output_that_broadcasts_against_the_target_is_reported_not_warned(project, tmp_path):
    proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "arch.type=OneOutput", "arch.args={}",
                 "loss=plain_mse", "metrics=[]", "trainer.monitor=off")
    assert proc.returncode == 2
    line = line_of(project / "model" / "loss.py", "F.mse_loss(output, target.float())")
    assert one_error(proc) == (
        "error: the first training batch (StackedBatch((64, 1, 8, 8) float32, (64,) int64)): the loss got output "
        f"and target of shapes (64, 1) and (64,), which broadcast at model/loss.py:{line} to (64, 64): every output "
        "is compared with every target; make the shapes equal (e.g. output.squeeze(1) in the model or the step) "
        "(checked before training; nothing was written)")
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
def test_a_loss_that_reshapes_the_output_itself_is_not_refused_and_a_hand_written_one_is(project, tmp_path):
    common = ["-c", "configs/digits.yaml", "arch.type=OneOutput", "arch.args={}", "metrics=[]", "trainer.monitor=off",
              "--dry-run"]
    assert train(project, tmp_path / "saved", *common, "loss=squeezing_bce").returncode == 0
    proc = train(project, tmp_path / "saved", *common, "loss=manual_mse")
    line = line_of(project / "model" / "loss.py", "((output - target.float()) ** 2)")
    assert proc.returncode == 2 and f"which broadcast at model/loss.py:{line} to (64, 64)" in one_error(proc)


@pytest.mark.slow
def test_a_metric_returning_one_value_per_sample_is_refused_before_training(project, tmp_path):
    proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "metrics=[per_sample]",
                 "trainer.monitor=off")
    assert proc.returncode == 2
    assert one_error(proc) == (
        "error: the first training batch (StackedBatch((64, 1, 8, 8) float32, (64,) int64)): metric 'per_sample' "
        "returned a tensor of shape (64,); a function metric returns one number per batch (e.g. the batch mean) "
        "(checked before training; nothing was written)")
    assert not (tmp_path / "saved").exists()


@pytest.mark.slow
def test_a_trainer_init_that_fails_is_one_line_naming_its_line(project, tmp_path):
    (project / "trainer" / "reads_user.py").write_text(
        "from trainer.trainer import Trainer\n\n\n"
        "class ReadsUser(Trainer):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        self.margin = self.config['user']['margin']\n")
    proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "trainer.type=ReadsUser", "user.margn=1")
    assert proc.returncode == 2
    assert one_error(proc) == ("error: trainer.type: ReadsUser() failed at trainer/reads_user.py:7: KeyError: "
                               "'margin'")


def test_the_sanity_pass_leaves_weights_buffers_and_random_streams_alone():
    """Directly: the pass runs a BatchNorm model and a random augmentation, and changes nothing."""
    import copy
    import random

    import numpy as np
    import torch

    from config import load_config
    from config.build import build_data_loaders, build_loss, build_metrics, build_model, build_optimizer
    from trainer.sanity import sanity_pass
    from trainer.trainer import Trainer

    config = load_config(ROOT / "configs" / "digits.yaml", ["device=cpu"])
    torch.manual_seed(0)
    model = build_model(config)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    train_loader, valid_loader = build_data_loaders(config, 0, 1)
    optimizer = build_optimizer(config, model)
    trainer = Trainer(model, build_loss(config), build_metrics(config), optimizer, config, torch.device("cpu"),
                      train_loader, valid_loader)
    model.train()
    before = copy.deepcopy(model.state_dict())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    sanity_pass(trainer)
    after_rng = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert after_rng == (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not trainer._step_checked  # the first real batch still checks that the loss requires grad


# ---- 2 and 3. errors during training, and how every run ends in train.log ---------------------------

@pytest.mark.slow
def test_an_error_after_the_first_steps_is_one_line_with_its_traceback_in_train_log(project, tmp_path):
    proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "arch.type=FailsLater",
                 "arch.args={fail_after: 45}", "trainer.epochs=3", "trainer.monitor=off", "metrics=[]",
                 "--run-id", "late")
    assert proc.returncode == 1, proc.stderr
    run = tmp_path / "saved" / "digits" / "late"
    line = line_of(project / "model" / "model.py", 'raise ValueError(f"call')
    error = one_error(proc)
    assert re.fullmatch(
        rf"error: model forward \(FailsLater\) failed at epoch 2, after step \d+ \(model/model.py:{line}\): "
        rf"ValueError: call 46 went wrong; traceback in {re.escape(str(run))}/train.log; after fixing it, "
        rf"resume: python train.py -r {re.escape(str(run))}", error), error
    log = (run / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and 'raise ValueError(f"call' in log
    assert log.rstrip().splitlines()[-1].endswith(error[len("error: "):])
    assert "Traceback" not in proc.stdout  # verbosity 1: the traceback is in train.log only


@pytest.mark.slow
def test_verbosity_2_also_prints_the_traceback(project, tmp_path):
    proc = subprocess.run([PYTHON, "train.py", "-c", "configs/digits.yaml", "arch.type=FailsLater",
                           "arch.args={fail_after: 45}", "trainer.epochs=3", "trainer.monitor=off", "metrics=[]",
                           f"trainer.save_dir={tmp_path / 'saved'}", "trainer.verbosity=2"],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stdout and "ValueError: call 46 went wrong" in proc.stdout


@pytest.mark.slow
def test_train_log_ends_with_how_the_run_ended(project, finished, extended, tmp_path):
    """train.log's last record, and the run's status in TensorBoard's HParams record (issue 15 item 3; these
    runs are also test_monitoring's "each run records how it ended"). The finished runs are the shared ones."""
    from tensorboard.plugins.hparams import api_pb2

    log = (finished[0] / "train.log").read_text()
    assert re.search(r"INFO finished: run directory .*f \(1 epoch, step 20, [\d.]+s\)\n.*INFO best val_accuracy: "
                     r"0\.\d+ at epoch \d", log), log[-600:]
    log = (extended[0] / "train.log").read_text()  # the same run resumed: what this session did
    assert re.search(r"INFO finished: run directory .*f \(1 epoch this session, step 40, [\d.]+s\)\n.*INFO best "
                     r"val_accuracy: 0\.\d+ at epoch \d", log), log[-600:]

    save = tmp_path / "saved"
    early = train(project, save, "-c", "configs/digits.yaml", "trainer.epochs=30", "trainer.early_stop=1",
                  "optimizer.args.lr=1e-9", "--run-id", "early")
    assert early.returncode == 0, early.stderr
    log = (save / "digits" / "early" / "train.log").read_text()
    assert re.search(r"INFO stopped early: run directory .*early \(\d+ epochs, step \d+, [\d.]+s\)", log), log[-600:]
    hparams, end, _, _ = hparams_record(save / "digits" / "early")
    assert hparams["status"] == "early-stopped" and end.status == api_pb2.STATUS_SUCCESS

    nan = train(project, save, "-c", "configs/digits.yaml", "optimizer.args.lr=1e12", "trainer.epochs=3",
                "--run-id", "nan")
    assert nan.returncode == 1
    last = (save / "digits" / "nan" / "train.log").read_text().rstrip().splitlines()[-1]
    assert re.search(r"ERROR non-finite (loss|weights|gradient)", last), last
    assert last.endswith(one_error(nan)[len("error: "):])
    hparams, end, _, _ = hparams_record(save / "digits" / "nan")
    assert hparams["status"] == "failed" and end.status == api_pb2.STATUS_FAILURE


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_is_recorded_in_train_log_with_the_resume_command(project, tmp_path, signum):
    proc = subprocess.Popen([PYTHON, "train.py", "-c", "configs/digits.yaml", "trainer.epochs=1000", "--run-id",
                             "sig", f"trainer.save_dir={tmp_path / 'saved'}", "trainer.verbosity=1",
                             "data_loader.args.num_workers=2"],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            break
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    run = tmp_path / "saved" / "digits" / "sig"
    command = f"resume: python train.py -r {run}"
    assert err.strip().endswith(f"checkpoint saved ({signum.name}); {command}"), err
    last = (run / "train.log").read_text().rstrip().splitlines()[-1]
    assert "WARNING stopped by signal at epoch" in last and last.endswith(f"({signum.name}); {command}")
    from tensorboard.plugins.hparams import api_pb2

    hparams, end, _, _ = hparams_record(run)  # TensorBoard's record: interrupted, not finished
    assert hparams["status"] == "interrupted" and end.status == api_pb2.STATUS_UNKNOWN


@pytest.mark.slow
def test_test_py_errors_in_user_code_are_one_line(project, finished):
    run = finished[0]  # test.py writes nothing: the shared run itself

    def test_py(*overrides):
        proc = subprocess.run([PYTHON, "test.py", "-r", str(run), *overrides], cwd=project, capture_output=True,
                              text=True, timeout=300)
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("evaluating ")]
        assert len(lines) == 1, proc.stderr
        return proc.returncode, lines[0]

    code, error = test_py("metrics=[per_sample]", "trainer.monitor=off")  # the run monitors val_accuracy
    assert code == 2 and error.endswith("metric 'per_sample' returned a tensor of shape (64,); a function metric "
                                        "returns one number per batch (e.g. the batch mean) (checked before "
                                        "evaluating)"), error
    code, error = test_py("arch.args.fail_after=3")  # the first test batch passes, the fourth call fails
    line = line_of(project / "model" / "model.py", 'raise ValueError(f"call')
    assert code == 1
    assert error == (f"error: model forward (FailsLater) failed at model/model.py:{line} during evaluation: "
                     f"ValueError: call 4 went wrong")


@pytest.mark.slow
def test_an_older_checkpoint_of_a_run_is_not_continued_over_its_newer_ones(project, extended, tmp_path):
    save = tmp_path / "saved"  # a copy of the shared two-epoch run: epoch-1.pth at step 20, last.pth at 40
    run = copy_run(extended[0], save)
    before = (run / "checkpoints" / "last.pth").read_bytes()
    older = run / "checkpoints" / "epoch-1.pth"
    proc = train(project, save, "-r", str(older), "trainer.epochs=3")
    assert proc.returncode == 2
    assert one_error(proc) == (f"error: -r {older}: an older checkpoint of {run} (step 20; its last.pth is at step "
                               f"40): continuing there would overwrite the run's newer checkpoints; to start a new "
                               f"run from it: python train.py -r {older} --run-id NEW_ID")
    assert (run / "checkpoints" / "last.pth").read_bytes() == before
    branch = train(project, save, "-r", str(older), "trainer.epochs=3", "--run-id", "branch")
    assert branch.returncode == 0, branch.stderr
    assert (save / "digits" / "branch" / "checkpoints" / "epoch-3.pth").exists()
    assert (run / "checkpoints" / "last.pth").read_bytes() == before


# ---- 5. runs that cannot train ----------------------------------------------------------------------

@pytest.mark.slow
def test_zero_steps_per_epoch_is_refused_and_a_huge_batch_is_a_warning(project, tmp_path):
    common = ["-c", "configs/digits.yaml", "data_loader.type=TinyDataLoader", "data_loader.args={}",
              "metrics=[accuracy]", "trainer.epochs=1", "trainer.monitor=off"]
    proc = train(project, tmp_path / "saved", *common, "data_loader.args.drop_last=true", "--bs", "100")
    assert proc.returncode == 2
    assert one_error(proc) == ("error: data_loader.args.batch_size: 100 with drop_last: true leaves no training "
                               "batch: the training split has 32 samples; lower the batch size or set "
                               "data_loader.args.drop_last=false")
    assert not (tmp_path / "saved").exists()
    proc = train(project, tmp_path / "saved", *common, "--bs", "100", "--run-id", "big")
    assert proc.returncode == 0, proc.stderr
    warning = ("data_loader.args.batch_size: 100 is larger than the training split (32 samples): every "
               "epoch is one optimizer step")
    assert warning in proc.stdout + proc.stderr
    assert warning in (tmp_path / "saved" / "digits" / "big" / "train.log").read_text()


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_names_the_override(project, finished, extended, tmp_path):
    save = tmp_path / "saved"
    run = copy_run(finished[0], save)
    log_size = (run / "train.log").stat().st_size
    proc = train(project, save, "-r", str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [  # the first line comes before the checkpoint is read
        f"resuming {run}: loading torch and the checkpoint",
        f"{run}: this run already finished 1 epoch (step 20; trainer.epochs is 1); nothing to do. To train it "
        f"further: python train.py -r {run} trainer.epochs=11"]
    assert (run / "train.log").stat().st_size == log_size  # nothing written
    # The named override trains it further: the shared `extended` run is this command on a copy of the run.
    _, more = extended
    assert more.returncode == 0 and "finished: run directory" in more.stdout, more.stderr


# ---- 7. user keys, duplicate class names, -d as GPU indices -----------------------------------------

@pytest.mark.slow
def test_user_values_are_plain_data_that_reach_the_trainer(project, finished, tmp_path):
    _, proc = finished  # the shared run: trainer.type=UserTrainer "user={alpha: 0.5, tags: [a, b]}" user.beta=3
    assert "user values: {'alpha': 0.5, 'tags': ['a', 'b'], 'beta': 3}" in proc.stdout
    proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "user=[1, 2]")
    assert proc.returncode == 2
    assert one_error(proc) == "error: configs/digits.yaml: user: expected a mapping, got [1, 2]"


@pytest.mark.slow
def test_a_class_name_defined_in_two_modules_is_a_config_error_naming_both(project, tmp_path):
    (project / "model" / "copy_of_mnist.py").write_text(
        "import torch.nn as nn\n\nfrom base import BaseModel\n\n\n"
        "class MnistModel(BaseModel):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n\n    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    try:
        proc = train(project, tmp_path / "saved", "-c", "configs/digits.yaml", "arch.type=MnistModel",
                     "arch.args={}")
    finally:
        (project / "model" / "copy_of_mnist.py").unlink()
    assert proc.returncode == 2
    assert one_error(proc) == ("error: configs/digits.yaml: arch.type: MnistModel is defined in both "
                               "model/copy_of_mnist.py and model/model.py; rename one of them")


def test_gpu_indices_as_pytorch_template_spelled_them(tmp_path):
    proc = run_script("train.py", "-c", "configs/digits.yaml", "-d", "0", f"trainer.save_dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: device: 'cuda:0' requested but CUDA is not available here (use device: "
                                   "cpu or auto)")
    proc = run_script("train.py", "-c", "configs/digits.yaml", "-d", "0,1", "trainer.epochs=3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: -d 0,1: one process per GPU (DistributedDataParallel); run: "
                                   "CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc_per_node=2 "
                                   f"{ROOT / 'train.py'} -c configs/digits.yaml trainer.epochs=3")
