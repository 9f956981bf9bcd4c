"""Exact resume: runs interrupted by SIGKILL (at random moments, and inside a save), SIGTERM and
SIGINT, resumed until they finish, end bit-identical to an uninterrupted run.

The chains run the real train.py. Deterministic interruptions come from a small driver script
(written by these tests, not part of the project) that wraps `DigitsDataset.__getitem__` and
`torch.save` to count fetched samples and to signal or kill its own process at an exact point.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, ROOT
from checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow  # the quick subset (-m "not slow") leaves these out

CONFIG = str(ROOT / "configs" / "digits.yaml")
EPOCHS, BATCH = 3, 64
KILL_SEED = int.from_bytes(os.urandom(4), "little")  # printed in failures: rerun with the same moments

DRIVER = r'''
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
plan = json.loads(os.environ["RESUME_DRIVER"])
import torch
from data_loader.datasets import DigitsDataset

fetched = saves = 0
signalled = False
original_getitem, original_save = DigitsDataset.__getitem__, torch.save

def getitem(self, index):
    global fetched, signalled
    if checking:
        return original_getitem(self, index)
    fetched += 1
    if fetched == plan.get("signal_at"):
        signalled = True
        for name in plan["signals"]:
            os.kill(os.getpid(), getattr(signal, name))
    return original_getitem(self, index)

def save(obj, f, *args, **kwargs):
    global saves
    original_save(obj, f, *args, **kwargs)  # the temporary file is written, not yet renamed
    saves += 1
    if saves == plan.get("kill_in_save"):
        os.kill(os.getpid(), signal.SIGKILL)
    if signalled and plan.get("sigint_in_save"):
        os.kill(os.getpid(), signal.SIGINT)

DigitsDataset.__getitem__, torch.save = getitem, save
# The sanity pass before the run directory exists reads its own first batches: those are not counted.
import trainer.sanity
checking, original_sanity = False, trainer.sanity.sanity_pass

def sanity_pass(*args, **kwargs):
    global checking
    checking = True
    try:
        return original_sanity(*args, **kwargs)
    finally:
        checking = False

trainer.sanity.sanity_pass = sanity_pass
del DigitsDataset.get_batch  # fetch (and so count and signal) one sample at a time
import train
try:
    code = train.main(plan["argv"])
finally:
    with open(plan["count_file"], "w") as handle:
        handle.write(str(fetched))
sys.exit(code)
'''


def common(save_dir: Path, workers: int) -> list[str]:
    return [f"trainer.save_dir={save_dir}", f"trainer.epochs={EPOCHS}", "trainer.verbosity=1",
            "trainer.histograms=false", "trainer.images=false", "arch.args.channels=8",
            f"data_loader.args.batch_size={BATCH}", f"data_loader.args.num_workers={workers}",
            "trainer.save_every_steps=1", "trainer.save_period=1", "trainer.keep_last=2", "trainer.log_every_steps=1"]


@pytest.fixture(scope="module")
def sizes() -> dict:
    from base.base_data_loader import split_indices
    from data_loader.datasets import DigitsDataset

    train_idx, valid_idx = split_indices(len(DigitsDataset(train=True)), 0.15, seed=0)
    n_train = len(train_idx)
    return {"train": n_train, "valid": len(valid_idx), "steps": math.ceil(n_train / BATCH)}


class Chain:
    """One run directory, driven through a sequence of train.py processes."""

    def __init__(self, root: Path, workers: int, run_id: str):
        self.root, self.workers, self.run_id = root, workers, run_id
        self.save_dir = root / "saved"
        self.run_dir = self.save_dir / "digits" / run_id
        self.last = self.run_dir / "checkpoints" / "last.pth"
        self.processes = 0
        self.resumes = 0
        self.history: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        (root / "driver.py").write_text(DRIVER)

    def argv(self, resume: str | None = None) -> list[str]:
        self.processes += 1
        if resume is None and not self.run_dir.exists():
            return ["-c", CONFIG, "--run-id", self.run_id, *common(self.save_dir, self.workers)]
        self.resumes += 1
        return ["-r", resume or str(self.run_dir)]

    def start(self, argv: list[str], plan: dict | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if plan is None:
            command = [PYTHON, str(ROOT / "train.py"), *argv]
        else:
            env["RESUME_DRIVER"] = json.dumps({**plan, "argv": argv, "count_file": str(self.root / "count.txt")})
            command = [PYTHON, str(self.root / "driver.py"), str(ROOT)]
        with open(self.root / f"out-{self.processes}.txt", "w") as out:  # the child keeps its own copy
            return subprocess.Popen(command, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    def output(self) -> str:
        return (self.root / f"out-{self.processes}.txt").read_text()

    def drive(self, plan: dict | None = None, resume: str | None = None) -> tuple[int, str]:
        """Run one process to its end (normal, or the driver's signal/kill); (exit status, output)."""
        proc = self.start(self.argv(resume), plan)
        code = proc.wait(timeout=240)
        self.history.append(f"driven {plan} -> {code}")
        return code, self.output()

    def signal_at_random(self, rng: random.Random, signum: int = signal.SIGKILL,
                         resume: str | None = None) -> tuple[int, str]:
        """Start, wait for this process's first save, then send `signum` to its process group (workers
        included, as Ctrl-C in a terminal does) a random moment later; (exit status, output)."""
        before = self.last.stat().st_ino if self.last.exists() else None
        proc = self.start(self.argv(resume), None)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if self.last.exists() and self.last.stat().st_ino != before:
                break
            time.sleep(0.01)
        delay = rng.uniform(0.0, 0.25)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signum)
        code = proc.wait(timeout=240)
        self.history.append(f"{signal.Signals(signum).name} after first save + {delay:.3f}s -> {code}")
        return code, self.output()

    def describe(self, out: str = "") -> str:
        return f"kill seed {KILL_SEED}; history {self.history}\n{out[-3000:]}"


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """torch.equal on every tensor, == on everything else, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_bit_identical(final: Path, reference: Path) -> None:
    a, b = load_checkpoint(final), load_checkpoint(reference)
    assert (a["epoch"], a["global_step"], a["epoch_finished"]) == (b["epoch"], b["global_step"], True)
    for key in ("state_dict", "optimizer", "lr_scheduler", "monitor_best", "not_improved_count"):
        assert_same_state(a[key], b[key], key)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve as TensorBoard shows it (EventAccumulator applies the purge on resume), of the
    run and of its train/ and val/ sub-runs ("val/accuracy")."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for split in ("", "train", "val"):
        accumulator = EventAccumulator(str(run_dir / split), size_guidance={"scalars": 0})
        accumulator.Reload()
        found.update({f"{split}/{tag}" if split else tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
                      for tag in accumulator.Tags()["scalars"]})
    return found


def metrics_rows(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv without its clock columns."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items() if k not in ("time", "epoch_seconds")}
                for row in csv.DictReader(handle)]


def resume_point(state: dict, sizes: dict) -> tuple[int, int]:
    """(epoch, samples of it done) where a process resuming from `state` starts reading."""
    if state["epoch_finished"]:
        return state["epoch"] + 1, 0
    return state["epoch"], state["samples_in_epoch"]


def mid_epoch_sample(state: dict, sizes: dict, rng: random.Random) -> int:
    """A sample count, from the resume point, that falls inside a training epoch and not in its last batch."""
    epoch, done = resume_point(state, sizes)
    remaining = sizes["train"] - done
    if remaining > 2 * BATCH:
        return rng.randint(1, min(3 * BATCH, remaining - BATCH))
    assert epoch < EPOCHS, "the chain ran too far to place a signal"
    return remaining + sizes["valid"] + rng.randint(1, 2 * BATCH)


def expected_stop_step(state: dict, fetched: int, sizes: dict) -> int:
    """The optimizer step during which the `fetched`-th sample read after resuming from `state` is used."""
    epoch, done = resume_point(state, sizes)
    if fetched > sizes["train"] - done:  # past this epoch's training and validation, into the next epoch
        fetched -= sizes["train"] - done + sizes["valid"]
        epoch, done = epoch + 1, 0
    assert 0 < fetched <= sizes["train"] - done
    return (epoch - 1) * sizes["steps"] + (done + fetched - 1) // BATCH + 1


# The uninterrupted reference and the run resumed from a rewritten RNG state are not what these tests
# are about as processes: one interpreter trains both with train.main, as `python train.py` would (one
# interpreter start, ~3.5 s of CPU, less). The second waits until the test has written its copy.
REFERENCE_THEN_TAMPERED = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import train
reference, tampered, ready = json.loads(sys.argv[2])
code = train.main(reference)
print(f"reference: exit {code}", flush=True)
deadline = time.monotonic() + 300
while not os.path.exists(ready) and time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(code or train.main(["-r", tampered]))
'''


def finished(proc: subprocess.Popen, root: Path) -> None:
    if proc.wait(timeout=300) != 0:
        raise AssertionError(f"exit {proc.returncode}\n{(root / 'out.txt').read_text()[-3000:]}")


def two_worker_chain(root: Path) -> dict:
    """num_workers 2: SIGKILL and Ctrl-C (SIGINT to the process group) at random moments, then to the end."""
    rng = random.Random(KILL_SEED + 1)
    chain = Chain(root, 2, "c2")
    kill = chain.signal_at_random(rng, signal.SIGKILL)
    ctrl_c = chain.signal_at_random(rng, signal.SIGINT)
    stopped = load_checkpoint(chain.last)
    return {"chain": chain, "kill": kill, "ctrl_c": (*ctrl_c, stopped), "final": chain.drive()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sizes) -> dict:
    """The uninterrupted reference run, and interrupted chains (run side by side to save wall time).

    Chain with num_workers 0: SIGTERM at an epoch end, SIGKILL at random, SIGKILL inside a save
    (-r <checkpoint>), SIGINT, a double SIGINT inside a save, then a counted run to the end. A copy
    taken after the SIGTERM is resumed with a rewritten RNG state.
    """
    rng = random.Random(KILL_SEED)
    ref_root = tmp_path_factory.mktemp("reference")
    tampered_root = tmp_path_factory.mktemp("tampered")
    tampered, ready = tampered_root / "run", tampered_root / "ready"
    with open(ref_root / "out.txt", "w") as out:
        plan = [["-c", CONFIG, "--run-id", "ref", *common(ref_root / "saved", 0)], str(tampered), str(ready)]
        reference = subprocess.Popen([PYTHON, "-c", REFERENCE_THEN_TAMPERED, str(ROOT), json.dumps(plan)],
                                     cwd=ref_root, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pool = ThreadPoolExecutor(1)
    workers2 = pool.submit(two_worker_chain, tmp_path_factory.mktemp("chain2"))

    chain = Chain(tmp_path_factory.mktemp("chain0"), 0, "c0")
    facts: dict = {"chain": chain}
    # SIGTERM while epoch 1 is validated: it stops at the epoch's end (the later steps stop mid-epoch).
    code, out = chain.drive({"signal_at": sizes["train"] + rng.randint(1, sizes["valid"]), "signals": ["SIGTERM"]})
    facts["sigterm"] = (code, out, load_checkpoint(chain.last))

    # The same run resumed from a checkpoint whose RNG state was rewritten (a valid file: new checksum),
    # by the reference's interpreter once the reference has finished.
    shutil.copytree(chain.run_dir, tampered)
    path = tampered / "checkpoints" / "last.pth"
    state = torch.load(path, weights_only=True)
    state["ranks"][0]["rng"]["torch"] = torch.Generator().manual_seed(12345).get_state()
    save_checkpoint(state, path)  # a new file, with its own CRCs
    ready.touch()

    facts["random_kill"] = chain.signal_at_random(rng)[0]
    facts["kill_in_save"] = chain.drive({"kill_in_save": rng.randint(2, 5)}, resume=str(chain.last))
    facts["temps_after_kill"] = sorted(p.name for p in chain.last.parent.glob("*.tmp-*"))

    state = load_checkpoint(chain.last)
    stop_at = mid_epoch_sample(state, sizes, rng)
    code, out = chain.drive({"signal_at": stop_at, "signals": ["SIGINT"]})
    facts["sigint"] = (code, out, load_checkpoint(chain.last), expected_stop_step(state, stop_at, sizes))

    before = chain.last.read_bytes()
    code, out = chain.drive({"signal_at": 1, "signals": ["SIGINT"], "sigint_in_save": True})
    facts["double_sigint"] = (code, out, before, chain.last.read_bytes(),
                              sorted(p.name for p in chain.last.parent.glob("*.tmp-*")))

    state = load_checkpoint(chain.last)
    code, out = chain.drive({})
    facts["counted"] = (code, out, state, int((chain.root / "count.txt").read_text()))

    finished(reference, ref_root)  # the reference, then the tampered run
    facts["reference"] = ref_root / "saved" / "digits" / "ref"
    facts["tampered"] = tampered
    facts["workers2"] = workers2.result(timeout=300)
    pool.shutdown()
    return facts


def test_sigterm_during_validation_saves_the_epoch_end_and_exits_143(runs, sizes):
    code, out, state = runs["sigterm"]
    assert code == 143, runs["chain"].describe(out)
    assert (state["epoch"], state["epoch_finished"], state["global_step"]) == (1, True, sizes["steps"])
    assert "stopped by signal at epoch 1 end; checkpoint saved" in out


def test_sigint_saves_the_step_reached_and_exits_130(runs):
    code, out, state, step = runs["sigint"]
    assert code == 130, runs["chain"].describe(out)
    assert state["global_step"] == step, runs["chain"].describe(out)
    assert f"step {step}; checkpoint saved" in out, out


def test_second_sigint_during_a_save_stops_at_once_and_corrupts_nothing(runs):
    code, out, before, after, temps = runs["double_sigint"]
    assert code == 130 and "second Ctrl-C" in out, out
    # Interrupted between writing the temporary file and renaming it: last.pth is the previous one.
    assert after == before and temps, temps


def test_kill_inside_a_save_leaves_last_intact_and_the_orphan_is_swept(runs):
    assert runs["random_kill"] == -signal.SIGKILL
    assert runs["kill_in_save"][0] == -signal.SIGKILL
    assert runs["temps_after_kill"], "the kill inside torch.save should leave a temporary file"
    chain = runs["chain"]
    assert not list(chain.last.parent.glob("*.tmp-*")), "stale temporary files were not swept"
    assert "left by an interrupted save" in (chain.run_dir / "train.log").read_text()


def test_interrupted_chain_is_bit_identical_to_uninterrupted(runs):
    chain = runs["chain"]
    assert runs["counted"][0] == 0, chain.describe(runs["counted"][1])
    assert_bit_identical(chain.last, runs["reference"] / "checkpoints" / "last.pth")


def test_mid_epoch_resume_does_not_refetch_consumed_batches(runs, sizes):
    _, _, state, fetched = runs["counted"]
    epoch, done = state["epoch"], state["samples_in_epoch"]
    assert not state["epoch_finished"] and 0 < done < sizes["train"], "resumed from a mid-epoch checkpoint"
    expected = (sizes["train"] - done) + sizes["valid"] + (EPOCHS - epoch) * (sizes["train"] + sizes["valid"])
    assert fetched == expected


def test_resumed_run_appends_log_and_tensorboard_has_one_value_per_step(runs):
    chain = runs["chain"]
    log = (chain.run_dir / "train.log").read_text()
    assert log.count("run directory:") == chain.processes
    assert log.count("resuming from") == chain.resumes == chain.processes - 1
    got, want = scalars(chain.run_dir), scalars(runs["reference"])
    assert set(got) == set(want)
    for tag, points in got.items():
        steps = [s for s, _ in points]
        assert steps == [s for s, _ in want[tag]], f"{tag}: steps {steps}"
    # Curves of the training itself carry the same values (timings do not).
    for tag in ("train/loss/step", "train/loss", "val/accuracy", "lr/group0"):
        assert got[tag] == want[tag], tag
    # metrics.csv: each epoch once, through every kill, with the uninterrupted run's values.
    rows = metrics_rows(chain.run_dir)
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    assert rows == [pytest.approx(row, rel=1e-9) for row in metrics_rows(runs["reference"])]


def test_keep_last_keeps_newest_periodic_and_last_best(runs):
    folder = runs["chain"].last.parent
    assert sorted(p.name for p in folder.glob("epoch-*.pth")) == [f"epoch-{EPOCHS - 1}.pth", f"epoch-{EPOCHS}.pth"]
    for name in ("last.pth", "best.pth"):
        load_checkpoint(folder / name)


def test_defeated_rng_restore_is_detected(runs):
    """Resumed from the SIGTERM checkpoint with its stored RNG state rewritten, the run must end with
    different weights: the bit-identical comparisons above can fail."""
    final = load_checkpoint(runs["tampered"] / "checkpoints" / "last.pth")
    reference = load_checkpoint(runs["reference"] / "checkpoints" / "last.pth")
    assert final["global_step"] == reference["global_step"]
    with pytest.raises(AssertionError):
        assert_same_state(final["state_dict"], reference["state_dict"], "state_dict")


def test_two_workers_kill_and_ctrl_c_are_bit_identical(runs):
    result = runs["workers2"]
    chain = result["chain"]
    assert result["kill"][0] == -signal.SIGKILL, chain.describe(result["kill"][1])
    code, out, state = result["ctrl_c"]
    assert code == 130, chain.describe(out)
    stopped = re.search(r"stopped by signal at epoch (\d+)(?:, step (\d+)| end)", out)
    assert stopped, chain.describe(out)
    if stopped.group(2):
        assert state["global_step"] == int(stopped.group(2)) and not state["epoch_finished"]
    else:
        assert state["epoch"] == int(stopped.group(1)) and state["epoch_finished"]
    assert result["final"][0] == 0, chain.describe(result["final"][1])
    assert_bit_identical(chain.last, runs["reference"] / "checkpoints" / "last.pth")
