"""The fault campaign (bench/chaos.py) at a small size: two embedded hosts, 40 tenants, 20
faults (watcher and child SIGKILLs, SeaweedFS killed, store blackholes, resets and SlowDown
storms, whole-host failovers), a drain and a full check every 5; and two Celery hosts
sharing Redis and a PostgreSQL catalogue, 16 faults over 30 tenants (also worker, beat,
Redis and PostgreSQL kills, and hosts killed until the other's failover plan takes their
active tenants by itself). The soak variant runs the size
docs/RELIABILITY.md reports. A failure prints the seed and the event log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .test_fleet_celery import ROOT

SEED = int(os.environ.get("TENANTSYNC_CHAOS_SEED", "24"))


def campaign(tmp_path, *args: str, script: str = "chaos.py") -> dict:
    """Run bench/``script`` (chaos.py, or the peer's chaos_peer.py) with ``args``: its JSON."""
    out = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSYNC_") or k == "TENANTSYNC_SERVERS"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--seed", str(SEED),
                           "--json", str(out), *args], capture_output=True, text=True, env=env, timeout=3000)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(out.read_text())


def test_a_small_fault_campaign_loses_nothing(tmp_path):
    result = campaign(tmp_path, "--faults", "20", "--tenants", "40", "--check-every", "5")
    assert result["faults_total"] == 20 and result["lost"] == 0 and result["inconsistent"] == 0
    assert result["replicas_checked"] == 4 * 40 and result["writer_errors"] == 0


def test_a_small_fault_campaign_on_celery_hosts_sharing_redis_and_postgresql_loses_nothing(tmp_path):
    result = campaign(tmp_path, "--mode", "celery", "--faults", "16", "--tenants", "30", "--check-every", "4",
                      "--weight", "host-down=15")
    assert result["faults_total"] == 16 and result["lost"] == 0 and result["inconsistent"] == 0
    assert result["replicas_checked"] == 4 * 30 and result["writer_errors"] == 0
    assert result["faults"].get("host-down", 0) >= 1 and result["auto_failovers"] >= 1  # automatic failover ran


@pytest.mark.soak
def test_the_fault_campaign_at_soak_size(tmp_path):
    result = campaign(tmp_path, "--faults", os.environ.get("TENANTSYNC_CHAOS_FAULTS", "1000"), "--tenants", "200")
    assert result["lost"] == 0 and result["inconsistent"] == 0
