"""Each way a restore cannot succeed raises its own RestoreError subclass."""

from __future__ import annotations

import pytest

from tenantsync.capture import Capture
from tenantsync.errors import (
    OutputExists,
    ReplicaEmpty,
    ReplicaGap,
    RestoredCorrupt,
    RestoreError,
    TargetUnavailable,
)
from tenantsync.ltx import HEADER_FLAG_NO_CHECKSUM, Header, encode_file
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, write_rows


@pytest.fixture
def replica(tmp_path):
    """A replica holding TXIDs 1 to 3, one L0 file each."""
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    replica = Replica(open_storage(f"file://{tmp_path}/replica"))
    cap = Capture(db, replica)
    for _ in range(3):
        write_rows(conn, 2)
        cap.sync_once()
    cap.close()
    conn.close()
    assert replica.max_txid() == 3
    return replica


def test_a_txid_the_replica_never_reached_is_unavailable(tmp_path, replica):
    with pytest.raises(TargetUnavailable):
        restore(replica, str(tmp_path / "out.db"), txid=9)


def test_an_existing_output_is_kept_unless_forced(tmp_path, replica):
    out = tmp_path / "out.db"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExists):
        restore(replica, str(out))
    assert out.read_bytes() == b"keep me"
    assert restore(replica, str(out), force=True).txid == 3


def test_a_missing_middle_file_is_a_gap(tmp_path, replica):
    replica.delete([i for i in replica.files(0) if i.min_txid == 2])
    with pytest.raises(ReplicaGap):
        restore(replica, str(tmp_path / "out.db"))
    assert restore(replica, str(tmp_path / "one.db"), txid=1).txid == 1


def test_an_empty_replica_is_its_own_case(tmp_path):
    empty = Replica(open_storage(f"file://{tmp_path}/none"))
    with pytest.raises(ReplicaEmpty) as caught:
        restore(empty, str(tmp_path / "out.db"))
    assert not isinstance(caught.value, (TargetUnavailable, ReplicaGap, OutputExists))
    assert isinstance(caught.value, RestoreError)


def test_a_state_sqlite_cannot_read_is_corrupt_and_leaves_nothing(tmp_path):
    junk = Replica(open_storage(f"file://{tmp_path}/junk"))
    hdr = Header(flags=HEADER_FLAG_NO_CHECKSUM, page_size=4096, commit=1, min_txid=1, max_txid=1, timestamp=0)
    blob = encode_file(hdr, [(1, b"not a database page".ljust(4096, b"\0"))])
    junk.write(0, hdr, blob, len(blob))
    out = tmp_path / "out.db"
    with pytest.raises(RestoredCorrupt):
        restore(junk, str(out))
    assert list(tmp_path.glob("*out.db*")) == []
