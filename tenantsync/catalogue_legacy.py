"""Rows from before fleets: catalogue rows whose fleet is ``''``, and how a fleet takes
over the ones that are its tenants.

Its own module because it is an upgrade path, not part of the catalogue's everyday work:
a migration carried rows over from the time a catalogue held one fleet, and a fleet's own
default catalogue starts with the rows of the SQLite catalogue every fleet once shared
(``config.LEGACY_CATALOGUE``). Discovery adopts such a row by name and path, so the tenant
keeps its position and, archived, its state. Mixed into ``Catalogue``
(``tenantsync.catalogue``), which provides ``fleet``, ``dialect``, ``url`` and ``_tx``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import sqlalchemy as sa

from .catalogue_schema import TENANTS, CatalogueError


class LegacyRows:
    """Adoption of rows from before fleets by this catalogue's fleet."""

    def adopt(self, items: Iterable[tuple[str, str]]) -> int:
        """Take over rows carried over from before fleets (fleet ``''``) whose name and path
        are these: the tenant keeps its position (no full upload) and, archived, its state.
        A row with another path is not this fleet's tenant and stays where it is. How many
        were adopted (0 at once when the catalogue holds no such row)."""
        with self._tx(write=True) as s:
            return self._adopt(s, items)

    def _adopt(self, s: sa.Connection, items: Iterable[tuple[str, str]]) -> int:
        """:meth:`adopt` within the caller's write transaction: discovery adopts in the
        transaction that inserts, so it takes the write lock once."""
        c = TENANTS.c
        legacy = c.fleet == ""
        if s.execute(sa.select(c.name).where(legacy).limit(1)).first() is None:
            return 0
        other = TENANTS.alias("other")
        taken = sa.select(other.c.name).where(other.c.fleet == self.fleet, other.c.name == sa.bindparam("n"))
        stmt = (sa.update(TENANTS).where(legacy, c.name == sa.bindparam("n"), c.path == sa.bindparam("p"),
                                         ~sa.exists(taken))
                .values(fleet=self.fleet))
        return sum(s.execute(stmt, {"n": name, "p": path}).rowcount for name, path in items)

    def import_legacy(self, path: str) -> int:
        """Copy the rows of the SQLite catalogue every fleet shared by default before each
        had its own (``config.LEGACY_CATALOGUE``) into this one, as rows from before fleets:
        :meth:`adopt` then hands each to the fleet whose tenant it is. Rows already here
        are kept. How many were copied."""
        if self.dialect != "sqlite":
            return 0
        columns = [c.name for c in TENANTS.c if c.name not in ("fleet", "mark_owner", "mark_from")]
        listed = ", ".join(columns)
        conn = sqlite3.connect(self.url.database, timeout=30, isolation_level=None)
        try:
            conn.execute("ATTACH DATABASE ? AS legacy", (f"file:{path}?mode=ro",))
            have = {row[1] for row in conn.execute("PRAGMA legacy.table_info(tenants)")}
            if not set(columns) <= have:
                return 0
            only_unowned = " WHERE fleet = ''" if "fleet" in have else ""
            conn.execute("BEGIN IMMEDIATE")
            copied = conn.execute(f"INSERT OR IGNORE INTO main.tenants (fleet, {listed}) "
                                  f"SELECT '', {listed} FROM legacy.tenants{only_unowned}").rowcount
            conn.execute("COMMIT")
            return copied
        except sqlite3.Error as e:
            raise CatalogueError(f"catalogue {path}: cannot carry its rows over: {e}") from e
        finally:
            conn.close()
