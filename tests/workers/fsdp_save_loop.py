"""Run by tests/test_fsdp.py and killed with SIGKILL at a random moment: saves sharded checkpoints (one
process, DCP without a process group) in a loop. Before the save of step s every parameter holds the value s
and global_step is s, so a checkpoint that loads must hold one value throughout, equal to its step."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from checkpoint.sharded import save_sharded  # noqa: E402
from test_tasks import blobs, build, make_config  # noqa: E402


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 2048), nn.ReLU(), nn.Linear(2048, 3))


def main() -> None:
    out = Path(sys.argv[1])
    config = make_config(out, [], strategy="fsdp", keep_last=2, save_period=1)
    trainer = build(config, blobs(16), model=model(), run_dir=out)
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.fill_(float(step))
        trainer.global_step, trainer.epoch = step, step
        save_sharded(trainer, ["best", "last"] if step % 3 == 0 else ["last"], epoch_finished=step % 2 == 0)
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main()
