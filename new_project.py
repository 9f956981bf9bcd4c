"""Copy this scaffold into a new project: `python new_project.py DEST` (from any directory).

Copies the source, configs, tests, docs, README, requirements and .ci/run; leaves out run outputs
(saved/), data/, caches, .git, virtual environments and benchmarks.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
INCLUDE = ["base", "model", "data_loader", "trainer", "logger", "config", "checkpoint", "runtime", "sweep", "configs",
           "tests", "docs", ".ci", "train.py", "test.py", "predict.py", "export.py", "run.py", "errors.py",
           "new_project.py", "requirements.txt", "requirements-extra.txt", "README.md", "pytest.ini", ".gitignore"]
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", "saved", "data", ".venv",
                              "*.tmp-*")


def copy_scaffold(dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in INCLUDE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=SKIP)
        elif source.is_file():
            shutil.copy2(source, dest / name)
        else:
            continue
        copied.append(name)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Copy the scaffold into a new project directory.")
    parser.add_argument("dest", help="directory to create (must not exist, or be empty)")
    args = parser.parse_args(argv)
    dest = Path(args.dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        print(f"error: {args.dest} exists and is not an empty directory", file=sys.stderr)
        return 2
    if dest == ROOT or ROOT in dest.parents:
        print(f"error: {args.dest} is inside the scaffold itself; pick a directory outside {ROOT}", file=sys.stderr)
        return 2
    try:
        copied = copy_scaffold(dest)
    except OSError as exc:
        print(f"error: cannot create {args.dest}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"created {dest} ({', '.join(copied)})")
    print(f"next: cd {dest} && python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt "
          f"&& python train.py -c configs/digits.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
