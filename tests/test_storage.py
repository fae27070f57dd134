"""The storage contract: one suite, run on every backend, at the root and in a child,
bare and through the encryption layer (SealedStorage must keep the contract it wraps).

A backend is correct when it passes this file unchanged; backend-specific checks (where
the timestamp is stored, the file backend's own lock) are the few tests at the end.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tenantsync.errors import ObjectNotFound, PreconditionFailed, StorageError, StorageUnavailable
from tenantsync.storage import open_storage
from tenantsync.storage.file import FileStorage
from tenantsync.storage import s3 as s3_module
from tenantsync.storage.s3 import S3Storage, format_timestamp
from tenantsync.storage.sealed import SealedStorage

HOSTILE_KEYS = ["../x", "/abs", "a//b", "", "a/./b", "a/..", "x/", ".tenantsync.lock", "d/.tenantsync-1.tmp"]


@pytest.fixture(params=["plain", "sealed"])
def storage(request, storage_url):
    """A fresh, empty Storage, once per backend, bare or sealed. The sealed one's segments
    are 100 bytes, so the suite's objects span several and its ranges cross their edges."""
    store = open_storage(storage_url)
    if request.param == "sealed":
        store = SealedStorage(store, os.urandom(32), "0123456789abcdef", segment_size=100)
    return store


@pytest.fixture(params=["root", "child"])
def store(request, storage):
    """The backend under test, at its root or scoped to one tenant's prefix."""
    return storage if request.param == "root" else storage.child("tenants/a.db")


def keys_of(store, prefix=""):
    return [o.key for o in store.list(prefix)]


def race(n, fn):
    """Run fn(i) in n threads released together; return (results, exceptions)."""
    barrier = threading.Barrier(n)
    results, errors = [], []

    def run(i):
        barrier.wait()
        try:
            results.append(fn(i))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


# -- list --------------------------------------------------------------------------


def test_missing_root_lists_nothing(store):
    assert keys_of(store) == []
    assert keys_of(store, "ltx/0/") == []


def test_list_is_sorted_by_key_and_filtered_by_string_prefix(store):
    keys = ["b/1", "a/c/d", "ab", "a.x", "a/b", "a-b", "lock.json"]
    etags = {k: store.write_if_absent(k, k.encode()) for k in keys}

    listed = list(store.list())
    assert [o.key for o in listed] == sorted(keys)  # "a-b" < "a.x" < "a/b" < "a/c/d" < "ab"
    for o in listed:
        assert o.size == len(o.key) and o.etag == etags[o.key]
        assert o.modified.tzinfo is not None and o.modified.utcoffset().total_seconds() == 0
    assert keys_of(store, "a/") == ["a/b", "a/c/d"]
    assert keys_of(store, "a") == ["a-b", "a.x", "a/b", "a/c/d", "ab"]
    assert keys_of(store, "a/c") == ["a/c/d"]
    assert keys_of(store, "b/") == ["b/1"]
    assert keys_of(store, "zz/") == []


def test_list_paginates_and_child_scopes_keys(storage):
    """Over 1000 keys (one S3 page) in a child, next to look-alike siblings."""
    tenant = storage.child("tenants/t.db")
    n = 1001
    for i in range(n):
        tenant.write_if_absent(f"k/{i:05d}", b"x")
    storage.write_if_absent("tenants/t.db-other", b"sibling")
    storage.write_if_absent("tenants/t.dbx/k/00000", b"sibling")

    assert keys_of(tenant) == [f"k/{i:05d}" for i in range(n)]
    assert keys_of(tenant, "k/0100") == [f"k/{i:05d}" for i in range(1000, n)]
    assert len(keys_of(storage, "tenants/")) == n + 2

    tenant.delete(f"k/{i:05d}" for i in range(n))  # two DeleteObjects batches on S3
    assert keys_of(tenant) == []
    assert keys_of(storage) == ["tenants/t.db-other", "tenants/t.dbx/k/00000"]


# -- read --------------------------------------------------------------------------


def test_read_whole_object_and_byte_ranges(store):
    data = bytes(range(256)) * 4
    store.write_if_absent("ltx/0/f.ltx", data)
    assert store.read("ltx/0/f.ltx") == data
    assert store.read("ltx/0/f.ltx", 10, 5) == data[10:15]
    assert store.read("ltx/0/f.ltx", 0, 100) == data[:100]
    assert store.read("ltx/0/f.ltx", 1000) == data[1000:]
    assert store.read("ltx/0/f.ltx", 1020, 100) == data[1020:]  # short: the object ends first
    assert store.read("ltx/0/f.ltx", 1024) == b""
    assert store.read("ltx/0/f.ltx", 5000, 1) == b""
    with pytest.raises(ValueError):
        store.read("ltx/0/f.ltx", -1)
    with pytest.raises(ValueError):
        store.read("ltx/0/f.ltx", 0, 0)


def test_read_missing_key_is_object_not_found(store):
    store.write_if_absent("dir/present", b"x")
    for key in ("absent", "dir/absent", "dir", "nodir/absent"):
        with pytest.raises(ObjectNotFound, match=key):
            store.read(key)
        with pytest.raises(ObjectNotFound):
            store.read(key, 1, 1)


# -- write_if_absent ---------------------------------------------------------------


def test_write_if_absent_never_overwrites(store):
    etag = store.write_if_absent("lock.json", b"first")
    with pytest.raises(PreconditionFailed, match="lock.json"):
        store.write_if_absent("lock.json", b"second")
    assert store.read("lock.json") == b"first"
    assert [o.etag for o in store.list()] == [etag]


def test_write_if_absent_streams_a_file_object(store):
    data = os.urandom(100_000)
    store.write_if_absent("big", io.BytesIO(data))
    assert store.read("big") == data


def test_racing_write_if_absent_has_exactly_one_winner(store):
    results, errors = race(16, lambda i: (i, store.write_if_absent("ltx/0/race.ltx", b"writer %d" % i)))
    assert len(results) == 1, errors
    assert len(errors) == 15 and all(isinstance(e, PreconditionFailed) for e in errors), errors
    (winner, etag), = results
    assert store.read("ltx/0/race.ltx") == b"writer %d" % winner
    assert [o.etag for o in store.list()] == [etag]


# -- write_if_match ----------------------------------------------------------------


def test_write_if_match_is_compare_and_swap(store):
    first = store.write_if_absent("lock.json", b'{"generation": 1}')
    second = store.write_if_match("lock.json", b'{"generation": 2}', first)
    assert second != first
    assert store.read("lock.json") == b'{"generation": 2}'
    assert [o.etag for o in store.list()] == [second]

    with pytest.raises(PreconditionFailed, match="lock.json"):
        store.write_if_match("lock.json", b'{"generation": 3}', first)  # stale
    with pytest.raises(PreconditionFailed):
        store.write_if_match("lock.json", b'{"generation": 3}', "not-an-etag")
    assert store.read("lock.json") == b'{"generation": 2}'

    third = store.write_if_match("lock.json", b'{"generation": 3}', second)
    assert store.read("lock.json") == b'{"generation": 3}' and third not in (first, second)


def test_write_if_match_on_missing_key_fails(store):
    etag = store.write_if_absent("a/lock.json", b"x")
    for key in ("lock.json", "a/other.json", "b/lock.json"):
        with pytest.raises(PreconditionFailed, match=key):
            store.write_if_match(key, b"y", etag)
    assert keys_of(store) == ["a/lock.json"]


# -- delete ------------------------------------------------------------------------


def test_delete_is_idempotent(store):
    store.write_if_absent("ltx/0/a.ltx", b"a")
    store.write_if_absent("ltx/0/b.ltx", b"b")
    store.delete(["ltx/0/a.ltx", "ltx/0/missing.ltx", "nodir/missing"])
    assert keys_of(store) == ["ltx/0/b.ltx"]
    store.delete(["ltx/0/a.ltx", "ltx/0/b.ltx"])
    store.delete(["ltx/0/a.ltx", "ltx/0/b.ltx"])
    store.delete([])
    assert keys_of(store) == []
    store.write_if_absent("ltx/0/a.ltx", b"again")  # a deleted key can be created anew
    assert store.read("ltx/0/a.ltx") == b"again"


def test_delete_all_versions_erases_a_prefix_and_nothing_beside_it(store):
    """On a store that keeps no versions (file://, an unversioned bucket) every version is
    the current one: they go, and only under the prefix ("a/" is not "ab/" nor "a.x")."""
    for key in ("a/1", "a/2", "ab/1", "a.x", "b/a/1"):
        store.write_if_absent(key, key.encode())
    etag = store.write_if_absent("a/lock.json", b"1")
    store.write_if_match("a/lock.json", b"2", etag)
    store.delete(["a/2"])
    assert store.delete_all_versions("a/") == 2  # a/1, a/lock.json
    assert keys_of(store) == ["a.x", "ab/1", "b/a/1"]
    assert store.delete_all_versions("a/") == 0
    assert store.read("ab/1") == b"ab/1"


# -- timestamps --------------------------------------------------------------------


def stored_timestamp(request, store, key):
    """Where Litestream reads an LTX file's time: the mtime, or the S3 metadata string."""
    if isinstance(store, SealedStorage):
        store = store.inner
    if isinstance(store, FileStorage):
        return os.stat(os.path.join(store.root, key)).st_mtime_ns
    head = request.getfixturevalue("s3_client").head_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}")
    return head["Metadata"]["litestream-timestamp"]


@pytest.mark.parametrize(
    "timestamp, text",
    [
        (datetime(2024, 5, 6, 7, 8, 9, 123456, timezone.utc), "2024-05-06T07:08:09.123Z"),
        (datetime(2024, 5, 6, 7, 8, 9, 120000, timezone.utc), "2024-05-06T07:08:09.12Z"),
        (datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc), "2024-05-06T07:08:09Z"),
    ],
)
def test_timestamp_is_stored_where_litestream_reads_it(request, store, timestamp, text):
    ms = int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    etag = store.write_if_absent("0009/f.ltx", b"ltx", timestamp=timestamp)
    store.write_if_match("0009/f.ltx", b"ltx2", etag, timestamp=timestamp)
    expected = text if store.kind == "s3" else ms * 1_000_000
    assert stored_timestamp(request, store, "0009/f.ltx") == expected
    if store.kind == "file":  # S3's LastModified is the upload time instead
        (info,) = store.list()
        assert info.modified == datetime.fromtimestamp(ms / 1000, timezone.utc)


def test_naive_timestamp_is_rejected(store):
    with pytest.raises(ValueError, match="timezone-aware"):
        store.write_if_absent("f", b"x", timestamp=datetime(2024, 1, 1))


def test_format_timestamp_matches_go_rfc3339nano():
    assert format_timestamp(datetime(2025, 1, 2, 3, 4, 5, 7000, timezone.utc)) == "2025-01-02T03:04:05.007Z"
    assert format_timestamp(datetime(2025, 1, 2, 3, 4, 5, 500999, timezone.utc)) == "2025-01-02T03:04:05.5Z"
    assert format_timestamp(datetime.fromisoformat("2025-01-02T05:04:05.100+02:00")) == "2025-01-02T03:04:05.1Z"


# -- keys and children -------------------------------------------------------------


def test_hostile_keys_are_rejected_everywhere(store, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    for key in HOSTILE_KEYS:
        calls = [
            lambda: store.read(key),
            lambda: store.write_if_absent(key, b"x"),
            lambda: store.write_if_match(key, b"x", "etag"),
            lambda: store.delete(["ok", key]),
            lambda: store.child(key),
        ]
        if key not in ("", "x/"):  # both are valid list prefixes
            calls.append(lambda: list(store.list(key)))
            calls.append(lambda: store.delete_all_versions(key))
        for call in calls:
            with pytest.raises(StorageError, match="invalid storage key") as e:
                call()
            assert repr(key) in str(e.value)
    assert keys_of(store) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing escaped the root


def test_child_is_a_scoped_view_of_the_same_backend(storage):
    tenant = storage.child("tenants").child("a.db")
    assert type(tenant) is type(storage) and tenant.kind == storage.kind
    tenant.write_if_absent("lock.json", b"x")
    assert keys_of(storage) == ["tenants/a.db/lock.json"]
    assert str(tenant) == tenant.url
    assert keys_of(open_storage(tenant.url)) == ["lock.json"]  # the child's URL opens the child
    if storage.kind == "file":
        assert tenant.url == storage.url + "/tenants/a.db"
    else:
        base, _, query = storage.url.partition("?")
        assert tenant.url == f"{base}/tenants/a.db?{query}"


# -- errors from the backend -------------------------------------------------------


def test_unreachable_endpoint_is_unavailable_quickly(aws_env):
    store = open_storage("s3://bkt/p?endpoint=http://127.0.0.1:1&forcePathStyle=true")
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match="127.0.0.1:1") as e:
        store.read("lock.json")
    assert time.monotonic() - start < 5
    assert "lock.json" in str(e.value) and "\n" not in str(e.value)


def test_missing_bucket_is_a_storage_error(s3_server):
    store = open_storage(f"s3://no-such-bucket-here/p?endpoint={s3_server}")
    with pytest.raises(StorageError, match="NoSuchBucket") as e:
        list(store.list())
    assert not isinstance(e.value, (StorageUnavailable, ObjectNotFound))


# -- open_storage ------------------------------------------------------------------


def test_open_storage_file_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_storage("rel/dir").url == f"file://{tmp_path}/rel/dir"
    assert open_storage(str(tmp_path / "x")).url == f"file://{tmp_path}/x"
    assert open_storage(f"file://{tmp_path}/x/").url == f"file://{tmp_path}/x"
    assert open_storage(f"file://localhost{tmp_path}/x").url == f"file://{tmp_path}/x"
    spaced = open_storage(f"file://{tmp_path}/a%20b")
    assert spaced.root == f"{tmp_path}/a b" and open_storage(spaced.url).root == spaced.root
    assert open_storage("file:///a/b").kind == "file"


def test_open_storage_s3_urls(aws_env):
    s = open_storage("s3://bkt//replicas/./db/?endpoint=minio.lan:9000&region=eu-west-1&skip-verify=true")
    assert isinstance(s, S3Storage) and s.kind == "s3"
    assert (s.bucket, s.prefix, s.endpoint, s.region) == ("bkt", "replicas/db", "https://minio.lan:9000", "eu-west-1")
    assert s.force_path_style and s.skip_verify  # an endpoint implies path style, as in Litestream
    assert str(s) == (
        "s3://bkt/replicas/db?endpoint=https://minio.lan:9000&region=eu-west-1&forcePathStyle=true&skipVerify=true"
    )
    assert open_storage(str(s)).url == s.url

    local = open_storage("s3://bkt/p?endpoint=127.0.0.1:9000&forcePathStyle=false")
    assert local.endpoint == "http://127.0.0.1:9000" and not local.force_path_style
    assert open_storage("s3://bkt/p?endpoint=http://h:1&force-path-style=false").force_path_style is False

    aws = open_storage("s3://bkt/a/b")
    assert (aws.prefix, aws.endpoint, aws.force_path_style, aws.skip_verify) == ("a/b", None, False, False)
    assert open_storage("s3://bkt").prefix == ""
    assert open_storage("S3://bkt/x").prefix == "x"


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "empty"),
        ("gs://bkt/p", "unsupported storage URL scheme 'gs'"),
        ("s3:///path", "has no bucket"),
        ("s3://", "has no bucket"),
        ("s3://bkt/p?forcePathStyle=maybe", "not a boolean"),
        ("file://host/path", "names host 'host'"),
        ("file://", "has no path"),
    ],
)
def test_open_storage_rejects_bad_urls(url, message):
    with pytest.raises(StorageError, match=message) as e:
        open_storage(url)
    assert "\n" not in str(e.value)


def test_file_urls_do_not_import_boto3(tmp_path):
    code = "import sys; from tenantsync.storage import open_storage as o; o(sys.argv[1]); print('boto3' in sys.modules)"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=repo)
    assert (out.returncode, out.stdout.strip()) == (0, "False"), out.stderr


# -- file backend specifics --------------------------------------------------------


def test_file_compare_and_swap_loses_no_update(file_url):
    """Concurrent read-modify-write loops through write_if_match: no increment is lost."""
    store = open_storage(file_url)
    store.write_if_absent("counter", b"0")

    def increment(_):
        for _ in range(10):
            while True:
                (info,) = store.list("counter")
                value = int(store.read("counter"))
                try:
                    store.write_if_match("counter", b"%d" % (value + 1), info.etag)
                    break
                except PreconditionFailed:
                    continue

    _, errors = race(4, increment)
    assert errors == [] and store.read("counter") == b"40"


def test_file_backend_leaves_only_objects_and_lock_files(file_url):
    store = open_storage(file_url)
    etag = store.write_if_absent("ltx/0/a.ltx", b"a")
    with pytest.raises(PreconditionFailed):
        store.write_if_absent("ltx/0/a.ltx", b"b")
    store.write_if_match("ltx/0/a.ltx", b"c", etag)
    assert sorted(os.listdir(os.path.join(store.root, "ltx", "0"))) == [".tenantsync.lock", "a.ltx"]
    assert keys_of(store) == ["ltx/0/a.ltx"]


def test_file_etag_changes_when_the_same_bytes_are_rewritten(file_url):
    """Inode numbers of replaced versions are reused at once: the etag must still never repeat."""
    store = open_storage(file_url)
    etag = store.write_if_absent("lock.json", b"same")
    seen = {etag}
    for _ in range(20):
        etag = store.write_if_match("lock.json", b"same", etag)
        assert etag not in seen
        seen.add(etag)


# -- S3 bucket versioning: delete_all_versions -------------------------------------


def versioned_bucket(s3_server, s3_client, **create):
    """A fresh bucket with versioning enabled, created with ``create`` (object lock, say):
    its name, and the URL of a replica root in it (objects under ``replica/``)."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket, **create)
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket, f"s3://{bucket}/replica?endpoint={s3_server}&region=us-east-1&forcePathStyle=true"


def stored_versions(s3_client, bucket, prefix):
    """Every (key, version id) the bucket keeps under ``prefix``: versions and delete markers."""
    found = set()
    for page in s3_client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        found |= {(v["Key"], v["VersionId"]) for v in page.get("Versions", []) + page.get("DeleteMarkers", [])}
    return found


def fill_with_history(store):
    """Objects with old versions and delete markers: overwritten, deleted, written anew."""
    for i in range(5):
        store.write_if_absent(f"k/{i}", b"v1")
    etag = store.write_if_absent("lock.json", b"0")
    for i in range(1, 4):
        etag = store.write_if_match("lock.json", str(i).encode(), etag)
    store.delete(["k/0", "k/1", "k/2"])
    store.write_if_absent("k/0", b"v2")


@pytest.mark.parametrize("layer", ["plain", "sealed"])
def test_delete_all_versions_purges_every_version_and_delete_marker_of_a_versioned_bucket(
        s3_server, s3_client, monkeypatch, layer):
    bucket, url = versioned_bucket(s3_server, s3_client)
    root = open_storage(url)
    if layer == "sealed":  # the layer hands the call to the store it wraps
        root = SealedStorage(root, os.urandom(32), "0123456789abcdef", segment_size=100)
    for name in ("tenants/a", "tenants/ab"):
        fill_with_history(root.child(name))
    doomed = stored_versions(s3_client, bucket, "replica/tenants/a/")
    neighbour = stored_versions(s3_client, bucket, "replica/tenants/ab")
    assert len(doomed) == 5 + 4 + 3 + 1  # k/* first versions, lock.json's four, three markers, k/0 anew

    # Small pages and batches: several pages, a page ending inside one key's versions.
    monkeypatch.setattr(s3_module, "MAX_LIST_KEYS", 3)
    monkeypatch.setattr(s3_module, "MAX_DELETE_KEYS", 2)
    pages = []
    listed = S3Storage._versions_page
    monkeypatch.setattr(S3Storage, "_versions_page", lambda self, *a: pages.append(a) or listed(self, *a))
    assert root.delete_all_versions("tenants/a/") == len(doomed)
    assert len(pages) > 6
    assert [a[1] for a in pages].count(None) == 3  # one round: two passes and the final look

    assert s3_client.list_object_versions(Bucket=bucket, Prefix="replica/tenants/a/").keys().isdisjoint(
        {"Versions", "DeleteMarkers"})
    assert stored_versions(s3_client, bucket, "replica/tenants/ab") == neighbour
    assert root.child("tenants/ab").read("k/0") == b"v2"
    assert keys_of(root) == ["tenants/ab/k/0", "tenants/ab/k/3", "tenants/ab/k/4", "tenants/ab/lock.json"]
    assert root.delete_all_versions("tenants/a/") == 0


def test_a_refused_version_is_named_and_keeps_its_delete_marker(s3_server, s3_client):
    """An object lock refuses one version: the error names it, the other versions go, and
    no delete marker does, so the deleted object does not become current again."""
    bucket, url = versioned_bucket(s3_server, s3_client, ObjectLockEnabledForBucket=True)
    store = open_storage(url).child("t")
    fill_with_history(store)
    store.delete(["k/3"])
    locked = s3_client.list_object_versions(Bucket=bucket, Prefix="replica/t/k/3")["Versions"][0]["VersionId"]
    s3_client.put_object_retention(Bucket=bucket, Key="replica/t/k/3", VersionId=locked, Retention={
        "Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(timezone.utc) + timedelta(days=1)})

    with pytest.raises(StorageError, match=f"delete version k/3 \\(version {locked}\\): AccessDenied") as e:
        store.delete_all_versions("")
    assert not isinstance(e.value, StorageUnavailable) and "\n" not in str(e.value)
    assert "1 of 10 versions failed" in str(e.value), e.value
    listed = s3_client.list_object_versions(Bucket=bucket, Prefix="replica/t/")
    assert [(v["Key"], v["VersionId"]) for v in listed.get("Versions", [])] == [("replica/t/k/3", locked)]
    assert len(listed["DeleteMarkers"]) == 4  # k/0, k/1, k/2 and k/3's: none removed
    assert keys_of(store) == []  # nothing deleted came back

    s3_client.put_object_retention(Bucket=bucket, Key="replica/t/k/3", VersionId=locked, BypassGovernanceRetention=True,
                                   Retention={})
    assert store.delete_all_versions("") == 5  # the lock lifted: the version and the four markers
    assert stored_versions(s3_client, bucket, "replica/t/") == set()
