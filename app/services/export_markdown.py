"""The Markdown export's text (docs/SHARING.md): a chat's title, agent and messages as Markdown that a
CommonMark renderer shows as written: the export's own headings only, raw HTML and images shown as text, code
left as it is. Pure text, no database: app.services.exports reads the chat and calls it."""

from __future__ import annotations

import bisect
import html
import re
from typing import Any

from app.chat_schemas import format_timestamp
from app.db import utcnow
from app.services.chats import UNTITLED


def one_line(text: str) -> str:
    """A name, title or error on one line of the Markdown, its HTML shown as text (`_html_as_text`)."""
    return _html_as_text(" ".join(text.split()))


#: In Markdown outside code, what `_html_as_text` escapes: a `<` that starts raw HTML (CommonMark's tags,
#: comments, declarations, processing instructions: `<` then a letter, `/`, `!` or `?`), and the `!` that makes
#: a link an image (`![alt](url)`); and what it keeps (group 1): a backslash escape (a backslash before ASCII
#: punctuation: `\\<` is shown as `<` already), or an autolink (`<https://example.com>`, `<me@example.com>`),
#: a link rather than HTML.
_HTML_OUTSIDE_CODE = re.compile(
    r"(\\[!-/:-@\[-`{-~]"
    r"|<[A-Za-z][A-Za-z0-9+.-]{1,31}:[^\x00-\x20<>]*>"
    r"|<[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*>)"
    r"|<(?=[A-Za-z/!?])|!(?=\[)"
)
#: What may open a code span: a run of backticks not escaped (a backslash escape is matched first, and skipped).
_CODE_OPENING = re.compile(r"\\[!-/:-@\[-`{-~]|`+")
_BACKTICKS = re.compile("`+")
#: A link's destination or title (`[a](`)`) and a reference's label (`[a][`]`, `[`]: /u`) take backticks before a
#: code span can: a line with one of these is read with no code span (`_html_as_text`).
_LINK_PARTS = ("](", "][", "]:")
#: Line endings as CommonMark reads them: a carriage return alone ends a line too.
_LINE_ENDING = re.compile(r"\r\n|\r|\n")


def _escape_html(found: re.Match[str]) -> str:
    return found.group(1) or "\\" + found.group()


def _html_as_text(line: str, *, code_spans: bool = True) -> str:
    """A line of Markdown with its raw HTML escaped (`\\<h1>`), so a renderer shows it as the text it is, and
    its images as links to them (`\\![alt](url)`), as the web client does (docs/WEB_CLIENT.md): not a heading,
    no image fetched (a tracking pixel), no `<details>` or comment hiding what follows, nor a block swallowing
    the next messages. Left as written: code spans (a backslash is text there), autolinks, what is escaped
    already, and a `<` that starts no HTML (`a < b`). A code span is looked for on its line only: one spanning
    lines shows a backslash before a `<` in it, which is safer than a tag taken for code; and so does a code
    span when the caller cannot vouch for it (`code_spans=False`: a backtick on an earlier line of the
    paragraph) or a link's or reference's parts could take its backticks (`_LINK_PARTS`)."""
    if "<" not in line and "![" not in line:
        return line
    if "`" not in line or not code_spans or any(part in line for part in _LINK_PARTS):
        return _HTML_OUTSIDE_CODE.sub(_escape_html, line)
    runs: dict[int, list[int]] = {}  # where each run of backticks starts, by its length: a code span's closings
    for run in _BACKTICKS.finditer(line):
        runs.setdefault(len(run.group()), []).append(run.start())
    out: list[str] = []
    at = 0
    for opening in _CODE_OPENING.finditer(line):
        text = opening.group()
        if opening.start() < at or text[0] != "`":  # inside a code span already copied, or an escape
            continue
        # A code span runs to the next run of as many backticks, if there is one (an opening after an escaped
        # backtick may be shorter than any run: `\\``).
        closings = runs.get(len(text), [])
        closing = bisect.bisect_left(closings, opening.end())
        if closing < len(closings):
            end = closings[closing] + len(text)
            out.append(_HTML_OUTSIDE_CODE.sub(_escape_html, line[at : opening.start()]))
            out.append(line[opening.start() : end])
            at = end
    out.append(_HTML_OUTSIDE_CODE.sub(_escape_html, line[at:]))
    return "".join(out)


#: A code fence's opening or closing line (CommonMark): up to three spaces, then 3+ backticks or tildes.
FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
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
#: What a heading's text loses once rendered: emphasis, code and escape marks; and tags, which are shown as text
#: (`_html_as_text`) but still name the role they wrap (`## <b>User</b>`): when unsure, escape.
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


def message_markdown(text: str) -> str:
    """A message's text as the export writes it, as a reader sees it but unable to change the export's outline:

    - its raw HTML is shown as text (`_html_as_text`), as the web client shows it;
    - a line that would render as one of the export's role headings (`## User`, `# assistant`, `User` over
      `---`...) is escaped, so it shows as the text it is: a message cannot show a reader a turn nobody took
      (its other headings, and any line inside code, are left as they are);
    - a code fence it leaves open is closed: an answer cut inside one (a stop, an error) would otherwise turn
      every later message of the export into code.

    Code is read line by line, so only where that reading is sure: a code span whose paragraph has no backtick
    on an earlier line (one may open a span that this line closes), and a fence at the line's start. A fence
    indented 1-3 spaces may be a list item's, which a line less indented ends (it leaves the item): its lines
    have their raw HTML escaped all the same (a backslash shown in code, never a tag taken for code), and it is
    closed at its own indentation before such a line, and at the message's end, which closes it either way.
    """
    fence: str | None = None
    indent = 0  # the open fence's indentation: more than 0, it may be a list item's
    ticked = False  # a backtick (or a link's parts) on an earlier line of this paragraph, as far as known
    paragraph: list[str] = []  # the lines of the paragraph so far: a setext underline makes them a heading
    out: list[str] = []
    for line in _LINE_ENDING.split(text):
        if fence is not None and indent and line.strip() and len(line) - len(line.lstrip(" ")) < indent:
            out.append(" " * indent + fence)  # a list item's fence would end here with its item: both end now
            fence, indent, ticked = None, 0, False
            paragraph.clear()
        found = FENCE.match(line)
        if found is not None and (fence is not None or not (found.group(1)[0] == "`" and "`" in line[found.end() :])):
            # A fence's line (a backtick fence's info string holds no backtick, else it is a line of text).
            run, rest = found.group(1), line[found.end() :]
            if fence is None:
                fence, indent = run, found.start(1)
                line = _html_as_text(line, code_spans=False) if indent else line  # its info string
            elif run[0] == fence[0] and len(run) >= len(fence) and not rest.strip(" \t"):
                fence, indent = None, 0
            elif indent:
                line = _html_as_text(line, code_spans=False)
            paragraph.clear()
            ticked = False
        elif fence is None or indent:
            line = _outside_blocks(_html_as_text(line, code_spans=not (ticked or indent)), paragraph)
            ticked = bool(line.strip()) and (ticked or "`" in line or any(part in line for part in _LINK_PARTS))
        out.append(line)
    if fence is not None:
        out.append(" " * indent + fence)
    return "\n".join(out)


def heading_text(title: str) -> str:
    """A title as an ATX heading's text: a final `#` escaped, which Markdown would take for a closing one."""
    return title[:-1] + "\\#" if title.endswith("#") else title


def markdown_head(title: str | None, agent_name: str, agent_slug: str) -> str:
    """The Markdown's title, agent and export time (each message adds its own lines after)."""
    lines = [
        f"# {heading_text(one_line(title or '') or UNTITLED)}",
        "",
        f"Agent: {one_line(agent_name)} (`{agent_slug}`)  ",
        f"Exported: {format_timestamp(utcnow())}",
    ]
    return "\n".join(lines)


def markdown_message(message: dict[str, Any]) -> str:
    """One exported message as the Markdown shows it, each of its lines after a line break."""
    heading = "User" if message["role"] == "user" else "Assistant"
    if message["status"] != "complete":
        heading += f" ({message['status']})"
    lines = ["", "---", "", f"## {heading}", "", f"_{message['created_at']}_", ""]
    lines.append(message_markdown(message["content"]) if message["content"] else "_(no text)_")
    for f in message.get("files") or []:  # named only: an export never carries a file's bytes
        lines += ["", f"Attached: {one_line(f['filename'])} ({one_line(f['content_type'])}, {f['size']} bytes)"]
    if message["error"]:
        lines += ["", f"> Error: {one_line(str(message['error'].get('message', '')))}"]
    return "".join("\n" + line for line in lines)
