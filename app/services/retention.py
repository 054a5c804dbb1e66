"""Retention: rows worth nothing once old, deleted by the worker heartbeat's periodic sweep (docs/OPERATIONS.md).

- `error_logs`: ERROR_LOG_RETENTION_DAYS after they were written (0: kept for ever). Failed generations'
  diagnostics; the messages and the usage ledger keep what happened.
- `refresh_tokens`: a day past their expiry. An expired token is refused by its own `exp` before any lookup,
  so its row (and a spent one's reuse detection) serves nothing after that.
- `usage_daily`: days before yesterday. The quota counts today only; yesterday's row may still be given back
  by a send refused just after midnight (`usage.release_generation`).

Expired idempotency keys go with `idempotency.prune` and expired revocations whenever something is revoked.

Every worker of every instance sweeps (no leader to elect): each batch is one short transaction deleting at
most SWEEP_BATCH rows, oldest first, picked with FOR UPDATE SKIP LOCKED on PostgreSQL, so two sweepers at once
take different rows and never wait for (or deadlock with) each other or a request; SQLite, one writer at a
time, renders no locking clause. At most SWEEP_MAX_BATCHES batches per table and sweep: a backlog (the first
sweep after an upgrade) is worked off over several sweeps instead of delaying the heartbeat that runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.config import Settings
from app.db import utcnow
from app.models import Base, ErrorLog, RefreshToken, UsageDaily

logger = logging.getLogger(__name__)

#: Rows deleted per transaction, and batches per table and sweep (a sweep runs every 3 heartbeats).
SWEEP_BATCH = 1000
SWEEP_MAX_BATCHES = 10
#: How long a refresh token's row outlives its expiry: a margin for clocks that differ between instances.
REFRESH_KEPT_AFTER_EXPIRY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Swept:
    """Rows deleted by one sweep, per table."""

    error_logs: int = 0
    refresh_tokens: int = 0
    usage_daily: int = 0


async def _delete_in_batches(
    session: AsyncSession,
    model: type[Base],
    key: Sequence[InstrumentedAttribute[Any]],
    order: InstrumentedAttribute[Any],
    where: ColumnElement[bool],
) -> int:
    """Delete the rows of `model` matching `where`, oldest (`order`) first, SWEEP_BATCH per committed
    transaction; `key` is its primary key (rows are picked by it)."""
    deleted = 0
    for _ in range(SWEEP_MAX_BATCHES):
        batch = select(*key).where(where).order_by(order).limit(SWEEP_BATCH).with_for_update(skip_locked=True)
        picked = key[0].in_(batch) if len(key) == 1 else tuple_(*key).in_(batch)
        statement = delete(model).where(picked).execution_options(synchronize_session=False)
        result = await session.execute(statement)
        await session.commit()
        count = int(getattr(result, "rowcount", 0) or 0)
        deleted += count
        if count < SWEEP_BATCH:
            break
    return deleted


async def sweep(*, session: AsyncSession, settings: Settings) -> Swept:
    """Delete what the retention rules say has expired (at most SWEEP_MAX_BATCHES batches per table). Commits."""
    now = utcnow()
    error_logs = 0
    if settings.ERROR_LOG_RETENTION_DAYS > 0:
        cutoff = now - timedelta(days=settings.ERROR_LOG_RETENTION_DAYS)
        error_logs = await _delete_in_batches(
            session, ErrorLog, [ErrorLog.id], ErrorLog.created_at, ErrorLog.created_at < cutoff
        )
    refresh_tokens = await _delete_in_batches(
        session,
        RefreshToken,
        [RefreshToken.id],
        RefreshToken.expires_at,
        RefreshToken.expires_at < now - REFRESH_KEPT_AFTER_EXPIRY,
    )
    yesterday = now.date() - timedelta(days=1)
    usage_daily = await _delete_in_batches(
        session, UsageDaily, [UsageDaily.user_id, UsageDaily.day], UsageDaily.day, UsageDaily.day < yesterday
    )
    swept = Swept(error_logs=error_logs, refresh_tokens=refresh_tokens, usage_daily=usage_daily)
    if error_logs or refresh_tokens or usage_daily:
        logger.info(
            "retention sweep deleted %d error-log row(s), %d expired refresh token(s), %d old quota counter(s)",
            error_logs,
            refresh_tokens,
            usage_daily,
        )
    return swept
