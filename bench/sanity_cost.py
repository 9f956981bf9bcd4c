"""What the sanity pass before training costs (issue 15): its time against one training step and one
training epoch of the same config, built exactly as train.py builds it.

    python bench/sanity_cost.py                          # configs/digits.yaml
    python bench/sanity_cost.py configs/shapes_segmentation.yaml
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(path: str = "configs/digits.yaml", repeats: int = 5) -> None:
    import torch

    from config import load_config
    from config.build import (build_data_loaders, build_loss, build_lr_scheduler, build_metrics, build_model,
                              build_optimizer, trainer_class)
    from runtime.batch import to_device
    from trainer.sanity import sanity_pass

    config = load_config(path, ["device=cpu", "trainer.tensorboard=false"])
    torch.manual_seed(0)
    model = build_model(config)
    train_loader, valid_loader = build_data_loaders(config, 0, 1)
    optimizer = build_optimizer(config, model)
    trainer = trainer_class(config)(model, build_loss(config), build_metrics(config), optimizer, config,
                                    torch.device("cpu"), train_loader, valid_loader,
                                    build_lr_scheduler(config.get("lr_scheduler"), optimizer))
    trainer.verbosity = 0
    sanity = []
    for _ in range(repeats):
        started = time.perf_counter()
        sanity_pass(trainer)
        sanity.append(time.perf_counter() - started)
    train_loader.set_epoch(1)
    steps = []
    model.train()
    for i, batch in enumerate(train_loader):
        started = time.perf_counter()
        batch = to_device(batch, trainer.device)
        optimizer.zero_grad()
        trainer.step(batch)["loss"].backward()
        optimizer.step()
        steps.append(time.perf_counter() - started)
        if i == 20:
            break
    started = time.perf_counter()
    trainer._train_epoch(1)
    epoch = time.perf_counter() - started
    s, step = statistics.median(sanity), statistics.median(steps[1:])
    print(f"{path}: sanity pass {s * 1e3:.1f} ms (median of {repeats}) = {s / step:.1f} training steps "
          f"({step * 1e3:.1f} ms each) = {s / epoch:.3f} of a training epoch ({epoch:.2f} s, {len(train_loader)} steps)")


if __name__ == "__main__":
    main(*sys.argv[1:2])
