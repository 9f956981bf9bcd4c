"""The run directory <save_dir>/<name>/<run_id>/ and finding what to resume."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import yaml

from config.schema import NAME_RE
from errors import ConfigError, TrainingError, UserError
from runtime.atomic_write import atomic_write


def check_run_id(run_id: str) -> None:
    if not NAME_RE.match(run_id) or run_id in (".", ".."):
        raise ConfigError(f"--run-id: {run_id!r} must be a plain directory name (letters, digits, _ . -; no / or ..)")


def run_root(config: dict) -> Path:
    return Path(config["trainer"]["save_dir"]) / config["name"]


def new_run_id() -> str:
    # Microseconds: two runs started in the same second get different directories.
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def create_run_dir(config: dict, run_id: str | None) -> Path:
    """Create the run directory; an explicit run id that exists already is an error."""
    root = run_root(config)
    for _ in range(100):
        path = root / (run_id or new_run_id())
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            if run_id:
                raise UserError(f"run directory {path} exists; resume it with -r {path}, or pick another --run-id")
            continue
        except OSError as exc:
            raise UserError(f"cannot create run directory {path}: {exc.strerror or exc}") from None
        (path / "checkpoints").mkdir()
        return path
    raise UserError(f"could not find a free run directory under {root}")


def write_config(config: dict, run_dir: Path, suffix: str) -> Path:
    """Write the resolved config atomically; a full disk or a read-only run directory is a one-line
    TrainingError (exit 1, like a checkpoint that cannot be written) and leaves no temporary behind."""
    path = run_dir / ("config.json" if suffix == ".json" else "config.yaml")
    text = json.dumps(config, indent=2) + "\n" if suffix == ".json" else yaml.safe_dump(config, sort_keys=False)
    try:
        atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    except OSError as exc:
        raise TrainingError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def locate_resume(target: str) -> tuple[Path, Path | None]:
    """(checkpoint file or run directory, run directory) for `-r target`."""
    path = Path(target)
    if path.is_dir():
        if not (path / "checkpoints").is_dir():
            raise UserError(f"-r {target}: not a run directory (no checkpoints/ folder) and not a checkpoint file")
        return path, path
    if not path.exists():
        raise UserError(f"-r {target}: no such file or directory")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return path, run_dir


def config_changes(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key path, old, new) for every leaf that differs between two configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in dict.fromkeys([*old, *new]):
            path = f"{prefix}.{key}" if prefix else str(key)
            changes += config_changes(old.get(key), new.get(key), path)
        return changes
    return [] if old == new else [(prefix, old, new)]
