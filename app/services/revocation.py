"""Revoked token ids (access-token `jti`s and refresh families) until their natural expiry.

Always the `revoked_tokens` table, with or without Redis: a revocation is durable and every instance sees it
at once, and a Redis outage can neither lose one nor refuse a request. The check costs no round trip of its
own: `current_user` folds it into the SELECT of the token's user, which every authenticated request makes
anyway (a Redis lookup would add one).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import utcnow
from app.dialects import statements_of
from app.models import RevokedToken


class RevocationStore(Protocol):
    """What the app's `revocations` provides (`DatabaseRevocationStore`; a protocol, so tests may stand in).

    `in_database`: revocations are rows in this database, so `current_user` checks them in its own query.
    """

    in_database: bool

    async def is_revoked(self, jti: str) -> bool: ...

    async def is_any_revoked(self, ids: list[str]) -> bool: ...

    async def revoke(self, jti: str, expires_at: datetime) -> None: ...


#: Is any of `:ids` revoked and not expired at `:now`? Built once: building the `IN` clause per request
#: showed up in the profile. `current_user` folds it into the user's SELECT (one round trip).
REVOKED = (
    select(RevokedToken.jti)
    .where(RevokedToken.jti.in_(bindparam("ids", expanding=True)), RevokedToken.expires_at > bindparam("now"))
    .exists()
)


def revoked_params(ids: list[str]) -> dict[str, Any]:
    return {"ids": ids, "now": utcnow()}


class DatabaseRevocationStore:
    """Rows in `revoked_tokens`; expired rows are pruned whenever something is revoked.

    `in_database`: the request's own query can check `REVOKED` instead of a separate session.
    """

    in_database = True

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker

    async def revoke(self, jti: str, expires_at: datetime) -> None:
        if expires_at <= utcnow():
            return
        async with self.sessionmaker() as session:
            await session.execute(delete(RevokedToken).where(RevokedToken.expires_at <= utcnow()))
            insert = statements_of(session).insert_ignoring_conflict
            await session.execute(insert(RevokedToken, ["jti"], jti=jti, expires_at=expires_at))
            await session.commit()

    async def is_revoked(self, jti: str) -> bool:
        return await self.is_any_revoked([jti])

    async def is_any_revoked(self, ids: list[str]) -> bool:
        if not ids:
            return False
        async with self.sessionmaker() as session:
            return bool((await session.execute(select(REVOKED), revoked_params(ids))).scalar())


def make_revocation_store(*, sessionmaker: async_sessionmaker[AsyncSession]) -> DatabaseRevocationStore:
    return DatabaseRevocationStore(sessionmaker)
