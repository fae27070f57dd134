"""A big LTX file restored on every core: its ranges fetched in parallel, decoded in worker processes.

Decoding is CPU-bound Python per page, and neither lz4 nor anycrc releases the GIL, so threads
would not help: worker processes do. They are fresh interpreters (``python -m
tenantsync.restore_worker``) fed over pipes, not multiprocessing children: the library runs
inside multi-threaded applications, where forking is unsafe, and multiprocessing's spawn and
forkserver re-import the application's main script in every worker. The workers start when a
plan holds a big file and stay warm for the life of the process; small files (hydrations)
never start them.

Memory stays bounded: at most IN_FLIGHT ranges of about RANGE bytes are fetched or being
decoded at a time, however big the file.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import tenantsync

from .errors import RestoreError
from .ltx import HEADER_SIZE, Header
from .ltx.ranges import RangeJob, RangeSum, exactly, read_layout, split, tail_range, verify
from .replica import LTXInfo, Replica
from .storage.file import FileStorage
from .restore_worker import FRAME, read_message

# Below this a file decodes faster in-process than through the workers' pipes.
PARALLEL_ABOVE = 32 << 20
# One ranged read and one worker job: large enough that per-job overhead is small, small
# enough that several fit in memory and S3 round trips overlap.
RANGE = 8 << 20
WORKERS = os.cpu_count() or 1
# Ranges being fetched or decoded at once: every worker busy with one queued behind it.
IN_FLIGHT = max(4, 2 * WORKERS)

def worth_it(info: LTXInfo) -> bool:
    """Whether ``info`` is restored through worker processes (an embedding without a Python
    executable to start them decodes in-process)."""
    return WORKERS > 1 and info.size > PARALLEL_ABOVE and bool(sys.executable)


class _Worker:
    """One decoding process; used by one thread at a time (the pool's queue hands it out)."""

    def __init__(self):
        # The workers must import this very tenantsync, wherever the caller found it.
        root = os.path.dirname(os.path.dirname(os.path.abspath(tenantsync.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "tenantsync.restore_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def call(self, job: RangeJob) -> tuple[bool, RangeSum | BaseException]:
        body = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.write(FRAME.pack(len(body)))
        self.proc.stdin.write(body)
        self.proc.stdin.flush()
        return read_message(self.proc.stdout)

    def close(self) -> None:
        self.proc.stdin.close()  # the worker exits at end of input


class _Pool:
    def __init__(self):
        self.idle: queue.SimpleQueue = queue.SimpleQueue()
        self.workers = [_Worker() for _ in range(WORKERS)]
        for w in self.workers:
            self.idle.put(w)

    def run(self, job: RangeJob) -> RangeSum:
        worker = self.idle.get()
        try:
            ok, value = worker.call(job)
        except (EOFError, OSError) as e:  # the pipes only: the job's own errors come back as values
            _discard(self)
            raise RestoreError(f"{job.name}: restore worker process {worker.proc.pid} exited "
                               f"while decoding it ({e})") from e
        finally:
            # Even a dead worker goes back: a thread waiting for one then fails at once
            # instead of waiting forever.
            self.idle.put(worker)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        # All told first, then awaited: the workers exit side by side.
        for w in self.workers:
            w.close()
        for w in self.workers:
            w.proc.wait()


_pool: _Pool | None = None
_pool_guard = threading.Lock()


def warm_up() -> _Pool:
    """Start the workers (if not running) so their start-up overlaps other work."""
    global _pool
    with _pool_guard:
        if _pool is None:
            _pool = _Pool()
        return _pool


def _discard(pool: _Pool) -> None:
    """A pool whose worker died is unusable: the next restore starts a fresh one."""
    global _pool
    with _pool_guard:
        if _pool is pool:
            _pool = None
    for w in pool.workers:
        w.proc.kill()


def _forget_in_child() -> None:
    """A forked child (a prefork server's worker) must not share its parent's pipes: it
    starts its own workers if it needs them."""
    global _pool, _pool_guard
    _pool, _pool_guard = None, threading.Lock()  # the parent may have held it while forking


os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _close() -> None:
    if _pool is not None:
        _pool.close()


def apply_file(replica: Replica, info: LTXInfo, output: str,
               applied: Callable[[int], None] = lambda n: None) -> tuple[Header, int]:
    """Write ``info``'s pages into ``output`` (a file that exists) and verify every checksum;
    ``applied(n)`` is told the bytes of each range once it is written.

    Returns the header and the number of pages. Pages are in ``output`` before the file is
    known good, as with Decoder: the caller discards ``output`` on any error."""
    name = replica.url(info)

    def read(offset: int, length: int) -> bytes:
        return exactly(name, replica.storage.read(info.key, offset, length), offset, length)

    pool = warm_up()
    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="tenantsync-restore-range") as fetchers:
        head = fetchers.submit(read, 0, HEADER_SIZE)  # both at once: one round trip, not two
        tail = fetchers.submit(read, *tail_range(info.size))
        layout = read_layout(read, head.result(), tail.result(), info.size, name)
        replica.check_name(info, layout.header)
        job = {"name": name, "page_size": layout.header.page_size, "output": output,
               "track": layout.header.is_snapshot and not layout.header.no_checksum}

        # A file:// replica's ranges are read by the workers themselves (restore_worker.py).
        local = (replica.storage.root, info.key) if isinstance(replica.storage, FileStorage) else None

        def decoded(start: int, end: int, rows: list) -> RangeSum:
            data = b"" if local else read(start, end - start)
            done = pool.run(RangeJob(data=data, start=start, rows=rows, source=local, **job))
            applied(end - start)
            return done

        pending = deque(split(layout, RANGE))
        running: deque = deque()
        sums = []
        try:
            while pending or running:
                while pending and len(running) < IN_FLIGHT:
                    running.append(fetchers.submit(decoded, *pending.popleft()))
                sums.append(running.popleft().result())
        finally:
            for f in running:
                f.cancel()
    verify(layout, sums)
    return layout.header, len(layout.rows)
