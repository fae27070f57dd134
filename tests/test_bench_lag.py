"""The fleet benchmark's lag rule (bench/fleet.py ``visibility``): which L0 file made a commit
visible. A wrong rule reports a lag the tool did not have, so the rule is tested on real
LTX files."""

import importlib.util
import os
from pathlib import Path

import pytest

from tenantsync.ltx.encoder import encode_file
from tenantsync.ltx.format import HEADER_FLAG_NO_CHECKSUM, Header

_spec = importlib.util.spec_from_file_location("bench_fleet", Path(__file__).parent.parent / "bench" / "fleet.py")
fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet)

PAGE = 4096


def _l0(ts_ms: int, text: bytes) -> bytes:
    page = bytearray(PAGE)
    page[200:200 + len(text)] = text
    header = Header(flags=HEADER_FLAG_NO_CHECKSUM, page_size=PAGE, commit=1, min_txid=1, max_txid=1,
                    timestamp=ts_ms)
    return encode_file(header, [(1, bytes(page))])


@pytest.fixture
def monitor(tmp_path):
    """A real L0Monitor watching no tenant (its thread not started): the tests hand it the
    files it would have read."""
    mon = fleet.L0Monitor(str(tmp_path), [], keep_bodies=True)
    yield mon
    os.close(mon.fd)


def test_a_file_stamped_before_the_logged_commit_time_counts_when_it_holds_the_row(monitor):
    # The writer logged its commit at t=2.0 s, but the sync that shipped it stamped its
    # file at 1.0 s (the writer lost the CPU between its commit and reading the clock).
    row = "9f" * 50
    monitor.bodies["t1"] = [_l0(1000, row.encode()), _l0(30_000, b"later")]
    arrivals = {"t1": [(2.1, 1000), (30.0, 30_000)]}
    commits = [["t1", 1, 2.0, row]]

    by_timestamp = fleet.visibility(commits, arrivals)
    assert round(by_timestamp["max"], 3) == 28.0
    inside = fleet.visibility(commits, arrivals, holds=monitor.holds)
    assert round(inside["max"], 3) == 0.1 and inside["found_inside"] == 1


def test_a_file_stamped_too_early_without_the_row_is_still_skipped(monitor):
    monitor.bodies["t1"] = [_l0(1000, b"another row"), _l0(30_000, b"later")]
    arrivals = {"t1": [(2.1, 1000), (30.0, 30_000)]}
    commits = [["t1", 1, 2.0, "ab" * 50]]
    vis = fleet.visibility(commits, arrivals, holds=monitor.holds)
    assert round(vis["max"], 3) == 28.0 and vis["found_inside"] == 0


def test_files_that_arrived_long_before_the_logged_commit_time_are_not_looked_into():
    looked = []

    def holds(name, index, value):
        looked.append(index)
        return True

    early = 6.0 - fleet.CLOCK_READ_DELAY - 0.5
    vis = fleet.visibility([["t1", 1, 6.0, "cd" * 50]], {"t1": [(early, int(early * 1000))]}, holds=holds)
    assert vis["missing"] == 1 and vis["seen"] == 0 and looked == []


def test_a_file_holding_the_row_may_arrive_before_the_logged_commit_time(monitor):
    # A writer starved between its commit and reading the clock: the file holding its row
    # was stamped 20 ms, and arrived 0.4 ms, before the logged commit time.
    row = "ef" * 50
    monitor.bodies["t1"] = [_l0(197_751, row.encode()), _l0(254_369, b"later")]
    arrivals = {"t1": [(197.7706, 197_751), (254.378, 254_369)]}
    vis = fleet.visibility([["t1", 23, 197.771, row]], arrivals, holds=monitor.holds)
    assert vis["max"] == 0.0 and vis["found_inside"] == 1
