"""Wake the single-database replicator when its database changes, at no cost to the
application's writes in between.

A plain inotify watch (watchfiles sets one on the whole directory) queues an event for
every write the application makes to its WAL; at tens of thousands of commits a second that
alone took about 30 % of the application's write throughput on the benchmark machine (see
docs/BENCHMARKS.md, "Diagnosis: write throughput"). So the database and its WAL are watched
with IN_ONESHOT: the first write after a pass wakes us and removes the watch, and the next
wait sets it again, so a busy application pays for one event per pass. The directory is
watched only for names appearing, moving and going (the WAL created, the database
replaced), which the application's commits never cause.
"""

from __future__ import annotations

import os

from inotify_simple import INotify, flags

_DIRECTORY = flags.CREATE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE
_FILE = flags.MODIFY | flags.ATTRIB | flags.ONESHOT


class FileEvents:
    """One-shot change notification for a database file and its ``-wal``."""

    def __init__(self, db_path: str):
        self._files = (db_path, db_path + "-wal")
        self._names = {os.path.basename(p) for p in self._files}
        self._inotify = INotify()
        self._directory = self._inotify.add_watch(os.path.dirname(db_path), _DIRECTORY)

    def wait(self, timeout: float, debounce: float) -> bool:
        """Block until either file changes (then ``debounce`` longer, to take a burst of
        commits in one pass) or ``timeout`` passes; True if something changed."""
        for path in self._files:
            try:
                self._inotify.add_watch(path, _FILE)
            except FileNotFoundError:
                pass  # not there yet: its creation shows in the directory's events
        events = self._inotify.read(timeout=int(timeout * 1000), read_delay=int(debounce * 1000))
        return any(e.wd != self._directory or e.name in self._names
                   for e in events if not e.mask & flags.IGNORED)

    def close(self) -> None:
        self._inotify.close()
