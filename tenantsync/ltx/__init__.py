"""LTX v3 codec, format-compatible with Litestream 0.5.17 / superfly/ltx v0.5.2."""

from tenantsync.ltx.checksum import crc64, database_checksum, page_checksum
from tenantsync.ltx.decoder import Decoder, decode_file, read_header, read_page_index
from tenantsync.ltx.encoder import Encoder, encode_file
from tenantsync.ltx.format import (
    CHECKSUM_FLAG, HEADER_FLAG_NO_CHECKSUM, HEADER_SIZE, MAGIC, PAGE_FLAG_SIZE,
    PAGE_HEADER_SIZE, TRAILER_SIZE, Header, Trailer, format_filename, format_txid,
    lock_pgno, parse_filename,
)

__all__ = [
    "CHECKSUM_FLAG", "HEADER_FLAG_NO_CHECKSUM", "HEADER_SIZE", "MAGIC", "PAGE_FLAG_SIZE",
    "PAGE_HEADER_SIZE", "TRAILER_SIZE", "Decoder", "Encoder", "Header", "Trailer", "crc64",
    "database_checksum", "decode_file", "encode_file", "format_filename", "format_txid",
    "lock_pgno", "page_checksum", "parse_filename", "read_header", "read_page_index",
]
