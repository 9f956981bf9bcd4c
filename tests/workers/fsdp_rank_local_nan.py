"""Run under torchrun (2 processes, gloo) by tests/test_fsdp.py: FSDP2, and after step 2 rank 1 alone puts
inf into its shard of the optimizer's momentum, just before step 2's checkpoint. The NaN guard reads each
rank's shards; only the ranks' agreement can stop rank 0. Each rank prints `rank R: <error>`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from config import check_config  # noqa: E402
from config.build import build_data_loaders, build_loss, build_metrics, build_model, build_optimizer  # noqa: E402
from errors import TrainingError  # noqa: E402
from runtime.distributed import (barrier, distributed_context, init_process_group, local_part, shard_model,  # noqa: E402
                                 shutdown)
from trainer.trainer import Trainer  # noqa: E402


def main() -> None:
    run_dir = Path(sys.argv[1])
    config = check_config({
        "name": "nan", "seed": 0, "device": "cpu",
        "arch": {"type": "MLP", "args": {"in_features": 64, "hidden": 16, "num_classes": 10, "depth": 2}},
        "data_loader": {"type": "DigitsDataLoader", "args": {"batch_size": 16, "validation_split": 0.0}},
        "optimizer": {"type": "SGD", "args": {"lr": 0.01, "momentum": 0.9}},
        "loss": "cross_entropy", "metrics": [],
        "trainer": {"epochs": 1, "verbosity": 0, "monitor": "off", "tensorboard": False, "save_every_steps": 2,
                    "strategy": "fsdp", "fsdp": {"wrap": ["Linear"]}},
    })
    context = distributed_context(None)
    init_process_group(context, "gloo", torch.device("cpu"))
    torch.manual_seed(0)
    model = shard_model(build_model(config), config["trainer"]["fsdp"], torch.device("cpu"))
    train_loader, _ = build_data_loaders(config)
    train_loader.configure(0, context.rank, context.world_size)

    class RankLocalInf(Trainer):
        def on_batch_end(self, batch_idx, loss):
            if self.global_step == 2 and self.dist.rank == 1:
                state = next(iter(self.optimizer.state.values()))
                local_part(state["momentum_buffer"]).fill_(float("inf"))

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer = RankLocalInf(model, build_loss(config), build_metrics(config), build_optimizer(config, model), config,
                           torch.device("cpu"), train_loader, None, None, run_dir=run_dir, dist=context)
    try:
        trainer.train()
        print(f"rank {context.rank}: finished at step {trainer.global_step}", flush=True)
    except TrainingError as exc:
        print(f"rank {context.rank}: {exc}", flush=True)
    if context.rank == 0:
        print(f"checkpoints: {sorted(p.name for p in (run_dir / 'checkpoints').iterdir())}", flush=True)
    barrier()
    shutdown()


if __name__ == "__main__":
    main()
