"""Shares: a read-only snapshot of a chat's current branch for its team; taking, replacing, reading, revoking
and forking them, and the share's own copies of its messages' files (docs/SHARING.md).

A share's copy of a file is a `share_files` row over the same blob: it outlives the chat, goes with the share
(revoked, replaced, deleted), and then its bytes go too when nothing else uses them (app.services.blobs).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from app.db import utcnow
from app.errors import Conflict, Forbidden, NotFound
from app.models import Chat, File, FileBlob, Share, ShareFile, User
from app.schemas import MessageRead
from app.services import blobs
from app.services.agents import get_active_team_agent
from app.services.chat_copies import CopiedFile, CopiedMessage, create_chat_copy
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, owned_chat_params
from app.services.files import FILE_NOT_FOUND, Download
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


#: Tries of a share whose first snapshot another share of the same chat inserted meanwhile (SQLite only).
SHARE_ATTEMPTS = 3


async def share_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> Share:
    """Snapshot the caller's chat for the team; sharing again replaces the snapshot under the same id.

    A branch with an answer still streaming is refused (409): a snapshot is a finished conversation.
    On PostgreSQL the chat's row lock orders two shares of one chat. SQLite takes no row locks: the second
    first share meets the unique key, and is made again as a re-share of the first (it was a 500).
    """
    attempt = 1
    while True:
        try:
            return await _share_chat(session=session, user=user, chat_id=chat_id)
        except IntegrityError:
            await session.rollback()
            if attempt == SHARE_ATTEMPTS:
                raise
            attempt += 1
            await session.refresh(user)  # the rollback expired it


async def _share_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> Share:
    # The chat's row lock orders two shares of one chat (the second replaces the first, no duplicate).
    locked = select(Chat.id).where(*OWNED_CHAT).with_for_update()
    if (await session.execute(locked, owned_chat_params(chat_id, user.id, user.team_id))).first() is None:
        raise NotFound(CHAT_NOT_FOUND)
    chat = await read_chat(session=session, user=user, chat_id=chat_id)
    if any(m["status"] == "streaming" for m in chat["messages"]):
        raise Conflict(SHARE_WHILE_STREAMING)
    messages = snapshot(chat["messages"])
    # Then the share's row (chat before share, as a chat's deletion takes them): a revocation running at the
    # same time either ends first (a new share is made) or waits for this snapshot and deletes it whole.
    existing = select(Share).where(Share.chat_id == chat_id).with_for_update()
    share = (await session.execute(existing)).scalar_one_or_none()
    now = utcnow()
    copies = await _file_copies(session, chat_id, messages, now)
    replaced: list[str] = []
    if share is None:
        share = Share(team_id=user.team_id, chat_id=chat_id, created_at=now)
        session.add(share)
    else:  # the new snapshot's copies replace the old ones
        replaced = await blobs.share_blob_hashes(session, share.id)
        await session.execute(delete(ShareFile).where(ShareFile.share_id == share.id))
    share.user_id = user.id
    share.agent_id = chat["agent_id"]
    share.title = chat["title"]
    share.messages = messages
    share.message_count = len(messages)
    share.updated_at = now
    await session.flush()
    if copies:
        await session.execute(insert(ShareFile), [{**copy, "share_id": share.id} for copy in copies])
    await session.commit()
    await blobs.collect_blobs(session, replaced)
    logger.info("chat %s shared as %s (%d messages)", chat_id, share.id, len(messages))
    return share


async def _file_copies(
    session: AsyncSession, chat_id: uuid.UUID, messages: list[dict[str, Any]], now: datetime
) -> list[dict[str, Any]]:
    """The share's own copy of each file the snapshot's messages carry (`share_files` rows over the same blobs,
    without their `share_id`), the messages' file ids rewritten to the copies', which
    `GET /api/shares/{id}/files/{file_id}` serves. A file without an id (an imported one: metadata only) stays
    so. The chat's row is locked by the caller, so its files, and with them their blobs, cannot go meanwhile."""
    named = {f["id"] for m in messages for f in m.get("files") or [] if f.get("id")}
    if not named:
        return []
    query = select(File.id, File.filename, File.content_type, File.size, File.sha256).where(
        File.chat_id == chat_id, File.id.in_([uuid.UUID(i) for i in named])
    )
    originals = {str(row.id): row for row in (await session.execute(query)).all()}
    copies = {file_id: uuid.uuid4() for file_id in originals}
    for m in messages:
        for f in m.get("files") or []:
            copy = copies.get(f["id"]) if f.get("id") else None
            f["id"] = str(copy) if copy is not None else None
    return [
        {
            "id": copies[file_id],
            "filename": row.filename,
            "content_type": row.content_type,
            "size": row.size,
            "sha256": row.sha256,
            "created_at": now,
        }
        for file_id, row in originals.items()
    ]


async def unshare_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> None:
    """Delete the share of the caller's chat, its file copies with it (then their bytes if nothing else uses
    them): the link and its files answer 404 from now on."""
    owned = select(Chat.id).where(*OWNED_CHAT)
    if (await session.execute(owned, owned_chat_params(chat_id, user.id, user.team_id))).first() is None:
        raise NotFound(CHAT_NOT_FOUND)
    # The share's row locked: a concurrent re-share (which updates it) cannot slip copies in unseen.
    locked = select(Share.id).where(Share.chat_id == chat_id, Share.team_id == user.team_id).with_for_update()
    share_id = (await session.execute(locked)).scalar_one_or_none()
    if share_id is None:
        raise NotFound(NOT_SHARED)
    await _remove_share(session, share_id)
    logger.info("share of chat %s deleted", chat_id)


async def _remove_share(session: AsyncSession, share_id: uuid.UUID) -> None:
    """Delete a share (its row locked by the caller) and its copies, then the bytes no one else uses. Commits."""
    hashes = await blobs.share_blob_hashes(session, share_id)
    await session.execute(delete(Share).where(Share.id == share_id))
    await session.commit()
    await blobs.collect_blobs(session, hashes)


async def get_share(
    *, session: AsyncSession, user: User, share_id: uuid.UUID, lock: Literal["share", "update"] | None = None
) -> Share:
    """A share of the caller's team; missing and another team's give the same 404. `lock` locks its row:
    `share` keeps it (and its copies) from being replaced or deleted until the caller commits, `update` also
    from being locked by anyone else."""
    query = select(Share).where(Share.id == share_id, Share.team_id == user.team_id)
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    share = (await session.execute(query)).scalar_one_or_none()
    if share is None:
        raise NotFound(SHARE_NOT_FOUND)
    return share


async def delete_share(*, session: AsyncSession, user: User, share_id: uuid.UUID) -> None:
    """Delete a share by its id (also once its chat is gone): the member who shared it or an admin (else 403)."""
    share = await get_share(session=session, user=user, share_id=share_id, lock="update")
    if share.user_id != user.id and user.role != "admin":
        raise Forbidden(DELETE_NOT_ALLOWED)
    await _remove_share(session, share.id)
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
    continued at once. Every file of the snapshot is copied, even past a FILES_PER_CHAT_MAX lowered since the
    snapshot (the cap bounds uploads; a fork missing files would differ from its share unsaid). Returns the
    new chat's id.
    """
    # Locked for share: a revocation or a re-share waits for this fork, so the copies' blobs stay until the
    # fork's own file rows hold them.
    share = await get_share(session=session, user=user, share_id=share_id, lock="share")
    if share.agent_id is None:
        raise Conflict(AGENT_GONE)
    agent = await get_active_team_agent(session=session, user=user, agent_id=share.agent_id)
    query = select(ShareFile).where(ShareFile.share_id == share.id)
    copies = {str(f.id): f for f in (await session.execute(query)).scalars()}
    copied = [
        CopiedMessage(
            key=uuid.UUID(m["id"]),
            parent_key=uuid.UUID(m["parent_id"]) if m.get("parent_id") else None,
            role=m["role"],
            content=m["content"],
            status=m["status"],
            error=m.get("error"),
            metadata=m.get("metadata"),
            files=tuple(_forked_file(f, copies) for f in m.get("files") or []),
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


def _forked_file(view: dict[str, Any], copies: dict[str, ShareFile]) -> CopiedFile:
    """A snapshot's file as the fork carries it: a new file of the fork over the share copy's blob, or metadata
    only when the share has no bytes for it (an imported file)."""
    copy = copies.get(view["id"]) if view.get("id") else None
    if copy is None:
        return CopiedFile(
            id=None,
            filename=view["filename"],
            content_type=view["content_type"],
            size=view["size"],
            sha256=view["sha256"],
        )
    return CopiedFile(
        id=uuid.uuid4(), filename=copy.filename, content_type=copy.content_type, size=copy.size, sha256=copy.sha256
    )


async def read_share_file(*, session: AsyncSession, user: User, share_id: uuid.UUID, file_id: uuid.UUID) -> Download:
    """A file of a share of the caller's team, by its share copy's id; anything else (another team's share, the
    chat's own file id, another share's copy, a revoked share) is the same 404."""
    query = (
        select(ShareFile.filename, ShareFile.content_type, FileBlob.data)
        .join(Share, Share.id == ShareFile.share_id)
        .join(FileBlob, FileBlob.sha256 == ShareFile.sha256)
        .where(ShareFile.id == file_id, ShareFile.share_id == share_id, Share.team_id == user.team_id)
    )
    row = (await session.execute(query)).first()
    if row is None:
        raise NotFound(FILE_NOT_FOUND)
    return Download(filename=row.filename, content_type=row.content_type, data=row.data)
