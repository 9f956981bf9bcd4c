"""Scaling: 2 processes x 1 thread under torchrun against 1 process x 1 thread, training samples/s
at a fixed per-process batch (target >= 1.5); and the scaffold's DDP throughput against a
hand-written DDP loop (bench/ddp_hand.py) on the same model, data and optimizer (target: step time
within 1.05, i.e. throughput ratio >= 0.952).

    python bench/scaling.py                      # configs/mnist.yaml: MnistModel on 60,000 generated
                                                 # MNIST-format images (IDX files, read by torchvision)
    python bench/scaling.py --workload digits    # configs/digits.yaml: 1,437 digits, ~1 ms steps
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, temp_dir

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
CONFIGS = {"mnist": "configs/mnist.yaml", "digits": "configs/digits.yaml"}


def mnist_files(n_train: int = 60000) -> Path:
    """MNIST-format IDX files of generated images, where torchvision's MNIST looks for them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from datafiles import write_mnist

    root = temp_dir()
    write_mnist(root, n_train=n_train, n_test=100)
    return root


def scaffold_rate(processes: int, epochs: int, batch_size: int, workload: str, data_dir: Path | None) -> float:
    """Median train samples/s over epochs 2..N, read back from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save_dir = temp_dir()
    args = ["train.py", "-c", CONFIGS[workload], f"trainer.save_dir={save_dir}", f"trainer.epochs={epochs}",
            "trainer.early_stop=0", "trainer.verbosity=0", f"data_loader.args.batch_size={batch_size}",
            "--run-id", "bench"]
    if workload == "mnist":  # in-process loading, like the hand-written loop; the files are already there
        args += [f"data_loader.args.data_dir={data_dir}", "data_loader.args.num_workers=0",
                 "data_loader.args.download=false", "device=cpu"]
    command = ([*TORCHRUN, f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]) + args
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    events = EventAccumulator(str(Path(save_dir) / workload / "bench"), size_guidance={"scalars": 0})
    events.Reload()
    rates = [e.value for e in events.Scalars("throughput/train_samples_per_s")]
    return statistics.median(rates[1:])


def hand_rate(processes: int, epochs: int, batch_size: int, workload: str, data_dir: Path | None) -> float:
    out = subprocess.run([*TORCHRUN, f"--nproc_per_node={processes}", "bench/ddp_hand.py", workload, str(epochs),
                          str(batch_size), str(data_dir)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        sys.exit(f"bench/ddp_hand.py exited {out.returncode}:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1].split(":")[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(CONFIGS), default="mnist")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: 3 (mnist), 12 (digits)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    epochs = args.epochs or {"mnist": 3, "digits": 12}[args.workload]
    data_dir = mnist_files() if args.workload == "mnist" else None
    scaling, versus_hand = [], []
    for _ in range(args.rounds):
        one = scaffold_rate(1, epochs, args.batch_size, args.workload, data_dir)
        two = scaffold_rate(2, epochs, args.batch_size, args.workload, data_dir)
        hand = hand_rate(2, epochs, args.batch_size, args.workload, data_dir)
        scaling.append(two / one)
        versus_hand.append(two / hand)
        print(f"samples/s: 1 process {one:.0f}, 2 processes {two:.0f}, hand-written DDP {hand:.0f}")
    print(f"scaffold DDP / hand-written DDP throughput: median {statistics.median(versus_hand):.3f} "
          f"(min {min(versus_hand):.3f}, max {max(versus_hand):.3f}; target >= 0.952, i.e. step time within 1.05)")
    print(f"2 processes / 1 process: median {statistics.median(scaling):.3f} "
          f"(min {min(scaling):.3f}, max {max(scaling):.3f}; target >= 1.5)")
    print(f"{statistics.median(scaling):.3f}")


if __name__ == "__main__":
    main()
