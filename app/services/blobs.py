"""The bytes of files (`file_blobs`, one row per content): which a chat or a share uses, and removing unused
ones. A blob is in use while a chat's file (`files`) or a share's copy (`share_files`) names it.

Apart from app.services.files so that chats (deletion) and files (upload) both use it without a cycle.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from sqlalchemy import delete, exists, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import File, FileBlob, ShareFile

logger = logging.getLogger(__name__)


async def chat_blob_hashes(session: AsyncSession, chat_id: uuid.UUID) -> list[str]:
    """The contents a chat's files use, read before the chat goes (its files go with it by cascade)."""
    return list((await session.execute(select(File.sha256).where(File.chat_id == chat_id).distinct())).scalars())


async def share_blob_hashes(session: AsyncSession, share_id: uuid.UUID) -> list[str]:
    """The contents a share's copies use, read before the share (or its copies) go."""
    query = select(ShareFile.sha256).where(ShareFile.share_id == share_id).distinct()
    return list((await session.execute(query)).scalars())


async def collect_blobs(session: AsyncSession, hashes: Sequence[str]) -> int:
    """Remove these blobs when no file and no share copy uses them any more, each in its own transaction: a
    row written meanwhile makes that one delete fail on its reference (or wait for its lock) and the blob
    stays, as it must, while the others still go. A failed delete is logged, never raised: the caller's own
    change is already committed. Commits; returns how many went. (The retention sweep removes those a crash
    left behind: app.services.retention.)"""
    orphan = ~exists().where(File.sha256 == FileBlob.sha256) & ~exists().where(ShareFile.sha256 == FileBlob.sha256)
    removed = 0
    for sha256 in sorted(set(hashes)):  # one order for every collector: no deadlock between two of them
        try:
            result = await session.execute(delete(FileBlob).where(FileBlob.sha256 == sha256, orphan))
            await session.commit()
            removed += int(getattr(result, "rowcount", 0) or 0)
        except IntegrityError:
            await session.rollback()  # in use again: kept
        except DBAPIError:
            await session.rollback()
            logger.warning("removing an unused file's bytes failed; they stay until the next collection", exc_info=True)
    return removed
