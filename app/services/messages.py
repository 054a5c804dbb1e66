"""Chat messages in SQL: the transaction that starts a generation, checkpoints, the final write.

Messages are rows of `messages` (one per message, a tree by `parent_id`, app/services/tree.py reads it).
Starting a generation inserts the new rows and moves the chat's current leaf without reading or rewriting
the rest of the chat, so its cost does not depend on the chat's length; the partial unique index on
`streaming` rows makes "one generation per chat" hold across branches and server instances. A checkpoint
and the final write each update one row.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple

import anyio
from sqlalchemy import (
    Integer,
    Select,
    String,
    Text,
    TextualSelect,
    Update,
    Uuid,
    bindparam,
    case,
    exists,
    func,
    insert,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app import callbacks, metrics
from app.chat_schemas import format_timestamp
from app.config import Settings
from app.db import Database, Direct, execute_core, utcnow
from app.dialects import Statements, UTCDateTime, all_statements
from app.errors import Conflict, NotFound, Unprocessable
from app.models import IS_STREAMING, Agent, Chat, ErrorLog, Message
from app.schemas import MessageRead
from app.security import Caller
from app.services import error_logs, idempotency
from app.services import files as files_service
from app.services import usage as usage_service
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, owned_chat_params, title_from_message
from app.services.tree import NOT_IN_CHAT, message_view, stored_views

logger = logging.getLogger(__name__)

GENERATION_RUNNING = "A generation is already running in this chat"
AGENT_INACTIVE = "This chat's agent is no longer active"
EMPTY_CONTENT = "Message content must not be empty"

EDIT_NOT_USER = "edit_of must be a user message"
REGENERATE_NOT_ASSISTANT = "regenerate_of must be an assistant message"

_target = aliased(Message, name="target")
_question = aliased(Message, name="question")

#: The caller's own chat (the 404 rule of `get_owned_chat`) with what its agent needs, whether a generation
#: runs in it (the partial index on `streaming` rows answers), and the message named by `edit_of` or
#: `regenerate_of` (`:target`) with, for a regenerate, the question it answered: one round trip.
_CHAT_AND_AGENT: Select[Any, Any] = (
    select(
        Chat.current_message_id,
        Agent.id.label("agent_id"),
        Agent.team_id.label("agent_team_id"),
        Agent.is_active,
        Agent.webhook_url,
        Agent.webhook_headers_encrypted,
        Agent.system_prompt,
        Agent.config,
        Agent.response_mode,
        Agent.file_delivery,
        exists().where(Message.chat_id == Chat.id, IS_STREAMING).correlate(Chat).label("running"),
        _target.role.label("target_role"),
        _target.parent_id.label("target_parent_id"),
        _target.files.label("target_files"),
        _question.id.label("q_id"),
        _question.parent_id.label("q_parent_id"),
        _question.role.label("q_role"),
        _question.content.label("q_content"),
        _question.status.label("q_status"),
        _question.created_at.label("q_created_at"),
        _question.error.label("q_error"),
        _question.meta.label("q_metadata"),
        _question.feedback.label("q_feedback"),
        _question.files.label("q_files"),
    )
    .join(Agent, Agent.id == Chat.agent_id)
    .outerjoin(_target, (_target.id == bindparam("target", type_=Uuid())) & (_target.chat_id == Chat.id))
    .outerjoin(_question, (_question.id == _target.parent_id) & (_target.role == "assistant"))
    .where(*OWNED_CHAT)
)

#: In one round trip after the insert: the branch above the new question (`:start` and its ancestors, at
#: most `:depth` + 1, kind `h`: what n8n gets) and the children of the question's parent and of the question
#: (`:p1`, `:p2`; `:root` for the chat's first messages; kind `c`: the new rows' siblings).
_HISTORY_AND_SIBLINGS: TextualSelect = (
    text(
        "WITH RECURSIVE up(id, parent_id, depth) AS ("
        " SELECT m.id, m.parent_id, 0 FROM messages m WHERE m.id = :start"
        " UNION ALL"
        " SELECT m.id, m.parent_id, u.depth + 1 FROM messages m JOIN up u ON m.id = u.parent_id"
        " WHERE u.depth < :depth"
        ") "
        "SELECT 'h' AS kind, m.id, m.parent_id, m.role, m.content, m.status, m.created_at, up.depth"
        " FROM up JOIN messages m ON m.id = up.id "
        "UNION ALL "
        # Three plain lookups (the parent index twice, the roots index), not one OR the planner may not split.
        "SELECT 'c', s.id, s.parent_id, NULL, NULL, NULL, s.created_at, NULL FROM messages s WHERE s.parent_id = :p1 "
        "UNION ALL "
        "SELECT 'c', s.id, s.parent_id, NULL, NULL, NULL, s.created_at, NULL FROM messages s WHERE s.parent_id = :p2 "
        "UNION ALL "
        "SELECT 'c', s.id, s.parent_id, NULL, NULL, NULL, s.created_at, NULL FROM messages s"
        " WHERE s.chat_id = :cid AND s.parent_id IS NULL AND :root = 1"
    )
    .bindparams(*(bindparam(name, type_=Uuid()) for name in ("start", "cid", "p1", "p2")))
    .columns(
        kind=String(),
        id=Uuid(),
        parent_id=Uuid(),
        role=String(),
        content=Text(),
        status=String(),
        created_at=UTCDateTime(),
        depth=Integer(),
    )
)

#: Prebuilt (docs/CONVENTIONS.md): the new rows (one or two, as one multi-row INSERT), and the chat's new
#: current leaf, counters and, while it has none, its title.
_INSERT_MESSAGES = insert(Message)
_MOVE_LEAF = (
    update(Chat)
    .where(Chat.id == bindparam("cid"))
    .values(
        current_message_id=bindparam("leaf"),
        message_count=Chat.message_count + bindparam("added", type_=Integer()),
        last_message_at=bindparam("now"),
        updated_at=bindparam("now"),
        title=func.coalesce(Chat.title, bindparam("title", type_=String())),
    )
)
_CHECKPOINT = (
    update(Message)
    .where(Message.id == bindparam("aid"), Message.status == "streaming")
    .values(content=bindparam("content"), created_at=bindparam("created_at"))
)


def _final_message(*, failed: bool) -> Update:
    """The answer's final row (`:aid`), with its error (`:m_error`) when it failed, else none; only while it is
    `streaming` (the first final state wins: a try that committed, or recovery's `interrupted`). No parameter
    is named after a column: Core would add it to the SET clause of an UPDATE that leaves it out (the chat's)."""
    return (
        update(Message)
        .where(Message.id == bindparam("aid"), Message.status == "streaming")
        .values(
            content=bindparam("m_content"),
            status=bindparam("m_status"),
            error=bindparam("m_error") if failed else null(),
            meta=bindparam("m_metadata"),
            last_event_id=bindparam("m_last_event_id", type_=Integer()),
            created_at=bindparam("m_created_at"),
            updated_at=bindparam("now"),
        )
    )


def _touch_chat(chat_id: Any) -> Update:
    """The chat's activity time (`:now`)."""
    return update(Chat).where(Chat.id == chat_id).values(last_message_at=bindparam("now"), updated_at=bindparam("now"))


#: Where one statement cannot chain writes (SQLite): the final write's statements of one transaction, by
#: `failed`, before its error_logs and ledger rows.
_FINAL_MESSAGE = (_final_message(failed=False), _final_message(failed=True))
_TOUCH_CHAT = _touch_chat(bindparam("cid"))


#: The answer's row is final already: its final write happened, so nothing of it may happen again (SQLite's
#: transaction reads it after its guarded UPDATE changed nothing).
_ALREADY_FINAL = exists(select(Message.id).where(Message.id == bindparam("aid"), Message.status != "streaming"))


def _final_write(statements: Statements, *, failed: bool) -> Select[bool, bool]:
    """The whole final write as ONE statement, for a dialect that chains writes (PostgreSQL's data-modifying
    CTEs): the answer's row (`m`, which returns its chat when it changed the row), its chat's activity time,
    the ledger row and its roll-up (`usage.ledger_writes`), and when `failed` the error_logs row, whose detail
    says `stored: false` when the answer's row was gone. One statement is atomic: all of it or nothing.

    The rest follows the row's UPDATE: it is written when `m` changed the row, or when the row was gone (its
    chat deleted: the usage still happened), never when the row exists and was not changed, i.e. was final
    already (a try that committed, or recovery's `interrupted`, even one committed while this statement ran:
    the UPDATE re-reads the row it waited for, a snapshot would not). The statement then answers `final`:
    written once, however often it is sent."""
    # The chat, locked before the answer's row (the scalar subquery runs before the UPDATE locks the row it
    # found): the order a chat's deletion takes them in (the chat, then its messages by cascade), so the two
    # queue rather than deadlock. Empty once the chat is gone; the error_logs row names it from here, so it
    # never names a chat deleted after this statement's snapshot (a foreign key failure).
    # (`key_share` without `read`: FOR NO KEY UPDATE, the lock the chat's UPDATE below takes anyway.)
    chat = select(Chat.id).where(Chat.id == bindparam("cid")).with_for_update(key_share=True).cte("h")
    locked_chat = select(chat.c.id).scalar_subquery()
    message = _final_message(failed=failed).where(Message.chat_id == locked_chat).returning(Message.chat_id).cte("m")
    updated = exists(select(message.c.chat_id))
    # The row, locked and so read as it is now, like the UPDATE reads it: a chat deleted while this statement
    # waited for the row leaves nothing here (the statement's snapshot would still show the row). A row the
    # UPDATE changed is skipped here too (this command changed it): `updated` covers that case. FOR KEY SHARE,
    # the weakest lock a DELETE waits for: it must not wait for a send's foreign-key check on this row (a
    # question replying to an answer recovery ended), whose transaction then updates the chat this statement
    # holds (a deadlock).
    current = (
        select(Message.id).where(Message.id == bindparam("aid")).with_for_update(read=True, key_share=True).cte("k")
    )
    gone = ~exists(select(current.c.id))
    proceed = or_(updated, gone)
    ledger, rollup = usage_service.ledger_writes(statements, proceed)
    writes = [_touch_chat(message.c.chat_id).cte("c"), ledger.cte("u"), rollup.cte("r")]
    if failed:
        detail = ErrorLog.__table__.columns["detail"].type
        chosen = case((updated, bindparam("e_detail", type_=detail)), else_=bindparam("e_detail_gone", type_=detail))
        writes.append(error_logs.prebuilt_insert(chosen, proceed, chat_id=locked_chat).cte("e"))
    return select((~proceed).label("final"), updated.label("kept")).add_cte(chat, message, current, *writes)


#: The final write of each statement set that chains writes (`_final_write`), by `failed`: built and compiled
#: once, here, and run through asyncpg itself (`Direct`: SQLAlchemy's execution layer cost more CPU than the
#: rest of a stream's database work).
_FINAL_WRITES = {
    statements: (Direct(_final_write(statements, failed=False)), Direct(_final_write(statements, failed=True)))
    for statements in all_statements()
    if statements.chains_writes
}


@dataclass(slots=True)
class NewGeneration:
    """Everything the generation task needs, captured while the request still had its session."""

    chat_id: uuid.UUID
    team_id: uuid.UUID
    user_id: uuid.UUID
    agent_id: uuid.UUID
    assistant_id: str
    #: The question answered (new, or for a regenerate the existing one), as the `start` event shows it; handed
    #: over once (`take_user_message`): while the answer runs only its id and length are kept.
    user_message: dict[str, Any]
    webhook_url: str
    webhook_headers_encrypted: str | None
    payload: dict[str, Any]
    #: When the rows were stored; the assistant message is stamped later, when generation starts.
    created_at: datetime
    #: The assistant message's siblings (itself included, oldest first): fixed while it streams, since no
    #: other generation can start in the chat meanwhile.
    assistant_sibling_ids: list[str] = field(default_factory=list)
    assistant_created_at: str | None = None
    assistant_started: datetime | None = None
    #: The agent's `response_mode` (`stream` or `callback`), and whether n8n got a callback URL (app.callbacks).
    response_mode: str = "stream"
    callbacks: bool = False
    #: The question's files (ids) and how they travel (`url`, `base64`, `multipart`; app.services.files).
    file_ids: list[str] = field(default_factory=list)
    file_delivery: str = "url"
    #: The question's id and length in characters (the ledger's `chars_in`), set from `user_message`.
    question_id: str = ""
    question_chars: int = 0

    def __post_init__(self) -> None:
        self.question_id = str(self.user_message.get("id", ""))
        self.question_chars = len(str(self.user_message.get("content") or ""))

    def take_user_message(self) -> dict[str, Any]:
        """The question for the `start` event, handed over once (an open stream keeps only id and length)."""
        message, self.user_message = self.user_message, {}
        return message

    def stamp_assistant(self) -> None:
        """The generation starts now: the assistant message's `created_at`, strictly after the user's."""
        started = max(utcnow(), self.created_at + timedelta(microseconds=1))
        self.assistant_started = started
        self.assistant_created_at = format_timestamp(started)

    def take_payload(self) -> dict[str, Any]:
        """The request body for n8n, handed over once (a long history is not kept for the whole stream)."""
        payload, self.payload = self.payload, {}
        return payload


def public_message(element: dict[str, Any]) -> dict[str, Any]:
    """A message as the API's Message: through `MessageRead`, the schema REST answers with, so the stream's
    start/done messages have the same keys (unset ones null) and timestamps (`...Z`) as REST."""
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


def _check_content(content: str | None, settings: Settings) -> str:
    if content is None or not content.strip():
        raise Unprocessable(EMPTY_CONTENT)
    # NUL and lone surrogates never get here: every request body refuses them (app.fields.InputModel).
    if len(content) > settings.MESSAGE_MAX_CHARS:
        raise Unprocessable(f"Message content must be at most {settings.MESSAGE_MAX_CHARS} characters")
    return content


async def _give_back(session: AsyncSession, user: Caller, claimed: date | None) -> None:
    """Roll back a refused send and return its quota claim; each step's own failure is logged, not raised."""
    try:
        await session.rollback()
    except Exception:
        logger.exception("rolling back a refused send failed")
    if claimed is None:
        return
    try:
        await usage_service.release_generation(session=session, user=user, day=claimed)
    except Exception:
        logger.exception("giving back a refused send's quota claim failed")


async def _close_if_committed(
    session: AsyncSession,
    *,
    user: Caller,
    chat_id: uuid.UUID,
    agent_id: uuid.UUID,
    assistant_id: uuid.UUID,
    question_chars: int,
    started_at: datetime,
) -> bool:
    """The start's COMMIT failed, which need not mean it did not commit (its connection died after the server
    committed, before the reply came): then no task will ever write the answer. Closed now as `interrupted`,
    as the one-statement start (app.services.fast_start) and later the sweeper would close it, rather than left
    `streaming` (the chat's sends 409) until the sweeper comes. True when it had committed. Only on this error:
    nothing is added to a send that commits. A failure here is logged; the sweeper then closes it."""
    try:
        await session.rollback()
        closed = await close_interrupted(
            session,
            message_id=assistant_id,
            chat_id=chat_id,
            team_id=user.team_id,
            user_id=user.id,
            agent_id=agent_id,
            question_chars=question_chars,
            answer_chars=0,
            started_at=started_at,
            detail={"reason": "the reply to its start was lost"},
        )
        await session.commit()
    except Exception as exc:
        logger.warning("could not check whether a failed start committed (%s)", type(exc).__name__)
        return False
    if closed:
        metrics.generation_finished(
            outcome="interrupted", agent_id=agent_id, error_code="interrupted", metadata={}, pool_in_use=None
        )
    return closed


async def start_message(
    *,
    session: AsyncSession,
    settings: Settings,
    user: Caller,
    chat_id: uuid.UUID,
    content: str | None,
    worker_id: uuid.UUID,
    edit_of: uuid.UUID | None = None,
    regenerate_of: uuid.UUID | None = None,
    file_ids: list[uuid.UUID] | None = None,
    idempotency_key: str | None = None,
) -> NewGeneration:
    """Check everything a stream needs, then store [user message,] assistant placeholder in one transaction.

    `{content}` answers under the chat's current leaf; `edit_of` (a user message) makes the new question its
    sibling; `regenerate_of` (an assistant message) adds a new answer to the same question. The new
    placeholder becomes the chat's current leaf. Raises 422 (empty / too long content; `edit_of` or
    `regenerate_of` not a message of this chat, or of the wrong role), 404 (not the caller's chat), 409
    (agent inactive, a generation running anywhere in the chat). `file_ids` attach files (app.services.files:
    422 for a wrong one, or one too large for the agent's delivery); a regenerate resends the question's own.
    Without `file_ids` nothing more than a send without files runs. `idempotency_key` (claimed by the caller)
    is recorded with the new ids in the same transaction. Commits, so the request's connection goes back to
    the pool before n8n is called.
    """
    regenerate = regenerate_of is not None
    if not regenerate:
        content = _check_content(content, settings)
    target = regenerate_of if regenerate else edit_of
    params: dict[str, Any] = {**owned_chat_params(chat_id, user.id, user.team_id), "target": target}
    row = (await execute_core(session, _CHAT_AND_AGENT, params)).first()
    if row is None:
        raise NotFound(CHAT_NOT_FOUND)
    if not row.is_active or row.agent_team_id != user.team_id:
        raise Conflict(AGENT_INACTIVE)
    if target is not None and row.target_role is None:
        raise Unprocessable(NOT_IN_CHAT.format(field="regenerate_of" if regenerate else "edit_of"))
    if edit_of is not None and row.target_role != "user":
        raise Unprocessable(EDIT_NOT_USER)
    if regenerate and (row.target_role != "assistant" or row.q_id is None or row.q_role != "user"):
        raise Unprocessable(REGENERATE_NOT_ASSISTANT)
    if row.running:
        raise Conflict(GENERATION_RUNNING)

    # Usage hook (app.services.usage): the daily quota, claimed (and committed) before anything is stored, so a
    # 429 stores nothing; every later refusal gives the claim back and rolls back what it wrote (files marked
    # as sent, the messages).
    claimed = await usage_service.claim_generation(session=session, user=user)
    stored = False  # set when the commit failed but had committed: the claim then counts a stored answer
    try:
        now = utcnow()
        assistant_id = uuid.uuid4()
        rows: list[dict[str, Any]] = []
        attached: list[dict[str, Any]] = []
        if regenerate:
            question_id: uuid.UUID = row.q_id
            question_parent: uuid.UUID | None = row.q_parent_id
            latest = str(row.q_content)
            # Metadata-only files (an imported chat's, without id) have no bytes to send again.
            attached = [f for f in row.q_files or [] if f.get("id")]
        else:
            question_id = uuid.uuid4()
            question_parent = row.target_parent_id if edit_of is not None else row.current_message_id
            latest = str(content)
            if file_ids:
                attached = await files_service.attach(
                    session=session,
                    settings=settings,
                    chat_id=chat_id,
                    file_ids=file_ids,
                    message_id=question_id,
                    reusable=[str(f["id"]) for f in row.target_files or [] if f.get("id")]
                    if edit_of is not None
                    else (),
                )
        delivery = files_service.delivery_for(settings, row.file_delivery, attached) if attached else "url"
        if not regenerate:
            rows.append(
                {
                    "id": question_id,
                    "chat_id": chat_id,
                    "parent_id": question_parent,
                    "role": "user",
                    "content": latest,
                    "status": "complete",
                    "files": attached or None,
                    "worker_id": None,  # every row names every column: a multi-row INSERT takes the first's keys
                    "created_at": now,
                    "updated_at": now,
                }
            )
        # Strictly after the question, so "oldest first" puts a question before its answer.
        placeholder_at = now + timedelta(microseconds=1)
        rows.append(
            {
                "id": assistant_id,
                "chat_id": chat_id,
                "parent_id": question_id,
                "role": "assistant",
                "content": "",
                "status": "streaming",
                "files": None,
                "worker_id": worker_id,
                "created_at": placeholder_at,
                "updated_at": placeholder_at,
            }
        )
        await execute_core(session, _INSERT_MESSAGES, rows)
        leaf = {
            "cid": chat_id,
            "leaf": assistant_id,
            "added": len(rows),
            "now": now,
            "title": None if regenerate else title_from_message(latest),
        }
        await execute_core(session, _MOVE_LEAF, leaf)
        found = (
            await execute_core(
                session,
                _HISTORY_AND_SIBLINGS,
                {
                    "start": question_parent,
                    # Twice the message budget: messages without text (a failed answer) are skipped by
                    # `build_history` and should not shorten the history.
                    "depth": 2 * settings.N8N_HISTORY_MAX_MESSAGES,
                    "cid": chat_id,
                    "p1": question_parent,
                    "p2": question_id,
                    "root": int(question_parent is None),
                },
            )
        ).all()
        if idempotency_key is not None:
            await idempotency.record(
                session=session,
                user_id=user.id,
                key=idempotency_key,
                user_message_id=str(question_id),
                assistant_message_id=str(assistant_id),
            )
        try:
            await session.commit()
        except Exception:
            stored = await _close_if_committed(
                session,
                user=user,
                chat_id=chat_id,
                agent_id=row.agent_id,
                assistant_id=assistant_id,
                question_chars=len(latest),
                started_at=placeholder_at,
            )
            raise
    except BaseException as exc:
        # Nothing of this send is stored (rolled back, or never committed): give the quota claim back. Shielded,
        # so a cancelled request still gives it back; a failure there is logged, never raised over `exc`.
        with anyio.CancelScope(shield=True):
            await _give_back(session, user, None if stored else claimed)
        if isinstance(exc, IntegrityError):
            if "foreign key" in str(exc.orig).lower():
                raise NotFound(CHAT_NOT_FOUND) from None  # the chat was deleted meanwhile
            # Another send won the race for this chat's one `streaming` row (the partial unique index).
            raise Conflict(GENERATION_RUNNING) from None
        raise

    above = sorted((r for r in found if r.kind == "h"), key=lambda r: -r.depth)
    siblings: dict[uuid.UUID | None, list[uuid.UUID]] = {}
    for child in sorted((r for r in found if r.kind == "c"), key=lambda r: (r.created_at, r.id)):
        siblings.setdefault(child.parent_id, []).append(child.id)
    # A regenerate answers the stored question again: the start event shows it as stored.
    user_message = message_view(
        id=question_id,
        parent_id=question_parent,
        role="user",
        content=latest,
        status=row.q_status if regenerate else "complete",
        created_at=row.q_created_at if regenerate else now,
        error=row.q_error if regenerate else None,
        metadata=row.q_metadata if regenerate else None,
        feedback=row.q_feedback if regenerate else None,
        sibling_ids=siblings.get(question_parent, [question_id]),
        # Its files as stored: an imported question's metadata-only ones too, which are not sent again.
        files=row.q_files if regenerate else attached,
    )
    return new_generation(
        settings=settings,
        user=user,
        chat_id=chat_id,
        agent=row,
        assistant_id=assistant_id,
        user_message=user_message,
        prior=[{"role": r.role, "content": r.content, "status": r.status} for r in above],
        latest=latest,
        created_at=placeholder_at,
        assistant_sibling_ids=siblings.get(question_id, [assistant_id]),
        attached=attached,
        delivery=delivery,
    )


def new_generation(
    *,
    settings: Settings,
    user: Caller,
    chat_id: uuid.UUID,
    agent: Any,
    assistant_id: uuid.UUID,
    user_message: dict[str, Any],
    prior: list[dict[str, Any]],
    latest: str,
    created_at: datetime,
    assistant_sibling_ids: list[uuid.UUID],
    attached: list[dict[str, Any]],
    delivery: str,
) -> NewGeneration:
    """The generation of stored rows: the n8n payload (history within its budgets) and the start event's
    question. `agent` has the agent's columns as `_CHAT_AND_AGENT` names them; `prior` is the branch above
    the question, oldest first."""
    history = build_history(prior, latest, settings)
    metadata = {
        "chat_id": str(chat_id),
        "agent_id": str(agent.agent_id),
        "user_id": str(user.id),
        "team_id": str(user.team_id),
        "message_id": str(assistant_id),
    }
    url = callbacks.callback_url(settings, str(assistant_id))
    if url is not None:
        metadata["callback_url"] = url
    payload = {
        "messages": history,
        "system_prompt": agent.system_prompt or "",
        "config": agent.config or {},
        "chatInput": latest,
        "sessionId": str(chat_id),
        "metadata": metadata,
    }
    if attached:
        payload["files"] = files_service.payload_files(settings, delivery, attached, str(assistant_id))
    return NewGeneration(
        chat_id=chat_id,
        team_id=user.team_id,
        user_id=user.id,
        agent_id=agent.agent_id,
        assistant_id=str(assistant_id),
        user_message=public_message(user_message),
        webhook_url=agent.webhook_url,
        webhook_headers_encrypted=agent.webhook_headers_encrypted,
        payload=payload,
        created_at=created_at,
        assistant_sibling_ids=[str(i) for i in assistant_sibling_ids],
        response_mode=agent.response_mode,
        callbacks=url is not None,
        file_ids=[str(f["id"]) for f in attached],
        file_delivery=delivery,
    )


async def checkpoint_message(*, session: AsyncSession, new: NewGeneration, content: str) -> bool:
    """Save the partial text of a still-streaming answer (so a crash loses at most one interval)."""
    params = {
        "aid": uuid.UUID(new.assistant_id),
        "content": content,
        # Until the generation is stamped, the placeholder keeps the time it was stored with.
        "created_at": new.assistant_started or new.created_at,
    }
    result = await execute_core(session, _CHECKPOINT, params)
    await session.commit()
    return bool(getattr(result, "rowcount", 0))


async def finish_message(
    *,
    db: Database,
    new: NewGeneration,
    content: str,
    status: str,
    error: dict[str, str] | None,
    metadata: dict[str, Any],
    failure_detail: dict[str, Any] | None,
    upstream_status: int | None,
    last_event_id: int | None = None,
) -> FinalWrite | None:
    """The one final write of an answer (its row, and its chat's activity time), plus its error_logs row on
    failure and its usage ledger row: one statement where the dialect chains writes (PostgreSQL: sent
    through asyncpg outside any transaction, one round trip: `Database.fetch_direct`), else one transaction.
    A failed answer's error_logs row says `stored: false` when its row was gone (its chat deleted meanwhile).

    The answer as written, and whether its row was there (`kept`: False when its chat was deleted meanwhile, so
    only the usage and error rows were written); None, and nothing written, when the row was final already (a
    try of this write that committed though its answer was lost, or another writer's: recovery's
    `interrupted`), so it can be sent again safely."""
    if new.assistant_started is None:
        new.stamp_assistant()
    failed = error is not None
    params: dict[str, Any] = {
        "aid": uuid.UUID(new.assistant_id),
        "cid": new.chat_id,
        "m_content": content,
        "m_status": status,
        "m_error": error,
        "m_metadata": metadata,
        "m_created_at": new.assistant_started,
        "m_last_event_id": last_event_id,
        "now": utcnow(),
    }
    ledger_row = usage_service.ledger_row(
        team_id=new.team_id,
        user_id=new.user_id,
        agent_id=new.agent_id,
        chat_id=new.chat_id,
        outcome=status,
        error_code=None if error is None else error["code"],
        chars_in=new.question_chars,
        chars_out=len(content),
        metadata=metadata,
    )
    detail = dict(failure_detail or {})
    logged = None if error is None else _error_log_fields(new, error, upstream_status)
    chained = _FINAL_WRITES.get(db.statements)
    if chained is not None:
        params.update(usage_service.ledger_params(ledger_row))
        if logged is not None:
            params |= error_logs.prebuilt_params(**logged)
            # The statement picks one: `e_detail_gone` when the answer's row was gone (`_final_write`).
            params["e_detail"] = error_logs.clean_detail(detail)
            params["e_detail_gone"] = error_logs.clean_detail({**detail, "stored": False})
        [row] = await db.fetch_direct(chained[failed], params)
        if row["final"]:
            return None
        kept = bool(row["kept"])
    else:
        async with db.sessionmaker() as session:
            written = await _finish_in_transaction(session, params, ledger_row, detail, logged)
        if written is False:
            return None
        kept = written is True
    return FinalWrite(final_view(new, content=content, status=status, error=error, metadata=metadata), kept)


class FinalWrite(NamedTuple):
    """What `finish_message` wrote: the answer as stored (`final_view`), and whether its row was there to hold
    it (`kept`; False: its chat was deleted before the final write, which then counted only the usage)."""

    message: dict[str, Any]
    kept: bool


#: How a stream ends whose chat was deleted before its answer could be stored (nothing is: no `done` naming a
#: message that does not exist).
CHAT_DELETED = {"message": "The chat was deleted", "code": "chat_deleted"}


def final_view(
    new: NewGeneration, *, content: str, status: str, error: dict[str, str] | None, metadata: dict[str, Any]
) -> dict[str, Any]:
    """The stored answer as `finish_message` wrote it (the `done` event's message), built without a read."""
    if new.assistant_started is None:
        new.stamp_assistant()
    return public_message(
        message_view(
            id=uuid.UUID(new.assistant_id),
            parent_id=uuid.UUID(new.question_id),
            role="assistant",
            content=content,
            status=status,
            created_at=new.assistant_started,
            error=error,
            metadata=metadata,
            feedback=None,
            sibling_ids=[uuid.UUID(i) for i in new.assistant_sibling_ids],
        )
    )


class FinalState(NamedTuple):
    status: str
    last_event_id: int | None


async def final_state(db: Database, message_id: str) -> FinalState | None:
    """The answer's row as a final write left it: its status and terminal event id (None when the row is gone:
    its chat was deleted). Read when a final write found the row final already (was it an earlier try of its
    own?), and when a stream is rebuilt from storage (under which id it ends)."""
    async with db.autocommit() as session:
        row = (
            await session.execute(
                select(Message.status, Message.last_event_id).where(Message.id == uuid.UUID(message_id))
            )
        ).one_or_none()
    return None if row is None else FinalState(row.status, row.last_event_id)


def _error_log_fields(new: NewGeneration, error: dict[str, str], upstream_status: int | None) -> dict[str, Any]:
    """The error_logs row of a failed answer, as both final writes record it (`error_logs`)."""
    return {
        "team_id": new.team_id,
        "user_id": new.user_id,
        "chat_id": new.chat_id,
        "agent_id": new.agent_id,
        "code": error["code"],
        "message": error["message"],
        "upstream_status": upstream_status,
    }


async def _finish_in_transaction(
    session: AsyncSession,
    params: dict[str, Any],
    ledger_row: dict[str, Any],
    detail: dict[str, Any],
    logged: dict[str, Any] | None,
) -> bool | None:
    """The final write as separate statements in one transaction (SQLite, which cannot chain writes); `logged`:
    the error_logs row of a failed answer (`_error_log_fields`), None for a successful one. False, and nothing
    written, when the row was final already (as `_final_write`); True when it wrote the row, None when the
    row was gone (only the usage and error rows were written)."""
    failed = logged is not None
    written = bool(getattr(await execute_core(session, _FINAL_MESSAGE[failed], params), "rowcount", 0))
    if not written and await session.scalar(select(_ALREADY_FINAL), {"aid": params["aid"]}):
        await session.rollback()
        return False
    await execute_core(session, _TOUCH_CHAT, params)
    if logged is not None:
        if not written:
            detail["stored"] = False
        await error_logs.record_error(session=session, detail=detail, **logged)
    # Usage hook (app.services.usage): the generation's ledger row, in this same transaction.
    await usage_service.add_ledger_rows(session=session, rows=[ledger_row])
    await session.commit()
    return True if written else None


INTERRUPTED = {"message": "The server stopped before the answer was complete", "code": "interrupted"}


async def mark_interrupted(session: AsyncSession, *, message_id: uuid.UUID, chat_id: uuid.UUID) -> bool:
    """A still-`streaming` answer whose worker is gone becomes `interrupted`, keeping its checkpointed text.

    Guarded by the status, so an answer its live worker finished meanwhile is never overwritten. The chat is
    locked first, as its deletion and the final write lock it (then the message), so none of them deadlock.
    The caller commits.
    """
    now = utcnow()
    await session.execute(select(Chat.id).where(Chat.id == chat_id).with_for_update(key_share=True))
    result = await session.execute(
        update(Message)
        .where(Message.id == message_id, Message.status == "streaming")
        .values(status="interrupted", error=INTERRUPTED, updated_at=now)
    )
    if not getattr(result, "rowcount", 0):
        return False
    await session.execute(update(Chat).where(Chat.id == chat_id).values(last_message_at=now, updated_at=now))
    return True


async def close_interrupted(
    session: AsyncSession,
    *,
    message_id: uuid.UUID,
    chat_id: uuid.UUID,
    team_id: uuid.UUID,
    user_id: uuid.UUID,
    agent_id: uuid.UUID,
    question_chars: int,
    answer_chars: int,
    started_at: datetime,
    detail: dict[str, Any],
) -> bool:
    """`mark_interrupted`, with the error_logs row and the usage ledger row its final write would have written:
    every answer closed without one (its worker gone, its start's reply lost) is a generation the quota
    counted, so the ledger and the reports count it too. The caller commits."""
    if not await mark_interrupted(session, message_id=message_id, chat_id=chat_id):
        return False
    await error_logs.record_error(
        session=session,
        team_id=team_id,
        user_id=user_id,
        chat_id=chat_id,
        agent_id=agent_id,
        code="interrupted",
        message=INTERRUPTED["message"],
        upstream_status=None,
        detail=detail,
    )
    await usage_service.record_generation(
        session=session,
        team_id=team_id,
        user_id=user_id,
        agent_id=agent_id,
        chat_id=chat_id,
        outcome="interrupted",
        error_code="interrupted",
        chars_in=question_chars,
        chars_out=answer_chars,
        # From its start (the placeholder's row): the quota counts a generation on the day it began, by the
        # ledger row's time less its duration; without it, one from before midnight counted twice.
        metadata={"duration_ms": max(0, round((utcnow() - started_at).total_seconds() * 1000))},
    )
    return True


async def get_public_messages(session: AsyncSession, chat_id: uuid.UUID, ids: Collection[str]) -> list[dict[str, Any]]:
    """These stored messages of the chat as the API shows them, oldest first (a stream rebuilt from storage).

    No ownership check: callers check the chat first.
    """
    return [public_message(view) for view in await stored_views(session, chat_id, ids)]


async def is_streaming(session: AsyncSession, message_id: str) -> bool:
    """Whether `message_id` is a running answer (of any chat: a callback relayed to its owner asks)."""
    query = select(Message.id).where(Message.id == uuid.UUID(message_id), IS_STREAMING).limit(1)
    return (await session.execute(query)).first() is not None
