"""Issue 15, item 4: files that are not checkpoints get their own message; the "pickle payload" message is
kept for files that pickle objects of other classes. `-r` takes a run directory, its checkpoints/ folder or
a checkpoint file, in train.py and test.py alike (runtime/run_dir.py: locate_checkpoint)."""
from __future__ import annotations

import importlib
import os
import pickle
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script
from checkpoint import load_checkpoint
from errors import CheckpointError, UserError

CONFIG = ROOT / "configs" / "digits.yaml"
SMALL = ["trainer.epochs=1", "arch.args.channels=8", "trainer.histograms=false", "trainer.images=false",
         "trainer.verbosity=1", "trainer.tensorboard=false"]
CHECKPOINT_IS = "a checkpoint is a .pth file that train.py writes into a run's checkpoints/ folder"
PAYLOAD = "refused: it contains objects other than tensors and plain data (a pickle payload?); it was not executed"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished one-epoch run: train.log, config.yaml, checkpoints/{last,best,epoch-1}.pth."""
    save_dir = tmp_path_factory.mktemp("saved")
    run_script("train.py", "-c", str(CONFIG), "--run-id", "base", f"trainer.save_dir={save_dir}", *SMALL, check=True)
    return save_dir / "digits" / "base"


def run_here(script: str, capsys, *args: str) -> tuple[int, str, str]:
    """train.py's or test.py's main in this process: (exit status, stdout, stderr)."""
    code = importlib.import_module(script).main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def not_checkpoints(tmp_path: Path, run_dir: Path) -> dict[Path, str]:
    """Each kind of file, and the message load_checkpoint gives for it (after 'PATH: ')."""
    log = tmp_path / "big.log"
    log.write_text("2024-01-01 12:00:00 INFO epoch 1 loss 0.5\n" * 5000)  # larger than the bytes read to tell
    empty, binary, notes, listing = tmp_path / "empty.pth", tmp_path / "image.pth", tmp_path / "notes.txt", \
        tmp_path / "list.yaml"
    empty.write_bytes(b"")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    notes.write_text("hello: this is not a config\n")
    listing.write_text("- 1\n- 2\n")
    renamed = tmp_path / "config.pth"  # a config under a checkpoint's name: told by its content
    renamed.write_text(CONFIG.read_text())
    return {
        CONFIG: f"not a checkpoint: looks like a YAML config; did you mean -c {CONFIG}?",
        ROOT / "configs" / "digits.json": f"not a checkpoint: looks like a JSON config; did you mean -c "
                                          f"{ROOT / 'configs' / 'digits.json'}?",
        renamed: f"not a checkpoint: looks like a YAML config; did you mean -c {renamed}?",
        listing: f"not a checkpoint: looks like a YAML config; did you mean -c {listing}?",  # by its name
        run_dir / "train.log": f"not a checkpoint: looks like a log file; {CHECKPOINT_IS}",
        log: f"not a checkpoint: looks like a log file; {CHECKPOINT_IS}",
        notes: f"not a checkpoint: looks like a text file; {CHECKPOINT_IS}",
        empty: "not a checkpoint: the file is empty",
        binary: "not a checkpoint: neither a zip archive from torch.save nor a pickle (it starts with "
                "b'\\x89PNG\\r\\n\\x1a\\n')",
        run_dir: "not a checkpoint: it is a directory (name a .pth file)",
    }


def test_load_checkpoint_says_what_the_file_is(tmp_path, run_dir):
    for path, message in not_checkpoints(tmp_path, run_dir).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value) == f"{path}: {message}"


def test_pickles_still_get_the_payload_message_and_never_run(tmp_path):
    marker = tmp_path / "payload-ran"
    zipped, legacy, protocol0 = tmp_path / "zip.pth", tmp_path / "legacy.pth", tmp_path / "protocol0.pkl"
    torch.save({"state_dict": {}, "config": Payload(marker)}, zipped)
    torch.save({"state_dict": {}, "config": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    protocol0.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=0))  # opcodes in ASCII
    assert protocol0.read_bytes().isascii()
    for path in (zipped, legacy, protocol0):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value) == f"{path}: {PAYLOAD}"
    assert not marker.exists()


def test_the_usual_mix_ups_on_the_command_line(run_dir, capsys):
    """`train.py -r CONFIG` and `test.py -r RUN/train.log`: one line, exit 2."""
    code, _, err = run_here("train", capsys, "-r", str(CONFIG))
    assert (code, err) == (2, f"error: {CONFIG}: not a checkpoint: looks like a YAML config; did you mean -c "
                              f"{CONFIG}?\n")
    log = run_dir / "train.log"
    code, _, err = run_here("test", capsys, "-r", str(log))
    assert (code, err) == (2, f"error: {log}: not a checkpoint: looks like a log file; {CHECKPOINT_IS}\n")


def test_r_takes_a_run_its_checkpoints_folder_or_a_file_in_both_scripts(run_dir, capsys, monkeypatch):
    from run import _resolve_config

    last, best = run_dir / "checkpoints" / "last.pth", run_dir / "checkpoints" / "best.pth"
    resume = Namespace(config=None, overrides=[], lr=None, bs=None, device=None, print_config=False, run_id=None)
    for target, expected in ((run_dir, last), (run_dir / "checkpoints", last), (f"{run_dir}/checkpoints/", last),
                             (last, last), (best, best)):
        _, state, resumed_dir, _ = _resolve_config(Namespace(**vars(resume), resume=str(target)))
        assert (state["path"], resumed_dir) == (expected, run_dir), target
    capsys.readouterr()  # train.py's first line ("resuming ...: loading torch and the checkpoint")
    printed = set()
    for target in (run_dir, run_dir / "checkpoints", best):
        code, out, err = run_here("test", capsys, "-r", str(target))
        assert code == 0 and f"evaluating {best} on the test split" in err, err
        printed.add(out)
    assert len(printed) == 1 and "accuracy: " in printed.pop()
    monkeypatch.chdir(run_dir / "checkpoints")  # `-r .` from inside the folder
    _, state, resumed_dir, _ = _resolve_config(Namespace(**vars(resume), resume="."))
    assert state["path"].resolve() == last and resumed_dir.resolve() == run_dir


def test_r_messages_for_what_holds_no_checkpoint(tmp_path, run_dir):
    from runtime.run_dir import locate_checkpoint

    other = tmp_path / "other"
    other.mkdir()
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "config.yaml").write_text(CONFIG.read_text())
    cases = {
        tmp_path / "missing": "no such file or directory",
        other: "not a run directory (no checkpoints/ folder), nor a checkpoints/ folder, nor a checkpoint file",
        killed: "the run stopped before its first checkpoint, so there is nothing to resume or evaluate; start it "
                f"afresh with: python train.py -c {killed / 'config.yaml'} --run-id killed",
        killed / "checkpoints": "the run stopped before its first checkpoint, so there is nothing to resume or "
                                f"evaluate; start it afresh with: python train.py -c {killed / 'config.yaml'} "
                                f"--run-id killed",
    }
    for target, message in cases.items():
        with pytest.raises(UserError) as info:
            locate_checkpoint(str(target))
        assert str(info.value) == f"-r {target}: {message}"
