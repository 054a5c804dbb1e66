"""Agents: the team's n8n workflows. Admins write, members read, always within the caller's team."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import DecryptionError, decrypt_headers, encrypt_headers
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Agent, User
from app.schemas import AgentAdminRead, AgentRead
from app.webhooks import WebhookPolicyError, check_webhook_url

logger = logging.getLogger(__name__)

AGENT_NOT_FOUND = "Agent not found"
AGENT_INACTIVE = "Agent is inactive; an admin must reactivate it before new chats can use it"


async def get_team_agent(*, session: AsyncSession, user: User, agent_id: uuid.UUID) -> Agent:
    """An agent of the caller's team (active or not). Missing and foreign agents give the same 404."""
    query = select(Agent).where(Agent.id == agent_id, Agent.team_id == user.team_id)
    agent = (await session.execute(query)).scalar_one_or_none()
    if agent is None:
        raise NotFound(AGENT_NOT_FOUND)
    return agent


async def get_active_team_agent(*, session: AsyncSession, user: User, agent_id: uuid.UUID) -> Agent:
    """Like `get_team_agent`, but an inactive agent is a 409: it exists, yet takes no new chats."""
    agent = await get_team_agent(session=session, user=user, agent_id=agent_id)
    if not agent.is_active:
        raise Conflict(AGENT_INACTIVE)
    return agent


async def list_agents(*, session: AsyncSession, user: User, include_inactive: bool = False) -> list[Agent]:
    """Active agents of the caller's team; `include_inactive` is honoured for admins and ignored for members."""
    query = select(Agent).where(Agent.team_id == user.team_id)
    if not (include_inactive and user.role == "admin"):
        query = query.where(Agent.is_active.is_(True))
    query = query.order_by(Agent.name, Agent.created_at, Agent.id)
    return list((await session.execute(query)).scalars())


def checked_url(url: str, settings: Settings) -> str:
    """The URL if the address policy allows it, else a 422 on `webhook_url` naming the reason."""
    try:
        return check_webhook_url(url, settings)
    except WebhookPolicyError as exc:
        raise Unprocessable(str(exc), loc=("body", "webhook_url")) from None


async def create_agent(
    *,
    session: AsyncSession,
    settings: Settings,
    user: User,
    name: str,
    description: str | None,
    webhook_url: str,
    webhook_headers: dict[str, str] | None,
    system_prompt: str | None,
    config: dict[str, Any],
    is_active: bool,
) -> Agent:
    agent = Agent(
        team_id=user.team_id,
        name=name,
        description=description,
        webhook_url=checked_url(webhook_url, settings),
        webhook_headers_encrypted=encrypt_headers(webhook_headers or {}, settings.ENCRYPTION_KEY),
        system_prompt=system_prompt,
        config=config,
        is_active=is_active,
        created_by=user.id,
    )
    session.add(agent)
    await session.commit()
    logger.info("agent %s created in team %s", agent.id, agent.team_id)
    return agent


async def update_agent(
    *, session: AsyncSession, settings: Settings, user: User, agent_id: uuid.UUID, changes: dict[str, Any]
) -> Agent:
    """Only the fields sent change; `webhook_headers` sent replaces the whole set, `{}` or null clears it."""
    agent = await get_team_agent(session=session, user=user, agent_id=agent_id)
    sent = ", ".join(sorted(changes)) or "no fields"
    changes = dict(changes)
    if "webhook_url" in changes:
        changes["webhook_url"] = checked_url(changes["webhook_url"], settings)
    if "webhook_headers" in changes:
        headers = changes.pop("webhook_headers") or {}
        agent.webhook_headers_encrypted = encrypt_headers(headers, settings.ENCRYPTION_KEY)
    for name, value in changes.items():
        setattr(agent, name, value)
    await session.commit()
    logger.info("agent %s updated (%s)", agent.id, sent)
    return agent


async def deactivate_agent(*, session: AsyncSession, user: User, agent_id: uuid.UUID) -> None:
    """Soft delete: the agent stays so its chats keep their history; it takes no new chats or messages."""
    agent = await get_team_agent(session=session, user=user, agent_id=agent_id)
    if agent.is_active:
        agent.is_active = False
        await session.commit()
        logger.info("agent %s deactivated", agent.id)


def webhook_headers_of(agent: Agent, settings: Settings) -> dict[str, str]:
    """The clear headers to send to n8n (the stream uses this); never log or return them."""
    return decrypt_headers(agent.webhook_headers_encrypted, settings.ENCRYPTION_KEY)


def webhook_header_names(agent: Agent, settings: Settings) -> list[str]:
    try:
        return sorted(webhook_headers_of(agent, settings), key=str.lower)
    except DecryptionError:
        # A changed ENCRYPTION_KEY must not break the admin page; the send path reports it.
        logger.warning("webhook headers of agent %s cannot be decrypted with the configured key", agent.id)
        return []


def avatar_url(agent: Agent) -> str | None:
    if agent.avatar_content_type is None:
        return None
    return f"/api/agents/{agent.id}/avatar?v={agent.avatar_version}"


def agent_view(agent: Agent, *, user: User, settings: Settings) -> AgentRead | AgentAdminRead:
    """The admin view for admins (URL and header names), the member view for everyone else."""
    fields: dict[str, Any] = {
        "id": agent.id,
        "team_id": agent.team_id,
        "name": agent.name,
        "description": agent.description,
        "system_prompt": agent.system_prompt,
        "config": agent.config,
        "avatar_url": avatar_url(agent),
        "is_active": agent.is_active,
        "created_at": agent.created_at,
        "updated_at": agent.updated_at,
    }
    if user.role == "admin":
        return AgentAdminRead(
            **fields, webhook_url=agent.webhook_url, webhook_header_names=webhook_header_names(agent, settings)
        )
    return AgentRead(**fields)
