"""Where a replica's objects live: the key layout of Litestream 0.5, in one place.

Litestream's two clients disagree on the level directory, and tenantsync must read
and write both exactly (checked against litestream v0.5.17 ``litestream.go``
LTXLevelDir, ``file/replica_client.go`` and ``s3/replica_client.go``):

- file: ``ltx/<level in decimal>/<min>-<max>.ltx``   (``ltx/0/…``, ``ltx/9/…``)
- s3:   ``<level as %04x>/<min>-<max>.ltx``, no ``ltx/`` segment  (``0000/…``, ``0009/…``)

``<min>-<max>`` is ``%016x-%016x`` (lowercase hex TXIDs), so sorting names sorts by
TXID. Keys here are relative to one database's replica root (a Storage, or a tenant's
child of one).
"""

from __future__ import annotations

import re

#: Level holding full snapshots (``min_txid == 1``); 0 is one file per sync pass and
#: 1..7 are time-aligned compactions of the level below.
SNAPSHOT_LEVEL = 9

#: Level of tenantsync's restore points: retention merges expiring L0 files into one file
#: per UTC second (never across the end of a compacted file or snapshot), so a restore to any second of the
#: retention window stays exact after the L0 files are gone. Every file here holds only
#: transactions of the second its header timestamp falls in. Litestream's restore plan
#: reads levels 0..8 alike, so it restores from these files too.
PITR_LEVEL = 8

#: The lease object Litestream's S3 leaser uses (``<path>/lock.json``).
LEASE_KEY = "lock.json"

_NAME = r"([0-9a-f]{16})-([0-9a-f]{16})\.ltx"
_KEY = {
    # Litestream formats the file level with strconv.Itoa: canonical decimal only.
    "file": re.compile(r"ltx/(0|[1-9][0-9]*)/" + _NAME),
    "s3": re.compile(r"([0-9a-f]{4})/" + _NAME),
}
_LEVEL_BASE = {"file": 10, "s3": 16}


def ltx_level_prefix(kind: str, level: int) -> str:
    """Key prefix (no trailing slash) of one level's LTX files for a ``kind`` backend."""
    if not 0 <= level <= SNAPSHOT_LEVEL:
        raise ValueError(f"invalid LTX level {level}: expected 0..{SNAPSHOT_LEVEL}")
    if kind == "file":
        return f"ltx/{level}"
    if kind == "s3":
        return f"{level:04x}"
    raise ValueError(f"unknown storage kind {kind!r}: expected 'file' or 's3'")


def ltx_key(kind: str, level: int, min_txid: int, max_txid: int) -> str:
    """Key of the LTX file covering TXIDs ``min_txid..max_txid`` at ``level``."""
    if not 1 <= min_txid <= max_txid < 1 << 64:
        raise ValueError(f"invalid TXID range {min_txid}..{max_txid}")
    return f"{ltx_level_prefix(kind, level)}/{min_txid:016x}-{max_txid:016x}.ltx"


def parse_ltx_key(kind: str, key: str) -> tuple[int, int, int] | None:
    """``(level, min_txid, max_txid)`` of an LTX key, or None for any other key.

    Anything that is not exactly an LTX file of a known level (lease, temp files,
    foreign files, an inverted or zero TXID range) is ignored rather than an error, as
    Litestream skips names it cannot parse.
    """
    if kind not in _KEY:
        raise ValueError(f"unknown storage kind {kind!r}: expected 'file' or 's3'")
    m = _KEY[kind].fullmatch(key)
    if m is None:
        return None
    level = int(m.group(1), _LEVEL_BASE[kind])
    min_txid, max_txid = int(m.group(2), 16), int(m.group(3), 16)
    if level > SNAPSHOT_LEVEL or not 1 <= min_txid <= max_txid:
        return None
    return level, min_txid, max_txid



#: Cold bundles (``bundle.py``): one object per archived state, named by its TXID. Neither
#: Litestream client parses this directory (not ``ltx/<n>``, not four hex digits), so its
#: restores and retention ignore it, as they ignore ``lock.json``.
BUNDLE_PREFIX = "bundle"
_BUNDLE = re.compile(BUNDLE_PREFIX + r"/([0-9a-f]{16})\.tsb")


def bundle_key(txid: int) -> str:
    """Key of the bundle holding the database at ``txid``: ``bundle/<txid %016x>.tsb``."""
    if not 1 <= txid < 1 << 64:
        raise ValueError(f"invalid bundle TXID {txid}")
    return f"{BUNDLE_PREFIX}/{txid:016x}.tsb"


def parse_bundle_key(key: str) -> int | None:
    """The TXID a bundle key names, or None for any other key (listings hold LTX files too)."""
    m = _BUNDLE.fullmatch(key)
    txid = int(m.group(1), 16) if m else 0
    return txid or None
