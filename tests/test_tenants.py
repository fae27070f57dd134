"""Tenant discovery and names: what becomes a replica prefix, and what is refused."""

from __future__ import annotations

import pytest

from tenantsync.tenants import BadTenantName, Pattern, check_name, scan


def test_name_is_the_path_below_the_globs_fixed_base(tmp_path):
    p = Pattern.parse(f"{tmp_path}/*/app.db")
    assert p.base == str(tmp_path)
    assert p.name_of(f"{tmp_path}/acme/app.db") == "acme/app.db"


@pytest.mark.parametrize("name", ["../x.db", ".hidden.db", "a b.db", "x/../../etc", "caf\u00e9.db", "-x.db", "a" * 300])
def test_hostile_names_are_refused(name):
    with pytest.raises(BadTenantName, match="is not allowed"):
        check_name(name)


def test_scan_skips_side_files_and_reports_bad_names(tmp_path):
    for name in ["a.db", "a.db-wal", "a.db-shm", "b.db", "bad name.db", ".a.db-tenantsync.json"]:
        (tmp_path / name).write_bytes(b"x")
    found, problems = scan([Pattern.parse(f"{tmp_path}/*.db")])
    assert sorted(found) == ["a.db", "b.db"]
    assert list(problems) == [f"{tmp_path}/bad name.db"]
