"""Chat exports in the format of docs/SHARING.md (version 1): one chat as JSON (every branch) or Markdown (the
branch shown), read batch by batch in one snapshot into a spool before it is sent, and every chat of a user as
JSON Lines, each chat read that same way, then sent, while the next is read."""

from __future__ import annotations

import heapq
import io
import json
import logging
import tempfile
import uuid
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeAlias

from sqlalchemy import ColumnElement, LargeBinary, Row, Select, and_, bindparam, cast, func, literal, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.chat_schemas import format_timestamp
from app.db import Database
from app.errors import NotFound
from app.models import Agent, Chat, Message
from app.services import export_markdown
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, owned_chat_params
from app.share_schemas import EXPORT_FORMAT, EXPORT_VERSION

#: Chat ids read per query by the JSON Lines export (each chat then read as one chat's export is).
EXPORT_PAGE_CHATS = 20
#: Messages read per query by the export of a chat (JSON, Markdown, or a line of the JSON Lines), each batch
#: written out before the next is read: its memory is one batch, however long the chat. Built whole, a chat of
#: 20,000 long messages took hundreds of MB, and a few such exports at once could take an instance down.
EXPORT_BATCH_MESSAGES = 100
#: ... and fewer when their text and metadata pass this many bytes together (a message larger alone is read
#: alone): an answer may hold up to N8N_MAX_RESPONSE_BYTES (10 MiB), so a count alone bounds nothing.
EXPORT_BATCH_BYTES = 256 * 1024

logger = logging.getLogger(__name__)


def _feedback(feedback: dict[str, Any] | None) -> dict[str, Any] | None:
    """Feedback as the API shows it: its time in UTC ending in `Z` (stored as Python's ISO text)."""
    if feedback is None or feedback.get("updated_at") is None:
        return feedback
    return {**feedback, "updated_at": format_timestamp(datetime.fromisoformat(feedback["updated_at"]))}


#: The error of a message exported while it was still being written (exported as `interrupted`).
EXPORTED_WHILE_STREAMING = {
    "message": "The answer was still being written when the chat was exported",
    "code": "interrupted",
}


def _message(m: Message) -> dict[str, Any]:
    """One message as exported. A message still streaming is written as `interrupted` (its text saved so far)
    with an error saying why, as every interrupted answer has one, so every export can be imported again."""
    streaming = m.status == "streaming"
    return {
        "id": str(m.id),
        "parent_id": str(m.parent_id) if m.parent_id else None,
        "role": m.role,
        "content": m.content,
        "status": "interrupted" if streaming else m.status,
        "created_at": format_timestamp(m.created_at),
        "error": EXPORTED_WHILE_STREAMING if streaming else m.error,
        "metadata": m.meta,
        "feedback": _feedback(m.feedback),
        "files": [
            {k: f[k] for k in ("filename", "content_type", "size", "sha256")} for f in m.files or []
        ],  # metadata only: no bytes, no links, no ids (an import has nothing to point them at)
    }


#: What `chat_export` writes: the JSON export, the Markdown, or one line of the JSON Lines (the JSON on one line).
ExportFormat: TypeAlias = Literal["json", "markdown", "line"]


async def chat_export(
    *, db: Database, user_id: uuid.UUID, team_id: uuid.UUID, chat_id: uuid.UUID, export_format: ExportFormat
) -> AsyncGenerator[bytes]:
    """The caller's chat as a download (JSON, the branch shown as Markdown, or a line of the JSON Lines), in
    pieces as it is read.

    The first piece (the chat's fields and its branch shown, or the Markdown's title) comes once the chat is
    known to be the caller's: a missing one, another user's or another team's raises NotFound from the first
    `anext`, before anything is sent. The rest is read a batch at a time (keyset paging: EXPORT_BATCH_MESSAGES
    messages, fewer past EXPORT_BATCH_BYTES), each batch written out before the next is read, all in ONE
    read-only transaction (REPEATABLE READ on PostgreSQL, a read transaction on SQLite): every batch sees the
    chat as it was at the first read, so a send, an edit or a deletion committing meanwhile is not in the
    export at all, and the export is always one that imports again. The transaction, and its connection, are
    held until the last piece is taken: the callers take them all into a spool (`spooled`) before sending any.

    A failure once the messages are being read (the database gone) is logged, with how far it got, and raised.
    """
    async with db.sessionmaker() as session:
        await _begin_snapshot(session, sqlite=db.settings.is_sqlite)
        head = (await session.execute(_CHAT_HEAD, owned_chat_params(chat_id, user_id, team_id))).first()
        if head is None:
            raise NotFound(CHAT_NOT_FOUND)
        chat, slug, name, count = head
        async for piece in _chat_pieces(session, chat, slug, name, count, export_format, sqlite=db.settings.is_sqlite):
            yield piece


async def _chat_pieces(
    session: AsyncSession, chat: Chat, slug: str, name: str, count: int, export_format: ExportFormat, *, sqlite: bool
) -> AsyncGenerator[bytes]:
    """`chat_export` of a chat read (with its agent's slug and name, and its number of messages) in the snapshot
    the caller began (`_begin_snapshot`), which it goes on reading in: one chat's, or each of a page's."""
    # A chat of fewer messages than a batch is read as its first batch first: if that is all of it (not cut by
    # its weight), its branch shown is walked from those rows, one query fewer (docs/PERFORMANCE.md).
    first: list[_BatchRow] | None = None
    branch: _Branch | None = None
    written = 0
    try:
        if export_format != "markdown" and count < EXPORT_BATCH_MESSAGES:
            first = await _first_batch(session, chat.id, sqlite=sqlite)
            if _last_batch(first):
                branch = _branch_of(first, chat, count)
        if branch is None:
            branch = await _branch_shown(session, chat, count, sqlite=sqlite)
        pieces: AsyncIterator[bytes]
        if export_format == "markdown":
            yield export_markdown.markdown_head(chat.title, name, slug).encode()
            pieces = _markdown_pieces(session, chat.id, branch)
        else:
            layout = _LINE if export_format == "line" else _INDENTED
            yield _json_head(chat, slug, name, branch, layout).encode()
            pieces = _json_pieces(session, chat.id, layout, sqlite=sqlite, first=first)
        del branch, first  # the Markdown's pieces keep their own reference to the branch, the JSON's to the rows
        async for piece in pieces:
            written += len(piece)
            yield piece
            del piece  # not held while the next batch is read
    except Exception:
        logger.exception("the export of chat %s failed after %d bytes of messages", chat.id, written)
        raise


#: An export kept in memory up to this size while it is read; past it, in a temporary file.
SPOOL_MEMORY_BYTES = 1_048_576
#: A spooled export is sent this much at a time.
SPOOL_PIECE_BYTES = 65_536
Spool: TypeAlias = tempfile.SpooledTemporaryFile[bytes]


async def spooled(body: AsyncGenerator[bytes]) -> Spool:
    """The whole of `chat_export`, read at the database's pace into a spool (memory up to SPOOL_MEMORY_BYTES,
    then a temporary file), before anything is sent: the snapshot's connection goes back before the first
    byte, so a slow download holds a file, never a database connection; and a failure while reading (the
    database gone) is a plain error answer, never a download cut short. Memory stays a batch or two however
    long the chat; the disk holds the export until the response ends."""
    spool: Spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
    try:
        async for piece in body:
            spool.write(piece)
    except BaseException:
        spool.close()
        raise
    finally:
        await body.aclose()
    return spool


def spool_pieces(spool: Spool) -> Iterator[bytes]:
    """A spool's bytes from its start, SPOOL_PIECE_BYTES at a time."""
    spool.seek(0)
    while piece := spool.read(SPOOL_PIECE_BYTES):
        yield piece


async def _begin_snapshot(session: AsyncSession, *, sqlite: bool) -> None:
    """Start the session's transaction as one snapshot for all its reads. PostgreSQL: REPEATABLE READ, read only.
    SQLite: its driver starts a transaction only at a write, so each SELECT would read on its own; an explicit
    BEGIN makes the reads one read transaction (in WAL mode, one snapshot from the first read on)."""
    if sqlite:
        connection = await session.connection()
        await connection.exec_driver_sql("BEGIN")
        return
    await session.connection(execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True})


#: Chats with their agent and their number of messages (the bound of the branch walk).
_HEADS = select(
    Chat,
    Agent.slug,
    Agent.name,
    select(func.count()).select_from(Message).where(Message.chat_id == Chat.id).scalar_subquery(),
).join(Agent, Agent.id == Chat.agent_id)
#: The caller's chat, so.
_CHAT_HEAD = _HEADS.where(*OWNED_CHAT)


def _weight(message: type[Message], *, sqlite: bool) -> ColumnElement[int]:
    """What a message weighs in a batch, read without reading its text: its text's bytes and its metadata's
    (PostgreSQL: the text's length from its stored header, the metadata's stored size)."""
    if sqlite:
        meta: ColumnElement[int] = func.length(cast(message.meta, LargeBinary))
        return func.length(cast(message.content, LargeBinary)) + func.coalesce(meta, 0)
    return func.octet_length(message.content) + func.coalesce(func.pg_column_size(message.meta), 0)


class _Statements:
    """The single chat export's reads, built once per dialect (the weight of a message is written differently)."""

    def __init__(self, *, sqlite: bool) -> None:
        # The branch shown, from its first message to the leaf, each id with its weight: the walk up `parent_id`
        # from the leaf, within the chat, at most one step more than the chat has messages (as `_branch` stops).
        leaf = (
            select(Message.id, Message.parent_id, literal(1).label("depth"), _weight(Message, sqlite=sqlite))
            .where(Message.id == bindparam("leaf"), Message.chat_id == bindparam("cid"))
            .cte("branch", recursive=True)
        )
        parent = aliased(Message)
        step = (
            select(parent.id, parent.parent_id, leaf.c.depth + 1, _weight(parent, sqlite=sqlite))
            .join(leaf, parent.id == leaf.c.parent_id)
            .where(parent.chat_id == bindparam("cid"), leaf.c.depth <= bindparam("cap"))
        )
        walk = leaf.union_all(step)
        self.branch = select(walk.c[0], walk.c[3]).order_by(walk.c.depth.desc())
        self.first = self._batch(after=False, sqlite=sqlite)
        self.next = self._batch(after=True, sqlite=sqlite)

    @staticmethod
    def _batch(*, after: bool, sqlite: bool) -> Select[Message, datetime | None, uuid.UUID | None, int]:
        """A batch of the chat's messages in (created_at, id) order after a key: at most `batch` of them, and
        those only while the ones before weigh less than `budget` (always the first). Each comes with its
        parent's key (null for a first message, or for a parent outside the chat, which the export takes for a
        first message too) and the weight of the batch through it."""
        weight = _weight(Message, sqlite=sqlite)
        through = func.sum(weight).over(order_by=(Message.created_at, Message.id))
        keys = (
            select(Message.id, (through - weight).label("before"), through.label("through"))
            .where(Message.chat_id == bindparam("cid"))
            .order_by(Message.created_at, Message.id)
            .limit(bindparam("batch"))
        )
        if after:
            after_at = bindparam("after_at", type_=Message.created_at.type)
            after_id = bindparam("after_id", type_=Message.id.type)
            keys = keys.where(
                Message.created_at >= after_at,  # the index's column, for the scan to start there
                tuple_(Message.created_at, Message.id) > tuple_(after_at, after_id),
            )
        batch = keys.subquery()
        parent = aliased(Message)
        return (
            select(Message, parent.created_at, parent.id, batch.c.through)
            .join(batch, batch.c.id == Message.id)
            .outerjoin(parent, and_(parent.id == Message.parent_id, parent.chat_id == Message.chat_id))
            .where(batch.c.before < bindparam("budget"))
            .order_by(Message.created_at, Message.id)
        )


_STATEMENTS = {False: _Statements(sqlite=False), True: _Statements(sqlite=True)}


class _Branch:
    """The branch shown, root first, kept small: 16 bytes and one integer a message, whatever its text (a
    branch of 20,000 messages: 480 kB)."""

    __slots__ = ("ids", "weights")

    def __init__(self) -> None:
        self.ids = bytearray()
        self.weights = array("q")

    def append(self, message_id: uuid.UUID, weight: int) -> None:
        self.ids += message_id.bytes
        self.weights.append(weight)

    def __iter__(self) -> Iterator[tuple[uuid.UUID, int]]:
        for i, weight in enumerate(self.weights):
            yield uuid.UUID(bytes=bytes(self.ids[16 * i : 16 * i + 16])), weight


#: The branch shown is read this many rows at a time (a server-side cursor), when it can be longer.
BRANCH_ROWS = 1000


async def _branch_shown(session: AsyncSession, chat: Chat, count: int, *, sqlite: bool) -> _Branch:
    """The branch shown with its messages' weights, its rows read BRANCH_ROWS at a time: in one plain query when
    the walk cannot give more (at most one row more than the chat has messages), which is most chats, and saves
    a cursor's round trips each (docs/PERFORMANCE.md); through a cursor otherwise."""
    branch = _Branch()
    if chat.current_message_id is None:
        return branch
    params = {"leaf": chat.current_message_id, "cid": chat.id, "cap": count}
    if count < BRANCH_ROWS:
        for message_id, weight in (await session.execute(_STATEMENTS[sqlite].branch, params)).all():
            branch.append(message_id, weight or 0)
        return branch
    rows = await session.stream(_STATEMENTS[sqlite].branch, params)
    async for partition in rows.partitions(BRANCH_ROWS):
        for message_id, weight in partition:
            branch.append(message_id, weight or 0)
    return branch


#: A row of a batch of messages: the message, its parent's key (`_Statements._batch`), the batch's weight through it.
_BatchRow: TypeAlias = Row[Message, datetime | None, uuid.UUID | None, int]
_BatchQuery: TypeAlias = Select[Message, datetime | None, uuid.UUID | None, int]


async def _first_batch(session: AsyncSession, chat_id: uuid.UUID, *, sqlite: bool) -> list[_BatchRow]:
    """The chat's first batch of messages (`_Statements._batch`)."""
    params = {"cid": chat_id, "batch": EXPORT_BATCH_MESSAGES, "budget": EXPORT_BATCH_BYTES}
    return await _rows(session, _STATEMENTS[sqlite].first, params)


def _last_batch(rows: list[_BatchRow]) -> bool:
    """Whether a batch is the chat's last: fewer rows than a batch holds, and not cut by its weight."""
    return not rows or (len(rows) < EXPORT_BATCH_MESSAGES and (rows[-1][3] or 0) < EXPORT_BATCH_BYTES)


def _branch_of(rows: list[_BatchRow], chat: Chat, count: int) -> _Branch:
    """The branch shown walked from all of the chat's rows, as `_Statements.branch` walks it in the database: up
    `parent_id` from the current message, within the chat, at most `count` steps (a cycle walked round again),
    root first, each with its weight."""
    by_id: dict[uuid.UUID, tuple[Message, int]] = {}
    before = 0
    for message, _, _, through in rows:
        by_id[message.id] = (message, (through or 0) - before)
        before = through or 0
    walked: list[tuple[uuid.UUID, int]] = []
    found = by_id.get(chat.current_message_id) if chat.current_message_id else None
    while found is not None:
        message, weight = found
        walked.append((message.id, weight))
        if len(walked) > count:
            break
        found = by_id.get(message.parent_id) if message.parent_id else None
    branch = _Branch()
    for message_id, weight in reversed(walked):
        branch.append(message_id, weight)
    return branch


async def _messages_in_order(
    session: AsyncSession, chat_id: uuid.UUID, *, sqlite: bool, first: list[_BatchRow] | None = None
) -> AsyncIterator[list[Message]]:
    """Every message of the chat in the export's order, read a batch at a time in (created_at, id) order (the
    first batch given when it was read already).

    The export's order (the format's "oldest first, a parent before its children"; the order the export built
    whole had, which tests/test_export.py keeps as `oldest_first`) takes, again and again, the oldest message
    whose parent is already out (a message whose parent is not in the chat counts as a first one). Read in this
    order, every message not read yet is newer than every one read, so the oldest of those read whose parent
    is out is that message: each batch gives out all it can, and what waits for a parent not given out yet (a
    parent newer than its child, or as old with a larger id) is held until it is. Memory: one batch, plus
    such waiting messages (none in a chat this service wrote: a parent is always older).
    """
    statements = _STATEMENTS[sqlite]
    ready: list[tuple[datetime, uuid.UUID, Message]] = []
    waiting: dict[uuid.UUID, list[Message]] = {}
    held: set[uuid.UUID] = set()  # read, not given out yet
    query = statements.first
    params: dict[str, Any] = {"cid": chat_id, "batch": EXPORT_BATCH_MESSAGES, "budget": EXPORT_BATCH_BYTES}
    while True:
        rows: list[_BatchRow] = first if first is not None else await _rows(session, query, params)
        first = None
        for message, parent_at, parent_id, _ in rows:
            held.add(message.id)
            if parent_id is None or (
                parent_id not in held and (parent_at, parent_id) < (message.created_at, message.id)
            ):
                heapq.heappush(ready, (message.created_at, message.id, message))
            else:
                waiting.setdefault(parent_id, []).append(message)
        out: list[Message] = []
        while ready:
            _, _, message = heapq.heappop(ready)
            held.discard(message.id)
            out.append(message)
            for child in waiting.pop(message.id, ()):
                heapq.heappush(ready, (child.created_at, child.id, child))
        if out:
            yield out
        del out
        if _last_batch(rows):
            return  # the last batch (not one cut by its weight). What still waits is in a cycle: left out, as
            # the export built whole left it
        last = rows[-1][0]
        del rows
        query = statements.next
        params = {**params, "after_at": last.created_at, "after_id": last.id}


@dataclass(frozen=True)
class _Layout:
    """How `json.dumps` lays out a chat's document: every separator the export writes itself, as it writes it."""

    dumps: dict[str, Any]  # `json.dumps`' layout arguments
    no_branch: str  # how an empty `current_branch` ends up written, key included
    branch_open: str  # the ids of the branch shown: opened, separated, closed
    branch_separator: str
    branch_close: str
    no_messages_end: str  # the head ends with an empty `messages` and the document's end: this
    messages_open: str  # the messages: opened, separated, each message's line breaks replaced by this
    messages_separator: str
    message_line_break: str
    messages_close: str  # `]` and the document's end, with its final line break
    empty_close: str  # what closes a document without messages


#: The JSON export: `json.dumps(document, indent=2) + "\n"`. A message is two levels in.
_INDENTED = _Layout(
    dumps={"indent": 2},
    no_branch='"current_branch": []',
    branch_open="[\n    ",
    branch_separator=",\n    ",
    branch_close="\n  ]",
    no_messages_end="[]\n}",
    messages_open="[\n    ",
    messages_separator=",\n    ",
    message_line_break="\n    ",
    messages_close="\n  ]\n}\n",
    empty_close="[]\n}\n",
)
#: A line of the JSON Lines: `json.dumps(document, separators=(",", ":")) + "\n"`, no space, no line break.
_LINE = _Layout(
    dumps={"separators": (",", ":")},
    no_branch='"current_branch":[]',
    branch_open="[",
    branch_separator=",",
    branch_close="]",
    no_messages_end="[]}",
    messages_open="[",
    messages_separator=",",
    message_line_break="\n",
    messages_close="]}\n",
    empty_close="[]}\n",
)


def _json_head(chat: Chat, slug: str, name: str, branch: _Branch, layout: _Layout) -> str:
    """The chat's document (as `json.dumps` writes it in `layout`) up to its `messages` array."""
    document = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "id": str(chat.id),
        "title": chat.title,
        "agent": {"slug": slug, "name": name},
        "archived": chat.archived,
        "pinned": chat.pinned,
        "created_at": format_timestamp(chat.created_at),
        "updated_at": format_timestamp(chat.updated_at),
        "current_message_id": str(chat.current_message_id) if chat.current_message_id else None,
        "current_branch": [],
        "messages": [],
    }
    text = json.dumps(document, ensure_ascii=False, **layout.dumps)
    if branch.weights:
        # The ids written as `json.dumps` lays out a list of strings, without a string per id held at once.
        # Every other text of the document is quoted with its quotes escaped: only the key matches.
        ids = io.StringIO()
        separator = layout.branch_open
        for message_id, _ in branch:
            ids.write(f'{separator}"{message_id}"')
            separator = layout.branch_separator
        ids.write(layout.branch_close)
        text = text.replace(layout.no_branch, layout.no_branch.removesuffix("[]") + ids.getvalue(), 1)
    return text.removesuffix(layout.no_messages_end)


async def _rows(session: AsyncSession, query: _BatchQuery, params: dict[str, Any]) -> list[_BatchRow]:
    """A batch's rows."""
    return list((await session.execute(query, params)).all())


async def _json_pieces(
    session: AsyncSession, chat_id: uuid.UUID, layout: _Layout, *, sqlite: bool, first: list[_BatchRow] | None = None
) -> AsyncIterator[bytes]:
    """The `messages` array and the document's end, as `json.dumps(document, ...) + "\\n"` writes them in
    `layout`: the same bytes as the export built whole. A message's JSON has no raw line break (JSON escapes it
    in strings), so indenting its lines is indenting it."""
    separator = layout.messages_open
    empty = True
    async for batch in _messages_in_order(session, chat_id, sqlite=sqlite, first=first):
        parts: list[str] = []
        for message in batch:
            parts.append(separator)
            text = json.dumps(_message(message), ensure_ascii=False, **layout.dumps)
            parts.append(text.replace("\n", layout.message_line_break))
            separator = layout.messages_separator
        del batch
        empty = False
        piece = "".join(parts).encode()
        del parts
        yield piece
        del piece
    yield (layout.empty_close if empty else layout.messages_close).encode()


def _weighed(branch: _Branch) -> Iterator[list[uuid.UUID]]:
    """The branch's ids in batches of at most EXPORT_BATCH_MESSAGES weighing at most EXPORT_BATCH_BYTES (a
    heavier message alone)."""
    batch: list[uuid.UUID] = []
    weight = 0
    for message_id, size in branch:
        if batch and (len(batch) == EXPORT_BATCH_MESSAGES or weight + size > EXPORT_BATCH_BYTES):
            yield batch
            batch, weight = [], 0
        batch.append(message_id)
        weight += size
    if batch:
        yield batch


async def _markdown_pieces(session: AsyncSession, chat_id: uuid.UUID, branch: _Branch) -> AsyncIterator[bytes]:
    """The Markdown's messages (the branch shown, read by id a batch at a time) and its final line break."""
    for ids in _weighed(branch):
        query = select(Message).where(Message.chat_id == chat_id, Message.id.in_(ids))
        by_id = {m.id: m for m in (await session.execute(query)).scalars()}
        piece = "".join(export_markdown.markdown_message(_message(by_id[i])) for i in ids if i in by_id).encode()
        del by_id
        yield piece
        del piece
    yield b"\n"


async def export_lines(*, db: Database, user_id: uuid.UUID, team_id: uuid.UUID) -> AsyncIterator[bytes]:
    """Every chat of the user, one JSON document per line, oldest chat first.

    A page of EXPORT_PAGE_CHATS chats at a time (keyset paging on creation time and id): the chats with their
    agents and numbers of messages in one query, then each chat as one chat's export reads it (`_chat_pieces`:
    a batch of messages at a time), all in ONE read-only snapshot (as `chat_export`'s), into one spool (memory
    up to SPOOL_MEMORY_BYTES, then a temporary file); the session is closed, and only then is the page sent.
    Memory stays a batch or two and the spool's first MiB however long a chat and however many; a slow reader
    holds no database connection; and a transaction a page rather than a chat takes much of the cost of many
    small chats away (docs/PERFORMANCE.md). Each page is one consistent view of its chats; a chat created or
    deleted between two pages is in the export or not, whole either way.

    If reading fails (the database gone), the page's lines read whole before the failure are sent, then the
    error is raised: the download ends after its last whole line, cut, never with a line in part.
    """
    sqlite = db.settings.is_sqlite
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        spool: Spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        try:
            whole = 0  # the spool's bytes up to the end of its last whole line
            failure: Exception | None = None
            page: list[tuple[uuid.UUID, datetime]] = []
            async with db.sessionmaker() as session:
                await _begin_snapshot(session, sqlite=sqlite)
                query = (
                    _HEADS.where(Chat.user_id == user_id, Chat.team_id == team_id)
                    .order_by(Chat.created_at, Chat.id)
                    .limit(EXPORT_PAGE_CHATS)
                )
                if after is not None:
                    query = query.where(tuple_(Chat.created_at, Chat.id) > tuple_(*after))
                heads = (await session.execute(query)).all()
                page = [(chat.id, chat.created_at) for chat, *_ in heads]
                try:
                    for chat, slug, name, count in heads:
                        async for piece in _chat_pieces(session, chat, slug, name, count, "line", sqlite=sqlite):
                            spool.write(piece)
                            del piece
                        whole = spool.tell()
                except Exception as error:  # sent below, after the lines read whole: not raised in the session
                    failure = error
                del heads
            spool.truncate(whole)
            for piece in spool_pieces(spool):
                yield piece
            if failure is not None:
                raise failure
        finally:
            spool.close()
        if len(page) < EXPORT_PAGE_CHATS:
            return
        chat_id, created_at = page[-1]
        after = (created_at, chat_id)
