"""Personal API keys: minting, listing and revoking them, and finding the account a presented key opens."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Select, and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.errors import NotFound, Unprocessable
from app.models import ApiKey, User
from app.security import API_KEY_MAX_LENGTH, API_KEY_SHOWN, hash_api_key, new_api_key

API_KEY_NOT_FOUND = "API key not found"
EXPIRY_IN_PAST = "expires_at must be in the future"
#: `last_used_at` is written when it is older than this, so a busy key costs one UPDATE a minute, not one a request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def key_fields(key: ApiKey) -> dict[str, Any]:
    """What a list shows of a key: never the key, never its hash."""
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "user_id": key.user_id,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "last_used_at": key.last_used_at,
    }


async def create_key(
    *, session: AsyncSession, settings: Settings, user: User, name: str, expires_at: datetime | None
) -> tuple[ApiKey, str]:
    """Store a new key of `user` and return it with the key itself, which nothing can read back later."""
    if expires_at is not None and expires_at <= utcnow():
        raise Unprocessable(EXPIRY_IN_PAST, loc=("body", "expires_at"))
    secret = new_api_key()
    key = ApiKey(
        user_id=user.id,
        team_id=user.team_id,
        name=name,
        prefix=secret[:API_KEY_SHOWN],
        key_hash=hash_api_key(secret, settings),
        expires_at=expires_at,
    )
    session.add(key)
    await session.commit()
    return key, secret


async def list_keys(*, session: AsyncSession, user: User, whole_team: bool) -> list[ApiKey]:
    """The caller's keys, newest first; `whole_team` (admins only: the router checks) lists the team's."""
    owner = ApiKey.team_id == user.team_id if whole_team else ApiKey.user_id == user.id
    query = select(ApiKey).where(owner).order_by(ApiKey.created_at.desc(), ApiKey.id)
    return list((await session.execute(query)).scalars())


async def delete_key(*, session: AsyncSession, user: User, key_id: uuid.UUID, as_admin: bool) -> None:
    """Revoke at once by deleting the row. The owner, or an admin of the key's team; anything else is a 404."""
    owner = ApiKey.team_id == user.team_id if as_admin else ApiKey.user_id == user.id
    result = await session.execute(delete(ApiKey).where(ApiKey.id == key_id, owner).returning(ApiKey.id))
    deleted = result.first()
    await session.commit()
    if deleted is None:
        raise NotFound(API_KEY_NOT_FOUND)


async def key_account(session: AsyncSession, settings: Settings, key: str, *, orm: bool) -> Row[Any] | None:
    """The row `(User or id, team_id..., key_id, key_last_used_at)` of a working key, else None."""
    if len(key) > API_KEY_MAX_LENGTH:
        return None
    columns: tuple[Any, ...] = (User,) if orm else (User.id, User.team_id)
    query: Select[Any] = (
        select(*columns, ApiKey.id.label("key_id"), ApiKey.last_used_at.label("key_last_used_at"))
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(
            ApiKey.key_hash == hash_api_key(key, settings),
            User.is_active.is_(True),
            User.team_id == ApiKey.team_id,
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow()),
        )
    )
    if orm:
        query = query.execution_options(populate_existing=True)
    row: Row[Any] | None = (await session.execute(query)).first()
    return row


def needs_touch(last_used_at: datetime | None, now: datetime) -> bool:
    return last_used_at is None or now - last_used_at >= LAST_USED_RESOLUTION


async def touch(session: AsyncSession, key_id: uuid.UUID, now: datetime) -> None:
    """Record a use; conditional, so several workers seeing the same stale value write it once."""
    stale = or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - LAST_USED_RESOLUTION)
    await session.execute(update(ApiKey).where(and_(ApiKey.id == key_id, stale)).values(last_used_at=now))
    await session.commit()
