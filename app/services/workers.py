"""Workers in SQL: registration, heartbeat, and marking the streams of dead workers interrupted."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app import metrics
from app.config import Settings
from app.db import utcnow
from app.models import IS_STREAMING, Chat, Message, Worker
from app.services import error_logs
from app.services import usage as usage_service
from app.services.messages import INTERRUPTED, mark_interrupted

_question = aliased(Message, name="question")

#: A worker whose heartbeat is older than this many intervals is considered dead by start-up recovery.
STALE_HEARTBEATS = 3


async def heartbeat(*, session: AsyncSession, worker_id: uuid.UUID) -> None:
    """Register this worker or refresh its liveness (re-registers if another worker removed the row)."""
    result = await session.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=utcnow()))
    if not getattr(result, "rowcount", 0):
        session.add(Worker(id=worker_id))
    await session.commit()


async def unregister_worker(*, session: AsyncSession, worker_id: uuid.UUID) -> None:
    await session.execute(delete(Worker).where(Worker.id == worker_id))
    await session.commit()


async def recover_interrupted(
    *,
    session: AsyncSession,
    settings: Settings,
    worker_id: uuid.UUID,
    running: frozenset[str] = frozenset(),
) -> int:
    """Mark `streaming` messages of dead workers `interrupted` (keeping their checkpointed text), with the
    error_logs row and the usage ledger row their own worker would have written with the final message.

    A worker is alive when its heartbeat is younger than STALE_HEARTBEATS intervals; its streams are left
    alone. This worker's own `streaming` messages that it no longer runs (`running`: assistant ids of its
    live generations), for instance because the final write failed, are orphans and marked too, once older
    than the stale window (so a generation that is just being started is never caught). Each row is updated
    with a guard on its status, so a live worker finishing a stream concurrently is never overwritten.
    Returns how many messages were marked.
    """
    cutoff = utcnow() - timedelta(seconds=settings.WORKER_HEARTBEAT_INTERVAL * STALE_HEARTBEATS)
    live = set((await session.execute(select(Worker.id).where(Worker.heartbeat_at >= cutoff))).scalars())
    live.add(worker_id)
    # The partial unique index on `streaming` rows serves this: no chat is read.
    query = (
        select(
            Message.id,
            Message.chat_id,
            Message.worker_id,
            Message.created_at,
            Chat.team_id,
            Chat.user_id,
            Chat.agent_id,
            Message.content,
            _question.content.label("question"),
        )
        .join(Chat, Chat.id == Message.chat_id)
        .outerjoin(_question, _question.id == Message.parent_id)
        .where(IS_STREAMING)
    )
    rows = (await session.execute(query)).all()
    await session.commit()
    marked = 0
    for row in rows:
        if row.worker_id == worker_id:
            if str(row.id) in running or row.created_at >= cutoff:
                continue
        elif row.worker_id in live:
            continue
        marked_now = await mark_interrupted(session, message_id=row.id, chat_id=row.chat_id)
        if marked_now:
            marked += 1
            await error_logs.record_error(
                session=session,
                team_id=row.team_id,
                user_id=row.user_id,
                chat_id=row.chat_id,
                agent_id=row.agent_id,
                code="interrupted",
                message=INTERRUPTED["message"],
                upstream_status=None,
                detail={"reason": "its worker stopped", "worker": str(row.worker_id)},
            )
            # Its final write: the generation's usage ledger row, as its own worker would have written it.
            await usage_service.record_generation(
                session=session,
                team_id=row.team_id,
                user_id=row.user_id,
                agent_id=row.agent_id,
                chat_id=row.chat_id,
                outcome="interrupted",
                error_code="interrupted",
                chars_in=len(row.question or ""),
                chars_out=len(row.content or ""),
                # From its start (the placeholder's row): the quota counts a generation on the day it began, by
                # the ledger row's time less its duration; without it, one from before midnight counted twice.
                metadata={"duration_ms": max(0, round((utcnow() - row.created_at).total_seconds() * 1000))},
            )
        await session.commit()
        if marked_now:
            # Its timings are unknown (the duration above is its worker's absence, not n8n's time).
            metrics.generation_finished(
                outcome="interrupted", agent_id=row.agent_id, error_code="interrupted", metadata={}, pool_in_use=None
            )
    await session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff, Worker.id != worker_id))
    await session.commit()
    return marked
