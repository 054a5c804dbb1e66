"""Chat imports: a body in the export format (one JSON chat, or JSON Lines) checked whole, then stored in one
transaction, or nothing at all (docs/SHARING.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.errors import RateLimited, Unprocessable, UnsupportedMediaType, short_loc
from app.filetypes import clean_filename
from app.models import Agent, Chat, User
from app.services.chat_copies import CopiedFile, CopiedMessage, create_chat_copy
from app.services.messages import INTERRUPTED
from app.share_schemas import ExportedChat, ExportedFeedback, ExportedMessage

logger = logging.getLogger(__name__)

IMPORT_BUSY = "Too many imports are running; try again in a few seconds"
IMPORT_BUSY_RETRY_SECONDS = "5"
NOT_AN_EXPORT = "The body must be an exported chat (JSON) or exported chats (JSON Lines)"
EMPTY_IMPORT = "The body holds no chat"
#: Media types of an import: one exported chat, or JSON Lines (a form or plain text is refused).
IMPORT_TYPES = ("application/json", "application/x-ndjson", "application/jsonl")
IMPORT_TYPES_ONLY = "Send an export as application/json, application/x-ndjson or application/jsonl"
#: pydantic messages that quote a piece of the input, replaced by their input-free first sentence.
_INPUT_FREE = {"uuid_parsing": "Input should be a valid UUID"}


class ImportGate:
    """How many imports one server process reads at once, at most one per user (the body cap bounds each):
    memory stays below IMPORT_MAX_CONCURRENT x IMPORT_MAX_BODY_BYTES whatever clients do. More: 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.users: set[uuid.UUID] = set()

    @contextmanager
    def slot(self, user_id: uuid.UUID) -> Iterator[None]:
        if user_id in self.users or len(self.users) >= self.limit:
            raise RateLimited(IMPORT_BUSY, headers={"Retry-After": IMPORT_BUSY_RETRY_SECONDS})
        self.users.add(user_id)
        try:
            yield
        finally:
            self.users.discard(user_id)


def check_import_type(content_type: str | None) -> None:
    """Only JSON types: a browser form cannot send them cross-site without a CORS preflight."""
    if (content_type or "").split(";")[0].strip().lower() not in IMPORT_TYPES:
        raise UnsupportedMediaType(IMPORT_TYPES_ONLY)


def _documents(body: bytes) -> list[Any]:
    """The body's JSON values: the whole body when it is one JSON value, else one per non-blank line."""
    try:
        text = body.decode("utf-8-sig")  # an export re-saved by an editor may start with a byte order mark
    except UnicodeDecodeError:
        raise Unprocessable("The body must be UTF-8") from None
    if not text.strip():
        raise Unprocessable(EMPTY_IMPORT)
    try:
        return [json.loads(text)]
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        pass
    documents = []
    # JSON Lines are separated by "\n" only: `str.splitlines` would also split at U+2028, U+2029 or U+0085,
    # which JSON leaves raw inside strings (the export writes them so).
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            documents.append(json.loads(line))
        except (ValueError, RecursionError):
            raise Unprocessable(f"Line {number} is not valid JSON", loc=("body", number)) from None
    return documents


def _first_error(index: int, exc: ValidationError) -> Unprocessable:
    error = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    message = _INPUT_FREE.get(error["type"], error["msg"])
    return Unprocessable(f"Chat {index + 1}: {message}", loc=("body", index, *short_loc(error["loc"])))


def _feedback(feedback: ExportedFeedback | None) -> dict[str, Any] | None:
    """Feedback as stored (as a rating stores it); a null rating without a comment is no feedback."""
    if feedback is None:
        return None
    comment = (feedback.comment or "").strip() or None
    if feedback.rating is None and comment is None:
        return None
    updated = feedback.updated_at or utcnow()
    return {"rating": feedback.rating, "comment": comment, "updated_at": updated.isoformat()}


@dataclass(frozen=True)
class ImportLimits:
    """What one import may hold (chats and messages, all its chats together), and how long its messages may
    be: a question what a send accepts (MESSAGE_MAX_CHARS), since regenerating an imported answer sends it to
    n8n again; an answer what n8n may send (N8N_MAX_RESPONSE_BYTES bytes hold at most as many characters), so
    every export of a stored answer imports again."""

    chats: int
    messages: int
    question_chars: int
    answer_chars: int

    @classmethod
    def of(cls, settings: Settings) -> ImportLimits:
        return cls(
            chats=settings.IMPORT_MAX_CHATS,
            messages=settings.IMPORT_MAX_MESSAGES,
            question_chars=settings.MESSAGE_MAX_CHARS,
            answer_chars=settings.N8N_MAX_RESPONSE_BYTES,
        )


@dataclass(frozen=True)
class _Plan:
    """One checked chat, ready to store."""

    chat: ExportedChat
    messages: list[CopiedMessage]
    current_key: uuid.UUID | None


def _path(parents: dict[uuid.UUID, uuid.UUID | None], leaf: uuid.UUID) -> list[uuid.UUID]:
    path: list[uuid.UUID] = []
    node: uuid.UUID | None = leaf
    while node is not None:
        path.append(node)
        node = parents[node]
    path.reverse()
    return path


def _stored_as(m: ExportedMessage, limits: ImportLimits) -> tuple[str, str] | None:
    """Why no chat of this service could hold `m` (the problem and its field), or None. A user message is as a
    send stores it: complete, without error or metadata, a text the send takes (regenerating its answer sends
    it to n8n again). An answer is no longer than n8n may send, and has an error when, and only when, it
    did not complete."""
    if m.role == "assistant":
        if len(m.content) > limits.answer_chars:
            return f"an answer must be at most {limits.answer_chars} characters (N8N_MAX_RESPONSE_BYTES)", "content"
        # The service stores an error on `error` and `interrupted` answers only (an interrupted one without is
        # given INTERRUPTED: older exports wrote a message still streaming so).
        if m.status in ("complete", "cancelled") and m.error is not None:
            return "a complete or cancelled answer has no error", "error"
        if m.status == "error" and m.error is None:
            return "a failed answer must have its error", "error"
        return None
    if m.status != "complete":
        return "a user message's status must be complete", "status"
    if m.error is not None:
        return "a user message has no error", "error"
    if m.metadata is not None:
        return "a user message has no metadata", "metadata"
    if not m.content.strip():
        return "a user message must not be empty", "content"
    if len(m.content) > limits.question_chars:
        return f"a user message must be at most {limits.question_chars} characters (MESSAGE_MAX_CHARS)", "content"
    return None


def _plan(index: int, chat: ExportedChat, limits: ImportLimits) -> _Plan:
    """Check one chat's tree: unique ids, each parent an earlier message of the same chat, roles alternating
    from a user message, every user message answered and as a send stores one (complete, no error or metadata,
    a text it takes), no answer still streaming or too long, feedback on answers only, a current message of
    the chat."""

    def refuse(message: str, *loc: str | int) -> Unprocessable:
        return Unprocessable(f"Chat {index + 1}: {message}", loc=("body", index, *loc))

    parents: dict[uuid.UUID, uuid.UUID | None] = {}
    roles: dict[uuid.UUID, str] = {}
    newest_child: dict[uuid.UUID, uuid.UUID] = {}
    copied: list[CopiedMessage] = []
    for j, m in enumerate(chat.messages):
        if m.id in parents:
            raise refuse("this message id is used twice", "messages", j, "id")
        if m.parent_id is None:
            if m.role != "user":
                raise refuse("a first message must be a user message", "messages", j, "role")
        elif m.parent_id not in parents:
            raise refuse("parent_id is not an earlier message of this chat", "messages", j, "parent_id")
        elif roles[m.parent_id] == m.role:
            raise refuse("a message must not have the role of its parent", "messages", j, "role")
        problem = _stored_as(m, limits)
        if problem is not None:
            raise refuse(problem[0], "messages", j, problem[1])
        if m.status == "streaming":
            raise refuse("an answer still streaming cannot be imported", "messages", j, "status")
        if m.feedback is not None and m.role != "assistant":
            raise refuse("feedback is for assistant messages only", "messages", j, "feedback")
        if m.files and m.role != "user":
            raise refuse("files are for user messages only", "messages", j, "files")
        parents[m.id] = m.parent_id
        roles[m.id] = m.role
        if m.parent_id is not None:
            newest_child[m.parent_id] = m.id  # later in the list = newer
        copied.append(
            CopiedMessage(
                key=m.id,
                parent_key=m.parent_id,
                role=m.role,
                content=m.content,
                status=m.status,
                error=m.error.model_dump() if m.error else INTERRUPTED if m.status == "interrupted" else None,
                metadata=m.metadata,
                feedback=_feedback(m.feedback),
                files=tuple(
                    CopiedFile(None, clean_filename(f.filename), f.content_type, f.size, f.sha256) for f in m.files
                ),  # metadata only: no file row, nothing to download
            )
        )
    # Every question has an answer (a send stores both at once, so every export has one): a question without
    # one could be shown, and the next send would then follow it with a second question, which n8n would get
    # as history and which no import would take back.
    for j, m in enumerate(chat.messages):
        if m.role == "user" and m.id not in newest_child:
            raise refuse("a user message must have an answer", "messages", j, "id")
    current = chat.current_message_id
    if (current is None) != (not copied) or (current is not None and current not in parents):
        raise refuse("current_message_id is not a message of this chat", "current_message_id")
    if current is not None and chat.current_branch is not None and chat.current_branch != _path(parents, current):
        raise refuse("current_branch is not the path to current_message_id", "current_branch")
    # Like switching branches: a message that is not a leaf shows its newest descendants.
    while current is not None and current in newest_child:
        current = newest_child[current]
    return _Plan(chat=chat, messages=copied, current_key=current)


def too_many_chats(limit: int) -> str:
    return f"An import holds at most {limit} chats; split the file"


def too_many_messages(limit: int) -> str:
    return f"An import holds at most {limit} messages; split the file"


def parse_import(body: bytes, limits: ImportLimits) -> list[_Plan]:
    """Every chat of the body, checked; the first problem is a 422 naming the chat (its position) and field.
    CPU-bound (up to seconds for a large body): run it in a thread. The caps are checked first, on the raw
    documents, before any of them is validated."""
    documents = _documents(body)
    if len(documents) > limits.chats:
        raise Unprocessable(too_many_chats(limits.chats), loc=("body",))
    messages = sum(len(d["messages"]) for d in documents if isinstance(d, dict) and isinstance(d.get("messages"), list))
    if messages > limits.messages:
        raise Unprocessable(too_many_messages(limits.messages), loc=("body",))
    plans = []
    for index, document in enumerate(documents):
        try:
            chat = ExportedChat.model_validate(document)
        except ValidationError as exc:
            raise _first_error(index, exc) from None
        plans.append(_plan(index, chat, limits))
    if not plans:
        raise Unprocessable(EMPTY_IMPORT)
    return plans


async def import_chats(*, session: AsyncSession, user: User, body: bytes, limits: ImportLimits) -> list[Chat]:
    """Store every chat of the body as a new chat of the caller, or none: one transaction, after every chat
    was checked and every agent found. Agents are matched by slug in the caller's team (inactive ones too:
    the history is kept, as for any chat of an inactive agent); a slug the team lacks is a 422 naming it.
    The body is checked in a worker thread: seconds of parsing on the event loop stalled every stream."""
    plans = await asyncio.to_thread(parse_import, body, limits)
    slugs = {plan.chat.agent.slug for plan in plans}
    query = select(Agent.slug, Agent.id).where(Agent.team_id == user.team_id, Agent.slug.in_(slugs))
    agents: dict[str, uuid.UUID] = {slug: agent_id for slug, agent_id in (await session.execute(query)).all()}
    for index, plan in enumerate(plans):
        if plan.chat.agent.slug not in agents:
            raise Unprocessable(
                f"Chat {index + 1}: no agent with slug '{plan.chat.agent.slug}' in your team",
                loc=("body", index, "agent", "slug"),
            )
    chats = [
        await create_chat_copy(
            session,
            user=user,
            agent_id=agents[plan.chat.agent.slug],
            title=(plan.chat.title or "").strip() or None,
            messages=plan.messages,
            current_key=plan.current_key,
            archived=plan.chat.archived,
            pinned=plan.chat.pinned,
        )
        for plan in plans
    ]
    await session.commit()
    logger.info("%d chats imported (%d messages)", len(chats), sum(len(p.messages) for p in plans))
    return chats
