"""logger/mlflow_logger.py against a real local store (SQLite), read back through MLflow's own client."""
from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")


def config(save_dir) -> dict:
    return {"name": "digits", "seed": 0, "optimizer": {"type": "Adam", "args": {"lr": 0.002}},
            "trainer": {"save_dir": str(save_dir), "epochs": 2}}


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
    from mlflow.tracking import MlflowClient

    from logger.mlflow_logger import tracking_uri

    client = MlflowClient(tracking_uri(tmp_path))
    assert tracking_uri(tmp_path).startswith("sqlite:///") and (tmp_path / "mlflow.db").exists()
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss/train")
    assert sorted(m.step for m in history) == list(range(1, 15))
    assert {m.step: m.value for m in history} == {s: 1.0 / s for s in range(1, 15)}
    assert runs[0].data.params["optimizer.args.lr"] == "0.002"
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pth"]
