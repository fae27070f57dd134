"""File events for the watcher, at no cost to the tenants' own writes.

A directory watch that includes IN_MODIFY (every watchfiles watch does) queues an inotify
event for every write any tenant's application makes to its WAL; beside a single busy
writer that alone cost it 25-30 % of its commits (docs/BENCHMARKS.md, run 5). Here the
directories that can hold tenants are watched only for names created, moved and deleted,
and each known tenant's ``-wal`` carries an IN_ONESHOT modify watch, set again once it has
fired and been reported: a busy tenant costs one event per batch, an idle one nothing.

Batches come out as watchfiles-style ``(Change, path)`` pairs, so the watcher's rules for
what counts as a write do not depend on where events come from.
"""

from __future__ import annotations

import errno
import logging
import os

from inotify_simple import INotify, flags
from watchfiles import Change

_DIRECTORY = (flags.CREATE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE
              | flags.DELETE_SELF | flags.ONLYDIR)
_WAL = flags.MODIFY | flags.ONESHOT
_ADDED = flags.CREATE | flags.MOVED_TO
_GONE = flags.DELETE | flags.MOVED_FROM

log = logging.getLogger(__name__)


class TenantEvents:
    """Events under each base directory, down to the depth where tenant files live."""

    def __init__(self, roots: dict[str, int]):
        """``roots``: base directory → how many directory levels below it hold tenants
        (``/data/*.db`` → 0, ``/data/*/app.db`` → 1)."""
        self._inotify = INotify()
        self._dirs: dict[int, tuple[str, int]] = {}  # wd → (directory, levels left below it)
        self._wals: dict[int, str] = {}  # wd → -wal path with a one-shot watch
        # -wal paths past the kernel's watch limit, polled instead: path → (size, mtime_ns).
        self._polled: dict[str, tuple[int, int] | None] = {}
        for base, depth in roots.items():
            self._watch_tree(base, depth, None)

    def arm(self, wal_path: str) -> None:
        """Report the next write to ``wal_path`` (once). A missing WAL is fine: its
        creation shows in its directory's events."""
        try:
            self._wals[self._inotify.add_watch(wal_path, _WAL)] = wal_path
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            if not self._polled:
                log.error("inotify watch limit reached (fs.inotify.max_user_watches); the WALs of "
                          "tenants past it are polled at every batch instead: raise the limit")
            self._polled[wal_path] = _signature(wal_path)

    def read(self, timeout: float, debounce: float) -> set[tuple[Change, str]]:
        """The changes of the next batch: wait up to ``timeout`` for a first event, then
        ``debounce`` longer to take what follows it in the same batch."""
        changes: set[tuple[Change, str]] = set()
        for event in self._inotify.read(timeout=int(timeout * 1000), read_delay=int(debounce * 1000)):
            if event.wd in self._wals:
                path = self._wals[event.wd]
                if event.mask & flags.IGNORED:
                    del self._wals[event.wd]  # the one-shot watch fired, or the file went
                elif event.mask & flags.MODIFY:
                    changes.add((Change.modified, path))
            elif event.wd in self._dirs:
                self._directory_event(event, changes)
        for path, seen in self._polled.items():
            now = _signature(path)
            if now != seen:
                self._polled[path] = now
                if now is not None:
                    changes.add((Change.modified, path))
        for change, path in changes:
            if path.endswith("-wal") and change != Change.deleted and path not in self._polled:
                self.arm(path)
        return changes

    def close(self) -> None:
        self._inotify.close()

    def _directory_event(self, event, changes: set) -> None:
        directory, below = self._dirs[event.wd]
        if event.mask & (flags.IGNORED | flags.DELETE_SELF):
            self._dirs.pop(event.wd, None)
            return
        path = os.path.join(directory, event.name)
        if event.mask & flags.ISDIR:
            if event.mask & _ADDED and below > 0:
                # Files may have been created before the watch: report them as added.
                self._watch_tree(path, below - 1, changes)
            return
        if event.mask & _ADDED:
            changes.add((Change.added, path))
        elif event.mask & _GONE:
            changes.add((Change.deleted, path))

    def _watch_tree(self, directory: str, below: int, changes: set | None) -> None:
        """Watch ``directory`` and its subdirectories ``below`` levels down; report the
        files already in them as added when ``changes`` is given (a directory that just
        appeared: the watcher's rules decide whether they are tenants)."""
        try:
            self._dirs[self._inotify.add_watch(directory, _DIRECTORY)] = (directory, below)
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if below > 0:
                    self._watch_tree(entry.path, below - 1, changes)
            elif changes is not None:
                changes.add((Change.added, entry.path))


def _signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
