"""Running a sweep: one child `train.py` per run, one after another, and `sweep.csv` after each.

The sweep directory `<save_dir>/<name>/<sweep id>/` holds
    sweep.yaml    what to run (kind, the runs and their overrides, nproc): `train.py -r SWEEP_DIR` reads it
    config.yaml   the base config every run starts from (name and save_dir point into this directory)
    sweep.csv     one row per run, rewritten atomically after each change of a run's status
    <run_id>/     each run's own run directory (train.py's layout, resumable on its own)

A child runs in its own session, so Ctrl-C at the terminal reaches the sweep only, which forwards
each SIGINT/SIGTERM to the child once (two would make it stop without saving). A child that loses
its sweep (kill -9) gets SIGTERM from the kernel (PR_SET_PDEATHSIG), saves and exits.
"""
from __future__ import annotations

import csv
import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from errors import Interrupted, UserError
from runtime.atomic_write import atomic_write
from sweep.spec import REPLICATE_KEYS

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"
SPEC_NAME, CONFIG_NAME, CSV_NAME = "sweep.yaml", "config.yaml", "sweep.csv"
DONE = ("finished", "pruned")  # never run again; "failed" and "interrupted" runs are (re)started on resume
STATUSES = ("pending", "running", "finished", "failed", "interrupted", "pruned")


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SPEC_NAME).is_file()


# ---- sweep.yaml and sweep.csv -------------------------------------------------------------------
def write_yaml(path: Path, data) -> None:
    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read {path}: {' '.join(str(exc).split())}") from None


def read_spec(sweep_dir: Path) -> dict:
    try:
        spec = yaml.safe_load((sweep_dir / SPEC_NAME).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"-r {sweep_dir}: cannot read {SPEC_NAME}: {' '.join(str(exc).split())}") from None
    if not isinstance(spec, dict) or spec.get("format") != 1 or not isinstance(spec.get("runs"), list):
        raise UserError(f"-r {sweep_dir}: {SPEC_NAME} is not a sweep spec written by this project")
    return spec


def read_rows(sweep_dir: Path) -> dict[str, dict]:
    path = sweep_dir / CSV_NAME
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["run_id"]: row for row in csv.DictReader(handle)}


def write_rows(sweep_dir: Path, keys: list[str], rows: list[dict], monitor: str | None) -> None:
    """sweep.csv: run_id, the swept values, status, epochs, best_<monitored>, the last epoch's metrics, wall time."""
    best = [f"best_{monitor}"] if monitor else []
    metrics = list(dict.fromkeys(k for row in rows for k in row.get("metrics", {})))
    header = ["run_id", *keys, "status", "epochs", *best, *metrics, "wall_time_s"]
    out = io.StringIO()
    writer = csv.DictWriter(out, header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"run_id": row["run_id"], **row["values"], "status": row["status"],
                         "epochs": row.get("epochs", ""), **({best[0]: _cell(row.get("best"))} if best else {}),
                         **{k: _cell(v) for k, v in row.get("metrics", {}).items()},
                         "wall_time_s": f"{row.get('wall_time', 0.0):.1f}"})
    atomic_write(sweep_dir / CSV_NAME, lambda handle: handle.write(out.getvalue().encode("utf-8")))


def _cell(value) -> str:
    return "" if value is None else repr(float(value))  # repr: the exact float, so the CSV matches the checkpoint


def row_from_csv(record: dict | None, run: dict, monitor: str | None) -> dict:
    """The in-memory row of a run, from its sweep.csv line when there is one (after a kill or a resume)."""
    row = {"run_id": run["run_id"], "values": dict(run["values"]), "status": "pending", "metrics": {},
           "wall_time": 0.0}
    if record is None:
        return row
    row["status"] = record.get("status") if record.get("status") in STATUSES else "pending"
    row["wall_time"] = float(record.get("wall_time_s") or 0.0)
    if record.get("epochs"):
        row["epochs"] = int(record["epochs"])
    if monitor and record.get(f"best_{monitor}"):
        row["best"] = float(record[f"best_{monitor}"])
    fixed = {"run_id", "status", "epochs", "wall_time_s", f"best_{monitor}", *run["values"]}
    row["metrics"] = {k: float(v) for k, v in record.items() if k not in fixed and v not in ("", None)}
    return row


def read_result(run_dir: Path) -> dict:
    """What the run's newest checkpoint says: {epochs, best, metrics} (empty without a checkpoint)."""
    path = run_dir / "checkpoints" / "last.pth"
    if not path.exists():
        return {}
    from checkpoint import load_checkpoint

    try:
        state = load_checkpoint(path)
    except UserError:
        return {}
    epochs = state.get("epoch", 0) if state.get("epoch_finished") else state.get("epoch", 1) - 1
    monitor = state.get("config", {}).get("trainer", {}).get("monitor", "off")
    best = state.get("monitor_best") if monitor != "off" and state.get("best_epoch") else None
    return {"epochs": epochs, "best": best, "metrics": dict(state.get("metrics") or {})}


# ---- child processes ------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGTERM when the sweep dies (Linux), so a killed sweep leaves no orphan."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def child_command(nproc: int | None, args: list[str]) -> list[str]:
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(TRAIN_PY), *args]
    return [sys.executable, str(TRAIN_PY), *args]


def wait_unlocked(run_dir: Path, seconds: float = 120.0) -> None:
    """Wait while a run directory is locked: a child of a killed sweep may still be saving its checkpoint."""
    import fcntl

    lock = run_dir / ".lock"
    deadline = time.monotonic() + seconds
    while lock.exists():
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                return  # the child says who holds it
        finally:
            os.close(fd)
        time.sleep(0.2)


class Forwarder:
    """SIGINT/SIGTERM handlers of the sweep process: remember the first signal, pass each one to the child."""

    def __init__(self):
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None
        self._previous = {}

    def install(self, already: int | None = None) -> "Forwarder":
        self.signum = already
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def run(self, command: list[str], env: dict | None = None) -> int:
        parent = os.getpid()
        self.child = subprocess.Popen(command, env=env, start_new_session=True,
                                      preexec_fn=lambda: _die_with_parent(parent))
        if self.signum is not None:  # arrived while the child was being started
            self.child.send_signal(self.signum)
        try:
            return self.child.wait()
        finally:
            self.child = None


# ---- the loop ---------------------------------------------------------------------------------------
def status_of(code: int, signum: int | None) -> str:
    if code == 0:
        return "finished"
    return "interrupted" if signum is not None or code in (130, 143) else "failed"


def run_one(sweep_dir: Path, spec: dict, row: dict, forwarder: Forwarder, rows: list[dict], position: str,
            env: dict | None = None, overrides: list[str] | None = None) -> None:
    """Start or resume one run in a child process and record how it ended in `row` and sweep.csv."""
    run_dir = sweep_dir / row["run_id"]
    if run_dir.is_dir():
        wait_unlocked(run_dir)
    from runtime.run_dir import has_checkpoint

    resuming = run_dir.is_dir() and has_checkpoint(run_dir)
    if resuming:
        args = ["-r", str(run_dir)]
    else:
        args = ["-c", str(sweep_dir / CONFIG_NAME), "--run-id", row["run_id"],
                *(overrides if overrides is not None else [f"{k}={v}" for k, v in row["values"].items()])]
    described = " ".join(f"{k}={v}" for k, v in row["values"].items())
    print(f"[sweep {position}] {'resuming' if resuming else 'starting'} {run_dir.name}: {described}", flush=True)
    row["status"] = "running"
    write_rows(sweep_dir, spec["keys"], rows, spec.get("monitor"))
    started = time.monotonic()
    code = forwarder.run(child_command(spec.get("nproc"), args), env)
    row["wall_time"] = row.get("wall_time", 0.0) + time.monotonic() - started
    row["status"] = status_of(code, forwarder.signum)
    row["exit_code"] = code
    row.update(read_result(run_dir))
    write_rows(sweep_dir, spec["keys"], rows, spec.get("monitor"))
    print(f"[sweep {position}] {run_dir.name}: {row['status']} (exit {code})", flush=True)


def stopped(forwarder: Forwarder, sweep_dir: Path) -> Interrupted:
    name = signal.Signals(forwarder.signum).name
    return Interrupted(forwarder.signum, f"sweep stopped by {name}; resume: python train.py -r {sweep_dir}")


def run_grid(sweep_dir: Path, spec: dict, forwarder: Forwarder, env: dict | None = None) -> int:
    """`env`: the runs' environment (None: this process's)."""
    records = read_rows(sweep_dir)
    rows = [row_from_csv(records.get(run["run_id"]), run, spec.get("monitor")) for run in spec["runs"]]
    write_rows(sweep_dir, spec["keys"], rows, spec.get("monitor"))
    total = len(rows)
    for index, row in enumerate(rows, 1):
        if row["status"] in DONE:
            continue
        if forwarder.signum is not None:
            raise stopped(forwarder, sweep_dir)
        run_one(sweep_dir, spec, row, forwarder, rows, f"{index}/{total}", env)
        if forwarder.signum is not None:
            raise stopped(forwarder, sweep_dir)
    return finish(sweep_dir, spec, rows)


def finish(sweep_dir: Path, spec: dict, rows: list[dict]) -> int:
    print(summary(spec["keys"], rows, spec.get("monitor")), end="")
    failed = [row["run_id"] for row in rows if row["status"] == "failed"]
    print(f"sweep.csv: {sweep_dir / CSV_NAME}")
    if failed:
        again = "" if spec["kind"] == "search" else f"; python train.py -r {sweep_dir} tries them again"
        print(f"failed: {', '.join(failed)} (see their train.log{again})", file=sys.stderr)
        return 1
    return 0


# ---- summary ------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return mean, std


def summary(keys: list[str], rows: list[dict], monitor: str | None) -> str:
    """Mean and std over seeds and folds (the replicate axes) of the best monitored value and the
    validation metrics (all metrics without a validation split), per setting of the other axes."""
    done = [row for row in rows if row["status"] == "finished"]
    if not done:
        return "summary: no finished run\n"
    replicate = [k for k in keys if k in REPLICATE_KEYS]
    setting = [k for k in keys if k not in REPLICATE_KEYS]
    metrics = list(dict.fromkeys(k for row in done for k in row.get("metrics", {})))
    shown = [m for m in metrics if m.startswith("val_")] or metrics
    columns = ([f"best_{monitor}"] if monitor else []) + shown
    groups: dict[tuple, list[dict]] = {}
    for row in done:
        groups.setdefault(tuple(row["values"][k] for k in setting), []).append(row)
    over = " and ".join({"seed": "seeds", "data_loader.fold": "folds"}[k] for k in replicate) or "runs"
    header = [*setting, "runs", *columns]
    lines = []
    for setting_values, members in groups.items():
        cells = [*setting_values, str(len(members))]
        for column in columns:
            values = [row.get("best") if column == f"best_{monitor}" else row.get("metrics", {}).get(column)
                      for row in members]
            values = [float(v) for v in values if v is not None]
            if not values:
                cells.append("-")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.4f}" + (f" ± {std:.4f}" if not math.isnan(std) else ""))
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    text = [f"summary: mean ± std over {over} ({len(done)} finished run{'s' if len(done) != 1 else ''})"]
    for cells in [header, *lines]:
        text.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(text) + "\n"
