"""An encrypted fleet (``encrypt: true``) through every job, on file:// and S3.

What it promises: every object holding tenant data is sealed under the tenant's own data
key (no plaintext row in the store), the jobs (sync, compact, snapshot, retain, restore
at a TXID, archive, hydrate, fork) work on sealed replicas as on plain ones, a reader
without the right key is refused in one line with no output file, and Litestream
refuses the objects instead of misreading them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from tenantsync.catalogue import open_catalogue
from tenantsync.config import Config
from tenantsync.errors import KeyringError, StillLocal
from tenantsync.fleet import Fleet
from tenantsync.keyring import ENV_VAR
from tenantsync.ondemand import OnDemand
from tenantsync.outcome import Archived
from tenantsync.restore import restore
from tenantsync.storage import open_storage
from tenantsync.storage.sealed import KEY_OBJECT, sealed_header

from .dbutil import app_db, dump
from .peer import LITESTREAM, peer_env
from .test_server import ROOT
from .test_storage import stored_versions, versioned_bucket

MARKER = "confidential-row-7f3a"


def keyring_text(name: str, seed: bytes) -> str:
    return json.dumps({"keys": {name: base64.b64encode(seed * (32 // len(seed))).decode()}, "current": name})


def encrypted_fleet(tmp_path, replica_url: str) -> Fleet:
    """An encrypted fleet of ``tmp_path/data/*.db`` replicating to ``replica_url`` (the
    keyring is the environment's)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    cfg = Config(replica=replica_url, globs=(f"{tmp_path}/data/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host="h1", idle_after=timedelta(seconds=1), encrypt=True)
    return Fleet(cfg, open_catalogue(cfg))


@pytest.fixture
def fleet(tmp_path, storage_url, monkeypatch):
    monkeypatch.setenv(ENV_VAR, keyring_text("k1", b"\x01"))
    f = encrypted_fleet(tmp_path, storage_url)
    yield f
    f.close()


def write(conn, start: int, n: int) -> None:
    with conn:
        conn.executemany("INSERT INTO t(v) VALUES (?)", [(f"{MARKER} {i}",) for i in range(start, start + n)])


def raw_objects(storage_url: str) -> dict[str, bytes]:
    """Every object under the fleet's root as stored, read without any key."""
    store = open_storage(storage_url)
    return {info.key: store.read(info.key) for info in store.list("")}


def tenant_url(storage_url: str, name: str = "acme.db") -> str:
    base, sep, query = storage_url.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def new_tenant(fleet, tmp_path, name: str = "acme.db"):
    path = str(tmp_path / "data" / name)
    conn = app_db(path)
    conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
    fleet.catalogue.discover(name, path, "h1")
    return path, conn


def test_every_job_works_on_sealed_replicas_and_no_plaintext_is_stored(tmp_path, fleet, storage_url):
    path, conn = new_tenant(fleet, tmp_path)
    txids, states = [], []
    for i in range(4):
        write(conn, i * 50, 50)
        txids.append(fleet.sync("acme.db").txid)
        states.append(dump(path))
    fleet.compact("acme.db", 1, force=True)
    fleet.snapshot("acme.db", force=True)
    fleet.retain("acme.db")
    write(conn, 200, 10)
    fleet.sync("acme.db")
    expected = dump(path)

    objects = raw_objects(storage_url)
    data_objects = {k: v for k, v in objects.items() if k.endswith(".ltx")}
    assert len(data_objects) >= 3
    for key, body in data_objects.items():
        assert sealed_header(body) is not None, key
        assert MARKER.encode() not in body, key
    assert "acme.db/" + KEY_OBJECT in objects

    out = tmp_path / "restored.db"
    restore(fleet.replica("acme.db"), str(out))
    assert dump(str(out)) == expected
    at = tmp_path / "at.db"
    restore(fleet.replica("acme.db"), str(at), txid=txids[1])
    assert dump(str(at)) == states[1]

    conn.close()
    od = OnDemand(fleet)
    assert isinstance(od.archive("acme.db"), Archived) and not os.path.exists(path)
    assert od.hydrate("acme.db").restored and dump(path) == expected
    fork = od.hydrate("copy.db", source="acme.db")
    assert dump(fork.path) == expected
    fleet.sync("copy.db")  # the fork's replica is sealed under a key of its own
    copy_key = json.loads(raw_objects(storage_url)["copy.db/" + KEY_OBJECT])
    acme_key = json.loads(raw_objects(storage_url)["acme.db/" + KEY_OBJECT])
    assert copy_key["key_id"] != acme_key["key_id"] and copy_key["tenant"] == "copy.db"


def test_a_wrong_or_missing_keyring_is_refused_in_one_line_and_leaves_no_file(tmp_path, fleet, storage_url,
                                                                            monkeypatch):
    path, conn = new_tenant(fleet, tmp_path)
    write(conn, 0, 20)
    fleet.sync("acme.db")
    conn.close()
    cfg = fleet.config
    for keyring, error in ((keyring_text("k1", b"\x02"), "does not open"), (None, "no keyring")):
        if keyring is None:
            monkeypatch.delenv(ENV_VAR)
        else:
            monkeypatch.setenv(ENV_VAR, keyring)
        other = Fleet(cfg, open_catalogue(cfg))
        out = tmp_path / "out.db"
        with pytest.raises(KeyringError) as info:
            restore(other.replica("acme.db"), str(out))
        assert error in str(info.value) and "\n" not in str(info.value)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if "restore" in p]
        other.close()


def test_readers_without_the_key_are_told_it_is_encrypted(tmp_path, fleet, storage_url):
    path, conn = new_tenant(fleet, tmp_path)
    write(conn, 0, 20)
    fleet.sync("acme.db")
    conn.close()
    # tenantsync's own restore of the replica without the keyring: one line naming it.
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    proc = subprocess.run([sys.executable, "-m", "tenantsync", "restore", "--replica", tenant_url(storage_url),
                           "-o", str(tmp_path / "plain.db")], capture_output=True, text=True,
                          env=dict(env, PYTHONPATH=ROOT), timeout=60)
    assert proc.returncode == 1 and "encrypted by tenantsync" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "plain.db").exists()
    # With the keyring in a file: restored.
    keyring = tmp_path / "keyring.json"
    keyring.write_text(os.environ[ENV_VAR])
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    proc = subprocess.run([sys.executable, "-m", "tenantsync", "restore", "--replica", tenant_url(storage_url),
                           "--keyring-file", str(keyring), "-o", str(tmp_path / "plain.db")], capture_output=True,
                          text=True, env=dict(env, PYTHONPATH=ROOT), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert dump(str(tmp_path / "plain.db")) == dump(path)
    # Litestream refuses the sealed files instead of restoring something wrong.
    proc = subprocess.run([LITESTREAM, "restore", "-o", str(tmp_path / "ls.db"), tenant_url(storage_url)], env=peer_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and not (tmp_path / "ls.db").exists(), proc.stderr
    assert "magic" in proc.stderr.lower() or "invalid" in proc.stderr.lower(), proc.stderr


def test_ltx_dump_names_a_sealed_object_and_its_key(tmp_path, fleet, storage_url):
    path, conn = new_tenant(fleet, tmp_path)
    write(conn, 0, 5)
    fleet.sync("acme.db")
    conn.close()
    sealed = next(body for key, body in raw_objects(storage_url).items() if key.endswith(".ltx"))
    dumped = tmp_path / "one.ltx"
    dumped.write_bytes(sealed)
    proc = subprocess.run([sys.executable, "-m", "tenantsync", "ltx", "dump", str(dumped)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert proc.returncode == 0, proc.stderr
    header = sealed_header(sealed)
    assert f"encrypted, key id {header.key_id}" in proc.stdout, proc.stdout
    assert f"plaintext size: {header.plaintext_size}" in proc.stdout, proc.stdout


def two_keys(current: str, *names: str) -> str:
    seeds = {"k1": b"\x01", "k2": b"\x03"}
    return json.dumps({"keys": {n: base64.b64encode(seeds[n] * 32).decode() for n in names}, "current": current})


def test_rotation_rewraps_every_tenant_and_the_old_kek_can_then_go(tmp_path, fleet, monkeypatch):
    from tenantsync.keys import rotate

    expected = {}
    for name in ("a.db", "b.db"):
        path, conn = new_tenant(fleet, tmp_path, name)
        write(conn, 0, 30)
        fleet.sync(name)
        expected[name] = dump(path)
        conn.close()
    cfg = fleet.config
    monkeypatch.setenv(ENV_VAR, two_keys("k2", "k1", "k2"))
    both = Fleet(cfg, open_catalogue(cfg))
    done = rotate(both)
    assert (done.kek, sorted(done.rewrapped), done.already) == ("k2", ["a.db", "b.db"], [])
    assert sorted(rotate(both).already) == ["a.db", "b.db"]  # idempotent
    both.close()
    monkeypatch.setenv(ENV_VAR, two_keys("k2", "k2"))  # k1 removed from the keyring
    newer = Fleet(cfg, open_catalogue(cfg))
    for name, rows in expected.items():
        out = tmp_path / f"out-{name}"
        restore(newer.replica(name), str(out))
        assert dump(str(out)) == rows
    newer.close()


def test_shred_erases_the_tenant_and_an_old_copy_of_its_key_opens_nothing_once_its_kek_is_gone(
        tmp_path, fleet, storage_url, monkeypatch):
    from tenantsync.errors import Shredded
    from tenantsync.keys import rotate, shred

    path, conn = new_tenant(fleet, tmp_path, "gone.db")
    write(conn, 0, 30)
    fleet.sync("gone.db")
    conn.close()
    with pytest.raises(StillLocal, match="its database is still here"):
        shred(fleet, "gone.db")
    kept = {k: v for k, v in raw_objects(storage_url).items() if k.startswith("gone.db/")}  # as a bucket's backup keeps them
    assert isinstance(OnDemand(fleet).archive("gone.db"), Archived)
    erased = shred(fleet, "gone.db")
    assert erased.objects >= 2 and erased.versions == 0  # neither file:// nor this bucket keeps versions
    assert not [k for k in raw_objects(storage_url) if k.startswith("gone.db/")]
    assert fleet.catalogue.get("gone.db").state.value == "shredded"
    with pytest.raises(Shredded, match="gone.db was shredded"):
        OnDemand(fleet).hydrate("gone.db")
    assert not os.path.exists(path)

    # Copies brought back from beyond shred's reach (a backup of the bucket): with the KEK
    # that wrapped them still in the keyring they would open (README), so erasure that must
    # outlast such copies ends with a rotation and the old KEK's removal; after that the
    # copies are noise.
    store = open_storage(storage_url)
    for key, body in kept.items():
        store.write_if_absent(key, body)
    cfg = fleet.config
    monkeypatch.setenv(ENV_VAR, two_keys("k2", "k1", "k2"))
    rotating = Fleet(cfg, open_catalogue(cfg))
    assert "gone.db" not in rotate(rotating).rewrapped  # shredded tenants are not rewrapped
    rotating.close()
    monkeypatch.setenv(ENV_VAR, two_keys("k2", "k2"))
    after = Fleet(cfg, open_catalogue(cfg))
    out = tmp_path / "resurrected.db"
    with pytest.raises(KeyringError, match="no key 'k1'"):
        restore(after.replica("gone.db"), str(out))
    assert not out.exists()
    after.close()


# -- shredding on a versioned bucket ----------------------------------------------


def cli_shred(tmp_path, fleet, name):
    """``tenantsync shred NAME --yes`` against ``fleet``'s replica and catalogue."""
    cfg = fleet.config
    config = tmp_path / "tenantsync.yml"
    config.write_text(json.dumps({"replica": cfg.replica, "globs": list(cfg.globs), "catalogue": cfg.catalogue,
                                  "host": cfg.host, "encrypt": True}))  # JSON is YAML
    return subprocess.run([sys.executable, "-m", "tenantsync", "shred", name, "--yes", "--config", str(config)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60,
                          cwd=tmp_path)


def synced_and_compacted(fleet, tmp_path, name):
    """A tenant synced, written again, compacted and synced once more (old versions of
    its lease, L0 files deleted by compaction): its rows."""
    path, conn = new_tenant(fleet, tmp_path, name)
    for start in (0, 30):
        write(conn, start, 30)
        fleet.sync(name)
    fleet.compact(name, 1, force=True)
    write(conn, 60, 5)
    fleet.sync(name)
    conn.close()
    return dump(path)


def test_shred_on_a_versioned_bucket_leaves_no_version_of_the_tenant_and_spares_its_neighbour(
        tmp_path, s3_server, s3_client, monkeypatch):
    from botocore.exceptions import ClientError

    monkeypatch.setenv(ENV_VAR, keyring_text("k1", b"\x01"))
    bucket, url = versioned_bucket(s3_server, s3_client)
    fleet = encrypted_fleet(tmp_path, url)
    rows = {name: synced_and_compacted(fleet, tmp_path, name) for name in ("gone.db", "gone.db-eu.db")}
    assert isinstance(OnDemand(fleet).archive("gone.db"), Archived)
    before = stored_versions(s3_client, bucket, "replica/gone.db/")
    neighbour = stored_versions(s3_client, bucket, "replica/gone.db-eu.db/")
    current = {"replica/" + k for k in raw_objects(url) if k.startswith("gone.db/")}
    assert f"replica/gone.db/{KEY_OBJECT}" in current and len(before) > len(current)  # it has a history

    proc = cli_shred(tmp_path, fleet, "gone.db")
    assert proc.returncode == 0, proc.stderr
    # Every entry kept before, and the delete markers shred's own deletes left: the key's
    # and one per object.
    n = len(current) - 1
    assert proc.stdout == f"shredded gone.db: key deleted, {n} objects and {len(before) + n + 1} old versions deleted\n"
    left = s3_client.list_object_versions(Bucket=bucket, Prefix="replica/gone.db/")
    assert "Versions" not in left and "DeleteMarkers" not in left
    for key, version in before:  # no old copy of anything (the wrapped key's included) to restore from
        with pytest.raises(ClientError, match="NoSuchVersion|NoSuchKey"):
            s3_client.get_object(Bucket=bucket, Key=key, VersionId=version)
    assert fleet.catalogue.get("gone.db").state.value == "shredded"

    assert stored_versions(s3_client, bucket, "replica/gone.db-eu.db/") == neighbour
    out = tmp_path / "eu.db"
    restore(fleet.replica("gone.db-eu.db"), str(out))
    assert dump(str(out)) == rows["gone.db-eu.db"]
    fleet.close()


def test_shred_on_a_bucket_that_refuses_to_delete_a_version_says_so_after_erasing_the_rest(
        tmp_path, s3_server, s3_client, monkeypatch):
    monkeypatch.setenv(ENV_VAR, keyring_text("k1", b"\x01"))
    bucket, url = versioned_bucket(s3_server, s3_client, ObjectLockEnabledForBucket=True)
    fleet = encrypted_fleet(tmp_path, url)
    synced_and_compacted(fleet, tmp_path, "gone.db")
    assert isinstance(OnDemand(fleet).archive("gone.db"), Archived)
    key = f"replica/gone.db/{KEY_OBJECT}"
    (locked,) = [v["VersionId"] for v in s3_client.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]]
    s3_client.put_object_retention(Bucket=bucket, Key=key, VersionId=locked, Retention={
        "Mode": "COMPLIANCE", "RetainUntilDate": datetime.now(timezone.utc) + timedelta(days=1)})

    proc = cli_shred(tmp_path, fleet, "gone.db")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for said in ("objects are deleted and it is recorded as shredded", "old versions remain",
                 f"gone.db/{KEY_OBJECT} (version {locked}): AccessDenied", "tenantsync keys rotate"):
        assert said in proc.stderr, proc.stderr
    assert fleet.catalogue.get("gone.db").state.value == "shredded"
    assert not [k for k in raw_objects(url) if k.startswith("gone.db/")]  # the key's delete marker stays on top
    left = s3_client.list_object_versions(Bucket=bucket, Prefix="replica/gone.db/")
    assert [(v["Key"], v["VersionId"]) for v in left["Versions"]] == [(key, locked)]
    fleet.close()
