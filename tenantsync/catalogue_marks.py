"""Marks: a hydration, archival or freeze in progress, owned by one process.

Its own module because a mark is a small protocol of its own: ``mark`` (or ``claim_new``
for a tenant not in the catalogue yet) moves a tenant to hydrating, archiving or freezing and notes
the process and the state it came from, ``unmark`` ends the work or undoes it, and
``marked`` lists what a process that died may have left (``ondemand`` recovers those).
Mixed into ``Catalogue`` (``tenantsync.catalogue``), which provides ``_mine``, ``_tx``,
``_insert`` and ``_new_row``.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from .catalogue_schema import MARKED, TENANTS, TenantRecord, TenantState, _now, _states
from .errors import CatalogueUnavailable

# How long ``unmark`` keeps trying while the catalogue does not answer (a PostgreSQL
# restart), every UNMARK_RETRY seconds. A mark left set names a process still alive, so no
# recovery and no other hydration takes it for dead: the tenant would stay marked, no sync
# shipping it and no failover plan asking for it (found by bench/chaos.py).
UNMARK_PATIENCE = 60.0
UNMARK_RETRY = 0.5


class Marks:
    """The hydration and archival marks of one fleet's tenants."""

    def mark(self, name: str, to: TenantState, *, expected: set[TenantState], owner: str) -> bool:
        """Move the tenant to ``to`` (one of MARKED) from one of ``expected``, as
        :meth:`transition` does, and note ``owner`` (the process doing it) and the state
        it came from, in the same UPDATE: :meth:`unmark` puts that state back if the work
        fails, and ``OnDemand.recover`` if the owner dies."""
        c = TENANTS.c
        stmt = (sa.update(TENANTS).where(self._mine, c.name == name, c.state.in_(_states(expected)))
                .values(state=TenantState(to), mark_owner=owner, mark_from=c.state))
        with self._tx(write=True) as s:
            return s.execute(stmt).rowcount == 1

    def claim_new(self, name: str, path: str, host: str, owner: str) -> bool:
        """Insert a tenant the catalogue does not hold yet directly as ``hydrating`` by
        ``owner``; False if a row exists. :meth:`unmark` without a new state deletes it
        again: a hydration that fails leaves no row behind (an ``error`` row for every
        unknown name asked for would stay, and be retried by the catch-up schedule)."""
        row = self._new_row(name, path, host, _now()) | {"state": TenantState.hydrating, "mark_owner": owner}
        with self._tx(write=True) as s:
            stmt = self._insert().values(row).on_conflict_do_nothing(index_elements=[TENANTS.c.fleet, TENANTS.c.name])
            return len(s.execute(stmt.returning(TENANTS.c.name)).all()) == 1

    def unmark(self, name: str, owner: str, *, error: str | None = None, **finished: Any) -> bool:
        """End ``owner``'s hydration, archival or freeze of ``name`` in one write.

        With ``finished`` (``state`` and the columns the work set, e.g. ``txid``,
        ``position``, ``last_sync_at``, ``archived_txid``), those are stored. Without, the
        work is undone: the tenant goes back to the state it was marked from, with
        ``error`` as its ``last_error``; a row :meth:`claim_new` inserted is deleted.
        False if ``owner`` no longer holds the mark (it was recovered as dead). Tried again
        while the catalogue does not answer, for UNMARK_PATIENCE seconds."""
        deadline = time.monotonic() + UNMARK_PATIENCE
        while True:
            try:
                return self._unmark(name, owner, error, finished)
            except CatalogueUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(UNMARK_RETRY)

    def _unmark(self, name: str, owner: str, error: str | None, finished: dict) -> bool:
        c = TENANTS.c
        mine = sa.and_(self._mine, c.name == name, c.mark_owner == owner)
        with self._tx(write=True) as s:
            if finished:
                values = dict(finished, mark_owner=None, mark_from=None)
                values["state"] = TenantState(values["state"])
                return s.execute(sa.update(TENANTS).where(mine).values(values)).rowcount == 1
            if s.execute(sa.delete(TENANTS).where(mine, c.mark_from.is_(None))).rowcount:
                return True
            back = sa.update(TENANTS).where(mine).values(state=c.mark_from, mark_owner=None, mark_from=None,
                                                        last_error=error)
            return s.execute(back).rowcount == 1

    def marked(self, host: str) -> list[TenantRecord]:
        """This fleet's tenants in a marked state (MARKED) of ``host``, or marked by one of its
        processes (a hydration taking another host's tenant over): marked by a process, or
        without an owner (left so by a version before marks)."""
        c = TENANTS.c
        ours = sa.or_(c.host == host, c.mark_owner.startswith(f"{host}/", autoescape=True))
        return self._select(sa.select(*TENANTS.c).where(self._mine, ours, c.state.in_(list(MARKED))))
