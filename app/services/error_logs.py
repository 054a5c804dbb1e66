"""The error log: one row per failed generation, written with the final message; admins read their team's."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, Insert, bindparam, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.models import Agent, Chat, ErrorLog, User

#: Keys whose values are never stored in `detail`, whatever a caller passes (defence in depth).
SECRET_WORDS = ("authorization", "token", "password", "secret", "header", "cookie", "key")


def clean_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """`detail` without the keys that may hold a secret (SECRET_WORDS)."""
    return {k: v for k, v in detail.items() if not any(word in k.lower() for word in SECRET_WORDS)}


def _existing(model: type[Chat] | type[Agent] | type[User], value: Any) -> Any:
    """The id if its row still exists, else NULL (rows deleted meanwhile are stored as NULL)."""
    return None if value is None else select(model.id).where(model.id == value).scalar_subquery()


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
    await session.execute(
        insert(ErrorLog).values(
            team_id=team_id,
            user_id=_existing(User, user_id),
            chat_id=_existing(Chat, chat_id),
            agent_id=_existing(Agent, agent_id),
            code=code,
            message=message,
            upstream_status=upstream_status,
            detail=clean_detail(detail),
        )
    )


def prebuilt_insert(
    detail: ColumnElement[Any], where: ColumnElement[bool], *, chat_id: ColumnElement[Any] | None = None
) -> Insert:
    """`record_error`'s row as a prebuilt INSERT, for a statement that chains writes
    (`Statements.chains_writes`), bound by `prebuilt_params`; its `detail` is the caller's expression (of
    parameters it binds itself, cleaned by `clean_detail`). `id` and `created_at` are bound too: a chained
    INSERT gets no Python-side default. Only where `where` holds (the caller's condition). `chat_id`: the
    caller's expression for the chat (one it holds locked), instead of the bound id if its row exists."""
    c = ErrorLog.__table__.columns

    def bound(name: str) -> BindParameter[Any]:
        return bindparam(f"e_{name}", type_=c[name].type)

    values: dict[str, ColumnElement[Any]] = {
        "id": bound("id"),
        "team_id": bound("team_id"),
        "user_id": _existing(User, bound("user_id")),
        "chat_id": _existing(Chat, bound("chat_id")) if chat_id is None else chat_id,
        "agent_id": _existing(Agent, bound("agent_id")),
        "code": bound("code"),
        "message": bound("message"),
        "upstream_status": bound("upstream_status"),
        "detail": detail,
        "created_at": bound("created_at"),
    }
    return insert(ErrorLog).from_select(list(values), select(*values.values()).where(where))


def prebuilt_params(
    *,
    team_id: uuid.UUID,
    user_id: uuid.UUID | None,
    chat_id: uuid.UUID | None,
    agent_id: uuid.UUID | None,
    code: str,
    message: str,
    upstream_status: int | None,
) -> dict[str, Any]:
    """The parameters of `prebuilt_insert` but its detail's."""
    return {
        "e_id": uuid.uuid4(),
        "e_team_id": team_id,
        "e_user_id": user_id,
        "e_chat_id": chat_id,
        "e_agent_id": agent_id,
        "e_code": code,
        "e_message": message,
        "e_upstream_status": upstream_status,
        "e_created_at": utcnow(),
    }


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
