"""Checkpoint files: atomic writes, the archive verified on load, weights_only loads.

A checkpoint is a plain dict (see README: Checkpoint format) saved by torch.save, which writes a zip
archive with a CRC-32 of every record (the pickle of the dict, and each tensor's bytes). torch.load
checks neither those CRCs nor the consistency of the zip structure, so a flipped bit would load
silently: load_checkpoint checks both (checkpoint/archive.py): the structure and the small records before
torch.load(mmap=True), each tensor's record over the very memory torch.load mapped before returning it. The
checksum costs nothing extra to write: torch.save computes it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from checkpoint.archive import (ZIP_MAGIC, ArchiveError, ChecksumMismatch, Record, check_crcs, check_structure,
                                has_checksums)
from checkpoint.file_kind import describe_not_a_checkpoint, why_refused
from checkpoint.validate import check_resume_state
from errors import CheckpointError, TrainingError
from runtime.atomic_write import atomic_write, fsync_dir, remove_quietly, temporary_path

CHECKPOINT_FORMAT = 1


def _check_plain(obj: Any, where: str = "state", seen: set[int] | None = None) -> None:
    """Refuse, before writing, anything that torch.load(weights_only=True) would refuse to read back.
    Each container is walked once: shared references (YAML aliases, pickle's memo) stay linear."""
    if isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, (dict, list, tuple)):
        seen = set() if seen is None else seen
        if id(obj) in seen:
            return
        seen.add(id(obj))
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, where, seen)
            _check_plain(value, f"{where}[{key!r}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_plain(item, f"{where}[{i}]", seen)
    # Exact types: a str subclass such as torch.__version__ would not load with weights_only=True.
    elif not (obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Size)):
        raise TypeError(f"checkpoints hold plain data only, found {type(obj).__name__} at {where}")


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` atomically: temp file, fsync, rename, fsync dir.

    On any failure the previous file at `path` is untouched and TrainingError is raised.
    """
    path = Path(path)
    _check_plain(state)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TrainingError(f"could not write checkpoint {path}: {path.parent} is not a directory") from None
    existed = os.path.lexists(path)
    try:
        atomic_write(path, lambda handle: _torch_save(state, handle))
    except (OSError, RuntimeError) as exc:  # a full disk makes torch.save raise RuntimeError
        outcome = "the previous file is intact" if existed else "no checkpoint was written"
        raise TrainingError(f"could not write checkpoint {path}: {_reason(exc)}; {outcome}") from None
    return path


def _torch_save(state: dict, handle) -> None:
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)  # the checksum load_checkpoint verifies
    try:
        torch.save(state, handle)
    finally:
        torch.serialization.set_crc32_options(crc32)


def _reason(exc: BaseException) -> str:
    # torch.save turns the OSError of a write (e.g. ENOSPC) into "unexpected pos ..."; the OSError
    # is kept as its __context__ and says what happened.
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__context__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def link_checkpoint(source: Path, target: Path) -> Path:
    """Give a just-written checkpoint another name without serialising it again, atomically.

    A hard link where the file system has them, else a copy (fsynced); then rename and fsync dir.
    """
    temp = temporary_path(target)
    try:
        remove_quietly(temp)  # stale or planted: the name goes, a symlink's target is not touched
        try:
            os.link(source, temp)  # never writes through an existing name: that fails with EEXIST
        except FileExistsError:  # planted again since the unlink: give up rather than guess
            raise
        except OSError:  # no hard links on this file system: copy, through a fresh temporary
            with open(source, "rb") as original:
                atomic_write(target, lambda handle: shutil.copyfileobj(original, handle, 2**20))
            return target
        os.replace(temp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        remove_quietly(temp)
        raise TrainingError(f"could not write checkpoint {target}: {_reason(exc)}") from None
    return target


def load_checkpoint(path: str | Path) -> dict:
    """Verify the archive (structure and every record's CRC-32), then load with weights_only=True;
    every failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    kind = describe_not_a_checkpoint(path)  # a config, a log, a directory: said so, not "corrupt"
    if kind:
        raise CheckpointError(f"{path}: {kind}")
    try:
        # One open file for the check and the load: the bytes verified are the bytes loaded, even if
        # the name is replaced meanwhile.
        with open(path, "rb") as handle:
            if handle.read(4) == ZIP_MAGIC:
                state = _load_verified(handle)
            else:  # a legacy pickle, refused (or reported) by torch.load
                handle.seek(0)
                state = torch.load(handle, map_location="cpu", weights_only=True)
    except ChecksumMismatch as exc:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted ({exc})") from None
    except ArchiveError as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({exc})") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "Weights only load failed" in first or "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: {why_refused(path)}") from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({first or 'unpickling failed'})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes torch raise, it is the file's fault
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no state_dict)")
    return state


def _load_verified(handle) -> Any:
    """torch.load(mmap=True) of the open file, every record verified before anything is returned.

    The structure and the small records (the pickle, the byte order) are checked first, over a mapping of the
    file; each tensor's record (torch.save stores it as it is) then over the storage torch.load made of it.
    That pass over torch's own mapping faults in the pages the caller reads next: a check over a mapping of its
    own paid the page faults twice (7-14 ms a GiB here; 2-5% of a verified load and read). A record that no
    loaded storage covers whole is checked over the file's mapping."""
    if not handle.seek(0, 2):
        raise ArchiveError("empty file")
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data, memoryview(data) as file:
        records = check_structure(data)
        if not has_checksums(records):
            return _load_mapped(handle)
        tensors, others = [], []  # torch.load reads a storage from the record data/<key> of the archive's folder
        for r in records:
            (tensors if r.size and r.name.partition(b"/")[2].startswith(b"data/") else others).append(r)
        check_crcs(others, [file[r.start:r.start + r.size] for r in others])  # before the unpickler reads them
        state = _load_mapped(handle)
        # A file from a machine of the other byte order: torch swaps the bytes of each storage in its copy.
        order = next((bytes(file[r.start:r.start + r.size]) for r in others if r.name.endswith(b"/byteorder")), None)
        loaded = _storage_views(state, tensors) if order in (None, sys.byteorder.encode()) else {}
        check_crcs(tensors, [loaded[r.start] if r.start in loaded else file[r.start:r.start + r.size]
                             for r in tensors])
    return state


def _storage_views(state: Any, records: list[Record]) -> dict[int, memoryview]:
    """The bytes of each loaded storage that is a whole record, by the record's start offset. torch.load(mmap=True)
    makes every storage a slice of one mapping of the file, at its record's start: pointer differences are
    offset differences, and the lowest storage is the first tensor record (torch.save writes no record that its
    pickle does not use; elsewhere the storages may match no record, and the records are checked over the file)."""
    storages, seen, stack = {}, set(), [state]
    while stack:  # no recursion: a deep state is not a RecursionError; shared containers are walked once
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.layout == torch.strided and obj.device.type == "cpu" and obj.untyped_storage().nbytes():
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, (dict, list, tuple, set, frozenset)) and id(obj) not in seen:
            seen.add(id(obj))
            stack.extend(obj.values() if isinstance(obj, dict) else obj)
    if not storages or not records:
        return {}
    base = min(storages) - records[0].start
    by_start = {r.start: r for r in records}
    views = {}
    for pointer, nbytes in storages.items():
        record = by_start.get(pointer - base)
        if record is not None and record.size == nbytes:
            views[record.start] = memoryview((ctypes.c_char * nbytes).from_address(pointer)).cast("B")
    return views


def _load_mapped(handle) -> Any:
    """torch.load with mmap=True of the file open as `handle`: its tensors are views of the page cache, not a
    second read of the file. torch opens the file by name, so it gets a name of this open file (not of the
    path, which may be replaced meanwhile). The mapping is private whatever torch's default: an in-place update
    of a loaded tensor (the optimizer's state on the CPU after a resume) copies the page and never writes into
    the checkpoint."""
    name = next((f"{folder}/{handle.fileno()}" for folder in ("/proc/self/fd", "/dev/fd") if os.path.isdir(folder)),
                handle.name)
    with torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE):
        return torch.load(name, mmap=True, map_location="cpu", weights_only=True)


def find_resume_checkpoint(run_dir: str | Path) -> tuple[Path, dict, list[str]]:
    """The newest valid, resumable checkpoint of a run: last.pth, else the others newest first.

    Returns (path, state, notes); notes say which files were refused and why.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (no checkpoints/ folder)")
    files = [p for p in folder.glob("*.pth") if p.is_file()]
    if not files and (folder / "last").is_file():
        raise CheckpointError(f"{run_dir}: its checkpoints are sharded (trainer.strategy fsdp); for one file: "
                              f"python -m checkpoint.consolidate {run_dir} model.pth")
    files.sort(key=lambda p: (p.name != "last.pth", -p.stat().st_mtime))
    notes = []
    for path in files:
        try:
            state = load_checkpoint(path)
            check_resume_state(state, path)
            return path, state, notes
        except CheckpointError as exc:
            notes.append(str(exc))
    raise CheckpointError(f"{run_dir}: no valid checkpoint" + (f" ({'; '.join(notes)})" if notes else ""))
