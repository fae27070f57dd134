"""Encryption at rest (issue 23): sealed objects and tenant keys.

The storage contract itself runs through SealedStorage in test_storage.py. Here: every
way of altering a sealed object is refused with one clear error (never wrong bytes),
ranged reads equal slices of the plaintext and fetch only what they cover, the store
never holds plaintext, and tenant keys are race-safe, rewrappable and bound to their tenant.
"""

from __future__ import annotations

import io
import json
import os
import tracemalloc
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantsync import tenant_key
from tenantsync.errors import KeyringError, ObjectNotFound, SealedObjectError, StorageError
from tenantsync.keyring import generate_kek, parse_keyring
from tenantsync.storage import open_storage
from tenantsync.storage import sealed as sealed_module
from tenantsync.storage.file import FileStorage
from tenantsync.storage.sealed import (
    HEADER_BYTES,
    KEY_OBJECT,
    TAG_BYTES,
    SealedStorage,
    plaintext_size,
    sealed_header,
    sealed_size,
)

from .test_storage import race

KEY_ID = "0123456789abcdef"
SEGMENT = 64
KEY = "ltx/0/0000000000000001-0000000000000001.ltx"
MARKER = b"INSERT INTO users VALUES(42, 'alice@example.com', 'secret-row-marker');"


@pytest.fixture
def inner(tmp_path):
    return FileStorage(tmp_path / "replica")


@pytest.fixture
def sealed(inner):
    return SealedStorage(inner, os.urandom(32), KEY_ID, segment_size=SEGMENT)


def replace_raw(inner, key, data):
    """Put ``data`` at ``key`` of the bare store, as an attacker with write access could."""
    inner.delete([key])
    inner.write_if_absent(key, data)


def refused(store, key, *, start=0, length=None, match=None):
    with pytest.raises(SealedObjectError, match=match) as e:
        store.read(key, start, length)
    message = str(e.value)
    assert "\n" not in message and key in message
    return message


# -- format --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 3 * SEGMENT + 5])
def test_stored_size_is_header_plus_tags_and_lists_as_plaintext_size(sealed, inner, size):
    data = os.urandom(size)
    sealed.write_if_absent(KEY, data)
    raw = inner.read(KEY)
    assert len(raw) == sealed_size(size, SEGMENT) == HEADER_BYTES + size + TAG_BYTES * max(1, -(-size // SEGMENT))
    assert plaintext_size(len(raw), SEGMENT) == size
    assert [o.size for o in sealed.list()] == [size]
    assert sealed.read(KEY) == data


def test_no_stored_size_is_ambiguous():
    seen = {}
    for size in range(2000):
        stored = sealed_size(size, 7)
        assert stored not in seen
        seen[stored] = size
    for stored in range(sealed_size(0, 7), sealed_size(1999, 7)):
        assert plaintext_size(stored, 7) == seen.get(stored)


def test_header_names_the_format_and_key_for_a_dump(sealed, inner):
    sealed.write_if_absent(KEY, b"x" * 1000)
    header = sealed_header(inner.read(KEY, 0, HEADER_BYTES))
    assert (header.version, header.segment_size, header.key_id, header.plaintext_size) == (1, SEGMENT, KEY_ID, 1000)
    assert inner.read(KEY, 0, 4) == b"TSE1"
    assert sealed_header(b"LTX1" + bytes(96)) is None
    with pytest.raises(SealedObjectError, match="truncated"):
        sealed_header(inner.read(KEY, 0, 20))


def test_lease_and_wrapped_key_stay_plain(sealed, inner):
    sealed.write_if_absent("lock.json", b'{"owner": "a"}')
    sealed.child("tenants/a").write_if_absent(KEY_OBJECT, b'{"format": 1}')
    assert inner.read("lock.json") == b'{"owner": "a"}'
    assert inner.read(f"tenants/a/{KEY_OBJECT}") == b'{"format": 1}'
    assert sealed.read("lock.json") == b'{"owner": "a"}'


# -- nothing altered is ever returned --------------------------------------------------


def test_every_flipped_byte_is_refused(sealed, inner):
    sealed.write_if_absent(KEY, MARKER * 3)  # 3 full segments and a partial one
    raw = inner.read(KEY)
    for at in range(len(raw)):
        altered = bytearray(raw)
        altered[at] ^= 0x01
        replace_raw(inner, KEY, bytes(altered))
        refused(sealed, KEY)
        segment = max(0, (at - HEADER_BYTES) // (SEGMENT + TAG_BYTES))
        refused(sealed, KEY, start=segment * SEGMENT, length=1)  # the altered segment alone


def test_every_truncation_is_refused(sealed, inner):
    sealed.write_if_absent(KEY, MARKER * 3)
    raw = inner.read(KEY)
    for cut in range(len(raw)):  # mid-header, at every segment boundary and inside every segment
        replace_raw(inner, KEY, raw[:cut])
        message = refused(sealed, KEY)
        if cut < 4:
            assert "not encrypted" in message  # not even the magic is left
        else:
            assert "truncated" in message


def test_a_boundary_cut_fails_on_the_last_flag_even_with_a_forged_size(sealed, inner):
    """Defence in depth: a cut after segment 1 is caught by the authenticated size, and even
    a header re-sealed with the smaller size (which takes the data key) leaves segment 1
    sealed as "not last" at the end, so it does not verify as the last one."""
    data = os.urandom(3 * SEGMENT)
    sealed.write_if_absent(KEY, data)
    raw = inner.read(KEY)
    cut = raw[: HEADER_BYTES + 2 * (SEGMENT + TAG_BYTES)]
    replace_raw(inner, KEY, cut)
    assert "truncated" in refused(sealed, KEY)

    magic, version, segment, key_id, _, salt = sealed_module._FIELDS.unpack_from(raw)
    fields = sealed_module._FIELDS.pack(magic, version, segment, key_id, 2 * SEGMENT, salt)
    aead = AESGCM(sealed._object_key(salt))
    header = fields + aead.encrypt(sealed_module._HEADER_NONCE, b"", fields + KEY.encode())
    replace_raw(inner, KEY, header + cut[HEADER_BYTES:])
    assert "does not decrypt (segment 1)" in refused(sealed, KEY)
    assert sealed.read(KEY, 0, SEGMENT) == data[:SEGMENT]  # segment 0 alone is intact, so it opens


def test_an_empty_object_is_verified_too(sealed, inner):
    """Its one empty segment carries a tag: cut or altered, a read of it is refused."""
    sealed.write_if_absent(KEY, b"")
    raw = inner.read(KEY)
    assert len(raw) == HEADER_BYTES + TAG_BYTES and sealed.read(KEY) == b""
    replace_raw(inner, KEY, raw[:-1])
    assert "truncated" in refused(sealed, KEY)
    replace_raw(inner, KEY, raw[:-1] + bytes([raw[-1] ^ 1]))
    assert "does not decrypt (segment 0)" in refused(sealed, KEY)


def test_appended_bytes_are_refused(sealed, inner):
    sealed.write_if_absent(KEY, MARKER)
    replace_raw(inner, KEY, inner.read(KEY) + b"\0" * (SEGMENT + TAG_BYTES))
    assert "extended" in refused(sealed, KEY)


def test_reordered_segments_are_refused(sealed, inner):
    sealed.write_if_absent(KEY, os.urandom(3 * SEGMENT))
    raw = inner.read(KEY)
    step = SEGMENT + TAG_BYTES
    segments = [raw[HEADER_BYTES + i * step : HEADER_BYTES + (i + 1) * step] for i in range(3)]
    replace_raw(inner, KEY, raw[:HEADER_BYTES] + segments[1] + segments[0] + segments[2])
    assert "segment 0" in refused(sealed, KEY)
    refused(sealed, KEY, start=SEGMENT, length=SEGMENT)


def test_swapped_and_moved_objects_are_refused(sealed, inner):
    other = KEY.replace("ltx/0/", "ltx/1/")
    sealed.write_if_absent(KEY, b"a" * 100)
    sealed.write_if_absent(other, b"b" * 100)
    a, b = inner.read(KEY), inner.read(other)
    replace_raw(inner, KEY, b)
    replace_raw(inner, other, a)
    assert "does not decrypt (its header)" in refused(sealed, KEY)
    refused(sealed, other)
    inner.write_if_absent("ltx/0/renamed.ltx", a)
    refused(sealed, "ltx/0/renamed.ltx")


def test_an_object_moved_to_another_tenant_under_the_same_key_is_refused(sealed, inner):
    acme, other = sealed.child("tenants/acme"), sealed.child("tenants").child("other")
    acme.write_if_absent(KEY, MARKER)
    assert isinstance(acme, SealedStorage) and acme.read(KEY) == MARKER
    inner.write_if_absent(f"tenants/other/{KEY}", inner.read(f"tenants/acme/{KEY}"))
    refused(other, KEY)
    assert sealed.read(f"tenants/acme/{KEY}") == MARKER  # the same object seen from the root opens


def test_a_wrong_data_key_is_refused(sealed, inner):
    sealed.write_if_absent(KEY, MARKER)
    same_id = SealedStorage(inner, os.urandom(32), KEY_ID, segment_size=SEGMENT)
    assert "does not decrypt" in refused(same_id, KEY)
    other_id = SealedStorage(inner, os.urandom(32), "fedcba9876543210", segment_size=SEGMENT)
    message = refused(other_id, KEY, match=f"sealed with key id {KEY_ID}, but this replica's key is fedcba9876543210")
    assert message.startswith(inner.object_url(KEY))


def test_a_plain_object_in_an_encrypted_replica_is_refused(sealed, inner):
    inner.write_if_absent(KEY, b"LTX1" + bytes(200))
    message = refused(sealed, KEY, match="is not encrypted, but this replica is")
    assert message.startswith(f"{inner.url}/{KEY} ")


def test_another_segment_size_is_refused(sealed, inner):
    SealedStorage(inner, sealed._data_key, KEY_ID, segment_size=SEGMENT * 2).write_if_absent(KEY, MARKER)
    refused(sealed, KEY, match=f"{SEGMENT * 2}-byte segments")


# -- ranged reads ------------------------------------------------------------------------


@pytest.mark.parametrize("slack", [0, sealed_module.ONE_REQUEST_SLACK])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=1500),
    segment=st.integers(1, 300),
    start=st.integers(0, 1600),
    length=st.none() | st.integers(1, 1600),
)
def test_any_range_reads_the_slice(monkeypatch, inner, slack, data, segment, start, length):
    monkeypatch.setattr(sealed_module, "ONE_REQUEST_SLACK", slack)  # 0: header and segments fetched apart
    store = SealedStorage(inner, b"k" * 32, KEY_ID, segment_size=segment)
    key = f"p/{uuid.uuid4().hex}"
    store.write_if_absent(key, data)
    assert store.read(key, start, length) == data[start : None if length is None else start + length]


class CountingFileStorage(FileStorage):
    """A real FileStorage that records the ranges read from it."""

    def __init__(self, root):
        super().__init__(root)
        self.reads = []

    def read(self, key, start=0, length=None):
        data = super().read(key, start, length)
        self.reads.append((start, length, len(data)))
        return data


def test_a_ranged_read_fetches_only_the_segments_it_covers(tmp_path):
    inner = CountingFileStorage(tmp_path)
    store = SealedStorage(inner, os.urandom(32), KEY_ID, segment_size=4096)
    data = os.urandom(4096 * 1000)
    store.write_if_absent(KEY, data)
    step = 4096 + TAG_BYTES

    inner.reads.clear()
    assert store.read(KEY, 0, 100) == data[:100]  # the LTX header: one request
    assert inner.reads == [(0, HEADER_BYTES + step, HEADER_BYTES + step)]

    inner.reads.clear()
    middle = 4096 * 500 - 10
    assert store.read(KEY, middle, 20) == data[middle : middle + 20]  # across a segment edge
    assert inner.reads == [(0, HEADER_BYTES, HEADER_BYTES), (HEADER_BYTES + 499 * step, 2 * step, 2 * step)]

    inner.reads.clear()
    assert store.read(KEY, len(data) - 16) == data[-16:]  # an LTX trailer
    assert inner.reads == [(0, HEADER_BYTES, HEADER_BYTES), (HEADER_BYTES + 999 * step, None, step)]

    inner.reads.clear()
    assert store.read(KEY, len(data) + 5, 10) == b""  # past the end: the header says so
    assert inner.reads == [(0, HEADER_BYTES, HEADER_BYTES)]


# -- what the store holds ----------------------------------------------------------------


def test_the_store_never_holds_the_plaintext(tmp_path):
    root = tmp_path / "replica"
    store = SealedStorage(FileStorage(root), os.urandom(32), KEY_ID, segment_size=SEGMENT)
    tenant = store.child("tenants/acme.db")
    tenant.write_if_absent(KEY, MARKER * 50)
    tenant.write_if_absent("ltx/9/snapshot.ltx", io.BytesIO(MARKER * 5000))
    etag = tenant.write_if_absent("small", MARKER)
    tenant.write_if_match("small", MARKER + MARKER, etag)
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tenantsync")]
    assert len(files) == 3
    for path in files:
        raw = path.read_bytes()
        assert raw.startswith(b"TSE1")
        assert b"alice@example.com" not in raw and b"INSERT" not in raw
    assert tenant.read("small") == MARKER * 2


def test_many_segments_from_a_file_stream_without_buffering_the_input(tmp_path):
    """A 32 MiB file input: Python's allocations stay a few MiB (the object is sealed as the
    store reads it, one segment held) and every segment boundary reads back."""
    source = tmp_path / "input"
    with open(source, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))
    store = SealedStorage(FileStorage(tmp_path / "replica"), os.urandom(32), KEY_ID, segment_size=4096)
    tracemalloc.start()
    try:
        with open(source, "rb") as f:
            store.write_if_absent(KEY, f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"sealing a 32 MiB file allocated up to {peak} bytes"
    (info,) = store.list()
    assert info.size == 32 << 20
    with open(source, "rb") as f:
        for at in (0, 4095, 4096, (16 << 20) - 3, (32 << 20) - 100):
            f.seek(at)
            assert store.read(KEY, at, 200) == f.read(200)


def test_a_file_input_is_read_from_its_position(sealed):
    f = io.BytesIO(b"skip me|" + MARKER)
    f.seek(8)
    sealed.write_if_absent(KEY, f)
    assert sealed.read(KEY) == MARKER


# -- tenant keys ---------------------------------------------------------------------------


def keyring(current="k1", **keys):
    keys = keys or {"k1": generate_kek()}
    return parse_keyring(json.dumps({"keys": keys, "current": current}))


def test_racing_creators_of_a_tenant_key_end_with_one_key(tmp_path):
    storage = FileStorage(tmp_path / "tenants" / "acme")
    ring = keyring()
    results, errors = race(16, lambda i: tenant_key.load_or_create(storage, "acme", ring))
    assert errors == [] and len(results) == 16
    assert len({r.data_key for r in results}) == 1 and len({r.key_id for r in results}) == 1
    assert [o.key for o in storage.list()] == [KEY_OBJECT]
    assert tenant_key.load(storage, "acme", ring).data_key == results[0].data_key


def test_tenant_key_object_is_plain_json_naming_its_kek(tmp_path):
    storage = FileStorage(tmp_path)
    key = tenant_key.load_or_create(storage, "acme", keyring())
    doc = json.loads(storage.read(KEY_OBJECT))
    assert doc == {"format": 1, "tenant": "acme", "kek": "k1", "key_id": key.key_id, "wrapped": doc["wrapped"]}
    assert key.key_id == tenant_key.key_id(key.data_key) and len(key.key_id) == 16
    assert key.data_key.hex() not in repr(key)


def test_sealed_data_survives_rewrap_and_retiring_the_old_kek(tmp_path):
    storage = FileStorage(tmp_path / "acme")
    old, new = generate_kek(), generate_kek()
    both = keyring("k1", k1=old, k2=new)
    key = tenant_key.load_or_create(storage, "acme", both)
    key.seal(storage, segment_size=SEGMENT).write_if_absent(KEY, MARKER * 10)

    rewrapped = tenant_key.rewrap(storage, "acme", both, "k2")
    assert (rewrapped.kek, rewrapped.data_key) == ("k2", key.data_key) and rewrapped.etag != key.etag
    assert tenant_key.rewrap(storage, "acme", both, "k2") == rewrapped  # already done: nothing written

    only_new = keyring("k2", k2=new)
    reopened = tenant_key.load(storage, "acme", only_new)
    assert reopened.seal(storage, segment_size=SEGMENT).read(KEY) == MARKER * 10
    with pytest.raises(KeyringError, match=r"keyring has no key 'k2' \(it has: k1\)"):
        tenant_key.load(storage, "acme", keyring("k1", k1=old))


def test_a_wrapped_key_moved_to_another_tenant_does_not_open(tmp_path):
    root = FileStorage(tmp_path)
    ring = keyring()
    tenant_key.load_or_create(root.child("acme"), "acme", ring)
    raw = root.read(f"acme/{KEY_OBJECT}")
    root.write_if_absent(f"other/{KEY_OBJECT}", raw)
    with pytest.raises(KeyringError, match="is the key of tenant 'acme', not of 'other'"):
        tenant_key.load(root.child("other"), "other", ring)

    forged = json.loads(raw) | {"tenant": "other"}
    replace_raw(root, f"other/{KEY_OBJECT}", json.dumps(forged).encode())
    with pytest.raises(KeyringError, match="tenant key of 'other' does not open with key 'k1': wrong key or tampered"):
        tenant_key.load(root.child("other"), "other", ring)


def test_a_kek_with_the_right_name_but_other_material_does_not_open(tmp_path):
    storage = FileStorage(tmp_path)
    tenant_key.load_or_create(storage, "acme", keyring())
    with pytest.raises(KeyringError) as e:
        tenant_key.load(storage, "acme", keyring())  # another k1
    assert str(e.value) == "tenant key of 'acme' does not open with key 'k1': wrong key or tampered"


def test_a_malformed_or_altered_key_object_is_refused(tmp_path):
    storage = FileStorage(tmp_path)
    ring = keyring()
    tenant_key.load_or_create(storage, "acme", ring)
    doc = json.loads(storage.read(KEY_OBJECT))
    for raw, message in [
        (b"not json", "is not a tenant key"),
        (json.dumps(doc | {"format": 2}).encode(), "format 2"),
        (json.dumps(doc | {"key_id": "0" * 16}).encode(), "does not match the key it holds"),
    ]:
        replace_raw(storage, KEY_OBJECT, raw)
        with pytest.raises(KeyringError, match=message) as e:
            tenant_key.load(storage, "acme", ring)
        assert "\n" not in str(e.value)


def test_deleting_the_tenant_key_leaves_nothing_to_open(tmp_path):
    storage = FileStorage(tmp_path)
    ring = keyring()
    tenant_key.load_or_create(storage, "acme", ring)
    tenant_key.delete(storage)
    tenant_key.delete(storage)
    with pytest.raises(ObjectNotFound):
        tenant_key.load(storage, "acme", ring)


def test_tenant_keys_on_s3_through_the_sealed_store(s3_url):
    """The key object passes through a sealed view, so either view can hold it; on S3 too."""
    bare = open_storage(s3_url).child("tenants/acme.db")
    ring = keyring()
    key = tenant_key.load_or_create(bare, "acme.db", ring)
    store = key.seal(bare, segment_size=SEGMENT)
    again = tenant_key.load_or_create(store, "acme.db", ring)
    assert (again.key_id, again.kek, again.data_key, again.etag) == (key.key_id, key.kek, key.data_key, None)
    assert tenant_key.load(store, "acme.db", ring).etag == key.etag  # listed, for a compare-and-swap
    store.write_if_absent(KEY, MARKER * 5)
    assert store.read(KEY, 70, 200) == (MARKER * 5)[70:270]
    assert MARKER not in bare.read(KEY)


def test_a_body_read_again_after_its_input_changed_is_refused_before_a_nonce_is_reused(sealed):
    """A store reads a write's body more than once (hashes, retries); each pass encrypts
    again under the same nonces, which is safe only for the same plaintext."""
    source = io.BytesIO(MARKER * 100)
    body = sealed._seal(KEY, source)
    first = body.read()
    body.seek(0)
    assert body.read() == first  # the same input: the same bytes, again
    source.seek(len(MARKER) * 50)
    source.write(b"X")
    body.seek(0)
    with pytest.raises(StorageError, match="changed while it was sent"):
        body.read()
