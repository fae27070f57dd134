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


def test_scan_refuses_every_file_reached_through_a_linked_directory_and_takes_the_others(tmp_path):
    """Each directory is resolved once per scan: the answer for a linked directory must not
    leak to its siblings, nor a real directory's to a linked one, whichever comes first."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    for d in (data / "acme", data / "zeta", outside):
        d.mkdir(parents=True)
    (data / "lnk").symlink_to(outside)
    for d in (data / "acme", data / "zeta", outside):
        for name in ("a.db", "b.db"):
            (d / name).write_bytes(b"x")
    (data / "acme" / "c.db").symlink_to(outside / "a.db")
    found, problems = scan([Pattern.parse(f"{data}/*/*.db")])
    assert sorted(found) == ["acme/a.db", "acme/b.db", "zeta/a.db", "zeta/b.db"]
    assert sorted(problems) == [f"{data}/acme/c.db", f"{data}/lnk/a.db", f"{data}/lnk/b.db"]
    assert all("symbolic link" in problem for problem in problems.values())


def test_name_of_a_path_not_in_normal_form_is_still_its_path_below_the_base(tmp_path):
    p = Pattern.parse(f"{tmp_path}/*.db")
    assert p.name_of(f"{tmp_path}/./x.db") == "x.db"
    assert p.name_of(f"{tmp_path}/a/../x.db") == "x.db"
    assert Pattern.parse("/*.db").name_of("/x.db") == "x.db"
