"""Shared test helpers: run the real entry points as subprocesses, on small configs, in tmp dirs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# One torch thread per process: on a busy 2-core machine torch's default of one thread per core
# made single runs ~10x slower (measured), and torchrun sets the same for its workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable


def run_script(script: str, *args: str, cwd: Path | str = ROOT, timeout: float = 300, env: dict | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run train.py/test.py (or any script of the project) and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([PYTHON, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def small_digits(save_dir: Path, *extra: str) -> list[str]:
    """Overrides that make configs/digits.yaml a few-second run writing under `save_dir`."""
    return [f"trainer.save_dir={save_dir}", "trainer.epochs=2", "trainer.verbosity=1", *extra]


@pytest.fixture
def digits_config() -> Path:
    return ROOT / "configs" / "digits.yaml"


# The longest files first (measured serially on two idle cores, 2026-11-26). pytest.ini's `-n auto
# --dist loadfile --no-loadscope-reorder` hands each worker whole files in this order, so the long ones
# overlap instead of ending the run one after another on a single worker.
LONGEST_FIRST = ["test_sweep.py", "test_hardening_signals.py", "test_fsdp.py", "test_predict_export.py",
                 "test_examples.py", "test_monitoring.py", "test_errors.py", "test_mlflow_logger.py",
                 "test_resume.py", "test_scaffold.py", "test_distributed.py", "test_tasks.py"]


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keeps its order
