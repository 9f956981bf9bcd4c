"""TensorBoard: a SummaryWriter, or an explicit do-nothing writer when it is off or not installed."""
from __future__ import annotations

from pathlib import Path

from logger.logging import get_logger


class NullWriter:
    """Stands in for SummaryWriter when TensorBoard is off: every call does nothing."""

    enabled = False

    def add_scalar(self, *args, **kwargs) -> None: ...
    def add_histogram(self, *args, **kwargs) -> None: ...
    def add_image(self, *args, **kwargs) -> None: ...
    def add_text(self, *args, **kwargs) -> None: ...
    def add_graph(self, *args, **kwargs) -> None: ...
    def add_hparams_summary(self, *args, **kwargs) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def make_writer(log_dir: str | Path | None, enabled: bool, purge_step: int | None = None):
    """`purge_step`: on resume, TensorBoard hides events at steps >= it that a killed run left behind."""
    if not enabled or log_dir is None:
        return NullWriter()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        get_logger().warning("warning: trainer.tensorboard is on but the tensorboard package is not installed "
                             "(pip install tensorboard); continuing without TensorBoard")
        return NullWriter()

    class Writer(SummaryWriter):
        enabled = True

        def add_hparams_summary(self, hparams: dict, metrics: dict) -> None:
            """Hyperparameters with their best metric values, in this run's own event file."""
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            experiment, start, end = hparams_summary(hparams, metrics)
            writer = self._get_file_writer()
            for summary in (experiment, start, end):
                writer.add_summary(summary)

    return Writer(log_dir=str(log_dir), purge_step=purge_step)
