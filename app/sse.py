"""SSE framing: a generation's event log with its fixed ids, and the bytes its readers send (`: ping` when idle)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import KEEPALIVE_COMMENT

from app.callbacks import CallbackInbox
from app.services.messages import NewGeneration

#: The event types that end a stream; exactly one of them is the last event of every generation.
TERMINAL = frozenset({"done", "error"})


#: Characters JSON leaves unescaped that Python's `str.splitlines` ends a line at (httpx's `aiter_lines`, and the
#: SSE clients built on it): raw in a `data:` line, one would cut its event in two for such a reader.
_LINE_SEPARATORS = ("\x85", "\u2028", "\u2029")


def json_text(value: Any) -> str:
    """`value` as JSON on one line for every line reader: CR and LF are escaped by `json.dumps`, NEL, U+2028 and
    U+2029 here (`\\u2028`...: the same JSON value), so no answer text can split an event or start a forged one."""
    return line_safe(json.dumps(value, ensure_ascii=False))


def line_safe(text: str) -> str:
    """JSON text with NEL, U+2028 and U+2029 escaped: for every JSON line the service writes (SSE `data:`, the
    Chat Trigger's NDJSON, `/v1`'s chunks). `str.isascii` takes constant time, so ASCII text is never scanned."""
    return text if text.isascii() else _escape_separators(text)


def _escape_separators(text: str) -> str:
    for separator in _LINE_SEPARATORS:
        if separator in text:
            text = text.replace(separator, f"\\u{ord(separator):04x}")
    return text


def frame(event_id: int, kind: str, data: Any) -> bytes:
    """One event: `id:` then `data:` (the contract's order), then a blank line.

    The fields of FastAPI's `fastapi.sse.format_sse_event`, written out here (tests/test_sse.py parses both
    alike): the JSON text never holds a line break (`json_text`), so the event is always these three lines.
    (`format_sse_event` writes `data:` first; the order means nothing to SSE parsers, but a client written from
    the contract's example may read `id:` first.)
    """
    return f"id: {event_id}\ndata: {json_text({'type': kind, 'data': data})}\n\n".encode()


def message_frame(event_id: int, text: str) -> bytes:
    """`frame(event_id, "message", {"content": text})`, without building the dicts: one per chunk relayed."""
    content = json.dumps(text, ensure_ascii=False)  # `json_text`, inlined: this runs once per chunk
    if not content.isascii():
        content = _escape_separators(content)
    return f'id: {event_id}\ndata: {{"type": "message", "data": {{"content": {content}}}}}\n\n'.encode()


def event_of(encoded: bytes) -> tuple[str, Any]:
    """The inverse of `frame`: (type, data) of one encoded event, for readers that speak another framing
    (the Chat Trigger's NDJSON, app.chat_trigger). Either field order: a shared log may still hold events an
    older version wrote `data:` first."""
    line = next(line for line in encoded.split(b"\n") if line.startswith(b"data:"))
    event = json.loads(line.removeprefix(b"data:"))
    return str(event["type"]), event["data"]


PING = KEEPALIVE_COMMENT
#: Sent with the stream. The response is FastAPI's `EventSourceResponse` over these pre-encoded bytes
#: rather than a generator of `ServerSentEvent`s, whose per-event tasks and memory streams cost five times
#: the bare relay's CPU per chunk (docs/PERFORMANCE.md). `no-transform`: a compressing proxy or dev server (Node's
#: `compression`, as webpack-dev-server and Next.js use it) leaves the stream alone; it would otherwise gzip it and
#: hold the events back until its buffer fills. `X-Accel-Buffering: no` does the same for nginx's buffer.
SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class Generation:
    """One answer's event log: `frames[i]` is the encoded event with id `i + 1`, fixed once written.

    The producer (the generation task) writes one `message` event per upstream read, so every reader, every
    follower and every instance sees the same events under the same ids. `chunks` is the answer's text.
    `on_event`, when set, mirrors each new event elsewhere (the Redis log of app.eventlog).
    """

    new: NewGeneration
    frames: list[bytes] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    terminal: str | None = None
    task: asyncio.Task[None] | None = None
    #: Set by a stop request: the task's cancellation means "store as cancelled", not "interrupted".
    stopping: bool = False
    #: Set once the task reached its final write: from then on a stop cannot change the outcome.
    finishing: bool = False
    #: The stored message of the final write (or None when it failed), for stop's answer.
    stored: dict[str, Any] | None = None
    on_event: Callable[[Generation], None] | None = None
    #: With a shared log (app.eventlog): waits until it holds this log's first `n` events. The checkpointer
    #: waits on it (boundedly), so stored text is not ahead of what a follower on another instance can read.
    shared_until: Callable[[int], Awaitable[None]] | None = None
    #: What came by progress callback (app.callbacks), when n8n was given a callback URL.
    inbox: CallbackInbox | None = None
    #: n8n's 429 or 503 when it refused with a usable Retry-After (the wait is the terminal event's
    #: `retry_after`): the widget's last-node answer keeps that status (app.chat_trigger).
    refused_with: int | None = None
    #: The readers waiting for the next event, one future each (an asyncio.Event per wait cost more per chunk).
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)
    _ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last_id(self) -> int:
        return len(self.frames)

    def add_event(self, kind: str, data: Any) -> None:
        self.frames.append(frame(len(self.frames) + 1, kind, data))
        if self.on_event is not None:
            self.on_event(self)
        self._notify()

    def add_chunks(self, chunks: list[str]) -> None:
        """One upstream read's text: one `message` event, so the ids do not depend on any reader's speed."""
        self.chunks.extend(chunks)
        text = chunks[0] if len(chunks) == 1 else "".join(chunks)
        if text:
            self.frames.append(message_frame(len(self.frames) + 1, text))
            if self.on_event is not None:
                self.on_event(self)
            self._notify()

    def finish(self, kind: str, data: dict[str, Any]) -> None:
        self.terminal = kind
        self.add_event(kind, data)
        self._ended.set()

    async def ended(self) -> None:
        await self._ended.wait()

    def release(self) -> None:
        """The task is over: the text kept for storage goes (the frames stay for followers)."""
        self.chunks = []
        self._ended.set()

    async def wait_beyond(self, index: int) -> None:
        """Until there are more than `index` events, or the log ended (for readers other than `sse`)."""
        while len(self.frames) <= index and self.terminal is None:
            await self._next()

    async def next_change(self) -> None:
        """Until the next event, the end, or a `wake` (a reader's keep-alive timer): for readers that keep their
        own index and ping (`sse`, app.chat_trigger.ndjson)."""
        await self._next()

    def wake(self) -> None:
        """Wake every reader waiting in `next_change` (it then finds no new event: its keep-alive is due)."""
        self._notify()

    async def _next(self) -> None:
        """Until the next `_notify` (a new event, the end, or a reader's ping timer)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter  # a reader cancelled here cancels only its own future, which `_notify` then skips

    def _notify(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def sse(self, ping_interval: float, after: int = 0) -> AsyncIterator[bytes]:
        """The events after id `after`, then the live ones up to the terminal one; `: ping` while quiet.

        Every event already available when the reader wakes goes out in one write, so an upstream read
        holding many chunks costs one ASGI message, not one per chunk (see docs/PERFORMANCE.md).
        """
        loop = asyncio.get_running_loop()
        # One timer per quiet interval, not one `asyncio.timeout` per wait (that is, per chunk): the timer
        # only wakes the reader, which pings if nothing went out since `ping_at`, else re-arms for it.
        timer: asyncio.TimerHandle | None = None

        def wake() -> None:
            nonlocal timer
            timer = None
            self._notify()

        # Ids are dense and this log is the generation's own: an id beyond its events is another generation's
        # (an older answer's, remembered by a reconnecting EventSource), so this one is given from its start.
        index = max(0, after) if after <= len(self.frames) else 0
        frames = self.frames
        ping_at = loop.time() + ping_interval
        try:
            while True:
                available = len(frames)
                if index < available:
                    chunk = frames[index] if available == index + 1 else b"".join(frames[index:available])
                    index = available
                    yield chunk
                    ping_at = loop.time() + ping_interval
                    continue  # new events may have arrived while the write was awaited
                if self.terminal is not None:
                    return
                # (A ping 1 ms early counts: a timer may fire within the loop's clock resolution of its deadline.)
                if loop.time() + 0.001 >= ping_at:
                    yield PING
                    ping_at = loop.time() + ping_interval
                    continue
                if timer is None:
                    timer = loop.call_at(ping_at, wake)
                await self._next()
        finally:
            if timer is not None:
                timer.cancel()
