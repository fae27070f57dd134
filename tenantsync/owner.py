"""Which process did something, and whether it is still alive.

A hydration or archival marks its tenant in the catalogue with the process doing it
(``this_process()``). If that process dies, the mark would hold the tenant forever
(every later call would wait and answer 409); a process of the same host can tell a dead
owner from a live one, and undoes the mark (``OnDemand.recover``). A pid alone is not
enough (pids are reused), so the owner also names the process's start time.
"""

from __future__ import annotations

import os


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    return stat[stat.rindex(")") + 2:].split()[19]


def this_process(host: str) -> str:
    """``HOST/PID/START``: this process, unambiguous across hosts and pid reuse."""
    pid = os.getpid()
    return f"{host}/{pid}/{_start_ticks(pid)}"


def is_alive(owner: str, host: str) -> bool | None:
    """Whether the process ``owner`` names is running: True or False for a process of
    ``host`` (this machine), None for another host's (this machine cannot tell)."""
    try:
        owner_host, pid, ticks = owner.rsplit("/", 2)
        pid_number = int(pid)
    except ValueError:
        return None
    if owner_host != host:
        return None
    return _start_ticks(pid_number) == ticks
