"""Sharded checkpoint cost under FSDP2 (issue 19): what a save stalls training for.

    torchrun --standalone --nproc_per_node=2 bench/fsdp_save.py [--megabytes 300] [--rounds 3]

A model of Linear layers sharded with fully_shard (2 processes, gloo, CPU), SGD with momentum (so the
optimizer state is as large as the weights), saved per round as:
  plain   dcp.save into a directory (no atomic rename, no checksums: what DCP alone gives)
  ours    checkpoint/sharded.py's protocol: dcp.save into a new .tmp- directory with fsync, barrier, rank 0
          each rank hashes (SHA-256) the files it wrote, rank 0 writes the manifest and renames the directory into place
  async   dcp.async_save on a dedicated gloo group: the time until it returns (the stall), and until its
          files are written; the manifest and rename would follow in the background
Each round removes its directories. Prints the median seconds of each.
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

from checkpoint.sharded import _describe_files, _publish  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=300, help="weights (the optimizer state adds as much)")
    parser.add_argument("--rounds", type=int, default=3)
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
    model(torch.randn(4, side)).sum().backward()
    optimizer.step()
    megabytes = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    root = Path(args.dir or tempfile.gettempdir()) / "fsdp_save_bench"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    group = dist.new_group(backend="gloo")  # async_save on the training group aborts gloo ranks
    times: dict[str, list[float]] = {"plain": [], "ours": [], "async stall": [], "async total": []}

    def state():
        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optim": optim_state}

    for i in range(args.rounds):
        dist.barrier()
        start = time.perf_counter()
        dcp.save(state(), checkpoint_id=root / f"plain-{i}")
        dist.barrier()
        times["plain"].append(time.perf_counter() - start)

        start = time.perf_counter()
        temp = root / f"step-{i}.tmp-{'0' * 32}"
        dcp.save(state(), storage_writer=dcp.FileSystemWriter(temp, sync_files=True))
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, _describe_files(temp, lambda name: name.startswith(f"__{rank}_")))
        if rank == 0:
            _publish(temp, root, f"step-{i}", {k: v for part in parts for k, v in part.items()})
        dist.barrier()
        times["ours"].append(time.perf_counter() - start)

        start = time.perf_counter()
        future = dcp.async_save(state(), storage_writer=dcp.FileSystemWriter(root / f"async-{i}", sync_files=True),
                                process_group=group)
        times["async stall"].append(time.perf_counter() - start)
        (future.upload_completion if hasattr(future, "upload_completion") else future).result()
        dist.barrier()
        times["async total"].append(time.perf_counter() - start)
        dist.barrier()
        if rank == 0:
            for name in (f"plain-{i}", f"step-{i}", f"async-{i}"):
                shutil.rmtree(root / name, ignore_errors=True)
    if rank == 0:
        print(f"{dist.get_world_size()} processes, {layers} x Linear({side}, {side}): {megabytes:.0f} MB of weights "
              f"+ {megabytes:.0f} MB of momentum, {args.rounds} rounds")
        for name, values in times.items():
            print(f"{name:12s} median {statistics.median(values):.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
