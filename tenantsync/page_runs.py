"""Pages written to a database file as runs of consecutive pages, in large pwrite batches."""

from __future__ import annotations

import ctypes
import os

WRITE_BATCH = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2

try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):  # not Linux: the restore's final fsync does all the writing
    _sync_file_range = None


class PageRuns:
    """Collects pages in order and pwrites each run of consecutive page numbers in batches of
    up to WRITE_BATCH bytes: one syscall per page would cost more than decoding the page.

    Each batch is handed to the disk at once (sync_file_range, which does not wait), so the
    disk writes while the next pages decode instead of all at the restore's final fsync,
    which alone makes it durable."""

    def __init__(self, fd: int, page_size: int):
        self.fd, self.page_size = fd, page_size
        self.run: list = []
        self.start = self.next = 0
        self.count = 0

    def add(self, pgno: int, page: bytes) -> None:
        if self.run and (pgno != self.next or len(self.run) * self.page_size >= WRITE_BATCH):
            self.flush()
        if not self.run:
            self.start = pgno
        self.run.append(page)
        self.next = pgno + 1
        self.count += 1

    def flush(self) -> None:
        if self.run:
            offset = (self.start - 1) * self.page_size
            written = os.pwrite(self.fd, b"".join(self.run), offset)
            if _sync_file_range is not None:
                _sync_file_range(self.fd, offset, written, _SYNC_FILE_RANGE_WRITE)
            self.run = []
