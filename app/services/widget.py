"""n8n's chat widget as a client: the chat a widget session id names (per caller and agent), sends through
the chat send's own start transaction, and the history the widget reloads.

The protocol's framing (NDJSON lines, `{output}`, LangChain-serialized history) is app.chat_trigger; a send
starts an ordinary generation (app.services.messages.start_message, run by the GenerationRegistry).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.errors import Conflict, NotFound
from app.models import Agent, Chat, WidgetSession
from app.security import Caller
from app.services.agents import AGENT_NOT_FOUND
from app.services.messages import AGENT_INACTIVE, GENERATION_RUNNING, NewGeneration, start_message
from app.services.tree import read_chat

logger = logging.getLogger(__name__)

#: What a widget with `allowFileUploads` is told (the widget without streaming shows the body it gets).
FILE_UPLOADS_REFUSED = "File uploads are not supported by this endpoint; turn the widget's allowFileUploads off"


def is_form(content_type: str | None) -> bool:
    """Whether a request's Content-Type is multipart/form-data: how the widget sends a message with files."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "multipart/form-data"


@dataclass(slots=True)
class WidgetSend:
    """A started generation, and the agent's name (the `nodeName` of the Chat Trigger's NDJSON lines)."""

    new: NewGeneration
    agent_name: str


async def _team_agent(session: AsyncSession, user: Caller, agent_id: uuid.UUID) -> tuple[str, bool]:
    """(name, is_active) of an agent of the caller's team; missing and foreign agents are the same 404."""
    query = select(Agent.name, Agent.is_active).where(Agent.id == agent_id, Agent.team_id == user.team_id)
    row = (await session.execute(query)).first()
    if row is None:
        raise NotFound(AGENT_NOT_FOUND)
    return str(row.name), bool(row.is_active)


async def _session_chat(session: AsyncSession, user: Caller, agent_id: uuid.UUID, session_id: str) -> uuid.UUID | None:
    query = select(WidgetSession.chat_id).where(
        WidgetSession.user_id == user.id, WidgetSession.agent_id == agent_id, WidgetSession.session_id == session_id
    )
    found: uuid.UUID | None = (await session.execute(query)).scalar_one_or_none()
    return found


async def _new_session_chat(session: AsyncSession, user: Caller, agent_id: uuid.UUID, session_id: str) -> uuid.UUID:
    """A new chat of the caller with the agent, named by `session_id` (flushed, not committed: the send's
    transaction commits it with its first messages). A concurrent first send of the same session wins: 409."""
    chat = Chat(team_id=user.team_id, user_id=user.id, agent_id=agent_id, title=None, message_count=0)
    session.add(chat)
    await session.flush()
    session.add(WidgetSession(user_id=user.id, agent_id=agent_id, session_id=session_id, chat_id=chat.id))
    try:
        await session.flush()
    except IntegrityError:
        await session.rollback()
        raise Conflict(GENERATION_RUNNING) from None
    return chat.id


async def start_widget_message(
    *,
    session: AsyncSession,
    settings: Settings,
    user: Caller,
    agent_id: uuid.UUID,
    session_id: str,
    content: str,
    worker_id: uuid.UUID,
) -> WidgetSend:
    """The widget's `sendMessage`: find (or create) the session's chat, then start a generation in it exactly
    as `POST /api/chats/{id}/messages` does (quota, placeholder, history, one transaction).

    404 for an agent of another team, 409 for an inactive one; every refusal of the start (422, 409, 429)
    leaves nothing behind, a chat created for this send included.
    """
    name, active = await _team_agent(session, user, agent_id)
    if not active:
        raise Conflict(AGENT_INACTIVE)
    chat_id = await _session_chat(session, user, agent_id, session_id)
    created = chat_id is None
    if chat_id is None:
        chat_id = await _new_session_chat(session, user, agent_id, session_id)
    try:
        new = await start_message(
            session=session, settings=settings, user=user, chat_id=chat_id, content=content, worker_id=worker_id
        )
    except Exception:
        if created:
            # The quota claim commits before it refuses (app.services.usage), which would keep the new chat.
            await session.rollback()
            await session.execute(delete(Chat).where(Chat.id == chat_id))
            await session.commit()
        raise
    if created:
        logger.info("chat %s created for a widget session with agent %s", chat_id, agent_id)
    return WidgetSend(new=new, agent_name=name)


async def previous_session(
    *, session: AsyncSession, user: Caller, agent_id: uuid.UUID, session_id: str
) -> list[dict[str, Any]]:
    """The widget's `loadPreviousSession`: the current branch of the session's chat, root first, as stored
    (an unknown session: nothing, and nothing is created). Inactive agents keep their history."""
    await _team_agent(session, user, agent_id)
    chat_id = await _session_chat(session, user, agent_id, session_id)
    if chat_id is None:
        await session.commit()
        return []
    chat = await read_chat(session=session, user=user, chat_id=chat_id)
    await session.commit()
    messages: list[dict[str, Any]] = chat["messages"]
    return messages
