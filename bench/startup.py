"""Startup: `python train.py --help` against `python -c "import torch"` (target <= 1.3).

    python bench/startup.py
"""
from __future__ import annotations

import argparse
import subprocess
import sys

from common import ROOT, paired_rounds, report, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    def run(*command: str):
        return timed(lambda: subprocess.run([sys.executable, *command], cwd=ROOT, check=True,
                                            stdout=subprocess.DEVNULL))

    ratios = paired_rounds(lambda: run("train.py", "--help"), lambda: run("-c", "import torch"), args.rounds)
    print(f"{report('train.py --help / import torch', ratios, 1.3):.3f}")


if __name__ == "__main__":
    main()
