"""The run directory <save_dir>/<name>/<run_id>/ and finding what to resume."""
from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime
from pathlib import Path

import yaml

from config.schema import NAME_RE
from errors import ConfigError, TrainingError, UserError
from runtime.atomic_write import atomic_write


def check_run_id(run_id: str) -> None:
    if not NAME_RE.match(run_id) or run_id in (".", ".."):
        raise ConfigError(f"--run-id: {run_id!r} must be a plain directory name (letters, digits, _ . -; no / or ..)")


def run_root(config: dict) -> Path:
    return Path(config["trainer"]["save_dir"]) / config["name"]


def new_run_id() -> str:
    # Microseconds: two runs started in the same second get different directories.
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f")


# File descriptors of the run locks this process holds. A forked child (a DataLoader worker) closes
# its copies: a flock lives as long as any descriptor of it, and a worker that outlives its killed
# parent by a few seconds must not keep the run locked against the resume.
_held_locks: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in _held_locks:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


class RunLock:
    """An exclusive flock on <run_dir>/.lock, held by the writing process for the whole run.

    The OS drops it when the process dies, however it dies, so a crashed run never blocks a resume;
    a second train.py on the same run directory is refused before it sweeps or writes anything.
    """

    def __init__(self, run_dir: Path):
        path = run_dir / ".lock"
        try:
            # O_NOFOLLOW: a planted symlink must not make us truncate its target below.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"cannot lock run directory {run_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise UserError(f"run directory {run_dir} is in use by process {owner}; wait for it to finish "
                            f"(or stop it), then resume with -r {run_dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd
        _held_locks.add(fd)

    def release(self) -> None:
        if self.fd is not None:
            _held_locks.discard(self.fd)
            os.close(self.fd)
            self.fd = None


def checkpoints_stamp(run_dir: Path) -> tuple:
    """What a save into <run_dir>/checkpoints changes: each entry's name, inode, size and mtime (a save
    renames a new file or pointer into place; temporaries of a save under way do not count)."""
    stamp = []
    try:
        with os.scandir(run_dir / "checkpoints") as entries:
            for entry in entries:
                if ".tmp" in entry.name:
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed by the retention of another process's save
                    continue
                stamp.append((entry.name, info.st_ino, info.st_size, info.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(stamp))


def has_checkpoint(run_dir: Path) -> bool:
    # Temporaries (last.pth.tmp-<pid>) of a save that was killed do not count.
    # A sharded run (trainer.strategy fsdp) has its pointer file `last` once a save is complete.
    return any((run_dir / "checkpoints").glob("*.pth")) or (run_dir / "checkpoints" / "last").is_file()


def create_run_dir(config: dict, run_id: str | None) -> tuple[Path, RunLock, bool]:
    """(run directory, its lock, reused): a new directory, locked.

    An explicit run id that exists already is an error, unless that run stopped before its first
    checkpoint: then there is nothing to resume and the same command starts it afresh (reused).
    """
    root = run_root(config)
    for _ in range(100):
        path = root / (run_id or new_run_id())
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            if run_id:
                return path, _reuse(path), True
            continue
        except OSError as exc:
            raise UserError(f"cannot create run directory {path}: {exc.strerror or exc}") from None
        lock = RunLock(path)
        (path / "checkpoints").mkdir(exist_ok=True)
        return path, lock, False
    raise UserError(f"could not find a free run directory under {root}")


def _reuse(path: Path) -> RunLock:
    exists = f"run directory {path} exists; resume it with -r {path}, or pick another --run-id"
    # A run directory (or the empty folder of a start killed at once), never some other folder.
    if not path.is_dir() or has_checkpoint(path) or not ((path / "checkpoints").is_dir() or not any(path.iterdir())):
        raise UserError(exists)
    lock = RunLock(path)  # refused while the earlier start still runs
    if has_checkpoint(path):  # it saved while we looked
        lock.release()
        raise UserError(exists)
    (path / "checkpoints").mkdir(exist_ok=True)
    return lock


def write_config(config: dict, run_dir: Path, suffix: str) -> Path:
    """Write the resolved config atomically; a full disk or a read-only run directory is a one-line
    TrainingError (exit 1, like a checkpoint that cannot be written) and leaves no temporary behind."""
    path = run_dir / ("config.json" if suffix == ".json" else "config.yaml")
    text = json.dumps(config, indent=2) + "\n" if suffix == ".json" else yaml.safe_dump(config, sort_keys=False)
    try:
        atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    except OSError as exc:
        raise TrainingError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def locate_checkpoint(target: str, option: str = "-r ") -> tuple[Path, Path | None]:
    """What `-r target` names, for train.py and test.py alike: (a checkpoint file, or the checkpoints/ folder
    to choose one from; the run directory, or None for a file outside one). A run directory, its
    checkpoints/ folder and a checkpoint file are all accepted. `option`: how errors name the target
    ("" for a command whose argument it is)."""
    path = Path(target)
    named = f"{option}{target}"
    if not path.exists():
        raise UserError(f"{named}: no such file or directory")
    if not path.is_dir():
        return path, path.parent.parent if path.parent.name == "checkpoints" else None
    if (path / "checkpoints").is_dir():
        run_dir = path
    elif path.resolve().name == "checkpoints":
        run_dir = path.parent if path.name == "checkpoints" else path.resolve().parent
    else:
        raise UserError(f"{named}: not a run directory (no checkpoints/ folder), nor a checkpoints/ folder, "
                        f"nor a checkpoint file")
    if not has_checkpoint(run_dir):
        config = next((p for p in (run_dir / "config.yaml", run_dir / "config.json") if p.exists()), None)
        how = f"python train.py -c {config} --run-id {run_dir.name}" if config else f"--run-id {run_dir.name}"
        raise UserError(f"{named}: the run stopped before its first checkpoint, so there is nothing to "
                        f"resume or evaluate; start it afresh with: {how}")
    return run_dir / "checkpoints", run_dir


def config_changes(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key path, old, new) for every leaf that differs between two configs.

    Both must be trees (config.files.plain_tree): a stored config with shared lists would make this
    walk exponential."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in dict.fromkeys([*old, *new]):
            path = f"{prefix}.{key}" if prefix else str(key)
            changes += config_changes(old.get(key), new.get(key), path)
        return changes
    return [] if old == new else [(prefix, old, new)]
