"""The single-database replicator: a loop of sync passes driven by file events.

A change to the database or its WAL wakes a pass within ``debounce`` (one-shot inotify
watches, see ``file_events.py``); a timeout of ``interval`` runs a pass anyway, so a missed
event delays replication by at most that. Transient storage errors are logged and retried
on the next pass; nothing is skipped because the position only advances after an upload
succeeded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from .capture import Capture, SyncResult
from .errors import ReplicaConflict, StorageError
from .file_events import STOP_CHECK, FileEvents
from .replica import Replica
from .state import default_state_path, load_position, save_position

log = logging.getLogger(__name__)

# After a checkpoint of a busy WAL: long enough for the application to restart the WAL,
# well short of the thousand commits after which our read-lock 0 starts to slow it.
FOLLOW_UP = 0.005


def run(
    db_path: str,
    replica: Replica,
    stop: threading.Event,
    *,
    interval: float = 1.0,
    debounce: float = 0.05,
    report: Callable[[SyncResult], None] = lambda r: None,
    state_path: str | None = None,
) -> None:
    """Replicate until ``stop`` is set, then ship what is committed and return.

    On the way out the WAL is checkpointed under our barrier and the position saved, so
    the next start resumes incrementally instead of uploading the database again.
    """
    state_path = state_path or default_state_path(db_path)
    capture = Capture(
        db_path,
        replica,
        position=load_position(state_path),
        on_position=lambda p: save_position(state_path, p),
    )
    try:
        # Watching before the first pass: a commit landing during it wakes the next one.
        events = FileEvents({os.path.dirname(capture.path): 0})
        events.arm(capture.wal_path)
        try:
            _pass(capture.sync_once, capture.path, report)
            _follow(capture, events, stop, interval, debounce, report)
        finally:
            events.close()
        _pass(capture.release, capture.path, report)
    finally:
        capture.close()


def _follow(capture: Capture, events: FileEvents, stop: threading.Event, interval: float,
            debounce: float, report: Callable[[SyncResult], None]) -> None:
    """Run a pass on every change and at least every ``interval`` until ``stop``."""
    due = time.monotonic() + interval
    while not stop.is_set():
        # Waits are cut into short slices so that ``stop`` is seen promptly.
        changed = _touches(events.read(min(STOP_CHECK, max(0.0, due - time.monotonic())), debounce),
                           (capture.path, capture.wal_path))
        if not changed and time.monotonic() < due:
            continue
        result = _pass(capture.sync_once, capture.path, report)
        # A commit the pass found not yet counted by SQLite (Capture._await_indexing) gets
        # its pass now, not at the next interval.
        if result is not None and (result.follow_up or capture.commit_unindexed) and not stop.wait(FOLLOW_UP):
            _pass(capture.sync_once, capture.path, report)
        due = time.monotonic() + interval


def _touches(changes, paths) -> bool:
    """Whether a batch of events concerns the database or its WAL (not its neighbours)."""
    return any(path in paths for _, path in changes)


def _pass(step: Callable[[], SyncResult], path: str,
          report: Callable[[SyncResult], None]) -> SyncResult | None:
    """One pass, reported if it shipped; None if it failed (logged, retried by the next)."""
    try:
        result = step()
    except ReplicaConflict as e:
        log.warning("%s", e)
        return None
    except StorageError as e:
        log.warning("%s: sync failed, will retry: %s", path, e)
        return None
    if result.txid is not None:
        report(result)
    return result
