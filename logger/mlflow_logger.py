"""MLflow beside TensorBoard: the same scalars, logged to a local tracking store (no server).

The store is `MLFLOW_TRACKING_URI` when set, else the SQLite file `<save_dir>/mlflow.db` (artifacts
in `<save_dir>/mlartifacts/`). The experiment is the config's `name` (a sweep's runs carry the sweep
id as their name, so they are grouped in one experiment). One training run is one MLflow run, across
any number of resumes: its id is kept in `<run_dir>/mlflow_run_id`. Scalars are sent with every
flush, which the trainer does before each checkpoint; a session killed after a flush and before the
checkpoint leaves points that the resumed session recomputes (bit for bit, see README: exact resume),
so a resumed writer skips every step at or below the newest one the store already has for that key.
Only rank 0 makes one (like the TensorBoard writer).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from errors import ConfigError

RUN_ID_FILE = "mlflow_run_id"
BATCH = 1000  # MLflow's limit on metrics per log_batch call


def check_mlflow_installed() -> None:
    """For config validation: naming mlflow without the package is a config error."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("trainer.loggers: mlflow is not installed: pip install -r requirements-extra.txt "
                          "(or pip install mlflow)") from None


def tracking_uri(save_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(save_dir).resolve() / 'mlflow.db'}"


class MlflowWriter:
    enabled = True

    def __init__(self, run_dir: str | Path, config: dict):
        from mlflow.tracking import MlflowClient

        from logger.tensorboard import flatten_hparams
        from runtime.atomic_write import atomic_write

        self.run_dir = Path(run_dir)
        save_dir = Path(config["trainer"]["save_dir"])
        self.client = MlflowClient(tracking_uri(save_dir))
        experiment = self.client.get_experiment_by_name(config["name"])
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
            config["name"], artifact_location=(save_dir.resolve() / "mlartifacts").as_uri())
        id_file = self.run_dir / RUN_ID_FILE
        self.newest: dict[str, int] = {}  # key -> newest step in the store (a resumed run's)
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.newest[key] = max((m.step for m in history), default=-1)
        else:
            run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                         tags={"run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            atomic_write(id_file, lambda handle: handle.write(f"{self.run_id}\n".encode()))
            from mlflow.entities import Param

            # MLflow params are immutable: logged once, from the config the run started with.
            params = [Param(k, str(v)[:6000]) for k, v in flatten_hparams(config).items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.pending: list = []

    def add_scalar(self, tag: str, value, global_step: int | None = None, *args, **kwargs) -> None:
        from mlflow.entities import Metric

        step = int(global_step or 0)
        if step <= self.newest.get(tag, -1):
            return  # logged by the session a kill interrupted after this step's flush
        self.pending.append(Metric(tag, float(value), int(time.time() * 1000), step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for start in range(0, len(pending), BATCH):
            self.client.log_batch(self.run_id, metrics=pending[start:start + BATCH])

    def close(self, status: str = "FINISHED") -> None:
        """status: FINISHED, KILLED (stopped by a signal; resumable) or FAILED."""
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    # The rest of the TensorBoard writer's surface: nothing to send.
    def add_histogram(self, *args, **kwargs) -> None: ...
    def add_image(self, *args, **kwargs) -> None: ...
    def add_text(self, *args, **kwargs) -> None: ...
    def add_graph(self, *args, **kwargs) -> None: ...
    def add_run_start(self, *args, **kwargs) -> None: ...
    def add_picture(self, *args, **kwargs) -> None: ...
    def add_model_graph(self, *args, **kwargs) -> None: ...
