"""Workers in SQL: registration, heartbeat, and marking the streams of dead workers interrupted."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.dialects import statements_of
from app.models import Chat, Worker
from app.services import error_logs
from app.services.messages import patch_message

#: A worker whose heartbeat is older than this many intervals is considered dead by start-up recovery.
STALE_HEARTBEATS = 3


async def heartbeat(*, session: AsyncSession, worker_id: uuid.UUID) -> None:
    """Register this worker or refresh its liveness (re-registers if another worker removed the row)."""
    result = await session.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=utcnow()))
    if not getattr(result, "rowcount", 0):
        session.add(Worker(id=worker_id))
    await session.commit()


def _older_than(element: dict[str, Any], cutoff: datetime) -> bool:
    try:
        created = datetime.fromisoformat(str(element.get("created_at")))
    except ValueError:
        return True
    return created < cutoff


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
    """Mark `streaming` messages of dead workers `interrupted` (keeping their checkpointed text).

    A worker is alive when its heartbeat is younger than STALE_HEARTBEATS intervals; its streams are left
    alone. This worker's own `streaming` messages that it no longer runs (`running`: assistant ids of its
    live generations), for instance because the final write failed, are orphans and marked too, once older
    than the stale window (so a generation that is just being started is never caught). Each element is
    patched by index with a guard on its id and status, so a live worker finishing a stream concurrently is
    never overwritten. Returns how many messages were marked.
    """
    cutoff = utcnow() - timedelta(seconds=settings.WORKER_HEARTBEAT_INTERVAL * STALE_HEARTBEATS)
    live = {str(w) for w in (await session.execute(select(Worker.id).where(Worker.heartbeat_at >= cutoff))).scalars()}
    live.add(str(worker_id))
    columns = (Chat.id, Chat.team_id, Chat.user_id, Chat.agent_id, Chat.messages)
    rows = (await session.execute(select(*columns).where(statements_of(session).streaming_chats))).all()
    await session.commit()
    error = {"message": "The server stopped before the answer was complete", "code": "interrupted"}
    patch = {"status": "interrupted", "error": error}
    marked = 0
    for chat_id, team_id, user_id, agent_id, messages in rows:
        for index, element in enumerate(messages or []):
            if not isinstance(element, dict) or element.get("status") != "streaming":
                continue
            owner = str(element.get("_worker"))
            if owner == str(worker_id):
                if str(element.get("id")) in running or not _older_than(element, cutoff):
                    continue
            elif owner in live:
                continue
            written = await patch_message(
                session,
                chat_id=chat_id,
                index=index,
                message_id=str(element.get("id")),
                patch=patch,
                only_streaming=True,
                touch=True,
            )
            if written:
                marked += 1
                await error_logs.record_error(
                    session=session,
                    team_id=team_id,
                    user_id=user_id,
                    chat_id=chat_id,
                    agent_id=agent_id,
                    code="interrupted",
                    message=error["message"],
                    upstream_status=None,
                    detail={"reason": "its worker stopped", "worker": str(element.get("_worker"))},
                )
        await session.commit()
    await session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff, Worker.id != worker_id))
    await session.commit()
    return marked
