"""Chat messages in SQL: the atomic append that starts a generation, checkpoints, the final write.

Every write changes the `messages` JSON array in place with one conditional UPDATE (never a read-modify-
write in Python), so concurrent sends, checkpoints and recovery can never lose or duplicate a message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat_schemas import format_timestamp
from app.config import Settings
from app.db import execute_core, utcnow
from app.dialects import statements_of
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Agent, Chat
from app.schemas import MessageRead
from app.security import Caller
from app.services import error_logs
from app.services import usage as usage_service
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, owned_chat_params, title_from_message

GENERATION_RUNNING = "A generation is already running in this chat"
AGENT_INACTIVE = "This chat's agent is no longer active"
EMPTY_CONTENT = "Message content must not be empty"

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


async def start_message(
    *, session: AsyncSession, settings: Settings, user: Caller, chat_id: uuid.UUID, content: str, worker_id: uuid.UUID
) -> NewGeneration:
    """Check everything a stream needs, then append [user message, assistant placeholder] in one UPDATE.

    Raises 422 (empty / too long), 404 (not the caller's chat), 409 (agent inactive, generation running).
    Commits, so the request's connection goes back to the pool before n8n is called.
    """
    if not content.strip():
        raise Unprocessable(EMPTY_CONTENT)
    # NUL and lone surrogates never get here: every request body refuses them (app.fields.InputModel).
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
    # Usage hook (app.services.usage): the daily quota, counted before anything is stored (429 past it).
    claimed = await usage_service.claim_generation(session=session, user=user)
    statement, params = statements_of(session).append(user_message, placeholder)
    params.update(now=now, title=title_from_message(content), id=chat_id, uid=user.id)
    length = (await execute_core(session, statement, params)).scalar_one_or_none()
    if length is None:
        await session.rollback()
        if claimed is not None:  # usage hook: a refused send does not count
            await usage_service.release_generation(session=session, user=user, day=claimed)
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


async def patch_message(
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
    statement, params = statements_of(session).patch(index=index, only_streaming=only_streaming, touch=touch)
    params.update(id=chat_id, mid=message_id, patch=json.dumps(patch))
    if touch:
        params["now"] = utcnow()
    result = await execute_core(session, statement, params)
    return bool(getattr(result, "rowcount", 0))


async def checkpoint_message(*, session: AsyncSession, new: NewGeneration, content: str) -> bool:
    """Save the partial text of a still-streaming answer (so a crash loses at most one interval)."""
    patch: dict[str, Any] = {"content": content}
    if new.assistant_created_at is not None:
        patch["created_at"] = new.assistant_created_at
    written = await patch_message(
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
    new: NewGeneration,
    content: str,
    status: str,
    error: dict[str, str] | None,
    metadata: dict[str, Any],
    failure_detail: dict[str, Any] | None,
    upstream_status: int | None,
) -> dict[str, Any]:
    """The one final write of an answer, plus its error_logs row on failure and its usage ledger row, in one
    transaction."""
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
    written = await patch_message(
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
    # Usage hook (app.services.usage): the generation's ledger row, in this same transaction.
    await usage_service.record_generation(
        session=session,
        team_id=new.team_id,
        user_id=new.user_id,
        agent_id=new.agent_id,
        chat_id=new.chat_id,
        outcome=status,
        error_code=None if error is None else error["code"],
        chars_in=len(str(new.user_message.get("content") or "")),
        chars_out=len(content),
        metadata=metadata,
    )
    await session.commit()
    return public_message({"id": new.assistant_id, "role": "assistant", **patch})


async def get_public_messages(
    session: AsyncSession, chat_id: uuid.UUID, ids: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """The chat's stored messages as the API shows them (those named by `ids` only, when given), oldest first.

    No ownership check: callers check the chat first. Used to rebuild a stream from what is stored.
    """
    stored = (await session.execute(select(Chat.messages).where(Chat.id == chat_id))).scalar_one_or_none()
    wanted = None if ids is None else set(ids)
    return [
        public_message(m) for m in stored or [] if isinstance(m, dict) and (wanted is None or m.get("id") in wanted)
    ]
