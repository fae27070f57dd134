"""CRC-64 checksums used by LTX: Go's hash/crc64 with the ISO table (CRC-64/GO-ISO).

anycrc is C-backed: a restore hashes every byte of the database it writes, so the CRC must
run at memory speed, which a pure-Python CRC is far from.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import anycrc

from tenantsync.ltx.format import CHECKSUM_FLAG, lock_pgno

_CRC = anycrc.CRC(
    width=64, poly=0x1B, init=0xFFFFFFFFFFFFFFFF, refin=True, refout=True,
    xorout=0xFFFFFFFFFFFFFFFF,
)
_calc = _CRC.calc
_PGNO = struct.Struct(">I")


def crc64(data, prev: int | None = None) -> int:
    """`prev` continues a running CRC, so a file can be hashed in pieces as it streams."""
    return _calc(data, prev)


def crc64_combine(first: int, second: int, second_length: int) -> int:
    """The CRC of A+B from crc64(A), crc64(B) and len(B): pieces of one file hashed in
    different processes still give the file's checksum."""
    return _CRC.combine(first, second, second_length)


def page_checksum(pgno: int, data) -> int:
    """Binding the page number into the CRC makes a page at the wrong position count as a change."""
    return CHECKSUM_FLAG | _calc(data, _calc(_PGNO.pack(pgno)))


def database_checksum(pages: Iterable[tuple[int, bytes]]) -> int:
    """XOR of page checksums: order-free and updatable one page at a time, which lets a chain
    of LTX files prove a restore equals the source. The lock page is skipped, as LTX never
    stores it; bit 63 is forced on so an empty database is 1<<63, never 0."""
    total = 0
    for pgno, data in pages:
        if pgno != lock_pgno(len(data)):
            total ^= page_checksum(pgno, data)
    return CHECKSUM_FLAG | total
