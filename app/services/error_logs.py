"""The error log: one row per failed generation, written with the final message; admins read their team's."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Agent, Chat, ErrorLog, User

#: Keys whose values are never stored in `detail`, whatever a caller passes (defence in depth).
SECRET_WORDS = ("authorization", "token", "password", "secret", "header", "cookie", "key")


def _clean_detail(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in detail.items() if not any(word in k.lower() for word in SECRET_WORDS)}


async def record_error(
    *,
    session: AsyncSession,
    team_id: uuid.UUID,
    user_id: uuid.UUID | None,
    chat_id: uuid.UUID | None,
    agent_id: uuid.UUID | None,
    code: str,
    message: str,
    upstream_status: int | None,
    detail: dict[str, Any],
) -> None:
    """Insert a row in the caller's transaction (no commit). Ids of rows deleted meanwhile are stored as NULL."""

    def existing(model: type[Chat] | type[Agent] | type[User], value: uuid.UUID | None) -> Any:
        return None if value is None else select(model.id).where(model.id == value).scalar_subquery()

    await session.execute(
        insert(ErrorLog).values(
            team_id=team_id,
            user_id=existing(User, user_id),
            chat_id=existing(Chat, chat_id),
            agent_id=existing(Agent, agent_id),
            code=code,
            message=message,
            upstream_status=upstream_status,
            detail=_clean_detail(detail),
        )
    )


async def list_error_logs(
    *, session: AsyncSession, user: User, limit: int, offset: int
) -> tuple[Sequence[ErrorLog], int]:
    """The caller's team's rows, newest first, and the total count for `X-Total-Count`."""
    where = ErrorLog.team_id == user.team_id
    total = (await session.execute(select(func.count()).select_from(ErrorLog).where(where))).scalar_one()
    query = (
        select(ErrorLog)
        .where(where)
        .order_by(ErrorLog.created_at.desc(), ErrorLog.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = (await session.execute(query)).scalars().all()
    return rows, int(total)
