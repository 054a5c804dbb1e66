"""Chat exports in the format of docs/SHARING.md (version 1): one chat as JSON (every branch) or Markdown (the
branch shown), and every chat of a user as JSON Lines, read page by page while it is sent."""

from __future__ import annotations

import heapq
import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat_schemas import format_timestamp
from app.db import Database, utcnow
from app.errors import NotFound
from app.models import Agent, Chat, Message, User
from app.services.chats import CHAT_NOT_FOUND, OWNED_CHAT, UNTITLED, owned_chat_params
from app.share_schemas import EXPORT_FORMAT, EXPORT_VERSION

#: Chats read per query by the JSON Lines export: its memory is one page, whatever the number of chats.
EXPORT_PAGE_CHATS = 20
#: ... and at most this many messages (but always one chat): 20 chats of thousands of messages each were one
#: page, held whole (about four times their text) while it was sent.
EXPORT_PAGE_MESSAGES = 1000


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


def _oldest_first(messages: Sequence[Message]) -> list[Message]:
    """Oldest first, and a parent always before its children (even when two share a timestamp)."""
    children: dict[uuid.UUID | None, list[Message]] = {}
    ids = {m.id for m in messages}
    for m in messages:
        children.setdefault(m.parent_id if m.parent_id in ids else None, []).append(m)
    ready = [(m.created_at, m.id, m) for m in children.get(None, [])]
    heapq.heapify(ready)
    ordered: list[Message] = []
    while ready:
        _, _, m = heapq.heappop(ready)
        ordered.append(m)
        for child in children.get(m.id, []):
            heapq.heappush(ready, (child.created_at, child.id, child))
    return ordered


def _branch(messages: Sequence[Message], leaf: uuid.UUID | None) -> list[Message]:
    """The path from a first message to `leaf`, root first."""
    by_id = {m.id: m for m in messages}
    path: list[Message] = []
    node = by_id.get(leaf) if leaf is not None else None
    while node is not None and len(path) <= len(by_id):
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id is not None else None
    path.reverse()
    return path


def chat_document(chat: Chat, agent_slug: str, agent_name: str, messages: Sequence[Message]) -> dict[str, Any]:
    """One chat in the export format: every message of every branch (oldest first, linked by `parent_id`),
    `current_message_id` the leaf of the branch shown and `current_branch` that branch's ids."""
    ordered = _oldest_first(messages)
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "id": str(chat.id),
        "title": chat.title,
        "agent": {"slug": agent_slug, "name": agent_name},
        "archived": chat.archived,
        "pinned": chat.pinned,
        "created_at": format_timestamp(chat.created_at),
        "updated_at": format_timestamp(chat.updated_at),
        "current_message_id": str(chat.current_message_id) if chat.current_message_id else None,
        "current_branch": [str(m.id) for m in _branch(ordered, chat.current_message_id)],
        "messages": [_message(m) for m in ordered],
    }


async def export_chat(*, session: AsyncSession, user: User, chat_id: uuid.UUID) -> dict[str, Any]:
    """The caller's chat in the export format (missing, another user's or another team's: 404)."""
    query = _chats_with_messages().where(*OWNED_CHAT)
    rows = (await session.execute(query, owned_chat_params(chat_id, user.id, user.team_id))).all()
    if not rows:
        raise NotFound(CHAT_NOT_FOUND)
    chat, slug, name, _ = rows[0]
    return chat_document(chat, slug, name, [row[3] for row in rows if row[3] is not None])


def _chats_with_messages() -> Select[Chat, str, str, Message]:
    """Chats with their agent and every message (one row each; one with no message for an empty chat), in ONE
    statement: its one snapshot keeps a chat and its messages consistent. Read in two, a send committing in
    between gave a chat's first messages without its current message, and a deletion its current message
    without any message: exports no import takes back."""
    return (
        select(Chat, Agent.slug, Agent.name, Message)
        .join(Agent, Agent.id == Chat.agent_id)
        .outerjoin(Message, Message.chat_id == Chat.id)
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


#: A code fence's opening or closing line (CommonMark): up to three spaces, then 3+ backticks or tildes.
FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
#: The HTML blocks (CommonMark kinds 1-5) that run until a closing text, not until a blank line: left open at
#: an answer's end, each swallows every later message of the export when rendered. Each with its closer.
HTML_BLOCKS = (
    (re.compile(r" {0,3}<(pre|script|style|textarea)(\s|>|$)", re.IGNORECASE), None),
    (re.compile(r" {0,3}<!--"), "-->"),
    (re.compile(r" {0,3}<\?"), "?>"),
    (re.compile(r" {0,3}<![A-Za-z]"), ">"),
    (re.compile(r" {0,3}<!\[CDATA\["), "]]>"),
)


def _html_block(line: str) -> str | None:
    """The closer of the HTML block `line` opens and leaves open, if it does."""
    for start, closer in HTML_BLOCKS:
        found = start.match(line)
        if found is None:
            continue
        closer = closer or f"</{found.group(1).lower()}>"
        rest = line[found.end() :] if closer != ">" else line[found.end() - 1 :]
        return None if closer in rest.lower() else closer
    return None


def _blocks_closed(text: str) -> str:
    """`text` with a code fence or an HTML block it leaves open closed: an answer cut inside one (a stop, an
    error) would otherwise turn every later message of the export into code, or hide it in HTML."""
    fence: str | None = None
    html: str | None = None
    for line in text.split("\n"):
        if html is not None:
            if html in line.lower():
                html = None
            continue
        found = FENCE.match(line)
        if found is not None:
            run, rest = found.group(1), line[found.end() :]
            if fence is None:
                if not (run[0] == "`" and "`" in rest):  # a backtick fence's info string holds no backtick
                    fence = run
            elif run[0] == fence[0] and len(run) >= len(fence) and not rest.strip():
                fence = None
        elif fence is None:
            html = _html_block(line)
    if fence is not None:
        return text + "\n" + fence
    return text if html is None else text + "\n" + html


def _heading_text(title: str) -> str:
    """A title as an ATX heading's text: a final `#` escaped, which Markdown would take for a closing one."""
    return title[:-1] + "\\#" if title.endswith("#") else title


def chat_markdown(document: dict[str, Any]) -> str:
    """The branch shown of an exported chat as Markdown: a title, who answered, then each message in turn."""
    by_id = {m["id"]: m for m in document["messages"]}
    agent = document["agent"]
    lines = [
        f"# {_heading_text(_one_line(document['title'] or '') or UNTITLED)}",
        "",
        f"Agent: {_one_line(agent['name'])} (`{agent['slug']}`)  ",
        f"Exported: {format_timestamp(utcnow())}",
    ]
    for message_id in document["current_branch"]:
        message = by_id[message_id]
        heading = "User" if message["role"] == "user" else "Assistant"
        if message["status"] != "complete":
            heading += f" ({message['status']})"
        lines += ["", "---", "", f"## {heading}", "", f"_{message['created_at']}_", ""]
        lines.append(_blocks_closed(message["content"]) if message["content"] else "_(no text)_")
        for f in message.get("files") or []:  # named only: an export never carries a file's bytes
            lines += ["", f"Attached: {_one_line(f['filename'])} ({_one_line(f['content_type'])}, {f['size']} bytes)"]
        if message["error"]:
            lines += ["", f"> Error: {_one_line(str(message['error'].get('message', '')))}"]
    return "\n".join(lines) + "\n"


async def export_lines(*, db: Database, user_id: uuid.UUID, team_id: uuid.UUID) -> AsyncIterator[bytes]:
    """Every chat of the user, one JSON document per line, oldest chat first.

    Chats are read EXPORT_PAGE_CHATS at a time, fewer when they hold more than EXPORT_PAGE_MESSAGES messages
    together (keyset paging on creation time and id), each page in its own short session that is closed
    before its lines are sent: memory and connections stay bounded however many chats there are (by one
    chat when a chat alone is larger), and a slow reader holds no database connection.
    """
    after: tuple[Any, uuid.UUID] | None = None
    while True:
        async with db.sessionmaker() as session:
            candidates = (
                select(Chat.id, Chat.created_at, Chat.message_count)
                .where(Chat.user_id == user_id, Chat.team_id == team_id)
                .order_by(Chat.created_at, Chat.id)
                .limit(EXPORT_PAGE_CHATS)
            )
            if after is not None:
                candidates = candidates.where(tuple_(Chat.created_at, Chat.id) > tuple_(*after))
            rows = (await session.execute(candidates)).all()
            if not rows:
                return
            ids: list[uuid.UUID] = []
            total = 0
            for chat_id, created_at, message_count in rows:
                total += message_count
                if ids and total > EXPORT_PAGE_MESSAGES:
                    break
                ids.append(chat_id)
                after = (created_at, chat_id)
            # The chats and their messages in one statement (one snapshot); a chat deleted since is left out.
            query = _chats_with_messages().where(Chat.id.in_(ids))
            page: dict[uuid.UUID, tuple[Chat, str, str, list[Message]]] = {}
            for chat, slug, name, message in (await session.execute(query)).all():
                messages = page.setdefault(chat.id, (chat, slug, name, []))[3]
                if message is not None:
                    messages.append(message)
        chats = sorted(page.values(), key=lambda entry: (entry[0].created_at, entry[0].id))
        for chat, slug, name, messages in chats:
            document = chat_document(chat, slug, name, messages)
            yield json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        if len(rows) < EXPORT_PAGE_CHATS and len(ids) == len(rows):
            return
