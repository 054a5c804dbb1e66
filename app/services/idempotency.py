"""Idempotency-Key on send: a retry with the same key (same user, 24 h) answers the generation the key started.

The key is claimed with one INSERT ... ON CONFLICT DO NOTHING before any other check, so of two requests
carrying it, exactly one goes on to start a generation; the other waits for it and answers its stream.
Every statement here is atomic on its own (the send route's session has no transaction).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.dialects import statements_of
from app.errors import Conflict, Unprocessable
from app.models import IdempotencyKey

#: How long a key is remembered.
KEY_LIFETIME = timedelta(hours=24)
#: How long a retry waits for the request that claimed the key to store its message (seconds).
CLAIM_WAIT = 10.0
#: A claim still without its message after this long was abandoned (its process died or its request was cut
#: between the claim and the record): it is dropped, so the key does not answer 409 for the rest of its 24 h.
ABANDONED_AFTER = timedelta(seconds=60)
KEY_MAX_LENGTH = 255
#: Printable ASCII, space to tilde (checked by the route's header validation).
KEY_PATTERN = r"^[ -~]+$"
KEY_REUSED = "This Idempotency-Key was used with another request; use a new key for a new message"
STILL_STARTING = "The request with this Idempotency-Key is still starting; retry in a moment"
_LOC = ("header", "Idempotency-Key")

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Recorded:
    """The generation a key started."""

    chat_id: uuid.UUID
    user_message_id: str
    assistant_message_id: str


def request_hash(path: str, body: dict[str, Any]) -> str:
    """What the key promises to repeat: the path and the body, canonically encoded."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(f"{path}\n{canonical}".encode()).hexdigest()


async def claim(
    *, session: AsyncSession, user_id: uuid.UUID, key: str, fingerprint: str, chat_id: uuid.UUID
) -> Recorded | None:
    """None: this request holds the key and goes on. Else the generation an earlier request started with it.

    422 when the key was used with another path or body.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLAIM_WAIT
    while True:
        now = utcnow()
        await session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.user_id == user_id,
                IdempotencyKey.key == key,
                or_(
                    IdempotencyKey.expires_at <= now,
                    and_(
                        IdempotencyKey.assistant_message_id.is_(None),
                        IdempotencyKey.created_at <= now - ABANDONED_AFTER,
                    ),
                ),
            )
        )
        insert = statements_of(session).insert_ignoring_conflict(
            IdempotencyKey,
            ["user_id", "key"],
            user_id=user_id,
            key=key,
            request_hash=fingerprint,
            chat_id=chat_id,
            created_at=now,
            expires_at=now + KEY_LIFETIME,
        )
        claimed = getattr(await session.execute(insert), "rowcount", 0)
        await session.commit()
        if claimed:
            return None
        row = (
            await session.execute(
                select(IdempotencyKey.request_hash, IdempotencyKey.user_message_id, IdempotencyKey.assistant_message_id)
                .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
                .execution_options(populate_existing=True)
            )
        ).first()
        await session.commit()
        if row is not None:
            if row.request_hash != fingerprint:
                raise Unprocessable(KEY_REUSED, loc=_LOC)
            if row.assistant_message_id is not None and row.user_message_id is not None:
                return Recorded(chat_id, row.user_message_id, row.assistant_message_id)
        # The first request is still checking and storing (or just gave the key back after a refusal).
        if loop.time() >= deadline:
            raise Conflict(STILL_STARTING)
        await asyncio.sleep(0.05)


async def record(
    *, session: AsyncSession, user_id: uuid.UUID, key: str, user_message_id: str, assistant_message_id: str
) -> None:
    """The claimed key now names the generation its request started: written in the transaction that stores
    its messages (`start_message`), never committed alone, so a claim without ids means nothing was stored
    and n8n was not called (what lets `claim` drop an abandoned one without starting a second generation)."""
    await session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
        .values(user_message_id=user_message_id, assistant_message_id=assistant_message_id)
    )


async def release(*, session: AsyncSession, user_id: uuid.UUID, key: str) -> None:
    """The request was refused (or cancelled) before anything was stored: the key is free again, so a retry is
    judged anew. Called while another exception propagates: a failure here is logged, never raised over it (the
    claim is then dropped as abandoned after `ABANDONED_AFTER`)."""
    try:
        await session.rollback()
        await session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.user_id == user_id,
                IdempotencyKey.key == key,
                IdempotencyKey.assistant_message_id.is_(None),
            )
        )
        await session.commit()
    except Exception:
        logger.exception("giving back a refused send's Idempotency-Key failed")


async def prune(*, session: AsyncSession) -> int:
    """Forget expired keys (run with the worker heartbeat's periodic recovery)."""
    result = await session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at <= utcnow()))
    await session.commit()
    return int(getattr(result, "rowcount", 0) or 0)
