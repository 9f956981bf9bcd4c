"""What a file named as a checkpoint is, when it is not one: messages a user can act on.

`train.py -r configs/digits.yaml` (the usual -r/-c mix-up) or `test.py -r RUN/train.log` should hear
"not a checkpoint: looks like a YAML config; did you mean -c ...?", not a warning about a pickle payload;
that warning is kept for files that really pickle objects of other classes.
"""
from __future__ import annotations

from pathlib import Path

from checkpoint.archive import ZIP_MAGIC

CONFIG_KEYS = {"arch", "data_loader", "optimizer", "trainer"}  # what tells a config from other YAML or JSON
CONFIG_SUFFIXES = {".json": "JSON config", ".yaml": "YAML config", ".yml": "YAML config"}
SNIFF = 2**16  # bytes read to tell; a config or log larger than this is judged by its name


def describe_not_a_checkpoint(path: Path) -> str | None:
    """"not a checkpoint: ..." for a directory, an empty file, a config, a text or log file or other bytes;
    None when it may be a checkpoint: a zip archive or a pickle, which torch.load judges."""
    if path.is_dir():
        return "not a checkpoint: it is a directory (name a .pth file)"
    if not path.is_file():
        return "not a checkpoint: not a regular file"
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
        if head == ZIP_MAGIC:  # torch.save's zip archive: the common case, four bytes read
            return None
        head, cut = head + handle.read(SNIFF), bool(handle.read(1))
    if not head:
        return "not a checkpoint: the file is empty"
    if head[:1] == b"\x80" or _pickle_opcodes(head, cut):  # a pickle: protocol 2+ starts with 0x80, 0 and 1 are text
        return None
    if b"\0" in head or not _utf8(head, cut):
        return f"not a checkpoint: neither a zip archive from torch.save nor a pickle (it starts with {head[:8]!r})"
    text = head.decode("utf-8", "ignore")
    kind = (None if cut else _config_kind(text)) or CONFIG_SUFFIXES.get(path.suffix.lower())
    if kind:
        return f"not a checkpoint: looks like a {kind}; did you mean -c {path}?"
    return (f"not a checkpoint: looks like a {'log' if path.suffix.lower() == '.log' else 'text'} file; a checkpoint "
            f"is a .pth file that train.py writes into a run's checkpoints/ folder")


def _utf8(head: bytes, cut: bool) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return cut and exc.start >= len(head) - 3  # a character cut by the read
    return True


def _pickle_opcodes(head: bytes, cut: bool) -> bool:
    """Do these bytes read as pickle opcodes up to STOP, or up to where the read stopped? Read, never run."""
    import pickletools

    try:
        return any(opcode.name == "STOP" for opcode, _, _ in pickletools.genops(head))
    except ValueError as exc:
        return cut and "unknown" not in str(exc)


def _config_kind(text: str) -> str | None:
    import json

    import yaml

    for kind, parse in (("JSON config", json.loads), ("YAML config", yaml.safe_load)):
        try:
            data = parse(text)
        except Exception:  # noqa: BLE001 - any parse error: not this kind
            continue
        if isinstance(data, dict) and CONFIG_KEYS & set(map(str, data)):
            return kind
    return None


def why_refused(path: Path) -> str:
    """Why torch.load(weights_only=True) refused a pickle: a pytorch-template checkpoint (for
    checkpoint/convert.py), or objects of other classes. Read inertly (checkpoint/untrusted.py): nothing runs."""
    from checkpoint.untrusted import UntrustedFileError, read_untrusted

    try:
        state = read_untrusted(path)
    except UntrustedFileError:
        state = None
    if isinstance(state, dict) and "state_dict" in state and \
            str(getattr(state.get("config"), "qualname", "")).endswith("ConfigParser"):
        return f"a pytorch-template checkpoint: convert it first: python -m checkpoint.convert {path} NEW.pth"
    return "refused: it contains objects other than tensors and plain data (a pickle payload?); it was not executed"
