"""The load generator: N concurrent SSE (or NDJSON) streams over aiohttp, each bounded in time.

Three kinds of target are read with the same client and clock, so their figures can be subtracted:

- `service`: the relay's `POST /api/chats/{id}/messages` SSE contract (start, status, message..., then
  exactly one `done` or `error`, ids 1, 2, 3...);
- `bare`: bench/bare_relay.py, the same SSE framing for `message` events and a final `done`, no `start`;
- `direct`: the fake n8n itself (NDJSON `begin`, `item`..., `end`): the physical limit of the upstream.

Every stream ends as `complete` (HTTP 200, contract kept, terminal `done`), `failed` (non-200, an `error`
event, a broken contract or a connection error before the first byte) or `truncated` (the body ended, the
connection broke or the per-stream timeout hit before a terminal event).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

Kind = Literal["service", "bare", "direct"]
TERMINAL = {"done", "error"}


@dataclass
class Event:
    """One SSE block: its `id:`, the decoded `data:` JSON (None for a comment-only block), its comment."""

    id: str | None
    data: Any
    comment: str | None = None

    @property
    def type(self) -> str | None:
        return self.data.get("type") if isinstance(self.data, dict) else None


class SSEParser:
    """Incremental SSE parser over bytes: blocks end with a blank line; `\\n` and `\\r\\n` both accepted.

    A `data:` value that is not JSON is kept as `{"type": "invalid", "raw": ...}` so the caller can fail
    the stream instead of crashing the load generator.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        if b"\r" in self._buffer:
            # Only strip CR that belongs to a CRLF: a lone trailing CR may be the first half of one.
            keep_cr = self._buffer.endswith(b"\r")
            body = self._buffer[:-1] if keep_cr else self._buffer
            self._buffer = body.replace(b"\r\n", b"\n") + (b"\r" if keep_cr else b"")
        events: list[Event] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return events
            block = self._buffer[:end]
            self._buffer = self._buffer[end + 2 :]
            event = self._block(block)
            if event is not None:
                events.append(event)

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished block are buffered (a stream that ends now was cut mid-event)."""
        return bool(self._buffer.strip())

    @staticmethod
    def _block(block: bytes) -> Event | None:
        event_id: str | None = None
        data: list[str] = []
        comment: str | None = None
        for raw in block.split(b"\n"):
            line = raw.decode("utf-8", "replace")
            if not line:
                continue
            if line.startswith(":"):
                comment = line[1:].strip()
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)
        if not data:
            return Event(None, None, comment) if comment is not None else None
        text = "\n".join(data)
        try:
            decoded: Any = json.loads(text)
        except ValueError:
            decoded = {"type": "invalid", "raw": text[:200]}
        return Event(event_id, decoded, comment)


class NDJSONParser:
    """Incremental NDJSON parser (the fake n8n read directly): one JSON object per `\\n`-terminated line."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        end = self._buffer.rfind(b"\n")
        if end < 0:
            return []
        block, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        out: list[dict[str, Any]] = []
        for line in block.split(b"\n"):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = {"type": "invalid"}
            out.append(obj if isinstance(obj, dict) else {"type": "invalid"})
        return out


@dataclass
class StreamResult:
    """What one stream looked like from the client (times in seconds from the moment it was sent)."""

    outcome: str = "truncated"
    status: int | None = None
    ttfc: float | None = None
    #: Time to the response head (for the service: auth, checks and the append done, before n8n answers).
    head: float | None = None
    chunks: int = 0
    #: Characters of text received (merged `message` events carry several upstream chunks).
    chars: int = 0
    gaps: list[float] = field(default_factory=list)
    duration: float = 0.0
    reason: str | None = None


@dataclass
class Live:
    """Counters the orchestrator reads while streams run (e.g. to sample RSS with all of them open)."""

    started: int = 0
    open_with_chunk: int = 0
    finished: int = 0


class ContractChecker:
    """Judges one stream's events against its kind's contract, chunk by chunk."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.last_id = 0
        self.seen_start = False
        self.terminal: str | None = None
        self.error_code: str | None = None
        self.violation: str | None = None

    def event(self, event: Event) -> bool:
        """Check one event; True when it is a text chunk (`message`)."""
        if event.data is None:
            return False
        if self.terminal is not None:
            self.violation = "event after the terminal event"
            return False
        kind = event.type
        if event.id is None or not event.id.isdigit() or int(event.id) != self.last_id + 1:
            self.violation = f"event id {event.id!r} after {self.last_id}"
            return False
        self.last_id += 1
        if self.kind == "service" and not self.seen_start:
            if kind != "start":
                self.violation = f"first event is {kind!r}, not 'start'"
                return False
            self.seen_start = True
            return False
        if kind == "message":
            content = event.data.get("data", {}).get("content") if isinstance(event.data.get("data"), dict) else None
            if not isinstance(content, str):
                self.violation = "message event without text content"
                return False
            return True
        if kind in TERMINAL:
            self.terminal = kind
            if kind == "error" and isinstance(event.data.get("data"), dict):
                self.error_code = str(event.data["data"].get("code"))
            return False
        if kind in ("status", "start") and self.kind == "service":
            return False
        self.violation = f"unexpected event type {kind!r}"
        return False


@dataclass
class Request:
    url: str
    body: bytes
    headers: dict[str, str]


RequestFactory = Callable[[int, int], Request]


async def one_stream(
    session: aiohttp.ClientSession,
    request: Request,
    kind: Kind,
    *,
    stream_timeout: float,
    live: Live,
    on_first: Callable[[], None] | None = None,
) -> StreamResult:
    """Send one request and read its stream to the end (or the timeout); never raises."""
    result = StreamResult()
    clock = time.perf_counter
    sent = clock()
    last: float | None = None
    got_chunk = False
    live.started += 1
    checker = ContractChecker(kind)
    sse = SSEParser()
    nd = NDJSONParser()
    ended_cleanly = False
    try:
        async with asyncio.timeout(stream_timeout):
            async with session.post(request.url, data=request.body, headers=request.headers) as response:
                result.status = response.status
                result.head = clock() - sent
                if response.status != 200:
                    await response.read()
                    result.outcome, result.reason = "failed", f"HTTP {response.status}"
                    return result
                async for data in response.content.iter_any():
                    now = clock()
                    chunks = 0
                    if kind == "direct":
                        for obj in nd.feed(data):
                            if obj.get("type") == "item" and isinstance(obj.get("content"), str):
                                chunks += 1
                                result.chars += len(obj["content"])
                            elif obj.get("type") == "end":
                                checker.terminal = "done"
                            elif obj.get("type") in ("error", "invalid"):
                                checker.terminal = "error"
                    else:
                        for event in sse.feed(data):
                            if checker.event(event):
                                chunks += 1
                                result.chars += len(event.data["data"]["content"])
                        if checker.violation is not None:
                            result.outcome, result.reason = "failed", checker.violation
                            return result
                    if chunks:
                        if last is None:
                            result.ttfc = now - sent
                            got_chunk = True
                            live.open_with_chunk += 1
                            if on_first is not None:
                                on_first()
                        else:
                            result.gaps.append(now - last)
                            result.gaps.extend([0.0] * (chunks - 1))
                        last = now
                        result.chunks += chunks
                ended_cleanly = True
    except TimeoutError:
        result.reason = "timeout"
    except (aiohttp.ClientError, OSError) as exc:
        result.reason = type(exc).__name__
        if result.status is None:
            result.outcome = "failed"
    finally:
        result.duration = clock() - sent
        if got_chunk:
            live.open_with_chunk -= 1
        live.finished += 1
    if checker.terminal == "done" and ended_cleanly and not sse.pending:
        result.outcome = "complete"
    elif checker.terminal == "error":
        result.outcome, result.reason = "failed", f"error event: {checker.error_code}"
    elif ended_cleanly:
        result.outcome, result.reason = "truncated", "ended without a terminal event"
    return result


def client_session(limit: int = 0) -> aiohttp.ClientSession:
    """One pooled client for all streams: no connection cap, no hidden total timeout, loopback only."""
    # Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive closes them: reusing a socket
    # the server is closing would count as a failed stream that is the client's race, not the server's.
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=2.0)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), trust_env=False
    )


async def closed_loop(
    session: aiohttp.ClientSession,
    make: RequestFactory,
    kind: Kind,
    *,
    users: int,
    rounds: int,
    stream_timeout: float,
    deadline: float,
    stagger: float,
    live: Live | None = None,
) -> list[StreamResult]:
    """`users` virtual users, each sending `rounds` streams back to back (stops early at `deadline`).

    User i starts after i/users x `stagger` seconds, so arrivals are spread and the figures are a steady
    state of `users` open streams rather than one thundering herd.
    """
    live = live or Live()
    results: list[StreamResult] = []
    loop = asyncio.get_running_loop()

    async def user(index: int) -> None:
        await asyncio.sleep(stagger * index / max(users, 1))
        for round_ in range(rounds):
            if loop.time() >= deadline:
                return
            results.append(
                await one_stream(session, make(index, round_), kind, stream_timeout=stream_timeout, live=live)
            )

    await asyncio.gather(*(user(i) for i in range(users)))
    return results


async def hold_open(
    session: aiohttp.ClientSession,
    make: RequestFactory,
    kind: Kind,
    *,
    streams: int,
    max_opening: int,
    stream_timeout: float,
    live: Live,
) -> list[StreamResult]:
    """Open `streams` long streams, at most `max_opening` not yet streaming at a time (a ramp the server
    sets the pace of), and read them all to their end. `live.open_with_chunk` tells how many are open."""
    gate = asyncio.Semaphore(max_opening)
    results: list[StreamResult] = []

    async def one(index: int) -> None:
        await gate.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                gate.release()

        try:
            results.append(
                await one_stream(
                    session, make(index, 0), kind, stream_timeout=stream_timeout, live=live, on_first=release
                )
            )
        finally:
            release()

    await asyncio.gather(*(one(i) for i in range(streams)))
    return results


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summarize(results: list[StreamResult]) -> dict[str, Any]:
    """Counts by outcome, TTFC and chunk-gap percentiles (ms), chunks."""
    ttfc = [r.ttfc for r in results if r.ttfc is not None]
    heads = [r.head for r in results if r.head is not None]
    gaps = [g for r in results for g in r.gaps]
    reasons: dict[str, int] = {}
    for r in results:
        if r.outcome != "complete" and r.reason:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "streams": len(results),
        "complete": sum(r.outcome == "complete" for r in results),
        "failed": sum(r.outcome == "failed" for r in results),
        "truncated": sum(r.outcome == "truncated" for r in results),
        "reasons": reasons,
        "chunks": sum(r.chunks for r in results),
        "chars": sum(r.chars for r in results),
        "ttfc_p50_ms": ms(percentile(ttfc, 50)),
        "ttfc_p99_ms": ms(percentile(ttfc, 99)),
        "head_p50_ms": ms(percentile(heads, 50)),
        "head_p99_ms": ms(percentile(heads, 99)),
        "gap_p50_ms": ms(percentile(gaps, 50)),
        "gap_p99_ms": ms(percentile(gaps, 99)),
    }
