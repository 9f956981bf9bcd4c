"""Sharded checkpoint cost under FSDP2 (issue 19): what a save stalls training for, and what it costs it.

    torchrun --standalone --nproc_per_node=2 bench/fsdp_save.py [--megabytes 300] [--rounds 3] [--steps 3]

A model of Linear layers sharded with fully_shard (2 processes, gloo, CPU), SGD with momentum (so the
optimizer state is as large as the weights), saved per round as:
  plain        dcp.save into a directory (no atomic rename, no checksums: what DCP alone gives)
  ours sync    checkpoint/sharded.py's protocol with a blocking dcp.save (what the trainer did before it saved
               asynchronously): a new .tmp- directory, DCP's files fsynced, each rank hashes (SHA-256) its
               files, rank 0 writes trainer.pth and the manifest, renames the directory into place and
               moves the pointer
  ours async   ShardedSaver, as the trainer saves now: the same files and order, `stall` until save() returns
               (the state copied to CPU memory by async_save), `complete` until wait() returns on every rank
Then, with --steps N > 0, what a save costs a training run: N training steps alone, after a synchronous
save, and while an asynchronous one completes in the background (the steps, then the wait). The saver's
stand-in trainer skips the trainer's NaN guard (the same for both). Prints the median seconds of each.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from checkpoint.io import checkpoint_bytes  # noqa: E402
from checkpoint.sharded import TRAINER_FILE, ShardedSaver, _describe_files, _publish  # noqa: E402
from runtime.atomic_write import atomic_write  # noqa: E402
from logger import NullWriter, get_logger  # noqa: E402
from runtime.distributed import DistContext  # noqa: E402


class SavingTrainer:
    """What ShardedSaver.save reads of a trainer."""

    def __init__(self, model: nn.Module, optimizer, folder: Path):
        self.model, self.optimizer, self.checkpoint_dir = model, optimizer, folder
        self.dist = DistContext(dist.get_rank(), dist.get_world_size(), dist.get_rank())
        self.writer, self.logger = NullWriter(), get_logger()
        self.epoch, self.global_step, self.keep_last, self.save_period = 1, 0, 0, 0  # prune all but `last`

    def checkpoint_state(self, epoch_finished: bool) -> dict:
        return {"global_step": self.global_step, "epoch_finished": epoch_finished, "state_dict": {}, "optimizer": {}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=300, help="weights (the optimizer state adds as much)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round for the cost to training "
                                                             "(0: skip)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    side = 2048
    layers = max(1, round(args.megabytes * 2**20 / 4 / (side * side)))
    model = nn.Sequential(*[nn.Linear(side, side) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = torch.randn(4, side)

    def train(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            model(data).square().mean().backward()
            optimizer.step()

    train(1)
    megabytes = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    root = Path(args.dir or tempfile.gettempdir()) / "fsdp_save_bench"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    saver, trainer = ShardedSaver(), SavingTrainer(model, optimizer, root / "checkpoints")
    times: dict[str, list[float]] = {"plain": [], "ours sync": [], "ours async stall": [], "ours async complete": []}
    if args.steps:
        times.update({f"{args.steps} steps alone": [], f"sync save + {args.steps} steps": [],
                      f"async save + {args.steps} steps + wait": []})

    def save(wait: bool) -> float:
        """Seconds until save() returned; waits for the save when asked."""
        trainer.global_step += 1
        start = time.perf_counter()
        saver.save(trainer, ["last"], epoch_finished=False)
        returned = time.perf_counter() - start
        if wait:
            saver.wait()
        return returned

    def sync_save() -> None:
        trainer.global_step += 1
        base = f"step-{trainer.global_step}"
        temp = trainer.checkpoint_dir / f"{base}.tmp-{'0' * 32}"
        run_state = checkpoint_bytes(trainer.checkpoint_state(False)) if rank == 0 else b""
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state},
                 storage_writer=dcp.FileSystemWriter(temp, sync_files=True))
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, _describe_files(temp, lambda name: name.startswith(f"__{rank}_")))
        if rank == 0:
            atomic_write(temp / TRAINER_FILE, lambda handle: handle.write(run_state))
            final = _publish(temp, trainer.checkpoint_dir, base, {k: v for part in parts for k, v in part.items()})
            atomic_write(trainer.checkpoint_dir / "last", lambda handle: handle.write(f"{final.name}\n".encode()))
        dist.barrier()

    for i in range(args.rounds):
        dist.barrier()
        start = time.perf_counter()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=root / f"plain-{i}")
        dist.barrier()
        times["plain"].append(time.perf_counter() - start)

        start = time.perf_counter()
        sync_save()
        times["ours sync"].append(time.perf_counter() - start)

        start = time.perf_counter()
        times["ours async stall"].append(save(wait=False))
        saver.wait()
        dist.barrier()
        times["ours async complete"].append(time.perf_counter() - start)

        if args.steps:
            start = time.perf_counter()
            train(args.steps)
            dist.barrier()
            times[f"{args.steps} steps alone"].append(time.perf_counter() - start)

            start = time.perf_counter()
            sync_save()
            train(args.steps)
            dist.barrier()
            times[f"sync save + {args.steps} steps"].append(time.perf_counter() - start)

            start = time.perf_counter()
            save(wait=False)
            train(args.steps)
            saver.wait()
            dist.barrier()
            times[f"async save + {args.steps} steps + wait"].append(time.perf_counter() - start)
        if rank == 0:
            shutil.rmtree(root / f"plain-{i}", ignore_errors=True)
            for old in (root / "checkpoints").glob("step-*"):  # the synchronous saves' (the saver prunes its own)
                if old.name != (root / "checkpoints" / "last").read_text().strip():
                    shutil.rmtree(old, ignore_errors=True)
    if rank == 0:
        print(f"{dist.get_world_size()} processes, {layers} x Linear({side}, {side}): {megabytes:.0f} MB of weights "
              f"+ {megabytes:.0f} MB of momentum, {args.rounds} rounds")
        width = max(map(len, times))
        for name, values in times.items():
            print(f"{name:{width}s}  median {statistics.median(values):.2f} s  "
                  f"(min {min(values):.2f}, max {max(values):.2f})")
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
