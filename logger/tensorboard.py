"""TensorBoard: a SummaryWriter, or an explicit do-nothing writer when it is off or not installed.

Every series uses the global optimizer step as x. A resumed run opens its writer with
`purge_step = checkpoint step + 1`, and a new run with `purge_step = 0`: that writes a session-start
marker into every session, so TensorBoard drops the events a killed run wrote after its last
checkpoint. (TensorBoard ignores the first marker of a run, so without one from the first session the
first resume would not purge.)
"""
from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from pathlib import Path

from logger.logging import get_logger

FLUSH_SECONDS = 10  # a background thread writes events out; a person watching sees each epoch soon
MAX_QUEUE = 1000    # events waiting for that thread: at the default 10, an epoch's histograms made training wait
MAX_PENDING = 1000  # scalars held back before they are written in one go (see Writer.add_scalar)


class NullWriter:
    """Stands in for the writer when TensorBoard is off or on ranks other than 0: every call does nothing."""

    enabled = False

    def add_scalar(self, *args, **kwargs) -> None: ...
    def add_histogram(self, *args, **kwargs) -> None: ...
    def add_image(self, *args, **kwargs) -> None: ...
    def add_text(self, *args, **kwargs) -> None: ...
    def add_graph(self, *args, **kwargs) -> None: ...
    def add_run_start(self, *args, **kwargs) -> None: ...
    def add_picture(self, *args, **kwargs) -> None: ...
    def add_model_graph(self, *args, **kwargs) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


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


def session_start_summary(hparams: dict[str, bool | int | float | str]):
    """The HParams plugin's session-start summary. Only this one: an experiment summary in each run
    would make TensorBoard take the first run's hyperparameter list for all runs; without one, it
    unites the lists of all runs. (torch's `hparams()` would also store booleans as numbers.)"""
    import time

    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
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


def make_writer(log_dir: str | Path | None, enabled: bool, purge_step: int | None = None):
    """`purge_step`: the first step this session writes (checkpoint step + 1 on resume, else 0)."""
    if not enabled or log_dir is None:
        return NullWriter()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        get_logger().warning("warning: trainer.tensorboard is on but the tensorboard package is not installed "
                             "(pip install tensorboard); continuing without TensorBoard")
        return NullWriter()

    class Writer(SummaryWriter):
        enabled = True
        _pending: list

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
            pending = self.__dict__.setdefault("_pending", [])
            pending.append((tag, scalar_value, global_step, time.time() if walltime is None else walltime,
                            new_style, double_precision))
            if len(pending) >= MAX_PENDING or time.monotonic() >= self.__dict__.get("_due", 0.0):
                self.write_pending()

        def write_pending(self) -> None:
            pending, self._pending = self.__dict__.get("_pending", []), []
            self._due = time.monotonic() + FLUSH_SECONDS
            for tag, value, step, walltime, new_style, double_precision in pending:
                value = value.item() if hasattr(value, "item") else value
                super().add_scalar(tag, value, step, walltime, new_style=new_style, double_precision=double_precision)

        def flush(self) -> None:
            self.write_pending()
            super().flush()

        def close(self) -> None:
            self.write_pending()
            super().close()

        def add_histogram(self, tag: str, values, global_step: int | None = None, bins: int = 30,
                          walltime: float | None = None) -> None:
            """`bins` equal bins over [min, max], counted by torch where the tensor lives. torch's own
            add_histogram goes through NumPy, whose BLAS threads then spin and slowed the next
            validation forward passes five-fold on a 2-core machine; it also copies the whole tensor
            to the host, where this copies `bins` counts and four numbers (one sync per tensor)."""
            import torch

            values = torch.as_tensor(values).detach().flatten().float()
            if values.numel() == 0:
                return
            low, high, total, squares = torch.stack([values.min(), values.max(), values.sum(),
                                                     values.square().sum()]).tolist()
            if high > low:
                counts = torch.histc(values, bins=bins, min=low, max=high).tolist()
                limits = torch.linspace(low, high, bins + 1)[1:].tolist()  # right edges; min is the left one
            else:  # all values equal
                counts, limits = [values.numel()], [high]
            self.add_histogram_raw(tag, low, high, values.numel(), total, squares, limits, counts, global_step,
                                   walltime)

        def add_run_start(self, config: dict) -> None:
            """Once per run (not on resume), at step 0 so no purge removes it: the hyperparameters for the
            HParams view and the resolved config as text. The metric columns of the HParams view are the
            run's scalars (their newest values): `best/<metric>` holds the best epoch's values."""
            import yaml

            self._get_file_writer().add_summary(session_start_summary(flatten_hparams(config)), 0)
            text = yaml.safe_dump(config, sort_keys=False)
            self.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)  # a code block
            self.flush()  # a run killed in its first minute still shows its hyperparameters

        def add_picture(self, tag: str, picture, step: int) -> None:
            """An (H, W, 3) uint8 tensor or array as a PNG image (the sample views of logger/views.py)."""
            if self.__dict__.get("without_pillow"):
                return
            try:
                from PIL import Image
            except ImportError:  # Pillow comes with torchvision, but a project may do without both
                self.without_pillow = True
                get_logger().warning("warning: trainer.images is on but Pillow is not installed; no sample images")
                return
            from tensorboard.compat.proto.summary_pb2 import Summary

            picture = picture.numpy() if hasattr(picture, "numpy") else picture
            # Encoded here rather than by add_image: a third of the time (fast zlib level, no conversions).
            png = io.BytesIO()
            Image.fromarray(picture).save(png, format="PNG", compress_level=1)
            image = Summary.Image(height=picture.shape[0], width=picture.shape[1], colorspace=3,
                                  encoded_image_string=png.getvalue())
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

    return Writer(log_dir=str(log_dir), purge_step=purge_step or 0, max_queue=MAX_QUEUE, flush_secs=FLUSH_SECONDS)
