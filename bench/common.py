"""Shared pieces of the benchmarks: the project on sys.path, paired timing, a trainer built in-process."""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def paired_rounds(run_a, run_b, rounds: int) -> list:
    """Interleave A and B (alternating which goes first) and return the per-round ratios A/B (tuples of
    ratios where A and B return tuples of times)."""
    ratios = []
    for i in range(rounds):
        if i % 2 == 0:
            a, b = run_a(), run_b()
        else:
            b, a = run_b(), run_a()
        ratios.append(tuple(x / y for x, y in zip(a, b)) if isinstance(a, tuple) else a / b)
    return ratios


def report(name: str, ratios: list[float], target: float | None) -> float:
    median = statistics.median(ratios)
    spread = (min(ratios), max(ratios))
    print(f"{name}: median ratio {median:.3f} over {len(ratios)} rounds (min {spread[0]:.3f}, max {spread[1]:.3f}); "
          + (f"target <= {target}" if target is not None else "reported, no target"))
    return median


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-"))
