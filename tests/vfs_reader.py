"""A read replica through Litestream's VFS (PyPI ``litestream-vfs``), run as a child
process by tests/test_vfs.py: ``python tests/vfs_reader.py`` with LITESTREAM_REPLICA_URL
(and the AWS variables for S3) in its environment.

Why a child process: the extension is a Go c-shared library (its own runtime and
threads) that registers ONE process-wide VFS named ``litestream`` for the replica URL
read from the environment at load time; a second URL needs a second process, and a Go
crash must not take pytest with it. Why apsw: the interpreter's ``sqlite3`` module is
built without ``enable_load_extension``.

It opens one read-only connection through the VFS and keeps it (the VFS polls the
replica every second for new level-0 and level-1 files while it is open), prints
``ready``, then answers one JSON line per command read from stdin:

- ``state``: ``{"txid": litestream_txid(), "dump": [[table, rows], ...]}`` with BLOBs as
  ``{"hex": ...}``, tables by name, rows in rowid order (tests/dbutil.dump's order);
- ``integrity``: ``{"integrity": PRAGMA integrity_check}``.

An error becomes ``{"error": "..."}``, never an exit.
"""

from __future__ import annotations

import json
import sys

import apsw
import litestream_vfs


def jsonable(value):
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    return value


def state(db: apsw.Connection) -> dict:
    # One read transaction: the VFS applies what it polled only between transactions,
    # so the TXID and the rows come from the same state.
    with db:
        txid = db.execute("SELECT litestream_txid()").fetchone()[0]
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        dump = [[t, [[jsonable(v) for v in row] for row in db.execute(f'SELECT * FROM "{t}" ORDER BY rowid')]]
                for t in tables]
    return {"txid": txid, "dump": dump}


def main() -> None:
    loader = apsw.Connection(":memory:")
    loader.enable_load_extension(True)
    # Its entry point is sqlite3_litestreamvfs_init, which SQLite would not guess from
    # the file name "litestream-vfs.so". It registers the VFS for the whole process.
    loader.load_extension(litestream_vfs.loadable_path(), "sqlite3_litestreamvfs_init")
    db = apsw.Connection("replica.db", vfs="litestream", flags=apsw.SQLITE_OPEN_READONLY)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "state":
                answer = state(db)
            elif command == "integrity":
                answer = {"integrity": db.execute("PRAGMA integrity_check").fetchone()[0]}
            else:
                answer = {"error": f"unknown command {command!r}"}
        except Exception as e:  # the test reports it with the VFS's log
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
