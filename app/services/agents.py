"""Agents: the team's n8n workflows. Admins write, members read, always within the caller's team."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import NotFound
from app.models import Agent, User

AGENT_NOT_FOUND = "Agent not found"


async def get_team_agent(*, session: AsyncSession, user: User, agent_id: uuid.UUID) -> Agent:
    """An agent of the caller's team (active or not). Missing and foreign agents give the same 404."""
    query = select(Agent).where(Agent.id == agent_id, Agent.team_id == user.team_id)
    agent = (await session.execute(query)).scalar_one_or_none()
    if agent is None:
        raise NotFound(AGENT_NOT_FOUND)
    return agent
