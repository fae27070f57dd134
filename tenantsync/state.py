"""A capture position kept in a small JSON file beside the database.

The single-database CLI has no catalogue, so this is what lets ``tenantsync replicate``
resume after a restart without uploading the database again. It is a hint, not the
truth: the replica is checked against it on first use, and the write-if-absent on the
next TXID catches a stale one. So it is replaced atomically but not fsynced.
"""

from __future__ import annotations

import json
import logging
import os

from .position import Position

log = logging.getLogger(__name__)


def default_state_path(db_path: str) -> str:
    """``.NAME-tenantsync.json`` beside the database, as Litestream keeps ``.NAME-litestream``."""
    head, tail = os.path.split(os.path.abspath(db_path))
    return os.path.join(head, f".{tail}-tenantsync.json")


def load_position(path: str) -> Position | None:
    try:
        with open(path) as f:
            return Position.from_dict(json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        log.warning("%s: ignoring unreadable state file: %s", path, e)
        return None


def save_position(path: str, position: Position) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(position.to_dict(), f)
    os.replace(tmp, path)
