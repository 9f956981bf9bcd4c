"""Console and `train.log` (appended on resume) for the whole project, under the logger name "train"."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
NAME = "train"


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(NAME if name is None else f"{NAME}.{name}")


def setup_logging(run_dir: str | Path | None, verbosity: int = 2, is_main: bool = True) -> logging.Logger:
    """Log to stdout and, on the main process, to <run_dir>/train.log; other ranks only warn."""
    logger = get_logger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(LEVELS[verbosity] if is_main else logging.WARNING)
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if run_dir is not None and is_main:
        file_handler = logging.FileHandler(Path(run_dir) / "train.log", mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        file_handler.setLevel(logging.DEBUG)
        logger.addHandler(file_handler)
    return logger
