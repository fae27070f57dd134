"""The keyring of KEKs (issue 23): its two formats and two sources, one clear line for each
way it can be wrong, and wrapping bound to its context."""

from __future__ import annotations

import base64
import json
import os

import pytest

from tenantsync.errors import KeyringError
from tenantsync.keyring import ENV_VAR, LocalKek, generate_kek, load_keyring, parse_keyring

K1, K2 = generate_kek(), generate_kek()


def one_line_error(call, match):
    with pytest.raises(KeyringError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
    assert K1 not in str(e.value) and K2 not in str(e.value)  # never the key material
    return str(e.value)


def test_yaml_and_json_keyrings_are_the_same(tmp_path):
    yaml_text = f"current: k2\nkeys:\n  k1: {K1}\n  k2: {K2}\n"
    json_text = json.dumps({"keys": {"k1": K1, "k2": K2}, "current": "k2"})
    for text in (yaml_text, json_text):
        ring = parse_keyring(text)
        assert ring.names == ["k1", "k2"] and ring.current.key_id == "k2"
        blob = ring.get("k1").wrap(b"d" * 32, b"ctx")
        assert parse_keyring(yaml_text).get("k1").unwrap(blob, b"ctx") == b"d" * 32


def test_one_key_needs_no_current():
    assert parse_keyring(json.dumps({"keys": {"only": K1}})).current.key_id == "only"


def test_file_and_environment_sources(tmp_path):
    path = tmp_path / "keyring.yml"
    path.write_text(f"keys: {{k1: {K1}}}\n")
    assert load_keyring(str(path), environ={}).current.key_id == "k1"
    env = {ENV_VAR: json.dumps({"keys": {"e1": K2}})}
    assert load_keyring(environ=env).current.key_id == "e1"
    assert load_keyring(str(path), environ=env).current.key_id == "k1"  # a file given wins
    one_line_error(lambda: load_keyring(str(tmp_path / "missing.yml"), environ={}),
                   f"keyring file {tmp_path}/missing.yml not found")
    one_line_error(lambda: load_keyring(environ={}), f"no keyring: give a keyring file or set \\${ENV_VAR}")


@pytest.mark.parametrize("raw, message", [
    ({"keys": {"k1": K1}, "current": "k9"}, r"has no key 'k9' \(it has: k1\)"),
    ({"keys": {"k1": K1, "k2": K2}}, "has 2 keys and no 'current'"),
    ({"keys": {"k1": "not base64!"}}, "key 'k1' is not valid base64"),
    ({"keys": {"k1": base64.b64encode(os.urandom(16)).decode()}}, "key 'k1' is 16 bytes: a key must be 32 bytes"),
    ({"keys": {"k1": 12345}}, "key 'k1' must be a base64 string"),
    ({"keys": {"bad name": K1}}, "key name 'bad name' must be"),
    ({"keys": {}}, "must be a mapping with 'keys'"),
    ({"keys": {"k1": K1}, "curent": "k1"}, "unknown field"),
    ({"keys": {"k1": K1}, "current": ["k1"]}, "'current' must be a key name"),
])
def test_a_malformed_keyring_is_one_clear_error(raw, message):
    text = one_line_error(lambda: parse_keyring(json.dumps(raw), source=f"keyring in ${ENV_VAR}"), message)
    assert text.startswith(f"keyring in ${ENV_VAR}")


def test_invalid_yaml_names_the_line():
    one_line_error(lambda: parse_keyring("keys:\n  k1: [unclosed\n"), "not valid YAML or JSON at line")


def test_missing_key_names_the_ones_there_are():
    ring = parse_keyring(json.dumps({"keys": {"b": K1, "a": K2}, "current": "a"}))
    assert one_line_error(lambda: ring.get("x"), "no key") == "keyring has no key 'x' (it has: a, b)"


def test_unwrap_needs_the_same_key_and_context():
    kek = LocalKek("k1", base64.b64decode(K1))
    blob = kek.wrap(b"d" * 32, b"tenant a")
    assert kek.unwrap(blob, b"tenant a") == b"d" * 32
    for call in (
        lambda: kek.unwrap(blob, b"tenant b"),
        lambda: LocalKek("k1", base64.b64decode(K2)).unwrap(blob, b"tenant a"),
        lambda: kek.unwrap(blob[:-1] + bytes([blob[-1] ^ 1]), b"tenant a"),
        lambda: kek.unwrap(b"short", b"tenant a"),
    ):
        one_line_error(call, "wrapped key does not open with key 'k1': wrong key or tampered")
    assert kek.wrap(b"d" * 32, b"x") != kek.wrap(b"d" * 32, b"x")  # a fresh nonce each time


def test_key_material_never_shows_in_repr():
    ring = parse_keyring(json.dumps({"keys": {"k1": K1}}))
    assert K1 not in repr(ring) and K1 not in repr(ring.current)
    assert base64.b64decode(K1).hex() not in repr(ring.current)
