"""What the console shows of a run: numbers with significant digits, epoch summaries that fit an
80-column terminal, durations a person reads at a glance."""
from __future__ import annotations

WIDTH = 80  # columns: every line built here fits, however many metrics a run has


def number(value) -> str:
    """Four significant digits: 0.9815, 1.2e-05, 1234, 1.235e+04 (never `0.0000` for a small loss)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m07s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def wrap(prefix: str, items: list[str], width: int = WIDTH) -> list[str]:
    """`prefix item  item  item` (the prefix ends in a space), continued on further lines that repeat the prefix, each at most `width`
    columns (an item longer than a line gets a line of its own)."""
    lines, line = [], prefix
    for item in items:
        if line != prefix and len(line) + 2 + len(item) > width:
            lines.append(line)
            line = prefix
        line += ("  " if line != prefix else " ") + item
    lines.append(line)
    return lines


def epoch_lines(epoch: int, epochs: int, train: dict, val: dict, seconds: float, improved: bool,
                width: int = WIDTH) -> list[str]:
    """The epoch's summary, one line per split, every line starting with `epoch N/M` (grep-friendly):

        epoch 3/20 train  loss 0.1234  accuracy 0.9876  top_k_acc 1
        epoch 3/20 val    loss 0.1234  accuracy 0.98  top_k_acc 1  2.3s  *best
    """
    head = f"epoch {epoch}/{epochs}"
    splits = [("train", train)] + ([("val", val)] if val else [])
    label = max(len(name) for name, _ in splits)
    items = [[f"{key} {number(value)}" for key, value in values.items()] for _, values in splits]
    if len(items) == 2 and list(train) == list(val):  # the same names: one column each, aligned
        widths = [max(len(a), len(b)) for a, b in zip(*items)]
        items = [[item.ljust(w) for item, w in zip(row, widths)] for row in items]
    items[-1] += [duration(seconds)] + (["*best"] if improved else [])
    lines = []
    for (name, _), row in zip(splits, items):
        lines += [line.rstrip() for line in wrap(f"{head} {name:<{label}} ", row, width)]
    return lines
