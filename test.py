"""Evaluate a checkpoint on the test split: `python test.py -r CHECKPOINT [-c CONFIG] [-d DEVICE]`.

The model and data come from the config stored in the checkpoint (or `-c`), through the same
builders as train.py; one `name: value` line is printed per metric.
"""
from __future__ import annotations

import argparse
import sys

from errors import ConfigError, UserError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split.")
    parser.add_argument("-r", "--resume", required=True,
                        help="checkpoint file, or a run directory (its best.pth, else last.pth)")
    parser.add_argument("-c", "--config", help="config to use instead of the one stored in the checkpoint")
    parser.add_argument("-d", "--device", help="device: auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    from pathlib import Path

    from checkpoint import check_eval_state, load_checkpoint, load_model_state
    from config import check_config, load_config
    from config.files import apply_overrides
    from config.schema import is_known_path

    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    path = Path(args.resume)
    if path.is_dir():
        path = next((p for p in (path / "checkpoints" / "best.pth", path / "checkpoints" / "last.pth") if p.exists()),
                    path / "checkpoints" / "best.pth")
    state = load_checkpoint(path)
    check_eval_state(state, path, need_config=not args.config)
    if args.config:
        config = load_config(args.config, overrides)
    else:
        config = check_config(apply_overrides(state["config"], overrides, known=is_known_path), f"{path} (config)")

    import torch

    from config.build import build_loss, build_metrics, build_model, build_test_loader
    from runtime.device import resolve_device

    device = resolve_device(config["device"], config.get("n_gpu"))
    config["arch"]["pretrained"] = None  # the checkpoint's own weights are loaded below
    model = build_model(config)
    load_model_state(model, state["state_dict"], strict=True, source=str(path))
    model = model.to(device).eval()
    loader = build_test_loader(config)
    criterion, metric_fns = build_loss(config), build_metrics(config)
    totals = torch.zeros(1 + len(metric_fns), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            n = target.shape[0]
            values = [criterion(output, target)] + [fn(output, target) for fn in metric_fns]
            totals += torch.stack([v.detach().double().cpu() for v in values]) * n
            count += n
    names = ["loss"] + [fn.__name__ for fn in metric_fns]
    return {name: (total / max(count, 1)).item() for name, total in zip(names, totals)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(args)
    except UserError as exc:
        for line in exc.problems if isinstance(exc, ConfigError) else [str(exc)]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    for name, value in results.items():
        print(f"{name}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
