"""Reading config files (JSON or YAML, by extension) and applying `key.path=value` overrides.

Both spellings are read strictly: duplicate keys are errors, JSON's NaN/Infinity are refused, and
YAML reads `1e-3` as the number it looks like (PyYAML follows YAML 1.1, where it is a string).
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from config.schema import keys_under, short, suggest
from errors import ConfigError

SUFFIXES = (".json", ".yaml", ".yml")


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads YAML 1.2 floats (`1e-3`) as numbers."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a plain name, "
                                  f"not {type(key).__name__}")
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} (line {seen[key]} and line {key_node.start_mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# YAML 1.1's float pattern requires a dot in the mantissa, so `1e-3` would stay a string.
_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictYamlLoader.construct_mapping
)
# A date such as `name: 2024-01-01` stays the string it looks like: datetime objects cannot be
# printed as JSON nor stored in a checkpoint that loads with weights_only=True.
_StrictYamlLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


# Bounds on the tree a config expands to. A real config has a few hundred values a few levels deep;
# YAML aliases (and pickle's memo in a checkpoint's stored config) share one object under many keys,
# so 1 KB of aliases nested in aliases stands for 10^9 values, and 500 nested brackets would exhaust
# Python's recursion limit in every walk below.
MAX_DEPTH = 100
MAX_VALUES = 100_000


def plain_tree(data: Any, source: str = "config") -> Any:
    """A copy of `data` in which no list or mapping appears twice: a tree every later walk can take.

    Shared references (YAML aliases) are copied out, once the tree they expand to is known to be
    small; cycles, nesting deeper than MAX_DEPTH and more than MAX_VALUES values are refused with a
    ConfigError naming `source`. Measuring remembers each shared object by id, so it takes time in
    proportion to the file, not to what it expands to.
    """
    measured: dict[int, tuple[int, int]] = {}  # id -> (values, depth) of the tree below it
    on_path: set[int] = set()

    def measure(node: Any, level: int, where: str) -> tuple[int, int]:
        if not isinstance(node, (dict, list)):
            return 1, 0
        if id(node) in on_path:
            raise ConfigError(f"{source}: {where or 'config'}: refers to itself (a YAML alias inside its own anchor)")
        if id(node) not in measured:
            if level >= MAX_DEPTH:
                raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep (at {where[:60]}...)")
            on_path.add(id(node))
            values, depth = 1, 0
            for key, child in (node.items() if isinstance(node, dict) else enumerate(node)):
                child_where = f"{where}[{key}]" if isinstance(node, list) else f"{where}.{key}" if where else str(key)
                child_values, child_depth = measure(child, level + 1, child_where)
                values, depth = values + child_values, max(depth, child_depth + 1)
            on_path.discard(id(node))
            measured[id(node)] = (values, depth)
        values, depth = measured[id(node)]
        if level + depth > MAX_DEPTH:
            raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep (at {where[:60]}...)")
        if values > MAX_VALUES:
            raise ConfigError(f"{source}: {where or 'config'} expands to more than {MAX_VALUES} values "
                              f"(YAML aliases nested in aliases?)")
        return values, depth

    def copy_out(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: copy_out(value) for key, value in node.items()}
        if isinstance(node, list):
            return [copy_out(item) for item in node]
        return node

    measure(data, 0, "")
    return copy_out(data)


def plain_problems(data: Any, where: str = "") -> list[str]:
    """Problems that keep a tree (see plain_tree) from being plain config data: strings, finite
    numbers, booleans, null, lists and string-keyed mappings.

    The resolved config is printed as JSON or YAML and stored in checkpoints, so anything else
    (sets, bytes, NaN) is refused here rather than failing there.
    """
    label = where or "config"
    if isinstance(data, (dict, list)):
        items = data.items() if isinstance(data, dict) else enumerate(data)
        problems = []
        for key, value in items:
            if isinstance(data, dict) and not isinstance(key, str):
                problems.append(f"{label}: key {key!r} must be a string (quote it)")
                continue
            child = f"{where}[{key}]" if isinstance(data, list) else f"{where}.{key}" if where else key
            problems += plain_problems(value, child)
        return problems
    if isinstance(data, float) and not math.isfinite(data):
        return [f"{label}: {data} is not a finite number"]
    if data is None or isinstance(data, (str, bool, int, float)):
        return []
    return [f"{label}: {type(data).__name__} values are not allowed in a config (got {short(data)})"]


def _json_pairs(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _json_constant(name: str):
    raise ConfigError(f"{name} is not a valid number in a config")


def read_config_file(path: str | Path) -> dict:
    """Parse a config file into a plain dict; every problem becomes a ConfigError naming the file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{path}: unsupported config extension {path.suffix!r} (use .json, .yaml or .yml)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__}: {exc})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_json_pairs, parse_constant=_json_constant)
        else:
            data = yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:  # the JSON and YAML parsers recurse once per level of nesting
        raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping, not {type(data).__name__}")
    return data


def parse_scalar(text: str) -> Any:
    """Read a command-line value with YAML scalar rules (`3` -> 3, `1e-3` -> 0.001, `[1,2]` -> list)."""
    try:
        return yaml.load(text, Loader=_StrictYamlLoader) if text.strip() else text  # noqa: S506
    except (yaml.YAMLError, ConfigError):
        return text
    except RecursionError:
        raise ConfigError(f"the value is nested more than {MAX_DEPTH} levels deep") from None


def apply_overrides(config: dict, overrides: list[str], known: "callable | None" = None) -> dict:
    """Return a copy of `config` with each `a.b.c=value` applied; list items are addressed by index.

    `known(path)` answers whether a key path that is absent from the config is a valid key; it
    lets `trainer.keep_last=3` set a key the file left at its default.
    """
    config = copy.deepcopy(config)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        parts = key.split(".")
        node: Any = config
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    problems.append(f"override {key}: {'.'.join(parts[:depth])} has no item {part} (it has {len(node)})")
                    break
                part = int(part)
            elif isinstance(node, dict):
                if part not in node:
                    if known is not None and known(parts[: depth + 1]):
                        if not last:
                            node[part] = {}
                    else:
                        pool = [*node.keys(), *keys_under(parts[:depth])]
                        problems.append(f"override {key}: unknown key {where!r}{suggest(part, pool)}")
                        break
            else:
                problems.append(f"override {key}: {'.'.join(parts[:depth])} is a value, not a mapping")
                break
            if last:
                try:
                    node[part] = parse_scalar(raw)
                except ConfigError as exc:
                    problems.append(f"override {key}: {exc}")
            else:
                if isinstance(node, dict) and node.get(part) is None and known is not None and known(parts[: depth + 1]):
                    node[part] = {}
                node = node[part]
    if problems:
        raise ConfigError(problems)
    return config
