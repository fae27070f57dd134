"""The storage contract every backend implements: five operations on flat keys, and a
sixth for erasure (``delete_all_versions``).

Everything above this layer (replica layout, leases, retention, restore) is written
against these calls only, so a backend is correct when it passes the one contract
suite in ``tests/test_storage.py``. Keys are ``/``-separated and relative to the storage
root; the same key validation runs on every backend so that a key accepted on S3 is
also safe as a file path (a hostile tenant name can never escape the root).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import BinaryIO

from ..errors import StorageError

#: Names starting with this are the file backend's temp and lock files. They are
#: reserved on every backend so that both accept exactly the same keys.
RESERVED_PREFIX = ".tenantsync"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as listed. ``modified`` is UTC-aware: the file's mtime (the
    LTX timestamp when one was given) or S3's LastModified (upload time, whole seconds)."""

    key: str
    size: int
    etag: str
    modified: datetime


class Storage(abc.ABC):
    """A flat key/value object store rooted at ``url``.

    ``kind`` is ``"file"`` or ``"s3"``: Litestream 0.5 lays replicas out differently per
    backend, so ``layout.py`` needs to know which one it is writing for.
    """

    url: str
    kind: str

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``, in ascending key order.

        ``prefix`` is a plain string prefix as on S3 (``"ltx/1"`` also matches
        ``"ltx/10/…"``; end it with ``/`` to mean a directory). A missing prefix, or a
        root that does not exist yet, yields nothing; it is not an error. Pagination is
        internal: callers see one iterator however many keys there are.
        """

    @abc.abstractmethod
    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes, or ``length`` bytes from offset ``start``.

        The result is shorter than ``length`` when the object ends first and empty when
        ``start`` is at or past its end. Ranged reads let a restore fetch an LTX header
        or one page without downloading the file.

        Raises ObjectNotFound if the key does not exist, and ValueError for a negative
        ``start`` or a ``length`` below 1 (S3 cannot express an empty range).
        """

    @abc.abstractmethod
    def write_if_absent(
        self, key: str, data: bytes | BinaryIO, *, timestamp: datetime | None = None
    ) -> str:
        """Create ``key`` with ``data`` and return its etag; never overwrite.

        Atomic against concurrent writers: of N racing calls exactly one succeeds, the
        others raise PreconditionFailed, and readers never see a partial object. This is
        what makes each TXID range writable only once.

        ``data`` is bytes or a binary file positioned at the start of the content (seekable,
        so the S3 client can resend it on a retry). ``timestamp`` (timezone-aware) is the
        LTX file's creation time, stored where Litestream looks for it (file mtime, S3
        ``litestream-timestamp`` metadata), truncated to milliseconds as in the LTX header.

        Raises PreconditionFailed if the key exists. On S3, if a request timed out and the
        client resent it, PreconditionFailed can mean the first attempt won: callers
        re-read the object and compare before treating it as someone else's.
        """

    @abc.abstractmethod
    def write_if_match(
        self, key: str, data: bytes | BinaryIO, etag: str, *, timestamp: datetime | None = None
    ) -> str:
        """Replace ``key`` only if its current etag is ``etag``; return the new etag.

        This is compare-and-swap for small shared objects (the lease): of N callers
        holding the same etag at most one succeeds. Raises PreconditionFailed if the etag
        differs or the key does not exist (there is nothing to compare with). S3 etags
        are the content's MD5, so rewriting identical bytes keeps the etag: callers that
        need every write to be distinguishable put something unique in the content.
        """

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``; keys that do not exist are ignored, so it is safe to repeat.

        Batched where the backend allows it (S3 DeleteObjects, 1000 keys a request).
        """

    def delete_all_versions(self, prefix: str) -> int:
        """Delete every stored version of every object whose key starts with ``prefix``, the
        current ones included, and every delete marker; return how many were removed.

        This is erasure, not cleanup: afterwards nothing under ``prefix`` can be read back,
        listed, or restored from the bucket's history (``keys.shred`` deletes the objects
        first, so what it removes here are their old versions and delete markers).
        ``prefix`` is a string prefix as in ``list``: end it with ``/`` to mean a directory.
        A backend that keeps no versions (file://) holds only the current objects: they
        are what this deletes (by default, as ``delete`` would), so once they are deleted
        there is nothing left to remove and it returns 0.

        Raises StorageError naming the key if the backend refuses to delete one (an S3
        object lock, a policy denying version deletion); what it could delete stays deleted.
        """
        keys = [info.key for info in self.list(check_prefix(prefix))]
        self.delete(keys)
        return len(keys)

    def child(self, prefix: str) -> Storage:
        """The same backend scoped under ``prefix``: its keys are ``prefix/<key>`` here.

        One URL holds many tenants' replicas; each tenant gets a child storage so the
        layout code never deals with tenant names. ``prefix`` is validated like a key.
        """
        return self._child(check_key(prefix))

    @abc.abstractmethod
    def _child(self, prefix: str) -> Storage:
        """Build the scoped storage for an already validated ``prefix``."""

    def __str__(self) -> str:
        return self.url

    def object_url(self, key: str) -> str:
        """The URL of one object, for messages: the key goes before any query string,
        so the text can be pasted into ``tenantsync ltx dump``."""
        base, sep, query = self.url.partition("?")
        return f"{base.rstrip('/')}/{key}{sep}{query}"


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise StorageError naming it.

    Rejected: empty keys, absolute keys, empty / ``.`` / ``..`` segments, NUL bytes, and
    segments starting with ``.tenantsync`` (reserved for the file backend's own files).
    """
    if not isinstance(key, str) or not key:
        raise StorageError(f"invalid storage key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise StorageError(f"invalid storage key {key!r}: must be relative, not absolute")
    if "\0" in key:
        raise StorageError(f"invalid storage key {key!r}: contains a NUL byte")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise StorageError(f"invalid storage key {key!r}: empty, '.' or '..' path segment")
        if segment.startswith(RESERVED_PREFIX):
            raise StorageError(f"invalid storage key {key!r}: names starting with {RESERVED_PREFIX!r} are reserved")
    return key


def check_prefix(prefix: str) -> str:
    """Return a list prefix: empty, or a valid key optionally ending with one ``/``."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def check_range(start: int, length: int | None) -> None:
    """Reject ranges no backend can serve the same way (see Storage.read)."""
    if start < 0:
        raise ValueError(f"read start must be >= 0, got {start}")
    if length is not None and length < 1:
        raise ValueError(f"read length must be >= 1 or None, got {length}")


def timestamp_ms(timestamp: datetime) -> int:
    """Milliseconds since the epoch: the resolution of the LTX header's timestamp."""
    if timestamp.tzinfo is None or timestamp.utcoffset() is None:
        raise ValueError(f"timestamp must be timezone-aware, got {timestamp!r}")
    return (timestamp - _EPOCH) // timedelta(milliseconds=1)

