"""Monitoring (issue 6): TensorBoard event files read back by TensorBoard itself (its event reader and
its real HTTP server), resume without duplicated or missing steps, TensorBoard off or absent,
progress bars on a terminal, plain output elsewhere, verbosity, and the end-of-run summary."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, run_script, small_digits

CONFIG = str(ROOT / "configs" / "digits.yaml")
# An epoch's summary line, on the console or in train.log (there after "<date> <time> INFO ").
EPOCH_LINE = re.compile(r"^(?:\S+ \S+ INFO )?epoch (\d+)/\d+ .*\bval_accuracy (\d\.\d{4})", re.MULTILINE)
EPOCH_TAGS = ["loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr/group0", "time/epoch_seconds",
              "throughput/train_samples_per_s", "epoch"]


# ---- helpers ------------------------------------------------------------------------------------
def accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {kind: 0 for kind in ("scalars", "histograms", "images", "tensors", "compressedHistograms")}
    acc = EventAccumulator(str(run_dir), size_guidance=guidance)  # 0: keep every event
    acc.Reload()
    return acc


def val_accuracy_by_epoch(log: str) -> dict[int, float]:
    """{epoch: val_accuracy} from the epoch lines of a log; a later line for an epoch wins (resume)."""
    return {int(epoch): float(value) for epoch, value in EPOCH_LINE.findall(log)}


def load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def tensorboard_server(logdir: Path, log_file: Path):
    """The real `tensorboard` command on 127.0.0.1; yields it and a function returning a route's JSON."""
    port = free_port()
    exe = Path(PYTHON).parent / "tensorboard"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([str(exe), "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1",
                                 "--reload_interval", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def get(path: str, body: dict | None = None, **query: str):
            url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
            data = json.dumps(body).encode() if body is not None else None  # a body makes it a POST
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        yield proc, get
    finally:
        proc.kill()
        proc.wait(timeout=10)


def poll(get, check, what: str, log_file: Path, proc, seconds: float = 40.0):
    """Call `check(get)` until it returns a truthy value (TensorBoard loads event files in the background)."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}:\n{log_file.read_text(errors='replace')}")
        try:
            result = check(get)
            if result:
                return result
            last = "not yet"
        except OSError as exc:  # not listening yet
            last = repr(exc)
        time.sleep(0.5)
    pytest.fail(f"tensorboard never served {what} ({last}):\n{log_file.read_text(errors='replace')[-2000:]}")


def blocked_tensorboard(tmp_path: Path) -> dict:
    """An environment in which `import tensorboard` fails, as if the package were not installed."""
    stub = tmp_path / "no_tensorboard" / "tensorboard"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboard' (blocked by the test)\")\n")
    return {"PYTHONPATH": str(stub.parent)}


# ---- one ordinary run, shared by several tests (the resume test works on a copy) -------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("saved")
    proc = run_script("train.py", "-c", CONFIG, "--run-id", "r1",
                      *small_digits(save_dir, "trainer.epochs=3", "trainer.log_every_steps=2",
                                    "trainer.save_period=1"), check=True)
    return proc, save_dir, save_dir / "digits" / "r1"


def epoch_steps(run_dir: Path) -> list[int]:
    """The global step at the end of each of the run's three epochs (all of equal length)."""
    per_epoch = load(run_dir / "checkpoints" / "epoch-1.pth")["global_step"]
    return [per_epoch, 2 * per_epoch, 3 * per_epoch]


def test_event_file_read_back_by_tensorboard(run):
    proc, _, run_dir = run
    acc = accumulator(run_dir)
    last = load(run_dir / "checkpoints" / "last.pth")
    steps = epoch_steps(run_dir)

    tags = acc.Tags()
    for tag in EPOCH_TAGS + ["loss/train_step", "grad_norm/train_step", "best/val_accuracy"]:
        assert tag in tags["scalars"], tag
    for tag in tags["scalars"]:
        logged = [event.step for event in acc.Scalars(tag)]
        assert len(logged) == len(set(logged)), f"{tag}: duplicate steps {logged}"
    for tag in EPOCH_TAGS:
        assert [event.step for event in acc.Scalars(tag)] == steps, tag
    logged = val_accuracy_by_epoch(proc.stdout)
    assert [round(event.value, 4) for event in acc.Scalars("accuracy/val")] == [logged[1], logged[2], logged[3]]
    assert acc.Scalars("best/val_accuracy")[-1].value == pytest.approx(last["monitor_best"], rel=1e-6)
    assert [event.step for event in acc.Scalars("loss/train_step")] == list(range(2, steps[-1] + 1, 2))

    # Histograms: every parameter's weights and gradients, once per epoch, over all its elements.
    for name, tensor in last["state_dict"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")) or "pixel_" in name:
            continue
        for kind in ("weights", "grads"):
            events = acc.Histograms(f"{kind}/{name}")
            assert [event.step for event in events] == steps, f"{kind}/{name}"
            assert events[-1].histogram_value.num == sum(events[-1].histogram_value.bucket) == tensor.numel()
    weights = last["state_dict"]["classifier.5.weight"]
    histogram = acc.Histograms("weights/classifier.5.weight")[-1].histogram_value
    assert histogram.min == pytest.approx(weights.min().item()) and histogram.max == pytest.approx(weights.max().item())

    # Images: one captioned grid of validation samples per epoch.
    from PIL import Image

    images = acc.Images("samples/val")
    assert [event.step for event in images] == steps
    grid = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert grid.size == (images[-1].width, images[-1].height) and grid.width > 400

    # HParams: the flattened config, typed, once; the config as text; the model graph.
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    content = acc.PluginTagToContent("hparams")[hparams_metadata.SESSION_START_INFO_TAG]
    hparams = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["optimizer.args.lr"].number_value == pytest.approx(2e-3)
    assert hparams["trainer.epochs"].number_value == 3
    assert hparams["arch.type"].string_value == "DigitsCNN"
    assert hparams["trainer.tensorboard"].bool_value is True
    assert hparams["metrics"].string_value == '["accuracy", "top_k_acc"]'
    assert "_hparams_/experiment" not in acc.Tags()["tensors"]  # TensorBoard unites the runs' hparams itself
    assert len(acc.Tensors(hparams_metadata.SESSION_START_INFO_TAG)) == 1
    text = acc.Tensors("config/text_summary")
    assert len(text) == 1 and b"type: DigitsCNN" in text[0].tensor_proto.string_val[0]
    graph = acc.Graph()
    assert any("Conv2d" in node.op or "conv" in node.name.lower() for node in graph.node), [n.name for n in graph.node]


def test_real_tensorboard_server_serves_what_training_logged(run, tmp_path):
    proc, save_dir, run_dir = run
    logged = val_accuracy_by_epoch(proc.stdout)
    steps = epoch_steps(run_dir)
    log_file = tmp_path / "tensorboard.log"
    with tensorboard_server(save_dir, log_file) as (server, get):
        def series(get):
            tags = get("/data/plugin/scalars/tags").get("digits/r1", {})
            if not all(tag in tags for tag in EPOCH_TAGS):
                return None
            values = get("/data/plugin/scalars/scalars", run="digits/r1", tag="accuracy/val")
            return values if len(values) == 3 else None

        values = poll(get, series, "the run's scalars", log_file, server)
        assert [step for _, step, _ in values] == steps
        assert [round(value, 4) for _, _, value in values] == [logged[1], logged[2], logged[3]]
        best = load(run_dir / "checkpoints" / "best.pth")
        assert values[best["best_epoch"] - 1][2] == pytest.approx(best["monitor_best"], rel=1e-6)  # float32

        # The HParams view: the run's hyperparameters, with its best value as a metric column.
        query = {"experimentName": "", "startIndex": 0, "sliceSize": 10,
                 "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                 "colParams": [{"hparam": "optimizer.args.lr"}, {"metric": {"tag": "best/val_accuracy", "group": ""}}]}
        groups = get("/data/plugin/hparams/session_groups", body=query)["sessionGroups"]
        assert [group["name"] for group in groups] == ["digits/r1"]
        assert groups[0]["hparams"]["optimizer.args.lr"] == pytest.approx(2e-3)
        metric = [m for m in groups[0]["metricValues"] if m["name"]["tag"] == "best/val_accuracy"]
        assert metric[0]["value"] == pytest.approx(best["monitor_best"], rel=1e-6)


@pytest.mark.slow
def test_resume_after_kill_has_one_value_per_step_in_every_series(run, tmp_path):
    """A finished run (a copy) rewound to its epoch-1 checkpoint leaves orphaned events at every later
    step; that session is killed with SIGKILL after a mid-epoch save; a second resume finishes.
    TensorBoard's own reader and its real server must show exactly one value per step, from the
    sessions that count."""
    save_dir = tmp_path / "saved"
    run_dir = save_dir / "digits" / "r"
    shutil.copytree(run[2], run_dir)

    session = subprocess.Popen([PYTHON, str(ROOT / "train.py"), "-r", str(run_dir / "checkpoints" / "epoch-1.pth"),
                                "trainer.verbosity=2", "trainer.save_every_steps=4"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen, saves_after_epoch_2 = [], 0
    watchdog = threading.Timer(180, session.kill)  # never hang the suite on a session that stalls
    watchdog.start()
    try:
        for line in session.stdout:  # SIGKILL right after the first mid-epoch save of epoch 3
            seen.append(line)
            if any(x.startswith("epoch 2/3") for x in seen) and re.match(r"saved /.*\.pth$", line):
                saves_after_epoch_2 += 1  # the first is epoch 2's own checkpoint
                if saves_after_epoch_2 >= 2 and line.rstrip().endswith("last.pth"):
                    break
    finally:
        session.send_signal(signal.SIGKILL)
        session.wait(timeout=30)
        watchdog.cancel()
    assert session.returncode == -signal.SIGKILL, "".join(seen)
    final = run_script("train.py", "-r", str(run_dir), check=True)

    log = (run_dir / "train.log").read_text()
    expected = val_accuracy_by_epoch(log)  # the newest line for each epoch
    assert sorted(expected) == [1, 2, 3] and "resumed at epoch 3 batch" in final.stdout  # mid-epoch
    steps = epoch_steps(run_dir)

    acc = accumulator(run_dir)
    for tag in acc.Tags()["scalars"]:
        logged = [event.step for event in acc.Scalars(tag)]
        assert logged == sorted(set(logged)), f"{tag}: {logged}"
    assert [event.step for event in acc.Scalars("loss/train_step")] == list(range(2, steps[-1] + 1, 2))
    for tag in EPOCH_TAGS:
        assert [event.step for event in acc.Scalars(tag)] == steps, tag
    assert [event.value for event in acc.Scalars("epoch")] == [1, 2, 3]
    assert [round(event.value, 4) for event in acc.Scalars("accuracy/val")] == [expected[e] for e in (1, 2, 3)]
    assert [event.step for event in acc.Images("samples/val")] == steps
    assert len(acc.Tensors("_hparams_/session_start_info")) == 1 and len(acc.Tensors("config/text_summary")) == 1
    # The reader of `tensorboard --load_fast=false` (and of the server without its Rust data server)
    # purges only from a run's second session start: the first session must have written one.
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    server_reader = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    server_reader.Reload()
    for tag in server_reader.Tags()["tensors"]:
        logged = [event.step for event in server_reader.Tensors(tag)]
        assert logged == sorted(set(logged)), f"{tag} (server's Python reader): {logged}"
    assert [event.step for event in server_reader.Tensors("accuracy/val")] == steps

    log_file = tmp_path / "tensorboard.log"
    with tensorboard_server(save_dir, log_file) as (server, get):
        def all_series(get):
            tags = sorted(get("/data/plugin/scalars/tags").get("digits/r", {}))
            if not all(tag in tags for tag in EPOCH_TAGS):
                return None
            data = {tag: get("/data/plugin/scalars/scalars", run="digits/r", tag=tag) for tag in tags}
            return data if [round(v, 4) for _, _, v in data["accuracy/val"]] == [expected[e] for e in (1, 2, 3)] \
                else None

        data = poll(get, all_series, "the resumed run's final values", log_file, server)
    for tag, values in data.items():
        logged = [step for _, step, _ in values]
        assert logged == sorted(set(logged)), f"{tag} via HTTP: {logged}"
    for tag in EPOCH_TAGS:
        assert [step for _, step, _ in data[tag]] == steps, tag
    assert [step for _, step, _ in data["loss/train_step"]] == list(range(2, steps[-1] + 1, 2))


# ---- TensorBoard off or absent, verbosity, plain output -------------------------------------------
def test_tensorboard_missing_warns_once_and_verbosity_0_prints_nothing_else(tmp_path):
    proc = run_script("train.py", "-c", CONFIG, *small_digits(tmp_path, "trainer.epochs=1", "trainer.verbosity=0"),
                      env=blocked_tensorboard(tmp_path), check=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 1 and "tensorboard package is not installed" in lines[0], lines
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    log = next(tmp_path.rglob("train.log")).read_text()
    assert "epoch 1/1" in log and "not installed" in log  # the file keeps everything at any verbosity


def test_tensorboard_off_writes_nothing_and_never_imports_it(tmp_path):
    # With `import tensorboard` failing, a run with TensorBoard off must not even notice.
    proc = run_script("train.py", "-c", CONFIG, *small_digits(tmp_path, "trainer.epochs=1", "trainer.verbosity=2",
                                                                "trainer.tensorboard=false"),
                      env=blocked_tensorboard(tmp_path), check=True)
    assert "warning" not in (proc.stdout + proc.stderr).lower()
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    assert "tensorboard --logdir" not in proc.stdout  # the summary does not point to nothing
    assert re.search(r"^saved /.*\.pth$", proc.stdout, re.MULTILINE)  # verbosity 2: debug lines


def test_plain_output_without_a_terminal(run):
    proc, _, _ = run
    assert "\r" not in proc.stdout + proc.stderr
    assert not re.search(r"^saved /.*\.pth$", proc.stdout, re.MULTILINE)  # verbosity 1: no debug lines
    assert proc.stderr == ""


def test_end_of_run_summary(run):
    proc, save_dir, run_dir = run
    best = load(run_dir / "checkpoints" / "best.pth")
    tail = proc.stdout[proc.stdout.index("finished: run directory"):]
    assert f"best val_accuracy: {best['monitor_best']:.4f} at epoch {best['best_epoch']}" in tail
    assert f"checkpoints: {run_dir / 'checkpoints'}\n" in tail
    assert f"python test.py -r {run_dir / 'checkpoints' / 'best.pth'}\n" in tail
    assert f"tensorboard --logdir {save_dir}" in tail


@pytest.mark.slow
def test_progress_bars_on_a_terminal(tmp_path):
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    command = [PYTHON, str(ROOT / "train.py"), "-c", CONFIG,
               *small_digits(tmp_path, "trainer.epochs=1", "data_loader.args.batch_size=16")]
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        proc.wait(timeout=120)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out
    assert re.search(r"\repoch 1: +\d+%\|.*\| \d+/\d+ \[\d\d:\d\d<\d\d:\d\d", out), out  # bar with an ETA
    assert re.search(r"\repoch 1: .*loss=\d.*accuracy=\d", out), out  # loss and metrics in the postfix
    assert re.search(r"\rvalid 1: +\d+%\|", out), out
    assert "epoch 1/1  loss" in out  # the epoch's summary line stays after its bar is gone


# ---- the sample grid, directly ----------------------------------------------------------------------
def test_sample_grid_shows_each_input_with_true_and_predicted_label():
    import torch

    from logger.images import CAPTION, GAP, TILE, sample_grid

    data = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 1, 8, 8)
    target = torch.tensor([1, 2, 3])
    output = torch.nn.functional.one_hot(torch.tensor([1, 2, 0]), 10).float()  # the third is wrong
    grid = sample_grid(data, target, output)
    assert grid.shape == (TILE + CAPTION, 3 * (TILE + GAP) - GAP, 3) and grid.dtype == torch.uint8
    grid = grid.permute(2, 0, 1)  # (3, H, W)
    # Tile 0 is input 0 scaled to 0..255 and enlarged (each pixel a 12x12 block).
    expected = ((data[0, 0] - data[0].min()) / (data[0].max() - data[0].min()) * 255).round()
    block = TILE // 8
    assert torch.equal(grid[0, :TILE:block, :TILE:block].float(), expected)
    for k, right in enumerate([True, True, False]):  # captions: green when right, red when wrong
        red, green, _ = grid[:, TILE:, k * (TILE + GAP): k * (TILE + GAP) + TILE].float().sum(dim=(1, 2))
        assert green > 0 and red > 0 and (green > 2 * red) == right and (red > 2 * green) != right, k
    assert sample_grid(torch.zeros(4, 10), target, output) is None  # not images
    assert sample_grid(data, torch.zeros(3), torch.zeros(3, 1)) is None  # not classification


def test_model_that_does_not_trace_gets_a_note_instead_of_a_graph(tmp_path, capsys):
    import torch

    from logger import make_writer, setup_logging

    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return {"scores": x, "note": "a string is no tensor"}  # torch.jit.trace refuses this output

    setup_logging(None, verbosity=1)
    writer = make_writer(tmp_path, True)
    model = Untraceable().train()
    writer.add_model_graph(model, torch.zeros(2, 3))
    writer.close()
    out = capsys.readouterr().out
    assert out.startswith("TensorBoard graph skipped: the model does not trace") and out.count("\n") == 1, out
    assert model.training  # the mode is restored
    assert not accumulator(tmp_path).Tags()["graph"]


def test_progress_without_a_terminal_logs_plain_lines(capsys):
    from logger import Progress, setup_logging

    setup_logging(None, verbosity=1)
    progress = Progress(range(4), 4, "epoch 3", enabled=True, interval=0.0)  # a line after every batch
    progress.postfix = lambda: {"loss": 0.5}
    assert list(progress) == [0, 1, 2, 3]
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()  # none for the last batch: the epoch's summary line follows it
    assert [line.split(" (")[0] for line in lines] == [f"epoch 3 [{i}/4] loss=0.5" for i in (1, 2, 3)]
    assert all(re.search(r"\(\d+(\.\d+)? it/s, eta \d+s\)$", line) for line in lines), lines
    assert list(Progress(range(3), 3, "x", enabled=False)) == [0, 1, 2] and capsys.readouterr().out == ""


def test_scalars_are_held_back_until_a_flush_and_keep_their_value_when_logged(tmp_path):
    import numpy as np
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from logger import make_writer

    writer = make_writer(tmp_path, True)
    writer.add_scalar("x", 0.5, 0)  # the first one is written at once (nothing written for FLUSH_SECONDS)
    value = torch.tensor(1.5)
    writer.add_scalar("x", value, 1)
    value.fill_(7.0)  # changed in place after it was logged: 1.5 must be what gets written
    writer.add_scalar("x", 2.5, 2)
    writer.add_scalar("x", np.float64(3.5), 3)  # NumPy values (they have a `device` too, a string)
    assert len(writer._pending) == 3  # held back: no protobuf, no writer-thread work per call
    writer.flush()  # before every checkpoint: everything logged so far reaches the event file
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(0, 0.5), (1, 1.5), (2, 2.5), (3, 3.5)]
    writer.close()
