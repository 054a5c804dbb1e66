"""Writing a whole message tree into a new chat of the caller (a fork of a share, an import): new ids, new times
in the given order, the chat's counters and current leaf set in the same transaction; the messages' files as
new file rows over the same blobs (a fork) or as metadata only (an import)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat_schemas import format_timestamp
from app.db import utcnow
from app.models import Chat, File, Message, User


@dataclass(frozen=True)
class CopiedFile:
    """A file a copied message carries. With `id`, a new file row of the new chat over the blob `sha256`
    (already stored: the caller holds what keeps it); without, metadata only (an import has no bytes)."""

    id: uuid.UUID | None
    filename: str
    content_type: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CopiedMessage:
    """A message to write; `key` and `parent_key` link the tree within the copy (a parent comes first)."""

    key: uuid.UUID
    parent_key: uuid.UUID | None
    role: str
    content: str
    status: str
    error: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    feedback: dict[str, Any] | None = None
    files: tuple[CopiedFile, ...] = ()


async def create_chat_copy(
    session: AsyncSession,
    *,
    user: User,
    agent_id: uuid.UUID,
    title: str | None,
    messages: Sequence[CopiedMessage],
    current_key: uuid.UUID | None,
    archived: bool = False,
    pinned: bool = False,
) -> Chat:
    """A new chat of `user` holding `messages` (parents before children) under new ids; the caller commits.

    Times are stamped now, one microsecond apart in list order, so siblings keep their order (the API orders
    children by time) and the chat's last activity is its last message.
    """
    now = utcnow()
    ids = {m.key: uuid.uuid4() for m in messages}
    stamps = [now - timedelta(microseconds=len(messages) - i) for i in range(len(messages))]
    chat = Chat(
        team_id=user.team_id,
        user_id=user.id,
        agent_id=agent_id,
        title=title,
        archived=archived,
        pinned=pinned,
        message_count=len(messages),
        current_message_id=ids[current_key] if current_key is not None else None,
        last_message_at=stamps[-1] if stamps else None,
        created_at=now,
        updated_at=now,
    )
    session.add(chat)
    await session.flush()
    if messages:
        rows = [
            {
                "id": ids[m.key],
                "chat_id": chat.id,
                "parent_id": ids[m.parent_key] if m.parent_key is not None else None,
                "role": m.role,
                "content": m.content,
                "status": m.status,
                "error": m.error,
                "meta": m.metadata,
                "feedback": m.feedback,
                "files": [_file_view(f, stamp) for f in m.files] or None,
                "created_at": stamp,
                "updated_at": stamp,
            }
            for m, stamp in zip(messages, stamps, strict=True)
        ]
        await session.execute(insert(Message), rows)
    file_rows = [
        {
            "id": f.id,
            "chat_id": chat.id,
            "team_id": user.team_id,
            "user_id": user.id,
            "message_id": ids[m.key],  # sent files: the per-chat cap counts them, the unsent cap does not
            "filename": f.filename,
            "content_type": f.content_type,
            "size": f.size,
            "sha256": f.sha256,
            "created_at": stamp,
        }
        for m, stamp in zip(messages, stamps, strict=True)
        for f in m.files
        if f.id is not None
    ]
    if file_rows:
        await session.execute(insert(File), file_rows)
    return chat


def _file_view(f: CopiedFile, stamp: datetime) -> dict[str, Any]:
    """The File a copied message shows (`id` null: metadata only, nothing to download)."""
    return {
        "id": str(f.id) if f.id is not None else None,
        "filename": f.filename,
        "content_type": f.content_type,
        "size": f.size,
        "sha256": f.sha256,
        "created_at": format_timestamp(stamp),
    }
