"""Config: every rule of issue 4 has a bad config here that must exit 2 with a one-line message, no
traceback and no run directory; plus the reference in docs/CONFIG.md, overrides, --print-config,
--dry-run and the resolved config stored with the run.

Most cases call `train.main` in this process (validation takes milliseconds); a few run the real
script to prove the absence of a traceback end to end.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import pytest
import torch
import yaml

from conftest import PYTHON, ROOT, run_script, small_digits

import train
from config.schema import SCHEMA, reference_rows, render_reference

BASE = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
BASE["optimizer"]["args"]["lr"] = 0.002  # PyYAML reads the file's 2.0e-3 fine; keep a plain float


def write_config(tmp_path, config, suffix=".yaml", name="config"):
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(config, indent=2))
    else:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_main(tmp_path, monkeypatch, capsys, *argv):
    """train.main(argv) from `tmp_path` with save_dir under it; (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    try:
        code = train.main([*argv, f"trainer.save_dir={tmp_path / 'saved'}"])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(tmp_path, code, err, *messages, written=("config.yaml", "config.json")):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    for message in messages:
        assert message in err, f"{message!r} not in:\n{err}"
    # Nothing but the config file the test wrote: no run directory, no saved/, no stray file.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p for p in written if (tmp_path / p).exists())


def mutate(config, path, value=..., delete=False):
    config = copy.deepcopy(config)
    node = config
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if delete:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return config


# ---- the reference in docs/CONFIG.md ------------------------------------------------------------

def schema_paths(keys=SCHEMA, prefix=""):
    paths = set()
    for name, key in keys.items():
        paths.add(prefix + name)
        paths |= schema_paths(key.keys, f"{prefix}{name}.")
    return paths


def test_config_reference_matches_the_schema():
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE))
    accepted = schema_paths()
    assert not documented - accepted, f"documented but unknown: {sorted(documented - accepted)}"
    assert not accepted - documented, f"accepted but undocumented: {sorted(accepted - documented)}"
    assert {row[0] for row in reference_rows()} == accepted
    assert text == render_reference(), "docs/CONFIG.md is stale: run `python -m config > docs/CONFIG.md`"
    assert "docs/CONFIG.md" in (ROOT / "README.md").read_text()


# ---- the battery: one bad config per rule ---------------------------------------------------------

BAD = {
    "unknown top-level key": (mutate(BASE, "nmae", "x"), ["nmae: unknown key (did you mean 'name'?)"]),
    "unknown nested key": (mutate(BASE, "trainer.epoch", 3), ["trainer.epoch: unknown key (did you mean 'epochs'?)"]),
    "unknown deep key": (mutate(BASE, "trainer.watch", {"every_step": 5}),
                         ["trainer.watch.every_step: unknown key (did you mean 'every_steps'?)"]),
    "missing section": (mutate(BASE, "optimizer", delete=True), ["optimizer: missing required key"]),
    "missing nested key": (mutate(BASE, "trainer.epochs", delete=True), ["trainer.epochs: missing required key"]),
    "wrong type": (mutate(BASE, "trainer.epochs", "ten"), ["trainer.epochs: expected an integer, got 'ten'"]),
    "epochs 0": (mutate(BASE, "trainer.epochs", 0), ["trainer.epochs: 0 must be >= 1"]),
    "validation_split 1.5": (mutate(BASE, "data_loader.args.validation_split", 1.5),
                             ["data_loader.args.validation_split: expected a fraction in [0, 1)", "got 1.5"]),
    "negative lr": (mutate(BASE, "optimizer.args.lr", -0.1), ["optimizer.args.lr: expected a number >= 0, got -0.1"]),
    "lr not a number": (mutate(BASE, "optimizer.args.lr", "fast"),
                        ["optimizer.args.lr: expected a number >= 0, got 'fast'"]),
    "other numeric arg not a number": (mutate(BASE, "optimizer.args.weight_decay", "1e-3x"),
                                       ["optimizer.args.weight_decay: expected a number (the default is"]),
    "boolean arg not a boolean": (mutate(BASE, "optimizer.args.amsgrad", "sometimes"),
                                  ["optimizer.args.amsgrad: expected true or false"]),
    "choice arg misspelled": (mutate(BASE, "arch.init", {"type": "kaiming_normal", "args": {"mode": "fan_inn"}}),
                              ["arch.init.args.mode: expected one of fan_in, fan_out, got 'fan_inn' "
                               "(did you mean 'fan_in'?)"]),
    "unknown model": (mutate(BASE, "arch.type", "DigitCNN"),
                      ["arch.type: 'DigitCNN' is not a model (did you mean 'DigitsCNN'?); valid: DigitsCNN, MLP"]),
    "unknown optimizer": (mutate(BASE, "optimizer.type", "Adamm"),
                          ["optimizer.type: 'Adamm' is not a torch.optim optimizer (did you mean 'Adam'?); valid:",
                           "SGD"]),
    "unknown metric": (mutate(BASE, "metrics", ["acuracy"]),
                       ["metrics[0]: 'acuracy' is not a metric (did you mean 'accuracy'?); valid: accuracy"]),
    "unknown constructor arg": (mutate(BASE, "arch.args.num_clases", 3),
                                ["arch.args.num_clases: DigitsCNN() has no argument 'num_clases' "
                                 "(did you mean 'num_classes'?)"]),
    "missing constructor arg": (mutate(BASE, "data_loader.type", "MnistDataLoader"),
                                ["data_loader.args: MnistDataLoader() needs argument 'data_dir'"]),
    "missing scheduler arg": (mutate(BASE, "lr_scheduler", {"type": "MultiStepLR", "args": {"gamma": 0.5}}),
                              ["lr_scheduler.args: MultiStepLR() needs argument 'milestones'"]),
    "argument set by the builder": (mutate(BASE, "optimizer.args.params", []),
                                    ["optimizer.args.params: set by the builder"]),
    "monitor names nothing": (mutate(BASE, "trainer.monitor", "max val_acc"),
                              ["trainer.monitor: the run never produces 'val_acc'; it logs loss, accuracy"]),
    "monitor without validation": (mutate(mutate(BASE, "data_loader.args.validation_split", 0),
                                          "trainer.monitor", "max val_accuracy"),
                                   ["never produces 'val_accuracy'", "set data_loader.args.validation_split"]),
    "monitor malformed": (mutate(BASE, "trainer.monitor", "maximum accuracy"),
                          ["trainer.monitor: 'maximum accuracy' must be 'min <metric>'"]),
    "choice misspelled": (mutate(BASE, "trainer.amp", "bf61"),
                          ["trainer.amp: 'bf61' is not one of off, bf16, fp16 (did you mean 'bf16'?)"]),
    "nested scheduler not a mapping": (
        mutate(BASE, "lr_scheduler", {"type": "SequentialLR", "args": {"schedulers": [5], "milestones": [2]}}),
        ["lr_scheduler.args.schedulers[0]: expected {type: name, args: mapping}"]),
    "seed too large": (mutate(BASE, "seed", 2**70), ["seed: ", "must be <="]),
}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_refused_before_anything_is_written(case, suffix, tmp_path, monkeypatch, capsys):
    config, messages = BAD[case]
    path = write_config(tmp_path, config, suffix)
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path))
    assert_refused(tmp_path, code, err, *messages)
    assert len(err.strip().splitlines()) == 1, err  # exactly the one problem, no cascade


def test_all_problems_are_reported_at_once(tmp_path, monkeypatch, capsys):
    config = mutate(BASE, "trainer.epochs", 0)
    config = mutate(config, "trainer.epoch", 3)
    config = mutate(config, "arch.type", "DigitCNN")
    config = mutate(config, "optimizer.args.lr", -1)
    config = mutate(config, "loss", delete=True)
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(write_config(tmp_path, config)))
    assert_refused(tmp_path, code, err, "trainer.epochs: 0 must be >= 1", "did you mean 'epochs'",
                   "did you mean 'DigitsCNN'", "optimizer.args.lr: expected a number >= 0",
                   "loss: missing required key")
    assert len(err.strip().splitlines()) == 5, err


DUPLICATES = {
    ".json": '{"name": "a", "seed": 1, "seed": 2}',
    ".yaml": "name: a\nseed: 1\nseed: 2\n",
}


@pytest.mark.parametrize("suffix", list(DUPLICATES))
def test_duplicate_keys_are_refused(suffix, tmp_path, monkeypatch, capsys):
    path = tmp_path / f"config{suffix}"
    path.write_text(DUPLICATES[suffix])
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path))
    assert_refused(tmp_path, code, err, "duplicate key 'seed'")


@pytest.mark.parametrize("text, message", [
    ('{"name": NaN}', "NaN is not a valid number"),
    ("name: [unclosed\n", "invalid YAML at line"),
    ("- a list\n", "the top level of a config must be a mapping"),
    ("? [a, b]\n: c\n", "a key must be a plain name"),
    ("name: digits\nseed: .nan\n", "seed: nan is not a finite number"),
    ("name: digits\nseed: !!set {1}\n", "seed: set values are not allowed"),
    ("name: digits\nloop: &a [*a]\n", "loop[0]: refers to itself"),
    ("name: digits\n1: x\n", "key 1 must be a string"),
], ids=["json-nan", "yaml-syntax", "not-a-mapping", "unhashable-key", "yaml-nan", "set", "cycle", "int-key"])
def test_unreadable_config_files(text, message, tmp_path, monkeypatch, capsys):
    path = tmp_path / ("config.json" if text.startswith("{") else "config.yaml")
    path.write_text(text)
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path))
    assert_refused(tmp_path, code, err, message)


def test_missing_file_and_bad_extension(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(tmp_path / "nope.yaml"))
    assert_refused(tmp_path, code, err, "config file not found")
    (tmp_path / "config.toml").write_text("name = 'x'\n")
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(tmp_path / "config.toml"))
    assert_refused(tmp_path, code, err, "unsupported config extension '.toml'", written=("config.toml",))


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path, monkeypatch, capsys):
    text = (ROOT / "configs" / "digits.yaml").read_text().replace("lr: 2.0e-3", "lr: 1e-3")
    text = text.replace("weight_decay: 0", "weight_decay: 5E-4")
    assert "lr: 1e-3" in text and yaml.safe_load(text)["optimizer"]["args"]["lr"] == "1e-3"  # PyYAML alone
    path = tmp_path / "config.yaml"
    path.write_text(text)
    code, out, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--print-config")
    assert code == 0, err
    args = yaml.safe_load(out)["optimizer"]["args"]
    assert args == {"lr": 0.001, "weight_decay": 0.0005}
    # A number quoted as a string in JSON is still read as the number the constructor expects.
    path = write_config(tmp_path, mutate(BASE, "optimizer.args.lr", "3e-4"), ".json")
    code, out, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--print-config")
    assert code == 0, err
    assert json.loads(out)["optimizer"]["args"]["lr"] == 0.0003


# ---- `type` can only name the project's classes, torch.optim, lr_scheduler, torchvision.models ----

DANGEROUS = ["system", "os.system", "builtins.eval", "eval", "torch.load", "subprocess.Popen", "__import__"]
TYPE_SECTIONS = {
    "arch.type": lambda name: mutate(BASE, "arch.type", name),
    "arch.init.type": lambda name: mutate(BASE, "arch.init", {"type": name, "args": {}}),
    "data_loader.type": lambda name: mutate(BASE, "data_loader.type", name),
    "optimizer.type": lambda name: mutate(BASE, "optimizer.type", name),
    "lr_scheduler.type": lambda name: mutate(BASE, "lr_scheduler.type", name),
    "lr_scheduler.args.schedulers[1].type": lambda name: mutate(BASE, "lr_scheduler", {
        "type": "SequentialLR", "args": {"milestones": [2], "schedulers": [
            {"type": "ConstantLR", "args": {"factor": 0.5}}, {"type": name, "args": {"command": "touch PWNED"}}]}}),
    "loss": lambda name: mutate(BASE, "loss", name),
    "loss.type": lambda name: mutate(BASE, "loss", {"type": name, "args": {"command": "touch PWNED"}}),
    "metrics[1]": lambda name: mutate(BASE, "metrics", ["accuracy", name]),
    "trainer.type": lambda name: mutate(BASE, "trainer.type", name),
}


@pytest.mark.parametrize("section", list(TYPE_SECTIONS))
def test_type_cannot_reach_arbitrary_callables(section, tmp_path, monkeypatch, capsys):
    for name in DANGEROUS:
        config = TYPE_SECTIONS[section](name)
        path = write_config(tmp_path, config)
        code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path))
        assert_refused(tmp_path, code, err, f"{section}: {name!r} is not a", "; valid: ")
        assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("bad", ["../escape", "/tmp/abs", "a/b", "..", ".", "", "a\\b", "run\n"])
def test_name_and_run_id_cannot_escape_save_dir(bad, tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, mutate(BASE, "name", bad))
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path))
    assert_refused(tmp_path, code, err, "name: ", "must be a plain directory name")
    path = write_config(tmp_path, BASE)
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--run-id", bad)
    assert_refused(tmp_path, code, err, "--run-id: ", "must be a plain directory name")
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--run-id", bad, "--print-config")
    assert_refused(tmp_path, code, err, "--run-id: ")


# ---- command line ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("trainer.epoch=3", "override trainer.epoch: unknown key 'trainer.epoch' (did you mean 'epochs'?)"),
    ("trainer.keep_lst=3", "(did you mean 'keep_last'?)"),  # a key the file leaves at its default
    ("trainr.epochs=3", "unknown key 'trainr' (did you mean 'trainer'?)"),
    ("metrics.5=accuracy", "override metrics.5: metrics has no item 5 (it has 2)"),
    ("trainer.epochs.x=1", "trainer.epochs is a value, not a mapping"),
    ("trainer.epochs=ten", "trainer.epochs: expected an integer, got 'ten'"),
    ("arch.args.num_clases=3", "(did you mean 'num_classes'?)"),
    ("arch.type=os.system", "arch.type: 'os.system' is not a model"),
])
def test_bad_overrides(override, message, tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, BASE)
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), override)
    assert_refused(tmp_path, code, err, message)


def test_bad_command_line_options(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, BASE)
    for argv, message in [(["--lr", "fast"], "invalid float value"), (["--bs", "0"], "expected an integer >= 1"),
                          (["--lr", "-1"], "expected a number >= 0"), (["--lr", "inf"], "expected a number >= 0"),
                          (["notanoverride"], "overrides are key.path=value"), ([], None)]:
        code, _, err = run_main(tmp_path, monkeypatch, capsys, *(["-c", str(path)] if argv else []), *argv)
        assert code == 2 and "Traceback" not in err, err
        assert message is None or message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_print_config_shows_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, BASE)
    code, out, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--print-config", "--lr", "0.01",
                              "--bs", "16", "trainer.epochs=3", "metrics.1={type: MulticlassF1Score, args: {num_classes: 10}}", "trainer.keep_last=2",
                              "lr_scheduler.interval=step", "trainer.monitor=min   val_loss")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["optimizer"]["args"] == {"lr": 0.01, "weight_decay": 0}
    assert resolved["data_loader"]["args"]["batch_size"] == 16
    assert resolved["trainer"]["epochs"] == 3 and resolved["trainer"]["keep_last"] == 2
    assert resolved["trainer"]["monitor"] == "min val_loss"
    assert resolved["metrics"] == ["accuracy", {"type": "MulticlassF1Score", "args": {"num_classes": 10}}]
    assert resolved["lr_scheduler"]["interval"] == "step"
    assert resolved["trainer"]["log_every_steps"] == SCHEMA["trainer"].keys["log_every_steps"].default  # defaults
    assert resolved["trainer"]["save_dir"] == str(tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    # A JSON config prints as JSON.
    path = write_config(tmp_path, BASE, ".json")
    code, out, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--print-config")
    assert code == 0 and json.loads(out)["name"] == "digits", err


def test_dry_run_builds_everything_runs_one_batch_and_writes_nothing(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, BASE)
    code, out, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--dry-run", "--run-id", "trial",
                              "--bs", "8")
    assert code == 0, err
    assert "DigitsCNN" in out and "trainable parameters: " in out  # the model summary
    assert "one batch: tuple((8, 1, 8, 8) float32, (8,) int64)" in out and "backward ok, metrics ok" in out
    assert f"run directory (not created): {tmp_path / 'saved' / 'digits' / 'trial'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_dry_run_reports_a_model_that_does_not_fit_the_data(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, mutate(BASE, "arch.args.image_size", 4))  # the data is 8x8
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--dry-run")
    assert_refused(tmp_path, code, err, "the first training batch (", "model forward failed at ", "model/model.py:",
                   "RuntimeError", "nothing was written")
    path = write_config(tmp_path, mutate(BASE, "arch.args.num_classes", -3))  # refused by the constructor
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--dry-run")
    assert_refused(tmp_path, code, err, "arch: DigitsCNN: ", "negative dimension")


# ---- end to end, real processes --------------------------------------------------------------------

def test_bad_configs_end_to_end_without_traceback(tmp_path):
    config = mutate(mutate(BASE, "arch.type", "os.system"), "trainer.epochs", "ten")
    path = write_config(tmp_path, config)
    proc = run_script("train.py", "-c", str(path), f"trainer.save_dir={tmp_path / 'saved'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "arch.type: 'os.system' is not a model" in proc.stderr
    assert "trainer.epochs: expected an integer, got 'ten'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.slow
def test_resolved_config_is_stored_in_run_dir_and_checkpoint(tmp_path, monkeypatch, capsys):
    """The config written next to the run and inside every checkpoint equals --print-config's."""
    path = write_config(tmp_path, BASE, ".json")
    overrides = small_digits(tmp_path / "saved", "trainer.epochs=1", "trainer.tensorboard=false",
                             "trainer.monitor=min val_loss", "optimizer.args.lr=1e-3")
    code, out, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), *overrides, "--print-config")
    assert code == 0, err
    resolved = json.loads(out)
    run_script("train.py", "-c", str(path), *overrides, "--run-id", "r1", cwd=tmp_path, check=True)
    run_dir = tmp_path / "saved" / "digits" / "r1"
    assert json.loads((run_dir / "config.json").read_text()) == resolved
    checkpoints = sorted((run_dir / "checkpoints").glob("*.pth"))
    assert checkpoints
    for checkpoint in checkpoints:
        assert torch.load(checkpoint, weights_only=True)["config"] == resolved, checkpoint.name
    assert resolved["optimizer"]["args"]["lr"] == 0.001


# ---- the registry: adding a model is one class in the right folder ---------------------------------

PROJECT = ["base", "model", "data_loader", "trainer", "logger", "config", "checkpoint", "runtime", "sweep", "configs",
           "train.py", "run.py", "errors.py"]


@pytest.mark.slow
def test_a_new_module_in_model_is_found(tmp_path):
    project = tmp_path / "project"
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, project / name)
    (project / "model" / "tiny.py").write_text(
        "import torch.nn as nn\n"
        "import torch.nn.functional as F\n"
        "from base import BaseModel\n"
        "from torch.nn import Linear  # imported, not defined here: must not become a valid type\n\n\n"
        "class TinyNet(BaseModel):\n"
        "    def __init__(self, num_classes: int = 10, hidden: int = 16):\n"
        "        super().__init__()\n"
        "        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n\n"
        "    def forward(self, x):\n"
        "        return F.log_softmax(self.net(x), dim=1)\n")
    # One interpreter for the three checks: train.main as `python train.py` would call it.
    checks = f"""
import sys, train
common = ["-c", "configs/digits.yaml", "trainer.save_dir={tmp_path / 'saved'}"]
print("rc", train.main([*common, "arch.type=TinyNet", "arch.args={{num_classes: 10, hidden: 8}}", "--dry-run"]))
print("rc", train.main([*common, "arch.type=TinyNet", "arch.args={{hiden: 8}}", "--print-config"]))
print("rc", train.main([*common, "arch.type=Linear", "--print-config"]))
"""
    proc = subprocess.run([PYTHON, "-c", checks], cwd=project, capture_output=True, text=True, timeout=300)
    assert re.findall(r"^rc (\d+)$", proc.stdout, flags=re.MULTILINE) == ["0", "2", "2"], proc.stdout + proc.stderr
    assert "TinyNet" in proc.stdout and "backward ok" in proc.stdout
    assert "TinyNet() has no argument 'hiden' (did you mean 'hidden'?)" in proc.stderr
    assert "arch.type: 'Linear' is not a model" in proc.stderr and "TinyNet" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "saved").exists()
