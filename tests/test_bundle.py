"""Cold bundles and fleet dictionaries: a bundle restores byte for byte to the database it
was written from, on both backends, and anything else (a flipped byte, a truncated or
renamed object, a missing dictionary) is refused in one line with nothing at the output."""

from __future__ import annotations

import os
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantsync import bundle, dictionary, layout
from tenantsync.bundle import restore_bundle, verify_bundle, write_bundle
from tenantsync.dictionary import Dictionaries
from tenantsync.errors import BundleError, DictionaryMissing, OutputExists
from tenantsync.ltx import database_checksum
from tenantsync.replica import Replica
from tenantsync.storage import open_storage

from .dbutil import app_db, write_rows

TXID = 0x2A


def saas_db(path, seed: int, rows: int = 300):
    """A small app database: the same schema and kinds of values in every tenant."""
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT, created TEXT);
        CREATE TABLE tasks(id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users, title TEXT,
                           status TEXT, due TEXT);
        CREATE INDEX tasks_user ON tasks(user_id);
    """)
    conn.executemany("INSERT INTO users(email, name, created) VALUES (?, ?, ?)",
                     [(f"user{i}@tenant{seed}.example.com", f"User {i} of {seed}",
                       f"2026-0{1 + i % 9}-1{i % 10}T09:{i % 60:02d}:00Z") for i in range(rows)])
    conn.executemany("INSERT INTO tasks(user_id, title, status, due) VALUES (?, ?, ?, ?)",
                     [(1 + i % rows, f"Follow up on ticket #{seed * 1000 + i}", ("open", "done", "blocked")[i % 3],
                       f"2026-1{i % 3}-0{1 + i % 9}") for i in range(rows * 2)])
    conn.commit()
    conn.close()
    return str(path)


def checksum_of(path) -> int:
    data = open(path, "rb").read()
    page_size = int.from_bytes(data[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    return database_checksum((i // page_size + 1, data[i:i + page_size]) for i in range(0, len(data), page_size))


def integrity(path) -> list:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fleet_dbs(tmp_path_factory):
    """Twelve tenants of one schema: ten to train a dictionary on, two to bundle."""
    base = tmp_path_factory.mktemp("fleet")
    return [saas_db(base / f"t{i}.db", i) for i in range(12)]


@pytest.fixture(scope="module")
def trained(fleet_dbs):
    return dictionary.train(fleet_dbs[:10], size=16 << 10)


@pytest.fixture
def tenant(storage):
    return storage.child("acme.db")


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("with_dictionary", [False, True], ids=["plain", "dictionary"])
def test_round_trip_is_byte_identical(storage, tenant, fleet_dbs, trained, with_dictionary, tmp_path):
    src = fleet_dbs[11]
    zdict = trained if with_dictionary else None
    if zdict:
        assert dictionary.store(storage, zdict) == zdict.dict_id()
    info = write_bundle(tenant, src, TXID, dictionary=zdict)
    assert info.key == "bundle/000000000000002a.tsb"
    assert (info.txid, info.page_size, info.db_size) == (TXID, 4096, os.path.getsize(src))
    assert info.ltx_checksum == checksum_of(src)
    assert info.dictionary_id == (zdict.dict_id() if zdict else None)
    assert info.size < os.path.getsize(src) // 2
    assert bundle.read_manifest(tenant, info.key) == info

    out = tmp_path / "restored" / "acme.db"
    restored = restore_bundle(tenant, info.key, str(out), dictionaries=Dictionaries(storage))
    assert restored == info
    assert out.read_bytes() == open(src, "rb").read()
    assert integrity(out) == [("ok",)]
    assert verify_bundle(tenant, info.key, TXID, checksum_of(src), dictionaries=Dictionaries(storage)) == info


def test_dictionary_shrinks_bundles_of_a_similar_tenant(tmp_path, fleet_dbs, trained):
    store = open_storage(str(tmp_path / "replica"))
    plain = write_bundle(store.child("a"), fleet_dbs[10], 1)
    shared = write_bundle(store.child("b"), fleet_dbs[10], 1, dictionary=trained)
    assert shared.size < plain.size * 0.9


def test_multi_frame_database_streams_in_ranged_reads(storage, tmp_path, monkeypatch):
    """Several frames, several ranged reads after the first: random rows do not compress,
    so the bundle is bigger than the shrunken first read and read block."""
    monkeypatch.setattr(bundle, "FRAME_SIZE", 64 << 10)
    monkeypatch.setattr(bundle, "FIRST_READ", 48 << 10)
    monkeypatch.setattr(bundle, "READ_BLOCK", 40 << 10)
    src = tmp_path / "big.db"
    conn = app_db(src, page_size=1024)
    write_rows(conn, 2000, size=200)
    conn.close()
    info = write_bundle(storage.child("big.db"), str(src), TXID)
    assert len(info.frames) > 5 and info.size > 4 * bundle.READ_BLOCK
    out = tmp_path / "out.db"
    restore_bundle(storage.child("big.db"), info.key, str(out))
    assert out.read_bytes() == src.read_bytes()
    assert integrity(out) == [("ok",)]


def test_write_is_idempotent_and_never_replaces_another_database(tmp_path, fleet_dbs):
    tenant = open_storage(str(tmp_path / "replica")).child("acme.db")
    first = write_bundle(tenant, fleet_dbs[0], TXID)
    with open(fleet_dbs[0], "rb") as f:  # a retried archival, here from an open file
        assert write_bundle(tenant, f, TXID) == first
    with pytest.raises(BundleError, match="already holds another database at txid 000000000000002a"):
        write_bundle(tenant, fleet_dbs[1], TXID)


def test_not_a_database_is_refused(tmp_path):
    tenant = open_storage(str(tmp_path / "replica")).child("acme.db")
    (tmp_path / "x").write_bytes(b"hello" * 1000)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(BundleError, match="not a SQLite database"):
        write_bundle(tenant, str(tmp_path / "x"), TXID)
    with pytest.raises(BundleError, match="empty file"):
        write_bundle(tenant, str(tmp_path / "empty"), TXID)
    assert list(tenant.list()) == []


def test_existing_output_is_kept_unless_forced(tmp_path, fleet_dbs):
    tenant = open_storage(str(tmp_path / "replica")).child("acme.db")
    info = write_bundle(tenant, fleet_dbs[0], TXID)
    out = tmp_path / "acme.db"
    out.write_bytes(b"mine")
    (tmp_path / "acme.db-wal").write_bytes(b"stale wal")
    with pytest.raises(OutputExists):
        restore_bundle(tenant, info.key, str(out))
    assert out.read_bytes() == b"mine"
    restore_bundle(tenant, info.key, str(out), force=True)
    assert out.read_bytes() == open(fleet_dbs[0], "rb").read()
    assert not (tmp_path / "acme.db-wal").exists()


# -- corruption: refused in one line, nothing at the output, verification fails ------------


def _rewrite(store, key, change):
    data = store.read(key)
    store.delete([key])
    store.write_if_absent(key, change(data))


def _flip(at):
    def change(data):
        pos = at(data)
        return data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1:]
    return change


CORRUPTIONS = {
    "magic": (_flip(lambda d: 0), "bad magic"),
    "manifest length": (_flip(lambda d: 5), "truncated bundle|over the"),
    "manifest byte": (_flip(lambda d: bundle._PREFIX.size + 20), "manifest checksum mismatch"),
    "manifest crc": (_flip(lambda d: 10), "manifest checksum mismatch"),
    "compressed byte": (_flip(lambda d: len(d) - 300), "corrupt zstd frame|mismatch"),
    "frame checksum": (_flip(lambda d: len(d) - 2), "corrupt zstd frame"),
    "truncated": (lambda d: d[:-100], "truncated bundle"),
    "cut in manifest": (lambda d: d[:40], "truncated bundle"),
    "empty": (lambda d: d[:3], "truncated bundle"),
    "extra bytes": (lambda d: d + b"\0", "longer than"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_corrupt_bundle_is_refused_with_no_output(storage, tenant, fleet_dbs, tmp_path, corruption):
    change, message = CORRUPTIONS[corruption]
    info = write_bundle(tenant, fleet_dbs[0], TXID)
    _rewrite(tenant, info.key, change)
    out = tmp_path / "out" / "acme.db"
    with pytest.raises(BundleError, match=message) as refused:
        restore_bundle(tenant, info.key, str(out))
    assert "\n" not in str(refused.value) and info.key in str(refused.value)
    assert os.listdir(out.parent) == []
    # The archival's check: it fails, so the tenant's LTX levels would be kept.
    with pytest.raises(BundleError, match=message):
        verify_bundle(tenant, info.key, TXID, checksum_of(fleet_dbs[0]))


def test_bundle_under_another_txid_is_refused(tmp_path, fleet_dbs):
    tenant = open_storage(str(tmp_path / "replica")).child("acme.db")
    info = write_bundle(tenant, fleet_dbs[0], TXID)
    moved = layout.bundle_key(TXID + 1)
    tenant.write_if_absent(moved, tenant.read(info.key))
    with pytest.raises(BundleError, match="holds txid 000000000000002a, not the 000000000000002b its name says"):
        restore_bundle(tenant, moved, str(tmp_path / "out.db"))
    assert not (tmp_path / "out.db").exists()


def test_verify_refuses_another_txid_or_checksum(tmp_path, fleet_dbs):
    tenant = open_storage(str(tmp_path / "replica")).child("acme.db")
    info = write_bundle(tenant, fleet_dbs[0], TXID)
    with pytest.raises(BundleError, match="holds txid 000000000000002a, expected 000000000000002b"):
        verify_bundle(tenant, info.key, TXID + 1, info.ltx_checksum)
    with pytest.raises(BundleError, match="LTX checksum is .*, expected"):
        verify_bundle(tenant, info.key, TXID, checksum_of(fleet_dbs[1]))


def test_missing_dictionary_is_named(storage, tenant, fleet_dbs, trained, tmp_path):
    info = write_bundle(tenant, fleet_dbs[11], TXID, dictionary=trained)  # never stored
    out = tmp_path / "out" / "acme.db"
    with pytest.raises(DictionaryMissing) as missing:
        restore_bundle(tenant, info.key, str(out), dictionaries=Dictionaries(storage))
    assert f"_dictionaries/{trained.dict_id()}.zdict" in str(missing.value)
    assert f"zstd dictionary {trained.dict_id()} is missing" in str(missing.value)
    with pytest.raises(DictionaryMissing, match=f"needs zstd dictionary {trained.dict_id()}"):
        restore_bundle(tenant, info.key, str(out))
    with pytest.raises(DictionaryMissing):
        verify_bundle(tenant, info.key, TXID, info.ltx_checksum, dictionaries=Dictionaries(storage))
    assert os.listdir(out.parent) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_flipped_byte_is_refused_or_harmless(tmp_path_factory, fleet_dbs, position, mask):
    """Never a wrong database: a flip anywhere is refused, or (a bit zstd ignores) restores
    the very same bytes."""
    base = tmp_path_factory.mktemp("flip")
    tenant = open_storage(str(base / "replica")).child("acme.db")
    info = write_bundle(tenant, fleet_dbs[0], TXID)
    pos = int(position * info.size)
    _rewrite(tenant, info.key, lambda d: d[:pos] + bytes([d[pos] ^ mask]) + d[pos + 1:])
    out = base / "acme.db"
    try:
        restore_bundle(tenant, info.key, str(out))
    except BundleError:
        assert not out.exists()
    else:
        assert out.read_bytes() == open(fleet_dbs[0], "rb").read()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_size=st.sampled_from([512, 1024, 4096, 65536]), data=st.data())
def test_random_pages_round_trip(tmp_path_factory, page_size, data):
    """Any page contents (behind a SQLite header) come back exactly, with LTX's checksum."""
    pages = data.draw(st.lists(st.binary(min_size=0, max_size=64), min_size=0, max_size=40))
    header = b"SQLite format 3\x00" + (1 if page_size == 65536 else page_size).to_bytes(2, "big")
    image = b"".join(p.ljust(page_size, p[-1:] or b"\0") for p in [header] + pages)
    base = tmp_path_factory.mktemp("pages")
    (base / "src.db").write_bytes(image)
    tenant = open_storage(str(base / "replica")).child("t")
    info = write_bundle(tenant, str(base / "src.db"), TXID, level=1)
    assert info.ltx_checksum == checksum_of(base / "src.db") and info.page_count == len(pages) + 1
    restore_bundle(tenant, info.key, str(base / "out.db"))
    assert (base / "out.db").read_bytes() == image


# -- layout and dictionaries ---------------------------------------------------------------


def test_bundles_are_invisible_to_ltx_listings(tmp_path, fleet_dbs):
    for kind in ("file", "s3"):
        assert layout.parse_ltx_key(kind, layout.bundle_key(TXID)) is None
    assert layout.parse_bundle_key(layout.bundle_key(TXID)) == TXID
    assert layout.parse_bundle_key("bundle/0000000000000000.tsb") is None
    assert layout.parse_bundle_key(layout.ltx_key("file", 9, 1, TXID)) is None
    tenant = open_storage(str(tmp_path / "replica")).child("acme.db")
    write_bundle(tenant, fleet_dbs[0], TXID)
    assert not any(Replica(tenant).all_files().values())


def test_dictionary_is_content_addressed_and_checked_on_load(tmp_path, fleet_dbs, trained):
    fleet = open_storage(str(tmp_path / "replica"))
    assert dictionary.train(fleet_dbs[:10], size=16 << 10).as_bytes() == trained.as_bytes()
    other = dictionary.train(fleet_dbs[1:11], size=16 << 10)
    assert other.dict_id() != trained.dict_id()
    dict_id = dictionary.store(fleet, trained)
    assert dictionary.store(fleet, trained) == dict_id  # a retried upload
    assert [o.key for o in fleet.list()] == [f"_dictionaries/{dict_id}.zdict"]

    key = dictionary.dictionary_key(other.dict_id())
    _flipped = other.as_bytes()[:-1] + bytes([other.as_bytes()[-1] ^ 1])
    fleet.write_if_absent(key, _flipped)
    with pytest.raises(BundleError, match=f"not the content-addressed zstd dictionary {other.dict_id()}"):
        Dictionaries(fleet).get(other.dict_id())
    with pytest.raises(BundleError, match="holds another dictionary"):
        dictionary.store(fleet, other)


def test_restores_use_the_cache_but_verification_reads_the_stored_dictionary(tmp_path, fleet_dbs, trained):
    """After a verification the LTX levels go: the dictionary must be in storage then, not
    only in this process's memory."""
    fleet = open_storage(str(tmp_path / "replica"))
    dict_id = dictionary.store(fleet, trained)
    info = write_bundle(fleet.child("acme.db"), fleet_dbs[11], TXID, dictionary=trained)
    restore_bundle(fleet.child("acme.db"), info.key, str(tmp_path / "a.db"), dictionaries=Dictionaries(fleet))
    fleet.delete([dictionary.dictionary_key(dict_id)])
    restore_bundle(fleet.child("acme.db"), info.key, str(tmp_path / "b.db"), dictionaries=Dictionaries(fleet))
    with pytest.raises(DictionaryMissing, match=f"zstd dictionary {dict_id} is missing"):
        verify_bundle(fleet.child("acme.db"), info.key, TXID, info.ltx_checksum, dictionaries=Dictionaries(fleet))
