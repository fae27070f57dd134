"""Every sync outcome leaves exactly its catalogue state, in one catalogue transaction (or
none, for outcomes that are another writer's or job's to record), and a released tenant
costs nothing: its capture is freed by reference counting alone."""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
import weakref
from datetime import timedelta

import pytest
from sqlalchemy import event

from tenantsync.catalogue import TenantState
from tenantsync.errors import StorageError
from tenantsync.fleet import CONTENDED_RETRY, Fleet
from tenantsync.lease import Leaser
from tenantsync.outcome import Contended, Contention, Failed, NothingNew, Shipped, Skip, Skipped
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, write_rows
from .test_fleet_embedded import fleet_config


class WriteTransactions:
    """Committed catalogue transactions that changed rows, counted from the engine's own
    events: a transaction counts once however many statements it ran."""

    def __init__(self, engine):
        self.count = 0
        self._writing: set[int] = set()
        event.listen(engine, "before_cursor_execute", self._execute)
        event.listen(engine, "commit", self._commit)

    def _execute(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            self._writing.add(id(conn))

    def _commit(self, conn) -> None:
        if id(conn) in self._writing:
            self._writing.discard(id(conn))
            self.count += 1

    def since(self, start: int) -> int:
        return self.count - start


@pytest.fixture
def fleet(tmp_path, file_url):
    (tmp_path / "data").mkdir()
    fleet = Fleet(fleet_config(tmp_path, file_url))
    yield fleet
    fleet.close()


def tenant(fleet: Fleet, tmp_path, name: str):
    path = str(tmp_path / "data" / name)
    conn = app_db(path)
    write_rows(conn, 5)
    fleet.catalogue.discover(name, path, fleet.config.host)
    return conn


def changed(before, after) -> dict:
    """The columns of a tenant's row that differ, as {column: (before, after)}."""
    return {f.name: (getattr(before, f.name), getattr(after, f.name)) for f in dataclasses.fields(before)
            if f.name != "updated_at" and getattr(before, f.name) != getattr(after, f.name)}


# Catalogue transactions each outcome of a sync costs: Contended and Skipped are another
# writer's or job's to record, but commits a held lease keeps back are recorded as writes
# (the catch-up plan asks again).
WRITES = {Shipped: 1, NothingNew: 1, Failed: 1, Contended: 0, Skipped: 0}


def writes_of(outcome) -> int:
    held_back = isinstance(outcome, Contended) and outcome.why is Contention.LEASE_HELD
    return 1 if held_back else WRITES[type(outcome)]


def test_each_sync_outcome_is_one_catalogue_write_of_the_state_it_leaves(tmp_path, file_url, fleet):
    conn = tenant(fleet, tmp_path, "a.db")
    writes = WriteTransactions(fleet.catalogue.engine)
    catalogue = fleet.catalogue

    def sync():
        """One sync: (outcome, row before, row after), checked to be one write or none."""
        before, start = catalogue.get("a.db"), writes.count
        outcome = fleet.sync("a.db")
        assert writes.since(start) == writes_of(outcome), outcome
        return outcome, before, catalogue.get("a.db")

    first, before, after = sync()  # the first: every page, and the lease taken, in one write
    assert isinstance(first, Shipped) and first.txid == 1 and first.full is not None
    assert (after.state, after.txid, after.position["txid"], after.lease_holder, after.generation) == \
        (TenantState.active, 1, 1, "test-host", 1)
    assert after.bytes_stored == first.bytes and after.last_sync_at and after.last_error is None

    outcome, before, after = sync()
    assert outcome == NothingNew("a.db")
    assert set(changed(before, after)) == {"last_sync_at"} and after.last_sync_at > before.last_sync_at

    write_rows(conn, 2)
    outcome, before, after = sync()  # the lease is fresh: not renewed, its columns not written
    assert isinstance(outcome, Shipped) and (outcome.txid, outcome.full) == (2, None)
    assert set(changed(before, after)) == {"txid", "position", "last_sync_at", "shipped_at", "bytes_stored", "wal_bytes"}

    start = writes.count
    assert fleet.release("a.db")  # shipped nothing, gave the lease up: one write says both
    assert writes.since(start) == 1
    released = catalogue.get("a.db")
    assert (released.state, released.lease_holder, released.lease_expires_at) == (TenantState.idle, None, None)

    other = Leaser(open_storage(file_url).child("a.db"), owner="other-host")
    taken = other.acquire()
    write_rows(conn, 1)
    outcome, before, after = sync()  # the holder records the tenant; we, that commits wait
    assert isinstance(outcome, Contended) and outcome.why is Contention.LEASE_HELD
    assert outcome.retry_after == CONTENDED_RETRY and "other-host" in outcome.detail
    assert set(changed(before, after)) == {"last_write_at", "pending_since"}
    other.release(taken)

    ltx = tmp_path / "replica" / "a.db" / "ltx"
    os.rename(ltx, tmp_path / "ltx-moved-away")
    ltx.write_bytes(b"")  # a file where the LTX directory was: nothing can be uploaded
    outcome, before, after = sync()
    assert isinstance(outcome, Failed) and isinstance(outcome.error, StorageError) and not outcome.transient
    assert changed(before, after) | {"wal_bytes": None} == {"state": (TenantState.idle, TenantState.error),
                                                           "last_error": (None, str(outcome.error)), "wal_bytes": None}
    assert after.wal_bytes == os.path.getsize(tmp_path / "data" / "a.db-wal")

    ltx.unlink()
    os.rename(tmp_path / "ltx-moved-away", ltx)
    # The failed pass found no files in the replica; the next one may lose the race for the
    # TXID it had planned (Contended, no write) before resuming after the replica's newest.
    for _ in range(3):
        outcome, before, after = sync()
        if not isinstance(outcome, Contended):
            break
    assert isinstance(outcome, Shipped) and outcome.txid >= 3
    assert (after.state, after.txid, after.last_error, after.lease_holder, after.generation) == \
        (TenantState.active, outcome.txid, None, "test-host", taken.generation + 1)


def test_an_archived_tenant_is_skipped_without_a_catalogue_write(tmp_path, fleet):
    tenant(fleet, tmp_path, "cold.db")
    assert fleet.catalogue.transition("cold.db", TenantState.archived)
    writes = WriteTransactions(fleet.catalogue.engine)
    before = fleet.catalogue.get("cold.db")
    assert fleet.sync("cold.db") == Skipped("cold.db", Skip.NOT_REPLICABLE)
    assert writes.count == 0 and changed(before, fleet.catalogue.get("cold.db")) == {}


def test_a_sync_within_an_archival_leaves_the_tenant_archiving(tmp_path, fleet):
    """The state a sync leaves is the caller's choice: the archival's own pass keeps its mark."""
    tenant(fleet, tmp_path, "a.db")
    assert fleet.catalogue.mark("a.db", TenantState.archiving, expected={TenantState.idle}, owner="me")
    assert fleet.sync("a.db") == Skipped("a.db", Skip.NOT_REPLICABLE)
    outcome = fleet.sync("a.db", archiving=True)
    assert isinstance(outcome, Shipped)
    record = fleet.catalogue.get("a.db")
    assert (record.state, record.txid, record.mark_owner) == (TenantState.archiving, 1, "me")
    assert fleet.release("a.db") and fleet.catalogue.get("a.db").state is TenantState.archiving


@pytest.mark.parametrize("keep_lease", [True, False])
def test_a_released_tenant_is_freed_by_reference_counting_alone(tmp_path, fleet, keep_lease):
    """No reference cycle holds a released capture (the fence is the held lease's method, and
    the lease never refers to the capture): with the collector off, it is gone at once."""
    tenant(fleet, tmp_path, "a.db")
    gc.collect()
    gc.disable()
    try:
        assert isinstance(fleet.sync("a.db"), Shipped)
        capture = weakref.ref(fleet._active["a.db"].capture)
        assert fleet.release("a.db", keep_lease=keep_lease)
        assert capture() is None
        assert ("a.db" in fleet._leases) is keep_lease  # kept until it expires, or given up
    finally:
        gc.enable()


def test_a_tenant_woken_after_its_lease_lapsed_renews_it_with_one_request(tmp_path, proxied_s3_url, s3_proxy):
    """Released while idle, its lease forgotten once expired: the next sync writes the lease
    on the etag the catalogue kept (one PUT, no read), then its L0 (another PUT)."""
    (tmp_path / "data").mkdir()
    fleet = Fleet(fleet_config(tmp_path, proxied_s3_url, lease_ttl=timedelta(seconds=1)))
    try:
        conn = tenant(fleet, tmp_path, "a.db")
        assert isinstance(fleet.sync("a.db"), Shipped)
        etag = fleet.catalogue.get("a.db").lease_etag
        assert etag
        assert fleet.release_idle(idle_after=0) == ["a.db"]
        time.sleep(1.5)
        fleet.release_idle(idle_after=0)  # forgets the expired lease
        assert "a.db" not in fleet._leases
        write_rows(conn, 3)
        s3_proxy.reset_stats()
        assert isinstance(fleet.sync("a.db"), Shipped)
        assert s3_proxy.stats()["methods"] == {"PUT": 2}, [e[1:3] for e in s3_proxy.completed()["entries"][-3:]]
        record = fleet.catalogue.get("a.db")
        assert record.lease_etag and record.lease_etag != etag and record.generation == 1
        conn.close()
    finally:
        fleet.close()


def test_a_pass_finding_nothing_to_ship_ends_a_tenants_error(tmp_path, fleet):
    """A failed pass left the tenant in error (a lease renewal the store dropped) with
    nothing unshipped: the next pass finds nothing new, which says the replica is current,
    so the tenant is active again, not failing /readyz until its next write."""
    conn = tenant(fleet, tmp_path, "a.db")
    assert isinstance(fleet.sync("a.db"), Shipped)
    fleet.catalogue.record_error("a.db", "write lock.json: no answer: Connection reset by peer")
    assert fleet.catalogue.get("a.db").state is TenantState.error
    assert fleet.sync("a.db") == NothingNew("a.db")
    row = fleet.catalogue.get("a.db")
    assert (row.state, row.last_error) == (TenantState.active, None)
    conn.close()


def test_a_commit_sqlite_has_not_counted_yet_is_waited_for_and_else_left_as_a_write(tmp_path, fleet):
    """A writer appends its commit to the WAL, then counts it in the wal-index; the watcher's
    event comes from the first step, so a pass can run in between. Found by bench/chaos.py:
    that pass stopped at the index, found nothing new, and the tenant was recorded as
    shipped up to the pass's start, which the commit preceded: nothing asked for it again.
    The window is made here by putting back the index header as it was before the commit."""
    conn = tenant(fleet, tmp_path, "a.db")
    path = str(tmp_path / "data" / "a.db")
    assert isinstance(fleet.sync("a.db"), Shipped)

    def commit_uncounted() -> bytes:
        with open(path + "-shm", "rb") as f:
            before = f.read(96)  # the wal-index header's two copies
        write_rows(conn, 1)
        with open(path + "-shm", "r+b") as f:
            after = f.read(96)
            f.seek(0)
            f.write(before)
        return after

    def count(after: bytes) -> None:
        with open(path + "-shm", "r+b") as f:
            f.write(after)

    # Counted 50 ms into the pass: the pass waits for it and ships it.
    after = commit_uncounted()
    threading.Timer(0.05, count, (after,)).start()
    assert isinstance(fleet.sync("a.db"), Shipped)
    assert fleet.catalogue.get("a.db").pending_since is None

    # Not counted within the wait (the writer descheduled longer): nothing shipped yet, and
    # the tenant is left written, so the catch-up plan asks again.
    after = commit_uncounted()
    assert fleet.sync("a.db") == NothingNew("a.db")
    row = fleet.catalogue.get("a.db")
    assert row.pending_since is not None and row.last_write_at > row.last_sync_at
    count(after)
    assert isinstance(fleet.sync("a.db"), Shipped)
    assert fleet.catalogue.get("a.db").pending_since is None
    out = str(tmp_path / "restored.db")
    restore(fleet.replica("a.db"), out)
    assert dump(out) == dump(path)
    conn.close()
