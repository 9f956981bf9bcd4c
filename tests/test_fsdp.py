"""trainer.strategy fsdp (FSDP2) and sharded checkpoints (checkpoint/sharded.py).

Quick tests run one process (DCP without a process group: the same files and checks); the slow ones run
torchrun with 2 processes on gloo: FSDP against DDP, resume 2 -> 1 -> 2, and kill -9 during saves.
"""
from __future__ import annotations

import hashlib
import json
import re
import os
import pickle
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PYTHON, ROOT, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TORCHRUN = Path(PYTHON).with_name("torchrun")

# 1292 training digits = 19 steps of 68 (2 x 34 under torchrun): no padding, so 1 and 2 processes and
# DDP and FSDP all take the same steps. No dropout, no BatchNorm: the state depends on the samples only.
# Accumulation and clipping are on, so the comparisons cover them.
CONFIG = {
    "name": "fsdp", "seed": 3, "device": "cpu",
    "arch": {"type": "MLP", "args": {"in_features": 64, "hidden": 32, "num_classes": 10, "depth": 2}},
    "data_loader": {"type": "DigitsDataLoader",
                    "args": {"batch_size": 34, "shuffle": True, "validation_split": 145, "num_workers": 0}},
    "optimizer": {"type": "SGD", "args": {"lr": 0.005, "momentum": 0.9}},
    "loss": "cross_entropy", "metrics": ["accuracy"],
    "trainer": {"epochs": 3, "monitor": "min val_loss", "verbosity": 1, "tensorboard": False,
                "strategy": "fsdp", "fsdp": {"wrap": ["Linear"]}, "save_every_steps": 7,
                "accumulate_grad_batches": 2, "clip_grad_norm": 1.0},  # 10 steps an epoch, the last one short
}
TOLERANCE = 1e-5  # FSDP reduce-scatters where DDP all-reduces: the same sums in another order


def write_config(tmp: Path, **trainer) -> Path:
    path = tmp / "fsdp.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "trainer": {**CONFIG["trainer"], "save_dir": str(tmp), **trainer}}))
    return path


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD})


def consolidate(source: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "checkpoint.consolidate", str(source), str(out), *options], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **ONE_THREAD})


def consolidated(source: Path, out: Path, which: str = "last") -> dict:
    """The run's end (`last`) as one file, unless told otherwise. The command's own main, in this process (a
    process each cost ~3 s of CPU to read a state); test_consolidated_checkpoint_loads_in_test_py runs the
    command as a process."""
    import warnings

    from checkpoint.consolidate import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's "assuming the intent is to load in a single process"
        assert main([str(source), str(out), "--checkpoint", which]) == 0
    return torch.load(out, weights_only=True)


def train_main(capsys, *argv: str) -> tuple[int, str]:
    """train.py's main in this process, for errors met before training: (exit status, stderr)."""
    import train

    capsys.readouterr()
    status = train.main(list(argv))
    return status, capsys.readouterr().err


def assert_close_states(a: dict, b: dict, tolerance: float = TOLERANCE) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=tolerance)
    for index, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"],
                                   rtol=0, atol=tolerance)


# ---- one process (quick) ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """strategy fsdp without torchrun: the model is not sharded, the checkpoints are (one shard)."""
    tmp = tmp_path_factory.mktemp("single")
    config = write_config(tmp, epochs=1)
    ok(run_script("train.py", "-c", str(config), "--run-id", "one", env=ONE_THREAD))
    return {"tmp": tmp, "config": config, "run": tmp / "fsdp" / "one"}


def copy_checkpoint(run: Path, tmp: Path, name: str) -> Path:
    import shutil

    source = run / "checkpoints" / (run / "checkpoints" / "last").read_text().strip()
    target = tmp / name / "checkpoints" / source.name
    shutil.copytree(source, target)
    return target


@pytest.mark.slow
def test_a_wrong_wrap_name_is_a_config_error_before_anything_is_written(tmp_path, capsys):
    config = write_config(tmp_path, fsdp={"wrap": ["Linaer"]})
    # One process: train.py's main here (the processes are the torchrun part's).
    status, err = train_main(capsys, "-c", str(config))
    assert status == 2, err
    (line,) = err.strip().splitlines()  # one line, no traceback
    assert "trainer.fsdp.wrap: 'Linaer' is not the class of any module of MLP (did you mean 'Linear'?)" in line, err
    assert not (tmp_path / "fsdp").exists()
    # Under torchrun both processes meet it; one says it (then torchrun reports the failed workers, exit 1).
    proc = torchrun("-c", str(config))
    assert proc.returncode != 0 and not (tmp_path / "fsdp").exists()
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "is not the class of any module" in line]
    assert len(said) == 1, proc.stdout + proc.stderr


def test_a_container_without_forward_in_wrap_is_a_config_error():
    """`wrap: [ModuleList]` passed the name check, then fully_shard failed with a raw traceback after the run
    directory was written (train.log without an end record)."""
    from torch import nn

    from errors import ConfigError
    from runtime.distributed import check_fsdp_config

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    cfg = {"strategy": "fsdp", "fsdp": {"wrap": ["ModuleList"], "cpu_offload": False, "mixed_precision": None},
           "sync_batchnorm": False, "compile": False, "freeze": None}
    with pytest.raises(ConfigError) as caught:
        check_fsdp_config(cfg, Net(), torch.device("cpu"))
    assert str(caught.value) == ("trainer.fsdp.wrap: ModuleList has no forward of its own: name the class of its "
                                 "elements (e.g. Block)")
    assert caught.value.exit_code == 2
    check_fsdp_config({**cfg, "fsdp": {**cfg["fsdp"], "wrap": ["Block"]}}, Net(), torch.device("cpu"))


def test_a_float32_input_under_fsdp_mixed_precision_is_explained():
    from runtime.distributed import mixed_precision_hint

    message = "Input type (float) and bias type (c10::BFloat16) should be the same or input should be a MKLDNN tensor"
    fsdp = {"strategy": "fsdp", "fsdp": {"mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}}}
    hint = mixed_precision_hint(message, fsdp)
    assert "never the model's buffers" in hint and "buffer.to(x.dtype)" in hint and "trainer.fsdp.wrap" in hint
    assert mixed_precision_hint(message, {**fsdp, "strategy": "ddp"}) == ""
    assert mixed_precision_hint("Target 6 is out of bounds", fsdp) == ""


@pytest.mark.slow
def test_a_run_writes_checkpoint_directories_with_pointers(single):
    checkpoints = single["run"] / "checkpoints"
    last = (checkpoints / "last").read_text().strip()
    assert last == "epoch-1" and (checkpoints / "best").read_text().strip() == "epoch-1"
    files = set(os.listdir(checkpoints / last))
    assert {"manifest.json", ".metadata", "trainer.pth", "__0_0.distcp"} <= files
    # step-7 and step-14 (mid-epoch saves) were pruned once `last` moved past them
    assert sorted(os.listdir(checkpoints)) == ["best", "epoch-1", "last"]


def test_resume_from_the_pointer_file_last_follows_it(single, tmp_path, capsys):
    """`-r RUN/checkpoints/last` names a pointer file (text), not a checkpoint: it is followed, as consolidate
    does; a pointer naming no checkpoint directory is one line, exit 2."""
    import shutil

    run = shutil.copytree(single["run"], tmp_path / "one")
    import train

    capsys.readouterr()
    status = train.main(["-r", str(run / "checkpoints" / "last")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert f"{run}: this run already finished 1 epoch (step 19; trainer.epochs is 1); nothing to do." in out, out
    (run / "checkpoints" / "best").write_text("garbage\n")
    status, err = train_main(capsys, "-r", str(run / "checkpoints" / "best"))
    assert status == 2 and err.strip() == f"error: {run / 'checkpoints' / 'best'}: does not name a checkpoint " \
        "directory (got 'garbage')", err


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata", "trainer.pth", "manifest.json"])
def test_a_flipped_byte_in_any_file_is_refused(single, tmp_path, capsys, victim):
    folder = copy_checkpoint(single["run"], tmp_path, "flip")
    path = folder / victim
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if victim != "manifest.json" else data.index(b"\n") + 1  # a manifest line's indent
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    if victim == "__0_0.distcp":  # a real train.py process for the shard; the same main in this process for the rest
        proc = run_script("train.py", "-r", str(folder), env=ONE_THREAD)
        status, err = proc.returncode, proc.stderr
    else:
        status, err = train_main(capsys, "-r", str(folder))
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn" not in line]
    assert len(lines) == 1 and "corrupted" in lines[0], err


@pytest.mark.slow
def test_a_pickle_payload_in_metadata_never_runs(single, tmp_path):
    folder = copy_checkpoint(single["run"], tmp_path, "payload")
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    body = pickle.dumps(Payload())
    (folder / ".metadata").write_bytes(body)
    # The attacker recomputes the manifest too: only the restricted unpickler stands in the way.
    manifest = folder / "manifest.json"
    content = json.loads(manifest.read_bytes().rpartition(b"\nsha256 ")[0])
    content["files"][".metadata"] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    new = json.dumps(content).encode()
    manifest.write_bytes(new + b"\nsha256 " + hashlib.sha256(new).hexdigest().encode() + b"\n")
    proc = run_script("train.py", "-r", str(folder), env=ONE_THREAD)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "posix.system is not allowed in DCP metadata" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_consolidated_checkpoint_loads_in_test_py(single, tmp_path):
    out = tmp_path / "model.pth"
    ok(consolidate(single["run"], out, "--checkpoint", "last"))  # the command as the README gives it: a process
    state = torch.load(out, weights_only=True)
    assert state["config"]["trainer"]["strategy"] == "ddp"
    proc = ok(run_script("test.py", "-r", str(out), env=ONE_THREAD))
    assert "accuracy:" in proc.stdout


@pytest.mark.slow
def test_consolidate_takes_the_checkpoint_named_best_by_default_and_says_which(single, tmp_path, capsys):
    import shutil

    from checkpoint.consolidate import main

    run = tmp_path / "run"
    shutil.copytree(single["run"], run)
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "epoch-1", checkpoints / "step-7")  # a second complete checkpoint
    (checkpoints / "last").write_text("step-7\n")  # best: epoch-1, last: step-7

    def consolidate(*args) -> tuple[int, str]:  # in this process: the command's main, its output
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP's "assuming the intent is to load in a single process"
            status = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return status, out + err

    def one_line(result: tuple[int, str], status: int) -> str:
        assert result[0] == status, result[1]
        lines = result[1].strip().splitlines()
        assert len(lines) == 1, result[1]
        return lines[0]

    line = one_line(consolidate(run, tmp_path / "a.pth"), 0)  # as test.py: best first
    assert line.startswith(f"consolidated {checkpoints / 'epoch-1'} (`best`; epoch 1 end, step 19) into "), line
    line = one_line(consolidate(checkpoints, tmp_path / "b.pth", "--checkpoint", "last"), 0)
    assert line.startswith(f"consolidated {checkpoints / 'step-7'} (`last`; "), line
    line = one_line(consolidate(checkpoints / "step-7", tmp_path / "c.pth"), 0)
    assert line.startswith(f"consolidated {checkpoints / 'step-7'} (the directory named; "), line
    line = one_line(consolidate(checkpoints / "last", tmp_path / "p.pth"), 0)  # a pointer file: followed
    assert line.startswith(f"consolidated {checkpoints / 'step-7'} (`last`; "), line
    # OUT is never written over, and its directory never made up
    before = (tmp_path / "a.pth").read_bytes()
    line = one_line(consolidate(run, tmp_path / "a.pth", "--checkpoint", "last"), 2)
    assert line == f"error: {tmp_path / 'a.pth'}: already exists; name a new file (or delete it first)"
    assert (tmp_path / "a.pth").read_bytes() == before
    line = one_line(consolidate(run, tmp_path / "typo" / "x.pth"), 2)
    assert line == f"error: {tmp_path / 'typo' / 'x.pth'}: no such directory {tmp_path / 'typo'}"
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)  # consolidate has no -r: its errors say none
    line = one_line(consolidate(tmp_path / "empty", tmp_path / "q.pth"), 2)
    assert line.startswith(f"error: {tmp_path / 'empty'}: the run stopped before its first checkpoint"), line

    line = one_line(consolidate(run, tmp_path / "d.pth", "--checkpoint", "epoch-9"), 2)
    assert line == f"error: {checkpoints / 'epoch-9'}: no such checkpoint in this run (it has: last, best, " \
                   f"epoch-1, step-7)"
    data = bytearray((checkpoints / "step-7" / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 1
    (checkpoints / "step-7" / "__0_0.distcp").write_bytes(bytes(data))
    line = one_line(consolidate(run, tmp_path / "e.pth", "--checkpoint", "last"), 2)  # never another one instead
    assert "step-7" in line and "checksum mismatch" in line, line
    (checkpoints / "best").unlink()  # a run without monitoring: last, and said so
    line = one_line(consolidate(run, tmp_path / "f.pth", "--checkpoint", "best"), 2)
    assert line == f"error: {checkpoints / 'best'}: no such pointer in this run (it has: last, epoch-1, step-7)"
    (checkpoints / "last").write_text("epoch-1\n")
    line = one_line(consolidate(run, tmp_path / "g.pth"), 0)
    assert line.startswith(f"consolidated {checkpoints / 'epoch-1'} (`last`: the run has no `best`; "), line
    assert not any((tmp_path / f"{x}.pth").exists() for x in "def")


@pytest.mark.slow
def test_test_py_on_a_sharded_run_names_the_consolidate_command(single):
    proc = run_script("test.py", "-r", str(single["run"]), env=ONE_THREAD)
    assert proc.returncode == 2
    assert f"python -m checkpoint.consolidate {single['run']} {single['run'] / 'consolidated.pth'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def held_writes(monkeypatch):
    """DCP's background writes wait for the returned event: what the test does before setting it happens
    while the save is in flight, whatever the machine's speed."""
    import threading

    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    release, original = threading.Event(), _FileSystemWriter.write_data

    def write_data(self, *args, **kwargs):
        assert release.wait(60), "the test never released the write"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_FileSystemWriter, "write_data", write_data)
    return release


def sharded_trainer(tmp_path, optimizer: dict | None = None):
    from test_tasks import blobs, build, make_config

    config = make_config(tmp_path, [], strategy="fsdp")
    if optimizer:
        config["optimizer"] = optimizer
    return build(config, blobs(16), run_dir=tmp_path / "run")


def train_one_step(trainer) -> None:
    trainer.optimizer.zero_grad()
    trainer.model(torch.randn(8, 6)).square().mean().backward()
    trainer.optimizer.step()


def test_an_async_save_holds_the_state_of_its_step_not_what_training_does_next(tmp_path, monkeypatch):
    from checkpoint.sharded import load_into, load_sharded_state

    trainer = sharded_trainer(tmp_path, {"type": "Adam", "args": {"lr": 0.1}})  # state: tensors and a 0-dim step
    train_one_step(trainer)
    trainer.global_step = 5
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in trainer.optimizer.state_dict()["state"].items()}
    release = held_writes(monkeypatch)
    trainer.sharded_saver.save(trainer, ["last"], epoch_finished=False)
    assert trainer.sharded_saver.pending and not list(trainer.checkpoint_dir.glob("step-5"))
    train_one_step(trainer)  # training goes on while the files are being written
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(100.0)
    release.set()
    folder = trainer.wait_for_checkpoint()
    assert folder.name == "step-5" and (trainer.checkpoint_dir / "last").read_text().strip() == "step-5"
    fresh = sharded_trainer(tmp_path / "fresh", {"type": "Adam", "args": {"lr": 0.1}})
    load_into(fresh.model, fresh.optimizer, load_sharded_state(folder)["sharded"])
    for key, value in fresh.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    for index, state in fresh.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, moments[index][key], rtol=0, atol=0)


def test_a_failed_async_save_is_raised_at_the_next_wait_and_the_previous_one_stays(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    from errors import TrainingError

    trainer = sharded_trainer(tmp_path)
    trainer.global_step = 3
    trainer.sharded_saver.save(trainer, ["last"], epoch_finished=False)
    assert trainer.wait_for_checkpoint().name == "step-3"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_FileSystemWriter, "write_data", full)
    trainer.global_step = 6
    trainer.sharded_saver.save(trainer, ["last"], epoch_finished=False)  # returns: the failure is in the background
    with pytest.raises(TrainingError, match=r"could not write checkpoint .*step-6\.tmp-.*No space left on device; "
                                            r"the previous checkpoints are intact"):
        trainer.wait_for_checkpoint()
    assert (trainer.checkpoint_dir / "last").read_text().strip() == "step-3"
    assert trainer.wait_for_checkpoint() is None  # raised once


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_wrong_checkpoint(tmp_path):
    """20 kills at random moments of a loop of asynchronous saves (tests/workers/fsdp_save_loop.py), most of
    them while a save is written in the background and the loop has already changed the weights: what a
    resume picks always holds one step whole, and so does every other directory that passes verification."""
    proc = subprocess.run([PYTHON, str(ROOT / "tests" / "workers" / "fsdp_save_loop.py"), str(tmp_path), "20", "19"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 20
    assert [r["wrong"] for r in results] == [[]] * 20, results
    assert sum(r["resumable"] is not None for r in results) >= 15, results
    assert sum(r["in_flight"] for r in results) >= 8, results  # killed with a .tmp- directory not yet renamed


# ---- torchrun, 2 processes (slow) ------------------------------------------------------------------------
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same 3 epochs under DDP and FSDP (2 processes each), FSDP resumed 2 -> 1 -> 2 processes, and
    resumed 2 -> 2 from a mid-epoch checkpoint.

    The 2 -> 1 -> 2 run's first leg is the FSDP run's own first epoch: its epoch-1 checkpoint (2 processes)
    starts run `hop` in 1 process (`--run-id`, so the FSDP run is left as it is), which a torchrun resume ends."""
    tmp = tmp_path_factory.mktemp("runs")
    config = write_config(tmp)
    ok(torchrun("-c", str(config), "--run-id", "fsdp"))
    ok(torchrun("-c", str(config), "--run-id", "ddp", "trainer.strategy=ddp"))
    hop = tmp / "fsdp" / "hop"
    fsdp_files = {name: (tmp / "fsdp" / "fsdp" / name).read_bytes()
                  for name in ("metrics.csv", "checkpoints/last", "checkpoints/best")}
    one = ok(run_script("train.py", "-r", str(tmp / "fsdp" / "fsdp" / "checkpoints" / "epoch-1"), "--run-id", "hop",
                        "trainer.epochs=2", "--bs", "68", env=ONE_THREAD))
    hop_after_branch = (hop / "checkpoints" / "last").read_text().strip()
    # A save killed before its rename left a temporary directory: the resume ignores it and sweeps it.
    stale = hop / "checkpoints" / f"epoch-3.tmp-{'ab' * 16}"
    stale.mkdir()
    (stale / "garbage").write_bytes(b"x")
    two = ok(torchrun("-r", str(hop), "trainer.epochs=3", "--bs", "34"))
    # kill -9 to the whole torchrun job right after its mid-epoch save of step 14 (epoch 2, batch 8 of 19),
    # then resume with 2 processes: the end must equal the uninterrupted run bit for bit.
    same = tmp / "fsdp" / "same"
    job = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), "-c",
                            str(config), "--run-id", "same", "trainer.save_every_steps=14", "trainer.verbosity=2"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD})
    try:
        for line in job.stdout:
            if "saved" in line and "step-14" in line:
                break
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert (same / "checkpoints" / "last").read_text().strip() in ("step-14", "epoch-2", "step-28")
    ok(torchrun("-r", str(same)))
    return {"tmp": tmp, "fsdp": tmp / "fsdp" / "fsdp", "ddp": tmp / "fsdp" / "ddp", "hop": hop, "same": same,
            "fsdp_files": fsdp_files, "hop_after_branch": hop_after_branch, "stale": stale,
            "hop_resume_output": two.stdout + two.stderr,
            "output": one.stdout + one.stderr + two.stdout + two.stderr}


@pytest.mark.slow
@needs_torchrun
def test_fsdp_training_equals_ddp_training(runs):
    fsdp = consolidated(runs["fsdp"], runs["tmp"] / "fsdp.pth")
    ddp = torch.load(runs["ddp"] / "checkpoints" / "last.pth", weights_only=True)
    assert fsdp["global_step"] == ddp["global_step"] == 30
    assert_close_states(fsdp, ddp)
    assert fsdp["metrics"]["val_loss"] == pytest.approx(ddp["metrics"]["val_loss"], abs=1e-5)


@pytest.mark.slow
@needs_torchrun
def test_resume_2_to_1_to_2_processes_matches_an_uninterrupted_run(runs):
    assert "resuming a 2-process checkpoint with 1 process(es)" in runs["output"]
    hopped = consolidated(runs["hop"], runs["tmp"] / "hop.pth")
    whole = consolidated(runs["fsdp"], runs["tmp"] / "whole.pth")
    assert_close_states(hopped, whole)


@pytest.mark.slow
@needs_torchrun
def test_a_temporary_directory_is_ignored_and_swept(runs):
    """The fixture's last resume of run `hop` (torchrun, from epoch 2) met a stale `epoch-3.tmp-...` directory."""
    output, hop = runs["hop_resume_output"], runs["hop"]
    assert "resumed at epoch 2 end" in output
    assert not runs["stale"].exists()
    assert (hop / "checkpoints" / "last").read_text().strip() == "epoch-3"
    out = hop / "consolidated.pth"  # in the run directory: runs do not write over each other's
    assert f"evaluate:    python -m checkpoint.consolidate {hop} {out} && python test.py -r {out}" in output


@pytest.mark.slow
@needs_torchrun
def test_an_older_checkpoint_directory_is_refused_unless_it_starts_a_new_run(runs):
    """As for .pth files: `-r RUN/checkpoints/epoch-1` of a run whose `last` is newer would retrain in place
    (metrics.csv rows rewritten, last and best moved); it is refused, and `--run-id NEW` starts a new run (the
    fixture's run `hop`, started from the FSDP run's epoch-1)."""
    run = runs["fsdp"]
    older = run / "checkpoints" / "epoch-1"
    proc = run_script("train.py", "-r", str(older), "trainer.epochs=2", env=ONE_THREAD)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line and "warn" not in line
             and "return func(" not in line]
    assert lines == [f"error: -r {older}: an older checkpoint of {run} (step 10; its `last` (epoch-3) is at step 30): "
                     f"continuing there would overwrite the run's newer checkpoints; to start a new run from it: "
                     f"python train.py -r {older} --run-id NEW_ID"], proc.stderr
    assert runs["fsdp_files"] == {name: (run / name).read_bytes() for name in runs["fsdp_files"]}
    assert runs["hop_after_branch"] == "epoch-2"  # `hop`'s own run, trained on from epoch-1


@pytest.mark.slow
@needs_torchrun
def test_resume_with_the_same_number_of_processes_is_exact(runs):
    resumed = consolidated(runs["same"], runs["tmp"] / "same.pth")
    whole = consolidated(runs["fsdp"], runs["tmp"] / "whole2.pth")
    assert_close_states(resumed, whole, tolerance=0.0)


@pytest.mark.slow
@needs_torchrun
def test_a_non_finite_shard_on_one_rank_stops_every_rank_before_the_checkpoint(tmp_path):
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "workers" / "fsdp_rank_local_nan.py"), str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, **ONE_THREAD})
    output = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank}: non-finite optimizer state 'momentum_buffer' of parameter 'net.1.weight' after step 2" \
            in output, output[-3000:]
    assert "checkpoints: []" in output, output[-3000:]


@pytest.mark.slow
@needs_torchrun
def test_sigterm_stops_both_ranks_at_one_step_with_a_sharded_checkpoint(tmp_path):
    config = write_config(tmp_path, epochs=5, verbosity=2, save_every_steps=4)
    job = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), "-c",
                            str(config), "--run-id", "stop"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD})
    lines = []
    for line in job.stdout:
        lines.append(line)
        if "saved" in line and "step-4" in line:
            job.send_signal(signal.SIGTERM)
            break
    lines += job.stdout.readlines()
    job.wait(timeout=120)
    output = "".join(lines)
    stops = re.findall(r"stopped by signal at epoch (\d+)(?: end|, step (\d+)); checkpoint saved", output)
    assert len(stops) == 2 and stops[0] == stops[1], output[-3000:]  # both ranks, the same place
    epoch, step = stops[0]
    checkpoints = tmp_path / "fsdp" / "stop" / "checkpoints"
    assert (checkpoints / "last").read_text().strip() == (f"step-{step}" if step else f"epoch-{epoch}")


@pytest.mark.slow
@needs_torchrun
def test_a_batchnorm_model_trains_as_under_ddp_and_a_root_with_its_own_parameters_saves(tmp_path):
    """Found by a new user's trial: wrapping only some layers left the root's parameters gathered after the
    validation forward (no backward), and the epoch-end checkpoint read freed memory (SIGSEGV).
    BatchNorm: FSDP2 does not broadcast buffers, so each rank kept its own running statistics and validated with
    them; rank 0's buffers are now broadcast before the forwards where DDP (broadcast_buffers) does it, and the
    validation loss equals DDP's."""
    common = ["-c", str(ROOT / "configs" / "digits.yaml"), "trainer.epochs=2", f"trainer.save_dir={tmp_path}",
              "trainer.tensorboard=false"]
    # Two epochs, not one: with the broadcast before training forwards taken out, a 1-epoch run still agreed
    # with DDP to 1e-5 (measured); the 2-epoch run's val_loss differed by 4.6e-4.
    proc = torchrun(*common, "trainer.strategy=fsdp", "trainer.fsdp.wrap=[Conv2d]", "--run-id", "fsdp")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(list(tmp_path.glob("digits/fsdp/checkpoints/epoch-2*"))) == 1
    ok(torchrun(*common, "--run-id", "ddp"))
    ddp = torch.load(tmp_path / "digits" / "ddp" / "checkpoints" / "last.pth", weights_only=True)
    fsdp = consolidated(tmp_path / "digits" / "fsdp", tmp_path / "fsdp.pth")
    assert fsdp["global_step"] == ddp["global_step"]
    for key in ("val_loss", "val_accuracy"):
        assert fsdp["metrics"][key] == pytest.approx(ddp["metrics"][key], abs=TOLERANCE), (fsdp["metrics"], ddp["metrics"])
    for key in ("features.1.running_mean", "features.4.running_var"):
        torch.testing.assert_close(fsdp["state_dict"][key], ddp["state_dict"][key], rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.slow
@needs_torchrun
def test_bf16_mixed_precision_trains_a_model_with_batchnorm(tmp_path):
    """FSDP2 casts a unit's parameters to param_dtype but not its buffers: a BatchNorm's bfloat16 weight met
    its float32 running statistics and the first step failed ("expected scalar type BFloat16 but found
    Float"), after a sanity pass that ran before sharding. Each BatchNorm is now a float32 unit.
    With the default wrap (the root only), DigitsCNN's float32 `coords` buffer brought the bfloat16 input back to
    float32 ("Input type (float) and bias type (c10::BFloat16)"): the model casts it to the input's dtype."""
    proc = torchrun("-c", str(ROOT / "configs" / "digits.yaml"), "trainer.strategy=fsdp",
                    "trainer.fsdp.mixed_precision={param_dtype: bfloat16, reduce_dtype: float32}", "trainer.epochs=1",
                    f"trainer.save_dir={tmp_path}", "trainer.tensorboard=false", "--run-id", "bf16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = consolidated(tmp_path / "digits" / "bf16", tmp_path / "bf16.pth")
    assert state["state_dict"]["features.1.running_var"].dtype == torch.float32
    assert state["metrics"]["val_accuracy"] > 0.5  # it learned, in bfloat16, from 10% (chance)
