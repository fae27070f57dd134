"""A database file made by tenantsync (a restore, a bundle's image): built beside its place
under a temporary name and renamed into place only once it is complete and durable, so no
reader ever finds a partial database at the path.
"""

from __future__ import annotations

import contextlib
import os

from .errors import OutputExists


def temporary_beside(output: str, force: bool, what: str) -> tuple[str, str]:
    """``(output, tmp)``: the absolute output path and the temporary file to build it in,
    in the same directory (created if missing), so the final rename is atomic. Raises
    OutputExists unless ``force``. ``what`` names the maker in the temporary name."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        raise OutputExists(f"{output}: already exists (use --force to replace it)")
    directory = os.path.dirname(output)
    os.makedirs(directory, exist_ok=True)
    return output, os.path.join(directory, f".{os.path.basename(output)}.tenantsync-{what}-{os.getpid()}")


def put_in_place(tmp: str, output: str) -> None:
    """Rename the complete, fsynced ``tmp`` to ``output`` and make the rename durable."""
    for suffix in ("-wal", "-shm"):
        # A stale WAL beside the new file would be replayed over it by SQLite.
        remove_quietly(output + suffix)
    os.replace(tmp, output)
    fsync_path(os.path.dirname(output))


def fsync_path(path: str) -> None:
    """fsync a file or a directory by name (any descriptor flushes the whole file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
