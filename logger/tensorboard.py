"""TensorBoard: a SummaryWriter, or an explicit do-nothing writer when it is off or not installed.

Every series uses the global optimizer step as x. Layout of a run directory (each folder is one
TensorBoard run, so a chart of one tag shows the runs `<run>/train` and `<run>/val` side by side):

    <run_dir>/            lr, throughput, time, optimizer/grad_norm, histograms, sample images, graph
    <run_dir>/train/      per-epoch training values (`loss`, one tag per metric) and `loss/step`
    <run_dir>/val/        per-epoch validation values, the same tags
    <run_dir>/hparams-<n>/  the HParams record: config, status, best and final values (replaced, see RunRecord)

A resumed run opens its writers with `purge_step = checkpoint step + 1`, and a new run with
`purge_step = 0`: that writes a session-start marker into every session of every folder, so
TensorBoard drops the events a killed run wrote after its last checkpoint. (TensorBoard ignores the
first marker of a run, so without one from the first session the first resume would not purge.)
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path

from logger.epoch_log import EpochLogger, EpochRecord
from logger.logging import get_logger

FLUSH_SECONDS = 10  # a background thread writes events out; a person watching sees each epoch soon
MAX_QUEUE = 1000    # events waiting for that thread: at the default 10, an epoch's histograms made training wait
MAX_PENDING = 1000  # scalars held back before they are written in one go (see Writer.add_scalar)
HISTOGRAM_VALUES = 1 << 12  # values a histogram is drawn from (evenly strided) when a tensor has more
HISTOGRAM_BINS = 30
STATUSES = ("running", "finished", "early-stopped", "interrupted", "failed")


class NullWriter(EpochLogger):
    """Stands in for the writer when TensorBoard is off or on ranks other than 0: every call does nothing."""

    enabled = False  # takes no scalars
    draws = False    # nor histograms, images, the graph

    def add_scalar(self, *args, **kwargs) -> None: ...
    def add_histogram(self, *args, **kwargs) -> None: ...
    def add_histograms(self, *args, **kwargs) -> None: ...
    def add_image(self, *args, **kwargs) -> None: ...
    def add_text(self, *args, **kwargs) -> None: ...
    def add_graph(self, *args, **kwargs) -> None: ...
    def add_picture(self, *args, **kwargs) -> None: ...
    def add_model_graph(self, *args, **kwargs) -> None: ...
    def start_run(self, *args, **kwargs) -> None: ...
    def set_summary(self, *args, **kwargs) -> None: ...
    def record_status(self, *args, **kwargs) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...

    def split(self, name: str) -> NullWriter:
        return self


def flatten_hparams(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"optimizer.args.lr": 0.002, ...}: the scalar leaves of a config; lists and None become text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def session_start_summary(hparams: dict[str, bool | int | float | str], group_name: str = ""):
    """The HParams plugin's session-start summary. Only this one: an experiment summary in each run
    would make TensorBoard take the first run's hyperparameter list for all runs; without one, it
    unites the lists of all runs and puts the hyperparameters whose values differ between the runs
    first. (torch's `hparams()` would also store booleans as numbers.)"""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time(), group_name=group_name)
    for name, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = str(value)
    content = plugin_data_pb2.HParamsPluginData(session_start_info=info)
    return Summary(value=[Summary.Value(tag=metadata.SESSION_START_INFO_TAG, tensor=metadata.NULL_TENSOR,
                                        metadata=metadata.create_summary_metadata(content))])


def session_end_summary(status: str):
    """The HParams plugin's status of a session: TensorBoard knows success, failure, running and unknown
    (an interrupted run, which a resume can continue); the exact status is also the `status` hyperparameter."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    code = {"running": api_pb2.STATUS_RUNNING, "finished": api_pb2.STATUS_SUCCESS,
            "early-stopped": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE}.get(status,
                                                                                             api_pb2.STATUS_UNKNOWN)
    info = plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time())
    content = plugin_data_pb2.HParamsPluginData(session_end_info=info)
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                                        metadata=metadata.create_summary_metadata(content))])


class RunRecord:
    """What the HParams and Text views show of a run, in `<run_dir>/hparams-<n>/`: the hyperparameters (the
    flattened config, with `status`), the config as text, and the metric columns: the monitored metric's
    best value and the newest epoch's values (`summary/<name>`), and the session's end.

    TensorBoard takes a run's hyperparameters and status from the first record of them it reads, so one
    appended on resume or at the end would never show. The record is instead one small event file,
    replaced whenever something in it changes (written aside, renamed, the old one removed), in a folder
    of a new name `hparams-<n+1>` whenever the hyperparameters or the status change (a running TensorBoard
    drops the run of the old folder and reads the new one). It needs no purge: it holds no history, only
    the state of the run as of its newest epoch."""

    PREFIX = "hparams-"

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.directory: Path | None = None
        self.hparams: dict = {}
        self.group_name = ""
        self.config_text = ""
        self.summary: dict[str, float] = {}
        self.summary_step = 0
        self.status = "running"

    def _folders(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.run_dir.glob(f"{self.PREFIX}*"):
            number = path.name[len(self.PREFIX):]
            if number.isdigit() and path.is_dir():
                found.append((int(number), path))
        return sorted(found)

    def write(self, new_folder: bool) -> None:
        """`new_folder`: the hyperparameters or the status changed (else only the metric values)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard import summary

        now = time.time()
        events = [Event(wall_time=now, step=0, file_version="brain.Event:2"),
                  # A TensorBoard already reading the folder drops what it read from the replaced file.
                  Event(wall_time=now, step=0, session_log=SessionLog(status=SessionLog.START)),
                  Event(wall_time=now, step=0, summary=session_start_summary(
                      {**self.hparams, "status": self.status}, self.group_name)),
                  Event(wall_time=now, step=0, summary=summary.text("config", self.config_text))]
        events += [Event(wall_time=now, step=self.summary_step, summary=summary.scalar(f"summary/{name}", value))
                   for name, value in sorted(self.summary.items())]
        if self.status != "running":
            events.append(Event(wall_time=now, step=self.summary_step, summary=session_end_summary(self.status)))
        buffer = io.BytesIO()
        records = RecordWriter(buffer)
        for event in events:
            records.write(event.SerializeToString())
        folders = self._folders()
        if new_folder or self.directory is None or not self.directory.is_dir():
            self.directory = self.run_dir / f"{self.PREFIX}{folders[-1][0] + 1 if folders else 1}"
            self.directory.mkdir(parents=True, exist_ok=True)
        old = [p for p in self.directory.iterdir() if "tfevents" in p.name or ".tmp-" in p.name]
        # A new name each time (later in TensorBoard's order), without "tfevents" until the file is whole.
        final = self.directory / f"events.out.tfevents.{time.time_ns()}.hparams"
        temp = self.directory / f"record.tmp-{os.getpid()}"
        temp.write_bytes(buffer.getvalue())
        os.replace(temp, final)
        for path in old:
            if path != final:
                with contextlib.suppress(OSError):
                    path.unlink()
        for _, folder in folders:
            if folder != self.directory:
                shutil.rmtree(folder, ignore_errors=True)


def make_writer(log_dir: str | Path | None, enabled: bool, purge_step: int | None = None):
    """`purge_step`: the first step this session writes (checkpoint step + 1 on resume, else 0)."""
    if not enabled or log_dir is None:
        return NullWriter()
    try:
        writer_class = _writer_class()
    except ImportError:
        get_logger().warning("warning: trainer.tensorboard is on but the tensorboard package is not installed "
                             "(pip install tensorboard); continuing without TensorBoard")
        return NullWriter()
    return writer_class(str(log_dir), purge_step or 0)


def _use_isal_record_crc() -> None:
    """TensorBoard's event writer computes the CRC-32C of every record in pure Python, at ~0.2 us a byte: on
    the MLP of bench/overhead.py 3-5 ms of its thread per epoch (the sample picture, the histograms, the
    scalars), which competes with training for the GIL and which the flush before every checkpoint waits for.
    ISA-L, bundled by the isal package (requirements.txt: the checkpoints' CRC-32), exports the same checksum
    in C as crc32_iscsi: it takes the place of TensorBoard's where it is there and gives the same values."""
    import ctypes

    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    try:
        import isal.igzip_lib

        crc32c = ctypes.CDLL(isal.igzip_lib.__file__).crc32_iscsi
    except (ImportError, OSError, AttributeError):
        return
    crc32c.restype, crc32c.argtypes = ctypes.c_uint32, [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32]

    def masked_crc32c(data: bytes) -> int:  # the record writer's: a struct header, then a serialized event
        crc = crc32c(data, len(data), 0xFFFFFFFF) ^ 0xFFFFFFFF
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF  # TFRecord's masking of the CRC

    sample = bytes(range(256)) * 5 + b"123456789"
    if all(masked_crc32c(sample[:n]) == pywrap_tensorflow.masked_crc32c(sample[:n]) for n in (0, 1, 9, 1289)):
        record_writer.masked_crc32c = masked_crc32c


@functools.cache
def _writer_class():
    from torch.utils.tensorboard import SummaryWriter

    _use_isal_record_crc()

    class Writer(SummaryWriter, EpochLogger):
        enabled = True  # takes scalars
        draws = True    # and histograms, images, the graph

        def __init__(self, log_dir: str, purge_step: int):
            self._pending: list = []
            self._due = 0.0  # the first scalar is written at once, later ones every FLUSH_SECONDS
            self._splits: dict[str, Writer] = {}
            self._purge_step = purge_step
            self._record: RunRecord | None = None
            super().__init__(log_dir=log_dir, purge_step=purge_step, max_queue=MAX_QUEUE, flush_secs=FLUSH_SECONDS)

        def split(self, name: str) -> Writer:
            """The writer of the sub-run `<log_dir>/<name>` (made at its first use, with the same purge step):
            one tag written by `split("train")` and `split("val")` is one chart with two curves."""
            child = self._splits.get(name)
            if child is None:
                child = self._splits[name] = Writer(os.path.join(self.log_dir, name), self._purge_step)
            return child

        # ---- scalars ------------------------------------------------------------------------------------
        def add_scalar(self, tag: str, scalar_value, global_step: int | None = None, walltime: float | None = None,
                       new_style: bool = False, double_precision: bool = False) -> None:
            """Held back and written with the others at the next flush (before every checkpoint, at the end,
            and when FLUSH_SECONDS have passed), which is when the background thread would write them to
            disk anyway. Written one at a time, a scalar cost ~0.3 ms here (its conversion, protobufs and
            the writer thread's pure-Python CRC, competing for the GIL): 2% of a 1 ms/step MLP's time at
            the default logging (bench/overhead.py). A GPU tensor is copied on its device and read then: no
            host sync at the step that logs it."""
            import torch

            if isinstance(scalar_value, torch.Tensor):  # the value now, even if it changes in place later
                scalar_value = scalar_value.item() if scalar_value.device.type == "cpu" else scalar_value.detach().clone()
            self._pending.append((tag, scalar_value, global_step, time.time() if walltime is None else walltime,
                                  new_style, double_precision))
            if len(self._pending) >= MAX_PENDING or time.monotonic() >= self._due:
                self.write_pending()

        def write_pending(self) -> None:
            pending, self._pending = self._pending, []
            self._due = time.monotonic() + FLUSH_SECONDS
            for tag, value, step, walltime, new_style, double_precision in pending:
                value = value.item() if hasattr(value, "item") else value
                super().add_scalar(tag, value, step, walltime, new_style=new_style, double_precision=double_precision)

        def flush(self) -> None:
            self.write_pending()
            super().flush()
            for child in self._splits.values():
                child.flush()

        def close(self) -> None:
            self.write_pending()
            super().close()
            for child in self._splits.values():
                child.close()

        # ---- the epoch's values, and the HParams record ---------------------------------------------------
        def log_epoch(self, record: EpochRecord) -> None:
            """Each training and validation value under its own name in `train/` and `val/` (one chart per
            name, both curves on it); the learning rates and the epoch's time here; the HParams metrics."""
            for split, values in (("train", record.train), ("val", record.val)):
                for name, value in values.items():
                    self.split(split).add_scalar(name, value, record.step)
            for i, lr in enumerate(record.lrs):
                self.add_scalar(f"lr/group{i}", lr, record.step)
            self.add_scalar("time/epoch_seconds", record.seconds, record.step)
            final = {f"val_{k}": v for k, v in record.val.items()} if record.val else dict(record.train)
            if record.monitor is not None and record.best_epoch:
                final[f"best_{record.monitor}"] = record.best
            self.set_summary(final, record.step)

        def start_run(self, config: dict, group_name: str = "") -> None:
            """At every session's start (new run and resume): the hyperparameters and config as they are
            now (a resume's overrides included), with status `running`."""
            import yaml

            if self._record is None:
                self._record = RunRecord(Path(self.log_dir))
            self._record.hparams = flatten_hparams(config)
            self._record.group_name = group_name
            text = yaml.safe_dump(config, sort_keys=False)
            self._record.config_text = "\n".join("    " + line for line in text.splitlines())  # a code block
            self._record.status = "running"
            self._record.write(new_folder=True)

        def set_summary(self, values: dict[str, float], step: int) -> None:
            """The HParams metric columns `summary/<name>` (a resume restores them from metrics.csv)."""
            if self._record is None:
                return
            self._record.summary = {name: float(value) for name, value in values.items()}
            self._record.summary_step = step
            self._record.write(new_folder=False)

        def record_status(self, status: str) -> None:
            """How the run's session ended (finished, early-stopped, interrupted, failed): the `status`
            hyperparameter and TensorBoard's own session status in the HParams view."""
            if status not in STATUSES:
                raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
            if self._record is None:
                return
            changed = status != self._record.status
            self._record.status = status
            self._record.write(new_folder=changed)

        # ---- histograms, pictures, the graph --------------------------------------------------------------
        def add_histogram(self, tag: str, values, global_step: int | None = None, bins: int = HISTOGRAM_BINS,
                          walltime: float | None = None) -> None:
            self.add_histograms([(tag, values)], global_step, bins, walltime)

        def add_histograms(self, items: list, global_step: int | None, bins: int = HISTOGRAM_BINS,
                           walltime: float | None = None) -> None:
            """Histograms of many tensors [(tag, tensor), ...] computed together where they live, read in one
            copy. A tensor of more than HISTOGRAM_VALUES elements is drawn from that many values evenly strided
            through it (its counts, sum and sum of squares scaled to its size; min and max those of the
            values drawn), so the cost does not grow with the model. torch's own add_histogram goes through
            NumPy, whose BLAS threads then spin and slowed the next validation forward passes five-fold on a
            2-core machine, and copies every tensor whole to the host."""
            import torch

            by_device: dict = {}
            for tag, values in items:
                values = torch.as_tensor(values).detach()
                if values.numel():
                    by_device.setdefault(values.device, []).append((tag, values))
            for group in by_device.values():
                tags = [tag for tag, _ in group]
                table, counts = _histogram_table([values for _, values in group], bins)
                for tag, (low, high, total, squares, num), row in zip(tags, table, counts):
                    if not (low == low and high == high) or abs(low) == float("inf") or abs(high) == float("inf"):
                        continue  # not finite: the run stops on its own (see the NaN guard)
                    if high > low:
                        limits = [low + (high - low) * (i + 1) / bins for i in range(bins)]
                        limits[-1] = high
                    else:  # all values equal
                        row, limits = [sum(row)], [high]
                    self.add_histogram_raw(tag, low, high, num, total, squares, limits, row, global_step, walltime)

        def add_picture(self, tag: str, picture, step: int) -> None:
            """An (H, W, 3) uint8 tensor or array as a PNG image (the sample views of logger/views.py)."""
            if getattr(self, "without_pillow", False):
                return
            try:
                import PIL  # noqa: F401 - the captions are drawn with it
            except ImportError:  # Pillow comes with torchvision, but a project may do without both
                self.without_pillow = True
                get_logger().warning("warning: trainer.images is on but Pillow is not installed; no sample images")
                return
            from tensorboard.compat.proto.summary_pb2 import Summary

            from logger.images import encode_png

            picture = picture.numpy() if hasattr(picture, "numpy") else picture
            # Encoded here rather than by add_image (Pillow's encoder, after conversions): see encode_png.
            image = Summary.Image(height=picture.shape[0], width=picture.shape[1], colorspace=3,
                                  encoded_image_string=encode_png(picture))
            self._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

        def add_model_graph(self, model, inputs) -> None:
            """The model graph, traced once in eval mode; a model that does not trace gets a note instead."""
            import torch

            was_training = model.training
            model.eval()
            try:
                # fork_rng: tracing must not shift the random streams of training (TensorBoard on or off
                # trains the same model); redirect_stdout: torch prints its own error on a failed trace.
                with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings(), \
                        contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    self.add_graph(model, inputs)
            except Exception as exc:  # noqa: BLE001 - any tracing failure only costs the graph
                message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                get_logger().info(f"TensorBoard graph skipped: the model does not trace "
                                  f"({type(exc).__name__}: {message})")
            finally:
                model.train(was_training)

    return Writer


def _histogram_table(tensors: list, bins: int) -> tuple[list[list[float]], list[list[float]]]:
    """For tensors on one device: ([low, high, sum, sum of squares, count] per tensor, [bin counts] per
    tensor), computed in a handful of operations over all of them and copied to the host once."""
    import torch

    device = tensors[0].device
    sizes = [t.numel() for t in tensors]
    strides = [-(-n // HISTOGRAM_VALUES) for n in sizes]
    drawn = [t.reshape(-1)[::s] for t, s in zip(tensors, strides)]
    values = torch.cat([d.float() for d in drawn])  # (S,): every tensor's drawn values, one after another
    counts = torch.tensor([d.numel() for d in drawn], device=device)
    segment = torch.repeat_interleave(torch.arange(len(tensors), device=device), counts)  # (S,) tensor of each
    n = len(tensors)
    low = torch.full((n,), float("inf"), device=device).scatter_reduce(0, segment, values, "amin")
    high = torch.full((n,), float("-inf"), device=device).scatter_reduce(0, segment, values, "amax")
    total = torch.zeros(n, device=device).index_add_(0, segment, values)
    squares = torch.zeros(n, device=device).index_add_(0, segment, values.square())
    scale = bins / (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    position = ((values - low[segment]) * scale[segment]).nan_to_num_(0.0).clamp_(0, bins - 1).long()
    histogram = torch.zeros(n * bins, device=device).index_add_(0, segment * bins + position,
                                                                torch.ones_like(values)).view(n, bins)
    factor = torch.tensor([size / d.numel() for size, d in zip(sizes, drawn)], device=device, dtype=torch.float64)
    table = torch.cat([torch.stack([low.double(), high.double(), total.double() * factor, squares.double() * factor,
                                    torch.tensor(sizes, device=device, dtype=torch.float64)], dim=1),
                       histogram.double() * factor[:, None]], dim=1).cpu()  # the one copy to the host
    return table[:, :5].tolist(), table[:, 5:].tolist()
