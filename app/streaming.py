"""The n8n relay: N8nStreamer (aiohttp client + incremental body parser), generations as tasks, SSE framing.

A generation is an asyncio task owned by `GenerationRegistry` (on `app.state.generations`): it calls n8n,
appends each parsed chunk to an in-memory list and wakes the SSE readers, checkpoints the partial text at
most every STREAM_CHECKPOINT_INTERVAL seconds, and writes the final message exactly once, shielded from
cancellation. The SSE response only reads the generation's event list, so a client that goes away does
not stop the generation, and per chunk there is no database work and no re-encoding of the whole answer.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from app.config import Settings
from app.crypto import DecryptionError, decrypt_headers
from app.db import Database
from app.errors import ServiceUnavailable
from app.services import messages as message_service
from app.webhooks import PolicyResolver, WebhookPolicyError, webhook_target

logger = logging.getLogger(__name__)

USER_AGENT = "n8n-chat-relay/1.0"
ACCEPT = "application/x-ndjson, text/event-stream, application/json;q=0.9, text/plain;q=0.8, */*;q=0.5"
NDJSON_TYPES = {"begin", "item", "end", "error"}
SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")
#: Bytes of an error body kept to extract n8n's `message` / `hint` for the error log (never shown to clients).
ERROR_BODY_EXCERPT = 4096
UTF8_BOM = b"\xef\xbb\xbf"
EXCERPT_CHARS = 300
WAITING = {"description": "Waiting for the agent", "done": False}
#: Idle pooled connections to n8n are dropped before n8n (Node's 5 s keep-alive) closes them; reusing one
#: n8n is closing fails the POST with ServerDisconnectedError (seen under load in the benchmark).
N8N_KEEPALIVE_SECONDS = 4.0


class StreamFailure(Exception):
    """One terminal failure of a generation: `code` and a short `message` safe to show the client.

    `detail` goes to the error log for admins: no secrets, no raw upstream body (at most a short
    sanitized excerpt of n8n's own `message`/`hint` text).
    """

    def __init__(
        self, code: str, message: str, *, upstream_status: int | None = None, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.upstream_status = upstream_status
        self.detail = detail or {}


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


def _excerpt(value: Any) -> str | None:
    """Short single-line text for the error log; None for anything that is not text."""
    if not isinstance(value, str):
        return None
    text = " ".join(clean_text(value).replace("\ufffd", "").split())
    return text[:EXCERPT_CHARS] + ("…" if len(text) > EXCERPT_CHARS else "")


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
        self._buffer = bytearray()
        self._sse_data: list[str] = []
        self._sse_event = ""

    # --- input ----------------------------------------------------------------------------------
    def use_charset(self, declared: str | None) -> None:
        """Decode the answer in the charset its Content-Type declares (none declared: UTF-8).

        An unknown name, or a codec that is not a text encoding (`base64`), fails the answer as unreadable.
        """
        if not declared or not declared.strip(" \t\"'"):
            return
        name = declared.strip(" \t\"'")
        try:
            codec = codecs.lookup(name).name
            b"".decode(codec)  # LookupError for bytes-to-bytes codecs, which are no text encoding
            probe = '\n{"a": 1}:'
            self.ascii_lines = probe.encode(codec) == probe.encode("ascii")
        except (LookupError, ValueError):
            self._fail(
                "bad_upstream_response",
                "The agent's answer could not be read",
                reason=f"unknown charset {_excerpt(name[:40])!r}",
            )
            return
        self.charset = codec

    def _decode(self, raw: bytes, errors: str = "strict") -> str:
        return raw.decode(self.charset, errors)

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
        if self.failure is None and self.chunks == 0:
            self.failure = StreamFailure("empty_response", "The agent returned an empty answer")
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
        except ValueError:
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
        except ValueError:
            self._fail("bad_upstream_response", "The agent sent an invalid line", reason="line is not JSON")
            return
        if not isinstance(obj, dict):
            self._fail("bad_upstream_response", "The agent sent an invalid line", reason="line is not an object")
            return
        self._n8n_object(obj, out)

    def _n8n_object(self, obj: dict[str, Any], out: list[str]) -> None:
        kind = obj.get("type")
        if kind == "item":
            content = obj.get("content")
            if isinstance(content, str) and content:
                out.append(content)
                self.chunks += 1
        elif kind == "error":
            raw_meta = obj.get("metadata")
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            detail = {"n8n_error": _excerpt(obj.get("content")), "node": _excerpt(meta.get("nodeName"))}
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
        except ValueError:
            obj = None
        if event == "error":
            detail = {"n8n_error": _excerpt(_text_of(obj) if obj is not None else data)}
            self.failure = StreamFailure("upstream_error", "The agent reported an error", detail=detail)
            self.finished = True
            return
        if obj is None:
            if data:
                out.append(data)
                self.chunks += 1
            return
        if isinstance(obj, dict) and obj.get("type") in NDJSON_TYPES:
            self._n8n_object(obj, out)
            return
        if isinstance(obj, dict) and obj.get("error") is not None:
            error = obj["error"]
            text = error.get("message") if isinstance(error, dict) else error
            self.failure = StreamFailure(
                "upstream_error", "The agent reported an error", detail={"n8n_error": _excerpt(text)}
            )
            self.finished = True
            return
        text = self._sse_text(obj)
        if text:
            out.append(text)
            self.chunks += 1

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
        except UnicodeDecodeError:
            self._fail("bad_upstream_response", "The agent's answer could not be read", reason=f"not {self.charset}")
            return
        stripped = text.strip()
        if not stripped:
            return
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
            out.append(text)
            self.chunks += 1
            return
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
            out.append(answer)
            self.chunks += 1

    # --- failures -------------------------------------------------------------------------------
    def _fail(self, code: str, message: str, *, reason: str) -> None:
        self.failure = StreamFailure(code, message, detail={"reason": reason, "format": self.mode})
        self.finished = True

    def _fail_cap(self, what: str, limit: int) -> None:
        self._fail(
            "bad_upstream_response", f"The agent's answer exceeded the {what} size limit", reason=f"{what} > {limit}"
        )


@dataclass(slots=True)
class StreamStats:
    """What one call to n8n looked like, for the stored message's metadata and the error log."""

    upstream_status: int | None = None
    format: str | None = None
    bytes: int = 0
    ttfb_ms: float | None = None


class N8nStreamer:
    """The n8n client: one pooled aiohttp ClientSession for the app's lifetime, policy-checking resolver."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use (inside the running loop)."""
        if self._session is None or self._session.closed:
            s = self.settings
            connector = aiohttp.TCPConnector(
                resolver=PolicyResolver(s),
                limit=s.N8N_POOL_LIMIT,
                limit_per_host=0,
                ttl_dns_cache=10,
                keepalive_timeout=N8N_KEEPALIVE_SECONDS,
            )
            # total=None: no hidden cap shorter than N8N_TOTAL_TIMEOUT (aiohttp's default total is 300 s).
            timeout = aiohttp.ClientTimeout(
                total=None, connect=s.N8N_CONNECT_TIMEOUT, sock_connect=s.N8N_CONNECT_TIMEOUT, sock_read=None
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                auto_decompress=True,
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def run(
        self,
        *,
        url: str,
        headers: dict[str, str],
        payload: dict[str, Any],
        on_chunks: Callable[[list[str]], None],
        stats: StreamStats,
    ) -> None:
        """POST `payload` to `url` and hand every parsed text chunk to `on_chunks`; raise StreamFailure."""
        s = self.settings
        try:
            # The checked yarl.URL itself is posted to: aiohttp connects to exactly the host judged here.
            target = webhook_target(url, s)
        except WebhookPolicyError as exc:
            raise StreamFailure(
                "upstream_blocked", "The agent's webhook address is not allowed", detail={"reason": str(exc)}
            ) from None
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        del payload  # the encoded body is all that is needed from here on
        send_headers = {**headers, "Content-Type": "application/json", "Accept": ACCEPT}
        loop = asyncio.get_running_loop()
        started = loop.time()
        parser = BodyParser(max_line_bytes=s.N8N_MAX_LINE_BYTES, max_response_bytes=s.N8N_MAX_RESPONSE_BYTES)
        got_first_byte = False
        try:
            async with asyncio.timeout(s.N8N_TOTAL_TIMEOUT) as wall:
                try:
                    # One deadline object, moved forward on every read: first byte, then between chunks.
                    async with asyncio.timeout(s.N8N_FIRST_BYTE_TIMEOUT) as idle:
                        async with self.session().post(
                            target, data=body, headers=send_headers, allow_redirects=False
                        ) as response:
                            stats.upstream_status = response.status
                            if not 200 <= response.status < 300:
                                idle.reschedule(loop.time() + s.N8N_READ_TIMEOUT)
                                raise await _status_failure(response)
                            parser.use_charset(response.charset)
                            content = response.content
                            while not parser.finished:
                                data = await content.readany()
                                if not data:
                                    break
                                if not got_first_byte:
                                    got_first_byte = True
                                    stats.ttfb_ms = round((loop.time() - started) * 1000, 1)
                                idle.reschedule(loop.time() + s.N8N_READ_TIMEOUT)
                                chunks = parser.feed(data)
                                if chunks:
                                    on_chunks(chunks)
                            chunks = parser.finish()
                            if chunks:
                                on_chunks(chunks)
                except TimeoutError:
                    if wall.expired():
                        raise
                    if got_first_byte:
                        raise StreamFailure(
                            "upstream_timeout",
                            "The agent stopped sending its answer",
                            upstream_status=stats.upstream_status,
                            detail={"timeout": "read", "seconds": s.N8N_READ_TIMEOUT},
                        ) from None
                    raise StreamFailure(
                        "upstream_timeout",
                        "The agent did not answer in time",
                        upstream_status=stats.upstream_status,
                        detail={"timeout": "first_byte", "seconds": s.N8N_FIRST_BYTE_TIMEOUT},
                    ) from None
        except TimeoutError:
            raise StreamFailure(
                "upstream_timeout",
                "The agent's answer took too long",
                upstream_status=stats.upstream_status,
                detail={"timeout": "total", "seconds": s.N8N_TOTAL_TIMEOUT},
            ) from None
        except StreamFailure:
            raise
        except WebhookPolicyError as exc:
            raise StreamFailure(
                "upstream_blocked", "The agent's webhook address is not allowed", detail={"reason": str(exc)}
            ) from None
        except aiohttp.ConnectionTimeoutError:
            raise StreamFailure(
                "upstream_timeout",
                "The agent could not be reached in time",
                detail={"timeout": "connect", "seconds": s.N8N_CONNECT_TIMEOUT},
            ) from None
        except aiohttp.ClientConnectorError as exc:
            cause = exc.os_error
            if isinstance(cause, WebhookPolicyError) or isinstance(cause.__cause__, WebhookPolicyError):
                raise StreamFailure(
                    "upstream_blocked", "The agent's webhook address is not allowed", detail={"reason": str(cause)}
                ) from None
            raise StreamFailure(
                "upstream_unreachable",
                "The agent could not be reached",
                detail={"error": type(exc).__name__, "reason": _excerpt(str(cause)) or ""},
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise StreamFailure(
                "upstream_disconnected",
                "The connection to the agent was lost",
                upstream_status=stats.upstream_status,
                detail={"error": type(exc).__name__},
            ) from None
        except aiohttp.ClientResponseError as exc:
            raise StreamFailure(
                "bad_upstream_response",
                "The agent's answer could not be read",
                upstream_status=stats.upstream_status,
                detail={"error": type(exc).__name__},
            ) from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise StreamFailure(
                "upstream_unreachable", "The agent could not be reached", detail={"error": type(exc).__name__}
            ) from None
        finally:
            stats.format = parser.mode
            stats.bytes = parser.total
        if parser.failure is not None:
            parser.failure.upstream_status = stats.upstream_status
            parser.failure.detail.setdefault("format", parser.mode)
            raise parser.failure


async def _status_failure(response: aiohttp.ClientResponse) -> StreamFailure:
    """A non-2xx answer: n8n's `message`/`hint` (its own text, shortened) for admins, a safe line for users."""
    status = response.status
    detail: dict[str, Any] = {}
    try:
        raw = await response.content.read(ERROR_BODY_EXCERPT)
        parsed = json.loads(raw) if raw.strip().startswith(b"{") else None
    except (aiohttp.ClientError, ValueError):
        parsed = None
    if isinstance(parsed, dict):
        for key in ("message", "hint"):
            excerpt = _excerpt(parsed.get(key))
            if excerpt:
                detail[f"n8n_{key}"] = excerpt
    if status == 404:
        message = "The agent's n8n webhook is not registered (is the workflow active?)"
    elif 300 <= status < 400:
        message = f"The agent answered with a redirect (HTTP {status}), which is not followed"
    else:
        message = f"The agent answered with an error (HTTP {status})"
    return StreamFailure("upstream_error", message, upstream_status=status, detail=detail)


# --- generations ---------------------------------------------------------------------------------


def _event_json(kind: str, data: Any) -> str:
    return json.dumps({"type": kind, "data": data}, ensure_ascii=False)


def _frame(event_id: int, kind: str, data: Any) -> bytes:
    """One event in FastAPI's own SSE encoding (`fastapi.sse.format_sse_event`): `data:` then `id:`."""
    return format_sse_event(data_str=_event_json(kind, data), id=str(event_id))


PING = KEEPALIVE_COMMENT
#: Sent with the stream. The response is FastAPI's `EventSourceResponse` over these pre-encoded bytes
#: rather than a generator of `ServerSentEvent`s, whose per-event tasks and memory streams cost five times
#: the bare relay's CPU per chunk (docs/PERFORMANCE.md).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class Generation:
    """One running answer. `events` is what SSE readers replay: a text chunk (str) or a (type, data) pair.

    Readers number their events 1, 2, 3… and merge text chunks that piled up while they were busy into
    one `message` event (same concatenation, fewer writes when a client or the event loop is slow).
    """

    new: message_service.NewGeneration
    events: list[str | tuple[str, Any]] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    terminal: tuple[str, dict[str, Any]] | None = None
    task: asyncio.Task[None] | None = None
    _waiter: asyncio.Event | None = None

    def add_chunks(self, chunks: list[str]) -> None:
        self.chunks.extend(chunks)
        self.events.extend(chunks)
        self._notify()

    def add_event(self, kind: str, data: Any) -> None:
        self.events.append((kind, data))
        self._notify()

    def finish(self, kind: str, data: dict[str, Any]) -> None:
        self.terminal = (kind, data)
        self._notify()

    def _notify(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    async def sse(self, ping_interval: float) -> AsyncIterator[bytes]:
        """The SSE bytes of this generation from the start; `: ping` comments while nothing happens.

        Every event already available when the reader wakes goes out in one write, so an upstream read
        holding many chunks costs one ASGI message, not one per chunk (see docs/PERFORMANCE.md).
        """
        start = {"user_message": self.new.user_message, "assistant_message_id": self.new.assistant_id}
        loop = asyncio.get_running_loop()
        # One timer per quiet interval, not one `asyncio.timeout` per wait (that is, per chunk): the timer
        # only wakes the reader, which pings if nothing went out since `ping_at`, else re-arms for it.
        timer: asyncio.TimerHandle | None = None

        def wake() -> None:
            nonlocal timer
            timer = None
            self._notify()

        event_id = 1
        yield _frame(event_id, "start", start)
        ping_at = loop.time() + ping_interval
        index = 0
        events = self.events
        try:
            while True:
                frames: list[bytes] = []
                available = len(events)
                while index < available:
                    item = events[index]
                    event_id += 1
                    if isinstance(item, str):
                        end = index + 1
                        while end < available and isinstance(events[end], str):
                            end += 1
                        text = item if end == index + 1 else "".join(events[index:end])  # type: ignore[arg-type]
                        index = end
                        frames.append(_frame(event_id, "message", {"content": text}))
                    else:
                        index += 1
                        frames.append(_frame(event_id, item[0], item[1]))
                if self.terminal is not None:
                    kind, data = self.terminal
                    frames.append(_frame(event_id + 1, kind, data))
                    yield b"".join(frames)
                    return
                # (A ping 1 ms early counts: a timer may fire within the loop's clock resolution of its deadline.)
                if frames or loop.time() + 0.001 >= ping_at:
                    yield b"".join(frames) if frames else PING
                    ping_at = loop.time() + ping_interval
                    # New events may have arrived while the write was awaited: send them before sleeping.
                    continue
                if timer is None:
                    timer = loop.call_at(ping_at, wake)
                if self._waiter is None:
                    self._waiter = asyncio.Event()
                await self._waiter.wait()
        finally:
            if timer is not None:
                timer.cancel()


class GenerationRegistry:
    """The running generations of this worker, its liveness heartbeat, start-up recovery and shutdown."""

    def __init__(self, *, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.worker_id = uuid.uuid4()
        self.streamer = N8nStreamer(settings)
        self.running: dict[str, Generation] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False
        self._draining: asyncio.Task[None] | None = None
        self.recovered = False

    # --- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        """Open the shared n8n client, register this worker, mark dead workers' streams, start the heartbeat.

        A database that is not reachable or not migrated yet does not stop start-up (`/ready` reports
        it); registration and recovery are retried on every heartbeat until they succeed.
        """
        self.streamer.session()
        self.install_signal_hook()
        await self._register_and_recover()
        self._heartbeat = asyncio.create_task(self._beat(), name="worker-heartbeat")

    async def _register_and_recover(self) -> None:
        try:
            async with self.db.sessionmaker() as session:
                await message_service.heartbeat(session=session, worker_id=self.worker_id)
                recovered = await message_service.recover_interrupted(
                    session=session,
                    settings=self.settings,
                    worker_id=self.worker_id,
                    running=frozenset(self.running),
                )
        except Exception as exc:
            logger.warning("worker registration and recovery postponed (%s)", type(exc).__name__)
            return
        self.recovered = True
        if recovered:
            logger.warning("marked %d message(s) of stopped workers as interrupted", recovered)

    async def _beat(self) -> None:
        """Heartbeat; every few beats also recover streams of workers that died since (a worker restarted
        quickly after a crash would otherwise leave its chats blocked by a `streaming` message)."""
        beats = 0
        while True:
            await asyncio.sleep(self.settings.WORKER_HEARTBEAT_INTERVAL)
            beats += 1
            if not self.recovered or beats % message_service.STALE_HEARTBEATS == 0:
                await self._register_and_recover()
                continue
            try:
                async with self.db.sessionmaker() as session:
                    await message_service.heartbeat(session=session, worker_id=self.worker_id)
            except Exception as exc:
                logger.warning("worker heartbeat failed (%s)", type(exc).__name__)

    def install_signal_hook(self) -> None:
        """Start the grace period when the server is told to stop, not when the application shutdown runs.

        uvicorn first waits for open connections (SSE clients included) and only then runs the lifespan
        shutdown; a generation still running then would be cut without a terminal event. Chaining the
        server's SIGTERM/SIGINT handler lets the grace period run while clients are still connected, so they
        receive the `done`, or the `interrupted` error once the grace is over, before their connection ends.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            owner = getattr(previous, "__self__", None)
            if not callable(previous) or not type(owner).__module__.startswith("uvicorn"):
                continue  # only uvicorn's own handler is chained (not pytest's, not an ignored signal)

            def handler(signum: int, frame: Any, previous: Callable[[int, Any], Any] = previous) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(self.begin_shutdown)
                previous(signum, frame)

            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. uvicorn run in a test thread)
                return

    def begin_shutdown(self) -> asyncio.Task[None]:
        """Refuse new generations; give running ones SHUTDOWN_GRACE_SECONDS, then store them interrupted."""
        self._closing = True
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain(), name="generations-drain")
        return self._draining

    async def _drain(self) -> None:
        tasks = [g.task for g in self.running.values() if g.task is not None]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.SHUTDOWN_GRACE_SECONDS)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("interrupting %d running generation(s) at shutdown", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def shutdown(self) -> None:
        """Drain generations (if the signal hook did not start it already), stop the heartbeat, unregister."""
        await self.begin_shutdown()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
            try:
                async with self.db.sessionmaker() as session:
                    await message_service.unregister_worker(session=session, worker_id=self.worker_id)
            except Exception as exc:
                logger.warning("could not unregister worker (%s)", type(exc).__name__)
        await self.streamer.close()

    # --- generations ----------------------------------------------------------------------------
    def check_accepting(self) -> None:
        """New generations are refused once shutdown began (they would only be interrupted)."""
        if self._closing:
            raise ServiceUnavailable("The server is shutting down; try again")

    def start(self, new: message_service.NewGeneration) -> Generation:
        generation = Generation(new=new)
        generation.add_event("status", WAITING)
        task = asyncio.create_task(self._run(generation), name=f"generation-{new.assistant_id}")
        generation.task = task
        self.running[new.assistant_id] = generation
        task.add_done_callback(lambda _t: self.running.pop(new.assistant_id, None))
        return generation

    async def _run(self, generation: Generation) -> None:
        new = generation.new
        s = self.settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        stats = StreamStats()
        checkpoint = _Checkpointer(self, generation)

        def on_chunks(chunks: list[str]) -> None:
            generation.add_chunks([clean_text(c) for c in chunks])
            checkpoint.touch()

        failure: StreamFailure | None = None
        cancelled = False
        new.stamp_assistant()
        try:
            try:
                headers = decrypt_headers(new.webhook_headers_encrypted, s.ENCRYPTION_KEY)
            except DecryptionError:
                raise StreamFailure(
                    "agent_misconfigured",
                    "The agent's settings cannot be read; ask an admin to save its webhook headers again",
                    detail={"reason": "webhook headers cannot be decrypted with the configured key"},
                ) from None
            await self.streamer.run(
                url=new.webhook_url, headers=headers, payload=new.take_payload(), on_chunks=on_chunks, stats=stats
            )
        except StreamFailure as exc:
            failure = exc
        except asyncio.CancelledError:
            cancelled = True
            failure = StreamFailure(
                "interrupted",
                "The server stopped before the answer was complete",
                upstream_status=stats.upstream_status,
            )
        except Exception as exc:
            logger.exception("generation %s failed", new.assistant_id)
            failure = StreamFailure(
                "internal_error", "The answer could not be completed", detail={"error": type(exc).__name__}
            )
        duration_ms = round((loop.time() - started) * 1000, 1)
        metadata = {
            "chunks": len(generation.chunks),
            "duration_ms": duration_ms,
            "ttfb_ms": stats.ttfb_ms,
            "upstream_status": stats.upstream_status,
            "format": stats.format,
        }
        await _shielded(self._finish(generation, failure, metadata, checkpoint, cancelled=cancelled))
        if cancelled:
            raise asyncio.CancelledError

    async def _finish(
        self,
        generation: Generation,
        failure: StreamFailure | None,
        metadata: dict[str, Any],
        checkpoint: _Checkpointer,
        *,
        cancelled: bool,
    ) -> None:
        """The single final write, then the terminal event (so a reload after `done` shows the message)."""
        await checkpoint.close()
        new = generation.new
        if failure is None:
            status, error = "complete", None
        else:
            status = "interrupted" if cancelled else "error"
            error = {"message": failure.message, "code": failure.code}
        # A success is one UPDATE; a failure also writes its error_logs row, in the same transaction.
        sessionmaker = self.db.autocommit if error is None else self.db.sessionmaker
        try:
            async with sessionmaker() as session:
                stored = await message_service.finish_message(
                    session=session,
                    new=new,
                    content="".join(generation.chunks),
                    status=status,
                    error=error,
                    metadata={k: v for k, v in metadata.items() if v is not None},
                    failure_detail=None if failure is None else {**failure.detail},
                    upstream_status=None if failure is None else failure.upstream_status,
                )
        except Exception:
            logger.exception("final write of %s failed", new.assistant_id)
            generation.finish("error", {"message": "The answer could not be stored", "code": "storage_error"})
            return
        if error is None:
            generation.finish("done", {"message": stored})
        else:
            generation.finish("error", error)


class _Checkpointer:
    """Saves a generation's partial text at most every STREAM_CHECKPOINT_INTERVAL seconds, off the read loop.

    New text arms one timer for the next allowed instant; the write runs as its own task, so reading from
    n8n never waits for the database. Text that arrives during a write arms the timer again afterwards.
    """

    __slots__ = ("closed", "generation", "interval", "loop", "next_at", "registry", "saved", "task", "timer")

    def __init__(self, registry: GenerationRegistry, generation: Generation) -> None:
        self.registry = registry
        self.generation = generation
        self.loop = asyncio.get_running_loop()
        self.interval = registry.settings.STREAM_CHECKPOINT_INTERVAL
        self.next_at = self.loop.time() + self.interval
        self.saved = 0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def touch(self) -> None:
        if self.timer is None and self.task is None and not self.closed:
            self.timer = self.loop.call_at(self.next_at, self._fire)

    def _fire(self) -> None:
        self.timer = None
        if self.closed:
            return
        self.next_at = self.loop.time() + self.interval
        self.task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        chunks = self.generation.chunks
        count = len(chunks)
        new = self.generation.new
        try:
            async with self.registry.db.autocommit() as session:
                await message_service.checkpoint_message(session=session, new=new, content="".join(chunks[:count]))
            self.saved = count
        except Exception:
            logger.exception("checkpoint of %s failed", new.assistant_id)
        finally:
            self.task = None
        if len(chunks) > self.saved:
            self.touch()

    async def close(self) -> None:
        """Before the final write: no new checkpoint, and wait for one in flight."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def _shielded(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` to completion even if the caller is cancelled meanwhile (the cancel is re-raised after)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError
