"""predict.py and export.py (issue 18): predictions on inputs without labels, checked against the eager
model, for every shipped example config trained for an epoch; exports whose parity the test checks
again with the files' own runtimes; the metadata beside them; and the error paths, word for word.

The quick part (10-15 s) runs the scripts' `main` in-process on a checkpoint written here from an
untrained DigitsCNN. The slow part trains each shipped config for an epoch (test_scaffold.py's runs: train.main for
every config in one interpreter of their own, once per session), runs the scripts'
`main` in-process on it, and the two scripts once as commands
(about 3 min on a busy 2-core machine, half of it training). The ONNX tests skip when onnx, onnxscript
or onnxruntime is not installed (requirements-extra.txt).
"""
from __future__ import annotations

import csv
import importlib.util
import inspect
import re
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from test_scaffold import SHIPPED
from test_scaffold import shipped_run as scaffold_shipped_run

ATOL, RTOL = 1e-5, 1.3e-6  # export.py's default parity tolerances


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run_main(module, argv: list[str], capsys) -> tuple[int, str, str]:
    code = module.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def import_script(name: str):
    return importlib.import_module(name)


def onnx_or_skip():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


def assert_classes_match(rows: list[dict], logits: torch.Tensor, classes: list[str] | None = None) -> None:
    """CSV rows against eager (N, K) scores: the class (unless the top two are a near tie) and its softmax."""
    probabilities = torch.softmax(logits.double(), dim=1)
    assert len(rows) == len(logits)
    for row, p in zip(rows, probabilities):
        top2 = p.topk(2).values
        if top2[0] - top2[1] > 1e-5:
            assert int(row["class"]) == int(p.argmax()), row
        assert float(row["probability"]) == pytest.approx(p[int(row["class"])].item(), abs=1e-5), row
        assert row["error"] == ""
        if classes is not None:
            assert row["class_name"] == classes[int(row["class"])]


# ---- a quick checkpoint: an untrained DigitsCNN and the digits config -------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    from checkpoint import save_checkpoint
    from config import load_config
    from config.build import build_model

    folder = tmp_path_factory.mktemp("digits")
    config = load_config(ROOT / "configs" / "digits.yaml", [f"trainer.save_dir={folder / 'saved'}"])
    torch.manual_seed(0)
    model = build_model(config).eval()
    path = save_checkpoint({"state_dict": model.state_dict(), "config": config}, folder / "model.pth")
    from data_loader.datasets import DigitsDataset

    images = DigitsDataset(train=False).images[:20]  # (20, 1, 8, 8), values 0..16
    np.save(folder / "images.npy", images.numpy().astype(np.float64))  # float64 on disk: read as float32
    with torch.no_grad():
        logits = model(images)
    return {"folder": folder, "checkpoint": path, "model": model, "images": images, "logits": logits}


def test_predict_on_a_npy_file_matches_the_eager_model(digits, tmp_path, capsys):
    predict = import_script("predict")
    output = tmp_path / "out" / "predictions.csv"  # the folder is created
    code, out, err = run_main(predict, ["-r", str(digits["checkpoint"]), "--input", str(digits["folder"] / "images.npy"),
                                        "--output", str(output), "--batch-size", "7", "-d", "cpu"], capsys)
    assert code == 0, err
    assert err.splitlines()[-1] == f"predicted 20 of 20 inputs: {output}"
    rows = read_csv(output)
    assert list(rows[0]) == ["input", "class", "probability", "error"]  # DigitsDataset names no classes
    assert [row["input"] for row in rows] == [str(i) for i in range(20)]
    assert_classes_match(rows, digits["logits"])


@pytest.mark.parametrize("case", ["missing input", "missing checkpoint", "folder for digits", "wrong shape",
                                  "not tensors", "unknown suffix"])
def test_predict_user_errors_are_one_line_exit_2(case, digits, tmp_path, capsys):
    predict = import_script("predict")
    checkpoint, folder = str(digits["checkpoint"]), tmp_path
    if case == "missing input":
        argv, expected = ["-r", checkpoint, "--input", str(folder / "nothing")], \
            f"--input {folder / 'nothing'}: no such file or folder"
    elif case == "missing checkpoint":
        argv, expected = ["-r", str(folder / "none.pth"), "--input", "split:test"], \
            f"-r {folder / 'none.pth'}: no such file or directory"
    elif case == "folder for digits":
        (folder / "images").mkdir()
        argv, expected = ["-r", checkpoint, "--input", str(folder / "images")], \
            (f"--input {folder / 'images'}: DigitsDataLoader (DigitsDataset) does not read image files; pass a .npy "
             f"or .pt file of its inputs, or split:test")
    elif case == "wrong shape":
        np.save(folder / "wide.npy", np.zeros((4, 1, 9, 9), dtype=np.float32))
        argv, expected = ["-r", checkpoint, "--input", str(folder / "wide.npy")], \
            f"--input {folder / 'wide.npy'}: does not fit the model (RuntimeError: "
    elif case == "not tensors":
        torch.save({"x": [1, 2]}, folder / "list.pt")
        argv, expected = ["-r", checkpoint, "--input", str(folder / "list.pt")], \
            f"{folder / 'list.pt'}: expected a tensor or a dict of tensors, got a dict of list"
    else:
        (folder / "inputs.txt").write_text("1 2 3")
        argv, expected = ["-r", checkpoint, "--input", str(folder / "inputs.txt")], \
            f"--input {folder / 'inputs.txt'}: expected a folder of images, an image, a .npy or .pt file, or split:test"
    output = folder / "predictions.csv"
    code, out, err = run_main(predict, [*argv, "--output", str(output)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    if case == "wrong shape":  # the rest of the line is torch's own message
        assert lines[0].startswith(f"error: {expected}") and lines[0].endswith(")"), err
    else:
        assert lines[0] == f"error: {expected}", err
    assert "Traceback" not in err and not output.exists()


def test_bad_images_are_named_and_the_others_predicted(digits, tmp_path, capsys, monkeypatch):
    """An image of another size than the test split's, and one the model refuses (here: a stand-in
    predict_step refuses any batch holding an image of all 255; its batch is retried one image at a time),
    are named in their rows; the other images are predicted."""
    from PIL import Image

    from torchvision import transforms

    from trainer.trainer import Trainer

    predict = import_script("predict")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), 255 if i == 2 else 10 * i, dtype=np.uint8)).save(images / f"{i}.png")
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(images / "9x9.png")
    original = Trainer.predict_step

    def refusing(self, batch):
        if (batch == 1.0).flatten(1).all(1).any():
            raise ValueError("saturated image")
        return original(self, batch)

    class Images:  # digits has no image reader: lend it one (8x8 grey PNGs to (1, 8, 8) tensors)
        mode, transform = "L", transforms.ToTensor()

        def __getitem__(self, index):  # the test split's first sample: what the images must look like
            return torch.zeros(1, 8, 8), 0

    monkeypatch.setattr(predict, "dataset_of", lambda loader: Images())
    monkeypatch.setattr(Trainer, "predict_step", refusing)
    output = tmp_path / "predictions.csv"
    code, out, err = run_main(predict, ["-r", str(digits["checkpoint"]), "--input", str(images), "--output",
                                        str(output)], capsys)
    assert code == 1, err
    bad, odd = images / "2.png", images / "9x9.png"
    refused = f"{bad}: does not fit the model (ValueError: saturated image)"
    wrong_size = f"{odd}: shape (1, 9, 9) after the dataset's transform; the config's test split gives (1, 8, 8)"
    assert err.splitlines() == [f"predicting with {digits['checkpoint']} on {images}", f"error: {wrong_size}",
                                f"error: {refused}", f"predicted 4 of 6 inputs: {output}",
                                "2 input(s) could not be predicted (see the error column)"]
    rows = read_csv(output)
    assert [row["input"] for row in rows] == [str(images / f"{i}.png") for i in range(5)] + [str(odd)]
    assert (rows[2]["class"], rows[2]["error"]) == ("", refused)
    assert (rows[5]["class"], rows[5]["error"]) == ("", wrong_size)
    assert all(row["error"] == "" and row["class"] != "" for row in rows[:2] + rows[3:5])


def test_export_torch_export_matches_and_describes_its_inputs(digits, tmp_path, capsys):
    export = import_script("export")
    output = tmp_path / "digits.pt2"
    code, out, err = run_main(export, ["-r", str(digits["checkpoint"]), "--format", "torch_export", "--output",
                                       str(output)], capsys)
    assert code == 0, err
    assert out.startswith(f"exported {output} (torch_export), inputs x float32[batch, 1, 8, 8]; parity with the eager "
                          f"model on 68 test samples: largest difference "), out  # 64, 3 and 1
    module = torch.export.load(output).module()
    for n in (1, 5, 20):  # the batch dimension is dynamic
        torch.testing.assert_close(module(digits["images"][:n]), digits["logits"][:n], atol=ATOL, rtol=RTOL)
    info = json.loads(Path(f"{output}.json").read_text())
    assert info["inputs"] == [{"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert info["outputs"] == [{"shape": ["batch", 10], "dtype": "float32"}]
    assert info["arch"] == "DigitsCNN" and info["format"] == "torch_export" and info["file"] == "digits.pt2"
    assert info["parity"]["batch_sizes"] == [64, 3, 1] and info["parity"]["max_abs_difference"] <= ATOL
    assert info["preprocessing"]["transform"] is None and info["classes"] is None


def test_export_parity_failure_exits_1_and_writes_nothing(digits, tmp_path, capsys, monkeypatch):
    export = import_script("export")
    runner = export.exported_runner

    def off_by_a_little(fmt, data):
        run = runner(fmt, data)
        return lambda inputs: [t + 1e-3 for t in run(inputs)]

    monkeypatch.setattr(export, "exported_runner", off_by_a_little)
    output = tmp_path / "digits.pt2"
    code, out, err = run_main(export, ["-r", str(digits["checkpoint"]), "--format", "torch_export", "--output",
                                       str(output)], capsys)
    assert code == 1 and out == "", err
    (line,) = err.splitlines()
    assert re.fullmatch(r"error: parity check failed: the exported model differs from the eager model by 0\.001 where "
                        r"1\.\d+e-05 is allowed \(atol 1e-05 \+ rtol 1\.3e-06 \* \|eager\|\), on a batch of 64 test "
                        r"samples; largest difference 0\.001; nothing was written", line), line
    assert not output.exists() and not Path(f"{output}.json").exists()


class Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class FixedBatch(torch.nn.Module):
    def forward(self, x):
        return x.reshape(16, -1)


class Svd(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[1]


def _line_of(cls, text: str) -> int:
    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_a_model_that_cannot_be_exported_is_named_with_the_operation():
    export = import_script("export")
    example = (torch.randn(16, 4),)
    here = Path(__file__).resolve()
    where = os.path.relpath(here, Path.cwd()) if here.is_relative_to(Path.cwd()) else str(here)
    with pytest.raises(export.ExportFailed) as caught:
        export.export_program(Branchy(), example, export.dynamic_shapes(example, set()))
    assert str(caught.value) == (
        f"cannot export Branchy with torch.export: a Python decision on a tensor's values (data-dependent control "
        f"flow, or .item()/int()/float() of it) at {where}:{_line_of(Branchy, 'if x.sum()')}: `if x.sum() > 0:`")
    with pytest.raises(export.ExportFailed) as caught:
        export.export_program(FixedBatch(), example, export.dynamic_shapes(example, set()))
    assert str(caught.value) == ("cannot export FixedBatch with torch.export: its code fixes the batch size to 16, "
                                 "so the batch dimension cannot be dynamic")


def test_an_operation_without_onnx_translation_is_named():
    onnx_or_skip()
    export = import_script("export")
    example = (torch.randn(16, 4),)
    here = Path(__file__).resolve()
    where = os.path.relpath(here, Path.cwd()) if here.is_relative_to(Path.cwd()) else str(here)
    program = export.export_program(Svd(), example, export.dynamic_shapes(example, set()))
    with pytest.raises(export.ExportFailed) as caught:
        export.onnx_program(program, Svd())
    assert str(caught.value) == (
        f"cannot export Svd to ONNX: the operation aten._linalg_svd.default has no ONNX translation at "
        f"{where}:{_line_of(Svd, 'svd(x)')}: `return torch.linalg.svd(x)[1]`")


def test_onnx_without_its_packages_is_exit_2_naming_the_install_command(tmp_path):
    """A fake `onnx` package that fails to import, ahead of the real one on the path."""
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'onnx'\", name='onnx')\n")
    proc = run_script("export.py", "-r", "whatever.pth", "--format", "onnx", cwd=tmp_path,
                      env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: --format onnx needs onnx, onnxscript and onnxruntime (not installed: onnx): "
                           "pip install -r requirements-extra.txt\n")


def test_export_argument_errors(capsys):
    export = import_script("export")
    with pytest.raises(SystemExit) as caught:
        export.parse_args(["-r", "x.pth", "--format", "tflite"])
    assert caught.value.code == 2
    assert "argument --format: invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.parse_args(["-r", "x.pth", "--format", "onnx", "--atol", "-1"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: --atol and --rtol must be numbers >= 0")


# ---- every shipped config, trained for an epoch ------------------------------------------------------

# digits.json is digits.yaml spelled in JSON (test_scaffold.py checks they train the same run).
EXAMPLES = [name for name in SHIPPED if name != "digits.json"]
def shipped_run(name: str, tmp_path_factory) -> Path:
    """configs/<name> trained for one epoch: test_scaffold's runs (all shipped configs through train.main in one
    interpreter of their own, once per session). What is checked here is predict.py and export.py on the
    checkpoint."""
    return scaffold_shipped_run(name, tmp_path_factory)


def model_args(trainer_type: str, batch) -> tuple:
    """What each example's model takes, written out here independently of the trainers' predict_step."""
    if trainer_type == "SegmentationTrainer":
        return (batch["image"],)
    if trainer_type == "SequenceTrainer":
        return batch["tokens"], batch["attention_mask"]
    return (batch[0],)


def extra_input(name: str, cwd: Path, config: dict, dataset, model, trainer_type: str):
    """An input other than the test split, written here: (path, eager output, expected rows count, errors)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    if hasattr(dataset, "mode"):  # an image config: PNG files, one of them broken
        channels, height, width = dataset[0][0].shape
        folder = cwd / "new_images"
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        images = []
        for i in range(5):
            pixels = rng.integers(0, 256, (height, width) if dataset.mode == "L" else (height, width, 3), dtype=np.uint8)
            path = folder / ("sub" if i == 4 else "") / f"{i}.png"
            Image.fromarray(pixels).save(path)
            with Image.open(path) as image:
                images.append(dataset.transform(image.convert(dataset.mode)))
        (folder / "broken.png").write_bytes(b"not a png")
        with torch.no_grad():
            expected = model(torch.stack(images))
        return folder, expected, ["new_images/0.png", "new_images/1.png", "new_images/2.png", "new_images/3.png",
                                  "new_images/broken.png", "new_images/sub/4.png"]
    if trainer_type == "SequenceTrainer":
        from data_loader.collate import pad_tokens

        batch = pad_tokens([dataset[i] for i in range(6)])
        torch.save({"tokens": batch["tokens"], "attention_mask": batch["attention_mask"]}, cwd / "sequences.pt")
        with torch.no_grad():
            expected = model(batch["tokens"], batch["attention_mask"])
        return cwd / "sequences.pt", expected, [str(i) for i in range(6)]
    first = dataset[0]
    inputs = torch.stack([(dataset[i]["image"] if isinstance(first, dict) else dataset[i][0]) for i in range(6)])
    np.save(cwd / "inputs.npy", inputs.numpy())
    with torch.no_grad():
        expected = model(inputs)
    return cwd / "inputs.npy", expected, [str(i) for i in range(6)]


def check_rows(rows: list[dict], output: torch.Tensor, config: dict, classes, csv_path: Path) -> None:
    """The CSV against the eager output, whatever the task."""
    from PIL import Image

    good = [row for row in rows if not row["error"]]
    assert len(good) == len(output)
    if output.dim() == 4:  # segmentation: the mask files
        assert list(rows[0]) == ["input", "mask", "error"]
        for row, scores in zip(good, output):
            mask = torch.from_numpy(np.array(Image.open(csv_path.parent / row["mask"]))).long()
            top2 = scores.topk(2, dim=0).values
            differs = mask != scores.argmax(dim=0)
            assert not (differs & (top2[0] - top2[1] > 1e-4)).any(), row
    elif config["loss"] == "mse_loss":
        assert list(rows[0]) == ["input", "value", "error"]
        values = torch.tensor([float(row["value"]) for row in good])
        torch.testing.assert_close(values, output[:, 0], atol=1e-5, rtol=1e-5)
    else:
        assert list(rows[0]) == ["input", "class"] + (["class_name"] if classes else []) + ["probability", "error"]
        assert_classes_match(good, output, classes)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_predict_and_export_a_shipped_config(name, tmp_path_factory, monkeypatch, capsys):
    """The scripts' `main` in-process (a subprocess each would spend ~4 s importing torch, torchvision and
    torchmetrics, 4 times a config); test_the_scripts_as_commands runs them as commands."""
    from checkpoint import load_checkpoint, load_model_state
    from config import resolve_config
    from config.build import build_model, build_test_loader

    run_dir = shipped_run(name, tmp_path_factory)
    capsys.readouterr()  # the training's own output
    cwd = run_dir.parent.parent.parent  # the data paths of the config are relative to it
    monkeypatch.chdir(cwd)
    checkpoint = run_dir / "checkpoints" / "best.pth"  # what `-r RUN_DIR` takes
    state = load_checkpoint(checkpoint)
    config = resolve_config(state["config"])
    trainer_type = config["trainer"]["type"]
    model = build_model(config)
    load_model_state(model, state["state_dict"])
    model.eval()
    loader = build_test_loader(config)
    dataset = getattr(loader.dataset, "dataset", loader.dataset)
    classes = getattr(dataset, "classes", None)
    with torch.no_grad():
        batches = list(loader)
        split_output = torch.cat([model(*model_args(trainer_type, batch)) for batch in batches])

    # predict.py on the test split without its labels
    predict, export = import_script("predict"), import_script("export")
    code, out, err = run_main(predict, ["-r", str(checkpoint), "--input", "split:test", "--output", "split.csv"], capsys)
    assert code == 0, err
    rows = read_csv(cwd / "split.csv")
    assert [row["input"] for row in rows] == [str(i) for i in range(len(split_output))]
    check_rows(rows, split_output, config, classes, cwd / "split.csv")

    # predict.py on files: images (one of them broken), or a .npy/.pt of inputs
    path, expected, ids = extra_input(name, cwd, config, dataset, model, trainer_type)
    code, out, err = run_main(predict, ["-r", str(run_dir), "--input", path.name, "--output", "files.csv",
                                        "--batch-size", "4"], capsys)
    rows = read_csv(cwd / "files.csv")
    assert [row["input"] for row in rows] == ids
    if path.is_dir():
        broken = "new_images/broken.png"
        message = f"{broken}: cannot read image (cannot identify image file {broken!r})"
        assert code == 1 and f"error: {message}" in err.splitlines(), err
        assert rows[ids.index(broken)]["error"] == message
    else:
        assert code == 0, err
    check_rows(rows, expected, config, classes, cwd / "files.csv")

    # export.py, both formats; parity checked here again with the files' own runtimes
    inputs = model_args(trainer_type, batches[0])
    with torch.no_grad():
        eager = model(*inputs)
    formats = ["torch_export"]
    if all(importlib.util.find_spec(p) for p in ("onnx", "onnxscript", "onnxruntime")):
        formats.append("onnx")
    for fmt in formats:
        output = cwd / f"model.{'pt2' if fmt == 'torch_export' else 'onnx'}"
        code, out, err = run_main(export, ["-r", str(checkpoint), "--format", fmt, "--output", output.name], capsys)
        assert code == 0, err
        info = json.loads(Path(f"{output}.json").read_text())
        assert [i["name"] for i in info["inputs"]] == list(inspect.signature(model.forward).parameters)
        assert all(i["shape"][0] == "batch" for i in info["inputs"]) and info["outputs"][0]["shape"][0] == "batch"
        assert info["classes"] == (list(classes) if classes is not None else None)
        assert info["parity"]["batch_sizes"][1] == min(3, len(dataset))
        stats = loader_stats(config)  # MNIST, Fashion-MNIST and CIFAR-10 normalise in their transform
        assert info["preprocessing"]["normalize"] == ({"mean": list(stats[0]), "std": list(stats[1])} if stats else None)
        for n in (len(eager), 1):  # the dynamic batch: the test batch and a single sample
            part = tuple(x[:n] for x in inputs)
            if fmt == "torch_export":
                got = torch.export.load(output).module()(*part)
            else:
                import onnxruntime

                session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
                got = torch.from_numpy(session.run(None, {i.name: x.numpy() for i, x in
                                                          zip(session.get_inputs(), part)})[0])
            torch.testing.assert_close(got, eager[:n], atol=ATOL, rtol=RTOL)


def loader_stats(config: dict) -> tuple | None:
    """(MEAN, STD) of the config's data loader class, whose transform normalises with them; None if none."""
    from config.registry import resolve

    cls, _ = resolve("data_loader", config["data_loader"]["type"], "data_loader.type")
    return (cls.MEAN, cls.STD) if hasattr(cls, "MEAN") else None


@pytest.mark.slow
def test_the_scripts_as_commands(tmp_path_factory):
    """predict.py and export.py as a user runs them, on the digits run: exit status, stdout, stderr."""
    run_dir = shipped_run("digits.yaml", tmp_path_factory)
    cwd = run_dir.parent.parent.parent
    proc = run_script("predict.py", "-r", str(run_dir), "--input", "split:test", "--output", "out/p.csv", cwd=cwd)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == [f"predicting with {run_dir / 'checkpoints' / 'best.pth'} on split:test",
                                        "predicted 360 of 360 inputs: out/p.csv"]
    assert len(read_csv(cwd / "out" / "p.csv")) == 360
    proc = run_script("export.py", "-r", str(run_dir), "--format", "torch_export", cwd=cwd)
    output = run_dir / "checkpoints" / "best.pt2"  # beside the checkpoint
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"exported {output} (torch_export), inputs x float32[batch, 1, 8, 8]; parity with "
                                  f"the eager model on 68 test samples: largest difference ")
    assert proc.stdout.endswith(f"; preprocessing in {output}.json\n")
    assert output.exists() and Path(f"{output}.json").exists()


# ---- found by a new user's trial: outputs that would destroy a file, a batch size of 1 ----------------

def test_an_output_never_replaces_the_input_the_checkpoint_or_a_folder(digits, tmp_path, capsys):
    predict, export = import_script("predict"), import_script("export")
    checkpoint, images = digits["checkpoint"], digits["folder"] / "images.npy"
    before = checkpoint.read_bytes(), images.read_bytes()
    cases = [(predict, ["--input", str(images), "--output", str(images)],
              f"--output {images}: is an input of this command; name another file"),
             (predict, ["--input", "split:test", "--output", str(checkpoint)],
              f"--output {checkpoint}: is an input of this command; name another file"),
             (predict, ["--input", "split:test", "--output", str(digits["folder"] / "images.npy")],
              f"--output {digits['folder'] / 'images.npy'}: exists and is not a .csv file; name a new file (or "
              f"delete it)"),
             (predict, ["--input", str(images), "--output", f"{tmp_path / 'new'}/"],
              f"--output {tmp_path / 'new'}/: is a folder; name the file to write (e.g. "
              f"{tmp_path / 'new' / 'predictions.csv'})"),
             (export, ["--format", "torch_export", "--output", str(checkpoint)],
              f"--output {checkpoint}: is an input of this command; name another file")]
    for module, argv, expected in cases:
        code, _, err = run_main(module, ["-r", str(checkpoint), *argv], capsys)
        assert code == 2 and err.strip().splitlines()[-1] == f"error: {expected}", err
    assert (checkpoint.read_bytes(), images.read_bytes()) == before
    assert not (tmp_path / "new").exists()


def test_a_run_trained_with_batch_size_1_exports_with_a_dynamic_batch(digits, tmp_path, capsys):
    export = import_script("export")
    output = tmp_path / "bs1.pt2"
    code, out, err = run_main(export, ["-r", str(digits["checkpoint"]), "--format", "torch_export", "--output",
                                       str(output), "data_loader.args.batch_size=1"], capsys)
    assert code == 0, err
    info = json.loads(Path(f"{output}.json").read_text())
    assert info["parity"]["batch_sizes"] == [6, 3, 1]
    program = torch.export.load(output).module()
    with torch.no_grad():
        assert torch.allclose(program(digits["images"][:5]), digits["model"](digits["images"][:5]), atol=1e-5)


def test_a_step_without_its_predict_step_is_told_to_override_it(tmp_path):
    from checkpoint.trained import predict_step_hint
    from trainer.tasks import SegmentationTrainer
    from trainer.trainer import Trainer

    class MaskTrainer(Trainer):
        def step(self, batch):
            raise NotImplementedError

    trainer = object.__new__(MaskTrainer)
    assert predict_step_hint(trainer) == (
        "; MaskTrainer overrides step but not predict_step, whose default is self.model(input): override "
        "predict_step(self, batch) to run the model as step does (README: Your own training step)")
    assert predict_step_hint(object.__new__(SegmentationTrainer)) == ""  # it overrides both
    assert predict_step_hint(object.__new__(Trainer)) == ""
