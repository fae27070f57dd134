"""Tries of one storage request: exponential backoff with full jitter, more patience for
a store that says it is overloaded, and a cap on the time an operation spends.

The S3 backend sends each try itself (its HTTP pool never retries) so that this is
the one place deciding: it knows which tries may have reached the store (a conditional
write must then be checked, not resent blindly) and gives up with one line saying what
happened, how many times and over how long.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import StorageUnavailable
from .options import StorageOptions

T = TypeVar("T")

# First backoff ceiling after a failed try, and after a throttled one (S3 asks clients to
# slow down by whole factors, so throttles start higher); each further try doubles it.
FAILED_BASE = 0.1
THROTTLED_BASE = 0.2
# No single wait is longer than this, unless the store's Retry-After asks for more.
MAX_DELAY = 5.0


class Transient(Exception):
    """One try failed in a way the next may not. ``what`` is one line for the message,
    ``throttled`` whether the store asked us to slow down, ``retry_after`` its Retry-After
    in seconds, ``reached`` whether the request may have been applied before it failed
    (False only when it certainly was not: refused, or answered with a throttle)."""

    def __init__(self, what: str, *, throttled: bool = False, retry_after: float | None = None,
                 reached: bool = True):
        super().__init__(what)
        self.what, self.throttled, self.retry_after, self.reached = what, throttled, retry_after, reached


class Tries:
    """The tries of one operation; ``reached`` tells the caller, between tries, whether an
    earlier try may have been applied by the store."""

    def __init__(self, options: StorageOptions, where: str, endpoint: str):
        self.options, self.where, self.endpoint = options, where, endpoint
        self.reached = False
        self._failed = self._throttled = 0
        self._start = time.monotonic()

    def run(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` until it returns or raises anything but Transient; StorageUnavailable
        once the tries or the time allowed are used up."""
        while True:
            try:
                return attempt()
            except Transient as e:
                self.reached = self.reached or e.reached
                delay = self._delay(e)
                if delay is None:
                    raise self._gave_up(e) from e
                time.sleep(delay)

    def _delay(self, failure: Transient) -> float | None:
        """The wait before the next try, or None when there is to be none."""
        if failure.throttled:
            self._throttled += 1
            count, most, base = self._throttled, self.options.throttled_attempts, THROTTLED_BASE
        else:
            self._failed += 1
            count, most, base = self._failed, self.options.attempts, FAILED_BASE
        if count >= most:
            return None
        delay = random.uniform(0, min(MAX_DELAY, base * 2 ** (count - 1)))  # full jitter
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        if time.monotonic() - self._start + delay > self.options.retry_time:
            return None
        return delay

    def _gave_up(self, last: Transient) -> StorageUnavailable:
        tries = self._failed + self._throttled
        elapsed = time.monotonic() - self._start
        return StorageUnavailable(
            f"{self.where}: {last.what} ({self.endpoint}; {tries} {'try' if tries == 1 else 'tries'}"
            f" over {elapsed:.1f} s)"
        )
