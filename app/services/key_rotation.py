"""Re-encrypting every stored secret with the first key of ENCRYPTION_KEY, so the keys after it can be dropped.

Run by `python -m app.cli rotate-encryption-key` while the service runs (docs/OPERATIONS.md): rows are read
BATCH_SIZE at a time in id order (no lock), and each one written with the new key is a conditional UPDATE
(`WHERE the column still holds what was read`), committed per batch: the row locks last one short batch, and a
value an admin saved meanwhile is never overwritten with the old one (it is read again and judged instead).
A batch writes its rows in id order, the order every revocation of refresh tokens locks them in
(`auth._revoke_settled`), and takes no other lock: a revocation waits for the batch, never deadlocks with it.
Sends take no lock on agents, so they never wait. A second run writes nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, MultiFernet
from sqlalchemy import ColumnElement, Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.crypto import DecryptionError, rotate
from app.models import Agent, Base, RefreshToken, User

#: Rows read per batch (and written per committed transaction).
BATCH_SIZE = 100
#: Unreadable rows named per kind; the count covers them all.
SHOWN_MAX = 100
#: How often one row is read again when it changed between the read and the write, before it is given up on
#: (counted as `changed`: a second run judges it).
RETRIES = 3


@dataclass
class Tally:
    """What happened to one kind of secret. `unreadable` names rows (by ids, never by content)."""

    rotated: int = 0
    current: int = 0
    unreadable_count: int = 0
    unreadable: list[str] = field(default_factory=list)
    #: Rewritten by the service on every re-read: neither judged nor touched.
    changed: int = 0


@dataclass
class Rotation:
    """The outcome of one run, per kind of stored secret."""

    agents: Tally
    refresh_successors: Tally

    @property
    def complete(self) -> bool:
        """Every stored secret is now under the first key: the others may be dropped."""
        return not any(t.unreadable_count or t.changed for t in (self.agents, self.refresh_successors))


@dataclass(frozen=True)
class _Kind:
    model: type[Base]
    id: InstrumentedAttribute[uuid.UUID]
    column: InstrumentedAttribute[str | None]
    #: The batch query's columns after the id and the secret: what names an unreadable row.
    owner: tuple[InstrumentedAttribute[Any], ...]
    joins: tuple[tuple[type[Base], ColumnElement[bool]], ...]
    label: str

    def batch(self, after: uuid.UUID | None, size: int) -> Select[Any]:
        query = select(self.id, self.column, *self.owner)
        for target, on in self.joins:
            query = query.join(target, on)
        query = query.where(self.column.is_not(None))
        if after is not None:
            query = query.where(self.id > after)
        return query.order_by(self.id).limit(size)

    def name(self, row: Any) -> str:
        return self.label.format(*row)


AGENTS = _Kind(Agent, Agent.id, Agent.webhook_headers_encrypted, (Agent.team_id,), (), "agent {0} (team {2})")
SUCCESSORS = _Kind(
    RefreshToken,
    RefreshToken.id,
    RefreshToken.successor_encrypted,
    (RefreshToken.user_id, User.team_id),
    ((User, User.id == RefreshToken.user_id),),
    "refresh token {0} (user {2}, team {3})",
)


async def rotate_secrets(
    *, session: AsyncSession, current: Fernet, keys: MultiFernet, batch_size: int = BATCH_SIZE
) -> Rotation:
    """Re-encrypt agents' webhook headers and refresh-token successors with `current` (the first of `keys`).
    Unreadable rows are counted, named and left as they are. Commits once per batch."""
    return Rotation(
        agents=await _rotate_kind(session, AGENTS, current, keys, batch_size),
        refresh_successors=await _rotate_kind(session, SUCCESSORS, current, keys, batch_size),
    )


async def _rotate_kind(
    session: AsyncSession, kind: _Kind, current: Fernet, keys: MultiFernet, batch_size: int
) -> Tally:
    tally = Tally()
    after: uuid.UUID | None = None
    while True:
        rows = (await session.execute(kind.batch(after, batch_size))).all()
        for row in rows:
            outcome = await settle(session, kind, row[0], row[1], current=current, keys=keys)
            if outcome == "unreadable":
                tally.unreadable_count += 1
                if len(tally.unreadable) < SHOWN_MAX:
                    tally.unreadable.append(kind.name(row))
            elif outcome is not None:
                setattr(tally, outcome, getattr(tally, outcome) + 1)
        await session.commit()
        if len(rows) < batch_size:
            return tally
        after = rows[-1][0]


async def settle(
    session: AsyncSession, kind: _Kind, row_id: uuid.UUID, token: str, *, current: Fernet, keys: MultiFernet
) -> str | None:
    """Bring one row's secret, read as `token`, under `current`: `rotated`, `current` (already was),
    `unreadable` (no key reads it; left), `changed` (rewritten at every try), or None (gone meanwhile)."""
    for _ in range(RETRIES):
        try:
            new = rotate(token, current=current, keys=keys)
        except DecryptionError:
            return "unreadable"
        if new is None:
            return "current"
        written = await session.execute(
            update(kind.model)
            .where(kind.id == row_id, kind.column == token)
            .values({kind.column: new})
            .execution_options(synchronize_session=False)
        )
        if getattr(written, "rowcount", 0) == 1:
            return "rotated"
        # Saved (or cleared, or deleted) since it was read: judge what is there now.
        again = (await session.execute(select(kind.column).where(kind.id == row_id))).scalar()
        if again is None:
            return None
        token = again
    return "changed"
