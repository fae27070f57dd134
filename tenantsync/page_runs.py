"""Pages written to a database file as runs of consecutive pages, in large pwrite batches."""

from __future__ import annotations

import os

WRITE_BATCH = 8 << 20


class PageRuns:
    """Collects pages in order and pwrites each run of consecutive page numbers in batches of
    up to WRITE_BATCH bytes: one syscall per page would cost more than decoding the page."""

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
            os.pwrite(self.fd, b"".join(self.run), (self.start - 1) * self.page_size)
            self.run = []
