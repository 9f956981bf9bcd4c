"""MLflow beside TensorBoard (`trainer.loggers: [..., mlflow]`): the same scalars, logged to a local
tracking store (no server).

The store is `MLFLOW_TRACKING_URI` when set, else the SQLite file `<save_dir>/mlflow.db`; a SQLite store's
artifacts go into `mlartifacts/` beside its file. The experiment is the config's `name`; a sweep's runs are children
(`mlflow.parentRunId`) of the sweep's own run, in its experiment (`SweepParent`). One training run is one
MLflow run across any number of resumes: its id and store are kept in `<run_dir>/mlflow_run_id`.

What a run logs: its flattened config as params (once: MLflow params cannot change), the per-step
scalars TensorBoard gets under the same tags (`loss/step`, `optimizer/grad_norm`, `lr/group<i>_step`,
...), each epoch's values at the epoch's global step (`train_<name>`, `val_<name>`, `lr`, `epoch`,
`epoch_seconds`), the run directory's config file as an artifact at the start of each session (params keep
6000 characters), the best checkpoint as the artifact `checkpoints/best.pth` at the end of a session, and
the status (FINISHED, KILLED when stopped by a signal, FAILED).

Scalars are sent every FLUSH_SECONDS and at every flush, which the trainer does before each checkpoint; a
session killed after a send and before the checkpoint leaves points that the resumed session recomputes
(bit for bit, see README: exact resume), so every key's steps strictly increase: a point at or below the
newest step the store (or this session) has for its key is dropped. Only rank 0 makes a writer.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from errors import ConfigError
from logger.epoch_log import EpochLogger, EpochRecord
from logger.logging import get_logger

PARAM_LIMIT = 6000  # the longest param value an MLflow store takes
RUN_ID_FILE = "mlflow_run_id"  # line 1: the run id; line 2: the tracking URI of the store that holds it
ENV_PARENT = "SWEEP_MLFLOW_PARENT_RUN_ID"  # set by the sweep runner for its child runs
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAMS_BATCH = 100  # and on params
FLUSH_SECONDS = 10
STATUSES = {"finished": "FINISHED", "early-stopped": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def check_mlflow_installed() -> None:
    """For config validation: naming mlflow without the package is a config error."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("trainer.loggers: mlflow is not installed: pip install -r requirements-extra.txt "
                          "(or pip install mlflow)") from None


def tracking_uri(save_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI, else `<save_dir>/mlflow.db`. A SQLite path is made absolute: the run directory
    records the URI, and a resume from another working directory must find the same store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(save_dir).resolve() / 'mlflow.db'}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not os.path.isabs(uri[len(prefix):]):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def read_run_file(folder: str | Path) -> tuple[str, str | None] | None:
    """(run id, tracking URI or None) recorded in `folder`, or None."""
    try:
        lines = (Path(folder) / RUN_ID_FILE).read_text().split()
    except FileNotFoundError:
        return None
    return (lines[0], lines[1] if len(lines) > 1 else None) if lines else None


def shown_uri(uri: str) -> str:
    """The store's URI for a command line: a SQLite file under the working directory as a relative path."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and os.path.isabs(uri[len(prefix):]):
        path = Path(uri[len(prefix):])
        if path.is_relative_to(Path.cwd()):
            return prefix + str(path.relative_to(Path.cwd()))
    return uri


def _client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # a new store logs its table creation at INFO
    return MlflowClient(uri)


def _find_run(uri: str, run_id: str):
    """(client, run) of a recorded run, or (None, None) when the store or the run is gone. A SQLite file
    that no longer exists is not opened (that would create an empty store there)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_file():
        return None, None
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None, None
    return (client, run) if run.info.lifecycle_stage == "active" else (None, None)


def _experiment_id(client, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":  # deleted in the UI: a new run there would be refused
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    # A SQLite store keeps the artifacts beside its file (MLflow's default would be ./mlruns of whatever the
    # working directory is); a server decides for itself.
    prefix = "sqlite:///"
    location = (Path(uri[len(prefix):]).resolve().parent / "mlartifacts").as_uri() if uri.startswith(prefix) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def open_run(folder: Path, save_dir: Path, experiment: str, continuing: bool, params: dict,
             tags: dict[str, str], parent: str | None = None):
    """(client, tracking URI, run id, reopened) of the MLflow run that `folder` (a run or sweep directory)
    records. `continuing`: the folder's work goes on (a resume), so its recorded run is opened again;
    otherwise a recorded run is that of a start that never saved a checkpoint, and is deleted. A new run
    goes into the experiment of `parent` (a run id: then a child of it), else into `experiment`."""
    from mlflow.entities import Param

    from runtime.atomic_write import atomic_write

    recorded = read_run_file(folder)
    if recorded is not None:
        run_id, uri = recorded[0], recorded[1] or tracking_uri(save_dir)
        client, run = _find_run(uri, run_id)
        if run is not None and continuing:
            client.update_run(run_id, status="RUNNING")
            return client, uri, run_id, True
        if run is not None:
            client.delete_run(run_id)
        else:
            get_logger().warning(f"warning: MLflow run {run_id} of {folder} is not in {uri}; logging to a new run")
    uri = tracking_uri(save_dir)
    client = _client(uri)
    experiment_id = None
    if parent is not None:
        _, parent_run = _find_run(uri, parent)
        if parent_run is None:
            get_logger().warning(f"warning: the sweep's MLflow run {parent} is not in {uri}; logging without it")
            parent = None
        else:
            experiment_id = parent_run.info.experiment_id
            tags = {**tags, "mlflow.parentRunId": parent}
    if experiment_id is None:
        experiment_id = _experiment_id(client, uri, experiment)
    run_id = client.create_run(experiment_id, run_name=folder.name, tags=tags).info.run_id
    atomic_write(folder / RUN_ID_FILE, lambda handle: handle.write(f"{run_id}\n{uri}\n".encode()))
    items = [Param(key, str(value)[:PARAM_LIMIT]) for key, value in params.items()]
    cut = [key for key, value in params.items() if len(str(value)) > PARAM_LIMIT]
    if cut:
        get_logger().warning(f"warning: MLflow keeps {PARAM_LIMIT} characters of a param; {', '.join(cut)} cut "
                             f"there (the whole config is in {folder} and, for a run, its artifact config.*)")
    for start in range(0, len(items), PARAMS_BATCH):
        client.log_batch(run_id, params=items[start:start + PARAMS_BATCH])
    return client, uri, run_id, False


class MlflowWriter(EpochLogger):
    """The TensorBoard writer's surface for the trainer (through logger.writers.Writers): scalars and the
    epoch's record go to MLflow; histograms, pictures and the graph are TensorBoard's alone."""

    enabled = True  # takes scalars
    draws = False   # takes no histograms, images or graph

    def __init__(self, run_dir: str | Path, config: dict, resumed: bool = True):
        """`resumed`: the session continues the run directory's checkpoint (else it starts the run afresh)."""
        from logger.tensorboard import flatten_hparams

        self.run_dir = Path(run_dir)
        self.client, self.uri, self.run_id, reopened = open_run(
            self.run_dir, Path(config["trainer"]["save_dir"]), config["name"], resumed, flatten_hparams(config),
            {"run_dir": str(self.run_dir.resolve())}, os.environ.get(ENV_PARENT) or None)
        for name in ("config.yaml", "config.json"):  # this session's config whole (params are the first's, cut)
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.newest: dict[str, int] = {}  # key -> newest step in the store or in this session
        if reopened:
            for key in self.client.get_run(self.run_id).data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.newest[key] = max((m.step for m in history), default=-1)
        self.pending: list[tuple] = []
        self.status = "FINISHED"
        self._due = 0.0  # the first scalar is sent at once, later ones every FLUSH_SECONDS
        self._failing = False
        self._said_kept = False

    # ---- scalars ------------------------------------------------------------------------------------
    def add_scalar(self, tag: str, value, global_step: int | None = None, *args, **kwargs) -> None:
        step = int(global_step or 0)
        if step <= self.newest.get(tag, -1):
            if not self._said_kept:  # sent by the session a kill interrupted after this step's flush
                self._said_kept = True
                get_logger().warning(
                    f"warning: MLflow run {self.run_id} already holds steps up to {self.newest[tag]} from the "
                    f"session that was killed; it keeps those values (the same ones unless an override on "
                    f"resume changed the training: TensorBoard and metrics.csv show this session's)")
            return
        self.newest[tag] = step
        if hasattr(value, "detach"):  # a tensor: a GPU one is read at the flush, so logging forces no host sync
            value = value.item() if value.device.type == "cpu" else value.detach().clone()
        self.pending.append((tag, value, int(time.time() * 1000), step))
        if time.monotonic() >= self._due:
            self.flush()

    def log_epoch(self, record: EpochRecord) -> None:
        """The epoch's values at its global step (the x of the per-step series too): the columns of
        metrics.csv, training values as train_<name>."""
        values = {"epoch": record.epoch, "epoch_seconds": record.seconds}
        values.update({"lr": record.lrs[0]} if len(record.lrs) == 1 else
                      {f"lr_group{i}": lr for i, lr in enumerate(record.lrs)})
        values.update({f"train_{name}": value for name, value in record.train.items()})
        values.update({f"val_{name}": value for name, value in record.val.items()})
        for key, value in values.items():
            self.add_scalar(key, value, record.step)

    def flush(self) -> None:
        """Send what is pending. A store that refuses (locked, gone) costs a warning, not the run: the points
        are sent with the next flush."""
        from mlflow.entities import Metric

        pending, self.pending = self.pending, []
        self._due = time.monotonic() + FLUSH_SECONDS
        metrics = [Metric(tag, float(value.item() if hasattr(value, "item") else value), stamp, step)
                   for tag, value, stamp, step in pending]
        for start in range(0, len(metrics), BATCH):
            try:
                self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH])
            except Exception as exc:  # noqa: BLE001 - any store error: keep training, try again later
                self.pending = pending[start:] + self.pending
                if not self._failing:
                    get_logger().warning(f"warning: MLflow store {self.uri} refused the metrics "
                                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                                         f"retrying at the next flush")
                self._failing = True
                return
        self._failing = False

    def record_status(self, status: str) -> None:
        """How the session ended (logger.tensorboard.STATUSES); `running` changes nothing."""
        self.status = STATUSES.get(status, self.status)

    def close(self, status: str | None = None) -> None:
        """Send what is left, the best checkpoint (unless stopped by a signal: the resumed session will)
        and the status: FINISHED, KILLED (resumable) or FAILED."""
        self.status = status or self.status
        self.flush()
        best = self.run_dir / "checkpoints" / "best.pth"
        try:
            if self.status != "KILLED" and best.is_file():
                self.client.log_artifact(self.run_id, str(best), "checkpoints")
            self.client.set_terminated(self.run_id, status=self.status)
        except Exception as exc:  # noqa: BLE001 - the run itself is done; its own error must not be hidden
            get_logger().warning(f"warning: could not finish MLflow run {self.run_id} in {self.uri}: "
                                 f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    # ---- the rest of the writer's surface: nothing for MLflow -------------------------------------------
    def split(self, name: str) -> MlflowWriter:
        return self  # one namespace: `loss/step` keeps its TensorBoard tag

    def start(self, completed_epochs: int) -> None: ...  # no deletion in MLflow: newer steps are dropped instead
    def start_run(self, *args, **kwargs) -> None: ...   # params were logged when the run was made
    def set_summary(self, *args, **kwargs) -> None: ...
    def add_histogram(self, *args, **kwargs) -> None: ...
    def add_histograms(self, *args, **kwargs) -> None: ...
    def add_image(self, *args, **kwargs) -> None: ...
    def add_text(self, *args, **kwargs) -> None: ...
    def add_graph(self, *args, **kwargs) -> None: ...
    def add_picture(self, *args, **kwargs) -> None: ...
    def add_model_graph(self, *args, **kwargs) -> None: ...


class SweepParent:
    """The MLflow run of a sweep: its runs are its children (`mlflow.parentRunId`, set by the child from
    the environment `env` gives it) in its experiment; a resumed sweep opens the same run again."""

    def __init__(self, sweep_dir: Path, save_dir: Path, experiment: str, params: dict):
        self.sweep_dir = sweep_dir
        self.client, self.uri, self.run_id, _ = open_run(sweep_dir, save_dir, experiment, True, params,
                                                         {"sweep_dir": str(sweep_dir.resolve())})

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, ENV_PARENT: self.run_id}

    def close(self, status: str, table: Path | None = None) -> None:
        """status: FINISHED, KILLED or FAILED; `table` (sweep.csv) becomes an artifact."""
        try:
            if table is not None and table.is_file():
                self.client.log_artifact(self.run_id, str(table))
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001 - the sweep's own outcome must not be hidden
            get_logger().warning(f"warning: could not finish the sweep's MLflow run {self.run_id}: "
                                 f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
