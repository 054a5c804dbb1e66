"""Readiness checks: the database answers and is at the migration head; whether a configured Redis answers."""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory
from sqlalchemy import text

from app.db import Database
from app.migrations import alembic_config

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent.parent
CHECK_TIMEOUT = 3.0
#: Redis only decides between "ready" and "degraded" (both 200), so it gets less: a Redis that takes connections
#: and answers nothing (hung, a failover dropping packets) must not hold /ready past a probe's own timeout
#: (Kubernetes' default is 1 s), or every instance sharing it would be taken out at once.
REDIS_CHECK_TIMEOUT = 0.5


@functools.cache
def migration_head() -> str | None:
    """The head of the migrations shipped with this code, read once: reading it walks every migration file."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def readiness_problem(*, db: Database, expected_revision: str | None) -> str | None:
    """None when ready, else a short reason (no connection strings, no driver messages)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            async with db.probe() as conn:
                revision = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except Exception as exc:
        logger.warning("readiness: database check failed: %s", type(exc).__name__)
        msg = str(exc).lower()
        if "alembic_version" in msg:
            return "database not migrated: run `alembic upgrade head`"
        return "database unreachable"
    if revision != expected_revision:
        return f"database not migrated: at {revision}, expected {expected_revision}"
    return None


async def readiness(*, db: Database, expected_revision: str | None, redis: Any) -> tuple[str | None, str]:
    """(the database's problem, None when ready; "ready" or "degraded"): both checks at once, so /ready answers
    within the database's check even while Redis hangs."""
    database = readiness_problem(db=db, expected_revision=expected_revision)
    if redis is None:
        return await database, "ready"
    problem, reachable = await asyncio.gather(database, redis_reachable(redis))
    return problem, "ready" if reachable else "degraded"


async def redis_reachable(redis: Any) -> bool:
    """Whether the configured Redis answers within REDIS_CHECK_TIMEOUT. Without it the service still serves
    everything (degraded: per-process rate limits, stop and follow on the instance that runs the generation)."""
    try:
        async with asyncio.timeout(REDIS_CHECK_TIMEOUT):
            await redis.ping()
    except Exception as exc:
        logger.warning("readiness: redis check failed: %s", type(exc).__name__)
        return False
    return True
