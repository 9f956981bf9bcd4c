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
    from checkpoint.trained import load_trained
    from config.build import build_test_loader

    trained = load_trained(args.resume, args.config, args.overrides, args.device)
    loader = build_test_loader(trained.config, device=trained.device)
    # The run's own trainer class: its `step` and evaluation loop are the ones validation ran.
    trainer = trained.trainer
    trainer.verbosity = 0  # only the `name: value` lines on stdout
    print(f"evaluating {trained.path} on the test split ({len(loader.sampler)} samples)", file=sys.stderr)
    from trainer.sanity import DONE, SanityError, sanity_pass

    try:  # the first test batch through dataset, collate, step and metrics: a mistake there is one line
        sanity_pass(trainer, [("test", loader)])
    except SanityError as exc:
        raise SanityError(str(exc).replace(DONE, "(checked before evaluating)")) from None
    try:
        return trainer.evaluate(loader, desc="test")
    except Exception as exc:  # noqa: BLE001 - an error in the user's code, after the first batch
        from runtime.blame import describe_error, locate

        piece, at = locate(exc) or ("evaluation", None)
        raise EvaluationError(f"{piece} failed{f' at {at}' if at else ''} during evaluation: "
                              f"{describe_error(exc)}") from exc


class EvaluationError(Exception):
    exit_code = 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(args)
    except (UserError, EvaluationError) as exc:
        for line in problem_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for name, value in results.items():
        print(f"{name}: {value:.4g}")  # significant digits: a loss of 1.2e-05 is not 0.0000
    return 0


if __name__ == "__main__":
    sys.exit(main())
