"""Shares: a read-only snapshot of a chat's current branch for its team; taking, replacing, reading, revoking
and forking them (docs/SHARING.md)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from app.db import utcnow
from app.errors import Conflict, Forbidden, NotFound
from app.models import Chat, Share, User
from app.schemas import MessageRead
from app.services.agents import get_active_team_agent
from app.services.chat_copies import CopiedMessage, create_chat_copy
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, owned_chat_params
from app.services.tree import read_chat

logger = logging.getLogger(__name__)

SHARE_NOT_FOUND = "Share not found"
NOT_SHARED = "This chat is not shared"
SHARE_WHILE_STREAMING = "An answer is still being written in this chat; share it once that answer has ended"
AGENT_GONE = "The shared chat's agent no longer exists; a fork needs an agent"
DELETE_NOT_ALLOWED = "Only the member who shared this chat, or an admin, may delete its share"


def snapshot(branch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The branch as the share shows it: Messages (JSON, so a message's later fields travel with it), each the
    parent of the next, no other branch's ids, no feedback (ratings stay private to the chat's owner)."""
    messages: list[dict[str, Any]] = []
    parent: Any = None
    for view in branch:
        shown = {**view, "parent_id": parent, "sibling_ids": [view["id"]], "feedback": None}
        messages.append(MessageRead.model_validate(shown).model_dump(mode="json"))
        parent = view["id"]
    return messages


async def share_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> Share:
    """Snapshot the caller's chat for the team; sharing again replaces the snapshot under the same id.

    A branch with an answer still streaming is refused (409): a snapshot is a finished conversation.
    """
    # The chat's row lock orders two shares of one chat (the second replaces the first, no duplicate).
    locked = select(Chat.id).where(*OWNED_CHAT).with_for_update()
    if (await session.execute(locked, owned_chat_params(chat_id, user.id, user.team_id))).first() is None:
        raise NotFound(CHAT_NOT_FOUND)
    chat = await read_chat(session=session, user=user, chat_id=chat_id)
    if any(m["status"] == "streaming" for m in chat["messages"]):
        raise Conflict(SHARE_WHILE_STREAMING)
    messages = snapshot(chat["messages"])
    share = (await session.execute(select(Share).where(Share.chat_id == chat_id))).scalar_one_or_none()
    now = utcnow()
    if share is None:
        share = Share(team_id=user.team_id, chat_id=chat_id, created_at=now)
        session.add(share)
    share.user_id = user.id
    share.agent_id = chat["agent_id"]
    share.title = chat["title"]
    share.messages = messages
    share.message_count = len(messages)
    share.updated_at = now
    await session.commit()
    logger.info("chat %s shared as %s (%d messages)", chat_id, share.id, len(messages))
    return share


async def unshare_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> None:
    """Delete the share of the caller's chat: the link answers 404 from now on."""
    owned = select(Chat.id).where(*OWNED_CHAT)
    if (await session.execute(owned, owned_chat_params(chat_id, user.id, user.team_id))).first() is None:
        raise NotFound(CHAT_NOT_FOUND)
    result = await session.execute(delete(Share).where(Share.chat_id == chat_id, Share.team_id == user.team_id))
    if not result.rowcount:  # type: ignore[attr-defined]
        raise NotFound(NOT_SHARED)
    await session.commit()
    logger.info("share of chat %s deleted", chat_id)


async def get_share(*, session: AsyncSession, user: User, share_id: uuid.UUID) -> Share:
    """A share of the caller's team; missing and another team's give the same 404."""
    query = select(Share).where(Share.id == share_id, Share.team_id == user.team_id)
    share = (await session.execute(query)).scalar_one_or_none()
    if share is None:
        raise NotFound(SHARE_NOT_FOUND)
    return share


async def delete_share(*, session: AsyncSession, user: User, share_id: uuid.UUID) -> None:
    """Delete a share by its id (also once its chat is gone): the member who shared it or an admin (else 403)."""
    share = await get_share(session=session, user=user, share_id=share_id)
    if share.user_id != user.id and user.role != "admin":
        raise Forbidden(DELETE_NOT_ALLOWED)
    await session.delete(share)
    await session.commit()
    logger.info("share %s deleted", share_id)


@dataclass(frozen=True)
class SharePage:
    shares: list[Share]
    total: int


async def list_shares(*, session: AsyncSession, user: User, limit: int, offset: int) -> SharePage:
    """The team's shares, most recently shared first, without their messages (never read here)."""
    query = (
        select(Share, func.count().over().label("total"))
        .options(defer(Share.messages))
        .where(Share.team_id == user.team_id)
        .order_by(Share.updated_at.desc(), Share.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = (await session.execute(query)).all()
    if rows:
        return SharePage(shares=[row[0] for row in rows], total=int(rows[0][1]))
    count = select(func.count()).select_from(Share).where(Share.team_id == user.team_id)
    return SharePage(shares=[], total=int((await session.execute(count)).scalar_one()) if offset else 0)


async def fork_share(*, session: AsyncSession, user: User, share_id: uuid.UUID) -> uuid.UUID:
    """A new chat of the caller holding the snapshot's messages (new ids and times), with the share's agent.

    The agent must still be active in the team (like starting a chat: inactive 409), so the fork can be
    continued at once. Returns the new chat's id.
    """
    share = await get_share(session=session, user=user, share_id=share_id)
    if share.agent_id is None:
        raise Conflict(AGENT_GONE)
    agent = await get_active_team_agent(session=session, user=user, agent_id=share.agent_id)
    copied = [
        CopiedMessage(
            key=uuid.UUID(m["id"]),
            parent_key=uuid.UUID(m["parent_id"]) if m.get("parent_id") else None,
            role=m["role"],
            content=m["content"],
            status=m["status"],
            error=m.get("error"),
            metadata=m.get("metadata"),
        )
        for m in share.messages
    ]
    chat = await create_chat_copy(
        session,
        user=user,
        agent_id=agent.id,
        title=share.title,
        messages=copied,
        current_key=copied[-1].key if copied else None,
    )
    await session.commit()
    logger.info("share %s forked into chat %s", share.id, chat.id)
    return chat.id
