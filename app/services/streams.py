"""Stop and follow: the ownership check both start with, and their refusals."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import execute_core
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Chat
from app.security import Caller
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, owned_chat_params

NOTHING_RUNNING = "No generation is running in this chat"
BAD_LAST_EVENT_ID = "Last-Event-ID must be a whole number of at most 9 digits"

_OWNED_CHAT_ID = select(Chat.id).where(*OWNED_CHAT)


async def check_owned_chat(*, session: AsyncSession, user: Caller, chat_id: uuid.UUID) -> None:
    """404 unless the chat is the caller's (missing, another user's and another team's alike)."""
    found = (await execute_core(session, _OWNED_CHAT_ID, owned_chat_params(chat_id, user.id, user.team_id))).first()
    if found is None:
        raise NotFound(CHAT_NOT_FOUND)


def parse_last_event_id(header: str | None, query: str | None) -> int:
    """The first given Last-Event-ID (header, then query) as an event id; 0 (from the start) when none.

    A refusal names the field the id came in (`loc`), so a client using the query is not sent to the header.
    """
    for value, loc in ((header, ("header", "last-event-id")), (query, ("query", "last_event_id"))):
        if value is None or not value.strip():
            continue
        text = value.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 9:
            raise Unprocessable(BAD_LAST_EVENT_ID, loc=loc)
        return int(text)
    return 0


def nothing_running() -> Conflict:
    return Conflict(NOTHING_RUNNING)
