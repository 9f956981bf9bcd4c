"""Monitoring (issues 6, 16): TensorBoard event files read back by TensorBoard itself (its event reader
and its real HTTP server), train and validation curves on one chart, values logged at the step they
were in force, the HParams record (differing hyperparameters first, a short list of metrics, each
run's status, updated on resume), metrics.csv through kills and resumes, readable captions, resume
without duplicated or missing steps, TensorBoard off or absent, progress bars on a terminal, plain
output elsewhere, an 80-column console, verbosity, and the end-of-run summary."""
from __future__ import annotations

import contextlib
import csv
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
# A validation line of an epoch's summary, on the console or in train.log (there after "<date> <time> INFO ").
VAL_LINE = re.compile(r"^(?:\S+ \S+ INFO )?epoch (\d+)/\d+ val .*\baccuracy ([\d.e+-]+)", re.MULTILINE)
ROOT_TAGS = ["lr/group0", "time/epoch_seconds", "throughput/train_samples_per_s"]  # once per epoch, in the run
SPLIT_TAGS = ["loss", "accuracy", "top_k_acc"]  # once per epoch, in train/ and in val/
LR = 2e-3  # configs/digits.yaml; the module's run halves it every epoch


# ---- helpers ------------------------------------------------------------------------------------
def accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {kind: 0 for kind in ("scalars", "histograms", "images", "tensors", "compressedHistograms")}
    acc = EventAccumulator(str(run_dir), size_guidance=guidance)  # 0: keep every event
    acc.Reload()
    return acc


def steps_of(acc, tag: str) -> list[int]:
    return [event.step for event in acc.Scalars(tag)]


def record_dir(run_dir: Path) -> Path:
    """The run's HParams record folder: exactly one."""
    folders = [p for p in run_dir.iterdir() if p.name.startswith("hparams-")]
    assert len(folders) == 1, folders
    return folders[0]


def hparams_record(run_dir: Path) -> tuple[dict, object, dict, str]:
    """(hyperparameters, session end info or None, {summary tag: value}, config text) of a run."""
    from tensorboard.plugins.hparams import metadata

    acc = accumulator(record_dir(run_dir))
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = (metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
           if metadata.SESSION_END_INFO_TAG in content else None)
    hparams = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for name, value in start.hparams.items()}
    summary = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    text = acc.Tensors("config/text_summary")
    assert len(text) == 1
    return hparams, end, summary, text[0].tensor_proto.string_val[0].decode()


def val_accuracy_by_epoch(log: str) -> dict[int, float]:
    """{epoch: val accuracy} from the epoch lines of a log; a later line for an epoch wins (resume)."""
    return {int(epoch): float(value) for epoch, value in VAL_LINE.findall(log)}


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


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


SESSION_QUERY = {"experimentName": "", "startIndex": 0, "sliceSize": 10,
                 "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                 "colParams": [{"hparam": "optimizer.args.lr"}]}


def blocked_tensorboard(tmp_path: Path) -> dict:
    """An environment in which `import tensorboard` fails, as if the package were not installed."""
    stub = tmp_path / "no_tensorboard" / "tensorboard"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboard' (blocked by the test)\")\n")
    return {"PYTHONPATH": str(stub.parent)}


# ---- one ordinary run, shared by several tests (the resume test works on a copy) -------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 epochs of digits; StepLR halves the learning rate after every epoch."""
    save_dir = tmp_path_factory.mktemp("saved")
    proc = run_script("train.py", "-c", CONFIG, "--run-id", "r1",
                      *small_digits(save_dir, "trainer.epochs=3", "trainer.log_every_steps=2",
                                    "trainer.save_period=1", "lr_scheduler.args.step_size=1"), check=True)
    return proc, save_dir, save_dir / "digits" / "r1"


def epoch_steps(run_dir: Path) -> list[int]:
    """The global step at the end of each of the run's three epochs (all of equal length)."""
    per_epoch = load(run_dir / "checkpoints" / "epoch-1.pth")["global_step"]
    return [per_epoch, 2 * per_epoch, 3 * per_epoch]


def test_event_files_read_back_by_tensorboard(run):
    proc, _, run_dir = run
    last = load(run_dir / "checkpoints" / "last.pth")
    steps = epoch_steps(run_dir)
    root, train, val = accumulator(run_dir), accumulator(run_dir / "train"), accumulator(run_dir / "val")

    # Train and validation values of one name are one tag in two sub-runs: one chart, two curves.
    assert sorted(train.Tags()["scalars"]) == sorted(SPLIT_TAGS + ["loss/step"])
    assert sorted(val.Tags()["scalars"]) == sorted(SPLIT_TAGS)
    assert sorted(root.Tags()["scalars"]) == sorted(ROOT_TAGS + ["lr/group0_step", "optimizer/grad_norm"])
    for acc in (root, train, val):
        for tag in acc.Tags()["scalars"]:
            logged = steps_of(acc, tag)
            assert logged == sorted(set(logged)), f"{tag}: duplicate steps {logged}"
            assert not tag.startswith("best"), tag  # the best values live in the HParams record
    for tag in ROOT_TAGS:
        assert steps_of(root, tag) == steps, tag
    for tag in SPLIT_TAGS:
        assert steps_of(train, tag) == steps_of(val, tag) == steps, tag
    logged = val_accuracy_by_epoch(proc.stdout)
    assert [float(f"{e.value:.4g}") for e in val.Scalars("accuracy")] == [logged[1], logged[2], logged[3]]
    assert steps_of(train, "loss/step") == list(range(2, steps[-1] + 1, 2))

    # Every value at the step it was in force: epoch e trained at 2e-3 / 2^(e-1) (StepLR, step_size 1).
    assert [e.value for e in root.Scalars("lr/group0")] == pytest.approx([LR, LR / 2, LR / 4])
    per_step = {e.step: e.value for e in root.Scalars("lr/group0_step")}
    assert per_step == pytest.approx({s: LR / 2 ** ((s - 1) // steps[0]) for s in range(2, steps[-1] + 1, 2)})

    # Histograms: every parameter's weights and gradients, once per epoch, over all its elements (a tensor
    # of more than HISTOGRAM_VALUES elements drawn from that many, its counts scaled to its size).
    from logger.tensorboard import HISTOGRAM_VALUES

    for name, tensor in last["state_dict"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")) or "pixel_" in name:
            continue
        for tag in (f"weights/{name}", f"weights/{name}.grad"):
            events = root.Histograms(tag)
            assert [event.step for event in events] == steps, tag
            histogram = events[-1].histogram_value
            assert histogram.num == tensor.numel() and sum(histogram.bucket) == pytest.approx(tensor.numel())
            if tensor.numel() <= HISTOGRAM_VALUES:
                assert sum(histogram.bucket) == tensor.numel()
    weights = last["state_dict"]["classifier.5.weight"]
    assert weights.numel() <= HISTOGRAM_VALUES  # every value: the exact extremes
    histogram = root.Histograms("weights/classifier.5.weight")[-1].histogram_value
    assert histogram.min == pytest.approx(weights.min().item()) and histogram.max == pytest.approx(weights.max().item())

    # Images: one captioned grid of validation samples per epoch, one sample of each of the 10 classes.
    from PIL import Image

    images = root.Images("samples/val")
    assert [event.step for event in images] == steps
    grid = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert grid.size == (images[-1].width, images[-1].height) and 400 < grid.width < 750

    graph = root.Graph()
    assert any("Conv2d" in node.op or "conv" in node.name.lower() for node in graph.node), [n.name for n in graph.node]
    assert not root.Tags()["tensors"]  # no HParams or config text in the run itself: see the record


def test_hparams_record_holds_the_config_status_and_a_short_list_of_metrics(run):
    _, _, run_dir = run
    best = load(run_dir / "checkpoints" / "best.pth")
    hparams, end, summary, text = hparams_record(run_dir)
    assert hparams["optimizer.args.lr"] == pytest.approx(2e-3)
    assert hparams["trainer.epochs"] == 3
    assert hparams["arch.type"] == "DigitsCNN"
    assert hparams["trainer.tensorboard"] is True
    assert hparams["metrics"] == '["accuracy", "top_k_acc"]'
    assert hparams["status"] == "finished"
    from tensorboard.plugins.hparams import api_pb2

    assert end.status == api_pb2.STATUS_SUCCESS
    rows = csv_rows(run_dir)
    # The metric columns: the monitored best, then the last epoch's validation values; nothing else.
    assert summary == pytest.approx({"summary/best_val_accuracy": best["monitor_best"],
                                     **{f"summary/val_{name}": float(rows[-1][f"val_{name}"]) for name in SPLIT_TAGS}})
    assert "type: DigitsCNN" in text and "step_size: 1" in text


def test_metrics_csv_has_one_row_per_epoch_with_every_value(run):
    _, _, run_dir = run
    rows = csv_rows(run_dir)
    assert list(rows[0]) == ["epoch", "step", "time", "epoch_seconds", "lr", *SPLIT_TAGS,
                             *[f"val_{name}" for name in SPLIT_TAGS]]
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert [int(row["step"]) for row in rows] == epoch_steps(run_dir)
    assert [float(row["lr"]) for row in rows] == pytest.approx([LR, LR / 2, LR / 4])
    train, val = accumulator(run_dir / "train"), accumulator(run_dir / "val")
    for name in SPLIT_TAGS:
        assert [float(row[name]) for row in rows] == pytest.approx([e.value for e in train.Scalars(name)], rel=1e-6)
        assert [float(row[f"val_{name}"]) for row in rows] == pytest.approx([e.value for e in val.Scalars(name)],
                                                                           rel=1e-6)
    for row in rows:
        time.strptime(row["time"][:19], "%Y-%m-%dT%H:%M:%S")
        assert float(row["epoch_seconds"]) > 0


@pytest.mark.slow
def test_real_tensorboard_server_shows_one_chart_per_metric_and_differing_hparams_first(run, tmp_path):
    proc, save_dir, run_dir = run
    # A second run differing in one hyperparameter, in the same folder.
    run_script("train.py", "-c", CONFIG, "--run-id", "r2",
               *small_digits(save_dir, "trainer.epochs=1", "trainer.log_every_steps=2", "trainer.save_period=1",
                             "lr_scheduler.args.step_size=1", "optimizer.args.lr=0.01", "trainer.histograms=false"),
               check=True)
    logged = val_accuracy_by_epoch(proc.stdout)
    steps = epoch_steps(run_dir)
    log_file = tmp_path / "tensorboard.log"
    with tensorboard_server(save_dir, log_file) as (server, get):
        def series(get):
            tags = get("/data/plugin/scalars/tags")
            if not all(tag in tags.get(f"digits/{r}/{s}", {}) for r in ("r1", "r2") for s in ("train", "val")
                       for tag in SPLIT_TAGS):
                return None
            values = get("/data/plugin/scalars/scalars", run="digits/r1/val", tag="accuracy")
            return (tags, values) if len(values) == 3 else None

        tags, values = poll(get, series, "the runs' scalars", log_file, server)
        # One chart per name: "accuracy" is served for the train and the val run of each training run.
        assert [run for run in tags if "accuracy" in tags[run]] == [
            run for run in tags if run.endswith(("/train", "/val"))]
        assert [step for _, step, _ in values] == steps
        assert [float(f"{value:.4g}") for _, _, value in values] == [logged[1], logged[2], logged[3]]

        poll(get, lambda get: len(get("/data/plugin/hparams/session_groups", body=SESSION_QUERY)["sessionGroups"]) == 2,
             "both runs' HParams", log_file, server)
        experiment = get("/data/plugin/hparams/experiment", body={"experimentName": ""})
        names = [info["name"] for info in experiment["hparamInfos"]]
        differs = [info["name"] for info in experiment["hparamInfos"] if info.get("differs")]
        assert differs == ["optimizer.args.lr", "trainer.epochs", "trainer.histograms"]  # TensorBoard's own order
        assert names[:3] == differs  # the five columns TensorBoard ticks start with them
        assert [(m["name"]["tag"], m["name"].get("group", "")) for m in experiment["metricInfos"]] == [
            ("summary/best_val_accuracy", ""), ("summary/val_accuracy", ""), ("summary/val_loss", ""),
            ("summary/val_top_k_acc", "")]

        groups = get("/data/plugin/hparams/session_groups", body=SESSION_QUERY)["sessionGroups"]
        by_name = {group["name"]: group for group in groups}
        assert sorted(by_name) == ["digits/r1", "digits/r2"]
        best = load(run_dir / "checkpoints" / "best.pth")
        group = by_name["digits/r1"]
        assert group["hparams"]["optimizer.args.lr"] == pytest.approx(2e-3)
        assert group["hparams"]["status"] == "finished" and group["sessions"][0]["status"] == "STATUS_SUCCESS"
        metric = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert metric["summary/best_val_accuracy"] == pytest.approx(best["monitor_best"], rel=1e-6)


@pytest.mark.slow
def test_resume_after_kill_has_one_value_per_step_in_every_series_and_shows_its_overrides(run, tmp_path):
    """A finished run (a copy) rewound to its epoch-1 checkpoint leaves orphaned events and metrics.csv
    rows at every later step; that session is killed with SIGKILL after a mid-epoch save; a second resume,
    with an override, finishes. TensorBoard's own reader and its real server must show exactly one value
    per step, from the sessions that count, metrics.csv one row per epoch, and HParams and Text the
    config as overridden."""
    save_dir = tmp_path / "saved"
    run_dir = save_dir / "digits" / "r"
    shutil.copytree(run[2], run_dir)
    checkpoints = run_dir / "checkpoints"  # rewound: epoch 1's state as the newest (a new file: they are links)
    (checkpoints / "last.pth").unlink()
    shutil.copyfile(checkpoints / "epoch-1.pth", checkpoints / "last.pth")
    with open(run_dir / "metrics.csv", "a") as handle:
        handle.write("4,80,2026-01-01T00:00:00+00:00,0.5,0.0")  # a kill in the middle of a write

    session = subprocess.Popen([PYTHON, str(ROOT / "train.py"), "-r", str(run_dir),
                                "trainer.verbosity=2", "trainer.save_every_steps=4"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen, saves_after_epoch_2 = [], 0
    watchdog = threading.Timer(180, session.kill)  # never hang the suite on a session that stalls
    watchdog.start()
    try:
        for line in session.stdout:  # SIGKILL right after the first mid-epoch save of epoch 3
            seen.append(line)
            if any(x.startswith("epoch 2/3 val") for x in seen) and re.match(r"saved /.*\.pth$", line):
                saves_after_epoch_2 += 1  # the first is epoch 2's own checkpoint
                if saves_after_epoch_2 >= 2 and line.rstrip().endswith("last.pth"):
                    break
    finally:
        session.send_signal(signal.SIGKILL)
        session.wait(timeout=30)
        watchdog.cancel()
    assert session.returncode == -signal.SIGKILL, "".join(seen)
    assert [int(row["epoch"]) for row in csv_rows(run_dir)] == [1, 2]
    final = run_script("train.py", "-r", str(run_dir), "trainer.save_period=3", check=True)

    log = (run_dir / "train.log").read_text()
    expected = val_accuracy_by_epoch(log)  # the newest line for each epoch
    assert sorted(expected) == [1, 2, 3] and "resumed at epoch 3 batch" in final.stdout  # mid-epoch
    steps = epoch_steps(run_dir)

    root, train, val = accumulator(run_dir), accumulator(run_dir / "train"), accumulator(run_dir / "val")
    for acc in (root, train, val):
        for tag in acc.Tags()["scalars"]:
            logged = steps_of(acc, tag)
            assert logged == sorted(set(logged)), f"{tag}: {logged}"
    assert steps_of(train, "loss/step") == list(range(2, steps[-1] + 1, 2))
    for tag in ROOT_TAGS:
        assert steps_of(root, tag) == steps, tag
    for tag in SPLIT_TAGS:
        assert steps_of(train, tag) == steps_of(val, tag) == steps, tag
    assert [float(f"{e.value:.4g}") for e in val.Scalars("accuracy")] == [expected[e] for e in (1, 2, 3)]
    assert [event.step for event in root.Images("samples/val")] == steps

    # metrics.csv: the orphaned rows and the cut line are gone, each epoch once, the values of the original run.
    rows, original = csv_rows(run_dir), csv_rows(run[2])
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    for row, before in zip(rows, original):
        assert {k: float(v) for k, v in row.items() if k not in ("time", "epoch_seconds")} == pytest.approx(
            {k: float(v) for k, v in before.items() if k not in ("time", "epoch_seconds")}, rel=1e-6)
    assert (run_dir / "metrics.csv").read_text().endswith("\n")

    # HParams and Text: the config as overridden on resume, finished, the final values.
    hparams, end, summary, text = hparams_record(run_dir)
    assert hparams["trainer.save_period"] == 3 and hparams["status"] == "finished"
    assert "save_period: 3" in text
    assert summary["summary/val_accuracy"] == pytest.approx(float(rows[-1]["val_accuracy"]), rel=1e-6)

    # The reader of `tensorboard --load_fast=false` (and of the server without its Rust data server)
    # purges only from a run's second session start: the first session must have written one.
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    for sub in ("", "train", "val"):
        server_reader = EventAccumulator(str(run_dir / sub), size_guidance={"tensors": 0})
        server_reader.Reload()
        for tag in server_reader.Tags()["tensors"]:
            logged = [event.step for event in server_reader.Tensors(tag)]
            assert logged == sorted(set(logged)), f"{sub}/{tag} (server's Python reader): {logged}"
    assert [event.step for event in server_reader.Tensors("accuracy")] == steps

    log_file = tmp_path / "tensorboard.log"
    with tensorboard_server(save_dir, log_file) as (server, get):
        def all_series(get):
            tags = get("/data/plugin/scalars/tags")
            if not all(tag in tags.get("digits/r/val", {}) for tag in SPLIT_TAGS) or "digits/r" not in tags:
                return None
            data = {(run, tag): get("/data/plugin/scalars/scalars", run=run, tag=tag)
                    for run in ("digits/r", "digits/r/train", "digits/r/val") for tag in tags.get(run, {})}
            values = [float(f"{v:.4g}") for _, _, v in data[("digits/r/val", "accuracy")]]
            return data if values == [expected[e] for e in (1, 2, 3)] else None

        data = poll(get, all_series, "the resumed run's final values", log_file, server)
        groups = get("/data/plugin/hparams/session_groups", body=SESSION_QUERY)["sessionGroups"]
    for (run_name, tag), values in data.items():
        logged = [step for _, step, _ in values]
        assert logged == sorted(set(logged)), f"{run_name} {tag} via HTTP: {logged}"
    for tag in SPLIT_TAGS:
        assert [step for _, step, _ in data[("digits/r/val", tag)]] == steps, tag
    assert [step for _, step, _ in data[("digits/r/train", "loss/step")]] == list(range(2, steps[-1] + 1, 2))
    assert [group["name"] for group in groups] == ["digits/r"]
    assert groups[0]["hparams"]["trainer.save_period"] == 3


@pytest.mark.slow
def test_metrics_csv_has_each_epoch_once_through_kill_9_at_random_moments(run, tmp_path):
    """SIGKILL at random moments (mid-epoch, between an epoch's row and its checkpoint, in a save), then
    resumes until the run finishes: metrics.csv holds epochs 1..3 once each, with the values of the run
    that was never interrupted."""
    import random

    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    run_dir = tmp_path / "saved" / "digits" / "k"
    argv = [PYTHON, str(ROOT / "train.py"), "-c", CONFIG, "--run-id", "k",
            *small_digits(tmp_path / "saved", "trainer.epochs=3", "trainer.log_every_steps=2",
                          "trainer.save_period=1", "lr_scheduler.args.step_size=1", "trainer.save_every_steps=3")]
    kills = 0
    for attempt in range(12):
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out = []
        if kills < 4:  # a moment in the training (3 epochs take about 1-3 s here), then SIGKILL
            for line in proc.stdout:
                out.append(line)
                if line.startswith("run directory:"):
                    time.sleep(rng.uniform(0.0, 0.8))
                    proc.send_signal(signal.SIGKILL)
                    break
        out.append(proc.communicate(timeout=240)[0])
        if proc.returncode == 0:
            break
        kills += 1
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: exit {proc.returncode}\n{''.join(out)[-2000:]}"
        if (run_dir / "checkpoints" / "last.pth").exists():
            argv = [PYTHON, str(ROOT / "train.py"), "-r", str(run_dir)]
        rows = csv_rows(run_dir) if (run_dir / "metrics.csv").exists() else []
        epochs = [int(row["epoch"]) for row in rows]
        assert epochs == sorted(set(epochs)), f"seed {seed}: {epochs}"
    assert proc.returncode == 0, f"seed {seed}: never finished"
    rows, original = csv_rows(run_dir), csv_rows(run[2])
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3], f"seed {seed}, {kills} kills"
    assert kills >= 2, f"seed {seed}: the run finished before it could be killed twice"
    for row, before in zip(rows, original):
        assert {k: float(v) for k, v in row.items() if k not in ("time", "epoch_seconds")} == pytest.approx(
            {k: float(v) for k, v in before.items() if k not in ("time", "epoch_seconds")}, rel=1e-6), seed


def test_metrics_csv_resume_cuts_later_rows_and_a_partial_line(tmp_path):
    from logger.epoch_log import CsvLogger, EpochRecord

    path = tmp_path / "metrics.csv"
    sink = CsvLogger(path)
    sink.start(0)
    for epoch in (1, 2, 3):
        sink.log_epoch(EpochRecord(epoch, 10 * epoch, 1.7e9, 0.5, [1e-3, 2e-3], {"loss": 1 / epoch},
                                   {"loss": 2 / epoch, "accuracy": 0.5}))
    with open(path, "a") as handle:
        handle.write("4,40,2023")  # cut by a kill
    again = CsvLogger(path)
    again.start(2)  # the checkpoint holds epochs 1 and 2
    assert [row["epoch"] for row in csv_rows(tmp_path)] == ["1", "2"]
    again.log_epoch(EpochRecord(3, 30, 1.7e9, 0.5, [1e-3, 2e-3], {"loss": 0.25}, {"loss": 0.5, "accuracy": 0.75},
                                "val_accuracy", 0.75, 3, True))
    rows = csv_rows(tmp_path)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["epoch", "step", "time", "epoch_seconds", "lr_group0", "lr_group1", "loss", "val_loss",
                             "val_accuracy"]
    assert rows[2]["loss"] == "0.25" and rows[2]["lr_group1"] == "0.002"
    # A metric added on resume becomes a column, empty before.
    again.log_epoch(EpochRecord(4, 40, 1.7e9, 0.5, [1e-3, 2e-3], {"loss": 0.2, "f1": 0.9}, {"loss": 0.4}))
    rows = csv_rows(tmp_path)
    assert list(rows[0])[-1] == "f1" and rows[0]["f1"] == "" and rows[3]["f1"] == "0.9"
    CsvLogger(path).start(0)  # a fresh start in the same directory
    assert path.read_text() == ""


# Each run's status (failed on a non-finite loss, early-stopped, interrupted by SIGTERM or SIGHUP: the `status`
# hyperparameter and TensorBoard's own session status) is checked in test_errors.py, on the runs that check
# train.log's record of how they ended (test_train_log_ends_with_how_the_run_ended and
# test_a_signal_is_recorded_in_train_log_with_the_resume_command): the same three runs served both.


@pytest.mark.slow
def test_learning_rate_of_a_per_step_schedule_is_the_one_each_step_used(tmp_path):
    """StepLR stepped every optimizer step, halving every 7 steps: step s trained at 2e-3 / 2^((s-1) // 7)."""
    run_script("train.py", "-c", CONFIG, "--run-id", "s",
               *small_digits(tmp_path, "trainer.epochs=2", "trainer.log_every_steps=1", "lr_scheduler.interval=step",
                             "lr_scheduler.args.step_size=7", "trainer.histograms=false", "trainer.images=false"),
               check=True)
    run_dir = tmp_path / "digits" / "s"
    root = accumulator(run_dir)
    per_step = {e.step: e.value for e in root.Scalars("lr/group0_step")}
    assert per_step == pytest.approx({s: LR / 2 ** ((s - 1) // 7) for s in per_step}) and len(per_step) > 30
    ends = [int(row["step"]) for row in csv_rows(run_dir)]
    assert [e.value for e in root.Scalars("lr/group0")] == pytest.approx([LR / 2 ** ((s - 1) // 7) for s in ends])
    assert [float(row["lr"]) for row in csv_rows(run_dir)] == pytest.approx([LR / 2 ** ((s - 1) // 7) for s in ends])


# ---- TensorBoard off or absent, verbosity, plain output -------------------------------------------
@pytest.mark.slow
def test_tensorboard_missing_warns_once_and_verbosity_0_prints_nothing_else(tmp_path):
    proc = run_script("train.py", "-c", CONFIG, *small_digits(tmp_path, "trainer.epochs=1", "trainer.verbosity=0"),
                      env=blocked_tensorboard(tmp_path), check=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 1 and "tensorboard package is not installed" in lines[0], lines
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    log = next(tmp_path.rglob("train.log")).read_text()
    assert "epoch 1/1" in log and "not installed" in log  # the file keeps everything at any verbosity
    assert [row["epoch"] for row in csv_rows(next(tmp_path.rglob("train.log")).parent)] == ["1"]


@pytest.mark.slow
def test_tensorboard_off_writes_nothing_and_never_imports_it(tmp_path):
    # With `import tensorboard` failing, a run with TensorBoard off must not even notice.
    proc = run_script("train.py", "-c", CONFIG, *small_digits(tmp_path, "trainer.epochs=1", "trainer.verbosity=2",
                                                                "trainer.tensorboard=false"),
                      env=blocked_tensorboard(tmp_path), check=True)
    assert "warning" not in (proc.stdout + proc.stderr).lower()
    assert not list(tmp_path.rglob("events.out.tfevents*")) and not list(tmp_path.rglob("hparams-*"))
    assert "tensorboard --logdir" not in proc.stdout  # the summary does not point to nothing
    assert re.search(r"^saved /.*\.pth$", proc.stdout, re.MULTILINE)  # verbosity 2: debug lines
    run_dir = next(tmp_path.rglob("train.log")).parent
    assert [row["epoch"] for row in csv_rows(run_dir)] == ["1"]  # metrics.csv all the same


def test_plain_output_without_a_terminal_fits_80_columns(run):
    proc, _, _ = run
    assert "\r" not in proc.stdout + proc.stderr
    assert not re.search(r"^saved /.*\.pth$", proc.stdout, re.MULTILINE)  # verbosity 1: no debug lines
    assert proc.stderr == ""
    paths = str(run[1])
    for line in proc.stdout.splitlines():  # every line but those naming a (long, temporary) path
        assert paths in line or len(line) <= 80, line
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 6 and all(re.match(r"epoch \d/3 (train|val  )  loss ", x) for x in epoch_lines)


def test_default_verbosity_shows_no_debug_lines():
    import yaml

    from config.schema import validate

    raw = yaml.safe_load(Path(CONFIG).read_text())
    del raw["trainer"]["verbosity"]
    problems: list[str] = []
    assert validate(raw, problems)["trainer"]["verbosity"] == 1 and not problems


def test_end_of_run_summary(run):
    from logger.console import number

    proc, save_dir, run_dir = run
    best = load(run_dir / "checkpoints" / "best.pth")
    tail = proc.stdout[proc.stdout.index("finished: run directory"):]
    assert re.match(rf"finished: run directory {re.escape(str(run_dir))} \(3 epochs, step 60, [\d.]+s\)\n", tail)
    assert f"best val_accuracy: {number(best['monitor_best'])} at epoch {best['best_epoch']}\n" in tail
    assert f"checkpoints: {run_dir / 'checkpoints'}\n" in tail
    assert f"metrics:     {run_dir / 'metrics.csv'}\n" in tail
    assert f"evaluate:    python test.py -r {run_dir / 'checkpoints' / 'best.pth'}\n" in tail
    assert f"train more:  python train.py -r {run_dir} trainer.epochs=13\n" in tail
    assert f"tensorboard: tensorboard --logdir {save_dir}" in tail


def test_first_line_comes_before_torch_is_imported(tmp_path):
    """torch takes 1-2 s to import (10 s and more on a busy machine): the first line must not wait for it.
    A stand-in torch that takes 20 s shows whether it does."""
    stub = tmp_path / "slow" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("import time\ntime.sleep(20)\nraise ImportError('slow torch')\n")
    proc = subprocess.Popen([PYTHON, str(ROOT / "train.py"), "-c", CONFIG, f"trainer.save_dir={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(stub.parent)})
    try:
        started = time.monotonic()
        first = proc.stdout.readline()
        waited = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert first == "digits: loading torch, the data and the model\n", first
    assert waited < 10, waited


def test_numbers_keep_significant_digits_and_epoch_lines_fit_80_columns():
    from logger.console import epoch_lines, number

    assert [number(v) for v in (1.2e-05, 0.98148, 1.0, 1234.5678, 12345.678, 3)] == [
        "1.2e-05", "0.9815", "1", "1235", "1.235e+04", "3"]
    metrics = {f"metric_{i}": 0.123456 * i for i in range(12)}
    lines = epoch_lines(7, 20, {"loss": 1.2e-05, **metrics}, {"loss": 3e-07, **metrics}, 12.34, True)
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith("epoch 7/20 train  loss 1.2e-05  metric_0 0  metric_1 0.1235")
    assert all(line.startswith(("epoch 7/20 train  ", "epoch 7/20 val    ")) for line in lines)
    assert lines[-1].endswith("12.3s  *best") and sum("val    loss 3e-07" in line for line in lines) == 1


@pytest.mark.slow
def test_progress_bars_on_a_terminal(tmp_path):
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # an 80-column terminal
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
    assert re.search(r"\repoch 1/1: +\d+%\|.*\| \d+/\d+ \[\d\d:\d\d<\d\d:\d\d", out), out  # bar with an ETA
    assert re.search(r"\repoch 1/1: .*loss=\d.*accuracy=\d", out), out  # loss and metrics in the postfix
    assert re.search(r"\rvalid 1/1: +\d+%\|", out), out
    assert "epoch 1/1 train  loss" in out  # the epoch's summary line stays after its bar is gone
    for line in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out)):  # without terminal escapes
        assert str(tmp_path) in line or len(line) <= 80, line


# ---- the sample pictures, directly ------------------------------------------------------------------
def ink_rows(pixels) -> int:
    """Rows of a caption band (H, W, 3) holding any text pixel: the rendered height of its text."""
    rows = (pixels.max(dim=2).values > 60).any(dim=1).nonzero().flatten()
    return int(rows.max() - rows.min() + 1) if len(rows) else 0


def test_sample_grid_shows_each_input_with_readable_true_and_predicted_labels():
    import torch

    from logger.images import CELL, GAP, LINE, TILE, caption, sample_grid

    data = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 1, 8, 8)
    target = torch.tensor([1, 2, 3])
    output = torch.nn.functional.one_hot(torch.tensor([1, 2, 0]), 10).float()  # the third is wrong
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    grid = sample_grid(data, target, output, classes=classes)
    assert grid.shape == (TILE + 2 * LINE, 3 * (CELL + GAP) - GAP, 3) and grid.dtype == torch.uint8
    # Tile 0 is input 0 scaled to 0..255 and enlarged (each pixel a 10x10 block), centred in its cell.
    expected = ((data[0, 0] - data[0].min()) / (data[0].max() - data[0].min()) * 255).round()
    block, left = TILE // 8, (CELL - TILE) // 2
    assert torch.equal(grid[:TILE:block, left:left + TILE:block, 0].float(), expected)
    for k, right in enumerate([True, True, False]):  # predicted: green when right, red when wrong
        band = grid[TILE + LINE:TILE + 2 * LINE, k * (CELL + GAP): k * (CELL + GAP) + CELL]
        red, green, _ = band.float().sum(dim=(0, 1))
        assert green > 0 and red > 0 and (green > 2 * red) == right and (red > 2 * green) != right, k
        assert ink_rows(band) >= 14  # readable: the text is at least 14 pixels high in the stored picture
        assert ink_rows(grid[TILE:TILE + LINE, k * (CELL + GAP): k * (CELL + GAP) + CELL]) >= 14
    # Full class names: "p: automobile" fits its cell whole; a longer one is cut with an ellipsis.
    assert not torch.equal(torch.from_numpy(caption("p: automobile", (255, 255, 255), CELL)),
                           torch.from_numpy(caption("p: automobil", (255, 255, 255), CELL)))
    assert torch.equal(torch.from_numpy(caption("t: " + "x" * 40, (255, 255, 255), CELL)),
                       torch.from_numpy(caption("t: " + "x" * 41, (255, 255, 255), CELL)))
    assert sample_grid(torch.zeros(4, 10), target, output) is None  # not images
    assert sample_grid(data, torch.zeros(3), torch.zeros(3, 1)) is None  # not classification


def test_pictures_are_stored_as_lossless_png():
    import numpy as np
    from PIL import Image

    from logger.images import encode_png

    generator = np.random.default_rng(0)
    for shape in [(1, 1, 3), (7, 13, 3), (276, 716, 3)]:
        picture = generator.integers(0, 256, shape, dtype=np.uint8)
        picture[: shape[0] // 2] = picture[0]  # repeated rows, as in enlarged tiles
        assert np.array_equal(np.array(Image.open(io.BytesIO(encode_png(picture)))), picture)


def test_the_epoch_pictures_are_drawn_aside_and_written_before_its_checkpoint(tmp_path, monkeypatch):
    """The epoch's histograms and sample picture are drawn on a thread of their own while the loop goes on: both
    are in the event files when the epoch's checkpoint is written, and an error in drawing them stops the run
    before that checkpoint."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    import base.base_trainer as base_trainer
    from base import BaseDataLoader
    from config import load_config
    from logger import make_writer
    from trainer.trainer import Trainer

    config = load_config(ROOT / "configs" / "digits.yaml", [f"trainer.save_dir={tmp_path}", "trainer.epochs=2",
                                                           "trainer.verbosity=0", "trainer.monitor=off"])
    loader = BaseDataLoader(TensorDataset(torch.randn(32, 1, 8, 8), torch.arange(32) % 10), batch_size=8,
                            shuffle=False)
    loader.configure(seed=0)

    def trainer(run_dir: Path) -> Trainer:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.LogSoftmax(dim=1))
        return Trainer(model, F.nll_loss, [], torch.optim.SGD(model.parameters(), lr=0.1), config,
                       torch.device("cpu"), loader, None, run_dir=run_dir, writer=make_writer(run_dir, True))

    save, seen = base_trainer.save_checkpoint, []

    def look_then_save(state, path):
        events = accumulator(path.parent.parent)
        seen.append((state["global_step"], [e.step for e in events.Images("samples/train")],
                     [e.step for e in events.Histograms("weights/1.weight.grad")]))
        return save(state, path)

    draw = Trainer._draw_epoch

    def slow_draw(self, *args):
        time.sleep(0.3)  # the loop reaches the checkpoint first, which must wait for the pictures
        draw(self, *args)

    monkeypatch.setattr(base_trainer, "save_checkpoint", look_then_save)
    monkeypatch.setattr(Trainer, "_draw_epoch", slow_draw)
    trainer(tmp_path / "run").train()
    assert seen == [(4, [4], [4]), (8, [4, 8], [4, 8])]

    def fail(*args):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(Trainer, "_draw_epoch", fail)
    with pytest.raises(RuntimeError, match="drawing failed"):
        trainer(tmp_path / "failed").train()
    assert not (tmp_path / "failed" / "checkpoints" / "last.pth").exists()


def test_stored_captions_are_at_least_14_pixels_high(run):
    import numpy as np
    import torch
    from PIL import Image

    from logger.images import CELL, GAP, LINE, TILE

    _, _, run_dir = run
    png = accumulator(run_dir).Images("samples/val")[-1].encoded_image_string
    grid = torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB")))
    for row in range(2):
        for column in range(5):
            y, x = row * (TILE + 2 * LINE + GAP) + TILE, column * (CELL + GAP)
            for line in range(2):
                assert ink_rows(grid[y + line * LINE:y + (line + 1) * LINE, x:x + CELL]) >= 14, (row, column, line)


def test_sample_views_spread_over_the_classes():
    import torch

    from logger.views import SampleViews

    def shown(labels: torch.Tensor, classes: int, batch: int = 50) -> list[int]:
        views = SampleViews(len(labels))
        for start in range(0, len(labels), batch):
            target = labels[start:start + batch]
            views.collect(torch.rand(len(target), 1, 4, 4), target, torch.rand(len(target), classes))
        picture, what = views.picture()
        assert picture is not None and what == "classification"
        return [int(t) for row in views.rows for t in row[1]]

    generator = torch.Generator().manual_seed(0)
    assert shown(torch.randint(0, 10, (500,), generator=generator), 10) == list(range(10))  # one of each
    assert shown(torch.arange(1000) // 100, 10) == list(range(10))  # sorted by class
    assert shown(torch.arange(1000) // 10, 100) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]  # more classes
    three = shown(torch.randint(0, 3, (300,), generator=generator), 3)
    assert sorted(three.count(c) for c in range(3)) == [3, 3, 4]  # fewer classes: as even as can be


def test_segmentation_and_regression_pictures_have_readable_captions():
    import torch

    from logger.images import LINE, TILE, regression_plot, segmentation_grid

    masks = torch.randint(0, 3, (8, 16, 16))
    grid = segmentation_grid(torch.rand(8, 3, 16, 16), masks, masks, max_samples=6)
    assert grid.shape[1] < 700 and grid.shape[0] == 3 * (TILE + 4) + LINE  # one column per sample
    assert ink_rows(grid[-LINE:, 64:64 + TILE]) >= 14
    plot = regression_plot(torch.rand(50), torch.rand(50))
    assert ink_rows(plot[-LINE:]) >= 14


def test_histograms_are_drawn_from_a_bounded_sample_and_read_in_one_copy():
    import torch

    from logger.tensorboard import HISTOGRAM_VALUES, _histogram_table

    small = torch.linspace(-1, 1, 1000)
    large = torch.randn(10 * HISTOGRAM_VALUES + 7)
    stats, counts = _histogram_table([small, large], bins=30)
    low, high, total, squares, num = stats[0]
    assert (low, high, num) == (-1.0, 1.0, 1000) and sum(counts[0]) == 1000
    assert counts[0] == pytest.approx(torch.histc(small, bins=30, min=-1, max=1).tolist(), abs=1)
    assert total == pytest.approx(small.sum().item(), abs=1e-4) and squares == pytest.approx(small.square().sum().item())
    # A large tensor: every 11th value, counts scaled to its size.
    drawn = large[::11]
    assert stats[1][4] == large.numel() and sum(counts[1]) == pytest.approx(large.numel())
    assert (stats[1][0], stats[1][1]) == (drawn.min().item(), drawn.max().item())


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
    progress = Progress(range(4), 4, "epoch 3/20", enabled=True, interval=0.0)  # a line after every batch
    progress.postfix = lambda: {"loss": 0.5, "tiny": 1.2e-05}
    assert list(progress) == [0, 1, 2, 3]
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()  # none for the last batch: the epoch's summary line follows it
    assert [line.split(" (")[0] for line in lines] == [f"epoch 3/20 [{i}/4] loss=0.5 tiny=1.2e-05" for i in (1, 2, 3)]
    assert all(re.search(r"\(\d+(\.\d+)? batch/s, eta \d+s\)$", line) for line in lines), lines
    assert list(Progress(range(3), 3, "x", enabled=False)) == [0, 1, 2] and capsys.readouterr().out == ""


def test_event_records_carry_tensorboards_crc_computed_in_c():
    """TensorBoard's record writer gets ISA-L's CRC-32C (isal, a requirement) in place of its pure-Python one:
    the same values (the event files read back above check them too)."""
    import random

    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    from logger.tensorboard import _writer_class

    _writer_class()
    assert record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c
    generator = random.Random(0)
    for size in (0, 1, 8, 12, 100, 5000):
        data = generator.randbytes(size)
        assert record_writer.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


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
    writer.split("val").add_scalar("x", 9.5, 3)  # the sub-run's writer: held back the same way
    assert len(writer._pending) == 3  # held back: no protobuf, no writer-thread work per call
    writer.flush()  # before every checkpoint: everything logged so far reaches the event files
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(0, 0.5), (1, 1.5), (2, 2.5), (3, 3.5)]
    events = EventAccumulator(str(tmp_path / "val"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(3, 9.5)]
    writer.close()
