"""The message tree of a chat: the branch shown, every message, switching branches, feedback on answers.

Messages are rows of `messages` linked by `parent_id`; a chat's `current_message_id` is the leaf of the
branch shown. A chat read with `last=N` walks `parent_id` with a recursive CTE from that leaf, so it reads
what it shows (the branch's last N messages and their siblings' ids); without `last` it reads the chat's
whole tree in one range scan and walks the branch in Python (`read_chat`).
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, Integer, String, Text, TextualSelect, Uuid, bindparam, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeEngine

from app.db import execute_core, utcnow
from app.dialects import JSONType, Statements, UTCDateTime, statements_of
from app.errors import Conflict, NotFound, Unprocessable
from app.models import IS_STREAMING, Chat, Message, User
from app.security import Caller
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, apply_changes, get_owned_chat, owned_chat_params

MESSAGE_NOT_FOUND = "Message not found"
NOT_IN_CHAT = "{field} is not a message of this chat"
FEEDBACK_ON_USER_MESSAGE = "Feedback is for assistant messages only"
FEEDBACK_WHILE_STREAMING = "This answer is still being written; rate it once it has ended"
#: Depth bound of the newest-descendant walk (a guard against a cycle that no write can make).
MAX_DEPTH = 1_000_000
JSON_COLUMN: TypeEngine[Any] = JSONType

#: The chat's own columns, as both chat reads return them on every row.
_CHAT_COLUMNS: dict[str, TypeEngine[Any]] = {
    "id": Uuid(),
    "team_id": Uuid(),
    "user_id": Uuid(),
    "agent_id": Uuid(),
    "title": String(),
    "archived": Boolean(),
    "pinned": Boolean(),
    "current_message_id": Uuid(),
    "message_count": Integer(),
    "created_at": UTCDateTime(),
    "updated_at": UTCDateTime(),
}
_MESSAGE_COLUMNS: dict[str, TypeEngine[Any]] = {
    "m_id": Uuid(),
    "m_parent_id": Uuid(),
    "m_role": String(),
    "m_content": Text(),
    "m_status": String(),
    "m_error": JSON_COLUMN,
    "m_metadata": JSON_COLUMN,
    "m_feedback": JSON_COLUMN,
    "m_files": JSON_COLUMN,
    "m_created_at": UTCDateTime(),
}

_CHAT_VIEW_SQL = (
    "WITH RECURSIVE branch(id, parent_id, depth) AS ("
    " SELECT m.id, m.parent_id, 0 FROM messages m WHERE m.id = (SELECT c.current_message_id FROM chats c"
    "  WHERE c.id = :cid AND c.user_id = :uid AND c.team_id = :tid)"
    " UNION ALL"
    " SELECT m.id, m.parent_id, b.depth + 1 FROM messages m JOIN branch b ON m.id = b.parent_id"
    " WHERE b.depth < :depth"
    ") "
    "SELECT c.id, c.team_id, c.user_id, c.agent_id, c.title, c.archived, c.pinned, c.current_message_id,"
    " c.message_count, c.created_at, c.updated_at, x.* "
    "FROM chats c LEFT JOIN ("
    " SELECT m.id AS m_id, m.parent_id AS m_parent_id, m.role AS m_role, m.content AS m_content,"
    "  m.status AS m_status, m.error AS m_error, m.metadata AS m_metadata, m.feedback AS m_feedback,"
    "  m.files AS m_files,"
    "  m.created_at AS m_created_at, b.depth AS b_depth"
    "  FROM branch b JOIN messages m ON m.id = b.id"
    " UNION ALL"
    " SELECT s.id, s.parent_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, s.created_at, NULL"
    "  FROM (SELECT DISTINCT parent_id FROM branch WHERE parent_id IS NOT NULL) p {children_join}"
    " UNION ALL"
    " SELECT s.id, s.parent_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, s.created_at, NULL"
    "  FROM messages s WHERE s.chat_id = :cid AND s.parent_id IS NULL"
    "  AND EXISTS (SELECT 1 FROM branch WHERE branch.parent_id IS NULL)"
    ") x ON true "
    "WHERE c.id = :cid AND c.user_id = :uid AND c.team_id = :tid"
)


@functools.cache
def _chat_view(statements: Statements) -> TextualSelect:
    """The caller's chat with its current branch (root first, at most `:depth` + 1 messages from the leaf)
    and the siblings of every message on it, in ONE statement: the chat's columns on every row, then either
    a message of the branch (`b_depth` set) or a sibling (ids and times only, `b_depth` null). Every step is
    an index lookup (the primary key up the branch, the parent index for siblings, the roots index), so the
    cost is the branch's length, never the whole tree's. Built once per dialect (its children join)."""
    return (
        text(_CHAT_VIEW_SQL.format(children_join=statements.children_join))
        .bindparams(*(bindparam(name, type_=Uuid()) for name in ("cid", "uid", "tid")))
        .columns(
            **_CHAT_COLUMNS,
            **_MESSAGE_COLUMNS,
            b_depth=Integer(),
        )
    )


#: From a message down to the leaf of its newest descendants: each step takes the newest child.
_NEWEST_LEAF: TextualSelect = (
    text(
        "WITH RECURSIVE down(id, depth) AS ("
        " SELECT m.id, 0 FROM messages m WHERE m.id = :mid"
        " UNION ALL"
        " SELECT (SELECT c.id FROM messages c WHERE c.parent_id = down.id"
        "  ORDER BY c.created_at DESC, c.id DESC LIMIT 1), down.depth + 1"
        " FROM down WHERE down.id IS NOT NULL AND down.depth < :max_depth"
        ") SELECT id FROM down WHERE id IS NOT NULL ORDER BY depth DESC LIMIT 1"
    )
    .bindparams(bindparam("mid", type_=Uuid()))
    .columns(id=Uuid())
)


def message_view(
    *,
    id: uuid.UUID,
    parent_id: uuid.UUID | None,
    role: str,
    content: str,
    status: str,
    created_at: Any,
    error: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
    feedback: dict[str, Any] | None,
    sibling_ids: Sequence[uuid.UUID],
    files: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A message as MessageRead takes it (REST and the stream share it)."""
    return {
        "id": id,
        "parent_id": parent_id,
        "role": role,
        "content": content,
        "status": status,
        "created_at": created_at,
        "error": error,
        "metadata": metadata,
        "feedback": feedback,
        "sibling_ids": list(sibling_ids),
        "files": files or [],
    }


def _siblings(rows: Iterable[Any]) -> dict[uuid.UUID | None, list[uuid.UUID]]:
    """Children ids per parent, oldest first (ties by id, as every listing orders them)."""
    by_parent: dict[uuid.UUID | None, list[tuple[Any, uuid.UUID]]] = defaultdict(list)
    for row in rows:
        by_parent[row.parent_id].append((row.created_at, row.id))
    return {parent: [i for _, i in sorted(children)] for parent, children in by_parent.items()}


@dataclass(frozen=True)
class _Sibling:
    id: uuid.UUID
    parent_id: uuid.UUID | None
    created_at: Any


#: The caller's chat with every message of its tree (left join: one row with null message columns for a
#: chat without messages), in ONE statement: one range scan of the chat's index, which for a whole branch
#: is far cheaper than thousands of recursive steps (docs/PERFORMANCE.md).
_CHAT_TREE: TextualSelect = (
    text(
        "SELECT c.id, c.team_id, c.user_id, c.agent_id, c.title, c.archived, c.pinned, c.current_message_id,"
        " c.message_count, c.created_at, c.updated_at,"
        " m.id AS m_id, m.parent_id AS m_parent_id, m.role AS m_role, m.content AS m_content,"
        " m.status AS m_status, m.error AS m_error, m.metadata AS m_metadata, m.feedback AS m_feedback,"
        " m.files AS m_files,"
        " m.created_at AS m_created_at "
        "FROM chats c LEFT JOIN messages m ON m.chat_id = c.id "
        "WHERE c.id = :cid AND c.user_id = :uid AND c.team_id = :tid"
    )
    .bindparams(*(bindparam(name, type_=Uuid()) for name in ("cid", "uid", "tid")))
    .columns(
        **_CHAT_COLUMNS,
        **_MESSAGE_COLUMNS,
    )
)


def _branch_of_tree(rows: Sequence[Any], leaf: uuid.UUID | None) -> list[Any]:
    """The path from the root to `leaf` among a chat's rows, root first."""
    by_id = {r.m_id: r for r in rows if r.m_id is not None}
    path: list[Any] = []
    node = by_id.get(leaf) if leaf is not None else None
    while node is not None and len(path) <= len(by_id):
        path.append(node)
        node = by_id.get(node.m_parent_id) if node.m_parent_id is not None else None
    path.reverse()
    return path


async def read_chat(
    *, session: AsyncSession, user: User | Caller, chat_id: uuid.UUID, last: int | None = None
) -> dict[str, Any]:
    """The caller's chat with its current branch (or its `last` newest messages and `has_more`), one query.

    The whole branch reads the chat's tree in one range scan and walks it here; `last=N` walks only N + 1
    steps up from the leaf in SQL (and reads only those messages and their siblings).
    """
    params: dict[str, Any] = {"cid": chat_id, "uid": user.id, "tid": user.team_id}
    if last is None:
        rows = (await execute_core(session, _CHAT_TREE, params)).all()
        if not rows:
            raise NotFound(CHAT_NOT_FOUND)
        siblings = _siblings(_Sibling(r.m_id, r.m_parent_id, r.m_created_at) for r in rows if r.m_id is not None)
        shown = _branch_of_tree(rows, rows[0].current_message_id)
        has_more = False
    else:
        params["depth"] = last
        rows = (await execute_core(session, _chat_view(statements_of(session)), params)).all()
        if not rows:
            raise NotFound(CHAT_NOT_FOUND)
        siblings = _siblings(
            _Sibling(r.m_id, r.m_parent_id, r.m_created_at) for r in rows if r.m_id is not None and r.b_depth is None
        )
        branch = sorted((r for r in rows if r.b_depth is not None), key=lambda r: -r.b_depth)
        has_more = any(r.b_depth >= last for r in branch)
        shown = [r for r in branch if r.b_depth < last]
    first = rows[0]
    return {
        "id": first.id,
        "team_id": first.team_id,
        "user_id": first.user_id,
        "agent_id": first.agent_id,
        "title": first.title,
        "archived": first.archived,
        "pinned": first.pinned,
        "current_message_id": first.current_message_id,
        "message_count": first.message_count,
        "created_at": first.created_at,
        "updated_at": first.updated_at,
        "has_more": has_more,
        "messages": [
            message_view(
                id=r.m_id,
                parent_id=r.m_parent_id,
                role=r.m_role,
                content=r.m_content,
                status=r.m_status,
                created_at=r.m_created_at,
                error=r.m_error,
                metadata=r.m_metadata,
                feedback=r.m_feedback,
                sibling_ids=siblings.get(r.m_parent_id, [r.m_id]),
                files=r.m_files,
            )
            for r in shown
        ],
    }


async def _sibling_ids(
    session: AsyncSession, chat_id: uuid.UUID, parents: set[uuid.UUID | None]
) -> dict[uuid.UUID | None, list[uuid.UUID]]:
    """The children of these parents (None: the chat's first messages), oldest first."""
    ids = [p for p in parents if p is not None]
    conditions = [Message.parent_id.in_(ids)] if ids else []
    if None in parents:
        conditions.append(Message.parent_id.is_(None))
    if not conditions:
        return {}
    query = select(Message.id, Message.parent_id, Message.created_at).where(
        Message.chat_id == chat_id, or_(*conditions)
    )
    return _siblings((await session.execute(query)).all())


def _view(message: Message, siblings: dict[uuid.UUID | None, list[uuid.UUID]]) -> dict[str, Any]:
    return message_view(
        id=message.id,
        parent_id=message.parent_id,
        role=message.role,
        content=message.content,
        status=message.status,
        created_at=message.created_at,
        error=message.error,
        metadata=message.meta,
        feedback=message.feedback,
        sibling_ids=siblings.get(message.parent_id, [message.id]),
        files=message.files,
    )


async def stored_views(session: AsyncSession, chat_id: uuid.UUID, ids: Iterable[str]) -> list[dict[str, Any]]:
    """These messages of the chat as the API shows them, oldest first; no ownership check (callers did it)."""
    wanted = []
    for value in ids:
        try:
            wanted.append(uuid.UUID(str(value)))
        except ValueError:
            continue
    if not wanted:
        return []
    query = (
        select(Message)
        .where(Message.chat_id == chat_id, Message.id.in_(wanted))
        .order_by(Message.created_at, Message.id)
    )
    rows = list((await session.execute(query)).scalars())
    siblings = await _sibling_ids(session, chat_id, {m.parent_id for m in rows})
    return [_view(m, siblings) for m in rows]


@dataclass(frozen=True)
class MessagePage:
    messages: list[dict[str, Any]]
    total: int


async def list_messages(
    *, session: AsyncSession, user: User, chat_id: uuid.UUID, limit: int, offset: int
) -> MessagePage:
    """Every message of every branch of the caller's chat, oldest first, one page of them."""
    chat = await get_owned_chat(session=session, user=user, chat_id=chat_id)
    query = (
        select(Message, func.count().over().label("total"))
        .where(Message.chat_id == chat.id)
        .order_by(Message.created_at, Message.id)
        .limit(limit)
        .offset(offset)
    )
    rows = (await session.execute(query)).all()
    if rows:
        total = int(rows[0][1])
    else:
        count = select(func.count()).select_from(Message).where(Message.chat_id == chat.id)
        total = int((await session.execute(count)).scalar_one())
    messages = [row[0] for row in rows]
    siblings = await _sibling_ids(session, chat.id, {m.parent_id for m in messages})
    return MessagePage(messages=[_view(m, siblings) for m in messages], total=total)


async def _chat_message(session: AsyncSession, chat_id: uuid.UUID, message_id: uuid.UUID) -> Message | None:
    query = select(Message).where(Message.id == message_id, Message.chat_id == chat_id)
    return (await session.execute(query)).scalar_one_or_none()


async def newest_leaf(session: AsyncSession, message_id: uuid.UUID) -> uuid.UUID:
    """The end of the path from a message through its newest child, its newest child's newest child..."""
    leaf: uuid.UUID = (
        await execute_core(session, _NEWEST_LEAF, {"mid": message_id, "max_depth": MAX_DEPTH})
    ).scalar_one()
    return leaf


async def _locked_chat(session: AsyncSession, user: User, chat_id: uuid.UUID, *, writes: bool) -> Chat:
    """The caller's own chat (`get_owned_chat`'s 404 rule), its row locked until the caller commits: a deletion
    under way is waited for (then 404), and a later one waits for this commit, so what is read here is still
    there to write. `writes`: the chat's row is changed (FOR NO KEY UPDATE, the lock its UPDATE takes), else
    only its messages (FOR KEY SHARE). Neither holds up a send's inserts or a final write."""
    query = select(Chat).where(*OWNED_CHAT).with_for_update(read=not writes, key_share=True)
    chat = (await session.execute(query, owned_chat_params(chat_id, user.id, user.team_id))).scalar_one_or_none()
    if chat is None:
        raise NotFound(CHAT_NOT_FOUND)
    return chat


async def update_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID, changes: dict[str, Any]) -> None:
    """Rename, archive, pin, and switch branches: only the fields sent change, in one commit.

    `current_message_id` (any message of the chat, else 422 and nothing changes) shows the branch through
    it, continued through its newest descendants: the chat's current leaf becomes that descendant.
    """
    # Locked as its UPDATE locks it anyway: a deletion read before it committed left the UPDATE matching no row
    # (a 500).
    chat = await _locked_chat(session, user, chat_id, writes=True)
    changes = dict(changes)
    if "current_message_id" in changes:
        message_id = changes.pop("current_message_id")
        if await _chat_message(session, chat.id, message_id) is None:
            raise Unprocessable(NOT_IN_CHAT.format(field="current_message_id"))
        chat.current_message_id = await newest_leaf(session, message_id)
    apply_changes(chat, changes)
    await session.commit()


async def set_feedback(
    *,
    session: AsyncSession,
    user: User,
    chat_id: uuid.UUID,
    message_id: uuid.UUID,
    rating: int | None,
    comment: str | None,
) -> dict[str, Any]:
    """Rate an assistant message of the caller's chat; a null rating without a comment clears the feedback."""
    # Locked: a deletion read before it committed left the UPDATE below matching no row, answered as a
    # streaming answer's 409.
    chat = await _locked_chat(session, user, chat_id, writes=False)
    message = await _chat_message(session, chat.id, message_id)
    if message is None:
        raise NotFound(MESSAGE_NOT_FOUND)
    if message.role != "assistant":
        raise Unprocessable(FEEDBACK_ON_USER_MESSAGE)
    comment = comment.strip() if comment is not None else None
    now = utcnow()
    feedback = None if rating is None and not comment else {"rating": rating, "comment": comment or None}
    stored = None if feedback is None else {**feedback, "updated_at": now.isoformat()}
    # The message's own `updated_at` stays when it ended: signed file links (app.services.files) expire from
    # it, and a rating must not bring an ended generation's links back.
    # (Given explicitly: the column's `onupdate` would otherwise set it.)
    # Not while it streams: its final write, and the stop's answer and `done` that show it, would not carry it.
    result = await session.execute(
        update(Message)
        .where(Message.id == message.id, ~IS_STREAMING)
        .values(feedback=stored, updated_at=Message.updated_at)
    )
    if not getattr(result, "rowcount", 0):
        await session.rollback()
        raise Conflict(FEEDBACK_WHILE_STREAMING)
    await session.commit()
    await session.refresh(message)
    siblings = await _sibling_ids(session, chat.id, {message.parent_id})
    return _view(message, siblings)
