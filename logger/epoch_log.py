"""Per-epoch records and the sinks that keep them: `metrics.csv` here, TensorBoard in logger/tensorboard.py.

A sink is anything with the three methods of `EpochLogger`; the trainer hands each the same
`EpochRecord` at every epoch's end, before that epoch's checkpoint is written. `start` is told how
many epochs the checkpoint the run continues from holds, and forgets anything written after them
(a run killed after an epoch's row but before its checkpoint redoes that epoch), so a sink never
shows an epoch twice or misses one, however often a run is killed and resumed.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


@dataclass
class EpochRecord:
    epoch: int
    step: int                       # global optimizer step at the epoch's end
    time: float                     # wall clock (time.time()) at the epoch's end
    seconds: float                  # the epoch's duration, validation included
    lrs: list[float]                # per parameter group: the learning rate of the epoch's last step
    train: dict[str, float]         # {"loss": ..., metric: ...} over the epoch
    val: dict[str, float] = field(default_factory=dict)  # the same on the validation split (no val_ prefix)
    monitor: str | None = None      # "val_accuracy": the monitored metric
    best: float | None = None       # its best value so far
    best_epoch: int = 0
    improved: bool = False

    def row(self) -> dict[str, float | int | str]:
        """The flat row of metrics.csv: epoch, step, time, epoch_seconds, lr (lr_group<i> with several
        parameter groups), the training values, the validation values as val_<name>."""
        row: dict[str, float | int | str] = {
            "epoch": self.epoch, "step": self.step,
            "time": datetime.fromtimestamp(self.time).astimezone().isoformat(timespec="seconds"),
            "epoch_seconds": round(self.seconds, 3)}
        if len(self.lrs) == 1:
            row["lr"] = self.lrs[0]
        else:
            row.update({f"lr_group{i}": lr for i, lr in enumerate(self.lrs)})
        row.update(self.train)
        row.update({f"val_{key}": value for key, value in self.val.items()})
        return row


class EpochLogger:
    """The interface of a per-epoch sink (metrics.csv, TensorBoard; MLflow and others fit the same)."""

    def start(self, completed_epochs: int) -> None:
        """Before the first epoch of a session: keep what covers epochs 1..completed_epochs, drop the rest."""

    def log_epoch(self, record: EpochRecord) -> None: ...

    def close(self) -> None: ...


class CsvLogger(EpochLogger):
    """`metrics.csv`: a header and one row per epoch, readable by any CSV reader (Python's csv module,
    pandas.read_csv, a spreadsheet). Each row is appended and fsynced before the epoch's checkpoint;
    `start` cuts the rows of epochs the checkpoint does not hold and a partly written last line (a
    kill -9 in the middle of a write), with an atomic rewrite."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header: list[str] | None = None

    def start(self, completed_epochs: int) -> None:
        header, rows, changed = self._read(completed_epochs)
        self.header = header
        if changed:
            self._rewrite(header, rows)

    def _read(self, completed_epochs: int) -> tuple[list[str] | None, list[list[str]], bool]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, [], False
        lines = text.splitlines(keepends=True)
        whole = [line for line in lines if line.endswith("\n")]  # a partly written last line is dropped
        parsed = list(csv.reader(io.StringIO("".join(whole))))
        if not parsed or completed_epochs == 0:
            return None, [], bool(text)
        header, kept, seen = parsed[0], [], set()
        for row in parsed[1:]:
            try:
                epoch = int(row[0])
            except (ValueError, IndexError):
                continue
            if epoch <= completed_epochs and epoch not in seen:
                seen.add(epoch)
                kept.append(row)
        return header, kept, len(kept) + 1 != len(lines)

    def log_epoch(self, record: EpochRecord) -> None:
        row = record.row()
        if self.header is None:
            self.header = list(row)
            self._append([self.header, self._cells(row)])
        elif not set(row) <= set(self.header):  # a resume added a metric: a column more, empty before it
            header = self.header + [key for key in row if key not in self.header]
            with open(self.path, newline="", encoding="utf-8") as handle:
                rows = [row + [""] * (len(header) - len(row)) for row in list(csv.reader(handle))[1:]]
            self.header = header
            self._rewrite(header, rows + [self._cells(row)])
        else:
            self._append([self._cells(row)])

    def _cells(self, row: dict) -> list[str]:
        return [_text(row.get(key, "")) for key in self.header]

    def _append(self, rows: list[list]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())  # one write: a kill leaves the line whole or cut, never interleaved
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the checkpoint that counts the epoch as done

    def _rewrite(self, header: list[str] | None, rows: list[list[str]]) -> None:
        from runtime.atomic_write import atomic_write

        buffer = io.StringIO()
        if header is not None:
            csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
        atomic_write(self.path, lambda handle: handle.write(buffer.getvalue().encode("utf-8")))


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)
