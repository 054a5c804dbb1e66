"""A plain send in one round trip on PostgreSQL: the caller, the chat, the quota, the rows, in one statement.

The common send (`{content}` with an access token, with or without an Idempotency-Key) runs every check
`current_caller` and `start_message` run, claims the quota, stores the question and the placeholder, moves
the chat's leaf, records the key and reads the history, as one autocommit statement of data-modifying CTEs:
one round trip (its commit included) before n8n is called, where the general path takes seven. Every write in
it is gated on every check, so it either does all of it or nothing.

It never refuses: when any check fails (a revoked token, another user's chat, an inactive agent, a running
generation, the quota, a key already used) or a concurrent write wins a race (a unique or foreign key
violation aborts the statement), it stores nothing and returns None, and the caller runs the general path,
which makes the same checks and raises the error users see (app.routers.messages). So the refusals, their
order and their messages have one implementation. Edits, regenerates, files, API keys and SQLite always take
the general path.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Any

import asyncpg
from sqlalchemy import Date, DateTime, Integer, String, Text, TextualSelect, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.types import Uuid

from app import metrics
from app.config import Settings
from app.db import ConnectionLost, Database, Direct, utcnow
from app.models import Chat
from app.security import Caller, family_key, token_issued_us
from app.services.chats import title_from_message
from app.services.idempotency import KEY_LIFETIME
from app.services.messages import NewGeneration, close_interrupted, new_generation
from app.services.tree import message_view

#: `quota.messages_per_user_per_day` as `usage.quota_of` reads it: a JSON integer (jsonb prints 1e2 as 100 and
#: 5.0 as 5.0, which Python reads as an int and a float). An integer of 19 digits or more makes the row
#: disappear (the general path handles such a quota), so the cast to bigint cannot fail.
_QUOTA_TEXT = (
    "CASE WHEN jsonb_typeof(t.settings #> '{quota,messages_per_user_per_day}') = 'number'"
    " THEN t.settings #>> '{quota,messages_per_user_per_day}' END"
)

_START = (
    text(
        "WITH RECURSIVE caller AS ("
        " SELECT u.id FROM users u"
        " WHERE u.id = :uid AND u.team_id = :tid AND u.is_active"
        " AND (u.tokens_valid_after IS NULL OR u.tokens_valid_after <= :issued)"
        " AND NOT EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = ANY(:ids) AND r.expires_at > :now)"
        "), chat AS ("
        " SELECT c.current_message_id AS parent, a.id AS agent_id, a.webhook_url, a.webhook_headers_encrypted,"
        " a.system_prompt, a.config, a.response_mode, q.v AS quota_text,"
        " CASE WHEN q.v ~ '^-?[0-9]{1,18}$' THEN CAST(q.v AS bigint) END AS quota"
        " FROM caller"
        " JOIN chats c ON c.id = :cid AND c.user_id = caller.id AND c.team_id = :tid"
        " JOIN agents a ON a.id = c.agent_id AND a.team_id = :tid AND a.is_active"
        " JOIN teams t ON t.id = :tid"
        f" CROSS JOIN LATERAL (SELECT {_QUOTA_TEXT} AS v) q"
        " WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.chat_id = c.id AND m.status = 'streaming')"
        " AND (CAST(:key AS varchar) IS NULL"
        " OR NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.user_id = :uid AND k.key = :key))"
        " AND (q.v IS NULL OR q.v !~ '^-?[0-9]{19,}$')"
        "), claim AS ("
        " INSERT INTO usage_daily AS d (user_id, day, generations)"
        " SELECT :uid, :day, so_far.n + 1"
        # The day's generations so far: begun today (one that ended after midnight was claimed yesterday).
        " FROM chat CROSS JOIN LATERAL (SELECT count(*) AS n FROM usage_records r WHERE r.user_id = :uid"
        " AND r.created_at >= :day_start AND r.created_at - r.duration_ms * interval '1 millisecond' >= :day_start)"
        " so_far"
        # Nothing when the ledger alone reaches the quota: a refused send must not be counted.
        " WHERE chat.quota > 0 AND so_far.n < chat.quota"
        # The counter, or the ledger's count when ahead of it (sends made while the quota was lifted).
        " ON CONFLICT (user_id, day) DO UPDATE SET generations = greatest(d.generations, EXCLUDED.generations - 1) + 1"
        " WHERE greatest(d.generations, EXCLUDED.generations - 1) < (SELECT quota FROM chat)"
        " RETURNING d.generations"
        "), gate AS ("
        " SELECT chat.* FROM chat"
        " WHERE chat.quota_text IS NULL"
        " OR (chat.quota_text !~ '^-?[0-9]+$')"
        " OR EXISTS (SELECT 1 FROM claim WHERE claim.generations <= chat.quota)"
        "), ins AS ("
        " INSERT INTO messages (id, chat_id, parent_id, role, content, status, worker_id, created_at, updated_at)"
        " SELECT :qid, :cid, gate.parent, 'user', :content, 'complete', NULL, :qat, :qat FROM gate"
        " UNION ALL"
        " SELECT :aid, :cid, :qid, 'assistant', '', 'streaming', :worker, :aat, :aat FROM gate"
        " RETURNING id"
        "), leaf AS ("
        " UPDATE chats SET current_message_id = :aid, message_count = message_count + 2,"
        " last_message_at = :qat, updated_at = :qat, title = coalesce(title, :title)"
        " WHERE id = :cid AND EXISTS (SELECT 1 FROM gate)"
        "), idem AS ("
        # A plain INSERT: a concurrent request with the same key makes this statement fail, and store nothing.
        " INSERT INTO idempotency_keys (user_id, key, request_hash, chat_id, user_message_id,"
        " assistant_message_id, created_at, expires_at)"
        " SELECT :uid, :key, :hash, :cid, :qid_text, :aid_text, :now, :expires FROM gate"
        " WHERE CAST(:key AS varchar) IS NOT NULL"
        "), up(id, parent_id, depth) AS ("
        " SELECT m.id, m.parent_id, 0 FROM messages m JOIN gate ON m.id = gate.parent"
        " UNION ALL"
        " SELECT m.id, m.parent_id, u.depth + 1 FROM messages m JOIN up u ON m.id = u.parent_id"
        " WHERE u.depth < :depth"
        "), history AS ("
        " SELECT m.role, m.content, m.status, up.depth FROM up JOIN messages m ON m.id = up.id"
        "), siblings AS ("
        " SELECT s.id, s.created_at FROM gate JOIN messages s ON s.parent_id = gate.parent"
        " UNION ALL"
        " SELECT s.id, s.created_at FROM gate JOIN messages s"
        " ON s.chat_id = :cid AND s.parent_id IS NULL AND gate.parent IS NULL"
        ") "
        "SELECT gate.parent, gate.agent_id, gate.webhook_url, gate.webhook_headers_encrypted, gate.system_prompt,"
        " gate.config, gate.response_mode,"
        " (SELECT count(*) FROM ins) AS stored,"
        " ARRAY(SELECT role FROM history ORDER BY depth DESC) AS h_role,"
        " ARRAY(SELECT content FROM history ORDER BY depth DESC) AS h_content,"
        " ARRAY(SELECT status FROM history ORDER BY depth DESC) AS h_status,"
        " ARRAY(SELECT id FROM siblings ORDER BY created_at, id) AS sibling_ids,"
        " ARRAY(SELECT created_at FROM siblings ORDER BY created_at, id) AS sibling_times"
        " FROM gate"
    )
    .bindparams(
        *(bindparam(name, type_=Uuid()) for name in ("uid", "tid", "cid", "qid", "aid", "worker")),
        *(bindparam(name, type_=DateTime(timezone=True)) for name in ("issued", "now", "day_start", "qat", "aat")),
        bindparam("expires", type_=DateTime(timezone=True)),
        bindparam("ids", type_=ARRAY(String())),
        bindparam("day", type_=Date()),
        bindparam("depth", type_=Integer()),
        *(bindparam(name, type_=String()) for name in ("key", "hash", "qid_text", "aid_text", "title")),
        bindparam("content", type_=Text()),
    )
    .columns(
        parent=Uuid(),
        agent_id=Uuid(),
        webhook_url=String(),
        webhook_headers_encrypted=String(),
        system_prompt=Text(),
        config=JSONB(),
        response_mode=String(),
        stored=Integer(),
        h_role=ARRAY(String()),
        h_content=ARRAY(Text()),
        h_status=ARRAY(String()),
        sibling_ids=ARRAY(Uuid()),
        sibling_times=ARRAY(DateTime(timezone=True)),
    )
)
START: TextualSelect = _START
START_DIRECT = Direct(_START)


class _Agent:
    """The agent's columns of the statement's row, by attribute (as `new_generation` reads them)."""

    __slots__ = ("agent_id", "config", "response_mode", "system_prompt", "webhook_headers_encrypted", "webhook_url")

    def __init__(self, row: asyncpg.Record) -> None:
        self.agent_id: uuid.UUID = row["agent_id"]
        self.webhook_url: str = row["webhook_url"]
        self.webhook_headers_encrypted: str | None = row["webhook_headers_encrypted"]
        self.system_prompt: str | None = row["system_prompt"]
        self.config: dict[str, Any] | None = row["config"]
        self.response_mode: str = row["response_mode"]


def applies(settings: Settings, *, edit: bool, regenerate: bool, files: bool, content: str | None) -> bool:
    """Whether a send may try the one-statement start: PostgreSQL, an access token, a plain `{content}` that
    passes the content checks (else the general path gives the 401 or 422 in its own order)."""
    if settings.is_sqlite or edit or regenerate or files:
        return False
    return content is not None and bool(content.strip()) and len(content) <= settings.MESSAGE_MAX_CHARS


async def start(
    *,
    db: Database,
    settings: Settings,
    claims: dict[str, Any],
    chat_id: uuid.UUID,
    content: str,
    worker_id: uuid.UUID,
    key: str | None = None,
    fingerprint: str | None = None,
) -> NewGeneration | None:
    """The generation started in one statement, or None when it stored nothing (see the module docstring)."""
    user = Caller(id=uuid.UUID(claims["sub"]), team_id=uuid.UUID(claims["team_id"]))
    ids = [str(claims["jti"])]
    if isinstance(claims.get("fam"), str):
        ids.append(family_key(claims["fam"]))
    now = utcnow()
    issued_us = token_issued_us(claims)
    question_id, assistant_id = uuid.uuid4(), uuid.uuid4()
    placeholder_at = now + timedelta(microseconds=1)
    today = now.date()
    params: dict[str, Any] = {
        "uid": user.id,
        "tid": user.team_id,
        "issued": datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=issued_us),
        "ids": ids,
        "now": now,
        "cid": chat_id,
        "key": key,
        "hash": fingerprint,
        "day": today,
        "day_start": datetime.combine(today, time(), UTC),
        "qid": question_id,
        "aid": assistant_id,
        "qid_text": str(question_id),
        "aid_text": str(assistant_id),
        "content": content,
        "worker": worker_id,
        "qat": now,
        "aat": placeholder_at,
        "title": title_from_message(content),
        "expires": now + KEY_LIFETIME,
        # Twice the message budget, as in `start_message`: answers without text are skipped by the history.
        "depth": 2 * settings.N8N_HISTORY_MAX_MESSAGES,
    }
    try:
        rows = await db.fetch_direct(START_DIRECT, params)
    except asyncpg.IntegrityConstraintViolationError:
        return None  # a race lost (another send, the same key, the chat deleted): the general path says which
    except ConnectionLost:
        # The connection died under the statement (the pool's older ones are dropped): it stored all or nothing.
        # Nothing: the general path runs on a fresh connection. All: no task will ever write the answer, so it is
        # closed now as `interrupted` (what the sweeper would do later) and the client gets the retryable 503; a
        # retry with the same Idempotency-Key replays that answer, as for any stream cut short.
        # Closed as the sweeper closes an answer: with its error_logs row and its usage ledger row (the quota
        # counted it).
        async with db.sessionmaker() as session:
            agent_id = await session.scalar(select(Chat.agent_id).where(Chat.id == chat_id))
            closed = agent_id is not None and await close_interrupted(
                session,
                message_id=assistant_id,
                chat_id=chat_id,
                team_id=user.team_id,
                user_id=user.id,
                agent_id=agent_id,
                question_chars=len(content),
                answer_chars=0,
                started_at=placeholder_at,
                detail={"reason": "the reply to its start was lost"},
            )
            if not closed:
                return None
            await session.commit()
        metrics.generation_finished(
            outcome="interrupted", agent_id=agent_id, error_code="interrupted", metadata={}, pool_in_use=None
        )
        raise
    row = rows[0] if rows else None
    if row is None or not row["stored"]:
        return None
    # The question's siblings as the general path orders them: by time, then id (the new one is normally last).
    known = sorted([*zip(row["sibling_times"], row["sibling_ids"], strict=True), (now, question_id)])
    siblings = [sibling for _at, sibling in known]
    user_message = message_view(
        id=question_id,
        parent_id=row["parent"],
        role="user",
        content=content,
        status="complete",
        created_at=now,
        error=None,
        metadata=None,
        feedback=None,
        sibling_ids=siblings,
    )
    prior = [
        {"role": role, "content": text_, "status": status}
        for role, text_, status in zip(row["h_role"], row["h_content"], row["h_status"], strict=True)
    ]
    return new_generation(
        settings=settings,
        user=user,
        chat_id=chat_id,
        agent=_Agent(row),
        assistant_id=assistant_id,
        user_message=user_message,
        prior=prior,
        latest=content,
        created_at=placeholder_at,
        assistant_sibling_ids=[assistant_id],
        attached=[],
        delivery="url",
    )
