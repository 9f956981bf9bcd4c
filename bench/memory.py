"""Memory: peak RSS after epoch 10 against after epoch 2 of the digits config (target <= 1.05).

    python bench/memory.py
"""
from __future__ import annotations

import resource
import sys

from common import ROOT, temp_dir

sys.argv = [sys.argv[0]]  # train.py's parser must not see this script's arguments


def main() -> None:
    import run
    from trainer.trainer import Trainer

    peaks: dict[int, float] = {}

    def record(self, epoch: int, result: dict) -> None:
        peaks[epoch] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux

    Trainer.on_validation_end = record
    from train import parse_args

    args = parse_args(["-c", str(ROOT / "configs" / "digits.yaml"), f"trainer.save_dir={temp_dir()}",
                       "trainer.epochs=10", "trainer.early_stop=0", "trainer.verbosity=0"])
    run.train_run(args)
    print(f"peak RSS: epoch 2 {peaks[2]:.1f} MiB, epoch 10 {peaks[10]:.1f} MiB; target <= 1.05")
    print(f"{peaks[10] / peaks[2]:.3f}")


if __name__ == "__main__":
    main()
