"""Factories for rows the tests need: `create_team/user/agent/chat(session, **overrides)`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.models import Agent, Chat, Message, Team, User
from app.security import create_token, hash_password_sync

DEFAULT_PASSWORD = "correct-horse-battery"
_HASH_CACHE: dict[str, str] = {}


def _hash(password: str) -> str:
    if password not in _HASH_CACHE:
        _HASH_CACHE[password] = hash_password_sync(password, 4)
    return _HASH_CACHE[password]


async def create_team(session: AsyncSession, **overrides: Any) -> Team:
    suffix = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {"name": f"Team {suffix}", "slug": f"team-{suffix}"}
    values.update(overrides)
    team = Team(**values)
    session.add(team)
    await session.commit()
    return team


async def create_user(
    session: AsyncSession, *, team: Team | None = None, password: str = DEFAULT_PASSWORD, **overrides: Any
) -> User:
    team = team or await create_team(session)
    values: dict[str, Any] = {
        "team_id": team.id,
        "email": f"user-{uuid.uuid4().hex[:8]}@example.com",
        "password_hash": _hash(password),
        "full_name": "Test User",
        "role": "user",
        "is_active": True,
    }
    values.update(overrides)
    user = User(**values)
    session.add(user)
    await session.commit()
    return user


async def create_admin(session: AsyncSession, *, team: Team | None = None, **overrides: Any) -> User:
    return await create_user(session, team=team, role="admin", **overrides)


async def create_agent(session: AsyncSession, *, team: Team, **overrides: Any) -> Agent:
    values: dict[str, Any] = {
        "team_id": team.id,
        "name": "Helper",
        "slug": f"helper-{uuid.uuid4().hex[:8]}",
        "description": "A test agent",
        "webhook_url": "http://127.0.0.1:5678/webhook/agent-stream",
        "system_prompt": "be brief",
        "config": {"model": "gpt-4"},
        "is_active": True,
    }
    values.update(overrides)
    agent = Agent(**values)
    session.add(agent)
    await session.commit()
    return agent


async def create_chat(
    session: AsyncSession, *, user: User, agent: Agent, messages: list[dict[str, Any]] | None = None, **overrides: Any
) -> Chat:
    """A chat; `messages` (dicts as the API shows them, `_worker` for a streaming row's worker) become one
    branch, each the parent of the next, the last one current."""
    values: dict[str, Any] = {
        "team_id": user.team_id,
        "user_id": user.id,
        "agent_id": agent.id,
        "title": "A chat",
        "message_count": len(messages or []),
    }
    values.update(overrides)
    chat = Chat(**values)
    session.add(chat)
    await session.flush()
    parent: uuid.UUID | None = None
    for element in messages or []:
        row = message_row(chat.id, parent, element)
        session.add(row)
        await session.flush()
        parent = row.id
    chat.current_message_id = parent
    await session.commit()
    return chat


def message_row(chat_id: uuid.UUID, parent_id: uuid.UUID | None, element: dict[str, Any]) -> Message:
    created = element.get("created_at")
    created_at = datetime.fromisoformat(created) if isinstance(created, str) else created or utcnow()
    return Message(
        id=uuid.UUID(str(element["id"])) if "id" in element else uuid.uuid4(),
        chat_id=chat_id,
        parent_id=parent_id,
        role=element.get("role", "user"),
        content=element.get("content", ""),
        status=element.get("status", "complete"),
        error=element.get("error"),
        meta=element.get("metadata"),
        feedback=element.get("feedback"),
        worker_id=uuid.UUID(str(element["_worker"])) if element.get("_worker") else None,
        created_at=created_at,
        updated_at=created_at,
    )


@dataclass
class StoredChat:
    """A chat row with its current branch as stored (`branch_of`)."""

    chat: Chat
    messages: list[dict[str, Any]]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.chat, name)


async def stored_chat(session: AsyncSession, chat_id: uuid.UUID) -> StoredChat:
    chat = (
        await session.execute(select(Chat).where(Chat.id == chat_id).execution_options(populate_existing=True))
    ).scalar_one()
    return StoredChat(chat, await branch_of(session, chat_id))


async def branch_of(session: AsyncSession, chat_id: uuid.UUID) -> list[dict[str, Any]]:
    """The chat's current branch as stored, root first (`_worker` for a streaming row's worker): what tests
    assert on after a send, read from the tables, not through the API."""
    chat = (
        await session.execute(select(Chat).where(Chat.id == chat_id).execution_options(populate_existing=True))
    ).scalar_one()
    rows = {
        m.id: m
        for m in (
            await session.execute(
                select(Message).where(Message.chat_id == chat_id).execution_options(populate_existing=True)
            )
        ).scalars()
    }
    branch: list[dict[str, Any]] = []
    node = rows.get(chat.current_message_id) if chat.current_message_id else None
    while node is not None:
        element: dict[str, Any] = {
            "id": str(node.id),
            "role": node.role,
            "content": node.content,
            "status": node.status,
            "created_at": node.created_at.isoformat().replace("+00:00", "Z"),
        }
        if node.error is not None:
            element["error"] = node.error
        if node.meta is not None:
            element["metadata"] = node.meta
        if node.worker_id is not None:
            element["_worker"] = str(node.worker_id)
        branch.append(element)
        node = rows.get(node.parent_id) if node.parent_id else None
    branch.reverse()
    return branch


def auth_headers(settings: Settings, user: User) -> dict[str, str]:
    issued = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="access")
    return {"Authorization": f"Bearer {issued.token}"}


def email_of_length(length: int) -> str:
    """`a…a@b…b.com` of exactly `length` characters (7 or more), its labels within DNS's 63."""
    local = "a" * min(64, length - 6)
    left = length - len(local) - 1 - len(".com")
    labels: list[str] = []
    while left > 63:
        labels.append("b" * min(63, left - 2))
        left -= len(labels[-1]) + 1
    return f"{local}@{'.'.join([*labels, 'b' * left])}.com"
