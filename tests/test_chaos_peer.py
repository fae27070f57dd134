"""The peer's fault campaign (bench/chaos_peer.py) at a small size: Litestream replicating
20 tenants under 10 faults (SIGKILLs, store blackholes, resets and SlowDown storms), a drain
and a check every 5. It measures the peer, so what Litestream loses is not asserted: these
tests fail when the harness breaks (it exits non-zero, or its counts do not add up), and
without the litestream binary. A failure prints the seed and the event log."""

from __future__ import annotations

import os

import pytest

from . import test_chaos


def campaign(tmp_path, *args: str) -> dict:
    return test_chaos.campaign(tmp_path, *args, script="chaos_peer.py")


def sane(result: dict, faults: int, tenants: int, checks: int) -> None:
    """Counts that hold whatever the peer lost."""
    assert result["faults_total"] == faults == sum(result["faults"].values())
    assert set(result["faults"]) <= {"kill-watcher", "kill-child", "kill-store", "blackhole", "resets", "slowdown"}
    assert "failover" in result["not_applicable"] and result["failovers"] is None
    assert result["replicas_checked"] == checks * tenants and result["transactions"] > 0
    assert 0 <= result["inconsistent"] <= result["replicas_checked"]
    assert 0 <= result["lost_final"] <= result["lost"] <= result["transactions"]
    assert result["lost_shipped_later"] == result["lost"] - result["lost_final"]
    assert result["restores"] >= result["replicas_checked"] and 0 <= result["restore_errors"] <= result["restores"]
    assert result["drains_timed_out"] <= checks and result["drain_max_s"] is not None
    assert len(result["rounds"]) == checks and all(0 <= r["behind"] <= tenants for r in result["rounds"])
    assert result["writer_errors"] == 0
    assert len(result["events"]) > faults


def test_a_small_peer_fault_campaign_runs_and_counts(tmp_path):
    result = campaign(tmp_path, "--faults", "10", "--tenants", "20", "--check-every", "5")
    sane(result, faults=10, tenants=20, checks=2)


@pytest.mark.soak
def test_the_peer_fault_campaign_at_soak_size(tmp_path):
    faults = int(os.environ.get("TENANTSYNC_CHAOS_FAULTS", "1000"))
    result = campaign(tmp_path, "--faults", str(faults), "--tenants", "200", "--check-every", "20")
    sane(result, faults=faults, tenants=200, checks=-(-faults // 20))
