"""Issue 15, item 6: pytorch-template checkpoints converted without running anything in them.

tests/fixtures/pytorch-template-mnist.pth was written by the real victoresque/pytorch-template (its own
train.py, see tests/fixtures/README.md); its own test.py's metrics are in pytorch-template-mnist.json.
Other old-style files are made here with torch.save, with a `parse_config` module written to tmp_path
whose import would create a marker file: the conversion must never import it.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PYTHON, ROOT
from datafiles import write_mnist

FIXTURES = ROOT / "tests" / "fixtures"
OLD = FIXTURES / "pytorch-template-mnist.pth"
RECORD = json.loads((FIXTURES / "pytorch-template-mnist.json").read_text())
REFUSED = ("which is not data: loading it with torch.load(weights_only=False) would call it (a pickle payload?); "
           "nothing in it was run")


def convert(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "checkpoint.convert", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def convert_here(capsys, *args) -> tuple[int, str, str]:
    """The command in this process (no torch import to wait for): (exit status, stdout, stderr)."""
    from checkpoint.convert import main

    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_here(script: str, capsys, *args: str) -> tuple[int, str, str]:
    """train.py's or test.py's main in this process."""
    import importlib

    code = importlib.import_module(script).main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The fixture converted once by the command, in a folder holding the MNIST files it was tested on."""
    work = tmp_path_factory.mktemp("converted")
    write_mnist(work / "data", **RECORD["mnist"])
    proc = convert(OLD, work / "new.pth")
    assert proc.returncode == 0, proc.stderr
    return work / "new.pth", proc


# ---- the real pytorch-template checkpoint -------------------------------------------------------------

def test_fixture_was_made_by_the_real_template():
    assert RECORD["template_commit"] == "41dc06f6f8f3f38c6ed49f01ff7d89cd5688adc4"
    assert set(RECORD["test_metrics"]) == {"loss", "accuracy", "top_k_acc"}
    with pytest.raises(pickle.UnpicklingError, match="parse_config.ConfigParser"):  # what users hit today
        torch.load(OLD, weights_only=True)


def test_convert_reports_what_is_carried_over(converted):
    new, proc = converted
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == [
        f"converted {OLD} (pytorch-template, MnistModel, epoch 2) -> {new}",
        "carried over: the weights (8 tensors), the config; epoch and monitor_best under converted_from",
        "not carried over: optimizer (a converted checkpoint evaluates and starts new runs; it does not resume)",
        "read as inert records, never imported: parse_config.ConfigParser, pathlib.PosixPath",
        f"evaluate:   python test.py -r {new}",
        f"fine-tune:  python train.py -c CONFIG arch.pretrained={new}",
    ]


def test_converted_checkpoint_is_plain_data_with_the_old_config(converted):
    from checkpoint import load_checkpoint
    from config import check_config

    new, _ = converted
    plain = torch.load(new, weights_only=True)  # no custom classes left
    state = load_checkpoint(new)  # and the CRCs verify
    assert set(plain) == {"format", "torch_version", "arch", "state_dict", "config", "converted_from"}
    assert state["arch"] == "MnistModel" and list(state["state_dict"]) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    old_config = RECORD["config"]
    assert state["converted_from"] == {"tool": "pytorch-template", "file": str(OLD), "arch": "MnistModel",
                                       "epoch": 2, "monitor_best": 1.7802128791809082,
                                       "config": old_config}
    assert state["config"] == check_config(old_config)  # the template's keys are all ours: nothing dropped


def test_test_py_reproduces_the_templates_test_metrics(converted, capsys, monkeypatch):
    """The printed values equal the template's own test.py's; with its batch size (512) every bit does."""
    import test as test_script

    new, _ = converted
    monkeypatch.chdir(new.parent)  # data/ holds the MNIST files the template was tested on
    code, out, err = run_here("test", capsys, "-r", str(new))
    assert code == 0, err
    expected = RECORD["test_metrics"]
    assert out.splitlines() == [f"{name}: {value:.4g}" for name, value in expected.items()]
    results = test_script.evaluate(test_script.parse_args(["-r", str(new), "data_loader.args.batch_size=512"]))
    assert results == expected  # exact: the same batches, the same float32 sums


def test_works_as_arch_pretrained(converted, tmp_path):
    from checkpoint import load_checkpoint
    from config import check_config
    from config.build import build_model

    new, _ = converted
    config = check_config({**RECORD["config"], "arch": {"type": "MnistModel", "args": {}, "pretrained": str(new)}})
    model = build_model(config)
    weights = load_checkpoint(new)["state_dict"]
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())


def test_train_py_starts_from_the_converted_weights(converted, capsys, monkeypatch):
    new, _ = converted
    monkeypatch.chdir(new.parent)
    config = new.parent / "config.json"
    config.write_text(json.dumps(RECORD["config"]))  # the template's config.json, as it was
    code, out, err = run_here("train", capsys, "-c", str(config), f"arch.pretrained={new}", "--dry-run")
    assert code == 0, err
    assert "backward ok" in out


def test_r_and_pretrained_point_old_checkpoints_to_the_command(capsys):
    expected = (f"error: {OLD}: a pytorch-template checkpoint: convert it first: python -m checkpoint.convert {OLD} "
                f"NEW.pth")
    for script in ("train", "test"):
        code, _, err = run_here(script, capsys, "-r", str(OLD))
        assert code == 2 and err.splitlines() == [expected], err
    code, _, err = run_here("train", capsys, "-c", str(FIXTURES / "pytorch-template-config.json"),
                            f"arch.pretrained={OLD}", "--dry-run")
    assert code == 2 and err.splitlines() == [expected], err


def test_a_converted_checkpoint_is_not_resumed(converted, capsys):
    new, _ = converted
    code, _, err = run_here("train", capsys, "-r", str(new))
    assert code == 2 and err.splitlines() == [
        f"error: {new}: converted from a pytorch-template checkpoint, it holds weights, not a run's state, and "
        f"cannot be resumed; start a run from its weights: python train.py -c CONFIG arch.pretrained={new}"]


# ---- old-style files made here --------------------------------------------------------------------------

TRAP = """from pathlib import Path
Path({marker!r}).write_text("imported")  # runs if anything imports this module


class ConfigParser:
    def __init__(self, config):
        self._config = config
        self.resume = None
        self._save_dir = Path("saved/models/run")


def touch(path):
    Path(path).write_text("called")
"""


@pytest.fixture
def trap(tmp_path, monkeypatch):
    """A `parse_config` module whose import writes a marker: objects of its class are pickled in-process
    here, and a conversion that imported it would create the marker."""
    folder = tmp_path / "trap"
    folder.mkdir()
    marker = tmp_path / "imported-marker"
    (folder / "parse_config.py").write_text(TRAP.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    import parse_config

    yield parse_config, marker, {"PYTHONPATH": str(folder)}
    sys.modules.pop("parse_config", None)


def template_state(parse_config, **changes) -> dict:
    from model.model import MnistModel

    torch.manual_seed(0)
    model = MnistModel()
    optimizer = torch.optim.Adam(model.parameters())
    config = parse_config.ConfigParser(json.loads(json.dumps(RECORD["config"])))
    state = {"arch": "MnistModel", "epoch": 7, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
             "monitor_best": np.float64(0.125), "config": config}
    return {**state, **changes}


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy format (torch < 1.6)"])
def test_numpy_scalars_and_the_config_object_never_import_their_module(trap, tmp_path, zipped):
    parse_config, marker, env = trap
    marker.unlink()  # written by the import above, in this process
    state = template_state(parse_config)
    old = tmp_path / "checkpoint-epoch7.pth"
    torch.save(state, old, _use_new_zipfile_serialization=zipped)
    proc = convert(old, tmp_path / "new.pth", env=env)  # parse_config importable: still never imported
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert "read as inert records, never imported: parse_config.ConfigParser, pathlib.PosixPath" in proc.stdout
    new = torch.load(tmp_path / "new.pth", weights_only=True)
    assert new["converted_from"]["monitor_best"] == 0.125 and type(new["converted_from"]["monitor_best"]) is float
    assert new["converted_from"]["epoch"] == 7
    assert all(torch.equal(new["state_dict"][key], value) for key, value in state["state_dict"].items())


def test_data_parallel_prefix_and_unknown_config_keys(trap, tmp_path):
    parse_config, marker, env = trap
    config = {**RECORD["config"], "my_key": {"a": 1}}
    config["trainer"] = {**config["trainer"], "my_option": True}
    state = template_state(parse_config, config=parse_config.ConfigParser(config))
    state["state_dict"] = {f"module.{key}": value for key, value in state["state_dict"].items()}
    torch.save(state, tmp_path / "old.pth")
    proc = convert(tmp_path / "old.pth", tmp_path / "new.pth", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "note: removed the 'module.' prefix DataParallel gave the weights' names" in proc.stdout.splitlines()
    assert proc.stdout.splitlines()[4:6] == [
        "note: config keys of your own, moved under user (read them as config['user'][...]): my_key",
        "note: config keys this project does not know, dropped: trainer.my_option"]
    new = torch.load(tmp_path / "new.pth", weights_only=True)
    assert "conv1.weight" in new["state_dict"] and "my_key" not in new["config"]
    assert new["config"]["user"] == {"my_key": {"a": 1}} and "my_option" not in new["config"]["trainer"]
    assert new["converted_from"]["config"]["trainer"]["my_option"] is True  # kept for the record


def test_a_model_class_missing_here_is_written_with_a_note(trap, tmp_path):
    parse_config, _, env = trap
    config = {**RECORD["config"], "arch": {"type": "MyNet", "args": {}}}
    torch.save(template_state(parse_config, arch="MyNet", config=parse_config.ConfigParser(config)), tmp_path / "old.pth")
    proc = convert(tmp_path / "old.pth", tmp_path / "new.pth", env=env)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: the config does not check here")]
    assert len(notes) == 1 and "arch.type: 'MyNet'" in notes[0], proc.stdout
    assert torch.load(tmp_path / "new.pth", weights_only=True)["config"]["arch"]["type"] == "MyNet"


# ---- never executes ----------------------------------------------------------------------------------

class SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_payloads_are_refused_in_one_line_and_never_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # makes a plain torch.load run payloads
    marker = tmp_path / "payload-ran"
    cases = {}
    for name, payload, called in (("system", SystemCall(marker), f"{os.system.__module__}.system"),
                                  ("eval", Eval(marker), "builtins.eval")):
        for zipped in (True, False):
            path = tmp_path / f"{name}-{'zip' if zipped else 'legacy'}.pth"
            torch.save({"arch": "MnistModel", "state_dict": {}, "config": payload}, path,
                       _use_new_zipfile_serialization=zipped)
            cases[path] = called
        raw = tmp_path / f"{name}-protocol0.pkl"  # a bare pickle, protocol 0: text-like opcodes
        raw.write_bytes(pickle.dumps({"state_dict": payload}, protocol=0))
        cases[raw] = called
    for path, called in cases.items():
        code, out, err = convert_here(capsys, path, tmp_path / "new.pth")
        assert (code, out, err) == (2, "", f"error: {path}: refused: it names {called}, {REFUSED}\n")
    first = next(iter(cases))  # and as the command, in its own process
    proc = convert(first, tmp_path / "new.pth")
    assert one_error_line(proc) == f"error: {first}: refused: it names {cases[first]}, {REFUSED}"
    assert not marker.exists() and not (tmp_path / "new.pth").exists()


def test_a_function_of_an_importable_module_is_never_called(trap, tmp_path):
    """A __reduce__ naming a function of the user's own module: recorded, never imported nor called."""
    module, marker, env = trap
    marker.unlink()
    called = tmp_path / "called-marker"

    class Call:
        def __reduce__(self):
            return module.touch, (str(called),)

    torch.save(template_state(module, config=Call()), tmp_path / "old.pth")
    proc = convert(tmp_path / "old.pth", tmp_path / "new.pth", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "note: no config found (test.py and train.py need -c CONFIG with this checkpoint)" in proc.stdout
    assert "read as inert records, never imported: parse_config.touch" in proc.stdout
    assert not marker.exists() and not called.exists()


# ---- errors: one line, exit 2, naming the file ----------------------------------------------------------

def test_errors_name_the_file(tmp_path, converted, capsys):
    new, _ = converted
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(OLD.read_bytes()[:5000])
    config = ROOT / "configs" / "digits.yaml"
    numpy_array = tmp_path / "array.pth"
    torch.save({"state_dict": {}, "config": np.zeros(3)}, numpy_array)
    cases = {
        tmp_path / "missing.pth": "not found",
        config: f"not a checkpoint: looks like a YAML config; did you mean -c {config}?",
        tmp_path: "not a checkpoint: it is a directory (name a .pth file)",
        truncated: "corrupt or truncated (no end-of-central-directory record)",
        new: "already a checkpoint of this project; nothing to convert",
        numpy_array: "it holds numpy._core.multiarray._reconstruct, which this reader does not rebuild (it reads "
                     "tensors, NumPy scalars and plain data)",
    }
    for path, message in cases.items():
        code, out, err = convert_here(capsys, path, tmp_path / "out.pth")
        assert (code, out, err) == (2, "", f"error: {path}: {message}\n")
    code, _, err = convert_here(capsys, OLD, OLD)
    assert (code, err) == (2, f"error: {OLD}: the new checkpoint must not overwrite the old one\n")
    assert not (tmp_path / "out.pth").exists()


# ---- the reader on its own ---------------------------------------------------------------------------

@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_reader_rebuilds_tensors_views_and_plain_values(tmp_path, zipped):
    from checkpoint.untrusted import TensorRecord, read_untrusted

    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = {"base": base, "transposed": base.t(), "window": base[1:3, 2:5], "long": torch.tensor([1, -2, 3]),
               "bool": torch.tensor([True, False]), "half": torch.randn(3).half(),
               "bfloat16": torch.randn(2).bfloat16(), "scalar": torch.tensor(3.5), "empty": torch.empty(0, 3),
               "complex": torch.tensor([1 + 2j])}
    others = {"size": torch.Size([2, 3]), "nested": [1, (2.5, "x"), {"k": None}], "set": {1, 2}, "bytes": b"\x00\xff"}
    torch.save({**tensors, **others}, tmp_path / "t.pth", _use_new_zipfile_serialization=zipped)
    loaded = read_untrusted(tmp_path / "t.pth")
    for key, value in tensors.items():
        assert isinstance(loaded[key], TensorRecord)
        got = loaded[key].tensor
        assert (got.dtype, got.shape, got.stride()) == (value.dtype, value.shape, value.stride()) and torch.equal(got, value)
    assert loaded["base"].tensor.data_ptr() == loaded["transposed"].tensor.data_ptr()  # one storage, as saved
    assert loaded["size"] == (2, 3) and loaded["nested"] == [1, (2.5, "x"), {"k": None}]
    assert loaded["set"] == {1, 2} and loaded["bytes"] == b"\x00\xff"


def test_reader_refuses_tensors_outside_their_storage(tmp_path):
    """A tensor record whose size reaches past its storage's bytes is refused, not read out of bounds."""
    import zipfile

    from checkpoint.untrusted import UntrustedFileError, read_untrusted

    torch.save({"w": torch.zeros(4)}, tmp_path / "t.pth")
    with zipfile.ZipFile(tmp_path / "t.pth") as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    assert b"K\x04\x85" in records[name]  # the size (4,) as BININT1 4, TUPLE1
    records[name] = records[name].replace(b"K\x04\x85", b"M\x00\x10\x85")  # (4096,)
    with zipfile.ZipFile(tmp_path / "big.pth", "w") as archive:
        for record, data in records.items():
            archive.writestr(record, data)
    with pytest.raises(UntrustedFileError, match="a tensor outside its storage"):
        read_untrusted(tmp_path / "big.pth")
