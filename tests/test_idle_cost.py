"""An idle tenant costs no request to object storage (issue 21: "requests per tenant per
hour idle: still 0"), counted by the fault proxy in front of the S3 server.

A tenant written once costs a bounded tail of storage work after its write: each
compaction level, the snapshot and retention run for it in the next two intervals of
their plan (schedule.py), then never again until it is written. Here every interval is a
few seconds, so that tail ends within the test; after it, tenants the application keeps
opening and reading (which touches their ``-wal`` files without a commit) must cost
nothing.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tenantsync.catalogue import Catalogue

from .dbutil import app_db, wait_for, write_rows, written_tenants
from .test_never_silent import Watch

TENANTS = 10

#: The longest plan interval below (snapshot and L3); the tail after a write lasts at most
#: two of them, plus the plan's wall-clock alignment.
LONGEST = 4.0
SETTINGS = {
    "idle-after": "1s",
    "l0-retention": "2s",
    "levels": "[{level: 1, interval: 1s}, {level: 2, interval: 2s}, {level: 3, interval: 4s}]",
    "snapshot": "{interval: 4s, retention: 1h}",
}
#: Seconds counted, while the application reads every tenant over and over.
WINDOW = 10.0


def read_all(paths: list[Path]) -> int:
    """Open, read and close each database, as a request handler does; returns rows seen."""
    seen = 0
    for path in paths:
        conn = sqlite3.connect(path)
        seen += conn.execute("SELECT count(*) FROM t").fetchone()[0]
        conn.close()
    return seen


def test_tenants_that_are_only_read_cost_no_request_once_their_tail_of_compaction_is_done(
        tmp_path, s3_proxy, proxied_s3_url):
    paths = written_tenants(tmp_path / "data", TENANTS, 20)
    watch = Watch(tmp_path, proxied_s3_url, **SETTINGS)
    try:
        catalogue = Catalogue(watch.catalogue_url, fleet=watch.fleet)
        assert wait_for(lambda: len([t for t in catalogue.records() if t.txid]) == TENANTS, 60, 0.2), \
            watch.stderr_path.read_text()
        # The tail: each level, the snapshot and retention, at most two intervals each.
        time.sleep(2 * LONGEST + 3)
        assert s3_proxy.stats()["requests"] > 0  # the proxy is the watcher's way to the store
        s3_proxy.reset_stats()
        since = s3_proxy.completed()["next"]
        began = time.monotonic()
        reads = 0
        while time.monotonic() - began < WINDOW:
            reads += read_all(paths)
            time.sleep(0.2)
        stats = s3_proxy.stats()
        assert watch.proc.poll() is None, watch.stderr_path.read_text()
        assert reads > 0
        assert stats["requests"] == 0, (f"{stats['requests']} requests from {TENANTS} idle tenants in "
                                        f"{WINDOW:.0f} s: {stats['methods']}\n{s3_proxy.completed(since)['entries'][:20]}")
        # Still replicating: a write after the quiet costs requests again, and ships.
        conn = app_db(paths[0])
        write_rows(conn, 1)
        conn.close()
        txid = catalogue.get(paths[0].name).txid
        assert wait_for(lambda: catalogue.get(paths[0].name).txid > txid, 30, 0.2), watch.stderr_path.read_text()
    finally:
        code, err = watch.stop()
    assert code == 0 and "Traceback" not in err, err
