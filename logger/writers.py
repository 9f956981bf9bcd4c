"""The run's writer from `trainer.loggers`: TensorBoard, MLflow, both behind one object, or none.

The trainer logs through one writer (`trainer.writer`): per-step scalars, the epoch's record, pictures.
With several trackers, `Writers` hands every call to each; `metrics.csv` is a per-epoch sink of its
own (base/base_trainer.py). `enabled` says a writer takes scalars, `draws` that it takes histograms,
images and the graph (TensorBoard), which cost time to compute.
"""
from __future__ import annotations

from pathlib import Path

from logger.epoch_log import EpochLogger, EpochRecord
from logger.tensorboard import NullWriter, make_writer


def check_loggers(config: dict) -> None:
    """Before anything is written: a tracker named in trainer.loggers must be installed (ConfigError)."""
    if "mlflow" in config["trainer"]["loggers"]:
        from logger.mlflow_logger import check_mlflow_installed

        check_mlflow_installed()


def make_writers(run_dir: str | Path, config: dict, main: bool, purge_step: int | None, resumed: bool):
    """The writer of `trainer.loggers` (rank 0; a NullWriter elsewhere). `purge_step`: see make_writer;
    `resumed`: the session continues a checkpoint of `run_dir`."""
    cfg = config["trainer"]
    if not main:
        return NullWriter()
    writers = []
    if "mlflow" in cfg["loggers"]:  # first: a store that cannot be opened stops the run before TensorBoard starts
        from errors import UserError
        from logger.mlflow_logger import MlflowWriter, tracking_uri

        try:
            writers.append(MlflowWriter(run_dir, config, resumed))
        except Exception as exc:  # noqa: BLE001 - a store that cannot be opened is the user's to fix
            raise UserError(f"trainer.loggers: mlflow: cannot log to {tracking_uri(cfg['save_dir'])}: "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    if "tensorboard" in cfg["loggers"] and cfg["tensorboard"]:
        writer = make_writer(run_dir, True, purge_step)
        if writer.enabled:  # else not installed (make_writer warned)
            writers.insert(0, writer)
    if not writers:
        return NullWriter()
    return writers[0] if len(writers) == 1 else Writers(writers)


class Writers(EpochLogger):
    """Several writers as one: each call goes to every one of them, in order."""

    def __init__(self, writers: list):
        self.writers = writers
        self.enabled = any(w.enabled for w in writers)
        self.draws = any(w.draws for w in writers)

    def split(self, name: str) -> Writers:
        return Writers([w.split(name) for w in self.writers])

    def _each(self, method: str, *args, **kwargs) -> None:
        """Every writer gets the call, even when one before it fails (the first error is raised after): a
        TensorBoard that cannot write must not leave the MLflow run without its status."""
        error = None
        for w in self.writers:
            try:
                getattr(w, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised below
                error = error or exc
        if error is not None:
            raise error

    def add_scalar(self, *args, **kwargs) -> None:
        self._each("add_scalar", *args, **kwargs)

    def add_histogram(self, *args, **kwargs) -> None:
        self._each("add_histogram", *args, **kwargs)

    def add_histograms(self, *args, **kwargs) -> None:
        self._each("add_histograms", *args, **kwargs)

    def add_image(self, *args, **kwargs) -> None:
        self._each("add_image", *args, **kwargs)

    def add_text(self, *args, **kwargs) -> None:
        self._each("add_text", *args, **kwargs)

    def add_graph(self, *args, **kwargs) -> None:
        self._each("add_graph", *args, **kwargs)

    def add_picture(self, *args, **kwargs) -> None:
        self._each("add_picture", *args, **kwargs)

    def add_model_graph(self, *args, **kwargs) -> None:
        self._each("add_model_graph", *args, **kwargs)

    def start_run(self, *args, **kwargs) -> None:
        self._each("start_run", *args, **kwargs)

    def set_summary(self, *args, **kwargs) -> None:
        self._each("set_summary", *args, **kwargs)

    def record_status(self, status: str) -> None:
        self._each("record_status", status)

    def set_tag(self, key: str, value: str) -> None:
        """A run-level tag, for the trackers that keep them (MLflow)."""
        for w in self.writers:
            if hasattr(w, "set_tag"):
                w.set_tag(key, value)

    def start(self, completed_epochs: int) -> None:
        self._each("start", completed_epochs)

    def log_epoch(self, record: EpochRecord) -> None:
        self._each("log_epoch", record)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")
