"""Which piece of a run failed, and where in the user's own code: one line instead of a traceback.

The piece (dataset item, collate, model forward, loss, metric, step, hook) comes from the frames of
the traceback; the place is the innermost frame in this project's files, which is the user's code
(model/, data_loader/, trainer/ subclasses) far more often than the scaffold's loop.
"""
from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A DataLoader worker's error arrives re-raised in the main process, its traceback as text.
WORKER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')
HOOKS = ("on_train_start", "on_epoch_start", "on_batch_end", "on_validation_end", "on_train_end")


# The checks' own wrappers (the sanity pass watches the loss's operations): never the place to blame.
WRAPPERS = {ROOT / "trainer" / "sanity.py"}


def is_ours(filename: str) -> bool:
    path = Path(filename).resolve()
    return (path.is_relative_to(ROOT) and not {".venv", "site-packages"} & set(path.parts)
            and path not in WRAPPERS)


def shown(filename: str) -> str:
    """Relative to the working directory when inside it (the usual case: the project's root), else absolute."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return os.path.abspath(filename) if relative.startswith("..") else relative


def _piece(filename: str, function: str, owner: object = None) -> str:
    """What a frame of the project's code is part of."""
    path = Path(filename).resolve()
    relative = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    if relative == "model/loss.py":
        return "loss"
    if relative == "model/metric.py":
        return f"metric {function}"
    if function == "forward" and owner is not None:
        return f"model forward ({type(owner).__name__})"
    if function == "__getitem__":
        return "dataset item" + (f" ({type(owner).__name__}.__getitem__)" if owner is not None else "")
    if "collate" in function:
        return f"collate ({function})"
    if function == "step":
        return "step" + (f" ({type(owner).__name__}.step)" if owner is not None else "")
    if function in HOOKS:
        return f"hook {function}"
    if relative.startswith("data_loader/"):
        return f"data loading ({function})"
    return function


def locate(exc: BaseException) -> tuple[str, str] | None:
    """(piece, "file:line") of the innermost frame in the project's files, or None (all in libraries)."""
    text = str(exc)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its frames are text
        for filename, line, function in reversed(WORKER_FRAME.findall(text)):
            if is_ours(filename):
                return _piece(filename, function), f"{shown(filename)}:{line}"
    found = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        if is_ours(frame.f_code.co_filename):
            found = frame, line
    if found is None:
        return None
    frame, line = found
    owner = frame.f_locals.get("self")
    return _piece(frame.f_code.co_filename, frame.f_code.co_name, owner), f"{shown(frame.f_code.co_filename)}:{line}"


def describe_error(exc: BaseException) -> str:
    """`IndexError: Target 6 is out of bounds.` on one line (a worker's traceback reduced to its message)."""
    from errors import one_line

    return f"{type(exc).__name__}: {one_line(str(exc)).rstrip('.')}"


def worker_died(exc: BaseException) -> bool:
    """A DataLoader worker was killed (SIGKILL, the OOM killer). The iterator's `next()` says so in a
    RuntimeError or, if it was reading from that worker, re-raises the pipe's error."""
    if isinstance(exc, RuntimeError):
        return str(exc).startswith("DataLoader worker")
    if isinstance(exc, (ConnectionError, EOFError)):
        return any("torch/utils/data/" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))
    return False
