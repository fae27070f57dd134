"""Capture: turn a live SQLite database's committed WAL frames into L0 LTX files.

One call, :meth:`Capture.sync_once`, does a whole pass over persisted state: read the
WAL past the position, keep only committed transactions, write one L0 file at the next
TXID, advance the position. Nothing runs between calls, so a few workers can serve
thousands of databases; the CLI loop and the fleet jobs both just call it.

Why a read transaction is held between passes (the one resource an *active* database
costs): while any connection of ours holds a read mark, SQLite cannot copy WAL frames past
that mark into the main file, so nobody can checkpoint and reset the WAL under frames we
have not read yet. A pass that has shipped well past the mark moves it forward without a
gap (:meth:`_rotate_mark`: a second connection takes the new mark first), so a checkpoint
can copy what we have shipped; between passes we hold SQLite's checkpoint lock, so that
checkpoint is ours (:meth:`_hold_checkpoint_lock`). Only :meth:`checkpoint`,
under a write-lock barrier after every committed frame has been read, lets the mark become
SQLite's read-lock 0 (every frame then in the main file): that lets the application's next
write restart the WAL (the frames it overwrites are ones we have read) but stops every copy
into the main file, and past its autocheckpoint threshold each application commit would
sort the whole WAL index for a checkpoint that cannot run, so the first pass over the
restarted WAL takes a real mark again. :meth:`release` (idle databases) checkpoints
everything, records the main file's stat, and closes all handles; the next pass proves
continuity from that stat instead of from a held lock (see ``continuity.py``).
When continuity cannot be proved (the WAL was reset, truncated or replaced by someone
else, the file was swapped), the pass writes a full-page L0 at the next TXID, never a gap.

Nothing is added to the user's schema: the barrier is ``BEGIN IMMEDIATE`` on our own
connection, not a write to a helper table.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, replace
from typing import Callable

from . import l0, logs
from . import wal as walmod
from .continuity import Broken, InMainFile, continuity, may_have_news, wal_empty
from .errors import DatabaseError, PreconditionFailed, ReplicaConflict, TenantSyncError, sqlite_busy
from .fence import file_node_id
from .outcome import Full
from .position import DBStat, Position
from .replica import Replica
from .tenants import SQLITE_MAGIC

log = logging.getLogger(__name__)

# Litestream's defaults: PASSIVE past 1000 WAL pages, TRUNCATE past 121359.
DEFAULT_CHECKPOINT_PAGES = 1000
DEFAULT_TRUNCATE_PAGES = 121359
# Least time between two PASSIVE checkpoints of one database: each holds the application's
# writes for a few milliseconds, so at thousands of commits a second a checkpoint after
# every pass would cost it a large share of its throughput. TRUNCATE is not held back.
CHECKPOINT_GAP = 0.25
# How long a pass waits for SQLite's wal-index to count a commit already in the WAL file
# (see :meth:`Capture._await_indexing`), polling every INDEXING_POLL seconds.
INDEXING_WAIT = 0.25
INDEXING_POLL = 0.005
# Byte of the -shm file SQLite locks to checkpoint (WAL_CKPT_LOCK at UNIX_SHM_BASE 120 + 1,
# https://www.sqlite.org/walformat.html "Locks").
SHM_CHECKPOINT_LOCK = 121


@dataclass(frozen=True)
class SyncResult:
    """What one pass shipped. ``txid`` is None when there was nothing new; ``full`` says
    why the file holds every page, None for an incremental one.

    ``follow_up`` is set by a pass that checkpointed a busy WAL: our mark is now
    read-lock 0, and a second pass a few milliseconds later (once the application has
    restarted the WAL) moves it to a real one (see :meth:`Capture._rotate_mark`). A runtime
    driven by file events should run that pass without waiting for the next event.
    """

    txid: int | None
    pages: int = 0
    size: int = 0
    full: Full | None = None
    follow_up: bool = False


class _Mark(enum.Enum):
    """Our read mark, as the continuity proof sees it."""

    NONE = "no read transaction open"
    HELD = "a read mark, taken after the position was set: a checkpoint may have run before it"
    SINCE_POSITION = "a read mark held without a gap since the position was set: nobody checkpointed past it"


@dataclass(frozen=True)
class _Backfilled:
    """After our checkpoint: the WAL generation and end offset that are wholly in the main
    file, and the main file's stat taken before any writer could run again."""

    salt1: int
    salt2: int
    end: int
    db_stat: DBStat | None


def _read_snapshot(conn: sqlite3.Connection) -> None:
    """Open a read transaction that holds a WAL read mark (a bare BEGIN takes none)."""
    conn.execute("BEGIN")
    conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()


def _connect(path: str, timeout: float) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout, check_same_thread=False)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


class Capture:
    """Replication state of one database file, advanced one pass at a time."""

    def __init__(
        self,
        db_path: str,
        replica: Replica,
        *,
        position: Position | None = None,
        checkpoint_pages: int = DEFAULT_CHECKPOINT_PAGES,
        truncate_pages: int = DEFAULT_TRUNCATE_PAGES,
        busy_timeout: float = 5.0,
        checkpoint_gap: float = CHECKPOINT_GAP,
        own_checkpoints: bool = True,
        on_position: Callable[[Position], None] | None = None,
    ):
        self.path = os.path.abspath(db_path)
        self.wal_path = self.path + "-wal"
        # The database file's identity, written into every L0 header (fence.py); set on open.
        self.node_id = 0
        self.replica = replica
        self.position = position
        self.on_position = on_position
        # A position handed in (state file, catalogue) is checked against the replica once.
        self._position_known = False
        self.checkpoint_pages = checkpoint_pages
        self.truncate_pages = truncate_pages
        self.checkpoint_gap = checkpoint_gap
        self._next_checkpoint = 0.0
        # Hold SQLite's checkpoint lock between our passes (see :meth:`_hold_checkpoint_lock`).
        self.own_checkpoints = own_checkpoints
        self.busy_timeout = busy_timeout
        self._fd: int | None = None
        # The -shm file, opened once after SQLite has it open and closed after SQLite's
        # connections: closing any descriptor of a file drops all of this process's
        # POSIX locks on it, and SQLite's read marks are such locks on the -shm file.
        self._shm_fd: int | None = None
        # ``_reader`` holds the read mark; ``_spare`` takes the next one before ``_reader``
        # lets go (see :meth:`_rotate_mark`); ``_writer`` takes the write-lock barrier.
        self._reader: sqlite3.Connection | None = None
        self._spare: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        # The wal-index read just after our mark was taken: its generation and last frame
        # bound the frame our mark pins.
        self._mark_bound: walmod.WALIndex | None = None
        self._mark = _Mark.NONE
        # Set when the database file was swapped under us: the next pass writes every page.
        self._must_write_full: Full | None = None
        # Set by a pass that left a commit in the WAL unread because SQLite's wal-index did
        # not count it yet (:meth:`_await_indexing`): its caller must not take the pass as
        # covering every write made before it started.
        self.commit_unindexed = False

    # -- public passes -------------------------------------------------------

    def sync_once(self) -> SyncResult:
        """Ship every transaction committed since the position as one L0 file."""
        self.commit_unindexed = False
        if not self._open():
            return SyncResult(None)
        result = self._ship()
        frames = self._wal_frames()
        if frames >= self.truncate_pages:
            result = self._merge(result, self.checkpoint(truncate=True))
        elif frames >= self.checkpoint_pages and time.monotonic() >= self._next_checkpoint:
            result = replace(self._merge(result, self.checkpoint()), follow_up=True)
        else:
            self._rotate_mark()
        self._hold_checkpoint_lock()
        return result

    def has_news(self) -> bool:
        """Whether a pass could ship anything, judged without opening SQLite.

        For an idle tenant: opening a connection, taking the barrier and closing all
        touch the ``-wal`` file, so a watcher seeing those as writes would wake the
        tenant forever. This reads two small headers instead: the WAL's, and the frame
        header where the next commit would be. A false positive only costs a pass.
        """
        pos = self.position
        if pos is None or self._fd is not None:
            return True
        return may_have_news(pos, self.wal_path, self.path)

    def shipped_all(self) -> bool:
        """Whether the open database's WAL holds nothing past the position, judged from
        the WAL header and size while our read mark has been held since the position: an
        idle release then uploads nothing (so it needs no lease). False whenever unsure,
        which only costs that lease write; a commit landing after this is shipped under
        the fence, which refuses it without a held lease. Also true when the WAL holds no
        frame and the main file is as shipped: a tenant whose first pass found no WAL (a
        copied or freshly restored file) and was not written since."""
        pos = self.position
        if pos is None or self._fd is None:
            return False
        if self._nothing_in_wal():
            return True
        if not self._held_since_position:
            return False
        try:
            header, size = walmod.read_header(self.wal_path)
        except TenantSyncError:
            return False
        return header is not None and (header.salt1, header.salt2) == (pos.salt1, pos.salt2) \
            and size <= pos.wal_offset

    def checkpoint(self, truncate: bool = False, wait: float = 0.05) -> SyncResult:
        """Copy the WAL into the main file without ever losing an unshipped frame.

        Ship first, while the application keeps writing; if that moved our mark, let
        SQLite copy up to it and ship again. Then, under ``BEGIN IMMEDIATE`` (no commit can
        land), only *read* the few commits that arrived meanwhile, drop our read mark,
        checkpoint what is left, and take the mark again (read-lock 0 if the WAL is fully
        copied, so the application's next write restarts the WAL); the application waits
        for that and nothing else. The tail is uploaded after the barrier, but the fence is
        asked first, under it: a tail we may not ship is not copied either. If the upload
        still fails, the position has not moved, and the next pass either re-reads those
        frames or, if the WAL restarted, writes a full-page file. If the application holds the
        write lock for all of ``wait`` we skip the checkpoint this round rather than stall it.
        """
        if not self._open():
            return SyncResult(None)
        result = self._ship()
        if self._rotate_mark():
            # Let SQLite copy what we have shipped while the application keeps writing,
            # then ship again: the barrier is left with the last few milliseconds of both.
            self._writer_conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            result = self._merge(result, self._ship())
        barrier = self._take_barrier(wait)
        if barrier is None:
            log.info("%s: checkpoint skipped, the application held the write lock for %.3f s", self.path, wait)
            return result
        try:
            tail = self._prepare(patience=0.0)  # under the barrier no commit is under way
            if tail is not None:
                self._fence_tail(tail)
            self._end_read()
            backfill = self._passive_checkpoint(wait)
            if not truncate:
                self._begin_read(proof=backfill.db_stat if backfill is not None else None)
        finally:
            barrier.execute("ROLLBACK")
        self._next_checkpoint = time.monotonic() + self.checkpoint_gap
        if tail is not None:
            result = self._commit(tail)
        self._mark_backfilled(backfill)
        if truncate:
            # A commit slipping in between ROLLBACK and the truncate is copied into the
            # main file by it, which changes the file's stat: the next pass sees that and
            # ships a full-page file instead of missing the commit.
            self._reader.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self._begin_read()
        self._hold_checkpoint_lock()  # SQLite let go of it at the end of our checkpoints
        return result

    def checkpoint_unshipped(self) -> bool:
        """Copy the whole WAL into the main file and truncate it, frames never shipped
        included; whether it did. Only for the operator's ``at-wal-ceiling: checkpoint``
        during a storage outage (Fleet): the database loses nothing, the replica loses the
        writes since the position as restore points, since the next pass ships every page.
        An application holding the write lock past the busy timeout leaves the WAL as it
        is (the next failed pass tries again); the position then still holds."""
        if not self._open():
            return False
        self._end_read()
        try:
            busy = self._reader.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            self._begin_read()
            self._hold_checkpoint_lock()  # SQLite let go of it at the end of the checkpoint
        if busy:
            return False
        self._must_write_full = Full.WAL_CEILING
        return True

    def _fence_tail(self, tail: l0.PendingL0) -> None:
        """Refuse, before the checkpoint copies it, a tail we may not ship.

        Copied into the main file, it would let the application restart the WAL; the
        lease holder (another host, or a later job of ours) could then no longer prove
        continuity and would upload the whole database again. Under the barrier, so the
        fence must be cheap: the fleet's is a clock comparison (``Leaser.held``).
        """
        if self.fence is None:
            return
        try:
            self.fence()
        except BaseException:
            tail.close()
            raise

    def is_open(self) -> bool:
        """Whether its handles are open: a pass ran since it was made or released."""
        return self._fd is not None

    def release(self) -> SyncResult:
        """Ship everything, checkpoint it, and close every handle (the tenant went idle)."""
        if not self._open():
            return SyncResult(None)
        if self._nothing_in_wal():
            # Nothing to ship or copy: skip the barrier (a second connection, a write
            # lock). A commit landing after this check stays in the WAL for the next pass.
            self.close()
            return SyncResult(None)
        result = self.checkpoint(wait=min(1.0, self.busy_timeout))
        self.close()
        return result

    def close(self) -> None:
        """Drop connections and the file handle; the position stays valid."""
        self._mark = _Mark.NONE
        for conn in (self._reader, self._spare, self._writer):
            if conn is not None:
                conn.close()
        self._reader = self._spare = self._writer = None
        self._mark_bound = None
        # Closed only after the SQLite connections: closing any descriptor of a file
        # drops this process's POSIX locks on it, including SQLite's.
        for fd in (self._fd, self._shm_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._shm_fd = None

    # -- opening and locks ---------------------------------------------------

    def _open(self) -> bool:
        """Open handles and the read mark; False if the file is empty (nothing yet)."""
        if self._fd is not None and self._same_file():
            if self._mark is _Mark.NONE:
                self._begin_read()
            return True
        if self._fd is not None:
            log.info("%s: database file was replaced; reopening", self.path)
            self.close()
            self._must_write_full = Full.FILE_REPLACED
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise DatabaseError(f"{self.path}: cannot open database: {e.strerror}") from e
        head = os.pread(fd, 100, 0)
        if not head:
            os.close(fd)
            return False
        if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
            os.close(fd)
            raise DatabaseError(f"{self.path}: not a SQLite database")
        self._fd = fd
        self.node_id = file_node_id(os.fstat(fd))
        try:
            self._reader = _connect(self.path, self.busy_timeout)
            mode = self._reader.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.Error as e:
            self.close()
            raise DatabaseError(f"{self.path}: cannot open database: {e}") from e
        if mode.lower() != "wal":
            self.close()
            raise DatabaseError(f"{self.path}: cannot switch to WAL mode (journal_mode is {mode})")
        self._begin_read()
        return True

    def _same_file(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            raise DatabaseError(f"{self.path}: database file disappeared") from None

    def _writer_conn(self) -> sqlite3.Connection:
        if self._writer is None:
            self._writer = _connect(self.path, 0)
        return self._writer

    def _begin_read(self, proof: DBStat | None = None) -> None:
        """Take the read mark; ``proof``: the main file's stat just settled under the
        barrier, kept as it is if the mark proves the backfill again."""
        _read_snapshot(self._reader)
        self._mark = _Mark.HELD
        self._note_mark()
        self._note_backfilled(proof)

    def _note_mark(self) -> None:
        self._mark_bound = self._wal_index()

    def _rotate_mark(self) -> bool:
        """Move our read mark to the WAL's end without a moment unpinned: the spare
        connection takes the new mark before the reader drops the old one.

        Only once the pass has shipped an eighth of the checkpoint threshold past the
        mark (so a trickle of commits costs nothing), or any frame of a WAL the
        application restarted while we held read-lock 0. The new mark is then never
        read-lock 0 (which would let the WAL restart before :meth:`_note_backfilled` could
        record it): the position is past the bound of the old mark, so the WAL holds
        frames the old mark stopped anyone from copying into the main file.
        """
        pos, bound = self.position, self._mark_bound
        if self._mark is _Mark.NONE or pos is None or pos.backfilled or bound is None:
            return False
        frames = self._wal_frames()
        index = self._wal_index()
        if index is None or not index.of_generation(pos.salt1, pos.salt2):
            return False
        if bound.of_generation(pos.salt1, pos.salt2):
            if frames - bound.max_frame < max(1, self.checkpoint_pages // 8):
                return False
        elif frames < 1:
            # A WAL generation newer than the mark's can only have started while the mark
            # was read-lock 0, which stops every copy: no frame of it is in the main
            # file, so any frame of it makes the new mark a real one. Leave read-lock 0
            # at once: past its autocheckpoint threshold every commit of the application
            # would otherwise sort the whole WAL index for a checkpoint we block.
            return False
        if self._spare is None:
            self._spare = _connect(self.path, self.busy_timeout)
        _read_snapshot(self._spare)
        self._reader.execute("COMMIT")
        self._reader, self._spare = self._spare, self._reader
        self._note_mark()
        return True

    def _hold_checkpoint_lock(self) -> None:
        """Take SQLite's checkpoint lock on the ``-shm`` file, as a checkpointer would,
        and keep it until our next checkpoint (SQLite in this process lets go of it at
        the end of each) or until we close.

        Another process's checkpoint then returns SQLITE_BUSY at once, without waiting
        (SQLite never waits for this lock). Past its autocheckpoint threshold the
        application tries one after every commit; while we hold a read mark that attempt
        can copy little and restart nothing, yet it scans the WAL index and probes every
        read lock inside the application's commit. With this lock held it fails before
        that work, and we copy the WAL into the main file ourselves, in our own pass,
        every CHECKPOINT_GAP past ``checkpoint_pages``. A lock held by someone else (a
        checkpoint running right now) is left alone; the next pass tries again. The
        kernel drops it if this process dies.
        """
        if not self.own_checkpoints or self._shm_fd is None:
            return
        try:
            fcntl.lockf(self._shm_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_CHECKPOINT_LOCK)
        except OSError:
            pass  # held by a running checkpoint, or a read-only descriptor

    def _end_read(self) -> None:
        if self._mark is not _Mark.NONE:
            self._reader.execute("COMMIT")
        self._mark = _Mark.NONE

    def _take_barrier(self, wait: float) -> sqlite3.Connection | None:
        """``BEGIN IMMEDIATE`` on the spare connection, or None after ``wait`` seconds.

        Retried in a loop rather than through SQLite's busy handler: that sleeps 1, 2,
        5, 10 ms between tries and almost never lands in the microseconds between two
        transactions of a busy writer, so the barrier would wait long or be skipped.
        """
        conn = self._writer_conn()
        deadline = time.monotonic() + wait
        spin_until = time.monotonic() + min(wait, 0.005)
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return conn
            except sqlite3.OperationalError as e:
                if not sqlite_busy(e) or time.monotonic() >= deadline:
                    return None
                if time.monotonic() >= spin_until:
                    time.sleep(0.0005)

    def _passive_checkpoint(self, wait: float) -> _Backfilled | None:
        """Checkpoint under the barrier; what is then in the main file if every frame is,
        else None.

        The application's autocheckpoint may hold the checkpoint lock when we arrive (it
        runs right after a commit, outside the write lock); SQLite does not wait for that
        lock, so we retry until it is free or ``wait`` has passed.
        """
        deadline = time.monotonic() + wait
        while True:
            busy, frames, _ = self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not (busy and frames == -1) or time.monotonic() >= deadline:
                break
            time.sleep(0.0002)
        # Judged from the wal-index, not from this checkpoint's result: the application's
        # own checkpoint may have copied the frames, and under the barrier nothing moves.
        index, pos = self._wal_index(), self.position
        if index is None or pos is None or not index.fully_backfilled:
            return None
        return _Backfilled(index.salt1, index.salt2, index.end_offset(pos.page_size),
                          DBStat.settled(self.path, pos.db_stat))

    def _mark_backfilled(self, backfill: _Backfilled | None) -> None:
        pos = self.position
        if backfill is None or pos is None:
            return
        same_end = pos.wal_offset == backfill.end and (pos.salt1, pos.salt2) == (backfill.salt1, backfill.salt2)
        if same_end and pos.backfilled:
            return  # proved again under our newer read mark, with the stat as it is now
        if pos.wal_offset == 0 or same_end:
            self._set_position(pos.advanced(backfilled=True, db_stat=backfill.db_stat))
            self._position_under_mark()

    # -- the pass -------------------------------------------------------------

    def trust_position(self) -> None:
        """Take the position handed in as the replica's, without listing it: the caller
        knows no one else wrote there since (it renewed its own lease version). A wrong
        trust costs no data: the upload's conditional write fails and the next pass
        resolves the position from the replica."""
        if self.position is not None and not self._position_known:
            self._checked_position()

    def _resolve_position(self) -> Position | None:
        """Our position, checked once against the replica, else rebuilt from it."""
        if self._position_known:
            return self.position
        if self.position is None or self.replica.max_txid() != self.position.txid:
            self.position = Position.of_replica(self.replica)
        self._checked_position()
        return self.position

    def _checked_position(self) -> None:
        self._position_known = True
        if self._mark is _Mark.SINCE_POSITION:
            self._mark = _Mark.HELD

    def _position_under_mark(self) -> None:
        """The position was just set: a read mark held now has been held since it."""
        if self._mark is not _Mark.NONE:
            self._mark = _Mark.SINCE_POSITION

    @property
    def _held_since_position(self) -> bool:
        return self._mark is _Mark.SINCE_POSITION

    def _nothing_in_wal(self) -> bool:
        return wal_empty(self.position, self.wal_path, self.path, self._held_since_position)

    def _set_position(self, position: Position) -> None:
        self.position = position
        if self.on_position is not None:
            self.on_position(position)

    def _ship(self) -> SyncResult:
        pending = self._prepare()
        return SyncResult(None) if pending is None else self._commit(pending)

    def _prepare(self, patience: float = INDEXING_WAIT) -> l0.PendingL0 | None:
        """Read and encode what is new since the position; None if nothing is. ``patience``:
        how long to wait for SQLite to count a commit already in the WAL (_await_indexing)."""
        pos = self._resolve_position()
        header, wal_size = walmod.read_header(self.wal_path)
        if pos is None:
            return self._prepare_full(None, header, wal_size, Full.FIRST)
        if self._must_write_full is not None:  # cleared once such a file is uploaded (_commit)
            return self._prepare_full(pos, header, wal_size, self._must_write_full)
        cont = continuity(pos, header, wal_size, self.wal_path, self.path, self._held_since_position)
        if isinstance(cont, Broken):
            return self._prepare_full(pos, header, wal_size, cont.why)
        if isinstance(cont, InMainFile):
            return None
        new = self._await_indexing(header, wal_size, cont.offset, cont.checksum, patience)
        if new.end == cont.offset:
            if pos.checksum is None and cont.offset == pos.wal_offset:
                # A position rebuilt from an L0 header: keep the checksum just proved, so
                # the next pass checks one frame header instead of scanning the WAL.
                self._set_position(pos.advanced(checksum=cont.checksum))
            return None
        return l0.incremental(pos, header, new, cont.offset, self.node_id)

    def _await_indexing(self, header: walmod.WALHeader, wal_size: int, start: int,
                        checksum: tuple[int, int], patience: float) -> l0.Committed:
        """The committed frames from ``start``, bounded by SQLite's wal-index, once the index
        counts every commit the WAL file held as the pass began (``wal_size``).

        A writer appends its commit to the WAL file first and counts it in the wal-index
        after; the watcher's event comes from the first step, so the pass it starts can
        run in between (a writer descheduled on a loaded host: found by bench/chaos.py).
        Stopping at the index there, a pass would find nothing new, and its caller record
        the tenant as shipped up to the pass's start, which the unread commit precedes:
        nothing would ask for it again. So while a verified commit lies past the index,
        the pass waits for the index (``patience`` at most) and reads again; still not
        counted (a writer killed mid-commit: the next writer overwrites those frames, or a
        recovery counts them), it sets ``commit_unindexed`` for its caller. Costs one
        frame-header read when the index ends before the file: an older WAL generation's
        frames (after a restart) have other salts and are not read on."""
        deadline = time.monotonic() + patience
        while True:
            new = l0.committed_frames(self.wal_path, header, wal_size, start, checksum, self._wal_index())
            if new.end + header.frame_size > wal_size:
                return new
            frame = walmod.read_range(self.wal_path, new.end, new.end + walmod.FRAME_HEADER_SIZE)
            if frame[8:16] != header.salt1.to_bytes(4, "big") + header.salt2.to_bytes(4, "big"):
                return new
            past = l0.committed_frames(self.wal_path, header, wal_size, new.end, new.checksum, None)
            if past.end == new.end:  # frames of a transaction not committed yet: its commit sends its own event
                return new
            if time.monotonic() >= deadline:
                self.commit_unindexed = True
                return new
            time.sleep(INDEXING_POLL)

    def _prepare_full(self, pos: Position | None, header: walmod.WALHeader | None, wal_size: int,
                      why: Full) -> l0.PendingL0:
        return l0.full(pos, header, wal_size, why, path=self.path, wal_path=self.wal_path,
                       fd=self._fd, reader=self._reader, node_id=self.node_id)

    def _commit(self, pending: l0.PendingL0) -> SyncResult:
        """Upload, then advance the position: never the other way round."""
        try:
            with logs.about(txids=f"{pending.header.min_txid:016x}-{pending.header.max_txid:016x}"):
                self._upload(pending)
        finally:
            pending.close()
        if pending.full is not None:
            self._must_write_full = None
        self._set_position(pending.position)
        self._position_under_mark()
        return SyncResult(pending.header.max_txid, pending.pages, pending.size, pending.full)

    def _wal_index(self) -> walmod.WALIndex | None:
        """SQLite's wal-index header (see ``wal.read_index`` for when it can be trusted),
        read through our own ``-shm`` descriptor, opened on first use once SQLite has the
        file: None before that or when it cannot be read consistently."""
        if self._shm_fd is None:
            if self._reader is None:
                return None
            try:
                # Read-write: a write lock (the checkpoint lock) needs a writable descriptor.
                self._shm_fd = os.open(self.path + "-shm", os.O_RDWR)
            except OSError:
                try:
                    self._shm_fd = os.open(self.path + "-shm", os.O_RDONLY)
                except OSError:
                    return None
        return walmod.read_index(self._shm_fd)

    def _note_backfilled(self, proof: DBStat | None = None) -> None:
        """Right after taking a read mark: if every frame up to the position is in the
        main file and the WAL ends there, say so.

        Then our new mark may be read-lock 0, which lets the application's next write
        restart the WAL; the next pass must know that nothing was lost, not write a
        full-page file. No frame can be copied into the main file while we hold a mark
        at or before the end, so the stat taken now stays true until the mark moves.
        """
        pos, index = self.position, self._wal_index()
        if pos is None or pos.backfilled or index is None or pos.wal_offset <= walmod.WAL_HEADER_SIZE:
            return
        if index.of_generation(pos.salt1, pos.salt2) and index.fully_backfilled \
                and pos.wal_offset == index.end_offset(pos.page_size):
            self._set_position(pos.advanced(backfilled=True, db_stat=DBStat.settled(self.path, proof or pos.db_stat)))

    # Called right before every upload, and before a checkpoint copies frames not yet
    # shipped; raises (e.g. LeaseHeld) if this process may no longer write the replica.
    # The fleet sets it to its lease check.
    fence: Callable[[], None] | None = None

    def _upload(self, pending: l0.PendingL0) -> None:
        if self.fence is not None:
            self.fence()
        hdr = pending.header
        try:
            self.replica.write(0, hdr, pending.data, pending.size)
        except PreconditionFailed as e:
            self._position_known = False
            raise ReplicaConflict(
                f"{self.replica}: txid {hdr.max_txid:016x} already exists; another process "
                f"is replicating this database"
            ) from e

    def _wal_frames(self) -> int:
        pos = self.position
        if pos is None or pos.wal_offset <= walmod.WAL_HEADER_SIZE or pos.backfilled:
            return 0
        return (pos.wal_offset - walmod.WAL_HEADER_SIZE) // (walmod.FRAME_HEADER_SIZE + pos.page_size)

    @staticmethod
    def _merge(first: SyncResult, second: SyncResult) -> SyncResult:
        return second if second.txid is not None else first

