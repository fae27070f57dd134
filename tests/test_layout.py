"""Replica key layout: must match Litestream 0.5's file and S3 clients byte for byte."""

from __future__ import annotations

import pytest

from tenantsync.layout import LEASE_KEY, SNAPSHOT_LEVEL, ltx_key, ltx_level_prefix, parse_ltx_key


def test_constants():
    assert SNAPSHOT_LEVEL == 9
    assert LEASE_KEY == "lock.json"


@pytest.mark.parametrize(
    "kind, level, lo, hi, key",
    [
        # file/replica_client.go: LTXFilePath → path.Join(root, "ltx", strconv.Itoa(level), name)
        ("file", 0, 1, 1, "ltx/0/0000000000000001-0000000000000001.ltx"),
        ("file", 9, 1, 0x3E8, "ltx/9/0000000000000001-00000000000003e8.ltx"),
        # s3/replica_client.go: c.Path + "/" + fmt.Sprintf("%04x/%s", level, name)
        ("s3", 0, 1, 1, "0000/0000000000000001-0000000000000001.ltx"),
        ("s3", 3, 0xABC, 0xFFFF, "0003/0000000000000abc-000000000000ffff.ltx"),
        ("s3", 9, 1, 0x3E8, "0009/0000000000000001-00000000000003e8.ltx"),
        ("s3", 1, 2**64 - 2, 2**64 - 1, "0001/fffffffffffffffe-ffffffffffffffff.ltx"),
    ],
)
def test_ltx_key_and_parse(kind, level, lo, hi, key):
    assert ltx_key(kind, level, lo, hi) == key
    assert parse_ltx_key(kind, key) == (level, lo, hi)
    assert key.startswith(ltx_level_prefix(kind, level) + "/")


def test_level_prefixes():
    assert [ltx_level_prefix("file", lvl) for lvl in (0, 1, 9)] == ["ltx/0", "ltx/1", "ltx/9"]
    assert [ltx_level_prefix("s3", lvl) for lvl in (0, 1, 9)] == ["0000", "0001", "0009"]


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_every_level_round_trips_and_names_sort_by_txid(kind):
    for level in range(SNAPSHOT_LEVEL + 1):
        keys = [ltx_key(kind, level, lo, lo + 1) for lo in (1, 9, 10, 15, 16, 255, 256, 2**40)]
        assert keys == sorted(keys)
        assert [parse_ltx_key(kind, k)[1] for k in keys] == [1, 9, 10, 15, 16, 255, 256, 2**40]
        assert {parse_ltx_key(kind, k)[0] for k in keys} == {level}


@pytest.mark.parametrize(
    "kind, key",
    [
        ("file", "lock.json"),
        ("file", "ltx/0/0000000000000001-0000000000000001.ltx.tmp"),  # Litestream's temp file
        ("file", "ltx/0/.tenantsync-0123.tmp"),
        ("file", "ltx/00/0000000000000001-0000000000000001.ltx"),  # not strconv.Itoa
        ("file", "ltx/10/0000000000000001-0000000000000001.ltx"),  # no such level
        ("file", "ltx/0/0000000000000001-0000000000000001.LTX"),
        ("file", "ltx/0/000000000000000A-000000000000000B.ltx"),  # uppercase hex
        ("file", "ltx/0/0000000000000001-00000000000001.ltx"),  # short
        ("file", "0000/0000000000000001-0000000000000001.ltx"),  # the S3 layout
        ("file", "tenant/ltx/0/0000000000000001-0000000000000001.ltx"),  # keys are replica-relative
        ("file", "ltx/0/0000000000000002-0000000000000001.ltx"),  # inverted range
        ("file", "ltx/0/0000000000000000-0000000000000001.ltx"),  # TXID 0 does not exist
        ("s3", "lock.json"),
        ("s3", "ltx/0/0000000000000001-0000000000000001.ltx"),  # the file layout
        ("s3", "ltx/0000/0000000000000001-0000000000000001.ltx"),
        ("s3", "000a/0000000000000001-0000000000000001.ltx"),  # no such level
        ("s3", "009/0000000000000001-0000000000000001.ltx"),
        ("s3", "0009/0000000000000001-0000000000000001.ltx/x"),
        ("s3", "0009/sub/0000000000000001-0000000000000001.ltx"),
        ("s3", ""),
    ],
)
def test_other_keys_are_ignored(kind, key):
    assert parse_ltx_key(kind, key) is None


def test_invalid_arguments():
    with pytest.raises(ValueError, match="kind"):
        ltx_level_prefix("gs", 0)
    with pytest.raises(ValueError, match="kind"):
        parse_ltx_key("gs", "0000/0000000000000001-0000000000000001.ltx")
    for level in (-1, SNAPSHOT_LEVEL + 1):
        with pytest.raises(ValueError, match="level"):
            ltx_level_prefix("s3", level)
    for lo, hi in ((0, 1), (2, 1), (1, 2**64)):
        with pytest.raises(ValueError, match="TXID"):
            ltx_key("file", 0, lo, hi)

