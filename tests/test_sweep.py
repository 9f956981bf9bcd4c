"""Many runs (README: Many runs): grid sweeps, k-fold cross-validation, Optuna searches; each killed
and resumed, and sweep.csv checked value by value against the runs' own checkpoints."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, run_script

CONFIG = str(ROOT / "configs" / "digits.yaml")


def quick(save_dir: Path, *extra: str) -> list[str]:
    return ["-c", CONFIG, f"trainer.save_dir={save_dir}", "trainer.tensorboard=false", "trainer.verbosity=1",
            "trainer.epochs=2", *extra]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([PYTHON, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def resume_in_process(sweep_dir: Path, capfd) -> tuple[int, str]:
    """`python train.py -r SWEEP_DIR` as train.main in this process, its runs still child train.py
    processes (the sweeps that are killed stay processes of their own; a resume that runs to the end needs
    no interpreter of its own, ~3.5 s of CPU); (exit status, what it and its runs printed)."""
    import train

    capfd.readouterr()
    code = train.main(["-r", str(sweep_dir)])
    out, err = capfd.readouterr()
    return code, out + err


def rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def load(path: Path) -> dict:
    from checkpoint import load_checkpoint

    return load_checkpoint(path)


def check_rows_against_checkpoints(sweep_dir: Path, monitor: str = "val_accuracy") -> None:
    """Every value of every finished row is the one its run's last.pth holds."""
    for row in rows(sweep_dir):
        state = load(sweep_dir / row["run_id"] / "checkpoints" / "last.pth")
        assert state["epoch_finished"] and int(row["epochs"]) == state["epoch"], row
        assert float(row[f"best_{monitor}"]) == state["monitor_best"], row
        assert state["metrics"] and set(state["metrics"]) <= set(row), row
        for name, value in state["metrics"].items():
            assert float(row[name]) == value, (row["run_id"], name)
        for key, value in row.items():  # the swept values are the run's config
            if key in ("optimizer.args.lr", "seed"):
                node = state["config"]
                for part in key.split("."):
                    node = node[part]
                from config.files import parse_scalar

                assert node == parse_scalar(value), (key, node, value)


# ---- fast: parsing, validation, refusals -------------------------------------------------------------
def test_spec_parsing():
    from errors import UserError
    from sweep.spec import grid, parse_axes, split_top_level

    assert split_top_level("[1,2],[3,4],a") == ["[1,2]", "[3,4]", "a"]
    axes, fixed = parse_axes(["optimizer.args.lr=1e-3,3e-3", "seed=0,1,2", "trainer.epochs=2"])
    assert fixed == ["trainer.epochs=2"] and [a.key for a in axes] == ["optimizer.args.lr", "seed"]
    combos = grid(axes)
    assert len(combos) == 6 and combos[0] == {"optimizer.args.lr": "1e-3", "seed": "0"}
    axes, _ = parse_axes(["optimizer.args.lr=log(1e-4,1e-1)", "arch.args.hidden=int(16,128)", "optimizer.type=choice(Adam,SGD)"])
    assert [a.kind for a in axes] == ["log", "int", "list"]
    for bad in ["lr", "x=log(1,0)", "x=log(0,1)", "x=int(1.5,3)", "x=a,,b", "x=a,a", "name=a,b",
                "trainer.save_dir=a,b"]:
        with pytest.raises(UserError):
            parse_axes([bad])
    with pytest.raises(UserError, match="--sweep-trials"):
        grid(parse_axes(["x=log(1e-4,1e-1)"])[0])


def test_every_combination_is_validated_before_anything_is_written(tmp_path):
    proc = run_script("train.py", *quick(tmp_path), "--sweep", "optimizer.args.lr=1e-3,oops", "seed=0,1",
                      "arch.args.dropot=0.1,0.2")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: --sweep ") for line in lines), lines
    assert "did you mean 'dropout'" in proc.stderr and "optimizer.args.lr" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def main_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """train.main(argv) in this process, as `python train.py` calls it; (exit status, stdout, stderr).
    The refusals below need no interpreter of their own (each would cost ~3.5 s of CPU importing torch):
    test_every_combination_is_validated_before_anything_is_written runs one as a real process."""
    import train

    capsys.readouterr()
    code = train.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as env:
        for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
            env.setenv(name, value)
        code, out, err = main_in_process([*quick(tmp_path), "--sweep", "seed=0,1"], capsys)
    assert code == 2 and "--nproc N" in err and not any(tmp_path.iterdir())
    code, out, err = main_in_process([*quick(tmp_path), "--sweep", "seed=0,1", "--dry-run"], capsys)
    assert code == 0 and "run-001: seed=1" in out and not any(tmp_path.iterdir())


def test_summary_groups_over_seeds():
    from sweep.runner import summary

    made = [{"values": {"lr": lr, "seed": s}, "status": "finished", "best": b, "metrics": {"val_loss": b + 1}}
            for lr, s, b in [("1", "0", 0.5), ("1", "1", 0.7), ("2", "0", 0.9), ("2", "1", 0.9)]]
    made.append({"values": {"lr": "3", "seed": "0"}, "status": "failed", "metrics": {}})
    text = summary(["lr", "seed"], made, "val_accuracy")
    assert "over seeds (4 finished runs)" in text
    assert "0.6000 ± 0.1414" in text and "1.6000 ± 0.1414" in text and "0.9000 ± 0.0000" in text
    assert "\n3 " not in text


# ---- slow: a 2x2 grid killed twice and resumed ------------------------------------------------------
@pytest.mark.slow
def test_grid_sweep_killed_and_resumed_matches_the_checkpoints(tmp_path, capfd):
    sweep_dir = tmp_path / "digits" / "grid"
    args = quick(tmp_path, "trainer.save_every_steps=4", "--run-id", "grid", "--sweep",
                 "optimizer.args.lr=1e-3,3e-3", "seed=0,1")
    # 1. SIGTERM to the sweep while its second run trains: forwarded, the run saves, both exit 143.
    proc = start(args)
    wait_for(lambda: (sweep_dir / "run-001" / "checkpoints" / "last.pth").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out
    assert "resume: python train.py -r" in out
    status = {row["run_id"]: row["status"] for row in rows(sweep_dir)}
    assert status == {"run-000": "finished", "run-001": "interrupted", "run-002": "pending", "run-003": "pending"}
    # 2. Resume; kill -9 the sweep and its child while the third run trains.
    proc = start(["-r", str(sweep_dir)])
    wait_for(lambda: (sweep_dir / "run-002" / "checkpoints" / "last.pth").exists(), proc)
    child = int((sweep_dir / "run-002" / ".lock").read_text())
    os.kill(proc.pid, signal.SIGKILL)
    os.kill(child, signal.SIGKILL)
    out2 = proc.communicate(timeout=60)[0]
    assert "run-000" not in out2 and "resuming run-001" in out2 and "starting run-002" in out2, out2
    # 3. Resume to the end: the killed run resumes from its checkpoint, the last one starts.
    code, out3 = resume_in_process(sweep_dir, capfd)
    assert code == 0, out3
    assert "run-000" not in out3.split("summary")[0] and "run-001" not in out3.split("summary")[0]
    assert "resuming run-002" in out3 and "starting run-003" in out3
    assert "summary: mean ± std over seeds (4 finished runs)" in out3
    assert [row["status"] for row in rows(sweep_dir)] == ["finished"] * 4
    check_rows_against_checkpoints(sweep_dir)
    for run in ("run-000", "run-001", "run-002", "run-003"):  # no run ran twice: one fresh start each
        log = (sweep_dir / run / "train.log").read_text()
        assert log.count("resuming from") == (run in ("run-001", "run-002")), (run, log)
        assert log.count("finished: run directory") == 1


# ---- k-fold ----------------------------------------------------------------------------------------
def test_folds_are_disjoint_covering_and_deterministic():
    import torch

    from base.base_data_loader import fold_indices

    n, k = 103, 5
    parts = [fold_indices(n, k, i, seed=7) for i in range(k)]
    valid = [v for _, v in parts]
    assert sorted(torch.cat(valid).tolist()) == list(range(n))  # covering, and disjoint (no repeats)
    assert {len(v) for v in valid} == {20, 21}
    for train, v in parts:
        assert sorted(torch.cat([train, v]).tolist()) == list(range(n)) and not set(train.tolist()) & set(v.tolist())
    again = [fold_indices(n, k, i, seed=7)[1] for i in range(k)]
    assert all(torch.equal(a, b) for a, b in zip(valid, again))
    assert not torch.equal(fold_indices(n, k, 0, seed=8)[1], valid[0])


def test_fold_keys_reach_the_data_loader_and_are_checked():
    import torch

    from base.base_data_loader import fold_indices
    from config import load_config
    from config.build import build_data_loaders
    from errors import ConfigError

    config = load_config(CONFIG, ["data_loader.folds=4", "data_loader.fold=2", "seed=3",
                                  "data_loader.args.validation_split=0.0", "trainer.monitor=max val_accuracy"])
    train, valid = build_data_loaders(config)
    expected_train, expected_valid = fold_indices(train.n_samples, 4, 2, seed=3)
    assert torch.equal(train.valid_indices, expected_valid) and torch.equal(train.sampler.indices, expected_train)
    assert valid is not None and len(valid.sampler.indices) == len(expected_valid)
    with pytest.raises(ConfigError, match="needs data_loader.folds"):
        load_config(CONFIG, ["data_loader.fold=1"])
    with pytest.raises(ConfigError, match="must be < data_loader.folds"):
        load_config(CONFIG, ["data_loader.folds=3", "data_loader.fold=3"])


@pytest.mark.slow
def test_kfold_summary_and_a_killed_fold_resumes_bit_identical(tmp_path, capfd):
    import statistics

    from test_resume import assert_bit_identical

    sweep_dir = tmp_path / "digits" / "cv"
    # `data_loader.folds: 3` in the config is the whole k-fold command (same as --folds 3).
    proc = start(quick(tmp_path, "trainer.save_every_steps=3", "data_loader.folds=3", "--run-id", "cv"))
    wait_for(lambda: (sweep_dir / "fold-2" / "checkpoints" / "last.pth").exists(), proc)
    child = int((sweep_dir / "fold-2" / ".lock").read_text())
    os.kill(child, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    code, out = resume_in_process(sweep_dir, capfd)
    assert code == 0, out
    assert "fold-0" not in out.split("summary")[0] and "resuming fold-2" in out, out
    assert [row["status"] for row in rows(sweep_dir)] == ["finished"] * 3
    assert [row["data_loader.fold"] for row in rows(sweep_dir)] == ["0", "1", "2"]
    check_rows_against_checkpoints(sweep_dir)
    values = [load(sweep_dir / f"fold-{i}" / "checkpoints" / "last.pth")["metrics"]["val_loss"] for i in range(3)]
    assert "over folds (3 finished runs)" in out
    assert f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" in out, out
    # The same fold trained without interruption, as a plain run.
    run_script("train.py", *quick(tmp_path, "trainer.save_every_steps=3", "data_loader.folds=3",
                                  "data_loader.fold=2", "--run-id", "reference"), check=True)
    assert_bit_identical(sweep_dir / "fold-2" / "checkpoints" / "last.pth",
                         tmp_path / "digits" / "reference" / "checkpoints" / "last.pth")


# ---- Optuna ------------------------------------------------------------------------------------------
def test_search_needs_a_monitor_and_ranges(tmp_path, monkeypatch, capsys):
    pytest.importorskip("optuna")
    monkeypatch.chdir(tmp_path)
    code, out, err = main_in_process([*quick(tmp_path), "trainer.monitor=off", "--sweep-trials", "3", "--sweep",
                                      "optimizer.args.lr=log(1e-4,1e-1)"], capsys)
    assert code == 2 and "trainer.monitor" in err and not any(tmp_path.iterdir())
    code, out, err = main_in_process([*quick(tmp_path), "--sweep-trials", "3", "--sweep",
                                      "optimizer.args.lr=log(1e-4,1e-1)", "arch.args.dropout=choice(0.1,oops)"],
                                     capsys)
    assert code == 2 and "arch.args.dropout" in err and not any(tmp_path.iterdir()), err


@pytest.mark.slow
def test_optuna_search_with_pruning_killed_and_resumed(tmp_path, capfd):
    optuna = pytest.importorskip("optuna")
    from optuna.trial import TrialState

    sweep_dir = tmp_path / "digits" / "search"
    proc = start(quick(tmp_path, "trainer.save_every_steps=3", "--run-id", "search", "--sweep-trials", "6",
                       "--sweep", "optimizer.args.lr=log(1e-6,1e-1)"))
    wait_for(lambda: (sweep_dir / "trial-002" / "checkpoints" / "last.pth").exists(), proc, 240)
    child = int((sweep_dir / "trial-002" / ".lock").read_text())
    os.kill(child, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert [t.state for t in study.trials][-1] == TrialState.RUNNING
    code, out = resume_in_process(sweep_dir, capfd)
    assert code == 0, out
    assert "trial-000" not in out.split("summary")[0] and "resuming trial-002" in out, out
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert [t.number for t in study.trials] == list(range(6))  # none lost, none run twice
    states = {f"trial-{t.number:03d}": t for t in study.trials}
    table = rows(sweep_dir)
    assert [row["run_id"] for row in table] == sorted(states)
    for row in table:
        trial = states[row["run_id"]]
        assert row["status"] == {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned"}[trial.state], row
        assert float(row["optimizer.args.lr"]) == trial.params["optimizer.args.lr"]
        if trial.state == TrialState.COMPLETE:
            assert float(row["best_val_accuracy"]) == trial.value
        log = (sweep_dir / row["run_id"] / "train.log").read_text()
        assert log.count("resuming from") == log.count("run directory: ") - 1 == (row["run_id"] == "trial-002")
        if trial.state == TrialState.PRUNED:
            assert "pruned by the Optuna search" in log and max(trial.intermediate_values) == int(row["epochs"])
    assert "pruned" in [row["status"] for row in table]
    check_rows_against_checkpoints(sweep_dir)
