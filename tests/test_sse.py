"""SSE framing: a generation's event log (fixed ids, one event per upstream read, replay), pings; no server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi.sse import format_sse_event

from app.db import utcnow
from app.services.messages import NewGeneration
from app.sse import Generation, event_of, frame, json_text, message_frame
from tests.live import parse_sse

# --- Generation: what SSE readers see ------------------------------------------------------------


def _generation() -> Generation:
    new = NewGeneration(
        chat_id=uuid.uuid4(),
        team_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        assistant_id="a1",
        user_message={"id": "u1", "role": "user", "content": "hi", "status": "complete", "created_at": "t"},
        webhook_url="http://x",
        webhook_headers_encrypted=None,
        payload={},
        created_at=utcnow(),
    )
    return Generation(new=new)


async def _collect(generation: Generation, ping: float = 5, after: int = 0) -> list[tuple[str | None, str | None, Any]]:
    out = []
    async for block in generation.sse(ping, after):
        # One write may hold several events (everything available when the reader woke).
        for event in parse_sse(block.decode()):
            out.append((event.id, event.comment, event.data))
    return out


async def test_generation_gives_one_event_per_upstream_read_with_fixed_ids() -> None:
    generation = _generation()
    generation.add_event("start", {"assistant_message_id": "a1"})
    generation.add_chunks(["Hel", "lo"])
    generation.add_chunks([" there"])
    generation.add_chunks([""])  # a read without text adds no event
    generation.finish("done", {"message": {"id": "a1"}})
    events = await _collect(generation)
    assert [e[0] for e in events] == ["1", "2", "3", "4"]
    assert events[1][2] == {"type": "message", "data": {"content": "Hello"}}
    assert events[2][2] == {"type": "message", "data": {"content": " there"}}
    assert events[3][2] == {"type": "done", "data": {"message": {"id": "a1"}}}
    assert generation.chunks == ["Hel", "lo", " there", ""]


async def test_readers_after_an_id_get_the_rest_with_the_same_ids_and_bytes() -> None:
    """A reader from the start, a follower after id 2, a late follower after the end: same frames, same ids."""
    generation = _generation()
    generation.add_event("start", {"assistant_message_id": "a1"})
    first = asyncio.create_task(_collect(generation))
    generation.add_chunks(["a"])
    follower = asyncio.create_task(_collect(generation, after=2))
    await asyncio.sleep(0.01)
    generation.add_chunks(["b"])
    generation.add_chunks(["c"])
    generation.finish("done", {"message": {"id": "a1"}})
    everything, rest = await first, await follower
    assert [e[0] for e in everything] == ["1", "2", "3", "4", "5"]
    assert rest == everything[2:]
    assert await _collect(generation, after=3) == everything[3:]
    assert await _collect(generation, after=5) == []


async def test_generation_streams_chunks_as_they_come_and_pings_when_idle() -> None:
    generation = _generation()
    reader = asyncio.create_task(_collect(generation, ping=0.05))
    await asyncio.sleep(0.01)
    generation.add_chunks(["a"])
    await asyncio.sleep(0.12)
    generation.add_chunks(["b"])
    await asyncio.sleep(0.01)
    generation.finish("error", {"message": "m", "code": "upstream_timeout"})
    events = await reader
    data = [e[2] for e in events if e[2] is not None]
    assert [d["type"] for d in data] == ["message", "message", "error"]
    assert [e[0] for e in events if e[2] is not None] == ["1", "2", "3"]
    pings = [e for e in events if e[1] == "ping"]
    assert pings
    assert all(p[0] is None for p in pings)


async def test_generation_pings_only_after_a_quiet_interval_and_leaves_no_timer() -> None:
    """Chunks every 30 ms with a 200 ms ping interval: no ping; then 500 ms of silence: about two pings."""
    generation = _generation()
    reader = asyncio.create_task(_collect(generation, ping=0.2))
    for i in range(8):
        await asyncio.sleep(0.03)
        generation.add_chunks([str(i)])
    await asyncio.sleep(0.5)
    generation.finish("done", {"message": {"id": "a1"}})
    events = await reader
    kinds = ["ping" if e[1] == "ping" else e[2]["type"] for e in events]
    last_message = max(i for i, kind in enumerate(kinds) if kind == "message")
    assert "ping" not in kinds[:last_message]
    assert 1 <= kinds[last_message:].count("ping") <= 3
    assert kinds[-1] == "done"
    # The reader's timer is cancelled when the stream ends: nothing stays scheduled for it.
    loop = asyncio.get_running_loop()
    assert not [h for h in loop._scheduled if not h.cancelled() and "wake" in repr(h)]  # type: ignore[attr-defined]


TEXTS = [
    "",
    "plain",
    'quote " and \\ backslash',
    "line\nbreak\r\ncrlf\rcr",
    "\u2028\u2029\x85 separators",
    "emoji 🚀 é",
    "\x00\x1f control",
    "</script>",
]


def _fields(event: bytes) -> list[bytes]:
    return sorted(event.split(b"\n"))


def test_frames_are_fastapis_own_sse_fields_id_first() -> None:
    """`frame` and `message_frame` write the lines of FastAPI's `format_sse_event`, `id:` first as the contract's
    example shows it: one `id:` line, one `data:` line, a blank line, whatever line separator the text holds;
    `event_of` reads them back (either order)."""
    for n, text in enumerate(TEXTS, start=1):
        for kind, data in (("message", {"content": text}), ("error", {"message": text, "code": "x"}), ("done", {})):
            fastapis = format_sse_event(data_str=json_text({"type": kind, "data": data}), id=str(n))
            ours = frame(n, kind, data)
            assert ours.startswith(f"id: {n}\ndata: ".encode())
            assert ours.endswith(b"\n\n")
            assert ours.count(b"\n") == 3
            assert len(ours.decode().splitlines()) == 3  # for `str.splitlines` readers too (U+2028, NEL...)
            assert _fields(ours) == _fields(fastapis)
            assert event_of(ours) == event_of(fastapis) == (kind, data)
        assert message_frame(n, text) == frame(n, "message", {"content": text})


async def test_a_cancelled_reader_leaves_the_other_readers_waiting() -> None:
    """Readers share no future: one cancelled while waiting, the others still get the next event."""
    generation = _generation()
    first = asyncio.create_task(generation.wait_beyond(0))
    second = asyncio.create_task(generation.wait_beyond(0))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    generation.add_chunks(["hi"])
    await asyncio.wait_for(second, 1)
    assert first.cancelled()
