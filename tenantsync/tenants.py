"""Tenant discovery: which files a glob names, and the tenant name each one gets.

A tenant's name is its path relative to the glob's fixed base directory
(``/data/*.db`` → ``acme.db``; ``/data/*/app.db`` → ``acme/app.db``). The name is also
the tenant's replica prefix under the replica URL, so it must never escape that
prefix: every segment is checked here, once, before anything is written.
"""

from __future__ import annotations

import glob as globmod
import logging
import os
import re
import zlib
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .errors import InvalidArgument, NotATenant

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SIDE_SUFFIXES = ("-wal", "-shm", "-journal", "-tenantsync.json")
# The first 16 bytes of every SQLite database file (https://www.sqlite.org/fileformat.html).
SQLITE_MAGIC = b"SQLite format 3\x00"


def header_page_size(head: bytes) -> int | None:
    """The page size a SQLite database header (its first 100 bytes) gives, or None if
    ``head`` is no such header or names no valid page size (bytes 16-17; 1 means 65536)."""
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return None
    size = int.from_bytes(head[16:18], "big")
    size = 65536 if size == 1 else size
    return size if 512 <= size <= 65536 and not size & (size - 1) else None


def shard(name: str, shards: int) -> int:
    """Which of ``shards`` processes serves tenant ``name``: all of a tenant's jobs must
    reach the one process holding its open capture, read mark and lease. A stable hash
    (crc32, not Python's per-process salted ``hash``) gives the same answer everywhere."""
    return zlib.crc32(name.encode()) % shards if shards > 1 else 0


class BadTenantName(InvalidArgument):
    """A name cannot be a tenant's: it could not be used as a replica prefix."""


@dataclass(frozen=True)
class Pattern:
    """One watch glob split into its fixed base directory and its wildcard part."""

    glob: str
    base: str

    @classmethod
    def parse(cls, pattern: str) -> "Pattern":
        pattern = os.path.abspath(pattern)
        parts = pattern.split(os.sep)
        fixed = []
        for part in parts[:-1]:
            if globmod.has_magic(part):
                break
            fixed.append(part)
        return cls(pattern, os.sep.join(fixed) or os.sep)

    def matches(self, path: str) -> bool:
        """Glob semantics, as ``scan`` finds files: a wildcard never matches across a
        ``/`` (fnmatch's does: ``/data/*.db`` matches ``/data/lnk/o.db``)."""
        parts, wanted = path.split(os.sep), self.glob.split(os.sep)
        return len(parts) == len(wanted) and all(fnmatchcase(p, w) for p, w in zip(parts, wanted))

    def name_of(self, path: str) -> str:
        # A normalised path below the base (as glob gives them) is cut at the base's length:
        # relpath makes both paths absolute and compares them part by part, for every file
        # of the fleet at every rescan.
        prefix = self.base if self.base.endswith(os.sep) else self.base + os.sep
        if path.startswith(prefix) and os.path.normpath(path) == path:
            return check_name(path[len(prefix):])
        return check_name(os.path.relpath(path, self.base))


def patterns(globs) -> list[Pattern]:
    """A fleet's globs (``Config.globs``) parsed, as every part that names or finds tenants
    uses them."""
    return [Pattern.parse(g) for g in globs]


def check_name(name: str) -> str:
    """Return ``name`` if every segment is a safe object-key segment, else raise.
    (``fullmatch``: ``$`` also matches before a final newline, which would let ``x.db\\n`` in.)"""
    if not isinstance(name, str) or len(name) > 255 or not all(_SEGMENT.fullmatch(s) for s in name.split(os.sep)):
        raise BadTenantName(
            f"tenant name {name!r} is not allowed (segments of letters, digits, '.', '_', '-', "
            f"not starting with a punctuation mark, at most 255 characters)"
        )
    return "/".join(name.split(os.sep))


def locate(patterns: list[Pattern], name: str) -> str:
    """The local path of tenant ``name`` in a fleet watching ``patterns``, or raise.

    A name given by a caller (an HTTP request, a command) is only a tenant if it passes
    the name rules, its path under a glob's directory matches that glob, and reaching it
    does not leave that directory through a symbolic link, nor is it a link itself: the
    API could otherwise hydrate and then archive (delete) any SQLite file the process can
    reach. Nothing is touched here."""
    name = check_name(name)
    for pattern in patterns:
        path = os.path.join(pattern.base, *name.split("/"))
        if pattern.matches(path) and not is_side_file(path):
            check_inside(pattern, path)
            return path
    globs = ", ".join(p.glob for p in patterns) or "none configured"
    raise NotATenant(f"tenant {name!r}: not a tenant of this fleet (its globs: {globs})")


def check_inside(pattern: Pattern, path: str, inside: dict[str, bool] | None = None) -> None:
    """Raise NotATenant if ``path`` is a symbolic link or is reached through one below
    ``pattern``'s directory (the directory itself may be a link: that is the operator's
    choice of where the data lives). ``inside`` keeps each directory's answer for the
    rest of one scan: a directory holds thousands of tenants, and resolving it is a
    system call per path component."""
    directory = os.path.dirname(path)
    known = None if inside is None else inside.get(directory)
    if known is None:
        relative = os.path.relpath(directory, pattern.base)
        expected = os.path.normpath(os.path.join(os.path.realpath(pattern.base), relative))
        known = os.path.realpath(directory) == expected
        if inside is not None:
            inside[directory] = known
    if not known:
        raise NotATenant(f"{path}: leaves {pattern.base} through a symbolic link; not a tenant")
    if os.path.islink(path):
        raise NotATenant(f"{path}: is a symbolic link to {os.path.realpath(path)}; not a tenant")


def is_side_file(path: str) -> bool:
    return path.endswith(SIDE_SUFFIXES) or os.path.basename(path).startswith(".")


def scan(patterns: list[Pattern]) -> tuple[dict[str, str], dict[str, str]]:
    """Every matching database now: ({name: path}, {path: problem}) for what was skipped
    (symbolic links among them)."""
    found: dict[str, str] = {}
    problems: dict[str, str] = {}
    for pattern in patterns:
        inside: dict[str, bool] = {}
        for path in globmod.iglob(pattern.glob):
            if is_side_file(path):
                continue
            if os.path.islink(path):
                # SQLite keeps the -wal and -shm beside the link's target, where no watch
                # is: only the first snapshot would ship.
                problems[path] = f"a symbolic link to {os.path.realpath(path)}: watch the target's path instead"
                continue
            if not os.path.isfile(path):
                continue
            try:
                name = pattern.name_of(path)
                check_inside(pattern, path, inside)
            except (BadTenantName, NotATenant) as e:
                problems[path] = str(e)
                continue
            if name in found and found[name] != path:
                problems[path] = f"tenant name {name!r} is already used by {found[name]}"
                continue
            found[name] = path
    return found, problems
