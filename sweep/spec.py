"""What to sweep: `key=a,b,c` lists (a grid) and `key=log(lo,hi)`, `int(lo,hi)`, `float(lo,hi)`,
`choice(a,b)` ranges (an Optuna search), read from the command line.

Values keep the text the user wrote (`1e-3`), so a child run reads each one with the same YAML
scalar rules as any `key=value` override.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from config.files import parse_scalar
from errors import UserError

RANGE = re.compile(r"^(log|int|float|choice)\((.*)\)\Z", re.S)
# Keys that decide where a run is written: the sweep sets them itself.
NOT_SWEPT = ("name", "trainer.save_dir")
# Axes over which the summary averages (a seed or a fold is a replicate, not a setting).
REPLICATE_KEYS = ("seed", "data_loader.fold")


@dataclass(frozen=True)
class Axis:
    key: str
    kind: str  # "list" | "log" | "int" | "float"
    values: tuple[str, ...]  # the texts of a list; (low, high) of a range

    @property
    def is_range(self) -> bool:
        return self.kind != "list"

    def bounds(self) -> tuple[float, float]:
        return parse_scalar(self.values[0]), parse_scalar(self.values[1])


def split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets and quotes: `[1,2],[3,4]` is two values."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def parse_axis(item: str) -> Axis:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or not text.strip():
        raise UserError(f"--sweep {item!r}: expected key.path=a,b,c or key.path=log(low,high), int(low,high), "
                        f"float(low,high), choice(a,b)")
    if key in NOT_SWEPT:
        raise UserError(f"--sweep {key}: the sweep sets {' and '.join(NOT_SWEPT)} itself (its runs go into the "
                        f"sweep directory); set it before --sweep as a plain override")
    match = RANGE.match(text.strip())
    if match is None:
        values = split_top_level(text)
        kind = "list"
    else:
        kind, values = match.group(1), split_top_level(match.group(2))
        if kind == "choice":
            kind = "list"
        elif len(values) != 2:
            raise UserError(f"--sweep {item!r}: {kind}(low,high) takes two numbers")
    if any(not value for value in values):
        raise UserError(f"--sweep {item!r}: an empty value (two commas in a row?)")
    axis = Axis(key, kind, tuple(values))
    if axis.is_range:
        low, high = axis.bounds()
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
        if not numeric or not low < high:
            raise UserError(f"--sweep {item!r}: {kind}(low,high) needs two finite numbers with low < high")
        if kind == "int" and not all(isinstance(v, int) for v in (low, high)):
            raise UserError(f"--sweep {item!r}: int(low,high) needs two integers")
        if kind == "log" and low <= 0:
            raise UserError(f"--sweep {item!r}: log(low,high) needs 0 < low")
    if len(set(values)) != len(values) and not axis.is_range:
        raise UserError(f"--sweep {item!r}: a value is listed twice")
    return axis


def parse_axes(items: list[str]) -> tuple[list[Axis], list[str]]:
    """(swept axes, fixed overrides): an item with a single value is an override of every run."""
    axes, fixed, seen = [], [], set()
    for item in items:
        axis = parse_axis(item)
        if axis.key in seen:
            raise UserError(f"--sweep {axis.key}: given twice")
        seen.add(axis.key)
        if axis.kind == "list" and len(axis.values) == 1:
            fixed.append(f"{axis.key}={axis.values[0]}")
        else:
            axes.append(axis)
    return axes, fixed


def grid(axes: list[Axis]) -> list[dict[str, str]]:
    """Every combination, the first axis varying slowest: [{key: value text}, ...]."""
    for axis in axes:
        if axis.is_range:
            raise UserError(f"--sweep {axis.key}={axis.kind}(...): a range is searched, not listed; add "
                            f"--sweep-trials N (an Optuna search), or list the values: {axis.key}=a,b,c")
    return [dict(zip([a.key for a in axes], values)) for values in itertools.product(*[a.values for a in axes])]


def overrides_of(combination: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in combination.items()]
