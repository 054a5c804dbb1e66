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
from app.services.messages import close_interrupted

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
        marked_now = await close_interrupted(
            session,
            message_id=row.id,
            chat_id=row.chat_id,
            team_id=row.team_id,
            user_id=row.user_id,
            agent_id=row.agent_id,
            question_chars=len(row.question or ""),
            answer_chars=len(row.content or ""),
            started_at=row.created_at,
            detail={"reason": "its worker stopped", "worker": str(row.worker_id)},
        )
        if marked_now:
            marked += 1
        await session.commit()
        if marked_now:
            # Its timings are unknown (the ledger's duration is its worker's absence, not n8n's time).
            metrics.generation_finished(
                outcome="interrupted", agent_id=row.agent_id, error_code="interrupted", metadata={}, pool_in_use=None
            )
    await session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff, Worker.id != worker_id))
    await session.commit()
    return marked
