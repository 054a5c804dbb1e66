"""The OpenAI-compatible API's side of a generation: the team's agents as models, and one stateless
completion run through the same n8n client, timeouts, caps and parser as a chat's answer.

Nothing is stored but the usage ledger row: no chat, no message.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import callbacks, metrics
from app.config import Settings
from app.crypto import DecryptionError, decrypt_headers
from app.db import Database
from app.errors import BadRequest, NotFound, Unprocessable
from app.fields import check_session_id
from app.models import Agent
from app.n8n_parser import StreamFailure, clean_text
from app.security import Caller
from app.services.error_logs import record_error
from app.services.messages import build_history
from app.services.usage import claim_generation, record_generation
from app.upstream import StreamStats

logger = logging.getLogger(__name__)

INTERRUPTED_CODE = "interrupted"
INTERRUPTED = "The server stopped before the answer was complete"
NO_USER_MESSAGE = "The last message must be a user message with text (only system or developer messages may follow it)"


def model_not_found(model: str) -> NotFound:
    return NotFound(
        f"The model '{model[:100]}' does not exist or you do not have access to it", openai_code="model_not_found"
    )


#: An agent in callback mode answers by posting to the completion's callback URL (app.callbacks), which only
#: exists with PUBLIC_BASE_URL; n8n's own HTTP answer ("Workflow was started") is never the reply.
CALLBACK_AGENT = (
    "The model '{model}' answers by callback, and this server has no public address (PUBLIC_BASE_URL) for its "
    "workflow to post to"
)


async def list_models(*, session: AsyncSession, user: Caller, slug: str | None = None) -> list[tuple[str, datetime]]:
    """(slug, created_at) of the team's active agents, by slug; only the one named `slug` when given."""
    query = (
        select(Agent.slug, Agent.created_at)
        .where(Agent.team_id == user.team_id, Agent.is_active.is_(True))
        .order_by(Agent.slug)
    )
    if slug is not None:
        query = query.where(Agent.slug == slug)
    rows = (await session.execute(query)).all()
    await session.commit()
    return [(row.slug, row.created_at) for row in rows]


#: Content parts that carry text: an assistant turn's `refusal` part is skipped like any turn without text.
TEXT_PARTS = frozenset({"text", "refusal"})
#: Roles whose content is all the message is: a string or a list of `text` parts, as OpenAI's types say (an
#: assistant turn may be only tool calls, with no content, or carry `refusal` parts).
TEXT_ROLES = frozenset({"system", "developer", "user"})
NON_TEXT_CONTENT = (
    "Only text content is supported: image, audio, file and other non-text parts cannot be sent to the agent"
)
NO_TEXT = "A {role} message must have text content: a string or a list of text parts"
TEXT_NOT_STRING = "Each text part must have its text as a string"


def _named(value: Any, names: frozenset[str]) -> bool:
    """Whether `value` is one of `names`: False for anything but a string (unhashable JSON included)."""
    return isinstance(value, str) and value in names


def _is_text(content: Any) -> bool:
    """A string, or a non-empty list of `text` parts each with a string `text`."""
    if isinstance(content, str):
        return True
    return (
        isinstance(content, list)
        and bool(content)
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
    )


def check_content(messages: list[dict[str, Any]]) -> None:
    """422 naming the message (`messages.<index>.content`) for content that would not reach the agent as sent:
    an image, audio, file or unknown part (the agent would answer about a picture it never saw), a system,
    developer or user message without text (an instruction or question silently left out), a text part whose
    text is not a string. Nothing of a request is dropped without the caller knowing."""
    for index, message in enumerate(messages):
        content, role = message.get("content"), message.get("role")
        loc = ("body", "messages", index, "content")
        parts = content if isinstance(content, list) else []
        # Looked up only as strings: a list or an object (JSON the caller chose) is no key of a set.
        if any(not isinstance(part, dict) or not _named(part.get("type"), TEXT_PARTS) for part in parts):
            raise Unprocessable(NON_TEXT_CONTENT, loc=loc)
        if _named(role, TEXT_ROLES) and not _is_text(content):
            raise Unprocessable(NO_TEXT.format(role=role), loc=loc)
        if any(part["type"] == "text" and not isinstance(part.get("text"), str) for part in parts):
            raise Unprocessable(TEXT_NOT_STRING, loc=loc)


def message_text(content: Any) -> str | None:
    """OpenAI's content: a string, or a list of parts of which the `text` ones count; None when neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "\n".join(t for t in texts if isinstance(t, str))
    return None


@dataclass
class Completion:
    """One completion, checked and claimed against the quota, ready to call n8n."""

    id: str
    created: int
    model: str
    team_id: uuid.UUID
    user_id: uuid.UUID
    agent_id: uuid.UUID
    webhook_url: str
    webhook_headers_encrypted: str | None
    payload: dict[str, Any]
    chars_in: int
    chunks: list[str] = field(default_factory=list)
    usage: tuple[int, int] | None = None
    #: The id its callback URL is signed for (None without PUBLIC_BASE_URL: no URL, no callbacks), and whether
    #: the agent answers by callback only (`response_mode: "callback"`).
    callback_id: str | None = None
    callback_mode: bool = False
    #: Set as `run_completion` starts: a task cancelled before its first step never ran it (app.routers.openai_api
    #: `Run`), and nothing of it (its usage row) was written.
    started: bool = False


def session_id_for(user: Caller, header: str | None) -> str:
    """n8n's memory key: per user and client-chosen id, else a fresh one, so no one reaches another's memory."""
    if header is None:
        return f"v1:{uuid.uuid4()}"
    try:
        check_session_id(header)
    except ValueError as exc:  # the rule the chat widget's `sessionId` follows too
        raise Unprocessable(str(exc), loc=("header", "X-Session-Id")) from None
    return f"v1:{user.id}:{header}"


async def prepare_completion(
    *,
    session: AsyncSession,
    settings: Settings,
    user: Caller,
    model: str,
    messages: list[dict[str, Any]],
    session_header: str | None,
) -> Completion:
    """Check the request, find the agent (the team's active one with that slug, else 404) and claim the
    quota, in this order, so a refused request counts nothing; the session's transaction is over on return."""
    check_content(messages)
    system_parts: list[str] = []
    prior: list[dict[str, Any]] = []
    # Whether the last message that is not an instruction is a user one with text: a final image-only
    # question or tool result must not leave an earlier question to be answered (and run) again in its place.
    asks = False
    asked_at = 0  # the index of that question, named when it is too long
    for index, message in enumerate(messages):
        text = message_text(message.get("content"))
        role = message.get("role")
        if role in ("system", "developer"):
            if text:
                system_parts.append(text)
            continue
        asks, asked_at = role == "user" and text is not None and bool(text.strip()), index
        if role in ("user", "assistant") and text is not None:
            prior.append({"role": role, "content": text, "status": "complete"})
    if not asks:
        raise Unprocessable(NO_USER_MESSAGE, loc=("body", "messages"))
    latest = prior.pop()["content"]
    if len(latest) > settings.MESSAGE_MAX_CHARS:
        raise Unprocessable(
            f"A user message must be at most {settings.MESSAGE_MAX_CHARS} characters",
            loc=("body", "messages", asked_at, "content"),
        )
    session_id = session_id_for(user, session_header)
    query = select(Agent).where(Agent.team_id == user.team_id, Agent.slug == model, Agent.is_active.is_(True))
    agent = (await session.execute(query)).scalar_one_or_none()
    if agent is None:
        await session.commit()
        raise model_not_found(model)
    callback_mode = agent.response_mode == "callback"
    if callback_mode and settings.PUBLIC_BASE_URL is None:
        await session.commit()
        raise BadRequest(CALLBACK_AGENT.format(model=agent.slug), openai_code="model_not_supported")
    await claim_generation(session=session, user=user)
    # The request's reads end here (claim_generation commits only for a team with a quota): a completion that
    # is not streamed keeps its request session until n8n has answered, minutes perhaps, and must not hold a
    # pooled connection idle in its transaction all that time.
    await session.commit()
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    # As for a chat's generation: a callback URL whenever n8n can reach this service (progress, `done` early,
    # or in callback mode the whole answer), signed for an id of its own (the URL carries a UUID).
    callback_id = str(uuid.uuid4()) if settings.PUBLIC_BASE_URL is not None else None
    system_prompt = "\n\n".join([*system_parts, *([agent.system_prompt] if agent.system_prompt else [])])
    payload = {
        "messages": build_history(prior, latest, settings),
        "system_prompt": system_prompt,
        "config": agent.config or {},
        "chatInput": latest,
        "sessionId": session_id,
        "metadata": {
            "agent_id": str(agent.id),
            "user_id": str(user.id),
            "team_id": str(user.team_id),
            "completion_id": completion_id,
            "source": "openai",
        },
    }
    if callback_id is not None:
        payload["metadata"]["callback_url"] = callbacks.callback_url(settings, callback_id)
    return Completion(
        id=completion_id,
        created=int(time.time()),
        model=agent.slug,
        team_id=user.team_id,
        user_id=user.id,
        agent_id=agent.id,
        webhook_url=agent.webhook_url,
        webhook_headers_encrypted=agent.webhook_headers_encrypted,
        payload=payload,
        chars_in=len(latest),
        callback_id=callback_id,
        callback_mode=callback_mode,
    )


async def run_completion(
    *,
    call_agent: Callable[..., Awaitable[None]],
    db: Database,
    settings: Settings,
    completion: Completion,
    on_chunks: Callable[[list[str]], None] | None = None,
    interrupted: Callable[[], bool] = lambda: False,
    cut: bool = False,
) -> StreamFailure | None:
    """Call the agent with `call_agent` (app.streaming's `N8nStreamer.run`: this layer imports no web code),
    collecting its text in `completion.chunks` (and handing each batch to `on_chunks`);
    write the usage row, and for a failure its error-log row; return the failure, if any.

    A cancelled run is recorded as `cancelled` (the client left) before the cancellation goes on, unless
    `interrupted()` says the cancel is the shutdown's (GenerationRegistry.interrupting): then the run ends
    as the failure `interrupted`, returned so that the client still gets its terminal answer. `cut`: run again
    for a task cancelled before its first step: call no one and end as that cancel says, `cancelled` (its client
    left as it began) or, while the registry interrupts, `interrupted` (as a chat's generation run again does)."""
    completion.started = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    stats = StreamStats()

    def collect(chunks: list[str]) -> None:
        cleaned = [clean_text(c) for c in chunks]
        completion.chunks.extend(cleaned)
        if on_chunks is not None:
            on_chunks(cleaned)

    failure: StreamFailure | None = None
    outcome = "complete"
    try:
        if cut:
            raise asyncio.CancelledError
        try:
            headers = decrypt_headers(completion.webhook_headers_encrypted, settings.fernet)
        except DecryptionError:
            raise StreamFailure(
                "agent_misconfigured",
                "The agent's settings cannot be read; ask an admin to save its webhook headers again",
            ) from None
        if interrupted():  # started after the shutdown's grace ran out: call no one, end as interrupted
            raise asyncio.CancelledError
        await call_agent(
            url=completion.webhook_url, headers=headers, payload=completion.payload, on_chunks=collect, stats=stats
        )
    except StreamFailure as exc:
        failure, outcome = exc, "error"
    except asyncio.CancelledError:
        if not interrupted():
            outcome = "cancelled"
            await asyncio.shield(_record(db, completion, stats, outcome, None, loop.time() - started))
            raise
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        failure = StreamFailure(INTERRUPTED_CODE, INTERRUPTED, upstream_status=stats.upstream_status)
        outcome = "interrupted"
    except Exception as exc:
        logger.exception("completion %s failed", completion.id)
        failure = StreamFailure(
            "internal_error", "The answer could not be completed", detail={"error": type(exc).__name__}
        )
        outcome = "error"
    completion.usage = stats.usage
    await asyncio.shield(_record(db, completion, stats, outcome, failure, loop.time() - started))
    return failure


async def _record(
    db: Database,
    completion: Completion,
    stats: StreamStats,
    outcome: str,
    failure: StreamFailure | None,
    seconds: float,
) -> None:
    """The ledger row (no chat), and the metrics a chat's answer would count."""
    metadata = {
        "duration_ms": round(seconds * 1000, 1),
        "ttfc_ms": stats.ttfc_ms,
        "ttfb_ms": stats.ttfb_ms,
        "tokens_in": None if stats.usage is None else stats.usage[0],
        "tokens_out": None if stats.usage is None else stats.usage[1],
    }
    code = None if failure is None else failure.code
    try:
        async with db.sessionmaker() as session:
            if failure is not None:
                # The error log as for a chat's answer (no chat to name): the same transaction as the usage row.
                await record_error(
                    session=session,
                    team_id=completion.team_id,
                    user_id=completion.user_id,
                    chat_id=None,
                    agent_id=completion.agent_id,
                    code=failure.code,
                    message=failure.message,
                    upstream_status=failure.upstream_status,
                    detail={**failure.detail, "source": "openai", "completion_id": completion.id},
                )
            await record_generation(
                session=session,
                team_id=completion.team_id,
                user_id=completion.user_id,
                agent_id=completion.agent_id,
                chat_id=None,
                outcome=outcome,
                error_code=code,
                chars_in=completion.chars_in,
                chars_out=sum(len(c) for c in completion.chunks),
                metadata=metadata,
            )
            await session.commit()
    except Exception:
        logger.exception("usage row of completion %s failed", completion.id)
    metrics.generation_finished(
        outcome=outcome, agent_id=completion.agent_id, error_code=code, metadata=metadata, pool_in_use=db.pool_in_use()
    )
