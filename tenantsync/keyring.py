"""Key-encryption keys (KEKs): the few long-lived secrets an operator holds, each of which
wraps (encrypts) many tenants' data keys.

Tenants' data never meets a KEK: each tenant has its own random data key, stored beside
its replica wrapped by one KEK (``tenant_key.py``). Rotating a KEK then rewraps a few
dozen bytes per tenant instead of re-encrypting replicas, and losing one tenant's data key
exposes one tenant.

A keyring is YAML (or JSON, which YAML reads too), in a file or in the environment
variable ``TENANTSYNC_KEYRING``::

    current: k2                      # new tenant keys are wrapped with this one
    keys:
      k1: "<base64 of 32 random bytes>"
      k2: "<base64 of 32 random bytes>"

``current`` may be left out when there is one key. Generate a key with
``python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'``
(or ``generate_kek()``). Key names are what wrapped keys record, so a name must never be
reused for other key material; retire a key by removing it once no tenant key names it.

``KeyEncryptor`` is the interface a tenant key needs, so a KMS (whose keys never leave
it) can stand in for ``LocalKek`` later without changing its callers.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from typing import Protocol

from .errors import KeyringError

ENV_VAR = "TENANTSYNC_KEYRING"
KEY_BYTES = 32
_NONCE_BYTES = 12
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyEncryptor(Protocol):
    """One key-encryption key. ``context`` is bound to the wrapped blob as associated
    data: ``unwrap`` with any other context fails, which is what ties a wrapped tenant key
    to its tenant."""

    key_id: str

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Encrypt and authenticate ``data_key``; the blob is opaque to callers."""

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        """The data key ``wrap`` was given; raises KeyringError if ``blob`` was not made by
        this key with this context (another key, another tenant, or altered)."""


class LocalKek:
    """A KEK held in this process: AES-256-GCM, a random 96-bit nonce per wrap (a KEK
    wraps one key per tenant, far below GCM's 2**32 random-nonce limit).

    Blob: nonce (12 bytes) | ciphertext of the data key | GCM tag (16 bytes)."""

    def __init__(self, key_id: str, key: bytes):
        if len(key) != KEY_BYTES:
            raise KeyringError(f"key {key_id!r} is {len(key)} bytes: a key must be {KEY_BYTES} bytes (256 bits)")
        # cryptography is imported here, not at the top: a command on a plain replica
        # (a CLI restore) does not pay for loading it.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.key_id = key_id
        self._aead = AESGCM(key)

    def __repr__(self) -> str:  # never the key material
        return f"LocalKek({self.key_id!r})"

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], context)
        except (InvalidTag, ValueError):  # ValueError: a blob too short to hold a nonce
            raise KeyringError(f"wrapped key does not open with key {self.key_id!r}: wrong key or tampered") from None


class Keyring:
    """Named KEKs and the name of the current one (the one new tenant keys are wrapped with)."""

    def __init__(self, keys: Mapping[str, KeyEncryptor], current: str, source: str = "keyring"):
        self.source = source
        self._keys = dict(keys)
        if not self._keys:
            raise KeyringError(f"{source} has no keys")
        self.current = self.get(current)

    @property
    def names(self) -> list[str]:
        return sorted(self._keys)

    def get(self, name: str) -> KeyEncryptor:
        """The KEK called ``name``; KeyringError naming the ones there are if it is missing."""
        try:
            return self._keys[name]
        except KeyError:
            raise KeyringError(f"{self.source} has no key {name!r} (it has: {', '.join(self.names)})") from None

    def __repr__(self) -> str:
        return f"Keyring({self.names}, current={self.current.key_id!r})"


def load_keyring(path: str | None = None, environ: Mapping[str, str] | None = None) -> Keyring:
    """The keyring in file ``path``, else in ``$TENANTSYNC_KEYRING``; KeyringError if neither."""
    environ = os.environ if environ is None else environ
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise KeyringError(f"keyring file {path} not found") from None
        except OSError as e:
            raise KeyringError(f"keyring file {path}: cannot read it: {e.strerror}") from None
        return parse_keyring(text, source=f"keyring {path}")
    if ENV_VAR in environ:
        return parse_keyring(environ[ENV_VAR], source=f"keyring in ${ENV_VAR}")
    raise KeyringError(
        f"no keyring: give a keyring file or set ${ENV_VAR} (a tenant's encryption keys are wrapped with it)"
    )


def parse_keyring(text: str, source: str = "keyring") -> Keyring:
    """A Keyring from its YAML/JSON text (see the module docstring); ``source`` names it in errors."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise KeyringError(f"{source} is not valid YAML or JSON{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), dict) or not raw["keys"]:
        raise KeyringError(f"{source} must be a mapping with 'keys': {{name: base64 key, ...}} and 'current': name")
    unknown = sorted(set(raw) - {"keys", "current"})
    if unknown:
        fields = ", ".join(map(repr, unknown))
        raise KeyringError(f"{source} has unknown field(s) {fields}: expected 'keys' and 'current'")
    keys = {}
    for name, value in raw["keys"].items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise KeyringError(f"{source}: key name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric)")
        keys[name] = LocalKek(name, _decode(value, f"{source}: key {name!r}"))
    current = raw.get("current")
    if current is None:
        if len(keys) > 1:
            raise KeyringError(
                f"{source} has {len(keys)} keys and no 'current': name the one new tenant keys are wrapped with"
            )
        (current,) = keys
    if not isinstance(current, str):
        raise KeyringError(f"{source}: 'current' must be a key name, not {current!r}")
    return Keyring(keys, current, source)


def generate_kek() -> str:
    """A new random KEK as a keyring holds it (base64 of 32 bytes)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def _decode(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyringError(f"{what} must be a base64 string of {KEY_BYTES} bytes")
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{what} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise KeyringError(f"{what} is {len(key)} bytes: a key must be {KEY_BYTES} bytes (256 bits)")
    return key
