"""Fleet-trained zstd dictionaries for cold bundles.

A SaaS fleet holds thousands of small databases of one schema: the same table definitions,
b-tree page headers and column values (emails, statuses, timestamps) over and over. zstd
compresses a small input alone poorly, as it has little history inside 100 KB to refer to;
a dictionary trained on pages of a sample of tenants gives every bundle that history up front.

Dictionaries are immutable objects at the fleet root, ``_dictionaries/<id>.zdict`` (a tenant
name never starts with ``_``, so no tenant's replica can collide). The id is zstd's own
dictionary id, which every frame and bundle manifest records, set here from a hash of the
dictionary's content: a retried upload of the same training lands on the same key, two
trainings never share one (short of a 31-bit hash collision, which write-if-absent
refuses), and a loaded object is checked against the id it was asked for. Each training is
a new version; a bundle names the one it was written with, so a dictionary must be kept as
long as any bundle names it.

One object says which version is the fleet's current one, the one new bundles are compressed
with: ``_dictionaries/current.json``, ``{"id", "trained_at", "databases", "bytes"}``.
Publishing a dictionary stores it, then moves that pointer by compare-and-swap on its etag,
and deletes nothing. Encrypted fleets publish none (``train_for_fleet``): a dictionary holds
fragments of the sampled tenants' pages in the clear, and shredding a tenant could not erase
them from the one object every bundle needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import zstandard

from .errors import BundleError, DictionaryMissing, EncryptedFleet, ObjectNotFound, PreconditionFailed
from .storage.base import ObjectInfo, Storage
from .tenants import header_page_size

PREFIX = "_dictionaries"
#: The pointer to the fleet's current dictionary.
CURRENT_KEY = f"{PREFIX}/current.json"
#: Bytes of a trained dictionary: zstd's CLI default. Larger than the 64 KiB often used, as
#: it is stored once per fleet, not per tenant (docs/BENCHMARKS.md, cold bundles).
DICT_SIZE = 112 << 10
#: zstd's guidance: train on about 100 times the dictionary's size of samples.
SAMPLE_RATIO = 100
#: Local tenants a dictionary is trained on when no databases are named: SAMPLE_RATIO ×
#: DICT_SIZE of pages spread over this many is about 14 pages of 4 KiB each, so the values of
#: many tenants are in it rather than many pages of a few.
SAMPLE_TENANTS = 200
#: Dictionaries kept loaded in this process; each is ~100 KiB plus zstd's digested tables.
CACHED = 16

_HEADER = struct.Struct("<II")  # zstd dictionary magic, dictionary id (little-endian)
_ZDICT_MAGIC = 0xEC30A437
# zstd reserves ids below 32768 and from 2**31 on for registered and future use.
_ID_LOW, _ID_HIGH = 32768, 1 << 31
_KEY = re.compile(re.escape(PREFIX) + r"/([0-9]+)\.zdict")
# What current.json holds, each with its JSON type.
_POINTER_FIELDS = {"id": int, "trained_at": str, "databases": int, "bytes": int}


def dictionary_key(dict_id: int) -> str:
    return f"{PREFIX}/{dict_id}.zdict"


def train(db_paths: Iterable[str | os.PathLike], *, size: int = DICT_SIZE, seed: int = 0,
          level: int = 19) -> zstandard.ZstdCompressionDict:
    """A dictionary of ``size`` bytes trained on pages of the databases ``db_paths``.

    Samples are whole pages, the unit a bundle's similarity lies in (a page of ``users`` in
    one tenant resembles a page of ``users`` in the next), drawn at random (``seed``) and
    evenly across the databases up to SAMPLE_RATIO × ``size`` bytes. ``level`` is the
    compression level the dictionary's tables are tuned for: the bundles' level.
    """
    paths = list(db_paths)
    if not paths:
        raise BundleError("cannot train a zstd dictionary on no databases")
    rng = random.Random(seed)
    share = SAMPLE_RATIO * size // len(paths)
    samples = [page for path in paths for page in _sample_pages(path, share, rng)]
    try:
        trained = zstandard.train_dictionary(size, samples, level=level)
    except zstandard.ZstdError as e:
        raise BundleError(f"training a zstd dictionary on {len(samples)} pages of {len(paths)} databases failed: {e}") from None
    return zstandard.ZstdCompressionDict(_content_addressed(trained.as_bytes()))


def _sample_pages(path: str | os.PathLike, budget: int, rng: random.Random) -> list[bytes]:
    with open(path, "rb") as f:
        page_size = header_page_size(f.read(100))
        if page_size is None:
            raise BundleError(f"{path}: not a SQLite database, cannot sample its pages")
        count = os.fstat(f.fileno()).st_size // page_size
        chosen = sorted(rng.sample(range(count), min(count, max(1, budget // page_size))))
        pages = []
        for pgno in chosen:
            f.seek(pgno * page_size)
            pages.append(f.read(page_size))
        return pages


def _content_addressed(raw: bytes) -> bytes:
    """The dictionary with its id replaced by one derived from the rest of its bytes."""
    magic, _ = _HEADER.unpack_from(raw)
    if magic != _ZDICT_MAGIC:
        raise BundleError("zstd returned a dictionary without its magic number")
    return _HEADER.pack(magic, _content_id(raw)) + raw[_HEADER.size:]


def _content_id(raw: bytes) -> int:
    digest = hashlib.sha256(raw[:4] + raw[_HEADER.size:]).digest()
    return _ID_LOW + int.from_bytes(digest[:8], "big") % (_ID_HIGH - _ID_LOW)


def store(storage: Storage, dictionary: zstandard.ZstdCompressionDict) -> int:
    """Write ``dictionary`` to the fleet root ``storage`` (once: its key is its content) and
    return its id, the one bundles compressed with it record."""
    raw = dictionary.as_bytes()
    dict_id = _checked_id(raw, dictionary.dict_id(), storage)
    key = dictionary_key(dict_id)
    try:
        storage.write_if_absent(key, raw)
    except PreconditionFailed:
        if storage.read(key) != raw:
            raise BundleError(f"{storage.object_url(key)}: holds another dictionary with id {dict_id}: "
                              f"train again (a new sample) to get another id") from None
    return dict_id


def _checked_id(raw: bytes, dict_id: int, storage: Storage) -> int:
    """Refuse a dictionary whose id is not its content's: one not made by ``train``, or a
    stored object whose bytes changed."""
    if len(raw) < _HEADER.size or _HEADER.unpack_from(raw) != (_ZDICT_MAGIC, dict_id) or _content_id(raw) != dict_id:
        raise BundleError(f"{storage.object_url(dictionary_key(dict_id))}: not the content-addressed zstd "
                          f"dictionary {dict_id} (corrupt, or not made by dictionary.train)")
    return dict_id


@dataclass(frozen=True)
class Published:
    """What ``current.json`` says: the current dictionary's id, when it was trained, on how
    many databases, and its ``size`` in bytes (listed without reading the dictionary)."""

    id: int
    trained_at: datetime
    databases: int
    size: int

    def encode(self) -> bytes:
        trained_at = self.trained_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps({"id": self.id, "trained_at": trained_at, "databases": self.databases,
                           "bytes": self.size}).encode()


def publish(storage: Storage, dictionary: zstandard.ZstdCompressionDict, *, databases: int) -> int:
    """Store ``dictionary`` (trained on ``databases`` databases) at the fleet root ``storage``
    and make it the current one, which bundles written from now on are compressed with;
    return its id. The dictionary it replaces stays: bundles written with it name it.

    The pointer moves by compare-and-swap on the etag listed just before, so of two
    publishes racing one loses instead of both believing they won; the loser lists again and
    retries once (the later publish is current), and a third change meanwhile is an error."""
    dict_id = store(storage, dictionary)
    pointer = Published(dict_id, datetime.now(timezone.utc), databases, len(dictionary.as_bytes())).encode()
    try:
        _set_pointer(storage, pointer)
    except PreconditionFailed:
        try:
            _set_pointer(storage, pointer)
        except PreconditionFailed:
            raise BundleError(f"{storage.object_url(CURRENT_KEY)}: changed by other publishes while this one set it: "
                              f"dictionary {dict_id} is stored but not current; publish it again") from None
    return dict_id


def _set_pointer(storage: Storage, pointer: bytes) -> None:
    """Write ``current.json`` over the version there now: ``list`` gives its etag (the
    storage has no read with etag), none listed means the first publish."""
    etag = next((o.etag for o in storage.list(CURRENT_KEY) if o.key == CURRENT_KEY), None)
    if etag is None:
        storage.write_if_absent(CURRENT_KEY, pointer)
    else:
        storage.write_if_match(CURRENT_KEY, pointer, etag)


def _decode_pointer(data: bytes, url: str) -> Published:
    """The pointer stored at ``url``; BundleError when it is anything else, which a publish
    overwrites (it reads no more than the etag)."""
    try:
        fields = json.loads(data)
        if not isinstance(fields, dict) or any(type(fields.get(k)) is not t for k, t in _POINTER_FIELDS.items()):
            raise ValueError(f"expected a JSON object of {', '.join(_POINTER_FIELDS)}")
        return Published(fields["id"], datetime.fromisoformat(fields["trained_at"]), fields["databases"],
                         fields["bytes"])
    except ValueError as e:
        raise BundleError(f"{url}: not a current-dictionary pointer ({e}): "
                          f"publish a dictionary again (tenantsync dictionary train)") from None


_cache: OrderedDict[tuple[str, int], zstandard.ZstdCompressionDict] = OrderedDict()
_cache_guard = threading.Lock()


class Dictionaries:
    """The dictionaries stored at one fleet root, loaded on first use and kept (the CACHED
    most recently used, shared by every instance in the process)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def get(self, dict_id: int) -> zstandard.ZstdCompressionDict:
        """Dictionary ``dict_id``, from the cache when it was loaded before: for restores."""
        key = (self.storage.url, dict_id)
        with _cache_guard:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
        dictionary = self.load(dict_id)
        with _cache_guard:
            _cache[key] = dictionary
            while len(_cache) > CACHED:
                _cache.popitem(last=False)
        return dictionary

    def load(self, dict_id: int) -> zstandard.ZstdCompressionDict:
        """Dictionary ``dict_id`` read from storage now and checked: what a bundle's
        verification uses, since after it the LTX levels go and the stored copy is the
        only one a later restore in another process can have."""
        key = dictionary_key(dict_id)
        try:
            raw = self.storage.read(key)
        except ObjectNotFound:
            raise DictionaryMissing(f"{self.storage.object_url(key)}: zstd dictionary {dict_id} "
                                    f"is missing from the fleet's storage") from None
        _checked_id(raw, dict_id, self.storage)
        return zstandard.ZstdCompressionDict(raw)

    def published(self) -> Published | None:
        """What the current-dictionary pointer says, or None before the first publish."""
        try:
            data = self.storage.read(CURRENT_KEY)
        except ObjectNotFound:
            return None
        return _decode_pointer(data, self.storage.object_url(CURRENT_KEY))

    def current(self) -> zstandard.ZstdCompressionDict | None:
        """The fleet's current dictionary, to compress new bundles with; None when none was
        published (bundles are then written without). The pointer is read on every call, as
        another process may publish; the dictionary comes from the cache when it is there,
        as its bytes never change (a bundle's verification reads the stored copy)."""
        published = self.published()
        if published is None:
            return None
        try:
            return self.get(published.id)
        except DictionaryMissing as e:
            pointer = self.storage.object_url(CURRENT_KEY)
            raise DictionaryMissing(f"{pointer} names a dictionary that is gone: {e}") from None

    def stored(self) -> dict[int, ObjectInfo]:
        """Every dictionary stored at the fleet root, by id."""
        found = {}
        for info in self.storage.list(PREFIX + "/"):
            if match := _KEY.fullmatch(info.key):
                found[int(match[1])] = info
        return found


# -- a fleet's dictionary --------------------------------------------------------------------


def local_sample(fleet, count: int, seed: int) -> list[str]:  # noqa: ANN001 - a Fleet
    """Up to ``count`` of the tenant databases on this host, drawn at random (``seed``): the
    files of those it replicates (active, idle, error) that are here and not empty. Only local
    files: any other tenant's pages would need a restore first."""
    from .catalogue import REPLICATED  # here: bundle restores import this module, not the catalogue

    paths = [r.path for r in fleet.catalogue.records(host=fleet.config.host)
             if r.state in REPLICATED and os.path.isfile(r.path) and os.path.getsize(r.path)]
    return random.Random(seed).sample(paths, min(count, len(paths)))


def train_for_fleet(fleet, paths: Iterable[str] = (), *, sample: int = SAMPLE_TENANTS,  # noqa: ANN001 - a Fleet
                    seed: int = 0) -> tuple[zstandard.ZstdCompressionDict, int]:
    """Train a dictionary on the databases ``paths``, or on ``local_sample(sample, seed)``
    without them, and publish it as the fleet's current one; return it and the number of
    databases it was trained on.

    Refused on an encrypted fleet: the dictionary would hold fragments of the sampled
    tenants' pages in the clear, in the one object every bundle needs, so shredding a tenant
    could not erase it from there. Encrypted fleets bundle without a dictionary."""
    if fleet.config.encrypt:
        raise EncryptedFleet(f"fleet {fleet.config.fleet} is encrypted: a fleet dictionary would hold fragments of its "
                             f"tenants' pages in the clear, shared by every bundle, so shred could not erase a tenant "
                             f"from it; encrypted fleets bundle without a dictionary")
    paths = list(paths) or local_sample(fleet, sample, seed)
    if not paths:
        raise BundleError(f"no database to train a dictionary on: fleet {fleet.config.fleet} has no tenant database "
                          f"on host {fleet.config.host}; name database files to train on")
    dictionary = train(paths, seed=seed)
    publish(fleet.storage, dictionary, databases=len(paths))
    return dictionary, len(paths)
