"""A tenant's data key: random, one per tenant, stored beside its replica wrapped by a KEK.

Keeping the wrapped key in the replica itself (``tenantsync-key.json`` at the tenant's
replica root) means a replica carries everything needed to open it but a KEK, and a
restore on another host needs only the keyring. Deleting that one object makes the
tenant's replica unreadable for good (crypto-shredding).

The object is JSON::

    {"format": 1, "tenant": "acme", "kek": "k2", "key_id": "<16 hex>", "wrapped": "<base64>"}

``wrapped`` is the KEK's blob (``keyring.KeyEncryptor``) with the tenant's identity as
associated data: copied into another tenant's replica, it does not open there even if
its ``tenant`` field is edited. ``key_id`` is the data key's fingerprint, written into
every sealed object's header so a mismatch is named rather than reported as tampering.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field

from .errors import KeyringError, ObjectNotFound, PreconditionFailed
from .keyring import KeyEncryptor, Keyring
from .storage.base import Storage
from .storage.sealed import DEFAULT_SEGMENT_SIZE, KEY_BYTES, KEY_OBJECT, SealedStorage

FORMAT = 1
_CONTEXT = b"tenantsync tenant key v1\0"
_REWRAP_TRIES = 5


@dataclass(frozen=True)
class TenantKey:
    """One tenant's data key as loaded: ``kek`` names the KEK it is wrapped with, ``etag``
    the stored object's version (what ``rewrap`` compares against; None when it was loaded
    for its data key alone)."""

    tenant: str
    key_id: str
    kek: str
    etag: str | None
    data_key: bytes = field(repr=False)

    def seal(self, storage: Storage, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> SealedStorage:
        """``storage`` (the tenant's replica root) with every object sealed under this key."""
        return SealedStorage(storage, self.data_key, self.key_id, segment_size=segment_size)


def key_id(data_key: bytes) -> str:
    """The data key's fingerprint: 64 bits of an HMAC under the key itself, which names the
    key without revealing anything of it."""
    return hmac.new(data_key, b"tenantsync key id", hashlib.sha256).digest()[:8].hex()


def load_or_create(storage: Storage, tenant: str, keyring: Keyring) -> TenantKey:
    """The tenant's data key, created and stored wrapped by the keyring's current KEK if the
    replica has none yet. Of several processes creating it at once, one writes and the others
    read its key back, so all of them encrypt under the same key. Loaded without its etag:
    one request for a tenant that has a key."""
    try:
        return load(storage, tenant, keyring, etag=False)
    except ObjectNotFound:
        pass
    data_key = os.urandom(KEY_BYTES)
    kek = keyring.current
    try:
        etag = storage.write_if_absent(KEY_OBJECT, _document(tenant, data_key, kek))
    except PreconditionFailed:  # another process created it first: use theirs
        return load(storage, tenant, keyring, etag=False)
    return TenantKey(tenant, key_id(data_key), kek.key_id, etag, data_key)


def load(storage: Storage, tenant: str, keyring: Keyring, *, etag: bool = True) -> TenantKey:
    """The tenant's stored data key, unwrapped; ObjectNotFound if the replica has none.

    With ``etag``, the object's etag too, for a compare-and-swap on it (``rewrap``): the
    storage interface's read gives none, so it is listed first (two requests; in that order
    the content read is never older than the etag)."""
    version = _etag(storage) if etag else None
    return _open(storage, tenant, keyring, storage.read(KEY_OBJECT), version)


def rewrap(storage: Storage, tenant: str, keyring: Keyring, new_kek: str,
           current: TenantKey | None = None) -> TenantKey:
    """Wrap the tenant's data key with ``new_kek`` in place (compare-and-swap on the stored
    object), so a KEK can be retired without re-encrypting any data. A no-op when it is
    already wrapped with ``new_kek``. ``current``: the key as just loaded, if the caller
    has it (its etag guards the write; a stale one only costs a fresh load)."""
    target = keyring.get(new_kek)
    for _ in range(_REWRAP_TRIES):
        if current is None or current.etag is None:
            current = load(storage, tenant, keyring)
        if current.kek == new_kek:
            return current
        try:
            etag = storage.write_if_match(KEY_OBJECT, _document(tenant, current.data_key, target), current.etag)
        except PreconditionFailed:
            current = None  # rewrapped (or recreated) meanwhile: look again
            continue
        return TenantKey(tenant, current.key_id, new_kek, etag, current.data_key)
    raise KeyringError(f"{storage.object_url(KEY_OBJECT)}: changed {_REWRAP_TRIES} times while being rewrapped")


def delete(storage: Storage) -> None:
    """Remove the tenant's wrapped key: whatever was sealed under it can never be read again."""
    storage.delete([KEY_OBJECT])


def _document(tenant: str, data_key: bytes, kek: KeyEncryptor) -> bytes:
    wrapped = kek.wrap(data_key, _context(tenant))
    return json.dumps({
        "format": FORMAT,
        "tenant": tenant,
        "kek": kek.key_id,
        "key_id": key_id(data_key),
        "wrapped": base64.b64encode(wrapped).decode(),
    }).encode()


def _open(storage: Storage, tenant: str, keyring: Keyring, raw: bytes, etag: str | None) -> TenantKey:
    url = storage.object_url(KEY_OBJECT)
    try:
        doc = json.loads(raw)
        fmt, owner, kek, kid = doc["format"], doc["tenant"], doc["kek"], doc["key_id"]
        wrapped = base64.b64decode(doc["wrapped"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise KeyringError(f"{url} is not a tenant key (JSON with format, tenant, kek, key_id, wrapped)") from None
    if fmt != FORMAT:
        raise KeyringError(f"{url} is in format {fmt!r}; this tenantsync reads format {FORMAT}")
    if owner != tenant:
        raise KeyringError(f"{url} is the key of tenant {owner!r}, not of {tenant!r}: refusing to use it")
    encryptor = keyring.get(kek)  # a missing KEK: the keyring's own error names the ones it has
    try:
        data_key = encryptor.unwrap(wrapped, _context(tenant))
    except KeyringError:
        raise KeyringError(f"tenant key of {tenant!r} does not open with key {kek!r}: wrong key or tampered") from None
    if key_id(data_key) != kid:
        raise KeyringError(f"{url}: the key id {kid!r} does not match the key it holds: tampered")
    return TenantKey(tenant, kid, kek, etag, data_key)


def _etag(storage: Storage) -> str:
    for info in storage.list(KEY_OBJECT):
        if info.key == KEY_OBJECT:
            return info.etag
    raise ObjectNotFound(f"{storage}: {KEY_OBJECT}: object not found")


def _context(tenant: str) -> bytes:
    return _CONTEXT + tenant.encode()
