"""`python -m checkpoint.convert OLD.pth NEW.pth`: a victoresque/pytorch-template checkpoint becomes one of ours.

OLD is read by checkpoint/untrusted.py, which imports and runs nothing the file names (its ConfigParser,
pathlib paths and NumPy scalars become inert records). NEW holds:
- `state_dict`: the model's weights as they are (a `module.` prefix of DataParallel removed), and `arch`;
- `config`: the old config (ConfigParser's `_config`) with every key this project's schema knows, which
  are all the keys of the template's config.json; the user's own top-level keys move under `user`, other
  keys the schema does not know (inside its sections) are dropped; both are listed.
  It is checked like any config: one that names a class missing here is written as it is, with a note;
- `converted_from`: the old file's name, epoch, monitor_best and whole config, for the record.
Not carried over: the optimizer state. The template saves no RNG state, data order or scheduler state, so a
converted checkpoint cannot continue the old run exactly; it evaluates (`test.py -r NEW.pth`) and starts
new runs (`arch.pretrained: NEW.pth`), which build their optimizer afresh.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from errors import CheckpointError, ConfigError, TrainingError, UserError, problem_lines

MAX_DEPTH = 100


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """The old config as plain data: OrderedDicts become dicts, tuples lists; anything else is refused."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):  # OrderedDict included
        if not all(isinstance(key, str) for key in value):
            raise ValueError(f"{where}: a key that is not a string")
        return {key: _plain(item, f"{where}.{key}", depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if value is None or type(value) in (bool, int, float, str):  # NaN too: check_config says what is wrong
        return value
    kind = getattr(value, "qualname", type(value).__name__)
    raise ValueError(f"{where}: {kind} is not plain data")


def _known_keys(config: dict, parts: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """(the keys of `config` the schema knows, the dotted names of those it does not)."""
    from config.schema import is_known_path

    kept, dropped = {}, []
    for key, value in config.items():
        path = (*parts, key)
        if not is_known_path(list(path)):
            dropped.append(".".join(path))
        elif isinstance(value, dict) and not is_known_path([*path, "?"]):  # a section: look inside
            kept[key], more = _known_keys(value, path)
            dropped += more
        else:
            kept[key] = value
    return kept, dropped


def _old_config(saved: Any) -> dict | None:
    """pytorch-template pickles its ConfigParser: the config is the `_config` of the object's state."""
    state = getattr(saved, "state", None)
    if isinstance(state, dict) and isinstance(state.get("_config"), dict):
        return state["_config"]
    return saved if isinstance(saved, dict) else None


def convert(old: Path, new: Path) -> list[str]:
    """Write NEW from OLD; returns the lines that say what was carried over. CheckpointError names OLD."""
    import torch

    from checkpoint.file_kind import describe_not_a_checkpoint
    from checkpoint.io import CHECKPOINT_FORMAT, save_checkpoint
    from checkpoint.untrusted import Inert, TensorRecord, UntrustedFileError, read_untrusted
    from config import check_config

    if not old.exists():
        raise CheckpointError(f"{old}: not found")
    kind = describe_not_a_checkpoint(old)
    if kind:
        raise CheckpointError(f"{old}: {kind}")
    if new.exists() and new.resolve() == old.resolve():
        raise CheckpointError(f"{new}: the new checkpoint must not overwrite the old one")
    if os.path.lexists(new):  # a config or another run's checkpoint: never replaced by a conversion
        raise CheckpointError(f"{new}: already exists; name a new file (or delete it first)")
    try:
        saved = read_untrusted(old)
    except UntrustedFileError as exc:
        raise CheckpointError(f"{old}: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise CheckpointError(f"{old}: not a pytorch-template checkpoint (no state_dict)")
    if "format" in saved:  # written by save_checkpoint (pytorch-template's hold no such key)
        raise CheckpointError(f"{old}: already a checkpoint of this project; nothing to convert")
    weights = {}
    for key, value in saved["state_dict"].items():
        if not (isinstance(key, str) and isinstance(value, TensorRecord)):
            raise CheckpointError(f"{old}: 'state_dict' holds {getattr(value, 'qualname', type(value).__name__)} "
                                  f"at {str(key)[:60]!r}, not a tensor")
        weights[key] = value.tensor.clone()  # its own memory, not a view of the file's bytes
    notes = []
    if weights and all(key.startswith("module.") for key in weights):  # saved from DataParallel (n_gpu > 1)
        weights = {key.removeprefix("module."): value for key, value in weights.items()}
        notes.append("removed the 'module.' prefix DataParallel gave the weights' names")

    record: dict[str, Any] = {"tool": "pytorch-template", "file": str(old)}
    for key in ("arch", "epoch", "monitor_best"):
        value = saved.get(key)
        if type(value) in (bool, int, float, str):  # NumPy scalars were read as Python numbers
            record[key] = value
    raw = _old_config(saved.get("config"))
    config = None
    if raw is None:
        notes.append("no config found (test.py and train.py need -c CONFIG with this checkpoint)")
    else:
        try:
            record["config"] = _plain(raw, "config")
        except ValueError as exc:
            raise CheckpointError(f"{old}: the old config cannot be read: {exc}") from None
        config, dropped = _known_keys(record["config"])
        # The user's own top-level keys (read as config['my_key'] in the template) go where ours live.
        user = config.setdefault("user", {})
        moved = [key for key in dropped if "." not in key and isinstance(user, dict) and key not in user]
        if moved:
            user.update({key: record["config"][key] for key in moved})
            notes.append(f"config keys of your own, moved under user (read them as config['user'][...]): "
                         f"{', '.join(moved)}")
        if not user:
            del config["user"]
        dropped = [key for key in dropped if key not in moved]
        if dropped:
            notes.append(f"config keys this project does not know, dropped: {', '.join(dropped)}")
        try:
            config = check_config(config, f"{old} (config)")
        except ConfigError as exc:  # e.g. a model class not yet copied into model/: written as it is
            notes += [f"the config does not check here yet: {problem}" for problem in exc.problems]
    state = {"format": CHECKPOINT_FORMAT, "torch_version": str(torch.__version__),
             "arch": record.get("arch") if isinstance(record.get("arch"), str) else "", "state_dict": weights,
             "converted_from": record}
    if config is not None:
        state["config"] = config
    try:
        save_checkpoint(state, new)
    except TrainingError as exc:
        raise CheckpointError(str(exc)) from None
    dropped_parts = [key for key in ("optimizer",) if key in saved]
    dropped_parts += [key for key in saved if key not in ("arch", "epoch", "monitor_best", "config", "state_dict",
                                                          "optimizer")]
    kept = " and ".join(key for key in ("epoch", "monitor_best") if key in record)
    lines = [f"converted {old} (pytorch-template, {record.get('arch', '?')}, epoch {record.get('epoch', '?')}) "
             f"-> {new}",
             f"carried over: the weights ({len(weights)} tensors)" + (", the config" if config is not None else "")
             + (f"; {kept} under converted_from" if kept else ""),
             f"not carried over: {', '.join(dropped_parts) or 'nothing else'} (a converted checkpoint evaluates "
             f"and starts new runs; it does not resume)"]
    lines += [f"note: {note}" for note in notes]
    inert = sorted({ascii(value.qualname)[1:-1] for value in _values(saved) if isinstance(value, Inert)})
    if inert:
        lines.append(f"read as inert records, never imported: {', '.join(inert)}")
    lines += [f"evaluate:   python test.py -r {new}",
              f"fine-tune:  python train.py -c CONFIG arch.pretrained={new}"]
    return lines


def _values(obj: Any, seen: set[int] | None = None, depth: int = 0):
    """Every object in the loaded tree, each once (pickle's memo shares objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > MAX_DEPTH:
        return
    seen.add(id(obj))
    yield obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        [obj.args, obj.state, obj.items] if hasattr(obj, "qualname") else []
    for child in children:
        yield from _values(child, seen, depth + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoint.convert",
                                     description="Convert a victoresque/pytorch-template checkpoint into one of "
                                                 "this project, without running anything in it.")
    parser.add_argument("old", type=Path, help="the pytorch-template checkpoint (checkpoint-epochN.pth, model_best.pth)")
    parser.add_argument("new", type=Path, help="the checkpoint to write")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        lines = convert(args.old, args.new)
    except UserError as exc:
        for line in problem_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
