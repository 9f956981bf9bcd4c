"""Train from a config, or resume a run. See README.md, and `python train.py --help`."""
from __future__ import annotations

import argparse
import os
import sys

from errors import Interrupted, TrainingError, UserError, one_line, problem_lines
from runtime.signals import StopSignal

EPILOG = """overrides: key.path=value after the options, e.g. trainer.epochs=3 optimizer.args.lr=0.01
(values use YAML scalar rules; list items by index: metrics.0=accuracy).
exit status: 0 done, 1 training failed, 2 bad input, 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP (checkpoint saved)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a model from a config file.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="config file (.json, .yaml or .yml)")
    parser.add_argument("-r", "--resume", help="run directory, its checkpoints/ folder, or a checkpoint to resume from")
    parser.add_argument("-d", "--device", help="device: auto, cpu, cuda, cuda:N, mps (overrides the config)")
    parser.add_argument("--run-id", help="name of the run directory (default: a timestamp)")
    parser.add_argument("--lr", type=float, help="learning rate (optimizer.args.lr)")
    parser.add_argument("--bs", type=int, help="batch size per process (data_loader.args.batch_size)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="build everything, run one batch forward and backward, write nothing, exit")
    parser.add_argument("--sweep", nargs="+", metavar="KEY=VALUES", help="run every combination (key=a,b,c), or "
                        "search ranges (log(lo,hi), int(lo,hi), float(lo,hi), choice(a,b)) with --sweep-trials")
    parser.add_argument("--sweep-trials", type=int, metavar="N", help="an Optuna search of N trials over the --sweep ranges")
    parser.add_argument("--folds", type=int, metavar="K", help="k-fold cross-validation: K runs, one per validation fold")
    parser.add_argument("--nproc", type=int, metavar="N", help="with a sweep: run each run under torchrun with N processes")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    # Intermixed: overrides may come before and after options (`a=1 --dry-run b=2`).
    args = parser.parse_intermixed_args(argv)
    if not args.config and not args.resume:
        parser.error("one of -c/--config or -r/--resume is required")
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"unexpected argument {item!r} (overrides are key.path=value)")
    return args


def main(argv: list[str] | None = None, *, process_exits: bool = False) -> int:
    """`process_exits`: the process ends when this returns (`python train.py`). A finished run then keeps
    ignoring SIGINT/SIGTERM until it has exited; a caller in the same process gets its handlers back."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Installed now: a signal during startup is recorded, not raised as KeyboardInterrupt inside torch's
    # import (a C++ callback there aborts the process); run.py stops before writing anything.
    stop = StopSignal().install()
    try:
        from sweep import run_sweep, sweep_requested

        if sweep_requested(args):  # many runs, each a child train.py (README: Many runs)
            return run_sweep(args, stop)
        from run import train_run

        return train_run(args, stop)
    except (UserError, TrainingError) as exc:
        # Under torchrun every process of a node meets the same config error: one of them says it.
        if not (isinstance(exc, UserError) and os.environ.get("LOCAL_RANK", "0") != "0"):
            for line in problem_lines(exc):
                print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except (RuntimeError, ConnectionError, EOFError) as exc:
        from runtime.blame import worker_died

        if not worker_died(exc):
            raise
        # Every checkpoint write is atomic: the files on disk are whole.
        reason = one_line(str(exc)) if isinstance(exc, RuntimeError) else f"a DataLoader worker died ({exc!r})"
        print(f"error: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if stop.requested:
            print("interrupted (second Ctrl-C): stopped at once; the newest checkpoint on disk is intact",
                  file=sys.stderr)
        else:  # the stop handler was not installed yet: training had not started
            print("interrupted before training started; no checkpoint was written", file=sys.stderr)
        return 130
    finally:
        if not process_exits:
            stop.uninstall()


if __name__ == "__main__":
    sys.exit(main(process_exits=True))
