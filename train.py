"""Train from a config, or resume a run. See README.md, and `python train.py --help`."""
from __future__ import annotations

import argparse
import sys

from errors import Interrupted, TrainingError, UserError, problem_lines

EPILOG = """overrides: key.path=value after the options, e.g. trainer.epochs=3 optimizer.args.lr=0.01
(values use YAML scalar rules; list items by index: metrics.0=accuracy).
exit status: 0 done, 1 training failed, 2 bad input, 130/143 stopped by SIGINT/SIGTERM (checkpoint saved)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a model from a config file.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="config file (.json, .yaml or .yml)")
    parser.add_argument("-r", "--resume", help="run directory or checkpoint to resume from")
    parser.add_argument("-d", "--device", help="device: auto, cpu, cuda, cuda:N, mps (overrides the config)")
    parser.add_argument("--run-id", help="name of the run directory (default: a timestamp)")
    parser.add_argument("--lr", type=float, help="learning rate (optimizer.args.lr)")
    parser.add_argument("--bs", type=int, help="batch size per process (data_loader.args.batch_size)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="build everything, run one batch forward and backward, write nothing, exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    # Intermixed: overrides may come before and after options (`a=1 --dry-run b=2`).
    args = parser.parse_intermixed_args(argv)
    if not args.config and not args.resume:
        parser.error("one of -c/--config or -r/--resume is required")
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"unexpected argument {item!r} (overrides are key.path=value)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from run import train_run

        return train_run(args)
    except (UserError, TrainingError) as exc:
        for line in problem_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted (second Ctrl-C): stopped at once; the newest checkpoint on disk is intact",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
