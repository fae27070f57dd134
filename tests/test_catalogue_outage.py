"""A fleet's PostgreSQL catalogue killed (SIGKILL) and started again: one clear error while it
is down, nothing written half, everything working again once it is back without a restart,
and a watcher that goes on through the outage: the syncs it requests go out, and the writes
it could not record are recorded when the catalogue answers again. Real PostgreSQL servers of
their own (``servers.PostgresServer``), as the session's must not be killed."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from scheduler.watcher import Watcher
from tenantsync.catalogue import Catalogue, TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync.errors import CatalogueUnavailable
from tenantsync.outcome import failed

from . import servers
from .conftest import _server
from .dbutil import app_db, wait_for, write_rows
from .ports import free_loopback_ports
from .test_watcher import Recorder


@pytest.fixture
def postgres():
    server = servers.PostgresServer(_server(servers.pg_bindir), free_loopback_ports(1)[0])
    server.start()
    yield server
    server.remove()


def test_a_killed_catalogue_is_one_clear_transient_error_and_works_again_once_back(postgres):
    catalogue = Catalogue(postgres.create_database("outage"), fleet="f")
    catalogue.discover("a.db", "/srv/a.db", "h")
    postgres.kill()
    with pytest.raises(CatalogueUnavailable) as raised:
        catalogue.record_sync("a.db", txid=5, position=None, at=datetime.now(timezone.utc), state=TenantState.active)
    line = str(raised.value)
    assert "\n" not in line and line.startswith(f"catalogue postgresql+psycopg://postgres@127.0.0.1:{postgres.port}/")
    assert failed("a.db", raised.value).transient  # a job failing so is retried
    postgres.start()
    assert catalogue.get("a.db").txid == 0  # nothing of the failed write
    catalogue.record_sync("a.db", txid=5, position=None, at=datetime.now(timezone.utc), state=TenantState.active)
    assert catalogue.get("a.db").txid == 5
    catalogue.close()


def test_the_watcher_goes_on_through_a_catalogue_outage_and_records_the_writes_after(tmp_path, postgres, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.db", "b.db"):
        write_rows(app_db(str(data / name)), 3)
    config = Config(replica=f"file://{tmp_path}/replica", globs=(f"{data}/*.db",),
                    catalogue=postgres.create_database("watch"), host="h")
    catalogue = open_catalogue(config)
    w = Watcher(config, catalogue, Recorder(), report=lambda line: None)
    stop = threading.Event()
    runner = threading.Thread(target=w.run, args=(stop,))
    runner.start()
    try:
        assert wait_for(lambda: sorted(w.dispatcher.syncs) == ["a.db", "b.db"], 10)
        found = catalogue.get("b.db").last_write_at  # never shipped (nothing syncs here): written when found
        postgres.kill()
        before = datetime.now(timezone.utc)
        w.dispatcher.syncs.clear()
        write_rows(app_db(str(data / "a.db")), 1)
        assert wait_for(lambda: "a.db" in w.dispatcher.syncs, 10)  # requested while the catalogue is down
        time.sleep(1.5)  # a rescan or two fail meanwhile
        assert runner.is_alive()
        postgres.start()
        assert wait_for(lambda: catalogue.get("a.db").last_write_at >= before, 15)
        assert catalogue.get("a.db").pending_since is not None
        assert catalogue.get("b.db").last_write_at == found
        logged = [r.getMessage() for r in caplog.records if r.name == "scheduler.watcher"]
        assert sum("the watcher goes on" in m for m in logged) == 1 and "the catalogue answers again" in logged
    finally:
        stop.set()
        runner.join(10)
        catalogue.close()
