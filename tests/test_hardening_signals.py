"""Stop signals with real processes (issue 20, items 2 and 11): SIGTERM sent to the whole process group
with DataLoader workers (what `timeout`, Slurm and systemd do), a worker killed for real, Ctrl-C before
training, and a signal after the run finished."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT
from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # the quick subset (-m "not slow") leaves these out

TRIALS = 20
SEED = int.from_bytes(os.urandom(4), "little")  # in failure messages: rerun with the same moments
STOPPED = re.compile(r"stopped by signal at epoch (\d+)(?:, step (\d+)| end); checkpoint saved")


def start(tmp: Path, run_id: str, *overrides: str) -> subprocess.Popen:
    """train.py on the digits config with a small model, in its own process group (as under a scheduler)."""
    argv = [PYTHON, str(ROOT / "train.py"), "-c", str(ROOT / "configs" / "digits.yaml"), "--run-id", run_id,
            f"trainer.save_dir={tmp / 'saved'}", "arch.args.channels=8", "trainer.tensorboard=false",
            "trainer.early_stop=0", *overrides]
    return subprocess.Popen(argv, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def wait_for_line(proc: subprocess.Popen, text: str) -> list[str]:
    """The output lines up to the first that contains `text` (the process keeps running)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed:\n{''.join(lines)}")


def sigterm_trial(tmp: Path, trial: int, delay: float) -> str:
    """A process-group SIGTERM `delay` seconds into training; '' if it stopped as promised, else why not."""
    proc = start(tmp, f"t{trial}", "data_loader.args.num_workers=2", "trainer.epochs=1000")
    lines = wait_for_line(proc, "trainable parameters")  # the model summary: training starts next
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    stopped = STOPPED.search(out)
    if proc.returncode != 143 or not stopped or "Traceback" in out:
        return f"trial {trial} (+{delay:.2f}s): exit {proc.returncode}\n{out[-1500:]}"
    state = load_checkpoint(tmp / "saved" / "digits" / f"t{trial}" / "checkpoints" / "last.pth")
    epoch, step = int(stopped.group(1)), stopped.group(2)
    if step is not None and (state["global_step"], state["epoch"]) != (int(step), epoch):
        return f"trial {trial}: stopped at step {step}, last.pth holds step {state['global_step']}"
    if step is None and (state["epoch"], state["epoch_finished"]) != (epoch, True):
        return f"trial {trial}: stopped at epoch {epoch} end, last.pth holds epoch {state['epoch']}"
    return ""


def test_process_group_sigterm_with_workers_saves_and_exits_143(tmp_path):
    """20 trials, num_workers 2, SIGTERM to the group 0.5..2 s into training (an epoch takes about 0.7 s, so
    the moments fall in steps, validation, and workers starting and stopping). About 60-70 s on 2 cores."""
    rng = random.Random(SEED)
    delays = [rng.uniform(0.5, 2.0) for _ in range(TRIALS)]
    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(sigterm_trial, [tmp_path] * TRIALS, range(TRIALS), delays) if f]
    assert not failures, f"{len(failures)}/{TRIALS} failed (seed {SEED}):\n" + "\n".join(failures)


def test_killed_worker_is_one_line_exit_1_not_a_hang(tmp_path):
    proc = start(tmp_path, "k", "data_loader.args.num_workers=2", "trainer.epochs=1000")
    lines = wait_for_line(proc, "epoch 1/")
    while True:
        # A worker killed while its iterator is being shut down at an epoch's end had done its work: no error.
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if workers:
            os.kill(int(workers[0]), signal.SIGKILL)
            try:
                out, _ = proc.communicate(timeout=10)  # torch's iterator checks its workers every 5 s
                break
            except subprocess.TimeoutExpired:
                pass
    errors = [line for line in out.splitlines() if not line.startswith(("epoch ", "saved "))]
    assert proc.returncode == 1, "".join(lines) + out
    assert len(errors) == 1 and errors[0].startswith("error: ") and "DataLoader worker" in errors[0], out


def test_ctrl_c_before_training_says_so_and_exits_130(tmp_path):
    proc = start(tmp_path, "early", "trainer.epochs=1")
    time.sleep(0.6)  # importing torch (inside main), long before any training
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert out.strip().splitlines()[-1] == "interrupted before training started; no checkpoint was written", out
    assert "Traceback" not in out and "second Ctrl-C" not in out
    assert not (tmp_path / "saved" / "digits" / "early" / "checkpoints" / "last.pth").exists()


def test_signals_after_finished_keep_exit_0(tmp_path):
    """From the `finished` line on, SIGTERM or SIGINT to the group, again and again until the process has
    exited; a signal counts when the process was seen alive (not a zombie) after it was sent."""
    for trial, signum in enumerate([signal.SIGTERM, signal.SIGINT]):
        proc = start(tmp_path, f"late{trial}", "trainer.epochs=1")
        wait_for_line(proc, "finished: run directory")
        delivered = 0
        while True:
            try:
                os.killpg(proc.pid, signum)
                with open(f"/proc/{proc.pid}/stat") as handle:
                    alive = handle.read().rsplit(")", 1)[1].split()[0] != "Z"
            except (ProcessLookupError, FileNotFoundError):
                break
            if not alive:
                break
            delivered += 1
            time.sleep(0.002)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{signal.Signals(signum).name} after finished: exit {proc.returncode}\n{out}"
        assert delivered, "the process had exited before the first signal: no evidence either way"


def test_stop_signal_finish_ignores_and_uninstall_restores():
    """In-process, with real signals to this process."""
    from runtime.signals import StopSignal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = StopSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode; sleeping makes sure
        assert stop.signum == signal.SIGTERM
        stop.finish()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # ignored: no KeyboardInterrupt, and this process is still here
    finally:
        stop.uninstall()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
