"""One error tree for the whole project.

Every error's ``str()`` is the single line a user sees: it names the step and the
object, key or path involved. The CLI prints it and exits non-zero; it never shows a
traceback for a TenantSyncError.
"""

import logging
import sqlite3


class TenantSyncError(Exception):
    """Base of every error tenantsync raises on purpose."""


class LTXError(TenantSyncError):
    """An LTX file is malformed: bad header, frame, index or trailer."""


class ChecksumMismatch(LTXError):
    """An LTX file's stored checksum does not match its content."""


class WALError(TenantSyncError):
    """A SQLite WAL file cannot be parsed (bad magic, header checksum, page size)."""


class DatabaseError(TenantSyncError):
    """A local database cannot be replicated: not SQLite, not WAL-capable, unreadable."""


class StorageError(TenantSyncError):
    """Object storage failed; the message names the backend and the key."""


class ObjectNotFound(StorageError):
    """The key does not exist. Every backend maps its own not-found to this."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the key exists (write-if-absent) or its etag changed
    or it is missing (write-if-match). The caller re-reads and decides; never retried blindly."""


class StorageUnavailable(StorageError):
    """The backend could not be reached or answered with a transient error; safe to retry."""


class BrokerUnavailable(TenantSyncError):
    """The broker did not take a job (Redis restarting, cut off) within the publish retries:
    nothing was sent, and asking again later is safe."""


class CatalogueUnavailable(TenantSyncError):
    """The catalogue's database did not answer (a PostgreSQL restart, a network cut, a
    connection it dropped): nothing was written, and trying again later is safe, as after a
    store outage."""


class SealedObjectError(StorageError):
    """An object of an encrypted replica cannot be opened: it is not encrypted, truncated,
    tampered with, moved from another key, or sealed with another tenant's key. Never
    retried: the bytes will not change by asking again."""


class KeyringError(TenantSyncError):
    """The keyring or a tenant's wrapped key is unusable: a file missing or malformed, a
    key name it lacks, or a wrapped key that does not open with the key it names."""


class RestoreError(TenantSyncError):
    """A restore cannot produce a verified database (no files, gap in TXIDs, target outside)."""


class ReplicaEmpty(RestoreError):
    """The replica holds no LTX file: nothing to restore (an unknown tenant)."""


class InvalidArgument(TenantSyncError, ValueError):
    """A caller's argument is of the wrong type or out of range; nothing was changed.

    With ``argument``, the message is ``argument: problem`` and both parts stay readable on
    their own (the CLI names the flag itself and shows only ``problem``)."""

    def __init__(self, message: str, *, argument: str | None = None):
        self.argument, self.problem = argument, message
        super().__init__(f"{argument}: {message}" if argument else message)


class Shredded(TenantSyncError):
    """The tenant was shredded: its replica and key are gone, and its name is refused."""


class VersionsRemain(TenantSyncError):
    """A tenant was shredded (its key and objects deleted, the catalogue says so) but the
    bucket refused to delete some old versions of them (an object lock, a policy): the
    message names one and says how erasure is still reached."""


class StillLocal(TenantSyncError):
    """The tenant's database is still on this host: an operation on its replica alone
    (shredding) would leave the application's copy, so it is refused."""


class WrongState(TenantSyncError):
    """The tenant's catalogue state forbids the operation now (only an archived tenant is
    frozen; a tenant being hydrated or archived is not shredded)."""


class NotATenant(TenantSyncError):
    """The name is not a tenant of this fleet: it matches none of its globs, or its path
    leaves the glob's directory (a symbolic link). Nothing was created or touched."""


class TenantMismatch(TenantSyncError):
    """The catalogue's row, the local path and the replica do not belong together (a row
    written by another fleet, a moved glob): acting would touch the wrong database, so
    nothing was touched."""


class ArchiveAborted(TenantSyncError):
    """The tenant was in use or changed during archival; its files were kept."""


class NoAnswer(TenantSyncError):
    """The process that owns a tenant did not answer a job in time (in fleet mode: no worker
    takes the tenant's host queue, or it is behind). The job stays queued and runs later."""


class Unshipped(TenantSyncError):
    """A fleet stopped while some tenants' committed data was not in their replicas (they
    are in state error: a sync or the final release failed); the message names them."""


class WorkerDied(TenantSyncError):
    """The process running a job died under it (a SIGKILL, the OOM killer) and is started
    again for the next job: the job did not finish, and is worth running again there."""


class Fenced(TenantSyncError):
    """Another host took the tenant over and wrote its replica past this host's copy (a
    failover while this host was gone or cut off): this host must neither upload its copy,
    which would write over the other host's commits, nor delete it."""


class LeaseHeld(TenantSyncError):
    """Another owner holds the replica's lease, or took it over from us: the message
    names the replica, the holder and when its lease expires (also as attributes, for
    scheduling the retry: ``owner`` a str, ``expires_at`` a UTC datetime, ``generation`` an
    int; None when unknown)."""

    def __init__(self, message: str, owner: str | None = None, expires_at=None, generation: int | None = None):
        super().__init__(message)
        self.owner = owner
        self.expires_at = expires_at
        self.generation = generation


# --- capture, restore and SQLite: one class or code per case a caller tells apart --------


class ReplicaConflict(TenantSyncError):
    """Another writer created the TXID we were about to write; our position is stale."""


class TargetUnavailable(RestoreError):
    """The replica holds no restorable state at the TXID or time asked for (never
    there, compacted away, or past retention); the message says what it does hold."""


class ReplicaGap(RestoreError):
    """The replica's TXIDs are not contiguous up to its newest file: the latest state
    cannot be rebuilt."""


class OutputExists(RestoreError):
    """The restore's output path exists and replacing it was not asked for."""


class RestoredCorrupt(RestoreError):
    """The restored database did not verify (mixed page sizes, unreadable, or failing
    ``quick_check``); nothing was left at the output path."""


class BundleError(TenantSyncError):
    """A cold bundle cannot be written, or does not hold what it should: malformed, truncated,
    failing a checksum or naming another TXID. Nothing was left at a restore's output path,
    and a failed verification means the tenant's LTX levels must be kept."""


class DictionaryMissing(BundleError):
    """A bundle was compressed with a zstd dictionary that the fleet's storage does not hold."""


class EncryptedFleet(TenantSyncError):
    """The fleet encrypts its replicas, and the operation would store tenants' data in the
    clear beside them (a fleet dictionary holds fragments of their pages): refused, nothing
    was stored."""


def sqlite_busy(e: sqlite3.Error) -> bool:
    """Whether SQLite failed only because a lock is held elsewhere (worth retrying):
    SQLITE_BUSY for another connection's lock on the file, SQLITE_LOCKED for a conflict
    inside one shared cache or connection (https://www.sqlite.org/rescode.html).

    Judged from the result code (extended codes keep the primary one in the low byte),
    never from the message, whose wording SQLite does not promise.
    """
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def log_failure(log: logging.Logger, what: str, e: BaseException) -> None:
    """Log that ``what`` failed: our own errors in their one line, anything else (a bug) with
    its traceback (an exception sent back from a child process has only its last line)."""
    log.error("%s failed: %s", what, e, exc_info=None if isinstance(e, TenantSyncError) else e)
