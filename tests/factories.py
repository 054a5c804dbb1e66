"""Factories for rows the tests need: `create_team/user/agent/chat(session, **overrides)`."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Agent, Chat, Team, User
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


async def create_chat(session: AsyncSession, *, user: User, agent: Agent, **overrides: Any) -> Chat:
    values: dict[str, Any] = {
        "team_id": user.team_id,
        "user_id": user.id,
        "agent_id": agent.id,
        "title": "A chat",
        "messages": [],
        "message_count": 0,
    }
    values.update(overrides)
    chat = Chat(**values)
    session.add(chat)
    await session.commit()
    return chat


def auth_headers(settings: Settings, user: User) -> dict[str, str]:
    issued = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="access")
    return {"Authorization": f"Bearer {issued.token}"}
