"""Process tuning for serving many tenants: the descriptor limit, the interpreter's switch
interval, the garbage collector, and handing freed memory back to the system.

Its own module because these settings belong to a long-running process (``watch``,
``serve``, the embedded mode's children, Celery workers), not to a ``Fleet``: the commands
call ``prepare_process`` and ``freeze_setup`` once, library users leave their process
alone, and the ``Fleet`` only asks how many tenants it may keep open.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys

# Descriptors one open tenant holds: the database and its -shm (capture.py), and two SQLite
# connections with the database and -wal each. Some are kept for everything else.
FDS_PER_TENANT = 6
FDS_RESERVED = 256
# The descriptor limit counted for an "unlimited" RLIMIT_NOFILE: Linux's default fs.nr_open,
# the most a process may raise its limit to.
FDS_UNLIMITED = 1 << 20


# The interpreter lock's switch interval for fleet processes (Python's default is 5 ms).
# A sync thread back from a system call (fsync, SQLite) waits for the lock up to this long
# behind a thread encoding LTX or compacting; with thousands of tenants committing, the
# default interval would make up most of the commit-to-replica lag (see docs/BENCHMARKS.md).
SWITCH_INTERVAL = 0.0005
# Seconds between a fleet process's release ticks (Fleet.start_releasing): idle tenants are
# closed and tenants another process is archiving are let go at most this late.
RELEASE_EVERY = 5.0


def prepare_process() -> int:
    """Tune this process for serving many tenants: raise the soft RLIMIT_NOFILE to the hard
    limit (returned) and shorten the switch interval. Called by the long-running commands
    (watch, serve, workers), not by library users, whose process settings are theirs."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, FDS_UNLIMITED)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def freeze_setup() -> None:
    """Take what exists now out of the garbage collector's generations (``gc.freeze``).
    Called once a fleet process is set up: its modules, app and config live as long as the
    process, and every full collection would traverse them again: most of a busy worker's
    tracked objects, in pauses that stop every job thread."""
    gc.collect()
    gc.freeze()


def return_freed_memory() -> None:
    """Hand memory freed by released tenants (SQLite page caches, LTX buffers) back to the
    system. glibc keeps freed blocks in per-thread arenas, so after a burst of thousands
    of tenants an idle process otherwise stays at its peak size."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def max_open_tenants() -> int:
    """How many tenants may be open at once under this process's descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = FDS_UNLIMITED
    return max(8, (soft - FDS_RESERVED) // FDS_PER_TENANT)
