"""Which file events the watcher turns into sync requests (Watcher.handle, no threads)."""

from __future__ import annotations

import os

import pytest
from watchfiles import Change

from scheduler.watcher import Watcher
from tenantsync.catalogue import Catalogue
from tenantsync.config import Config

from .dbutil import app_db, write_rows


class Recorder:
    """A dispatcher that only records what was asked of it."""

    def __init__(self):
        self.syncs: list[str] = []

    def request_syncs(self, names) -> int:
        names = list(names)
        self.syncs.extend(names)
        return len(names)

    def submit(self, job: str, name: str, **kwargs) -> None:
        raise AssertionError("the watcher only requests syncs")

    def close(self) -> None:
        pass


@pytest.fixture
def watcher(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.db", "b.db"):
        write_rows(app_db(str(data / name)), 3)
    config = Config(replica=f"file://{tmp_path}/replica", globs=(f"{data}/*.db",),
                    catalogue=f"sqlite:///{tmp_path}/catalogue.db", host="h")
    catalogue = Catalogue(config.catalogue)
    w = Watcher(config, catalogue, Recorder(), report=lambda line: None)
    assert sorted(w.rescan()) == ["a.db", "b.db"]
    w.dispatcher.syncs.clear()
    yield w, data, catalogue
    catalogue.close()


def test_a_modified_wal_is_a_write_and_is_recorded(watcher):
    w, data, catalogue = watcher
    w.handle({(Change.modified, f"{data}/a.db-wal")})
    assert w.dispatcher.syncs == ["a.db"]
    assert catalogue.get("a.db").last_write_at is not None
    assert catalogue.get("b.db").last_write_at is None


def test_an_added_wal_is_a_write_unless_empty(watcher):
    w, data, _ = watcher
    empty = data / "a.db-wal"
    empty.unlink(missing_ok=True)
    empty.touch()  # a connection opened (every sync job's own does this): no frames
    w.handle({(Change.added, str(empty))})
    assert w.dispatcher.syncs == []

    with open(empty, "wb") as f:  # the first commit after the WAL had been deleted
        f.write(b"\0" * 32)
    w.handle({(Change.added, str(empty))})
    assert w.dispatcher.syncs == ["a.db"]


def test_an_added_wal_already_gone_may_have_been_a_commit(watcher):
    """A connection that committed and closed within the debounce: its -wal was created
    and deleted again, and the commit is now in the main file."""
    w, data, _ = watcher
    gone = f"{data}/b.db-wal"
    if os.path.exists(gone):
        os.unlink(gone)
    w.handle({(Change.added, gone)})
    assert w.dispatcher.syncs == ["b.db"]


def test_main_file_changes_and_deleted_wals_are_not_writes(watcher):
    w, data, _ = watcher
    w.handle({(Change.modified, f"{data}/a.db"), (Change.deleted, f"{data}/a.db-wal"),
              (Change.modified, f"{data}/a.db-shm")})
    assert w.dispatcher.syncs == []
