"""SIGINT/SIGTERM/SIGHUP: the first asks the loop to stop after the current step (and save); a second
SIGINT raises KeyboardInterrupt at once. (SIGHUP: the terminal or ssh session closed.) Checkpoint writes are atomic, so neither corrupts a file.

`timeout`, Slurm's scancel, systemd and Ctrl-C signal the whole process group, DataLoader workers
included. Those signals are the main process's to act on: workers ignore them (`ignore_in_worker`),
else a worker dies of the signal and torch raises `DataLoader worker ... killed by signal` in the
main process wherever it is, instead of the stop handler saving a checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignal:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignal":
        for signum in STOP_SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
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

    def finish(self) -> None:
        """Training has finished and its last checkpoint is written: from here on SIGINT/SIGTERM are
        ignored, so a late one (a scheduler's time limit, Ctrl-C during the summary) cannot turn the
        completed run into exit 130/143."""
        for signum in STOP_SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, signal.SIG_IGN)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@contextmanager
def deferred_in_children() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread while DataLoader workers are forked.

    A child inherits the mask, so a signal sent to the group before the worker ran `ignore_in_worker`
    stays pending there (and ignoring it discards it) instead of killing it. Here, a signal that
    arrived meanwhile is delivered when the block ends, to whatever handler is installed.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_in_worker() -> None:
    """In a DataLoader worker: leave SIGINT/SIGTERM sent to the process group to the main process, which
    stops the workers itself (a worker that really dies, of SIGKILL or the OOM killer, is still an error).

    SIGTERM from the main process itself is still obeyed: multiprocessing terminates daemon workers
    at exit and then waits for them, forever if they ignored it. Python handlers cannot see who sent a
    signal, so SIGTERM stays blocked and a thread takes it with its sender (torch's own worker handler
    draws the same line).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGHUP})
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # also without deferred_in_children
    parent = os.getppid()

    def obey_parent_only() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)  # a clean exit, like torch's handler: a signal death would be reported as a failure

    threading.Thread(target=obey_parent_only, name="sigterm-from-parent", daemon=True).start()
