"""compose/: the production stack is a valid Compose file whose commands are the README's.

No Docker engine runs here, so ``docker-compose config`` (Debian's docker-compose) is as
far as validation goes: it parses, interpolates and checks the file against the schema.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def compose_dir(tmp_path):
    target = tmp_path / "compose"
    shutil.copytree(ROOT / "compose", target)
    shutil.copy(target / ".env.example", target / ".env")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    return target


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (apt: docker-compose)")
def test_compose_file_is_valid(compose_dir):
    out = subprocess.run(["docker-compose", "-f", str(compose_dir / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, cwd=compose_dir)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"redis", "s3", "postgres", "watcher", "worker-host", "worker-storage", "beat", "flower"} <= set(services)
    assert "--basic-auth=admin:change-me" in services["flower"]["command"]


def test_compose_commands_are_the_readmes():
    readme = (ROOT / "README.md").read_text()
    services = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())["services"]
    for name in ("worker-host", "worker-storage", "beat"):
        command = " ".join(services[name]["command"][:4])
        assert command in readme, f"{name}: {command!r} is not in README.md"


def test_compose_config_loads_as_tenantsync_config(monkeypatch):
    from tenantsync.config import load

    monkeypatch.setenv("TENANTSYNC_HOST", "app-1")
    cfg = load(str(ROOT / "compose" / "tenantsync.yml"), env={})
    assert cfg.broker == "redis://redis:6379/0" and cfg.host == "app-1"
    assert cfg.archive_after_for("/data/acme.db").days == 7
