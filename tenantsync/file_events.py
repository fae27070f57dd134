"""inotify for the replicators, at no cost to the applications' writes.

A directory watch that includes IN_MODIFY (every watchfiles watch does) queues an inotify
event for every write an application makes to its WAL, queued inside that write call,
so a busy writer pays for every event in commits. Here directories are watched only for
names created, moved and deleted, and each watched ``-wal`` carries an IN_ONESHOT modify
watch, set again as soon as its event has been read: a busy database costs one event per
batch, an idle one nothing. The single-database CLI watches one
directory and one WAL; the fleet's watcher every directory that can hold tenants (down to
the glob's depth) and every known tenant's WAL.

Batches come out as ``(Change, path)`` pairs, so the watcher's rules for what counts as a
write do not depend on where events come from.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import time

from inotify_simple import INotify, flags

from .errors import TenantSyncError

_DIRECTORY = (flags.CREATE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE
              | flags.DELETE_SELF | flags.ONLYDIR)
_WAL = flags.MODIFY | flags.ONESHOT
_ADDED = flags.CREATE | flags.MOVED_TO
_GONE = flags.DELETE | flags.MOVED_FROM

log = logging.getLogger(__name__)


class Change(enum.Enum):
    """What happened to a path in a batch: created or moved in, written, or gone."""

    added = 1
    modified = 2
    deleted = 3


# Longest wait of the loops that read these events before they look at their stop flag.
STOP_CHECK = 0.1


class FileEvents:
    """Events under each base directory, down to the depth where databases live."""

    def __init__(self, roots: dict[str, int]):
        """``roots``: base directory → how many directory levels below it hold databases
        (``/data/*.db`` → 0, ``/data/*/app.db`` → 1)."""
        try:
            self._inotify = INotify()
        except OSError as e:
            raise TenantSyncError(f"cannot start inotify: {e.strerror} (a limit is "
                                  f"fs.inotify.max_user_instances)") from None
        self._dirs: dict[int, tuple[str, int]] = {}  # wd → (directory, levels left below it)
        self._wals: dict[int, str] = {}  # wd → -wal path with a one-shot watch
        self._armed: dict[str, int] = {}  # -wal path → its newest watch's wd
        # -wal paths past the kernel's watch limit, polled instead: path → (size, mtime_ns).
        self._polled: dict[str, tuple[int, int] | None] = {}
        self._limit_logged = False
        for base, depth in roots.items():
            self._watch_tree(base, depth, None)

    def arm(self, wal_path: str) -> bool:
        """Report the next write to ``wal_path`` (once); False if there is no such file,
        which is fine: its creation shows in its directory's events."""
        try:
            wd = self._inotify.add_watch(wal_path, _WAL)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            self._out_of_watches(e, wal_path)
            self._polled[wal_path] = _signature(wal_path)
            return True
        self._wals[wd] = wal_path
        self._armed[wal_path] = wd
        return True

    def rearm_missing(self, wal_paths) -> list[str]:
        """Watch those of ``wal_paths`` that exist but have no watch (nor are polled), and
        return them: a write to them may have gone unreported. The watcher's rescan calls
        this so that a lost watch cannot leave a tenant unreplicated until its WAL is
        recreated. Normally none: a WAL that appears is armed from its directory's event."""
        return [path for path in wal_paths
                if path not in self._armed and path not in self._polled and self.arm(path)]

    def read(self, timeout: float, debounce: float) -> set[tuple[Change, str]]:
        """The changes of the next batch: wait up to ``timeout`` for a first event, then
        ``debounce`` longer to take what follows it in the same batch."""
        changes: set[tuple[Change, str]] = set()
        # Not inotify_simple's read_delay: it only applies when the read had to wait, and a
        # busy WAL's re-armed watch has usually fired by the next read, which would then run
        # a pass per event instead of one per debounce.
        events = self._inotify.read(timeout=0) or self._inotify.read(timeout=int(timeout * 1000))
        if events and debounce > 0:
            time.sleep(debounce)
            events += self._inotify.read(timeout=0)
        for event in events:
            if event.wd in self._wals:
                path = self._wals[event.wd]
                if event.mask & flags.IGNORED:
                    del self._wals[event.wd]  # the one-shot watch fired, or the file went
                    if self._armed.get(path) == event.wd:
                        # The path's newest watch is gone. Usually its one-shot event is in
                        # this batch; but the kernel queues that event before it removes the
                        # watch, so a re-arm racing it can get the dying watch back (same wd)
                        # and no later write would be reported. Re-armed below; a write may
                        # have been missed meanwhile, so it counts as one.
                        del self._armed[path]
                        if (Change.modified, path) not in changes and os.path.exists(path):
                            changes.add((Change.modified, path))
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

    def _out_of_watches(self, error: OSError, path: str) -> None:
        """Past the kernel's watch limit: one error line, then WALs are polled at every
        batch instead. Any other failure is one line naming the path."""
        if error.errno != errno.ENOSPC:
            raise TenantSyncError(f"{path}: cannot watch: {error.strerror}") from None
        if not self._limit_logged:
            self._limit_logged = True
            log.error("inotify watch limit reached (fs.inotify.max_user_watches) at %s; WALs past "
                      "it are polled at every batch instead: raise the limit", path)

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
        except OSError as e:
            # Without it, databases appearing here are found by the watcher's rescan.
            self._out_of_watches(e, directory)
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
