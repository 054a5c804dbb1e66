"""Files in messages: upload into a chat, download, attach to a user message, signed links for n8n, delivery.

A file is a `files` row (its chat, name, judged type, size, SHA-256) over a `file_blobs` row holding the bytes
once per content, so a copy (a share's) is a new row, not new bytes. A user message that carries files keeps
their views on its own row (`messages.files`), so reading messages never joins `files`, and a send without
`file_ids` runs no query of this module. docs/FILES.md has the rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
from sqlalchemy import Uuid, bindparam, case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import callbacks, filetypes
from app.chat_schemas import format_timestamp
from app.config import Settings
from app.db import utcnow
from app.dialects import statements_of
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Chat, File, FileBlob, Message
from app.security import Caller
from app.services import blobs
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, owned_chat_params
from app.uploads import UploadSlots, read_upload

logger = logging.getLogger(__name__)

FILE_NOT_FOUND = "File not found"
CHAT_FULL = "This chat holds the most files allowed ({limit})"
TOO_MANY_UNSENT = "This chat already has {limit} files not yet sent; send or delete some first"
FILE_IDS_INVALID = "file_ids must name files of this chat not yet sent"
TOO_MANY_FILES = "A message carries at most {limit} files"
TOO_LARGE_INLINE = "A file is too large to send to this agent inline (at most {limit} bytes); {reason}"
INLINE_BASE64_REASON = "its file_delivery is base64"
INLINE_NO_URL_REASON = "without PUBLIC_BASE_URL files go inline"
#: Signed links for n8n (`{PUBLIC_BASE_URL}{PATH_PREFIX}{generation}/{file}/{signature}`); app/logs.py
#: redacts everything after the prefix.
PATH_PREFIX = "/api/files/signed/"
#: Download headers: never rendered or run by a browser, even opened directly.
DOWNLOAD_CSP = "default-src 'none'; sandbox"

_FILE_COLUMNS = (File.id, File.filename, File.content_type, File.size, File.sha256, File.created_at)


def file_view(row: Any) -> dict[str, Any]:
    """A file as the API's File (and as a message's `files` keep it)."""
    return {
        "id": str(row.id),
        "filename": row.filename,
        "content_type": row.content_type,
        "size": row.size,
        "sha256": row.sha256,
        "created_at": format_timestamp(row.created_at),
    }


# --- upload and download -------------------------------------------------------------------------


async def upload_file(
    *,
    session: AsyncSession,
    settings: Settings,
    slots: UploadSlots,
    user: Caller,
    chat_id: uuid.UUID,
    chunks: AsyncIterator[bytes],
    content_type: str | None,
) -> dict[str, Any]:
    """Read, judge and store one upload into the caller's chat; returns its File.

    404 (not the caller's chat: checked before the body is read), 429 (too many uploads at once), 413 (over
    FILE_MAX_BYTES, while reading), 415 (type, app.filetypes), 422 (no file), 409 (the chat's caps). The caps
    are counted again under a lock on the chat row, so concurrent uploads cannot pass them.
    """
    await _owned_chat(session, user, chat_id)
    await session.rollback()  # no connection is held while the body arrives
    slots.take(user.id)
    try:
        upload = await read_upload(chunks, content_type, settings.FILE_MAX_BYTES)
        data = bytes(upload.data)
        del upload.data
        filename = filetypes.clean_filename(upload.filename)
        judged, digest = await anyio.to_thread.run_sync(_judge_and_hash, data, upload.declared_type, filename, settings)
    finally:
        slots.give_back(user.id)
    # The chat again, locked: concurrent uploads to it count one after the other.
    locked = select(Chat.id).where(*OWNED_CHAT).with_for_update()
    if (await session.execute(locked, owned_chat_params(chat_id, user.id, user.team_id))).first() is None:
        raise NotFound(CHAT_NOT_FOUND)
    counts = (
        await session.execute(
            select(func.count(), func.coalesce(func.sum(case((File.message_id.is_(None), 1), else_=0)), 0)).where(
                File.chat_id == chat_id
            )
        )
    ).one()
    if counts[0] >= settings.FILES_PER_CHAT_MAX:
        raise Conflict(CHAT_FULL.format(limit=settings.FILES_PER_CHAT_MAX))
    if counts[1] >= settings.FILES_UNSENT_PER_CHAT_MAX:
        raise Conflict(TOO_MANY_UNSENT.format(limit=settings.FILES_UNSENT_PER_CHAT_MAX))
    now = utcnow()
    # The blob row is written, or locked and its `created_at` moved to now: a concurrent collector cannot remove
    # it before this commit, and the retention sweep, which takes only blobs older than an hour, re-reads the
    # time once this commits and leaves it (app.services.retention). The file row commits with it.
    await session.execute(
        statements_of(session).insert_locking_existing(
            FileBlob, "sha256", "created_at", sha256=digest, size=len(data), data=data, created_at=now
        )
    )
    row = File(
        chat_id=chat_id,
        team_id=user.team_id,
        user_id=user.id,
        filename=filename,
        content_type=judged.content_type,
        size=len(data),
        sha256=digest,
        created_at=now,
    )
    session.add(row)
    await session.commit()
    logger.info("file %s (%s, %d bytes) uploaded to chat %s", row.id, row.content_type, row.size, chat_id)
    return file_view(row)


def _judge_and_hash(
    data: bytes, declared: str | None, filename: str, settings: Settings
) -> tuple[filetypes.Judged, str]:
    judged = filetypes.judge(data, declared, settings.FILE_ALLOWED_TYPES, filename)
    return judged, hashlib.sha256(data).hexdigest()


async def _owned_chat(session: AsyncSession, user: Caller, chat_id: uuid.UUID) -> None:
    found = await session.execute(select(Chat.id).where(*OWNED_CHAT), owned_chat_params(chat_id, user.id, user.team_id))
    if found.first() is None:
        raise NotFound(CHAT_NOT_FOUND)


@dataclass(frozen=True, slots=True)
class Download:
    filename: str
    content_type: str
    data: bytes


_OWNED_FILE = (
    select(File.filename, File.content_type, FileBlob.data)
    .join(Chat, Chat.id == File.chat_id)
    .join(FileBlob, FileBlob.sha256 == File.sha256)
    .where(File.id == bindparam("fid", type_=Uuid()), File.chat_id == Chat.id, *OWNED_CHAT)
)


async def read_file(*, session: AsyncSession, user: Caller, chat_id: uuid.UUID, file_id: uuid.UUID) -> Download:
    """A file of the caller's chat with its bytes; 404 for a missing one and for anyone else's alike."""
    params = {**owned_chat_params(chat_id, user.id, user.team_id), "fid": file_id}
    row = (await session.execute(_OWNED_FILE, params)).first()
    if row is None:
        raise NotFound(FILE_NOT_FOUND)
    return Download(filename=row.filename, content_type=row.content_type, data=row.data)


FILE_SENT = "This file was sent with a message; it is deleted with its chat"


async def delete_unsent_file(*, session: AsyncSession, user: Caller, chat_id: uuid.UUID, file_id: uuid.UUID) -> None:
    """Remove an upload that no message carries (404 for anyone else's; 409 once sent), then its bytes if
    no other file uses them."""
    query = (
        select(File.id, File.sha256, File.message_id)
        .join(Chat, Chat.id == File.chat_id)
        .where(File.id == bindparam("fid", type_=Uuid()), *OWNED_CHAT)
        .with_for_update(of=File)
    )
    row = (await session.execute(query, {**owned_chat_params(chat_id, user.id, user.team_id), "fid": file_id})).first()
    if row is None:
        raise NotFound(FILE_NOT_FOUND)
    if row.message_id is not None:
        raise Conflict(FILE_SENT)
    await session.execute(delete(File).where(File.id == file_id, File.message_id.is_(None)))
    await session.commit()
    await blobs.collect_blobs(session, [row.sha256])


# --- signed links for n8n ------------------------------------------------------------------------


def link_signature(settings: Settings, generation_id: str, file_id: str) -> str:
    return callbacks.sign(settings, f"file:{generation_id}:{file_id}")


def signed_url(settings: Settings, generation_id: str, file_id: str) -> str:
    signature = link_signature(settings, generation_id, file_id)
    return f"{settings.PUBLIC_BASE_URL}{PATH_PREFIX}{generation_id}/{file_id}/{signature}"


async def read_signed_link(
    *, session: AsyncSession, settings: Settings, generation_id: str, file_id: str, signature: str
) -> Download:
    """A file through a signed link: the signature binds the generation and the file, the file must be of
    the generation's chat, and the generation running or ended at most FILE_URL_GRACE_SECONDS ago. Any
    failure, a malformed link included, is the same 404."""
    try:
        generation, file = uuid.UUID(generation_id), uuid.UUID(file_id)
    except ValueError:
        raise NotFound(FILE_NOT_FOUND) from None
    expected = link_signature(settings, str(generation), str(file))
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise NotFound(FILE_NOT_FOUND)
    cutoff = utcnow() - timedelta(seconds=settings.FILE_URL_GRACE_SECONDS)
    query = (
        select(File.filename, File.content_type, FileBlob.data)
        .join(Message, (Message.id == generation) & (Message.chat_id == File.chat_id))
        .join(FileBlob, FileBlob.sha256 == File.sha256)
        .where(
            File.id == file,
            Message.role == "assistant",
            (Message.status == "streaming") | (Message.updated_at >= cutoff),
        )
    )
    row = (await session.execute(query)).first()
    if row is None:
        raise NotFound(FILE_NOT_FOUND)
    return Download(filename=row.filename, content_type=row.content_type, data=row.data)


# --- attaching to a message (inside the send transaction) -----------------------------------------


async def attach(
    *,
    session: AsyncSession,
    settings: Settings,
    chat_id: uuid.UUID,
    file_ids: Sequence[uuid.UUID],
    message_id: uuid.UUID,
    reusable: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The files named by a send, in its order, marked as sent by `message_id`; 422 unless each is a file of
    this chat not yet sent (or, for an edit, one of the edited message's files: `reusable`). The caller's
    transaction commits (or rolls back) the marks with the message."""
    if len(file_ids) > settings.FILES_PER_MESSAGE_MAX:
        raise Unprocessable(TOO_MANY_FILES.format(limit=settings.FILES_PER_MESSAGE_MAX), loc=("body", "file_ids"))
    if len(set(file_ids)) != len(file_ids):
        raise Unprocessable(FILE_IDS_INVALID, loc=("body", "file_ids"))
    query = select(*_FILE_COLUMNS, File.message_id).where(File.chat_id == chat_id, File.id.in_(file_ids))
    rows = {row.id: row for row in (await session.execute(query)).all()}
    kept = set(reusable)
    fresh = [i for i in file_ids if i in rows and rows[i].message_id is None]
    if len(rows) != len(file_ids) or any(rows[i].message_id is not None and str(i) not in kept for i in file_ids):
        raise Unprocessable(FILE_IDS_INVALID, loc=("body", "file_ids"))
    if fresh:
        marked = await session.execute(
            update(File).where(File.id.in_(fresh), File.message_id.is_(None)).values(message_id=message_id)
        )
        if getattr(marked, "rowcount", 0) != len(fresh):  # sent meanwhile by a concurrent request
            raise Unprocessable(FILE_IDS_INVALID, loc=("body", "file_ids"))
    return [file_view(rows[i]) for i in file_ids]


# --- what n8n receives ---------------------------------------------------------------------------


def delivery_for(settings: Settings, agent_mode: str, files: Sequence[dict[str, Any]]) -> str:
    """The delivery actually used: the agent's, except `url` without PUBLIC_BASE_URL, which goes inline.
    422 when a file is over FILE_INLINE_MAX_BYTES and goes inline (checked before anything is stored)."""
    mode = agent_mode
    reason = INLINE_BASE64_REASON
    if mode == "url" and settings.PUBLIC_BASE_URL is None:
        mode, reason = "base64", INLINE_NO_URL_REASON
    if mode == "base64" and any(int(f["size"]) > settings.FILE_INLINE_MAX_BYTES for f in files):
        raise Unprocessable(
            TOO_LARGE_INLINE.format(limit=settings.FILE_INLINE_MAX_BYTES, reason=reason), loc=("body", "file_ids")
        )
    return mode


def payload_files(
    settings: Settings, mode: str, files: Sequence[dict[str, Any]], generation_id: str
) -> list[dict[str, Any]]:
    """The JSON body's `files` (`url` mode with signed links; `base64` gets its `data` when the call is made)."""
    entries = []
    for f in files:
        entry: dict[str, Any] = {
            "id": f["id"],
            "filename": f["filename"],
            "mimeType": f["content_type"],
            "size": f["size"],
        }
        if mode == "url":
            entry["url"] = signed_url(settings, generation_id, f["id"])
        entries.append(entry)
    return entries


async def load_bytes(session: AsyncSession, chat_id: uuid.UUID, file_ids: Sequence[str]) -> dict[str, bytes]:
    """The bytes of these files of the chat (for inline and multipart delivery), by id."""
    ids = [uuid.UUID(i) for i in file_ids]
    query = (
        select(File.id, FileBlob.data)
        .join(FileBlob, FileBlob.sha256 == File.sha256)
        .where(File.chat_id == chat_id, File.id.in_(ids))
    )
    return {str(row.id): row.data for row in (await session.execute(query)).all()}


def inline(entries: list[dict[str, Any]], data: dict[str, bytes]) -> None:
    """`base64` delivery: each entry gains `data`, its bytes in base64."""
    for entry in entries:
        entry["data"] = base64.b64encode(data[entry["id"]]).decode()
