"""Storage in a local directory, laid out the way Litestream's file replica client does.

Durability and atomicity come from the file system: every object is written to a temp
file in its own directory, fsynced, then published with ``os.link`` (create-only, so
exactly one of N racing creators wins) or ``os.replace`` under an ``flock`` (compare and
swap), and the directory is fsynced so the new name survives a crash.

The temp and lock files start with ``.tenantsync``: they never match Litestream's LTX
file name pattern (so Litestream ignores them) and ``list`` hides them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import BinaryIO

from ..errors import ObjectNotFound, PreconditionFailed, StorageError
from .base import RESERVED_PREFIX, ObjectInfo, Storage, check_key, check_prefix, check_range, timestamp_ms

LOCK_NAME = RESERVED_PREFIX + ".lock"

# Errors that mean "there is no object at this path" (a missing file or directory, a
# directory where the key points, or a file where a parent directory should be).
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class FileStorage(Storage):
    """Objects as files under ``root_dir``; the key ``a/b`` is the file ``root_dir/a/b``.

    Unlike S3, a key cannot also be a directory of other keys: with ``a/b`` stored,
    ``a`` cannot be (the replica layout never needs both).
    """

    kind = "file"

    def __init__(self, root_dir: str | os.PathLike[str]):
        self.root = os.path.abspath(os.fspath(root_dir))

    @property
    def url(self) -> str:
        return "file://" + urllib.parse.quote(self.root)

    def make_root(self) -> None:
        """Create the root directory if it is missing, or raise StorageError naming it if it
        cannot be one (a regular file there, no permission). ``tenantsync watch`` calls this
        before anything else: otherwise each tenant's first sync would fail on its own, and
        the watcher would run on with nothing replicated."""
        try:
            _makedirs(self.root)
        except OSError as e:
            raise StorageError(f"{self}: cannot create the replica directory {self.root}: {e.strerror}") from e
        if not os.path.isdir(self.root):  # _makedirs takes an existing name as done
            raise StorageError(f"{self}: the replica root {self.root} is not a directory")

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def _child(self, prefix: str) -> FileStorage:
        return FileStorage(os.path.join(self.root, *prefix.split("/")))

    # -- list -----------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        head, _, _ = check_prefix(prefix).rpartition("/")
        start = self._path(head) if head else self.root
        for key, st in self._walk(start, head):
            if key.startswith(prefix):
                yield ObjectInfo(key, st.st_size, _etag(st), _mtime(st))

    def _walk(self, directory: str, dir_key: str) -> Iterator[tuple[str, os.stat_result]]:
        """Yield (key, stat) of regular files under ``directory`` in ascending key order.

        Sorting a directory's entries by name, with ``/`` appended to subdirectory names,
        puts every key below a subdirectory exactly where it belongs among its siblings,
        so recursing in that order yields globally sorted keys without collecting them.
        """
        try:
            with os.scandir(directory) as it:
                entries = [e for e in it if not e.name.startswith(RESERVED_PREFIX)]
        except _MISSING:
            return
        except OSError as e:
            raise StorageError(f"{self}: cannot list {directory}: {e.strerror}") from e
        entries.sort(key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        for entry in entries:
            key = f"{dir_key}/{entry.name}" if dir_key else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path, key)
            elif entry.is_file(follow_symlinks=False):
                try:
                    yield key, entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted since the directory was read

    # -- read -----------------------------------------------------------------------

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(start, length)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(-1 if length is None else length)
        except _MISSING as e:
            raise ObjectNotFound(f"{self}: {key}: object not found") from e
        except OSError as e:
            raise StorageError(f"{self}: cannot read {key}: {e.strerror}") from e

    # -- writes ---------------------------------------------------------------------

    def write_if_absent(self, key: str, data: bytes | BinaryIO, *, timestamp: datetime | None = None) -> str:
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            _makedirs(directory)
            with _TempFile(directory, data, _mtime_ns(timestamp)) as tmp:
                try:
                    os.link(tmp.path, path)
                except FileExistsError as e:
                    raise PreconditionFailed(f"{self}: {key}: already exists") from e
                tmp.unlink()  # before fstat: dropping the link count changes the ctime
                etag = _etag(os.fstat(tmp.fd))
            _fsync_dir(directory)
        except OSError as e:
            raise StorageError(f"{self}: cannot write {key}: {e.strerror}") from e
        return etag

    def write_if_match(
        self, key: str, data: bytes | BinaryIO, etag: str, *, timestamp: datetime | None = None
    ) -> str:
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            with _locked(directory):
                try:
                    st = os.stat(path)
                except _MISSING:
                    raise PreconditionFailed(f"{self}: {key}: does not exist") from None
                if _etag(st) != etag:
                    raise PreconditionFailed(f"{self}: {key}: etag is {_etag(st)}, not {etag}")
                mtime_ns = _mtime_ns(timestamp)
                if timestamp is None:
                    # Strictly increasing mtimes make every version's etag unique even
                    # when the inode number of an earlier version is reused.
                    mtime_ns = max(mtime_ns, st.st_mtime_ns + 1)
                with _TempFile(directory, data, mtime_ns) as tmp:
                    os.replace(tmp.path, path)
                    tmp.path = None
                    new_etag = _etag(os.fstat(tmp.fd))  # after the rename, which sets ctime
                _fsync_dir(directory)
        except _MISSING as e:  # the directory, hence the key, does not exist
            raise PreconditionFailed(f"{self}: {key}: does not exist") from e
        except OSError as e:
            raise StorageError(f"{self}: cannot write {key}: {e.strerror}") from e
        return new_etag

    def delete(self, keys: Iterable[str]) -> None:
        by_dir: dict[str, list[tuple[str, str]]] = {}
        for key in keys:
            path = self._path(key)
            by_dir.setdefault(os.path.dirname(path), []).append((key, path))
        for directory, items in by_dir.items():
            try:
                # Under the directory lock so a delete cannot fall between a concurrent
                # write_if_match's etag check and its rename (which would resurrect it).
                with _locked(directory):
                    for key, path in items:
                        with contextlib.suppress(*_MISSING):
                            os.unlink(path)
                    _fsync_dir(directory)
            except _MISSING:
                continue  # no directory, nothing to delete
            except OSError as e:
                raise StorageError(f"{self}: cannot delete {items[0][0]}: {e.strerror}") from e


class _TempFile:
    """A fully written, fsynced temp file next to its destination; removed on exit
    unless it was renamed away (``path`` set to None). ``fd`` stays open for fstat."""

    def __init__(self, directory: str, data: bytes | BinaryIO, mtime_ns: int):
        self.path: str | None = os.path.join(directory, f"{RESERVED_PREFIX}-{secrets.token_hex(8)}.tmp")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with open(self.fd, "wb", closefd=False) as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f)
            # Set before the file is published, so no reader ever sees another time.
            os.utime(self.fd, ns=(mtime_ns, mtime_ns))
            os.fsync(self.fd)
        except BaseException:
            self.__exit__()
            raise

    def unlink(self) -> None:
        if self.path is not None:
            os.unlink(self.path)
            self.path = None

    def __enter__(self) -> _TempFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            self.unlink()


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Exclusive flock on the directory's lock file: serialises compare-and-swap and
    delete in that directory across threads and processes (each call opens its own
    file description, so threads of one process exclude each other too)."""
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _mtime_ns(timestamp: datetime | None) -> int:
    """The mtime a new file gets. Litestream's file client sets it to the LTX timestamp
    (os.Chtimes, milliseconds) and reads it back as the file's creation time; without a
    timestamp it is the current time at full resolution (the kernel's own is coarser)."""
    return time.time_ns() if timestamp is None else timestamp_ms(timestamp) * 1_000_000


def _etag(st: os.stat_result) -> str:
    """Identity of one version of a file, stable while it is unchanged.

    Every write makes a new inode, but inode numbers are reused as soon as they are
    freed (ext4 alternates between two for a rewritten file), and an explicit timestamp
    fixes the mtime. The ctime, which only the kernel sets, still tells such versions
    apart unless two land within one clock tick; writes without a timestamp also get
    strictly increasing mtimes (see write_if_match).
    """
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}"


def _mtime(st: os.stat_result) -> datetime:
    seconds, ns = divmod(st.st_mtime_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc) + timedelta(microseconds=ns // 1000)


def _makedirs(directory: str) -> None:
    """``os.makedirs`` that also fsyncs each parent a directory was created in, so the
    path to a new object survives a crash as well as the object itself."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    _makedirs(parent)
    try:
        os.mkdir(directory)
    except FileExistsError:
        return
    _fsync_dir(parent)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
