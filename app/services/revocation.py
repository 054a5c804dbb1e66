"""Revoked token ids (access-token `jti`s and refresh families) until their natural expiry.

Redis when `REDIS_URL` is set (one key per id, expiring with the token), else the `revoked_tokens` table:
either way every worker sees a revocation at once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from redis.asyncio import Redis
from sqlalchemy import bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import utcnow
from app.dialects import statements_of
from app.models import RevokedToken

REDIS_PREFIX = "revoked:"


class RevocationStore(Protocol):
    """What the app's `revocations` provides (the two stores below).

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


class RedisRevocationStore:
    """One key per revoked id with a TTL equal to the token's remaining lifetime."""

    in_database = False

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def revoke(self, jti: str, expires_at: datetime) -> None:
        seconds = int((expires_at - utcnow()).total_seconds()) + 1
        if seconds > 0:
            await self.redis.set(REDIS_PREFIX + jti, b"1", ex=seconds)

    async def is_revoked(self, jti: str) -> bool:
        return await self.is_any_revoked([jti])

    async def is_any_revoked(self, ids: list[str]) -> bool:
        if not ids:
            return False
        return int(await self.redis.exists(*(REDIS_PREFIX + i for i in ids))) > 0


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


RevocationStoreImpl = RedisRevocationStore | DatabaseRevocationStore


def make_revocation_store(
    *, redis: Redis | None, sessionmaker: async_sessionmaker[AsyncSession]
) -> RevocationStoreImpl:
    return RedisRevocationStore(redis) if redis is not None else DatabaseRevocationStore(sessionmaker)
