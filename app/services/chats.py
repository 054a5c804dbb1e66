"""Chats: ownership, listing, search and updates. Messages are appended by app/services/messages.py."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import NotFound
from app.models import Chat, User

CHAT_NOT_FOUND = "Chat not found"


async def get_owned_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> Chat:
    """The caller's own chat. Missing, another user's and another team's chats all give the same 404."""
    query = select(Chat).where(Chat.id == chat_id, Chat.user_id == user.id, Chat.team_id == user.team_id)
    chat = (await session.execute(query)).scalar_one_or_none()
    if chat is None:
        raise NotFound(CHAT_NOT_FOUND)
    return chat
