"""Row 4: time from process start to the first optimizer step, `python train.py -c configs/digits.yaml`
against the same work written by hand (bench/hand_digits.py: same model, data, optimizer and seed),
each in a fresh process, interleaved, the median of the paired ratios (target <= 1.10).

Both run under this script as a child (`--child train|hand`): it imports torch, registers a global
optimizer step post-hook (torch.optim.optimizer.register_optimizer_step_post_hook) that prints the
time (CLOCK_MONOTONIC, shared by all processes) and the heavy modules loaded so far, then ends the
process, and runs the script as __main__. The parent takes the time from just before it starts the
process. train.py writes its run directory under a temporary save_dir, deleted after each run.

    python bench/first_step.py [--rounds 11]
"""
from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, paired_rounds, report

MARK = "first-optimizer-step"
HEAVY = ("torch.utils.tensorboard", "tensorboard", "torchmetrics", "torchvision", "sklearn", "scipy", "PIL",
         "matplotlib", "pandas", "yaml", "tqdm")


def child(which: str, save_dir: str) -> None:
    import torch  # noqa: F401  (both children pay for it here, before their script starts)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def first_step(optimizer, args, kwargs) -> None:
        loaded = [name for name in HEAVY if name in sys.modules]
        print(f"{MARK} {time.monotonic()!r} {','.join(loaded) or '-'}", flush=True)
        os._exit(0)

    register_optimizer_step_post_hook(first_step)
    os.chdir(ROOT)
    if which == "train":
        sys.argv = ["train.py", "-c", "configs/digits.yaml", "--run-id", "first-step", f"trainer.save_dir={save_dir}"]
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    else:
        sys.argv = ["hand_digits.py"]
        runpy.run_path(str(ROOT / "bench" / "hand_digits.py"), run_name="__main__")
    raise SystemExit(f"{which}: finished without an optimizer step")


def run(which: str, modules: dict) -> float:
    save_dir = tempfile.mkdtemp(prefix="first-step-")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--child", which, save_dir], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    line = next((line for line in proc.stdout.splitlines() if line.startswith(MARK)), None)
    if line is None:
        raise SystemExit(f"{which} exited {proc.returncode} before its first optimizer step:\n{proc.stderr[-2000:]}")
    _, stamp, loaded = line.split(" ")
    modules[which] = loaded
    return float(stamp) - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--child", nargs=2, metavar=("train|hand", "SAVE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    modules, times = {}, {"train": [], "hand": []}

    def timed_run(which: str):
        def go() -> float:
            seconds = run(which, modules)
            times[which].append(seconds)
            return seconds
        return go

    timed_run("train")(), timed_run("hand")()  # untimed: page cache, .pyc files
    times = {"train": [], "hand": []}
    ratios = paired_rounds(timed_run("train"), timed_run("hand"), args.rounds)
    for which in ("train", "hand"):
        seconds = sorted(times[which])
        print(f"{which}: median {seconds[len(seconds) // 2]:.3f} s to the first optimizer step; "
              f"heavy modules loaded by then: {modules[which].replace(',', ', ')}")
    print(f"{report('train.py / hand-written script, process start to first optimizer step', ratios, 1.10):.3f}")


if __name__ == "__main__":
    main()
