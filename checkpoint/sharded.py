"""Sharded checkpoints (trainer.strategy fsdp): torch.distributed.checkpoint (DCP) with this project's guarantees.

DCP alone overwrites shards in place, stores no checksums and reads `.metadata` with plain pickle. Here:

    checkpoints/
      step-120/                 one save: DCP's files, trainer.pth and manifest.json
        __0_0.distcp  __1_0.distcp  .metadata   each rank's shards of {model, optim}, and DCP's index
        trainer.pth             the rest of the run state (counters, RNG per rank, config...), a plain dict
        manifest.json           size and SHA-256 of every other file, then a line with the body's own SHA-256
      epoch-3/
      last  best                pointer files: one line naming a checkpoint directory

A save writes into a new `<name>.tmp-<32 hex>/`, in the background (ShardedSaver: training goes on once DCP has
copied the state to CPU memory); every rank's files are fsynced (DCP's sync_files) and hashed by that rank;
after the ranks meet, rank 0 writes trainer.pth and the manifest, fsyncs, renames the directory to its name
and fsyncs checkpoints/, and only then moves the pointers (atomic text files). A kill at any moment leaves the
previous pointers naming complete directories; a `.tmp-` directory is never read, and the next save sweeps it.

A load verifies the manifest (its own checksum, then every listed file's size and SHA-256, and no file
missing) before anything else is read; `.metadata` is then unpickled from those verified bytes by an
unpickler that admits DCP's metadata classes only, and DCP is handed that object instead of reading the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import threading
import uuid
import warnings
from pathlib import Path

import torch

from errors import CheckpointError, TrainingError

# strategy fsdp in one process (no torchrun; a resume to one process) saves and loads its one shard on
# purpose: DCP's warning that it assumes so would only alarm.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
from runtime.atomic_write import atomic_write, fsync_dir

MANIFEST, TRAINER_FILE, METADATA = "manifest.json", "trainer.pth", ".metadata"
MANIFEST_FORMAT = "sharded-1"
POINTERS = ("last", "best")
CHECKPOINT_NAME = re.compile(r"(step|epoch)-(\d+)(?:-(\d+))?\Z")  # -K: a second save of one step (after a resume)
TEMP_DIR = re.compile(r"(step|epoch)-\d+(?:-\d+)?\.tmp-[0-9a-f]{32}\Z")
CHUNK = 1 << 22


# ---- what a sharded checkpoint is -----------------------------------------------------------------------
def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file()


def is_sharded_run(checkpoints: Path) -> bool:
    """A checkpoints/ folder written with strategy fsdp (a pointer file or a checkpoint directory)."""
    return checkpoints.is_dir() and (any((checkpoints / p).is_file() for p in POINTERS)
                                     or any(is_checkpoint_dir(d) for d in _named_dirs(checkpoints)))


def _named_dirs(checkpoints: Path) -> list[Path]:
    try:
        return [checkpoints / n for n in os.listdir(checkpoints) if CHECKPOINT_NAME.fullmatch(n)]
    except OSError:
        return []


def read_pointer(checkpoints: Path, name: str) -> Path | None:
    """The directory a pointer file names, or None (no pointer). A pointer naming anything but a checkpoint
    directory of this folder is refused."""
    pointer = checkpoints / name
    if not pointer.is_file():
        return None
    try:
        target = pointer.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable pointer file ({exc})") from None
    if not CHECKPOINT_NAME.fullmatch(target):
        raise CheckpointError(f"{pointer}: does not name a checkpoint directory (got {target[:60]!r})")
    return checkpoints / target


# ---- saving (a collective call: every rank) ------------------------------------------------------------
class ShardedSaver:
    """Sharded saves that finish in the background, one at a time; a trainer holds one.

    `save` stalls training for what must be a snapshot only: the run state (serialised at once) and DCP's
    async_save, which copies every tensor to new CPU memory before it returns, so training may change the
    weights and the optimizer state meanwhile. A thread of each rank then waits for DCP's files, fsyncs and
    hashes its own, and the ranks meet; rank 0 writes trainer.pth and the manifest, renames the directory
    into place and only then moves the pointers and prunes, exactly as a synchronous save would. A kill at
    any moment thus leaves the previous pointers, or the new ones naming a complete directory.

    The threads use two gloo groups of their own, made at the first save: DCP's async_save on the training
    group aborts gloo ranks (its thread and training would issue collectives on one group in no fixed
    order), and no background thread may touch the training group. DCP's thread uses the first; ours, after
    DCP's future has resolved on its rank, the second. `wait` joins the thread (before the next save, at the
    end of training, on a stop signal) and raises the save's failure on every rank alike."""

    def __init__(self):
        self._groups = None  # (DCP's group, ours): gloo, over every rank
        self._thread: threading.Thread | None = None
        self._outcome: tuple[Path | None, str | None] = (None, None)  # (the directory, or why there is none)

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def save(self, trainer, names: list[str], epoch_finished: bool, message: str | None = None) -> None:
        """Start saving the trainer's state as a new checkpoint directory and point `names` (of "best", "last")
        at it once complete; "epoch-<N>" directories are kept as `trainer.keep_last` says. `message` is logged
        when the save is complete. Every rank calls this."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from checkpoint.io import checkpoint_bytes
        from checkpoint.state import unwrap_model
        from runtime.distributed import broadcast_buffers, broadcast_object

        self.wait()  # one save at a time: the previous one is complete (or its failure raised) first
        state = trainer.checkpoint_state(epoch_finished)  # collective: per-rank RNG, the NaN guard
        del state["optimizer"]  # the weights and the optimizer state go through DCP, sharded
        state["state_dict"] = {}
        state["sharded"] = True
        # Buffers are not sharded: DCP saves one rank's copy of each, not necessarily rank 0's. The ranks' copies
        # differ after a training forward (BatchNorm statistics of their own batches); the next training forward
        # broadcasts rank 0's anyway (as DDP's broadcast_buffers), so taking them now changes nothing but what
        # is saved: rank 0's, as a DDP run saves, and what every rank resumes with.
        broadcast_buffers(unwrap_model(trainer.model))
        model_state, optim_state = get_state_dict(unwrap_model(trainer.model), trainer.optimizer)
        folder, main = trainer.checkpoint_dir, trainer.dist.is_main
        if folder is None:
            return
        base = f"epoch-{trainer.epoch}" if epoch_finished else f"step-{trainer.global_step}"
        temp = None
        if main:
            trainer.flush_logs()  # as for .pth checkpoints: what is logged up to the step is on disk first
            folder.mkdir(parents=True, exist_ok=True)
            for stale in sweep_temporary_dirs(folder):
                trainer.logger.info(f"removed {stale.name} left by an interrupted save")
            temp = folder / f"{base}.tmp-{uuid.uuid4().hex}"
            temp.mkdir()
        temp = Path(broadcast_object(str(temp) if temp else None))
        run_state = checkpoint_bytes(state) if main else b""  # the counters, RNG states... as of this step
        distributed = dist.is_available() and dist.is_initialized()
        if distributed and self._groups is None:
            self._groups = (dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
        try:
            # sync_files: each rank fsyncs its own shard files before DCP's final collective.
            future = dcp.async_save({"model": model_state, "optim": optim_state},
                                    storage_writer=dcp.FileSystemWriter(temp, sync_files=True,
                                                                        single_file_per_rank=True),
                                    process_group=self._groups[0] if distributed else None)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - staging to CPU memory failed (out of memory)
            raise TrainingError(f"could not write checkpoint {temp}: {_reason(exc)}; "
                                f"the previous checkpoints are intact") from None
        job = {"future": future, "temp": temp, "folder": folder, "base": base, "names": list(names),
               "run_state": run_state, "rank": trainer.dist.rank, "main": main, "keep_last": trainer.keep_last,
               "save_period": trainer.save_period, "logger": trainer.logger, "message": message}
        self._outcome = (None, None)
        self._thread = threading.Thread(target=self._finish, args=(job,), name="sharded-save")
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the pending save is complete; its directory, or None (nothing pending, no directory).
        Raises TrainingError, on every rank, when it failed: the previous checkpoints are then intact."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        final, problem = self._outcome
        if problem:
            raise TrainingError(problem)
        return final

    def _finish(self, job: dict) -> None:
        """The background part, in a thread of each rank; every rank takes part in both collectives, whatever
        failed, so that none waits for another forever."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        temp, problem, hashed, final = job["temp"], None, {}, None
        try:
            job["future"].result()  # DCP's files are written and fsynced (sync_files), .metadata last
            # Each rank hashes the shard files it wrote (DCP names them __<rank>_<i>.distcp), in parallel.
            hashed = _describe_files(temp, lambda name: name.startswith(f"__{job['rank']}_"))
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a full disk, an unwritable folder, any rank
            problem = f"could not write checkpoint {temp}: {_reason(exc)}; the previous checkpoints are intact"
        group = self._groups[1] if self._groups is not None else None
        if group is not None:
            parts = [None] * dist.get_world_size(group)
            try:
                dist.all_gather_object(parts, (hashed, problem), group=group)  # also the barrier: all fsynced
            except Exception as exc:  # noqa: BLE001 - another rank died: nothing is published
                self._outcome = (None, f"could not write checkpoint {temp}: {_reason(exc)}; "
                                       f"the previous checkpoints are intact")
                return
            problem = next((p for _, p in parts if p), None)
            hashed = {name: entry for part, _ in parts for name, entry in part.items()}
        if job["main"] and problem is None:
            try:
                atomic_write(temp / TRAINER_FILE, lambda handle: handle.write(job["run_state"]))
                final = _publish(temp, job["folder"], job["base"], hashed)
                for name in ("best", "last"):  # best first: `last` names the newest complete save
                    if name in job["names"]:
                        atomic_write(job["folder"] / name, lambda h: h.write(f"{final.name}\n".encode()))
                _prune(job["folder"], job["keep_last"], job["save_period"])
                job["logger"].debug(f"saved {final}")
                if job["message"]:
                    job["logger"].info(job["message"])
            except Exception as exc:  # noqa: BLE001 - an I/O error; the other ranks must hear of it either way
                problem = (f"could not write checkpoint {final or temp}: {_reason(exc)}; "
                           f"the previous checkpoints are intact")
        if group is not None:
            box = [(problem, str(final) if final else None)]
            try:
                dist.broadcast_object_list(box, src=0, group=group)
                problem, final = box[0][0], Path(box[0][1]) if box[0][1] else None
            except Exception as exc:  # noqa: BLE001 - rank 0 died: whether it published, a resume finds out
                problem = problem or f"could not learn whether checkpoint {temp} was published: {_reason(exc)}"
        self._outcome = (final, problem)


def _reason(exc: BaseException) -> str:
    """One line of an error of DCP's (whose CheckpointException lists every rank's traceback) or of I/O."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"\w*(Error|Exception)\b", line)]
    return " ".join((found[-1:] or lines[:1] or [type(exc).__name__])[0].split())[:300]


def _describe_files(folder: Path, which) -> dict:
    """{name: {size, sha256}} of the files in `folder` whose name `which` accepts, each fsynced."""
    files = {}
    for path in sorted(folder.iterdir()):
        if which(path.name):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())  # a no-op cost when DCP (sync_files) or atomic_write has synced it
                files[path.name] = {"size": os.fstat(handle.fileno()).st_size, "sha256": _sha256(handle)}
    return files


def _publish(temp: Path, folder: Path, base: str, hashed: dict | None = None) -> Path:
    """Manifest (the files `hashed` describes, and every other file hashed here), fsync, rename into place,
    fsync of checkpoints/."""
    hashed = hashed or {}
    files = {**hashed, **_describe_files(temp, lambda name: name not in hashed)}
    if set(files) != set(os.listdir(temp)):
        raise TrainingError(f"{temp}: files changed while the manifest was written")
    body = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True).encode()
    atomic_write(temp / MANIFEST, lambda h: h.write(body + b"\nsha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n"))
    fsync_dir(temp)
    final, k = folder / base, 1
    while os.path.lexists(final):  # the same step saved again after a resume: a new name, never a rewrite
        final, k = folder / f"{base}-{k}", k + 1
    os.rename(temp, final)
    fsync_dir(folder)
    return final


def _sha256(handle) -> str:
    digest = hashlib.sha256()
    handle.seek(0)
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _prune(folder: Path, keep_last: int, save_period: int) -> None:
    """Remove the checkpoint directories nothing needs: not named by a pointer, and not one of the
    `keep_last` newest periodic epoch-<N> (all periodic ones when keep_last is 0)."""
    keep = set()
    for name in POINTERS:
        try:
            target = read_pointer(folder, name)
        except CheckpointError:
            continue
        if target is not None:
            keep.add(target.name)
    periodic = []
    for path in _named_dirs(folder):
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match.group(1) == "epoch" and save_period and int(match.group(2)) % save_period == 0:
            periodic.append((int(match.group(2)), int(match.group(3) or 0), path.name))
    periodic.sort()
    keep.update(name for *_, name in (periodic[-keep_last:] if keep_last else periodic))
    for path in _named_dirs(folder):
        if path.name not in keep:
            _remove_dir(path)


def _remove_dir(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def sweep_temporary_dirs(folder: Path) -> list[Path]:
    """The `<name>.tmp-<hex>/` directories of saves that were killed (nothing ever reads them)."""
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        if TEMP_DIR.fullmatch(name):
            _remove_dir(folder / name)
            removed.append(folder / name)
    return removed


# ---- loading -------------------------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata holds its own dataclasses, torch.Size, dtypes, a layout and the save's path; nothing
    else is admitted, so a crafted file cannot make the unpickler call anything else."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}
    MODULES = ("torch.distributed.checkpoint.metadata",)

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in self.MODULES and not name.startswith("__"):
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:  # its own classes, not what it imports
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def read_metadata(data: bytes, where: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - whatever the bytes make the unpickler raise, the file is at fault
        raise CheckpointError(f"{where}: refused: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where}: not DCP metadata (a {type(metadata).__name__})")
    return metadata


def _reader(folder: Path, metadata):
    """DCP's file reader, handed the verified metadata instead of unpickling the file itself."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class VerifiedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return VerifiedReader(folder)


def verify(folder: Path):
    """Check the manifest and every file it lists; return DCP's metadata (from the verified bytes)."""
    manifest = folder / MANIFEST
    try:
        raw = manifest.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{manifest}: cannot read ({exc.strerror})") from None
    body, _, tail = raw.rpartition(b"\nsha256 ")
    if not body or tail.strip() != hashlib.sha256(body).hexdigest().encode():
        raise CheckpointError(f"{manifest}: checksum mismatch: the manifest is corrupted")
    try:
        files = json.loads(body)["files"]
        assert isinstance(files, dict) and all(isinstance(v["size"], int) and isinstance(v["sha256"], str)
                                               for v in files.values())
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{manifest}: not a manifest of this project") from None
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    if present != set(files) or METADATA not in files or TRAINER_FILE not in files:
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        raise CheckpointError(f"{folder}: files do not match the manifest (missing {missing}, unlisted {extra})")
    metadata_bytes = b""
    for name, entry in sorted(files.items()):
        path = folder / name
        if "/" in name or path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size != entry["size"]:
                raise CheckpointError(f"{path}: truncated or grown: {os.fstat(handle.fileno()).st_size} bytes, "
                                      f"the manifest says {entry['size']}")
            if name == METADATA:  # the bytes checked are the bytes unpickled
                metadata_bytes = handle.read()
                actual = hashlib.sha256(metadata_bytes).hexdigest()
            else:
                actual = _sha256(handle)
        if actual != entry["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted")
    return read_metadata(metadata_bytes, folder / METADATA)


def load_sharded_state(folder: Path) -> dict:
    """The run state of a checkpoint directory, verified (all of it, shards included); the weights and the
    optimizer state are read later, into the built model, by `load_into`."""
    from checkpoint.io import load_checkpoint
    from checkpoint.validate import check_resume_state

    metadata = verify(folder)
    state = load_checkpoint(folder / TRAINER_FILE)  # its own CRC-32s too, and weights_only=True
    if state.get("sharded") is not True:
        raise CheckpointError(f"{folder / TRAINER_FILE}: not the state of a sharded checkpoint")
    check_resume_state({**state, "optimizer": {}}, folder / TRAINER_FILE)  # the optimizer's: in DCP
    state["sharded"] = {"path": str(folder), "metadata": metadata}
    return state


def find_sharded(target: Path) -> tuple[Path, dict, list[str]]:
    """(checkpoint directory, its state, notes) for `-r`: a checkpoint directory itself, or a checkpoints/
    folder: the one `last` names, else the newest valid one."""
    if is_checkpoint_dir(target):
        return target, load_sharded_state(target), []
    notes, tried = [], set()
    candidates = []
    try:
        last = read_pointer(target, "last")
        if last is not None:
            candidates.append(last)
    except CheckpointError as exc:
        notes.append(str(exc))
    others = [d for d in _named_dirs(target) if d.is_dir()]
    others.sort(key=lambda d: -(d / MANIFEST).stat().st_mtime if (d / MANIFEST).exists() else 0)
    for folder in candidates + others:
        if folder.name in tried:
            continue
        tried.add(folder.name)
        try:
            return folder, load_sharded_state(folder), notes
        except CheckpointError as exc:
            notes.append(str(exc))
    raise CheckpointError(f"{target}: no valid checkpoint" + (f" ({'; '.join(notes)})" if notes else ""))


def load_into(model, optimizer, sharded: dict) -> None:
    """Read the verified checkpoint's weights and optimizer state into the (sharded or plain) model and its
    optimizer; DCP reshards when the number of processes differs. A collective call under torchrun."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from checkpoint.state import unwrap_model

    folder = Path(sharded["path"])
    model = unwrap_model(model)
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.load({"model": model_state, "optim": optim_state}, storage_reader=_reader(folder, sharded["metadata"]))
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    except Exception as exc:  # noqa: BLE001 - a checkpoint of another model, or shards damaged since verify
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{folder}: does not load into {type(model).__name__}: {first}") from None


def read_full(folder: Path) -> dict:
    """Every tensor of a verified checkpoint directory, whole, in one process: {"model": ..., "optim": ...}."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    metadata = verify(folder)
    full: dict = {}
    _load_state_dict(full, storage_reader=_reader(folder, metadata), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return full
