"""Run under torchrun (2 processes, gloo) by tests/test_distributed.py: rank 1 alone sees an infinite
loss at step 3 whose gradients are finite (loss + inf), so only the ranks' agreement can stop rank 0.
Each rank prints `rank R: <error>` and the last checkpoint's step."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from config import check_config  # noqa: E402
from config.build import build_data_loaders, build_loss, build_metrics, build_model, build_optimizer  # noqa: E402
from errors import TrainingError  # noqa: E402
from runtime.distributed import barrier, distributed_context, init_process_group, shutdown, wrap_model  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402


def main() -> None:
    run_dir = Path(sys.argv[1])
    config = check_config({
        "name": "nan", "seed": 0, "device": "cpu",
        "arch": {"type": "MLP", "args": {"in_features": 64, "hidden": 16, "num_classes": 10, "depth": 2}},
        "data_loader": {"type": "DigitsDataLoader", "args": {"batch_size": 16, "validation_split": 0.0}},
        "optimizer": {"type": "SGD", "args": {"lr": 0.01}},
        "loss": "cross_entropy", "metrics": [],
        "trainer": {"epochs": 1, "verbosity": 0, "monitor": "off", "tensorboard": False, "save_every_steps": 2},
    })
    context = distributed_context(None)
    init_process_group(context, "gloo", torch.device("cpu"))
    torch.manual_seed(0)
    model, _ = wrap_model(build_model(config), torch.device("cpu"), sync_batchnorm=False)
    train_loader, _ = build_data_loaders(config)
    train_loader.configure(0, context.rank, context.world_size)
    plain = build_loss(config)

    class RankLocalInf(Trainer):
        def on_batch_end(self, batch_idx, loss):
            if self.global_step == 2 and self.dist.rank == 1:  # from step 3 on, on rank 1 only
                self.criterion = lambda output, target: plain(output, target) + float("inf")

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer = RankLocalInf(model, plain, build_metrics(config), build_optimizer(config, model), config,
                           torch.device("cpu"), train_loader, None, None, run_dir=run_dir, dist=context)
    try:
        trainer.train()
        print(f"rank {context.rank}: finished at step {trainer.global_step}", flush=True)
    except TrainingError as exc:
        print(f"rank {context.rank}: {exc}", flush=True)
    if context.rank == 0:
        last = run_dir / "checkpoints" / "last.pth"
        print(f"last checkpoint step: {load_checkpoint(last)['global_step'] if last.exists() else None}", flush=True)
    barrier()  # leave together (see run.py)
    shutdown()


if __name__ == "__main__":
    main()
