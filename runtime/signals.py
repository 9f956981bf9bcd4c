"""SIGINT/SIGTERM: the first asks the loop to stop after the current step (and save); a second
SIGINT raises KeyboardInterrupt at once. Checkpoint writes are atomic, so neither corrupts a file.
"""
from __future__ import annotations

import signal


class StopSignal:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignal":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            # The next Ctrl-C stops at once.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
