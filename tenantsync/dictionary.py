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
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable

import zstandard

from .errors import BundleError, DictionaryMissing, ObjectNotFound, PreconditionFailed
from .storage.base import Storage
from .tenants import header_page_size

PREFIX = "_dictionaries"
#: Bytes of a trained dictionary: zstd's CLI default. Larger than the 64 KiB often used, as
#: it is stored once per fleet, not per tenant (docs/BENCHMARKS.md, cold bundles).
DICT_SIZE = 112 << 10
#: zstd's guidance: train on about 100 times the dictionary's size of samples.
SAMPLE_RATIO = 100
#: Dictionaries kept loaded in this process; each is ~100 KiB plus zstd's digested tables.
CACHED = 16

_HEADER = struct.Struct("<II")  # zstd dictionary magic, dictionary id (little-endian)
_ZDICT_MAGIC = 0xEC30A437
# zstd reserves ids below 32768 and from 2**31 on for registered and future use.
_ID_LOW, _ID_HIGH = 32768, 1 << 31


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
