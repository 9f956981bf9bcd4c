"""Progress: a tqdm bar on a terminal; on a pipe or file, a plain log line every `interval` seconds."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from logger.logging import get_logger


class Progress:
    """Wraps an iterable of batches. `postfix` is shown (bar) or logged (lines); it is only read
    every `refresh` batches, so reading it may sync with the device without costing every step."""

    def __init__(self, iterable: Iterable, total: int, desc: str, enabled: bool = True, initial: int = 0,
                 refresh: int = 20, interval: float = 30.0):
        self.iterable, self.total, self.desc, self.initial = iterable, total, desc, initial
        self.enabled = enabled
        self.refresh = refresh
        self.postfix = None  # a callable returning {name: value}
        self.tty = enabled and sys.stdout.isatty()
        self.interval = interval

    def __iter__(self) -> Iterator:
        if not self.enabled:
            yield from self.iterable
            return
        if self.tty:
            from tqdm import tqdm

            bar = tqdm(self.iterable, total=self.total, initial=self.initial, desc=self.desc, leave=False,
                       dynamic_ncols=True, file=sys.stdout)
            for i, item in enumerate(bar, start=1):
                yield item
                if self.postfix is not None and i % self.refresh == 0:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in self.postfix().items()}, refresh=False)
            bar.close()
            return
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
                values = "" if self.postfix is None else " ".join(f"{k}={v:.4g}" for k, v in self.postfix().items())
                logger.info(f"{self.desc} [{i}/{self.total}] {values} ({rate:.1f} it/s, eta {eta:.0f}s)")
