"""Agents: the team's n8n workflows. Admins write, members read, always within the caller's team."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import DecryptionError, decrypt_headers, encrypt_headers
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Agent, User
from app.schemas import AgentAdminRead, AgentRead
from app.slugs import SLUG_MAX, first_free, slugify
from app.webhooks import WebhookPolicyError, check_webhook_url

logger = logging.getLogger(__name__)

AGENT_NOT_FOUND = "Agent not found"
AGENT_INACTIVE = "Agent is inactive; an admin must reactivate it before new chats can use it"
SLUG_TAKEN = "Another agent of this team (active or not) already has this slug"
CALLBACK_NEEDS_BASE_URL = (
    "response_mode 'callback' needs PUBLIC_BASE_URL: without this service's public address n8n has no "
    "callback URL to post to"
)
#: Tries at a generated slug when concurrent creates of same-named agents keep taking the free one.
SLUG_ATTEMPTS = 5


async def get_team_agent(*, session: AsyncSession, user: User, agent_id: uuid.UUID, for_update: bool = False) -> Agent:
    """An agent of the caller's team (active or not). Missing and foreign agents give the same 404.
    `for_update` reads it fresh under a row lock (one that chats' foreign keys do not wait for), for writes
    whose checks read other columns of the row."""
    query = select(Agent).where(Agent.id == agent_id, Agent.team_id == user.team_id)
    if for_update:
        query = query.with_for_update(key_share=True).execution_options(populate_existing=True)
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


def checked_response_mode(mode: str, settings: Settings) -> str:
    """`callback` only when callback URLs can be made (PUBLIC_BASE_URL), else a 422 on `response_mode`."""
    if mode == "callback" and settings.PUBLIC_BASE_URL is None:
        raise Unprocessable(CALLBACK_NEEDS_BASE_URL, loc=("body", "response_mode"))
    return mode


def checked_url(url: str, settings: Settings) -> str:
    """The URL if the address policy allows it, else a 422 on `webhook_url` naming the reason."""
    try:
        return check_webhook_url(url, settings)
    except WebhookPolicyError as exc:
        raise Unprocessable(str(exc), loc=("body", "webhook_url")) from None


async def _slug_taken(session: AsyncSession, team_id: uuid.UUID, slug: str) -> bool:
    query = select(Agent.id).where(Agent.team_id == team_id, Agent.slug == slug).limit(1)
    return (await session.execute(query)).first() is not None


async def free_slug(session: AsyncSession, team_id: uuid.UUID, name: str) -> str:
    """The slug of `name`, suffixed `-2`, `-3`... past the ones the team has (inactive agents included)."""
    base = slugify(name)
    # Every candidate starts with this much of the base (suffixes shorten a long base); `[a-z0-9-]` has no
    # LIKE wildcard, so the prefix needs no escaping.
    prefix = base[: SLUG_MAX - 8]
    query = select(Agent.slug).where(Agent.team_id == team_id, Agent.slug.startswith(prefix))
    return first_free(base, set((await session.execute(query)).scalars()))


async def create_agent(
    *,
    session: AsyncSession,
    settings: Settings,
    user: User,
    name: str,
    slug: str | None,
    description: str | None,
    webhook_url: str,
    webhook_headers: dict[str, str] | None,
    system_prompt: str | None,
    config: dict[str, Any],
    is_active: bool,
    response_mode: str = "stream",
    file_delivery: str = "url",
) -> Agent:
    agent = Agent(
        team_id=user.team_id,
        name=name,
        description=description,
        webhook_url=checked_url(webhook_url, settings),
        webhook_headers_encrypted=encrypt_headers(webhook_headers or {}, settings.fernet),
        system_prompt=system_prompt,
        config=config,
        is_active=is_active,
        response_mode=checked_response_mode(response_mode, settings),
        file_delivery=file_delivery,
        created_by=user.id,
    )
    team_id = user.team_id
    if slug is not None and await _slug_taken(session, team_id, slug):
        raise Conflict(SLUG_TAKEN)
    for _ in range(SLUG_ATTEMPTS):
        agent.slug = slug if slug is not None else await free_slug(session, team_id, name)
        try:
            # A savepoint: losing the race for a slug rolls back this insert only, not the caller's state.
            async with session.begin_nested():
                session.add(agent)
            break
        except IntegrityError:
            # A concurrent create took the slug between the check and the insert (the unique key decides).
            if slug is not None:
                raise Conflict(SLUG_TAKEN) from None
    else:
        raise Conflict(SLUG_TAKEN)
    await session.commit()
    logger.info("agent %s created in team %s", agent.id, agent.team_id)
    return agent


#: The stored secret headers were given for one webhook: an admin who points the agent elsewhere gives them
#: again (or `{}`), so no one can send another admin's secrets to a host, or a workflow on a shared n8n, of
#: their own.
HEADERS_FOR_NEW_URL = (
    "The webhook URL changes: send webhook_headers again ({} to drop them), so the stored secret headers "
    "never go to a webhook they were not given for"
)


def _has_headers(agent: Agent, settings: Settings) -> bool:
    """Whether the agent stores secret headers (unreadable ones count: they may hold secrets)."""
    if agent.webhook_headers_encrypted is None:
        return False
    try:
        return bool(decrypt_headers(agent.webhook_headers_encrypted, settings.fernet))
    except DecryptionError:
        return True


async def update_agent(
    *, session: AsyncSession, settings: Settings, user: User, agent_id: uuid.UUID, changes: dict[str, Any]
) -> Agent:
    """Only the fields sent change; `webhook_headers` sent replaces the whole set, `{}` or null clears it.
    The row is locked first: the moved-webhook check reads the stored headers, which a concurrent save of
    headers could otherwise change between that check and this write."""
    agent = await get_team_agent(session=session, user=user, agent_id=agent_id, for_update=True)
    sent = ", ".join(sorted(changes)) or "no fields"
    changes = dict(changes)
    if "webhook_url" in changes:
        changes["webhook_url"] = checked_url(changes["webhook_url"], settings)
        moved = changes["webhook_url"] != agent.webhook_url
        if moved and "webhook_headers" not in changes and _has_headers(agent, settings):
            raise Unprocessable(HEADERS_FOR_NEW_URL, loc=("body", "webhook_headers"))
    if "response_mode" in changes:
        checked_response_mode(changes["response_mode"], settings)
    if "webhook_headers" in changes:
        headers = changes.pop("webhook_headers") or {}
        agent.webhook_headers_encrypted = encrypt_headers(headers, settings.fernet)
    if changes.get("slug", agent.slug) != agent.slug and await _slug_taken(session, agent.team_id, changes["slug"]):
        raise Conflict(SLUG_TAKEN)
    for name, value in changes.items():
        setattr(agent, name, value)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Conflict(SLUG_TAKEN) from None
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
    return decrypt_headers(agent.webhook_headers_encrypted, settings.fernet)


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
        "slug": agent.slug,
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
            **fields,
            webhook_url=agent.webhook_url,
            webhook_header_names=webhook_header_names(agent, settings),
            response_mode=agent.response_mode,
            file_delivery=agent.file_delivery,
        )
    return AgentRead(**fields)
