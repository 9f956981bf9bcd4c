"""Atomic file writes: a fresh temporary next to the target, fsync, rename, fsync of the folder.

A killed process leaves either the old file or the new one, never half of one; it may leave its
temporary `<name>.tmp-<pid>`, which `sweep_temporaries` removes at the next start.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_MARK = ".tmp-"
TEMP_NAME = re.compile(r".+\.tmp-\d+")  # what temporary_path makes; the sweep removes nothing else

# O_EXCL: a new file or an error, so a symlink planted at the temporary's name is never followed
# (its target would be overwritten, and the rename would put the symlink in place of the file).
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")


def open_temporary(path: Path) -> tuple[BinaryIO, Path]:
    """A new, empty temporary file for `path`, opened for writing."""
    temp = temporary_path(path)
    try:
        fd = os.open(temp, CREATE_FLAGS, 0o666)
    except FileExistsError:
        # Left by a killed process that had our pid, or planted: unlink the name (a symlink itself, not
        # its target) and create afresh; a name that reappears meanwhile fails again, loudly.
        os.unlink(temp)
        fd = os.open(temp, CREATE_FLAGS, 0o666)
    return os.fdopen(fd, "wb"), temp


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(handle)` atomically. On an error the temporary is removed, the file
    at `path` is untouched and the error propagates."""
    handle, temp = open_temporary(path)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)  # replaces a symlink at `path` itself, never its target
    except Exception:
        # Not on a second Ctrl-C (KeyboardInterrupt), which stops at once: its orphan is swept at the next start.
        remove_quietly(temp)
        raise
    fsync_dir(path.parent)


def sweep_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries that killed writes left in `directory`: only names made by temporary_path,
    and symlinks are unlinked, never followed."""
    directory, removed = Path(directory), []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed
    for name in names:
        if TEMP_NAME.fullmatch(name):
            try:
                os.unlink(directory / name)  # a directory of that name raises, and is kept
                removed.append(directory / name)
            except OSError:
                pass
    return removed
