"""SSE framing: a generation's event log and the bytes its readers send (FastAPI's encoding, `: ping` when idle)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from app.services.messages import NewGeneration


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

    new: NewGeneration
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
