"""Console and `train.log` (appended on resume) for the whole project, under the logger name "train".

`verbosity` sets what the console shows (0: warnings and errors, 1: info, 2: debug); `train.log`
always gets everything, so a quiet run still leaves a full record.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from errors import TrainingError

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
NAME = "train"


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(NAME if name is None else f"{NAME}.{name}")


class ConsoleHandler(logging.StreamHandler):
    """Writes around a live tqdm bar (clears it, writes the line, redraws it) instead of breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")  # bars exist only if tqdm was imported
        if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
            with tqdm.tqdm.external_write_mode(file=self.stream):
                super().emit(record)
        else:
            super().emit(record)


def setup_logging(run_dir: str | Path | None, verbosity: int = 1, is_main: bool = True) -> logging.Logger:
    """Log to stdout and, on the main process, to <run_dir>/train.log; other ranks only warn."""
    logger = get_logger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG if is_main else logging.WARNING)
    logger.propagate = False
    console = ConsoleHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(LEVELS[verbosity])
    logger.addHandler(console)
    if run_dir is not None and is_main:
        path = Path(run_dir) / "train.log"
        try:
            file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        except OSError as exc:  # a read-only or full run directory: exit 1, as for a config or checkpoint write
            raise TrainingError(f"cannot write {path}: {exc.strerror or exc}") from None
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        file_handler.setLevel(logging.DEBUG)
        logger.addHandler(file_handler)
    return logger


def log_file_only(logger: logging.Logger, message: str, level: str = "INFO") -> None:
    """A line for train.log alone: what train.py also prints on stderr (an error, a stop) is said once there."""
    record = logger.makeRecord(logger.name, getattr(logging, level), __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
