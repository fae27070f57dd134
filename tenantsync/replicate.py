"""The single-database replicator: a loop of sync passes driven by WAL file events.

inotify (through watchfiles) wakes a pass within ``debounce`` of a commit; a timeout of
``interval`` runs a pass anyway, so a missed event delays replication by at most that.
Transient storage errors are logged and retried on the next pass; nothing is skipped
because the position only advances after an upload succeeded.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import watchfiles

from .capture import Capture, ReplicaConflict, SyncResult
from .errors import StorageError
from .replica import Replica
from .state import default_state_path, load_position, save_position

log = logging.getLogger(__name__)


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
    watched = {capture.path, capture.wal_path}
    _pass(capture.sync_once, capture.path, report)
    try:
        for _ in watchfiles.watch(
            os.path.dirname(capture.path),
            watch_filter=lambda _change, path: path in watched,
            debounce=int(debounce * 1000),
            step=max(1, int(debounce * 1000) // 4),
            rust_timeout=int(interval * 1000),
            yield_on_timeout=True,
            stop_event=stop,
            raise_interrupt=False,
        ):
            _pass(capture.sync_once, capture.path, report)
        _pass(capture.release, capture.path, report)
    finally:
        capture.close()


def _pass(step: Callable[[], SyncResult], path: str, report: Callable[[SyncResult], None]) -> None:
    try:
        result = step()
    except ReplicaConflict as e:
        log.warning("%s", e)
        return
    except StorageError as e:
        log.warning("%s: sync failed, will retry: %s", path, e)
        return
    if result.txid is not None:
        report(result)
