"""Evaluate a checkpoint on the test split: `python test.py -r CHECKPOINT [-c CONFIG] [-d DEVICE]`.

The model and data come from the config stored in the checkpoint (or `-c`), through the same
builders as train.py; one `name: value` line is printed per metric.
"""
from __future__ import annotations

import argparse
import sys

from errors import UserError, problem_lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split.")
    parser.add_argument("-r", "--resume", required=True,
                        help="checkpoint file, run directory or its checkpoints/ folder (best.pth, else last.pth)")
    parser.add_argument("-c", "--config", help="config to use instead of the one stored in the checkpoint")
    parser.add_argument("-d", "--device", help="device: auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    from checkpoint import check_eval_state, load_checkpoint, load_model_state
    from config import load_config, resolve_config
    from runtime.device import device_option
    from runtime.run_dir import locate_checkpoint

    overrides = list(args.overrides) + ([f"device={device_option(args.device)}"] if args.device else [])
    path, _ = locate_checkpoint(args.resume)  # a run directory, its checkpoints/ folder or a file
    if path.is_dir():
        path = next((p for p in (path / "best.pth", path / "last.pth") if p.exists()), path / "best.pth")
    state = load_checkpoint(path)
    check_eval_state(state, path, need_config=not args.config)
    if args.config:
        config = load_config(args.config, overrides)
    else:
        config = resolve_config(state.get("config"), overrides, f"{path} (config)")

    from config.build import build_loss, build_metrics, build_model, build_test_loader, trainer_class
    from runtime.device import resolve_device

    device = resolve_device(config["device"], config.get("n_gpu"))
    config["arch"]["pretrained"] = None  # the checkpoint's own weights are loaded below
    model = build_model(config)
    load_model_state(model, state["state_dict"], strict=True, source=str(path))
    model = model.to(device)
    loader = build_test_loader(config, device=device)
    # The run's own trainer class: its `step` and evaluation loop are the ones validation ran.
    trainer = trainer_class(config)(model, build_loss(config), build_metrics(config), None, config, device, None)
    trainer.verbosity = 0  # only the `name: value` lines on stdout
    print(f"evaluating {path} on the test split ({len(loader.sampler)} samples)", file=sys.stderr)
    return trainer.evaluate(loader, desc="test")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(args)
    except UserError as exc:
        for line in problem_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    for name, value in results.items():
        print(f"{name}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
