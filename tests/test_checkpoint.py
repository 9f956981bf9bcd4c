"""Checkpoint files: contents, buffers, refusal of corrupt and malicious files, atomic and failing
writes, fallback and overrides on resume. Resume exactness is in test_resume.py."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, ROOT, run_script
from checkpoint import (find_resume_checkpoint, load_checkpoint, load_model_state, save_checkpoint,
                        sweep_temporaries, verify_archive)
from errors import CheckpointError, TrainingError

CONFIG = str(ROOT / "configs" / "digits.yaml")
SMALL = ["trainer.epochs=1", "arch.args.channels=8", "trainer.save_period=1", "trainer.save_every_steps=5",
         "trainer.histograms=false", "trainer.images=false", "trainer.verbosity=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished one-epoch run: last.pth, best.pth and epoch-1.pth (links to one file)."""
    save_dir = tmp_path_factory.mktemp("saved")
    run_script("train.py", "-c", CONFIG, "--run-id", "base", f"trainer.save_dir={save_dir}", *SMALL, check=True)
    return save_dir / "digits" / "base"


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def rewrite(path: Path, data: bytes) -> None:
    """Replace a file by a new one: last/best/epoch-N are hard links, an in-place edit would hit them all."""
    path.unlink()
    path.write_bytes(data)


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data inside the zip archive."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len
    data[start + member.file_size // 2] ^= 0xFF
    rewrite(path, bytes(data))


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoints(tmp_path: Path, marker: Path) -> list[Path]:
    evil_zip = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "checksum": "0", "config": Payload(marker)}, evil_zip)
    evil_pickle = tmp_path / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    return [evil_zip, evil_pickle]


# ---- contents ---------------------------------------------------------------------------------

def test_loads_with_plain_torch_load_outside_the_project(run_dir):
    """A fresh interpreter, cwd=/tmp, isolated mode (no project on sys.path), plain weights_only load."""
    code = ("import json, sys, torch; s = torch.load(sys.argv[1], weights_only=True); "
            "print(json.dumps({k: type(v).__name__ for k, v in s.items()}))")
    proc = subprocess.run([PYTHON, "-I", "-c", code, str(run_dir / "checkpoints" / "last.pth")], cwd="/tmp",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kinds = json.loads(proc.stdout)
    required = {"state_dict": "dict", "optimizer": "dict", "lr_scheduler": "dict", "scaler": "NoneType",
                "epoch": "int", "global_step": "int", "batch_in_epoch": "int", "samples_in_epoch": "int",
                "epoch_finished": "bool", "monitor_best": "float", "not_improved_count": "int",
                "ranks": "list", "data_order": "dict", "config": "dict", "arch": "str", "format": "int",
                "torch_version": "str"}
    assert {k: kinds.get(k) for k in required} == required | {"state_dict": kinds["state_dict"]}
    assert kinds["state_dict"] in ("dict", "OrderedDict")
    state = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    rng = state["ranks"][0]["rng"]
    assert set(rng) == {"python", "numpy", "torch", "cuda"} and isinstance(rng["torch"], torch.Tensor)
    assert state["arch"] == "DigitsCNN" and state["config"]["arch"]["args"]["channels"] == 8
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["state_dict"])


def test_persistent_buffers_round_trip_and_non_persistent_are_not_saved(tmp_path, run_dir):
    from model.model import DigitsCNN

    model = DigitsCNN(channels=8, pixel_mean=1.5, pixel_std=2.5)
    model.train()
    model(torch.randn(16, 1, 8, 8))  # moves the BatchNorm running statistics
    save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    saved = load_checkpoint(tmp_path / "m.pth")["state_dict"]
    assert "coords" not in saved
    assert {"pixel_mean", "pixel_std", "features.1.running_mean", "features.1.running_var",
            "features.1.num_batches_tracked"} <= set(saved)
    fresh = DigitsCNN(channels=8)
    assert not torch.equal(fresh.features[1].running_mean, model.features[1].running_mean)
    load_model_state(fresh, saved)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh.coords, model.coords)  # rebuilt by the constructor, not loaded
    # The same holds for a checkpoint written by a real run.
    real = load_checkpoint(run_dir / "checkpoints" / "last.pth")["state_dict"]
    assert "coords" not in real and int(real["features.1.num_batches_tracked"]) > 0


def test_mismatched_model_lists_missing_unexpected_and_shape_keys(tmp_path):
    from model.model import DigitsCNN

    source = DigitsCNN(channels=8, pixel_mean=1.5).state_dict()
    del source["classifier.5.bias"]
    source["extra.weight"] = torch.zeros(3)
    target = DigitsCNN(channels=16)
    with pytest.raises(CheckpointError) as info:
        load_model_state(target, source, source="x.pth")
    message = str(info.value)
    assert "missing keys: classifier.5.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "shape-mismatched keys: features.0.weight (8, 3, 3, 3) vs model (16, 3, 3, 3)" in message
    before = target.features[0].weight.clone()
    notes = load_model_state(target, source, strict=False)
    assert len(notes) == 3
    assert torch.equal(target.pixel_mean, source["pixel_mean"])  # matching keys are loaded
    assert torch.equal(target.features[0].weight, before)  # mismatched ones are left alone


def test_pretrained_partial_load_only_with_strict_false(tmp_path, run_dir):
    from config import load_config
    from config.build import build_model

    path = run_dir / "checkpoints" / "best.pth"
    wider = ["arch.args.channels=16", f"arch.pretrained={path}"]
    with pytest.raises(CheckpointError, match="shape-mismatched keys"):
        build_model(load_config(CONFIG, wider))
    model = build_model(load_config(CONFIG, wider + ["arch.strict=false"]))
    saved = load_checkpoint(path)["state_dict"]
    assert torch.equal(model.classifier[5].weight, saved["classifier.5.weight"])  # same shape in both widths
    assert model.features[0].weight.shape[0] == 16


def test_mismatched_checkpoint_on_the_command_line_exits_2(run_dir):
    proc = run_script("test.py", "-r", str(run_dir / "checkpoints" / "best.pth"), "arch.args.channels=16")
    assert proc.returncode == 2, proc.stderr
    assert "shape-mismatched keys: features.0.weight" in proc.stderr and "Traceback" not in proc.stderr


# ---- corrupt and malicious files --------------------------------------------------------------

@pytest.mark.parametrize("force_unsafe", [False, True])
def test_corrupt_and_malicious_files_are_refused(tmp_path, run_dir, monkeypatch, force_unsafe):
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    good = (run_dir / "checkpoints" / "last.pth").read_bytes()
    truncated, flipped = tmp_path / "truncated.pth", tmp_path / "flipped.pth"
    truncated.write_bytes(good[: len(good) // 2])
    flipped.write_bytes(good)
    flip_tensor_byte(flipped)
    marker = tmp_path / "payload-ran"
    cases = {truncated: "corrupt or truncated", flipped: "checksum mismatch"}
    cases.update({path: "was not executed" for path in malicious_checkpoints(tmp_path, marker)})
    for path, reason in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and reason in str(info.value), str(info.value)
    assert not marker.exists(), "the pickle payload ran"


def record_data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Where each record's bytes lie in the archive: name -> (start, size)."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    offsets = {}
    for info in infos:
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
        offsets[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return offsets


def test_checksum_covers_every_record(tmp_path, run_dir):
    """A flipped byte in any record (the pickle holding epoch, config, RNG; each tensor) is refused."""
    good = run_dir / "checkpoints" / "last.pth"
    with open(good, "rb") as handle:
        verify_archive(handle)  # raises on any problem
    records = {name: span for name, span in record_data_offsets(good).items() if span[1] > 0}
    assert any(name.endswith("data.pkl") for name in records) and sum("/data/" in n for n in records) > 5
    for i, (name, (start, size)) in enumerate(records.items()):
        data = bytearray(good.read_bytes())
        data[start + size // 2] ^= 0x01
        bad = tmp_path / f"flip-{i}.pth"
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_checkpoint(bad)


def test_save_refuses_what_a_weights_only_load_would_refuse(tmp_path):
    with pytest.raises(TypeError, match=r"plain data only, found PosixPath at state\['config'\]\['dir'\]"):
        save_checkpoint({"state_dict": {}, "config": {"dir": Path("/x")}}, tmp_path / "x.pth")
    assert not list(tmp_path.iterdir())


def test_checksum_is_written_even_when_torch_is_told_not_to(tmp_path):
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}}, tmp_path / "a.pth")
        assert torch.serialization.get_crc32_options() is False  # the user's setting is restored
    finally:
        torch.serialization.set_crc32_options(previous)
    with open(tmp_path / "a.pth", "rb") as handle:
        verify_archive(handle)
    with zipfile.ZipFile(tmp_path / "a.pth") as archive:
        assert all(info.CRC != 0 for info in archive.infolist() if info.file_size)


@pytest.mark.parametrize("kind", ["flipped", "malicious"])
def test_command_line_refuses_bad_checkpoint_with_exit_2(tmp_path, run_dir, kind):
    marker = tmp_path / "payload-ran"
    if kind == "flipped":
        path = tmp_path / "flipped.pth"
        shutil.copyfile(run_dir / "checkpoints" / "last.pth", path)
        flip_tensor_byte(path)
    else:
        path = malicious_checkpoints(tmp_path, marker)[0]
    proc = run_script("train.py", "-r", str(path), env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_resume_run_dir_falls_back_past_corrupt_last_and_applies_overrides(tmp_path, run_dir):
    run = copy_run(run_dir, tmp_path / "run")
    last = run / "checkpoints" / "last.pth"
    rewrite(last, last.read_bytes()[:1000])
    proc = run_script("train.py", "-r", str(run), "trainer.epochs=2", "optimizer.args.lr=0.01", check=True)
    assert f"skipped {last}: corrupt or truncated" in proc.stdout
    assert "resuming from" in proc.stdout and "last.pth" not in proc.stdout.split("resuming from")[1].splitlines()[0]
    log = (run / "train.log").read_text()
    assert "resume override: optimizer.args.lr: 0.002 -> 0.01" in log
    assert "resume override: trainer.epochs: 1 -> 2" in log
    assert log.count("run directory:") == 2  # both runs' lines, appended
    state = load_checkpoint(last)
    assert state["epoch"] == 2 and state["epoch_finished"]
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.01]
    assert state["lr_scheduler"]["base_lrs"] == [0.01]
    assert state["config"]["optimizer"]["args"]["lr"] == 0.01


def test_no_valid_checkpoint_in_run_dir_is_a_user_error(tmp_path, run_dir):
    run = copy_run(run_dir, tmp_path / "run")
    for path in (run / "checkpoints").glob("*.pth"):
        rewrite(path, b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        find_resume_checkpoint(run)


# ---- writing ------------------------------------------------------------------------------------

def test_save_is_atomic_and_temporaries_are_swept(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    stale = tmp_path / "last.pth.tmp-12345"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.txt"
    other.write_text("kept")
    assert sweep_temporaries(tmp_path) == [stale]
    assert path.exists() and other.exists() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "notes.txt"]


def test_unwritable_checkpoint_location_fails_cleanly(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(TrainingError, match="could not write checkpoint .*last.pth: .*checkpoints is not a directory"):
        save_checkpoint({"state_dict": {}}, blocker / "last.pth")


def test_immutable_checkpoint_dir_keeps_previous_file(tmp_path):
    """As root chmod does not stop writes; the immutable attribute does (where the file system has it)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    path = save_checkpoint({"state_dict": {"w": torch.ones(3)}}, folder / "last.pth")
    before = path.read_bytes()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(TrainingError, match="could not write checkpoint .*Operation not permitted"):
            save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["last.pth"]


def test_disk_full_exits_1_and_keeps_previous_checkpoint(tmp_path, run_dir):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        run = copy_run(run_dir, mount / "run")
        last = run / "checkpoints" / "last.pth"
        before = last.read_bytes()
        free = shutil.disk_usage(mount).free
        (mount / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # room for logs, not for a checkpoint
        proc = run_script("train.py", "-r", str(run), "trainer.epochs=2", "trainer.tensorboard=false")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"could not write checkpoint {last}: No space left on device" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert last.read_bytes() == before
        assert not list(last.parent.glob("*.tmp-*"))
        load_checkpoint(last)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_damaged_zip_header_is_a_checkpoint_error_not_a_crash(tmp_path, run_dir):
    """A flipped compression method in the central directory makes zipfile inflate a stored record
    (zlib.error): still a one-line CheckpointError, so a resume falls back and the command exits 2."""
    path = tmp_path / "header.pth"
    data = bytearray((run_dir / "checkpoints" / "last.pth").read_bytes())
    with zipfile.ZipFile(run_dir / "checkpoints" / "last.pth") as archive:
        largest = max(archive.infolist(), key=lambda i: i.file_size)
    entry = next(i for i in range(len(data)) if data[i:i + 4] == b"PK\x01\x02"
                 and data[i + 46:i + 46 + len(largest.filename)] == largest.filename.encode())
    data[entry + 10] = 8  # compression method: stored (0) -> deflated (8)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_files_without_crcs_from_elsewhere_load_unverified(tmp_path):
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"state_dict": {"w": torch.arange(4.0)}}, tmp_path / "foreign.pth")
    finally:
        torch.serialization.set_crc32_options(previous)
    assert torch.equal(load_checkpoint(tmp_path / "foreign.pth")["state_dict"]["w"], torch.arange(4.0))


def test_crc32_combine_matches_zlib():
    import random
    import zlib

    from checkpoint.archive import crc32_combine

    generator = random.Random(0)
    for _ in range(200):
        a, b = generator.randbytes(generator.randrange(3000)), generator.randbytes(generator.randrange(3000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_records_checked_in_pieces_on_threads(tmp_path, monkeypatch):
    """Large records are split into pieces over two threads and their CRCs joined: a good file passes, a flipped
    byte anywhere in a record (first piece, a middle one, the last byte) is still refused."""
    import checkpoint.archive as archive

    monkeypatch.setattr(archive, "PIECE", 4096)  # a 200 KB tensor then makes ~16 tasks
    state = {"state_dict": {"big": torch.arange(50_000, dtype=torch.float32), "small": torch.ones(3)}}
    good = save_checkpoint(state, tmp_path / "good.pth")
    assert torch.equal(load_checkpoint(good)["state_dict"]["big"], state["state_dict"]["big"])
    start, size = next(span for name, span in record_data_offsets(good).items() if span[1] == 200_000)
    for where in (0, 5000, size // 2, size - 1):
        data = bytearray(good.read_bytes())
        data[start + where] ^= 0x10
        bad = tmp_path / f"flip-{where}.pth"
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_checkpoint(bad)


def test_tensor_records_are_checked_over_the_loaded_storages(tmp_path, run_dir, monkeypatch):
    """Each tensor's record is checked over the storage torch.load(mmap=True) returned (a real run's checkpoint:
    model, optimizer, RNG states); where no storage matches a record, over the file: a flipped byte is refused
    either way, and the good file loads the same."""
    import checkpoint.io as io

    path = run_dir / "checkpoints" / "last.pth"
    flipped = tmp_path / "flipped.pth"
    shutil.copy(path, flipped)
    flip_tensor_byte(flipped)
    expected = torch.load(path, weights_only=True)["state_dict"]
    storage_views, calls = io._storage_views, []
    monkeypatch.setattr(io, "_storage_views", lambda state, records: calls.append(
        (storage_views(state, records), records)) or calls[-1][0])
    for matched in (True, False):
        loaded = load_checkpoint(path)["state_dict"]
        assert list(loaded) == list(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_checkpoint(flipped)
        if matched:
            views, records = calls[0]
            assert len(records) > 5 and set(views) == {record.start for record in records}
            monkeypatch.setattr(io, "_storage_views", lambda state, records: {})  # every record over the file


def test_loaded_tensors_are_private_to_the_process(tmp_path):
    """load_checkpoint maps the file (mmap=True): writing into a loaded tensor in place (an optimizer's state after
    a resume) must not reach the file, even where torch's default mapping was made shared; and replacing the file
    afterwards (as every save does, by rename) leaves the loaded tensors as they were."""
    import mmap

    state = {"state_dict": {"w": torch.arange(1000.0)}}
    path = save_checkpoint(state, tmp_path / "a.pth")
    before = path.read_bytes()
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        loaded = load_checkpoint(path)
    assert torch.serialization.get_default_mmap_options() == mmap.MAP_PRIVATE  # the setting is restored
    loaded["state_dict"]["w"].mul_(2)
    assert path.read_bytes() == before
    save_checkpoint({"state_dict": {"w": torch.zeros(1000)}}, path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(1000.0) * 2)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.zeros(1000))


def test_the_file_verified_is_the_file_loaded(tmp_path, monkeypatch):
    """torch.load(mmap=True) opens the file by name: it is given the open file's name, so a checkpoint renamed
    over the path between the check and the load (a concurrent save) is not what gets loaded."""
    import checkpoint.io as io

    path = save_checkpoint({"state_dict": {"w": torch.ones(10)}}, tmp_path / "a.pth")
    other = save_checkpoint({"state_dict": {"w": torch.zeros(10)}}, tmp_path / "b.pth")
    check = io.check_structure

    def check_then_replace(data):
        records = check(data)
        os.replace(other, path)
        return records

    monkeypatch.setattr(io, "check_structure", check_then_replace)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(10))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.zeros(10))
