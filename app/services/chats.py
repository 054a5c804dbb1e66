"""Chats: ownership, listing, search and updates. Messages are added by app/services/messages.py and read by
app/services/tree.py."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, bindparam, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.dialects import statements_of
from app.errors import NotFound
from app.models import IS_STREAMING, Chat, Message, User
from app.services import blobs
from app.services.agents import get_active_team_agent

logger = logging.getLogger(__name__)

CHAT_NOT_FOUND = "Chat not found"
TITLE_MAX_CHARS = 60
UNTITLED = "New chat"


#: The one ownership rule (`:cid` is the caller's chat: `:uid`'s, in team `:tid`), shared with the send path.
OWNED_CHAT = (Chat.id == bindparam("cid"), Chat.user_id == bindparam("uid"), Chat.team_id == bindparam("tid"))


def owned_chat_params(chat_id: uuid.UUID, user_id: uuid.UUID, team_id: uuid.UUID) -> dict[str, uuid.UUID]:
    return {"cid": chat_id, "uid": user_id, "tid": team_id}


async def get_owned_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> Chat:
    """The caller's own chat. Missing, another user's and another team's chats all give the same 404."""
    query = select(Chat).where(*OWNED_CHAT)
    chat = (await session.execute(query, owned_chat_params(chat_id, user.id, user.team_id))).scalar_one_or_none()
    if chat is None:
        raise NotFound(CHAT_NOT_FOUND)
    return chat


def title_from_message(text: str) -> str:
    """A chat title from its first user message: whitespace collapsed, at most ~60 characters cut on a word."""
    words = " ".join(text.split())
    if not words:
        return UNTITLED
    if len(words) <= TITLE_MAX_CHARS:
        return words
    cut = words[: TITLE_MAX_CHARS + 1]
    space = cut.rfind(" ")
    # Cut on the last word boundary unless that would leave almost nothing (one very long word).
    head = cut[:space] if space >= TITLE_MAX_CHARS // 2 else words[:TITLE_MAX_CHARS]
    return head.rstrip(" .,;:!?-") + "…"


def _clean_title(title: str | None) -> str | None:
    """Blank titles are no titles: the first message will name the chat."""
    if title is None:
        return None
    title = title.strip()
    return title or None


async def create_chat(*, session: AsyncSession, user: User, agent_id: uuid.UUID, title: str | None) -> Chat:
    """A new empty chat with an active agent of the caller's team (foreign/missing 404, inactive 409)."""
    agent = await get_active_team_agent(session=session, user=user, agent_id=agent_id)
    chat = Chat(
        team_id=user.team_id,
        user_id=user.id,
        agent_id=agent.id,
        title=_clean_title(title),
        message_count=0,
    )
    session.add(chat)
    await session.commit()
    logger.info("chat %s created with agent %s", chat.id, agent.id)
    return chat


def like_pattern(q: str) -> str:
    """`%q%` with the user's own `%`, `_` and `\\` taken literally (escape character `\\`)."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", q) + "%"


#: When a chat last saw a message; an empty chat counts from its creation.
LAST_ACTIVITY = func.coalesce(Chat.last_message_at, Chat.created_at)


@dataclass(frozen=True)
class ChatPage:
    chats: list[Chat]
    total: int


async def list_chats(
    *,
    session: AsyncSession,
    user: User,
    archived: bool = False,
    pinned: bool | None = None,
    limit: int = 50,
    offset: int = 0,
    q: str | None = None,
) -> ChatPage:
    """The caller's chats, newest activity first (the contract's order; `pinned` narrows the list to the pinned
    or the other chats, so a client can show its pinned ones apart), without loading any message.

    Activity is the last message (creation for an empty chat), never `updated_at`: renaming, pinning or
    archiving a chat must not move it up the list.
    """
    conditions: list[ColumnElement[bool]] = [
        Chat.user_id == user.id,
        Chat.team_id == user.team_id,
        Chat.archived.is_(archived),
    ]
    if pinned is not None:
        conditions.append(Chat.pinned.is_(pinned))
    params: dict[str, str] = {}
    if q and q.strip():
        params["pattern"] = like_pattern(q.strip())
        matches = statements_of(session).matches_ignoring_case
        title_match = matches(Chat.title, bindparam("pattern"))
        # The text of any message of any branch (never ids or other columns).
        text_match = (
            exists().where(Message.chat_id == Chat.id, matches(Message.content, bindparam("pattern"))).correlate(Chat)
        )
        conditions.append(or_(title_match, text_match))
    # One query for the page and the total (a window count), so a search scans the messages once.
    query = (
        select(Chat, func.count().over().label("total"))
        .where(*conditions)
        .order_by(LAST_ACTIVITY.desc(), Chat.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = (await session.execute(query, params)).all()
    if rows:
        return ChatPage(chats=[row[0] for row in rows], total=int(rows[0][1]))
    if offset == 0:
        return ChatPage(chats=[], total=0)
    count = select(func.count()).select_from(Chat).where(*conditions)
    return ChatPage(chats=[], total=int((await session.execute(count, params)).scalar_one()))


def apply_changes(chat: Chat, changes: dict[str, Any]) -> None:
    """Rename, archive, pin: only the fields sent change (the caller commits; app.services.tree.update_chat,
    which also switches branches)."""
    changes = dict(changes)
    if "title" in changes:
        chat.title = _clean_title(changes.pop("title"))
    for name, value in changes.items():
        setattr(chat, name, value)


async def streaming_message_id(session: AsyncSession, chat_id: uuid.UUID) -> str | None:
    """The chat's running answer, if any (at most one: the partial unique index on `streaming` rows)."""
    query = select(Message.id).where(Message.chat_id == chat_id, IS_STREAMING).limit(1)
    found = (await session.execute(query)).scalar_one_or_none()
    return None if found is None else str(found)


async def delete_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> str | None:
    """Delete the chat, its messages and files (and the bytes no other file uses); the id of the answer that
    was running in it, if any, for the caller to stop (`GenerationRegistry.chat_deleted`)."""
    chat = await get_owned_chat(session=session, user=user, chat_id=chat_id)
    # The chat row locked first, as an upload locks it: an upload under way commits its file before the hashes
    # are read, so its bytes are collected too (PostgreSQL; SQLite runs one writer at a time). A final write
    # locks it first too, so the two queue rather than deadlock.
    await session.execute(select(Chat.id).where(Chat.id == chat.id).with_for_update())
    running = await streaming_message_id(session, chat.id)
    hashes = await blobs.chat_blob_hashes(session, chat.id)
    await session.delete(chat)  # its messages and files go by cascade
    await session.commit()
    await blobs.collect_blobs(session, hashes)  # then the bytes no other file uses
    logger.info("chat %s deleted", chat.id)
    return running
