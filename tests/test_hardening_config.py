"""Issue 20, the config and run-directory items: alias bombs and deep nesting refused at once (from a
file and from a checkpoint's stored config), `weights` for torchvision models, type changes on
resume, the run-directory lock (two real processes), the num_workers cap, a run killed before its
first checkpoint, and one-line errors from test.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PYTHON, ROOT, run_script
from test_config import BASE, assert_refused, run_main, write_config

CONFIG = str(ROOT / "configs" / "digits.yaml")
QUICK = ["trainer.verbosity=1", "trainer.histograms=false", "trainer.images=false", "arch.args.channels=8"]


def alias_bomb_yaml(levels: int) -> str:
    """`levels` lists of ten aliases of the list before: ~600 bytes that stand for 10^levels values."""
    lines = ["  x0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return (ROOT / "configs" / "digits.yaml").read_text() + "aliases:\n" + "\n".join(lines) + "\n"


def shared_bomb(levels: int) -> list:
    """The same as Python objects: what pickle's memo makes of shared lists in a checkpoint."""
    node: list = list(range(10))
    for _ in range(levels):
        node = [node] * 10
    return node


def one_error_line(proc: subprocess.CompletedProcess, *messages: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for message in messages:
        assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch run (its checkpoints are copied, never changed, by the tests)."""
    root = tmp_path_factory.mktemp("trained")
    run_script("train.py", "-c", CONFIG, "--run-id", "base", f"trainer.save_dir={root / 'saved'}",
               "trainer.epochs=1", "trainer.tensorboard=false", *QUICK, cwd=root, timeout=300, check=True)
    return root / "saved" / "digits" / "base"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ---- item 4: aliases and shared references ------------------------------------------------------

def test_alias_bomb_yaml_is_refused_in_well_under_a_second(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb_yaml(9))
    assert path.stat().st_size < 2000
    start = time.monotonic()
    proc = run_script("train.py", "-c", str(path), cwd=tmp_path, timeout=20)
    seconds = time.monotonic() - start
    one_error_line(proc, str(path), "expands to more than 100000 values")
    assert seconds < 5, seconds  # the interpreter's start included; the check itself is timed below

    from config import load_config
    from errors import ConfigError

    start = time.monotonic()
    with pytest.raises(ConfigError):
        load_config(path)
    assert time.monotonic() - start < 1


def test_a_few_aliases_are_copied_out(tmp_path, monkeypatch, capsys):
    """Aliases that stand for a small tree are fine: the resolved config is that tree, without anchors."""
    text = (ROOT / "configs" / "digits.yaml").read_text()
    text = text.replace("metrics: [accuracy, top_k_acc]", "metrics: &m [accuracy, top_k_acc]")
    path = tmp_path / "config.yaml"
    path.write_text(text + "  watch: {modules: *m}\n")
    code, out, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path), "--print-config")
    assert code == 0, err
    assert "&" not in out and "*" not in out
    assert yaml.safe_load(out)["trainer"]["watch"]["modules"] == ["accuracy", "top_k_acc"]


@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_checkpoint_config_with_shared_references_does_not_hang(script, trained, tmp_path):
    state = torch.load(trained / "checkpoints" / "last.pth", weights_only=True)
    state["config"]["aliases"] = shared_bomb(9)
    path = tmp_path / "bomb.pth"
    torch.save(state, path)  # not save_checkpoint: its plain-data check would walk the 10^9 values
    assert path.stat().st_size < 10 * (trained / "checkpoints" / "last.pth").stat().st_size
    proc = run_script(script, "-r", str(path), cwd=tmp_path, timeout=60)
    one_error_line(proc, f"{path} (config)", "expands to more than 100000 values")

    from config import resolve_config
    from errors import ConfigError

    start = time.monotonic()
    with pytest.raises(ConfigError):
        resolve_config(state["config"], [], "checkpoint")
    assert time.monotonic() - start < 1


def test_checkpoint_config_with_a_small_shared_list_evaluates(trained, tmp_path, monkeypatch, capsys):
    """test.py's main in this process (the refusals above are real processes; this one must just evaluate)."""
    import importlib.util

    state = torch.load(trained / "checkpoints" / "last.pth", weights_only=True)
    modules = ["features"]  # one list object in two places: pickle's memo stores it once, shared
    state["config"]["trainer"]["watch"] = {"modules": modules, "every_steps": 10}
    state["config"]["trainer"]["freeze"] = {"modules": modules, "until_epoch": 1}
    path = tmp_path / "shared.pth"
    torch.save(state, path)
    spec = importlib.util.spec_from_file_location("test_entry", ROOT / "test.py")  # not the stdlib's `test`
    test_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_script)
    monkeypatch.chdir(tmp_path)
    code = test_script.main(["-r", str(path), "data_loader.args.batch_size=512"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "accuracy:" in out


# ---- item 5: tracebacks where one line is promised ----------------------------------------------

def nested(depth: int, suffix: str) -> str:
    if suffix == ".json" or depth > 1000:  # lists in brackets; block mappings of 1000+ levels are megabytes
        flow = json.dumps({**BASE, "aliases": "@"}).replace('"@"', "[" * depth + "]" * depth)
        return flow if suffix == ".json" else yaml.safe_dump(BASE, sort_keys=False) + "aliases: " + flow[-2 * depth - 1:-1]
    return yaml.safe_dump(BASE, sort_keys=False) + "aliases:\n" + "".join(
        "  " * (i + 1) + f"k{i}:\n" for i in range(depth)) + "  " * (depth + 1) + "v: 1\n"


@pytest.mark.parametrize("depth", [150, 600, 5000])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deep_nesting_is_one_line(depth, suffix, tmp_path, monkeypatch, capsys):
    path = tmp_path / f"config{suffix}"
    path.write_text(nested(depth, suffix))
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path))
    assert_refused(tmp_path, code, err, str(path), "nested more than 100 levels deep", written=(path.name,))


def test_deep_nesting_end_to_end_and_in_an_override(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(nested(1000, ".yaml"))
    one_error_line(run_script("train.py", "-c", str(path), cwd=tmp_path, timeout=60), str(path), "nested")
    for depth in (200, 5000):  # refused by the check of the whole config, and by the YAML parser
        deep = "[" * depth + "]" * depth
        proc = run_script("train.py", "-c", CONFIG, f"arch.args.dropout={deep}", cwd=tmp_path, timeout=60)
        one_error_line(proc, "arch.args.dropout", "nested more than 100 levels deep")
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("key", ["weights", "weights_backbone"])
def test_weights_for_a_torchvision_model_is_refused(key, tmp_path, monkeypatch, capsys):
    config = {**BASE, "arch": {"type": "resnet18", "args": {"num_classes": 10, key: "IMAGENET1K_V1"}}}
    path = write_config(tmp_path, config)
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", str(path))
    assert_refused(tmp_path, code, err, f"arch.args.{key}: not allowed", "arch.pretrained", written=(path.name,))


@pytest.mark.parametrize("change, message", [
    (["optimizer.type=SGD"], "optimizer.type: Adam -> SGD cannot be resumed"),
    (["lr_scheduler.type=ExponentialLR", "lr_scheduler.args={gamma: 0.9}"], "lr_scheduler: StepLR -> ExponentialLR"),
    (["lr_scheduler=null"], "lr_scheduler: StepLR -> none"),
    (["arch.type=MLP", "arch.args={}"], "arch.type: DigitsCNN -> MLP"),
], ids=["optimizer", "scheduler", "no-scheduler", "arch"])
def test_type_change_on_resume_is_refused_before_anything_is_written(change, message, trained, tmp_path,
                                                                      monkeypatch, capsys):
    before = snapshot(trained)
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-r", str(trained), "trainer.epochs=2", *change)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err and "start a new run" in err
    assert snapshot(trained) == before


# ---- item 7: one process per run directory ------------------------------------------------------

@pytest.mark.slow
def test_resume_while_the_run_trains_is_refused(tmp_path):
    save_dir = tmp_path / "saved"
    run_dir = save_dir / "digits" / "busy"
    out = tmp_path / "first.txt"
    with open(out, "w") as handle:  # far more epochs than the test waits for: stopped by SIGTERM below
        first = subprocess.Popen(
            [PYTHON, str(ROOT / "train.py"), "-c", CONFIG, "--run-id", "busy", f"trainer.save_dir={save_dir}",
             "trainer.epochs=100000", "trainer.save_every_steps=5", "trainer.early_stop=0", *QUICK],
            cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.pth").exists():  # it is training
            assert first.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        second = run_script("train.py", "-r", str(run_dir), cwd=tmp_path, timeout=120)
        one_error_line(second, f"run directory {run_dir} is in use by process {first.pid}")
        assert first.poll() is None, out.read_text()[-3000:]
        first.send_signal(signal.SIGTERM)  # the first ends as a stopped run does: checkpoint saved, 143
        assert first.wait(timeout=120) == 128 + signal.SIGTERM, out.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    log = (run_dir / "train.log").read_text()
    assert "resuming" not in log and log.count("run directory: ") == 1
    assert not list((run_dir / "checkpoints").glob("*.tmp-*"))
    torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)


@pytest.mark.slow
def test_a_save_by_another_train_py_while_a_resume_loads_is_refused(trained, tmp_path, monkeypatch, capsys):
    """The lock is taken after the checkpoint is loaded and the model, data and sanity pass are built (a
    refused resume writes nothing); a save into the run in between must refuse the resume, not let it go on
    from the older checkpoint over the newer one. Here a real second train.py extends the run by an epoch at
    that moment (it runs while this resume builds its model)."""
    import shutil

    import config.build

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    build_model, others = config.build.build_model, []

    def build_model_while_another_saves(config_: dict):
        others.append(run_script("train.py", "-r", str(run_dir), "trainer.epochs=2", cwd=tmp_path, timeout=300))
        return build_model(config_)

    monkeypatch.setattr(config.build, "build_model", build_model_while_another_saves)
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-r", str(run_dir), "trainer.epochs=3")
    assert others and others[0].returncode == 0, others and others[0].stderr[-3000:]
    after_other = snapshot(run_dir)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{run_dir / 'checkpoints'} changed while this resume loaded" in err and f"-r {run_dir}" in err, err
    assert snapshot(run_dir) == after_other  # the refused resume wrote nothing
    assert torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 2


# ---- item 9: num_workers -------------------------------------------------------------------------

def test_num_workers_is_capped(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", CONFIG, "data_loader.args.num_workers=100000",
                            "--print-config")
    assert_refused(tmp_path, code, err, "data_loader.args.num_workers: expected an integer in [0, 256]",
                   written=())
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", CONFIG, "data_loader.args.num_workers=256",
                            "--print-config")
    assert code == 0, err


# ---- item 11: a run killed before its first checkpoint; test.py's one-line errors ----------------

def test_run_killed_before_its_first_checkpoint_starts_again_under_its_run_id(tmp_path, monkeypatch, capsys):
    save_dir = tmp_path / "saved"
    run_dir = save_dir / "digits" / "early"
    out = tmp_path / "killed.txt"
    with open(out, "w") as handle:  # batch 1: the first checkpoint is a whole epoch (~1500 steps) away
        proc = subprocess.Popen(
            [PYTHON, str(ROOT / "train.py"), "-c", CONFIG, "--run-id", "early", f"trainer.save_dir={save_dir}",
             "data_loader.args.batch_size=1", "trainer.save_every_steps=0", *QUICK],
            cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while "run directory: " not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not list((run_dir / "checkpoints").glob("*.pth")) and (run_dir / "config.yaml").exists()

    # -r has nothing to resume: it says how to start again.
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-r", str(run_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"start it afresh with: python train.py -c {run_dir / 'config.yaml'} --run-id early" in err
    # The same command starts it afresh in the same directory (the dead process held no lock).
    code, out_text, err = run_main(tmp_path, monkeypatch, capsys, "-c", CONFIG, "--run-id", "early",
                                   "trainer.epochs=1", *QUICK)
    assert code == 0, err
    assert "starting" in out_text and "afresh" in out_text
    assert torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1
    # Once it has a checkpoint, the run id is taken again.
    code, _, err = run_main(tmp_path, monkeypatch, capsys, "-c", CONFIG, "--run-id", "early", *QUICK)
    assert code == 2 and f"resume it with -r {run_dir}" in err, err


@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_multi_line_messages_are_one_line(script, tmp_path):
    missing = tmp_path / "two\nlines.pth"
    proc = run_script(script, "-r", str(missing), cwd=tmp_path, timeout=60)
    one_error_line(proc, "two lines.pth")


@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_checkpoint_without_a_config_is_one_line(script, trained, tmp_path):
    state = torch.load(trained / "checkpoints" / "last.pth", weights_only=True)
    del state["config"]
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    one_error_line(run_script(script, "-r", str(path), cwd=tmp_path, timeout=60), "'config' is missing (a checkpoint written by another tool?); pass a config with -c CONFIG")
