"""Chat exports in the format of docs/SHARING.md (version 1): one chat as JSON (every branch) or Markdown (the
branch shown), and every chat of a user as JSON Lines, read page by page while it is sent."""

from __future__ import annotations

import heapq
import html
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

#: The HTML blocks that run until a blank line: kind 6 (a block tag such as `<div>` or `</p>`, which may
#: start inside a paragraph) and kind 7 (any other tag alone on its line, which may not). Inside one nothing is
#: Markdown: no heading, no code fence.
HTML_UNTIL_BLANK = re.compile(
    r" {0,3}</?(address|article|aside|base|basefont|blockquote|body|caption|center|col|colgroup|dd|details|"
    r"dialog|dir|div|dl|dt|fieldset|figcaption|figure|footer|form|frame|frameset|h[1-6]|head|header|hr|html|"
    r"iframe|legend|li|link|main|menu|menuitem|nav|noframes|ol|optgroup|option|p|param|search|section|summary|"
    r"table|tbody|td|tfoot|th|thead|title|tr|track|ul)(?:[ \t>]|/>|$)",
    re.IGNORECASE,
)
HTML_TAG_LINE = re.compile(
    r" {0,3}(?:<[A-Za-z][A-Za-z0-9-]*(?:[ \t]+[A-Za-z_:][A-Za-z0-9_.:-]*"
    r"(?:[ \t]*=[ \t]*(?:[^ \t\"'=<>`]+|'[^']*'|\"[^\"]*\"))?)*[ \t]*/?>|</[A-Za-z][A-Za-z0-9-]*[ \t]*>)[ \t]*"
)


#: Any of these ends a `<pre>`, `<script>`, `<style>` or `<textarea>` block, not only its own.
RAW_CLOSERS = ("</pre>", "</script>", "</style>", "</textarea>")


def _closes(closer: str, text: str) -> bool:
    """Whether `text` ends the HTML block whose closer is `closer`."""
    text = text.lower()
    return any(c in text for c in RAW_CLOSERS) if closer in RAW_CLOSERS else closer in text


def _html_block(line: str) -> str | None:
    """The closer of the HTML block `line` opens and leaves open, if it does."""
    for start, closer in HTML_BLOCKS:
        found = start.match(line)
        if found is None:
            continue
        closer = closer or f"</{found.group(1).lower()}>"
        rest = line[found.end() :] if closer != ">" else line[found.end() - 1 :]
        return None if _closes(closer, rest) else closer
    return None


#: What the export's own role headings read once rendered (`User`, `Assistant (error)`), in any case.
ROLE_HEADING = re.compile(r"(user|assistant)( ?\([^()]{0,40}\))?:?", re.IGNORECASE)
#: Longer text (with its marks, tags and entities) does not read as one.
ROLE_HEADING_MAX_CHARS = 1000
#: An ATX heading (CommonMark): up to three spaces, one to six `#`, then its text after a space or tab (or
#: none), an optional closing run of `#` dropped.
ATX_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
#: A setext heading's underline: it makes the paragraph just above it a heading.
SETEXT_UNDERLINE = re.compile(r" {0,3}(?:=+|-+)[ \t]*")
#: A thematic break (`* * *`): it ends a paragraph, so no underline below makes that paragraph a heading.
THEMATIC_BREAK = re.compile(r" {0,3}(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,})")
#: A block quote's or list item's first line: what follows it on the line is not at the document's top level.
CONTAINER_START = re.compile(r" {0,3}(?:>|[-+*](?:[ \t]|$)|[0-9]{1,9}[.)](?:[ \t]|$))")
#: What a heading's text loses once rendered: emphasis, code and escape marks, and inline HTML tags.
_MARKS = re.compile(r"[*_`\\]")
_TAGS = re.compile(r"</?[A-Za-z][^>]*>")


def _reads_as_role(text: str) -> bool:
    """Whether a heading of this text would read as one of the export's role headings (`## User`)."""
    shown = " ".join(_MARKS.sub("", html.unescape(_TAGS.sub("", text))).split())
    return ROLE_HEADING.fullmatch(shown.lstrip("# ")) is not None  # `\## User` over `===` reads as one too


def _ends_as_role(paragraph: list[str]) -> bool:
    """Whether the paragraph's last lines read as a role heading: the paragraph as tracked may start before the
    heading's (after a quote or a list item), so each of its ends is checked, up to a heading's length."""
    text = ""
    for line in reversed(paragraph):
        text = line + " " + text
        if len(text) > ROLE_HEADING_MAX_CHARS:
            return False
        if _reads_as_role(text):
            return True
    return False


def _escaped(line: str) -> str:
    """`line` with a backslash before its first mark (`#`, `=`, `-`): shown as the text it is, not a heading."""
    indent = len(line) - len(line.lstrip(" "))
    return line[:indent] + "\\" + line[indent:]


def _outside_blocks(line: str, paragraph: list[str]) -> str:
    """A line outside code and HTML, escaped if it would make a role heading; `paragraph` (the lines of the
    paragraph open, which an underline would make a heading) is updated in place. When unsure whether a line
    is in a paragraph, the guess is the one that escapes more: a role's name shown with a backslash, never a
    fake turn."""
    heading = ATX_HEADING.fullmatch(line)
    if heading is not None:
        if _reads_as_role(heading.group(1) or ""):
            paragraph.append(line)  # now a line of text: an underline below could make it a heading
            return _escaped(line)
        paragraph.clear()
    elif paragraph and SETEXT_UNDERLINE.fullmatch(line):
        if _ends_as_role(paragraph):
            paragraph.append(line)
            return _escaped(line)
        if "-" in line:
            paragraph.clear()  # a heading, or a thematic break: the paragraph ends either way
        else:
            paragraph.append(line)  # a heading, or text if no paragraph was open: guessed text
    elif not line.strip() or THEMATIC_BREAK.fullmatch(line):
        paragraph.clear()
    elif (container := CONTAINER_START.match(line)) is not None:
        # A quote's or list item's text is not at the top level, but the lines after it may continue it (lazily)
        # if it is a paragraph: then a paragraph of its own, which no role reads as.
        rest = line[container.end() :]
        while (inner := CONTAINER_START.match(rest)) is not None:
            rest = rest[inner.end() :]
        paragraph.clear()
        if rest.strip() and not (ATX_HEADING.fullmatch(rest) or THEMATIC_BREAK.fullmatch(rest) or FENCE.match(rest)):
            paragraph.append(line)
    elif paragraph or not line.startswith(("    ", "\t")):  # not indented code
        paragraph.append(line)
    return line


def _message_markdown(text: str) -> str:
    """A message's text as the export writes it, as a reader sees it but unable to change the export's outline:

    - a line that would render as one of the export's role headings (`## User`, `# assistant`, `User` over
      `---`...) is escaped, so it shows as the text it is: a message cannot show a reader a turn nobody took
      (its other headings, and any line inside code or an HTML block, are left as they are);
    - a code fence or an HTML block it leaves open is closed: an answer cut inside one (a stop, an error)
      would otherwise turn every later message of the export into code, or hide it in HTML.
    """
    fence: str | None = None
    html_closer: str | None = None
    html_until_blank = False
    paragraph: list[str] = []  # the lines of the paragraph so far: a setext underline makes them a heading
    out: list[str] = []
    for line in text.split("\n"):
        if html_closer is not None:
            if _closes(html_closer, line):
                html_closer = None
            out.append(line)
            continue
        if html_until_blank:
            html_until_blank = bool(line.strip())
            out.append(line)
            continue
        found = FENCE.match(line)
        if found is not None:
            run, rest = found.group(1), line[found.end() :]
            if fence is None:
                if not (run[0] == "`" and "`" in rest):  # a backtick fence's info string holds no backtick
                    fence = run
            elif run[0] == fence[0] and len(run) >= len(fence) and not rest.strip():
                fence = None
            paragraph.clear()
        elif fence is None:
            html_closer = _html_block(line)
            if html_closer is not None:
                paragraph.clear()
            elif HTML_UNTIL_BLANK.match(line) or (
                not paragraph and HTML_TAG_LINE.fullmatch(line) and not HTML_BLOCKS[0][0].match(line)
            ):
                html_until_blank = True
                paragraph.clear()
            else:
                line = _outside_blocks(line, paragraph)
        out.append(line)
    if fence is not None:
        out.append(fence)
    elif html_closer is not None:
        out.append(html_closer)
    return "\n".join(out)


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
        lines.append(_message_markdown(message["content"]) if message["content"] else "_(no text)_")
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
