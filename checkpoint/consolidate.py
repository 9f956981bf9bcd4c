"""python -m checkpoint.consolidate SOURCE OUT.pth [--checkpoint NAME]: one plain-dict checkpoint from a sharded one.

SOURCE is a checkpoint directory (checkpoints/step-<N>/ or epoch-<N>/), or a run directory or its checkpoints/
folder; of a run, `--checkpoint` names the one: `best` (the default, as test.py picks best.pth; `last` when the
run has no best, with monitoring off), `last`, or a directory such as `epoch-3`. The checkpoint is verified
as a resume verifies it, and never swapped for another: a missing or damaged one is an error. The output is
the file a DDP run writes (checkpoint.io.save_checkpoint: plain data, CRC-checked), which test.py,
predict.py, arch.pretrained and `train.py -r` with trainer.strategy ddp read. Runs in one process, without
torchrun.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from errors import CheckpointError, TrainingError, UserError


def choose(source: Path, name: str | None) -> tuple[Path, str]:
    """(the checkpoint directory to consolidate, how it was chosen) for SOURCE and --checkpoint."""
    from checkpoint.sharded import CHECKPOINT_NAME, POINTERS, is_checkpoint_dir, is_sharded_run, read_pointer
    from runtime.run_dir import locate_checkpoint

    if is_checkpoint_dir(source):
        if name is not None:
            raise UserError(f"--checkpoint {name}: {source} is a checkpoint directory itself; --checkpoint picks one "
                            f"of a run directory")
        return source, "the directory named"
    if source.is_file() and source.name in POINTERS and is_sharded_run(source.parent):  # RUN/checkpoints/last
        if name is not None:
            raise UserError(f"--checkpoint {name}: {source} is a pointer file itself; --checkpoint picks one of a "
                            f"run directory")
        return read_pointer(source.parent, source.name), f"`{source.name}`"
    folder, _ = locate_checkpoint(str(source), option="")
    if not folder.is_dir() or not is_sharded_run(folder):
        raise UserError(f"{source}: holds no sharded checkpoint (trainer.strategy fsdp): its .pth files are single "
                        f"files already, for test.py and predict.py as they are")
    if name is None:  # as test.py: best, else last (a run without monitoring has no best)
        name = "best" if (folder / "best").is_file() else "last"
        how = f"`{name}`" + ("" if name == "best" else ": the run has no `best`")
    else:
        how = f"`{name}`"
    if name in POINTERS:
        target = read_pointer(folder, name)
        if target is None:
            raise CheckpointError(f"{folder / name}: no such pointer in this run (it has: {_listing(folder)})")
        return target, how
    if not CHECKPOINT_NAME.fullmatch(name):
        raise UserError(f"--checkpoint {name}: not a checkpoint name (best, last, or a directory such as epoch-3)")
    if not (folder / name).is_dir():
        raise CheckpointError(f"{folder / name}: no such checkpoint in this run (it has: {_listing(folder)})")
    return folder / name, how


def _listing(folder: Path) -> str:
    from checkpoint.sharded import POINTERS, _named_dirs

    names = [p for p in POINTERS if (folder / p).is_file()] + sorted(p.name for p in _named_dirs(folder) if p.is_dir())
    return ", ".join(names) or "nothing"


def suggested_output(source: Path) -> Path:
    """The OUT.pth that closing lines and errors suggest for SOURCE: in the run directory (one file per run, so
    that runs do not write over each other's; never in checkpoints/, where a .pth is taken for the run's own
    checkpoint), named after the checkpoint directory when one is named."""
    from checkpoint.sharded import is_checkpoint_dir

    source = Path(source)
    if is_checkpoint_dir(source):
        run = source.parent.parent if source.parent.name == "checkpoints" else source.parent
        return run / f"consolidated-{source.name}.pth"
    return (source.parent if source.name == "checkpoints" else source) / "consolidated.pth"


def check_output(out: Path) -> None:
    """OUT is a new file in an existing directory: never written over (another run's consolidated file, a
    config), and no directory made up for a mistyped path."""
    import os

    if os.path.lexists(out):
        raise UserError(f"{out}: already exists; name a new file (or delete it first)")
    if not out.parent.is_dir():
        raise UserError(f"{out}: no such directory {out.parent}")


def consolidate(folder: Path, out: Path) -> tuple[Path, dict]:
    """Verify the checkpoint directory `folder` and write it as one file at `out`; (out, the run state)."""
    import torch

    from checkpoint.io import save_checkpoint
    from checkpoint.sharded import load_sharded_state, read_full

    state = load_sharded_state(folder)
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
    return save_checkpoint(state, out), state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoint.consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a sharded checkpoint directory, or a run directory or its checkpoints/ folder")
    parser.add_argument("out", help="the .pth file to write (a new file, in an existing directory; e.g. "
                                    "RUN_DIR/consolidated.pth)")
    parser.add_argument("--checkpoint", metavar="NAME", help="of a run: best (default; last if the run has no best), "
                                                             "last, or a directory such as epoch-3")
    args = parser.parse_args(argv)
    try:
        if not Path(args.source).exists():
            raise UserError(f"{args.source}: no such file or directory")
        check_output(Path(args.out))  # before the checkpoint is read and verified
        folder, how = choose(Path(args.source), args.checkpoint)
        path, state = consolidate(folder, Path(args.out))
    except (UserError, TrainingError) as exc:  # TrainingError: OUT could not be written (exit 1)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    where = "end" if state["epoch_finished"] else f"batch {state['batch_in_epoch']}"
    print(f"consolidated {folder} ({how}; epoch {state['epoch']} {where}, step {state['global_step']}) into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
