"""Fencing: a host meeting a tenant that another host took over while it was gone.

A host cut off (or dead) for longer than its leases lets another host hydrate its tenants
and write their replicas on. When it comes back and takes a tenant's lease over from that
host, its copy is behind the replica and may also hold commits the replica never got. It
must neither upload it (a full snapshot of it would write over the other host's commits)
nor delete it. ``moved_on`` is that check, made only on a lease taken over from another
owner (so it costs nothing in steady state): every L0 file names the database file it was
read from in the LTX header's node id (``file_node_id``; compaction keeps its newest
input's), so the newest file says whether the commits past this copy's position came from
another copy. The fleet then gives the lease back, closes the tenant unshipped, moves its
files aside (``move_aside``) and records the fenced copy in the catalogue
(catalogue_fenced.py) until an operator decides.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from datetime import datetime, timezone

from .errors import Fenced

SIDE_FILES = ("-wal", "-shm")


def file_node_id(stat: os.stat_result) -> int:
    """The identity of a database file, as the node id of every L0 file read from it: a
    hash of the machine and the file's device and inode, never 0 (which Litestream writes).
    Two processes replicating one file (two watchers on one machine, taking turns with the
    lease) write the same id; a copy restored on another host writes its own."""
    digest = hashlib.sha256(f"{_machine()}:{stat.st_dev}:{stat.st_ino}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1 or 1


def moved_on(capture, name: str, owner: str) -> Fenced | None:  # noqa: ANN001 - a Capture
    """After taking tenant ``name``'s lease over from ``owner``: Fenced if the replica holds
    TXIDs past ``capture``'s position (a copy never replicated here counts as at 0) read
    from another database file than this one, else None. Two requests (the listing, the
    newest file's header), on a handover only. Files naming no node (0: written by
    Litestream, or compacted from such files) are taken as this copy's, as before."""
    files = capture.replica.all_files()
    # The newest file; of files ending at one TXID, the lowest level's (an L0 names its writer).
    newest = max((f[-1] for f in files.values() if f), key=lambda i: (i.max_txid, -i.level), default=None)
    mine = capture.position.txid if capture.position is not None else 0
    if newest is None or newest.max_txid <= mine:
        return None
    node = capture.replica.read_header(newest).node_id
    if node in (0, _node_of(capture)):
        return None
    return Fenced(f"tenant {name}: {owner} wrote its replica up to txid {newest.max_txid:016x} from another copy "
                  f"than this host's (at txid {mine:016x}) after taking it over: fenced, nothing of it uploaded")


def _node_of(capture) -> int:  # noqa: ANN001 - a Capture
    """The capture's file's node id: known once it opened the file, else from a stat."""
    if capture.node_id:
        return capture.node_id
    try:
        return file_node_id(os.stat(capture.path))
    except FileNotFoundError:
        return 0


@functools.cache
def _machine() -> str:
    """This machine's id (systemd's /etc/machine-id), or its host name without one."""
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def move_aside(path: str, why: str) -> tuple[str, list[tuple[str, str]]]:
    """Rename the database at ``path`` and its side files to ``.NAME.WHY-TIME`` beside it
    (a name no tenant glob matches); the first element is the new name of the database."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{why}-{stamp}"
    moved = []
    for suffix in ("", *SIDE_FILES):
        if os.path.exists(path + suffix):
            os.rename(path + suffix, aside + suffix)
            moved.append((path + suffix, aside + suffix))
    return aside, moved


def move_back(aside: tuple[str, list[tuple[str, str]]]) -> None:
    """Undo :func:`move_aside`: each file it moved goes back unless its place is taken."""
    for original, moved in aside[1]:
        if not os.path.exists(original):
            os.rename(moved, original)
