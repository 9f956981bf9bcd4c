"""MLflow as a tracker (`trainer.loggers: [..., mlflow]`), against a real local store (SQLite), read back
through MLflow's own client: the writer alone, a real train.py run killed with SIGKILL and resumed (one
MLflow run, no duplicate steps, the values of metrics.csv, the best checkpoint as an artifact), a sweep's
runs under one parent run, and the config errors."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, run_script

mlflow = pytest.importorskip("mlflow")

CONFIG = str(ROOT / "configs" / "digits.yaml")
QUIET = ["trainer.histograms=false", "trainer.images=false", "trainer.verbosity=1"]


def config(save_dir) -> dict:
    return {"name": "digits", "seed": 0, "optimizer": {"type": "Adam", "args": {"lr": 0.002}},
            "trainer": {"save_dir": str(save_dir), "epochs": 2}}


def client_of(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def without_tracking_uri() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEP_MLFLOW_PARENT_RUN_ID")}


def test_a_killed_and_resumed_run_is_one_mlflow_run_without_duplicate_steps(tmp_path, monkeypatch):
    from logger.mlflow_logger import MlflowWriter

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "digits" / "run"
    run_dir.mkdir(parents=True)
    first = MlflowWriter(run_dir, config(tmp_path))
    for step in range(1, 11):
        first.add_scalar("loss/train", 1.0 / step, step)
    first.flush()  # flushed up to step 10; the checkpoint says step 6; then kill -9 (no close)
    first.add_scalar("loss/train", 99.0, 11)  # never flushed: lost with the process
    resumed = MlflowWriter(run_dir, config(tmp_path))
    assert resumed.run_id == first.run_id
    for step in range(7, 15):  # the resumed session recomputes steps 7.. exactly
        resumed.add_scalar("loss/train", 1.0 / step, step)
    (run_dir / "best.pth").write_bytes(b"weights")
    resumed.log_artifact(run_dir / "best.pth", "checkpoints")
    resumed.close()
    check_store(tmp_path, first.run_id)


def check_store(tmp_path, run_id) -> None:
    """One FINISHED run in experiment digits: steps 1-14 once each, the params, the artifact."""
    from logger.mlflow_logger import tracking_uri

    client = client_of(tracking_uri(tmp_path))
    assert tracking_uri(tmp_path).startswith("sqlite:///") and (tmp_path / "mlflow.db").exists()
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss/train")
    assert sorted(m.step for m in history) == list(range(1, 15))
    assert {m.step: m.value for m in history} == {s: 1.0 / s for s in range(1, 15)}
    assert runs[0].data.params["optimizer.args.lr"] == "0.002"
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pth"]


def test_the_store_is_mlflow_tracking_uri_and_a_fresh_start_replaces_a_run_without_checkpoint(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI wins over <save_dir>/mlflow.db and is recorded: a resume finds the run there without
    it. A run directory started afresh (its first start saved no checkpoint) gets a new MLflow run, the old
    one deleted, so the store never shows the abandoned start beside it."""
    from logger.mlflow_logger import RUN_ID_FILE, MlflowWriter

    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    run_dir = tmp_path / "digits" / "run"
    run_dir.mkdir(parents=True)
    abandoned = MlflowWriter(run_dir, config(tmp_path), resumed=False)
    abandoned.add_scalar("loss/step", 5.0, 1)
    abandoned.flush()  # then killed before its first checkpoint
    fresh = MlflowWriter(run_dir, config(tmp_path), resumed=False)
    fresh.add_scalar("loss/step", 1.0, 1)
    fresh.close()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert (run_dir / RUN_ID_FILE).read_text().split() == [fresh.run_id, other]
    reopened = MlflowWriter(run_dir, config(tmp_path), resumed=True)
    assert (reopened.run_id, reopened.uri) == (fresh.run_id, other)
    reopened.add_scalar("loss/step", 7.0, 1)  # a step the store has: dropped
    reopened.add_scalar("loss/step", 2.0, 2)
    reopened.record_status("interrupted")
    reopened.close()
    assert not (tmp_path / "mlflow.db").exists()
    client = client_of(other)
    experiment = client.get_experiment_by_name("digits")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()  # beside the store, not ./mlruns
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(fresh.run_id, "KILLED")]
    assert [(m.step, m.value) for m in client.get_metric_history(fresh.run_id, "loss/step")] == [(1, 1.0), (2, 2.0)]


def test_a_relative_sqlite_tracking_uri_is_recorded_absolute(tmp_path, monkeypatch):
    """A resume from another working directory must reach the same store, not a new one beside it."""
    from logger.mlflow_logger import RUN_ID_FILE, MlflowWriter

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/rel.db")
    (tmp_path / "stores").mkdir()
    run_dir = tmp_path / "digits" / "run"
    run_dir.mkdir(parents=True)
    writer = MlflowWriter(run_dir, config(tmp_path), resumed=False)
    writer.close()
    assert (run_dir / RUN_ID_FILE).read_text().split() == [writer.run_id, f"sqlite:///{tmp_path / 'stores' / 'rel.db'}"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reopened = MlflowWriter(run_dir, config(tmp_path), resumed=True)
    assert reopened.run_id == writer.run_id
    reopened.close()
    assert not (elsewhere / "stores").exists()


def test_unknown_logger_name_is_a_config_error():
    from config import load_config
    from errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(CONFIG, ["trainer.loggers=[tensorboard,mlfow]"])
    assert caught.value.problems == [f"{CONFIG}: trainer.loggers: 'mlfow' is not one of tensorboard, csv, mlflow "
                                     f"(did you mean 'mlflow'?)"]
    with pytest.raises(ConfigError, match=r"trainer.loggers: 'csv' is named twice$"):
        load_config(CONFIG, ["trainer.loggers=[csv,csv]"])
    assert load_config(CONFIG)["trainer"]["loggers"] == ["tensorboard", "csv"]


def test_mlflow_named_without_the_package_is_a_config_error_with_the_install_command(tmp_path):
    stub = tmp_path / "no_mlflow" / "mlflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'mlflow' (blocked by the test)\")\n")
    proc = run_script("train.py", "-c", CONFIG, f"trainer.save_dir={tmp_path / 'saved'}",
                      "trainer.loggers=[csv,mlflow]", env={"PYTHONPATH": str(stub.parent)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == ("error: trainer.loggers: mlflow is not installed: "
                                            "pip install -r requirements-extra.txt (or pip install mlflow)")
    assert "Traceback" not in proc.stderr and not (tmp_path / "saved").exists()


# ---- a real run, killed and resumed ------------------------------------------------------------------
def csv_rows(run_dir) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_train_py_killed_with_sigkill_and_resumed_is_one_mlflow_run_with_the_values_of_metrics_csv(tmp_path, monkeypatch,
                                                                                                    capfd):
    """A run with trainer.loggers [tensorboard, csv, mlflow], SIGKILLed once epoch 3's checkpoint file exists
    (so last.pth holds epoch 2 or later), then resumed with -r. Before the resume its last.pth is set back
    to epoch 1: that is what a kill after the flush before a checkpoint and before the checkpoint itself
    leaves (the store ahead of the checkpoint), here made certain, so the resumed session logs steps the
    store already has."""
    save_dir = tmp_path / "saved"
    run_dir = save_dir / "digits" / "k"
    env = {**without_tracking_uri(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([PYTHON, str(ROOT / "train.py"), "-c", CONFIG, "--run-id", "k",
                             f"trainer.save_dir={save_dir}", "trainer.epochs=5", "trainer.log_every_steps=2",
                             "trainer.save_period=1", "lr_scheduler.args.step_size=1",
                             "trainer.loggers=[tensorboard,csv,mlflow]", *QUIET],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "epoch-3.pth").exists():  # written before last.pth links to it
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no epoch-3 checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, out
    from checkpoint import load_checkpoint

    assert 2 <= load_checkpoint(run_dir / "checkpoints" / "last.pth")["epoch"] < 5, out
    shutil.copyfile(run_dir / "checkpoints" / "epoch-1.pth", tmp_path / "older.pth")
    os.replace(tmp_path / "older.pth", run_dir / "checkpoints" / "last.pth")
    run_id = (run_dir / "mlflow_run_id").read_text().split()[0]
    client = client_of(f"sqlite:///{save_dir / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "RUNNING"
    ahead = max(m.step for m in client.get_metric_history(run_id, "val_accuracy"))

    # The resume: train.main -r in this process, as `python train.py -r` calls it (the SIGKILLed run above
    # is the process of its own; an interpreter for the resume would cost ~3.5 s of CPU importing torch).
    import train

    for name in ("MLFLOW_TRACKING_URI", "SWEEP_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    capfd.readouterr()
    code = train.main(["-r", str(run_dir)])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stdout + stderr
    kept = [line for line in (stdout + stderr).splitlines() if "already holds steps up to" in line]
    assert len(kept) == 1 and "override" in kept[0], stdout + stderr  # said once, with why
    assert f"mlflow:      mlflow ui --backend-store-uri sqlite:///{save_dir / 'mlflow.db'}" in stdout

    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "k"
    assert run.data.params["optimizer.args.lr"] == "0.002" and run.data.params["trainer.epochs"] == "5"
    history = {key: client.get_metric_history(run_id, key) for key in run.data.metrics}
    for key, points in history.items():
        steps = [m.step for m in points]
        assert steps == sorted(set(steps)), f"{key}: {steps}"

    rows = csv_rows(run_dir)
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4, 5]
    steps = [int(row["step"]) for row in rows]
    assert ahead >= steps[1]  # the store held epochs the resume did again
    for column in rows[0]:
        if column in ("epoch", "step", "time", "epoch_seconds"):
            continue
        key = column if column == "lr" or column.startswith("val_") else f"train_{column}"
        logged = {m.step: m.value for m in history[key]}
        assert list(logged) == steps, key
        assert [logged[s] for s in steps] == pytest.approx([float(row[column]) for row in rows], rel=1e-6), key
    assert [m.value for m in history["epoch"]] == [1, 2, 3, 4, 5]
    assert [m.step for m in history["loss/step"]] == list(range(2, steps[-1] + 1, 2))
    assert [m.step for m in history["optimizer/grad_norm"]] == list(range(2, steps[-1] + 1, 2))

    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pth"]
    artifact = client.download_artifacts(run_id, "checkpoints/best.pth", str(tmp_path))
    assert open(artifact, "rb").read() == (run_dir / "checkpoints" / "best.pth").read_bytes()
    assert (save_dir / "mlartifacts").is_dir()
    config_file = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "config"))
    assert open(config_file).read() == (run_dir / "config.yaml").read_text()  # the resumed session's, whole


def test_a_param_longer_than_mlflow_takes_is_cut_with_a_warning_and_the_config_is_an_artifact(tmp_path, monkeypatch,
                                                                                             caplog):
    import yaml

    from logger.mlflow_logger import PARAM_LIMIT, MlflowWriter, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SWEEP_MLFLOW_PARENT_RUN_ID", raising=False)
    run_dir = tmp_path / "digits" / "run"
    run_dir.mkdir(parents=True)
    notes = "".join(f"{i:05d} " for i in range(1500))  # 9,000 characters
    settings = {**config(tmp_path), "user": {"notes": notes}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(settings))
    writer = MlflowWriter(run_dir, settings)
    writer.close()
    warned = [r.getMessage() for r in caplog.records if "MLflow keeps" in r.getMessage()]
    assert len(warned) == 1 and "user.notes cut" in warned[0] and str(run_dir) in warned[0], warned
    client = client_of(tracking_uri(tmp_path))
    params = client.get_run(writer.run_id).data.params
    assert params["user.notes"] == notes[:PARAM_LIMIT] and params["optimizer.args.lr"] == "0.002"
    stored = client.download_artifacts(writer.run_id, "config.yaml", str(tmp_path / "artifact"))
    assert yaml.safe_load(open(stored))["user"]["notes"] == notes


# ---- a sweep: one parent run ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sweeps_runs_are_children_of_one_parent_run_which_a_resume_reopens(tmp_path, monkeypatch, capsys):
    """--sweep seed=0,1 with trainer.loggers [mlflow] alone (no event files, no metrics.csv): the sweep's run
    and its two runs' in experiment digits of <save_dir>/mlflow.db (not the sweep's folder), the runs tagged
    mlflow.parentRunId; `train.py -r SWEEP_DIR` opens the same parent again."""
    save_dir = tmp_path / "saved"
    sweep_dir = save_dir / "digits" / "s"
    # Out of os.environ (run_script adds its env to os.environ's, so env= could not remove them), for the
    # sweep process and for the resume in this process below.
    for name in ("MLFLOW_TRACKING_URI", "SWEEP_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    args = ["-c", CONFIG, "--sweep", "seed=0,1", "--run-id", "s", f"trainer.save_dir={save_dir}", "trainer.epochs=1",
            "trainer.loggers=[mlflow]", *QUIET]
    proc = run_script("train.py", *args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (save_dir / "digits" / "mlflow.db").exists()
    client = client_of(f"sqlite:///{save_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    parent_id = (sweep_dir / "mlflow_run_id").read_text().split()[0]

    def check() -> None:
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert sorted(runs) == ["run-000", "run-001", "s"]
        parent = runs["s"]
        assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
        assert "mlflow.parentRunId" not in parent.data.tags
        assert parent.data.params["sweep.keys"] == "seed" and parent.data.params["sweep.runs"] == "2"
        assert [a.path for a in client.list_artifacts(parent_id)] == ["sweep.csv"]
        for name, seed in (("run-000", "0"), ("run-001", "1")):
            child = runs[name]
            assert child.data.tags["mlflow.parentRunId"] == parent_id
            assert child.info.status == "FINISHED" and child.data.params["seed"] == seed
            assert child.data.tags["run_dir"] == str((sweep_dir / name).resolve())
            epochs = client.get_metric_history(child.info.run_id, "epoch")
            assert [m.value for m in epochs] == [1]
            assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [epochs[0].step]
            assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")] == ["checkpoints/best.pth"]

    check()
    for name in ("run-000", "run-001"):  # TensorBoard and metrics.csv off
        files = {p.name for p in (sweep_dir / name).iterdir()}
        assert "metrics.csv" not in files and not any("tfevents" in f or f.startswith("hparams-") for f in files), files

    # The resume of the finished sweep starts no run: train.main in this process, as `python train.py`
    # calls it (an interpreter of its own would spend ~3.5 s of CPU importing torch to do the same).
    import train

    capsys.readouterr()
    code = train.main(["-r", str(sweep_dir)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert (sweep_dir / "mlflow_run_id").read_text().split()[0] == parent_id
    check()
