"""Cold tenants: freeze an archived replica into one bundle, hydrate it back, export it.

Real fleets on file:// and S3 (moto), plain and encrypted; Litestream restores what a
thawed replica and an exported replica hold.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timedelta, timezone

import pytest

from tenantsync import cold, dictionary, layout
from tenantsync.bundle import read_manifest, write_bundle
from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync.errors import BundleError, TargetUnavailable
from tenantsync.fleet import Fleet
from tenantsync.keyring import ENV_VAR
from tenantsync.lease import Leaser
from tenantsync.ondemand import OnDemand
from tenantsync.outcome import Archived, Frozen, Skip, Skipped
from tenantsync.storage import open_storage
from tenantsync.storage.sealed import sealed_header

from .dbutil import app_db, dump, write_rows
from .peer import litestream


@pytest.fixture(params=["plain", "encrypted"])
def fleet(request, tmp_path, storage_url, monkeypatch):
    encrypt = request.param == "encrypted"
    if encrypt:
        monkeypatch.setenv(ENV_VAR, json.dumps({"keys": {"k1": base64.b64encode(b"\x05" * 32).decode()}}))
    (tmp_path / "data").mkdir()
    cfg = Config(replica=storage_url, globs=(f"{tmp_path}/data/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host="h1", idle_after=timedelta(seconds=1), encrypt=encrypt)
    f = Fleet(cfg, open_catalogue(cfg))
    yield f
    f.close()


def archived_tenant(fleet, tmp_path, name: str = "acme.db") -> tuple[str, list, int]:
    """A tenant written in several syncs, compacted, then archived: (path, rows, TXID)."""
    path = str(tmp_path / "data" / name)
    conn = app_db(path)
    fleet.catalogue.discover(name, path, "h1")
    for _ in range(3):
        write_rows(conn, 40)
        fleet.sync(name)
    fleet.compact(name, 1, force=True)
    expected = dump(path)
    conn.close()
    archived = OnDemand(fleet).archive(name)
    assert isinstance(archived, Archived)
    return path, expected, archived.txid


def stored(fleet, name: str) -> list[str]:
    return sorted(info.key for info in fleet.storage.child(name).list(""))


def test_freeze_leaves_one_bundle_and_hydration_thaws_it_and_replication_goes_on(tmp_path, fleet, storage_url):
    path, expected, txid = archived_tenant(fleet, tmp_path)
    info = cold.freeze_tenant(fleet, "acme.db")
    assert isinstance(info, Frozen) and info.txid == txid
    assert fleet.catalogue.get("acme.db").state is TenantState.frozen
    assert cold.freeze_tenant(fleet, "acme.db") == Skipped("acme.db", Skip.ALREADY_FROZEN)
    left = stored(fleet, "acme.db")
    assert [k for k in left if k.endswith(".ltx")] == []
    assert layout.bundle_key(txid) in left
    # One object (and the key): the archival's lapsed lease went with the LTX files.
    assert set(left) == {layout.bundle_key(txid)} | ({"tenantsync-key.json"} if fleet.config.encrypt else set())
    raw = open_storage(storage_url).child("acme.db").read(layout.bundle_key(txid))
    assert (sealed_header(raw) is not None) is fleet.config.encrypt  # compressed, then sealed

    out = tmp_path / "export.db"
    assert cold.export(fleet, "acme.db", str(out)) == txid  # read in place: still frozen
    assert dump(str(out)) == expected and [k for k in stored(fleet, "acme.db") if k.endswith(".ltx")] == []

    hydrated = OnDemand(fleet).hydrate("acme.db")
    assert hydrated.restored and hydrated.txid == txid and dump(path) == expected
    assert fleet.catalogue.get("acme.db").state is TenantState.active
    assert not [k for k in stored(fleet, "acme.db") if k.startswith("bundle/")]
    conn = app_db(path)
    write_rows(conn, 5)
    shipped = fleet.sync("acme.db")
    assert shipped.txid == txid + 1 and shipped.full is None  # no re-upload of the database
    newest = dump(path)
    conn.close()
    if not fleet.config.encrypt:  # a thawed replica is a Litestream replica again
        base, sep, query = storage_url.partition("?")
        litestream("restore", "-o", str(tmp_path / "ls.db"), f"{base.rstrip('/')}/acme.db{sep}{query}")
        assert dump(str(tmp_path / "ls.db")) == newest


def test_a_bundle_that_fails_verification_leaves_every_ltx_file(tmp_path, fleet):
    path, expected, txid = archived_tenant(fleet, tmp_path)
    before = stored(fleet, "acme.db")
    # A bundle of the right state whose last frame is damaged, left by an earlier attempt:
    # the freeze finds it (same manifest), verifies it by reading it back, and must stop.
    scratch = open_storage(str(tmp_path / "scratch"))
    scratch.make_root()
    good = tmp_path / "good.db"
    cold.export(fleet, "acme.db", str(good))
    info = write_bundle(scratch, str(good), txid)
    body = bytearray(scratch.read(info.key))
    body[-5] ^= 0xFF
    fleet.replica("acme.db").storage.write_if_absent(info.key, bytes(body))
    with pytest.raises(BundleError):
        cold.freeze_tenant(fleet, "acme.db")
    record = fleet.catalogue.get("acme.db")  # the mark undone, the failure said
    assert record.state is TenantState.archived and record.last_error.startswith("freeze: ")
    assert [k for k in stored(fleet, "acme.db") if k.endswith(".ltx")] == [k for k in before if k.endswith(".ltx")]
    fleet.replica("acme.db").storage.delete([info.key])
    assert OnDemand(fleet).hydrate("acme.db").restored and dump(path) == expected


def test_only_archived_tenants_are_frozen(tmp_path, fleet):
    path = str(tmp_path / "data" / "live.db")
    conn = app_db(path)
    fleet.catalogue.discover("live.db", path, "h1")
    write_rows(conn, 5)
    fleet.sync("live.db")
    skipped = cold.freeze_tenant(fleet, "live.db")
    assert skipped.reason is Skip.NOT_ARCHIVED and str(skipped) == "tenant live.db is active: only archived tenants are frozen"
    assert fleet.catalogue.get("live.db").state is TenantState.active
    conn.close()


def test_export_as_a_plain_litestream_replica_from_a_frozen_tenant(tmp_path, fleet):
    path, expected, txid = archived_tenant(fleet, tmp_path)
    cold.freeze_tenant(fleet, "acme.db")
    target = f"file://{tmp_path}/exported"
    assert cold.export(fleet, "acme.db", None, replica_url=target) == txid
    litestream("restore", "-o", str(tmp_path / "ls.db"), target)
    assert dump(str(tmp_path / "ls.db")) == expected
    assert os.path.exists(tmp_path / "exported" / "ltx" / "9")


def test_freeze_and_export_from_the_command_line(tmp_path, fleet, storage_url):
    import subprocess
    import sys

    from .test_server import ROOT

    path, expected, txid = archived_tenant(fleet, tmp_path)
    config = tmp_path / "tenantsync.yml"
    config.write_text(json.dumps({"replica": storage_url, "globs": [f"{tmp_path}/data/*.db"], "host": "h1",
                                  "catalogue": fleet.config.catalogue, "encrypt": fleet.config.encrypt}))
    env = dict(os.environ, PYTHONPATH=ROOT)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "tenantsync", *args, "--config", str(config)],
                              capture_output=True, text=True, env=env, timeout=120)

    proc = run("freeze", "acme.db")
    assert proc.returncode == 0 and proc.stdout.startswith(f"frozen acme.db txid={txid:016x}"), proc.stderr
    proc = run("export", "acme.db", "-o", str(tmp_path / "out.db"))
    assert proc.returncode == 0, proc.stderr
    assert dump(str(tmp_path / "out.db")) == expected
    proc = run("export", "acme.db")
    assert proc.returncode == 2 and "give -o FILE or --to-replica URL" in proc.stderr


def test_freezing_compresses_with_the_fleets_current_dictionary_except_when_encrypted(tmp_path, fleet):
    """A published dictionary names itself in every bundle frozen after it (and a hydration
    reads it back); an encrypted fleet's bundles name none, whatever the pointer says."""
    path, expected, txid = archived_tenant(fleet, tmp_path)
    corpus = []
    for i in range(4):
        sample = str(tmp_path / f"sample{i}.db")
        conn = app_db(sample)
        write_rows(conn, 300)
        conn.close()  # checkpointed: the pages are in the file trained on
        corpus.append(sample)
    dict_id = dictionary.publish(fleet.storage, dictionary.train(corpus, size=16 << 10), databases=len(corpus))
    frozen = cold.freeze_tenant(fleet, "acme.db")
    manifest = read_manifest(fleet.replica("acme.db").storage, frozen.key)
    assert manifest.dictionary_id == (None if fleet.config.encrypt else dict_id)
    assert OnDemand(fleet).hydrate("acme.db").restored and dump(path) == expected


def test_a_frozen_tenant_hydrates_at_its_bundles_txid_and_refuses_an_older_one(tmp_path, fleet):
    """The bundle's TXID is there; anything older is gone with the LTX history: refused in one
    error, nothing written, the tenant still frozen (its bundle kept)."""
    path, expected, txid = archived_tenant(fleet, tmp_path)
    cold.freeze_tenant(fleet, "acme.db")
    for target in ({"txid": txid - 1}, {"timestamp": datetime.now(timezone.utc)}):
        with pytest.raises(TargetUnavailable, match="frozen"):
            OnDemand(fleet).hydrate("acme.db", **target)
        assert not os.path.exists(path) and fleet.catalogue.get("acme.db").state is TenantState.frozen
        assert layout.bundle_key(txid) in stored(fleet, "acme.db")
    hydrated = OnDemand(fleet).hydrate("acme.db", txid=txid)
    assert hydrated.restored and hydrated.txid == txid and dump(path) == expected


def test_freezing_keeps_a_lease_someone_holds(tmp_path, fleet):
    """Only a lapsed lease goes with the LTX files: one a process holds is its own."""
    archived_tenant(fleet, tmp_path)
    Leaser(fleet.storage.child("acme.db"), owner="another-host").acquire()
    cold.freeze_tenant(fleet, "acme.db")
    assert layout.LEASE_KEY in stored(fleet, "acme.db")
