"""python -m checkpoint.consolidate SHARDED_DIR OUT.pth: one plain-dict checkpoint from a sharded one.

SHARDED_DIR is a checkpoint directory (checkpoints/step-<N>/ or epoch-<N>/), a checkpoints/ folder or a run
directory (then the checkpoint `last` names). It is verified as a resume verifies it; the output is the file
a DDP run writes (checkpoint.io.save_checkpoint: plain data, CRC-checked), which test.py, predict.py,
arch.pretrained and `train.py -r` with trainer.strategy ddp read. Runs in one process, without torchrun.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from errors import UserError


def consolidate(source: Path, out: Path) -> Path:
    import torch

    from checkpoint.io import save_checkpoint
    from checkpoint.sharded import find_sharded, read_full

    folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    folder, state, _ = find_sharded(folder)
    full = read_full(folder)
    model_state, optim = full["model"], full["optim"]
    # DCP keys the optimizer state by parameter name; optimizer.state_dict() numbers the parameters in the
    # order of its param groups.
    order = [name for group in optim["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for group in optim["param_groups"]:
        groups.append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    optimizer = {"state": {index[name]: value for name, value in optim["state"].items()}, "param_groups": groups}
    state = {key: value for key, value in state.items() if key != "sharded"}
    # The trainer saves the strategy it ran with: the plain file continues as a DDP (or one-process) run.
    config = dict(state["config"])
    config["trainer"] = {**config["trainer"], "strategy": "ddp"}
    state.update(config=config, optimizer=optimizer,
                 state_dict={k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in model_state.items()})
    return save_checkpoint(state, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoint.consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a sharded checkpoint directory, checkpoints/ folder or run directory")
    parser.add_argument("out", help="the .pth file to write")
    args = parser.parse_args(argv)
    try:
        if not Path(args.source).exists():
            raise UserError(f"{args.source}: no such file or directory")
        path = consolidate(Path(args.source), Path(args.out))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
