"""Fenced copies: this host's files of tenants another host took over.

A host that was gone or cut off while its tenants failed over finds, when it takes a
tenant's lease back, that another host wrote the replica past its own copy. Uploading its
copy would write over the other host's commits; deleting it could lose commits the replica
never got. So the fleet moves the files aside and records them here, one row per (fleet,
host, name), in a table of their own: the tenant's own row is the host's that took it over
(in a shared catalogue) and must not be touched. A fenced name is not synced on this host
again until an operator removes its record (``tenantsync unfence``), having dealt with the
files. Mixed into ``Catalogue`` (``tenantsync.catalogue``), which provides ``_tx``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime

import sqlalchemy as sa

from .catalogue_schema import METADATA, TENANTS, UTCDateTime, _chunks, _utc

FENCED = sa.Table(
    "fenced",
    METADATA,
    sa.Column("fleet", sa.String(1024), primary_key=True, server_default=""),
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("aside", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("txid", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("fenced_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class FencedCopy:
    """One fenced copy: the tenant's local ``path`` on ``host``, moved to ``aside``; ``txid``
    is the last one this host shipped (its copy may hold commits after it)."""

    fleet: str
    host: str
    name: str
    path: str
    aside: str
    reason: str
    txid: int
    fenced_at: datetime


class FencedCopies:
    """The fenced copies of one fleet's tenants."""

    def record_fenced(self, copy: FencedCopy) -> None:
        """Record ``copy`` (its fleet is this catalogue's); a name fenced again on the same
        host (its files were recreated, then fenced too) keeps the newest record."""
        row = asdict(copy) | {"fleet": self.fleet, "fenced_at": _utc(copy.fenced_at, "fenced_at")}
        with self._tx(write=True) as s:
            s.execute(sa.delete(FENCED).where(*self._fenced_key(copy.host, copy.name)))
            s.execute(sa.insert(FENCED).values(row))

    def unfenced_elsewhere(self, names: Iterable[str], host: str) -> set[str]:
        """Those of ``names`` whose row is another host's than ``host`` (a shared catalogue:
        the tenant moved there) and whose copy on ``host`` is not fenced yet: one query."""
        names = sorted(set(names))
        fenced_here = sa.exists().where(FENCED.c.fleet == self.fleet, FENCED.c.host == host,
                                        FENCED.c.name == TENANTS.c.name)
        with self._tx(write=False) as s:
            return {name for chunk in _chunks(names)
                    for name in s.scalars(sa.select(TENANTS.c.name).where(
                        self._mine, TENANTS.c.name.in_(chunk), TENANTS.c.host != host, ~fenced_here))}

    def fenced(self, host: str | None = None, name: str | None = None) -> list[FencedCopy]:
        """The fenced copies, of ``host`` and of tenant ``name`` only if given, by name."""
        stmt = sa.select(*FENCED.c).where(FENCED.c.fleet == self.fleet).order_by(FENCED.c.name, FENCED.c.host)
        if host is not None:
            stmt = stmt.where(FENCED.c.host == host)
        if name is not None:
            stmt = stmt.where(FENCED.c.name == name)
        with self._tx(write=False) as s:
            return [FencedCopy(*row) for row in s.execute(stmt)]

    def unfence(self, host: str, name: str) -> bool:
        """Forget the fenced copy of ``name`` on ``host``: the name may be synced there again.
        False if there was none."""
        with self._tx(write=True) as s:
            return s.execute(sa.delete(FENCED).where(*self._fenced_key(host, name))).rowcount == 1

    def _fenced_key(self, host: str, name: str) -> tuple:
        return FENCED.c.fleet == self.fleet, FENCED.c.host == host, FENCED.c.name == name
