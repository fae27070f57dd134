"""compose/: the production stack is a valid Compose file whose commands are the README's.

No Docker engine runs here, so the file is checked as Compose loads it before it runs
anything: YAML with anchors and merge keys resolved, variables interpolated from
compose/.env (made from .env.example), then validated against the Compose Specification's
JSON schema, tests/data/compose-spec.json, vendored unchanged (Apache-2.0) from
https://github.com/compose-spec/compose-go/blob/faa67b213c471d63997f55cc145e6eab9dc3630f/schema/compose-spec.json
(the schema `docker compose` itself embeds). Beyond the schema, as Compose does: named
volumes are declared, and the files services name exist.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())

# Compose's interpolation: `$$` is a literal `$`; `$NAME`, `${NAME}`, `${NAME:-default}`
# (unset or empty) and `${NAME-default}` (unset). Other `${...}` forms are not used here
# and are reported rather than half-understood.
_VARIABLE = re.compile(r"\$(?:(\$)|([_A-Za-z][_A-Za-z0-9]*)|\{([^}]*)\})")
_BRACED = re.compile(r"([_A-Za-z][_A-Za-z0-9]*)(?:(:?-)(.*))?", re.S)


def dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (blank lines and # comments skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value for key, value in pairs}


def interpolate(node, env: dict[str, str]):
    """``node`` with every variable in its strings replaced from ``env``; a variable that
    is unset and has no default fails (Compose would make it empty, with a warning)."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def value(match: re.Match) -> str:
        escaped, name, braced = match.groups()
        if escaped:
            return "$"
        default_op = default = None
        if braced is not None:
            parts = _BRACED.fullmatch(braced)
            if not parts:
                raise ValueError(f"unsupported interpolation ${{{braced}}}")
            name, default_op, default = parts.groups()
        if name in env and not (default_op == ":-" and env[name] == ""):
            return env[name]
        if not default_op:
            raise ValueError(f"${name} is not set in compose/.env.example and has no default")
        return default

    return _VARIABLE.sub(value, node)


def load(compose_dir: Path) -> dict:
    """compose_dir/docker-compose.yml as Compose reads it, variables interpolated."""
    return interpolate(yaml.safe_load((compose_dir / "docker-compose.yml").read_text()),
                       dotenv(compose_dir / ".env"))


def problems_of(compose_dir: Path) -> list[str]:
    """What is wrong with compose_dir/docker-compose.yml, as Compose would find it."""
    model = load(compose_dir)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in validator.iter_errors(model)]
    if problems:
        return problems
    declared = set(model.get("volumes") or {})
    for name, service in model["services"].items():
        build = service.get("build")
        if isinstance(build, dict):
            context = compose_dir / build.get("context", ".")
            dockerfile = build.get("dockerfile", "Dockerfile")
            if not (context / dockerfile).is_file():
                problems.append(f"{name}: no {dockerfile} in {context}")
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            if not (compose_dir / env_file).is_file():
                problems.append(f"{name}: env_file {env_file} does not exist")
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                if not (compose_dir / source).exists():
                    problems.append(f"{name}: bind-mounted {source} does not exist")
            elif source and source not in declared:
                problems.append(f"{name}: volume {source} is not declared under volumes:")
    return problems


@pytest.fixture
def compose_dir(tmp_path):
    """compose/ copied with .env made from .env.example, as its comment says to do (the
    copy's parent stands for the build context, ``..``)."""
    target = tmp_path / "compose"
    shutil.copytree(ROOT / "compose", target)
    shutil.copy(target / ".env.example", target / ".env")
    return target


def test_compose_file_is_valid(compose_dir):
    assert problems_of(compose_dir) == []
    services = load(compose_dir)["services"]
    assert {"redis", "s3", "postgres", "watcher", "worker-host", "worker-storage", "beat", "flower"} <= set(services)
    assert "--basic-auth=admin:change-me" in services["flower"]["command"]


@pytest.mark.parametrize("mistake, replacement, problem", [
    ('    command: ["python", "-m", "workers", "-c", "8"]', '    comand: ["python"]',
     "services.worker-host: 'comand' does not match"),
    ('    ports: ["127.0.0.1:8080:8080"]', "    ports: 8080",
     "services.watcher.ports: 8080 is not of type 'array'"),
    ("  pg-data:\n", "", "postgres: volume pg-data is not declared"),
    ("    env_file: .env\n    volumes: [s3-data:/data]", "    env_file: s3.env\n    volumes: [s3-data:/data]",
     "s3: env_file s3.env does not exist"),
])
def test_compose_mistakes_are_found(compose_dir, mistake, replacement, problem):
    path = compose_dir / "docker-compose.yml"
    text = path.read_text()
    assert text.count(mistake) == 1
    path.write_text(text.replace(mistake, replacement))
    found = problems_of(compose_dir)
    assert any(problem in p for p in found), found


def test_compose_variables_need_a_value():
    assert interpolate(["$$HOME", "${A:-x}", "${B-y}", "$A${B}"], {"A": "", "B": "b"}) == ["$HOME", "x", "b", "b"]
    with pytest.raises(ValueError, match="FLOWER_BASIC_AUTH is not set"):
        interpolate({"command": "--basic-auth=${FLOWER_BASIC_AUTH}"}, {})


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
