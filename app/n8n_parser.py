"""The n8n answer parser: bytes n8n (or a proxy) sends in any format, text chunks or a StreamFailure out; no I/O."""

from __future__ import annotations

import codecs
import json
from typing import Any

NDJSON_TYPES = {"begin", "item", "end", "error"}
SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")
UTF8_BOM = b"\xef\xbb\xbf"
EXCERPT_CHARS = 300
#: What ends an excerpt that was cut.
CUT_MARK = "…"


#: The `empty_response` failure's message: an answer that ended without any text (app.generations too, for one
#: ended by a `done` callback).
EMPTY_ANSWER = "The agent returned an empty answer"


class StreamFailure(Exception):
    """One terminal failure of a generation: `code` and a short `message` safe to show the client.

    `detail` goes to the error log for admins: no secrets, no raw upstream body (at most a short
    sanitized excerpt of n8n's own `message`/`hint` text).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        upstream_status: int | None = None,
        detail: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.upstream_status = upstream_status
        self.detail = detail or {}
        #: Seconds n8n (or a proxy in front of it) asked to wait before trying again: its `Retry-After` on a
        #: 429 or 503 (app.upstream.retry_after_seconds); the terminal event and `/v1` pass it on.
        self.retry_after = retry_after


def clean_text(text: str) -> str:
    """Text PostgreSQL can store and UTF-8 can carry: U+0000 and lone surrogates become replacements."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def excerpt(value: Any) -> str | None:
    """Short single-line text for the error log; None for anything that is not text."""
    if not isinstance(value, str):
        return None
    text = " ".join(clean_text(value).replace("\ufffd", "").split())
    return text[:EXCERPT_CHARS] + (CUT_MARK if len(text) > EXCERPT_CHARS else "")


#: Secret header values shorter than this are not masked (they would mask ordinary words).
MIN_MASKED_SECRET = 4


def masked(text: str, secrets: list[str]) -> str:
    """`text` with every secret header value replaced by `***` (a workflow may echo its request headers), and
    a secret's beginning at the very end too (an answer, or what was kept of it, cut inside a secret), or
    just before the `…` of a cut `excerpt`. Each secret as written inside a JSON string too (an answer whose
    `output` is an object is shown as its JSON, where `"` and `\\` are escaped, and, from `ensure_ascii`
    encoders, any non-ASCII character), and as `excerpt` writes it (a value may hold tabs and runs of spaces,
    which it folds into one space)."""
    forms = {
        form
        for secret in secrets
        for form in (
            secret,
            json.dumps(secret, ensure_ascii=False)[1:-1],
            json.dumps(secret)[1:-1],
            " ".join(secret.split()),
        )
    }
    secrets = sorted((secret for secret in forms if len(secret) >= MIN_MASKED_SECRET), key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    mark = CUT_MARK if text.endswith(CUT_MARK) else ""
    text = text.removesuffix(mark)
    for secret in secrets:
        for size in range(min(len(secret) - 1, len(text)), MIN_MASKED_SECRET - 1, -1):
            if text.endswith(secret[:size]):
                text = text[:-size] + "***"
                break
    return text + mark


#: The most tokens one count may hold: the ledger's columns are 32-bit integers.
TOKENS_MAX = 2**31 - 1


def usage_of(value: Any) -> tuple[int, int] | None:
    """Token counts a workflow reported as `usage`: `{input_tokens, output_tokens}` or OpenAI's
    `{prompt_tokens, completion_tokens}`; None when absent or not two non-negative integers."""
    if not isinstance(value, dict):
        return None
    for names in (("input_tokens", "output_tokens"), ("prompt_tokens", "completion_tokens")):
        pair = value.get(names[0]), value.get(names[1])
        if all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= TOKENS_MAX for n in pair):
            return int(pair[0]), int(pair[1])  # type: ignore[arg-type]
    return None


def add_usages(before: tuple[int, int] | None, more: tuple[int, int] | None) -> tuple[int, int] | None:
    """Two reports of token usage added up, each sum held at TOKENS_MAX: the ledger could not store more, and
    the answer's final write would then fail (the answer lost)."""
    if more is None:
        return before
    if before is None:
        return more
    return min(before[0] + more[0], TOKENS_MAX), min(before[1] + more[1], TOKENS_MAX)


#: What a JSON parser may raise on text it cannot read: ValueError, or RecursionError for deep nesting.
UNREADABLE_JSON = (ValueError, RecursionError)


def _is_high_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udbff"


def _text_of(value: Any) -> str | None:
    """The answer text of one JSON value: a string, or `output ?? text ?? message ?? content` of an object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("output", "text", "message", "content"):
            if value.get(key) is not None:
                inner = value[key]
                return inner if isinstance(inner, str) else json.dumps(inner, ensure_ascii=False)
    return None


class BodyParser:
    """Incremental parser of an n8n answer, judged by its body (the Content-Type is not trusted).

    The first non-blank line decides the format: `{"type": ...}` is n8n's NDJSON, `data:`/`event:`/`:` is
    SSE, anything else is buffered (within the answer cap) and read at the end as one JSON value or plain
    text. Lines are split on `\\n` bytes, so lines cut across reads, many lines per read, CRLF and UTF-8
    characters cut across reads all work. `feed()` returns the text chunks found; an in-band error or an
    invalid line sets `failure`, and `finished` tells the caller to stop reading (`[DONE]`, error).
    """

    def __init__(self, *, max_line_bytes: int, max_response_bytes: int) -> None:
        self.max_line = max_line_bytes
        self.max_total = max_response_bytes
        #: The text encoding of the answer (`use_charset`); UTF-8 unless the answer declares another.
        self.charset = "utf-8"
        #: False for encodings where `\n`, `{` or `:` are not single ASCII bytes (UTF-16...): no line modes.
        self.ascii_lines = True
        self.mode: str | None = None
        self.total = 0
        self.chunks = 0
        self.failure: StreamFailure | None = None
        self.finished = False
        #: Tokens in/out the workflow reported (`usage` of a JSON answer or of a streamed `end` item's metadata).
        self.usage: tuple[int, int] | None = None
        #: What a whole-body answer turned out to be: "json" or "text" (None until one was read).
        self._whole: str | None = None
        self._buffer = bytearray()
        self._sse_data: list[str] = []
        self._sse_event = ""
        #: A chunk's last character when it is the first half of a UTF-16 surrogate pair: Node's JSON writes a
        #: string cut inside a pair as two escaped halves, in two items. It goes before the next chunk's text.
        self._half = ""

    @property
    def body_format(self) -> str | None:
        """The answer's format as the connection test names it: ndjson, sse, json, text, empty, or None
        (nothing read, e.g. an error status or no answer at all)."""
        if self.mode in ("ndjson", "sse"):
            return self.mode
        if self._whole is not None:
            return self._whole
        if self.finished and self.failure is not None and self.failure.code == "empty_response":
            return "empty"  # the body ended holding nothing but whitespace
        return None

    # --- input ----------------------------------------------------------------------------------
    def use_charset(self, declared: str | None) -> None:
        """Decode the answer in the charset its Content-Type declares (none declared: UTF-8).

        An unknown name, a codec that is not a text encoding (`base64`), or one without the `replace` error
        handling SSE lines are read with (`idna`, `undefined`), fails the answer as unreadable.
        """
        if not declared or not declared.strip(" \t\"'"):
            return
        name = declared.strip(" \t\"'")
        try:
            codec = codecs.lookup(name).name
            b"".decode(codec)  # LookupError for bytes-to-bytes codecs, which are no text encoding
            b"a".decode(codec, "replace")  # UnicodeError (a ValueError) for codecs that cannot replace
            probe = '\n{"a": 1}:'
            self.ascii_lines = probe.encode(codec) == probe.encode("ascii")
        except (LookupError, ValueError):
            self._fail(
                "bad_upstream_response",
                "The agent's answer could not be read",
                reason=f"unknown charset {excerpt(name[:40])!r}",
            )
            return
        self.charset = codec

    def _decode(self, raw: bytes, errors: str = "strict") -> str:
        return raw.decode(self.charset, errors)

    def _emit(self, text: str, out: list[str]) -> None:
        """One chunk of the answer's text, a surrogate pair cut between two chunks joined again."""
        if not text:
            return
        self.chunks += 1
        if self._half:
            high, self._half = self._half, ""
            if "\udc00" <= text[0] <= "\udfff":  # its other half: the pair is one character
                text = chr(0x10000 + ((ord(high) - 0xD800) << 10) + (ord(text[0]) - 0xDC00)) + text[1:]
            else:
                text = high + text
        if _is_high_surrogate(text[-1]):
            self._half = text[-1]
            text = text[:-1]
        if text:
            out.append(text)

    def feed(self, data: bytes) -> list[str]:
        if self.finished:
            return []
        self.total += len(data)
        if self.total > self.max_total:
            self._fail_cap("answer", self.max_total)
            return []
        self._buffer += data
        if self.mode is None and not self._sniff(final=False):
            return []
        if self.mode == "buffer":
            return []
        out: list[str] = []
        end = self._buffer.rfind(b"\n")
        if end < 0:
            if len(self._buffer) > self.max_line:
                self._fail_cap("line", self.max_line)
            return out
        block = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        for line in block.split(b"\n"):
            if len(line) > self.max_line:
                self._fail_cap("line", self.max_line)
                break
            self._line(line, out)
            if self.finished:
                break
        if not self.finished and len(self._buffer) > self.max_line:
            self._fail_cap("line", self.max_line)
        return out

    def finish(self) -> list[str]:
        """The HTTP message ended: flush what is pending, then judge emptiness."""
        out: list[str] = []
        if not self.finished:
            if self.mode is None:
                self._sniff(final=True)
            if self.mode == "buffer":
                self._finish_buffer(out)
            elif self.mode is not None:
                rest = bytes(self._buffer)
                self._buffer.clear()
                if rest:
                    self._line(rest, out)
                if self.mode == "sse" and not self.finished:
                    self._dispatch_sse(out)
        self.finished = True
        if self._half:  # a half never completed: the caller's cleaning replaces it
            out.append(self._half)
            self._half = ""
        if self.failure is None and self.chunks == 0:
            self.failure = StreamFailure("empty_response", EMPTY_ANSWER)
        return out

    # --- format detection -----------------------------------------------------------------------
    def _sniff(self, *, final: bool) -> bool:
        if not self.ascii_lines:
            self.mode = "buffer"  # lines cannot be split on bytes: read the whole answer, then decode it
            return True
        if self.charset == "utf-8":
            if self._buffer.startswith(UTF8_BOM):
                del self._buffer[: len(UTF8_BOM)]  # some proxies and editors prefix UTF-8 bodies with a BOM
            elif not final and UTF8_BOM.startswith(bytes(self._buffer)) and self._buffer:
                return False
        start = 0
        buffer = self._buffer
        while start < len(buffer) and buffer[start] in b" \t\r\n":
            start += 1
        if start == len(buffer):
            if not final and len(buffer) > self.max_line:
                self._fail_cap("line", self.max_line)
            return False
        head = bytes(buffer[start : start + 16])
        if not final and any(len(head) < len(field) and field.startswith(head) for field in SSE_FIELDS):
            return False  # `da` may become `data:`: reads may be cut anywhere, so wait for the field name
        if head.startswith(SSE_FIELDS):
            self.mode = "sse"
        elif head.startswith(b"{"):
            newline = buffer.find(b"\n", start)
            if newline < 0 and not final:
                if len(buffer) - start > self.max_line:
                    self.mode = "buffer"
                    return True
                return False
            first = bytes(buffer[start : newline if newline >= 0 else len(buffer)])
            self.mode = "ndjson" if self._is_ndjson_line(first) else "buffer"
        else:
            self.mode = "buffer"
        return True

    def _is_ndjson_line(self, line: bytes) -> bool:
        try:
            obj = json.loads(line if self.charset == "utf-8" else self._decode(line))
        except UNREADABLE_JSON:
            return False
        return isinstance(obj, dict) and obj.get("type") in NDJSON_TYPES

    # --- lines ----------------------------------------------------------------------------------
    def _line(self, raw: bytes, out: list[str]) -> None:
        if self.mode == "sse":
            self._sse_line(raw.rstrip(b"\r"), out)
            return
        line = raw.strip()
        if not line:
            return
        try:
            # json.loads reads UTF-8 bytes itself; another declared charset is decoded first.
            obj = json.loads(line if self.charset == "utf-8" else self._decode(line))
        except UNREADABLE_JSON:
            self._fail("bad_upstream_response", "The agent sent an invalid line", reason="line is not JSON")
            return
        if not isinstance(obj, dict):
            self._fail("bad_upstream_response", "The agent sent an invalid line", reason="line is not an object")
            return
        self._n8n_object(obj, out)

    def _n8n_object(self, obj: dict[str, Any], out: list[str]) -> None:
        kind = obj.get("type")
        if kind == "end":
            # Each streaming node (or each run of one) ends its own block: their usages add up.
            end_meta = obj.get("metadata")
            self.usage = add_usages(self.usage, usage_of(end_meta.get("usage") if isinstance(end_meta, dict) else None))
        elif kind == "item":
            content = obj.get("content")
            if isinstance(content, str) and content:
                self._emit(content, out)
        elif kind == "error":
            raw_meta = obj.get("metadata")
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            detail = {"n8n_error": excerpt(obj.get("content")), "node": excerpt(meta.get("nodeName"))}
            self.failure = StreamFailure("upstream_error", "The agent reported an error", detail=detail)
            self.finished = True

    def _sse_line(self, line: bytes, out: list[str]) -> None:
        if not line:
            self._dispatch_sse(out)
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._sse_data.append(self._decode(value, "replace"))
        elif name == b"event":
            self._sse_event = self._decode(value, "replace")

    def _dispatch_sse(self, out: list[str]) -> None:
        if not self._sse_data:
            self._sse_event = ""
            return
        data = "\n".join(self._sse_data)
        event = self._sse_event
        self._sse_data = []
        self._sse_event = ""
        if data.strip() == "[DONE]":
            self.finished = True
            return
        try:
            obj = json.loads(data)
        except UNREADABLE_JSON:
            obj = None
        if event == "error":
            detail = {"n8n_error": excerpt(_text_of(obj) if obj is not None else data)}
            self.failure = StreamFailure("upstream_error", "The agent reported an error", detail=detail)
            self.finished = True
            return
        if not isinstance(obj, dict | list | str):
            # Not JSON, or JSON that holds no text of its own (`42`, `true`, `null`): the data is the text.
            if data:
                self._emit(data, out)
            return
        if isinstance(obj, dict) and obj.get("type") in NDJSON_TYPES:
            self._n8n_object(obj, out)
            return
        if isinstance(obj, dict) and obj.get("error") is not None:
            error = obj["error"]
            text = error.get("message") if isinstance(error, dict) else error
            self.failure = StreamFailure(
                "upstream_error", "The agent reported an error", detail={"n8n_error": excerpt(text)}
            )
            self.finished = True
            return
        text = self._sse_text(obj)
        if text:
            self._emit(text, out)

    @staticmethod
    def _sse_text(obj: Any) -> str | None:
        if isinstance(obj, dict) and isinstance(obj.get("choices"), list):
            choices = obj["choices"]
            if not choices or not isinstance(choices[0], dict):
                return None
            delta = choices[0].get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                return content if isinstance(content, str) else None
            text = choices[0].get("text")
            return text if isinstance(text, str) else None
        if isinstance(obj, dict):
            for key in ("content", "text", "delta", "output"):
                if isinstance(obj.get(key), str):
                    return str(obj[key])
            return None
        return obj if isinstance(obj, str) else None

    # --- whole-body formats ---------------------------------------------------------------------
    def _finish_buffer(self, out: list[str]) -> None:
        raw = bytes(self._buffer)
        self._buffer.clear()
        try:
            text = self._decode(raw)
        except UnicodeError:  # not only UnicodeDecodeError: `punycode` raises its base class
            self._fail("bad_upstream_response", "The agent's answer could not be read", reason=f"not {self.charset}")
            return
        stripped = text.strip()
        if not stripped:
            return
        self._whole = "text"
        if stripped[:15].lower().startswith(("<!doctype html", "<html")):
            # A proxy's login or error page answered instead of n8n: not the agent's words.
            self._fail("bad_upstream_response", "The agent's answer could not be read", reason="an HTML page")
            return
        try:
            value = json.loads(stripped)
        except (ValueError, RecursionError):
            if stripped[0] in "{[":
                self._fail("bad_upstream_response", "The agent's answer could not be read", reason="invalid JSON")
                return
            self._emit(text, out)
            return
        if not isinstance(value, dict | list | str):
            # Plain text that happens to be JSON (`42`, `true`, `null`): an answer as it is.
            self._emit(text, out)
            return
        self._whole = "json"
        if isinstance(value, dict):
            self.usage = usage_of(value.get("usage"))
        elif isinstance(value, list):
            # One element per item: the usage each reports adds up.
            for item in value:
                self.usage = add_usages(self.usage, usage_of(item.get("usage") if isinstance(item, dict) else None))
        if isinstance(value, dict) and value.get("type") in NDJSON_TYPES:
            self._n8n_object(value, out)
            return
        if isinstance(value, list):
            # n8n answers one element per item ("all incoming items"): each item's text, a blank line apart.
            parts = [_text_of(item) for item in value]
            if any(part is None for part in parts):
                self._fail("bad_upstream_response", "The agent's answer has no text", reason="array item without text")
                return
            answer = "\n\n".join(part for part in parts if part)
        else:
            found = _text_of(value)
            if found is None:
                keys = sorted(value)[:10] if isinstance(value, dict) else type(value).__name__
                self._fail("bad_upstream_response", "The agent's answer has no text", reason=f"no text in {keys}")
                return
            answer = found
        if answer:
            self._emit(answer, out)

    # --- failures -------------------------------------------------------------------------------
    def _fail(self, code: str, message: str, *, reason: str) -> None:
        self.failure = StreamFailure(code, message, detail={"reason": reason, "format": self.mode})
        self.finished = True

    def _fail_cap(self, what: str, limit: int) -> None:
        self._fail(
            "bad_upstream_response", f"The agent's answer exceeded the {what} size limit", reason=f"{what} > {limit}"
        )
