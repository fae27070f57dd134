"""Letting idle things go, the same in both runtimes: open tenants are released by a
thread every ``tenantsync.process.RELEASE_EVERY`` seconds, and the niced storage process (a ``JobProcess`` child
in embedded mode, a ``-Q storage`` worker beside a ``--storage`` worker in fleet mode)
exits after STORAGE_IDLE_CLOSE seconds without a job: an idle fleet has no storage jobs,
so a whole Python process with its own Fleet would be kept for nothing until the next
compaction round starts it again (its size: docs/BENCHMARKS.md)."""

from __future__ import annotations

import threading
import time
from typing import Callable

# Compaction is CPU work: niced, so the syncing processes win when cores are short.
STORAGE_NICE = 10
STORAGE_IDLE_CLOSE = 30.0


class IdleClock:
    """How many jobs are running, and since when none has."""

    def __init__(self) -> None:
        self._running = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def begin(self) -> None:
        with self._lock:
            self._running += 1

    def end(self) -> None:
        with self._lock:
            self._running -= 1
            self._last = time.monotonic()

    def idle_for(self, seconds: float) -> bool:
        """Whether no job has run for ``seconds``."""
        with self._lock:
            return not self._running and time.monotonic() - self._last >= seconds


def watch_idle(idle: float, check: Callable[[], bool], stop: threading.Event, name: str) -> threading.Thread:
    """A daemon thread calling ``check`` a few times per ``idle`` seconds (at least every
    5 s) until it returns True or ``stop`` is set."""
    def watch() -> None:
        while not stop.wait(min(5.0, idle / 4)):
            if check():
                return

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    return thread
