"""Progress of an epoch: a tqdm bar on a terminal; on a pipe or file, a plain log line every `interval`
seconds (no carriage returns, so CI logs and `> file` stay readable).

The caller decides `enabled`: only the main process, and only at verbosity >= 1, draws anything.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator

from logger.console import number
from logger.logging import get_logger

POSTFIX_SECONDS = 0.5  # how often the bar's loss/metrics are read (each read syncs with the device)


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 0


class Progress:
    """Wraps an iterable of batches. `postfix`, a callable returning {name: value}, is shown in the bar
    or in the log line; it is called at most every POSTFIX_SECONDS on a terminal and once per log line
    otherwise, never per step."""

    def __init__(self, iterable: Iterable, total: int, desc: str, enabled: bool = True, initial: int = 0,
                 interval: float = 30.0):
        self.iterable, self.total, self.desc, self.initial = iterable, total, desc, initial
        self.enabled = enabled
        self.postfix: Callable[[], dict] | None = None
        self.tty = enabled and sys.stdout.isatty()
        self.interval = interval

    def __iter__(self) -> Iterator:
        # Returned, not delegated with `yield from`: one generator layer less on every step.
        if not self.enabled:
            return iter(self.iterable)
        return self._bar() if self.tty else self._lines()

    def _bar(self) -> Iterator:
        from tqdm import tqdm

        # leave=False: the bar disappears at the end of the epoch; the epoch's summary line stays.
        # A terminal that reports a 0x0 size (a bare pty, some containers) would hide the bar: use 80x24.
        width = {"dynamic_ncols": True} if _columns() else {"ncols": 80, "nrows": 24}
        bar = tqdm(self.iterable, total=self.total, initial=self.initial, desc=self.desc, leave=False,
                   file=sys.stdout, unit="batch", **width)
        try:
            next_postfix = 0.0  # the first batch already shows values
            for item in bar:
                yield item
                now = time.monotonic()
                if self.postfix is not None and now >= next_postfix:
                    next_postfix = now + POSTFIX_SECONDS
                    bar.set_postfix({k: number(v) for k, v in self.postfix().items()}, refresh=False)
        finally:
            bar.close()

    def _lines(self) -> Iterator:
        logger, start = get_logger(), time.perf_counter()
        next_report = start + self.interval
        for i, item in enumerate(self.iterable, start=self.initial + 1):
            yield item
            now = time.perf_counter()
            if now >= next_report and i < self.total:  # the epoch's own summary line covers the end
                next_report = now + self.interval
                elapsed = now - start
                rate = (i - self.initial) / elapsed if elapsed > 0 else 0.0
                eta = (self.total - i) / rate if rate else 0.0
                values = "" if self.postfix is None else " ".join(f"{k}={number(v)}" for k, v in self.postfix().items())
                logger.info(f"{self.desc} [{i}/{self.total}] {values} ({rate:.1f} batch/s, eta {eta:.0f}s)")
