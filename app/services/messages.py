"""Chat messages in SQL: the atomic append that starts a generation, checkpoints, the final write.

Every write changes the `messages` JSON array in place with one conditional UPDATE (never a read-modify-
write in Python), so concurrent sends, checkpoints and recovery can never lose or duplicate a message.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, TextClause, Uuid, bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeEngine

from app.config import Settings
from app.db import UTCDateTime, execute_core, utcnow
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Agent, Chat
from app.schemas import MessageRead, format_timestamp
from app.security import Caller
from app.services import error_logs
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, owned_chat_params, title_from_message

GENERATION_RUNNING = "A generation is already running in this chat"
AGENT_INACTIVE = "This chat's agent is no longer active"
EMPTY_CONTENT = "Message content must not be empty"

_PG_APPEND_SQL = (
    "UPDATE chats SET messages = messages || CAST(:new AS jsonb), message_count = message_count + 2, "
    "last_message_at = :now, updated_at = :now, title = COALESCE(title, :title) "
    'WHERE id = :id AND user_id = :uid AND NOT (messages @> CAST(\'[{"status": "streaming"}]\' AS jsonb)) '
    "RETURNING jsonb_array_length(messages)"
)
_SQLITE_APPEND_SQL = (
    "UPDATE chats SET messages = json_insert(json_insert(messages, '$[#]', json(:m1)), '$[#]', json(:m2)), "
    "message_count = message_count + 2, last_message_at = :now, updated_at = :now, title = COALESCE(title, :title) "
    "WHERE id = :id AND user_id = :uid AND NOT EXISTS "
    "(SELECT 1 FROM json_each(chats.messages) WHERE json_extract(value, '$.status') = 'streaming') "
    "RETURNING json_array_length(messages)"
)
# Merge `patch` into element `idx`, guarded by its id (and, for checkpoints and recovery, its status).
_PG_PATCH = (
    "UPDATE chats SET messages = jsonb_set(messages, ARRAY[CAST(:idx_s AS text)], "
    "(messages -> CAST(:idx AS integer)) || CAST(:patch AS jsonb)){touch} "
    "WHERE id = :id AND messages -> CAST(:idx AS integer) ->> 'id' = :mid{streaming}"
)
_SQLITE_PATCH = (
    "UPDATE chats SET messages = json_set(messages, '$[' || :idx || ']', "
    "json_patch(json_extract(messages, '$[' || :idx || ']'), json(:patch))){touch} "
    "WHERE id = :id AND json_extract(messages, '$[' || :idx || '].id') = :mid{streaming}"
)
_PG_STREAMING = " AND messages -> CAST(:idx AS integer) ->> 'status' = 'streaming'"
_SQLITE_STREAMING = " AND json_extract(messages, '$[' || :idx || '].status') = 'streaming'"
_TOUCH = ", updated_at = :now, last_message_at = :now"


def _typed(statement: str) -> TextClause:
    """A text() statement built once, with the types of the parameters it uses (`:now`, `:id`, `:uid`)."""
    types: dict[str, TypeEngine[Any]] = {"now": UTCDateTime(), "id": Uuid(), "uid": Uuid()}
    used = set(re.findall(r":(\w+)", statement))
    return text(statement).bindparams(*(bindparam(name, type_=type_) for name, type_ in types.items() if name in used))


_PG_APPEND = _typed(_PG_APPEND_SQL)
_SQLITE_APPEND = _typed(_SQLITE_APPEND_SQL)


@functools.cache
def _patch_statement(postgres: bool, only_streaming: bool, touch: bool) -> TextClause:
    """Each variant of the element patch is built once (not one `text()` per write)."""
    template = _PG_PATCH if postgres else _SQLITE_PATCH
    streaming = (_PG_STREAMING if postgres else _SQLITE_STREAMING) if only_streaming else ""
    return _typed(template.format(touch=_TOUCH if touch else "", streaming=streaming))


#: The caller's own chat (the 404 rule of `get_owned_chat`) with what its agent needs, in one round trip.
_CHAT_AND_AGENT: Select[Any, Any] = (
    select(
        Chat.messages,
        Agent.id.label("agent_id"),
        Agent.team_id.label("agent_team_id"),
        Agent.is_active,
        Agent.webhook_url,
        Agent.webhook_headers_encrypted,
        Agent.system_prompt,
        Agent.config,
    )
    .join(Agent, Agent.id == Chat.agent_id)
    .where(*OWNED_CHAT)
)


@dataclass(slots=True)
class NewGeneration:
    """Everything the generation task needs, captured while the request still had its session."""

    chat_id: uuid.UUID
    team_id: uuid.UUID
    user_id: uuid.UUID
    agent_id: uuid.UUID
    index: int
    assistant_id: str
    user_message: dict[str, Any]
    webhook_url: str
    webhook_headers_encrypted: str | None
    payload: dict[str, Any]
    #: When the user message was stored; the assistant message is stamped later, when generation starts.
    created_at: datetime
    assistant_created_at: str | None = None

    def stamp_assistant(self) -> None:
        """The generation starts now: the assistant message's `created_at`, strictly after the user's."""
        started = max(utcnow(), self.created_at + timedelta(microseconds=1))
        self.assistant_created_at = format_timestamp(started)

    def take_payload(self) -> dict[str, Any]:
        """The request body for n8n, handed over once (a long history is not kept for the whole stream)."""
        payload, self.payload = self.payload, {}
        return payload


def public_message(element: dict[str, Any]) -> dict[str, Any]:
    """A stored element as the API's Message: through `MessageRead`, the schema REST answers with, so the
    stream's start/done messages have the same keys (unset ones null) and timestamps (`...Z`) as REST."""
    return MessageRead.model_validate(element).model_dump(mode="json")


def build_history(messages: list[dict[str, Any]], latest: str, settings: Settings) -> list[dict[str, str]]:
    """The prior conversation sent to n8n: finished messages with text, newest first within both budgets."""
    budget_messages = settings.N8N_HISTORY_MAX_MESSAGES - 1
    budget_bytes = settings.N8N_HISTORY_MAX_BYTES - len(latest.encode())
    kept: list[dict[str, str]] = []
    for element in reversed(messages):
        if budget_messages <= 0:
            break
        content = element.get("content")
        if element.get("status") == "streaming" or not isinstance(content, str) or not content:
            continue
        if element.get("role") not in ("user", "assistant"):
            continue
        size = len(content.encode())
        if size > budget_bytes:
            break
        budget_bytes -= size
        budget_messages -= 1
        kept.append({"role": str(element["role"]), "content": content})
    kept.reverse()
    kept.append({"role": "user", "content": latest})
    return kept


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def start_message(
    *, session: AsyncSession, settings: Settings, user: Caller, chat_id: uuid.UUID, content: str, worker_id: uuid.UUID
) -> NewGeneration:
    """Check everything a stream needs, then append [user message, assistant placeholder] in one UPDATE.

    Raises 422 (empty / too long), 404 (not the caller's chat), 409 (agent inactive, generation running).
    Commits, so the request's connection goes back to the pool before n8n is called.
    """
    if not content.strip():
        raise Unprocessable(EMPTY_CONTENT)
    # NUL and lone surrogates never get here: every request body refuses them (app.schemas.InputModel).
    if len(content) > settings.MESSAGE_MAX_CHARS:
        raise Unprocessable(f"Message content must be at most {settings.MESSAGE_MAX_CHARS} characters")
    row = (await execute_core(session, _CHAT_AND_AGENT, owned_chat_params(chat_id, user.id, user.team_id))).first()
    if row is None:
        raise NotFound(CHAT_NOT_FOUND)
    if not row.is_active or row.agent_team_id != user.team_id:
        raise Conflict(AGENT_INACTIVE)
    prior = list(row.messages or [])
    if any(isinstance(m, dict) and m.get("status") == "streaming" for m in prior):
        raise Conflict(GENERATION_RUNNING)

    now = utcnow()
    stamp = format_timestamp(now)
    user_message = {
        "id": str(uuid.uuid4()),
        "role": "user",
        "content": content,
        "status": "complete",
        "created_at": stamp,
    }
    assistant_id = str(uuid.uuid4())
    placeholder = {
        "id": assistant_id,
        "role": "assistant",
        "content": "",
        "status": "streaming",
        "created_at": stamp,
        "_worker": str(worker_id),
    }
    params: dict[str, Any] = {"now": now, "title": title_from_message(content), "id": chat_id, "uid": user.id}
    if _is_postgres(session):
        statement = _PG_APPEND
        params["new"] = json.dumps([user_message, placeholder])
    else:
        statement = _SQLITE_APPEND
        params["m1"] = json.dumps(user_message)
        params["m2"] = json.dumps(placeholder)
    length = (await execute_core(session, statement, params)).scalar_one_or_none()
    if length is None:
        await session.rollback()
        raise Conflict(GENERATION_RUNNING)
    await session.commit()

    payload = {
        "messages": build_history(prior, content, settings),
        "system_prompt": row.system_prompt or "",
        "config": row.config or {},
        "chatInput": content,
        "sessionId": str(chat_id),
        "metadata": {
            "chat_id": str(chat_id),
            "agent_id": str(row.agent_id),
            "user_id": str(user.id),
            "team_id": str(user.team_id),
            "message_id": assistant_id,
        },
    }
    return NewGeneration(
        chat_id=chat_id,
        team_id=user.team_id,
        user_id=user.id,
        agent_id=row.agent_id,
        index=int(length) - 1,
        assistant_id=assistant_id,
        user_message=public_message(user_message),
        webhook_url=row.webhook_url,
        webhook_headers_encrypted=row.webhook_headers_encrypted,
        payload=payload,
        created_at=now,
    )


async def _patch_message(
    session: AsyncSession,
    *,
    chat_id: uuid.UUID,
    index: int,
    message_id: str,
    patch: dict[str, Any],
    only_streaming: bool,
    touch: bool,
) -> bool:
    """Merge `patch` into one element in SQL; False when the guard did not match (no write happened)."""
    postgres = _is_postgres(session)
    params: dict[str, Any] = {"id": chat_id, "mid": message_id, "patch": json.dumps(patch), "idx": index}
    if postgres:
        params["idx_s"] = str(index)
    if touch:
        params["now"] = utcnow()
    result = await execute_core(session, _patch_statement(postgres, only_streaming, touch), params)
    return bool(getattr(result, "rowcount", 0))


async def checkpoint_message(*, session: AsyncSession, settings: Settings, new: NewGeneration, content: str) -> bool:
    """Save the partial text of a still-streaming answer (so a crash loses at most one interval)."""
    patch: dict[str, Any] = {"content": content}
    if new.assistant_created_at is not None:
        patch["created_at"] = new.assistant_created_at
    written = await _patch_message(
        session,
        chat_id=new.chat_id,
        index=new.index,
        message_id=new.assistant_id,
        patch=patch,
        only_streaming=True,
        touch=False,
    )
    await session.commit()
    return written


async def finish_message(
    *,
    session: AsyncSession,
    settings: Settings,
    new: NewGeneration,
    content: str,
    status: str,
    error: dict[str, str] | None,
    metadata: dict[str, Any],
    failure_detail: dict[str, Any] | None,
    upstream_status: int | None,
) -> dict[str, Any]:
    """The one final write of an answer, plus its error_logs row on failure, in one transaction."""
    if new.assistant_created_at is None:
        new.stamp_assistant()
    patch: dict[str, Any] = {
        "content": content,
        "status": status,
        "metadata": metadata,
        "created_at": new.assistant_created_at,
    }
    if error is not None:
        patch["error"] = error
    written = await _patch_message(
        session,
        chat_id=new.chat_id,
        index=new.index,
        message_id=new.assistant_id,
        patch=patch,
        only_streaming=False,
        touch=True,
    )
    if error is not None:
        detail = dict(failure_detail or {})
        if not written:
            detail["stored"] = False
        await error_logs.record_error(
            session=session,
            team_id=new.team_id,
            user_id=new.user_id,
            chat_id=new.chat_id,
            agent_id=new.agent_id,
            code=error["code"],
            message=error["message"],
            upstream_status=upstream_status,
            detail=detail,
        )
    await session.commit()
    return public_message({"id": new.assistant_id, "role": "assistant", **patch})
