"""The body parser (every format, every way bytes can be cut) and N8nStreamer against the fake n8n."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.config import Settings
from app.db import utcnow
from app.services.messages import NewGeneration
from app.streaming import BodyParser, Generation, N8nStreamer, StreamFailure, StreamStats
from app.webhooks import WebhookPolicyError
from tests.conftest import make_settings
from tests.live import parse_sse
from tools.fake_n8n import FakeN8n, load_captures

CAPTURES = load_captures()
MB = 1024 * 1024


def parse(pieces: list[bytes], *, max_line: int = MB, max_total: int = 10 * MB) -> tuple[str, BodyParser]:
    parser = BodyParser(max_line_bytes=max_line, max_response_bytes=max_total)
    out: list[str] = []
    for piece in pieces:
        out += parser.feed(piece)
        if parser.finished:
            break
    out += parser.finish()
    return "".join(out), parser


def every_cut(body: bytes) -> list[list[bytes]]:
    """The body cut at every position into two reads, plus one byte per read."""
    return [[body[:i], body[i:]] for i in range(len(body) + 1)] + [[body[i : i + 1] for i in range(len(body))]]


# --- parser: n8n NDJSON --------------------------------------------------------------------------


def test_parse_ndjson_capture_concatenates_items() -> None:
    text, parser = parse(CAPTURES["stream_ok"].pieces)
    assert text == "Echo: hello there"
    assert parser.mode == "ndjson"
    assert parser.failure is None
    assert parser.chunks == 3


@pytest.mark.parametrize("cut", range(3))
def test_parse_ndjson_any_cut_gives_same_text(cut: int) -> None:
    body = "".join(
        json.dumps({"type": t, "content": c}) + "\n"
        for t, c in [("begin", None), ("item", "Écho:"), ("item", " ünïcode ✓"), ("item", " 🎉"), ("end", None)]
    ).encode()
    cases = every_cut(body)
    for pieces in cases[cut::3]:
        text, parser = parse(pieces)
        assert text == "Écho: ünïcode ✓ 🎉"
        assert parser.failure is None


def test_parse_ndjson_crlf_and_many_lines_per_read() -> None:
    body = b"".join(p.replace(b"\n", b"\r\n") for p in CAPTURES["stream_ok"].pieces)
    assert parse([body])[0] == "Echo: hello there"


def test_parse_ndjson_several_blocks_and_null_content() -> None:
    lines = [
        {"type": "begin", "metadata": {"runIndex": 0}},
        {"type": "item", "content": "one"},
        {"type": "end"},
        {"type": "begin", "metadata": {"runIndex": 1}},
        {"type": "item", "content": None},
        {"type": "item", "content": " two"},
        {"type": "end"},
    ]
    text, parser = parse([b"\n".join(json.dumps(line).encode() for line in lines) + b"\n"])
    assert text == "one two"
    assert parser.failure is None


def test_parse_ndjson_last_line_without_newline() -> None:
    assert parse([b'{"type":"item","content":"a"}\n{"type":"item","content":"b"}'])[0] == "ab"


@pytest.mark.parametrize("name", ["stream_llm_error", "chat_stream_llm_error", "chat_stream_no_session"])
def test_parse_in_band_error(name: str) -> None:
    text, parser = parse(CAPTURES[name].pieces)
    assert text == ""
    assert parser.failure is not None
    assert parser.failure.code == "upstream_error"
    assert parser.failure.message == "The agent reported an error"
    assert "Fake upstream failure" in str(parser.failure.detail) or "No session" in str(parser.failure.detail)


def test_parse_in_band_error_with_null_content_keeps_text_before() -> None:
    body = b'{"type":"item","content":"partial"}\n' + CAPTURES["stream_code_error"].body
    text, parser = parse([body])
    assert text == "partial"
    assert parser.failure is not None
    assert parser.failure.code == "upstream_error"
    assert parser.failure.detail["n8n_error"] is None
    assert parser.failure.detail["node"] == "Code"


def test_parse_malformed_line_is_bad_upstream_response() -> None:
    text, parser = parse([b'{"type":"item","content":"ok"}\n{"type":"item","content": oops\n'])
    assert text == "ok"
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


def test_parse_line_over_cap_is_bad_upstream_response() -> None:
    line = b'{"type":"item","content":"' + b"x" * 5000 + b'"}\n'
    text, parser = parse([b'{"type":"item","content":"a"}\n', line[:3000], line[3000:]], max_line=4096)
    assert text == "a"
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"
    assert "line" in parser.failure.message


def test_parse_answer_over_cap_is_bad_upstream_response() -> None:
    lines = [b'{"type":"item","content":"' + b"y" * 900 + b'"}\n'] * 10
    _text, parser = parse(lines, max_total=4096)
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"
    assert "answer" in parser.failure.message


@pytest.mark.parametrize("body", [b"", b"   \r\n\n", b'{"type":"begin"}\n{"type":"end"}\n'])
def test_parse_empty_answer_is_empty_response(body: bytes) -> None:
    _text, parser = parse([body] if body else [])
    assert parser.failure is not None
    assert parser.failure.code == "empty_response"


# --- parser: SSE ---------------------------------------------------------------------------------


def test_parse_sse_openai_deltas_and_done() -> None:
    body = (
        b": keep-alive\n\n"
        b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"Hel"}}]}\r\n\r\n'
        b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n'
        b"data: [DONE]\n\n"
        b'data: {"choices":[{"delta":{"content":"ignored"}}]}\n\n'
    )
    for pieces in every_cut(body)[::7]:
        text, parser = parse(pieces)
        assert text == "Hello"
        assert parser.mode == "sse"
        assert parser.failure is None


def test_parse_sse_with_n8n_objects_and_plain_fields() -> None:
    body = (
        b'event: message\ndata: {"type":"item","content":"a"}\n\n'
        b'data: {"text":"b"}\n\ndata: {"delta":"c"}\n\ndata: {"content":"d"}\n\ndata: plain e\n\n'
        b'data: {"type":"item","content":"f"}'
    )
    assert parse([body])[0] == "abcdplain ef"


def test_parse_sse_error_event() -> None:
    text, parser = parse([b'data: {"content":"x"}\n\ndata: {"type":"error","content":"boom"}\n\n'])
    assert text == "x"
    assert parser.failure is not None
    assert parser.failure.code == "upstream_error"


# --- parser: whole-body JSON and plain text ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"output":"Echo: hello there"}', "Echo: hello there"),
        (b'{"text":"t"}', "t"),
        (b'{"message":"m"}', "m"),
        (b'{"content":"c"}', "c"),
        (b'{"output": null, "text": "fallback"}', "fallback"),
        (b'  {\n  "output": "pretty"\n}\n', "pretty"),
        (b'[{"output":"first"}]', "first"),
        (b'[{"output":"first"},{"text":"second"}]', "first\n\nsecond"),
        (b'"just a string"', "just a string"),
        (b"plain text answer \xc3\xa9", "plain text answer é"),
        (b'{"type":"item","content":"single line no newline"}', "single line no newline"),
    ],
)
def test_parse_whole_body(body: bytes, expected: str) -> None:
    for pieces in every_cut(body)[::5]:
        text, parser = parse(pieces)
        assert parser.failure is None
        assert text == expected


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"data":[]}', "bad_upstream_response"),
        (b'{"output": "x"', "bad_upstream_response"),
        (b"[1, 2]", "bad_upstream_response"),
        (b"\xff\xfe not utf-8", "bad_upstream_response"),
        (b"[]", "empty_response"),
        (b'{"output": ""}', "empty_response"),
    ],
)
def test_parse_whole_body_failures(body: bytes, code: str) -> None:
    _text, parser = parse([body])
    assert parser.failure is not None
    assert parser.failure.code == code


def test_parse_whole_body_over_cap() -> None:
    _text, parser = parse([b'{"output":"' + b"z" * 5000 + b'"}'], max_total=4096)
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


# --- N8nStreamer against the fake n8n ------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeN8n]:
    server = FakeN8n(speed=0, linger=5)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def streamer(tmp_path: Path, database_url: str) -> AsyncIterator[N8nStreamer]:
    s = N8nStreamer(stream_settings(database_url, tmp_path))
    yield s
    await s.close()


def stream_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"N8N_READ_TIMEOUT": 0.5, "N8N_FIRST_BYTE_TIMEOUT": 0.5, "N8N_CONNECT_TIMEOUT": 0.5}
    values.update(overrides)
    return make_settings(database_url, tmp_path, **values)


async def relay(streamer: N8nStreamer, url: str, **payload: Any) -> tuple[str, StreamStats, StreamFailure | None]:
    out: list[str] = []
    stats = StreamStats()
    try:
        await streamer.run(
            url=url, headers={}, payload={"chatInput": "hello there", **payload}, on_chunks=out.extend, stats=stats
        )
    except StreamFailure as exc:
        return "".join(out), stats, exc
    return "".join(out), stats, None


CAPTURE_OUTCOMES = {
    "stream_ok": ("Echo: hello there", None),
    "stream_messages_only": ("Echo: second question", None),
    "chat_stream_send1": ("Echo: hello there", None),
    "chat_stream_send2": ("Echo: second message", None),
    "chat_stream_send": ("Echo: hello there", None),
    "stream_slow": ("Echo: slow tokens please [delay=400]", None),
    "json_ok": ("Echo: hello there", None),
    "json_respond_node_ok": ("Echo: hello there", None),
    "chat_lastnode_send": ("Echo: hello there", None),
    "stream_llm_error": ("", "upstream_error"),
    "chat_stream_llm_error": ("", "upstream_error"),
    "chat_stream_no_session": ("", "upstream_error"),
    "stream_code_error": ("", "upstream_error"),
    "stream_agent_streaming_off": ("", "empty_response"),
    "json_respond_node_llm_error": ("", "empty_response"),
    "json_llm_error": ("", "upstream_error"),
    "json_code_error": ("", "upstream_error"),
    "chat_lastnode_llm_error": ("", "upstream_error"),
    "notfound_post": ("", "upstream_error"),
    "test_url_not_listening": ("", "upstream_error"),
    "wrong_method_get": ("", "upstream_error"),
    "stream_invalid_json_body": ("", "upstream_error"),
    "chat_stream_load": ("", "bad_upstream_response"),
    "chat_lastnode_load": ("", "bad_upstream_response"),
    "chat_stream_load_unknown": ("", "bad_upstream_response"),
    "chat_cors_post": ("", "bad_upstream_response"),
    "chat_cors_preflight": ("", "empty_response"),
}


def test_every_capture_has_an_expected_outcome() -> None:
    assert set(CAPTURE_OUTCOMES) == set(CAPTURES)


@pytest.mark.parametrize("name", sorted(CAPTURE_OUTCOMES))
async def test_streamer_relays_capture(streamer: N8nStreamer, fake: FakeN8n, name: str) -> None:
    text, stats, failure = await relay(streamer, f"{fake.url}/webhook/x?scenario={name}&speed=50")
    expected_text, expected_code = CAPTURE_OUTCOMES[name]
    assert text == expected_text
    assert (failure.code if failure else None) == expected_code
    assert stats.upstream_status == CAPTURES[name].status


async def test_streamer_finishes_at_message_end_not_socket_close(streamer: N8nStreamer, fake: FakeN8n) -> None:
    # The fake keeps the socket open 5 s after the last chunk; the read timeout is 0.5 s.
    text, stats, failure = await relay(streamer, f"{fake.url}/webhook/x?scenario=stream_ok&speed=50&linger=5")
    assert failure is None
    assert text == "Echo: hello there"
    assert stats.format == "ndjson"


async def test_streamer_decodes_gzip_incrementally(streamer: N8nStreamer, fake: FakeN8n) -> None:
    text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/agent-stream")
    assert failure is None
    assert text == "Echo: hello there"
    assert "gzip" in fake.requests[-1]["headers"]["Accept-Encoding"]


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("sse_openai", "Echo: hello there"),
        ("sse_n8n", "Echo: hello there"),
        ("json_text", "Echo: hello there"),
        ("json_message", "Echo: hello there"),
        ("json_content", "Echo: hello there"),
        ("json_array", "Echo: hello there"),
        ("plain", "Echo: hello there"),
        ("multi_block", "Echo: hello there (again)"),
        ("fragmented", "Echo: hello there"),
        ("batched", "Echo: hello there"),
    ],
)
async def test_streamer_formats(streamer: N8nStreamer, fake: FakeN8n, scenario: str, expected: str) -> None:
    text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario={scenario}")
    assert failure is None
    assert text == expected


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("charset=latin-1", "café naïve"),
        ("charset=iso-8859-1", "crème brûlée"),
        ("charset=ISO-8859-1", "déjà vu"),
        ("charset=windows-1252", "€5 “quoted” café"),
        ("charset=latin-1&type=json", "café"),
        ("charset=%22latin1%22", "café"),  # a quoted parameter value
        ("charset=utf-16&type=json", "naïve ✓"),  # not ASCII-compatible: read whole, then decoded
        ("charset=utf-8", "ünïcode ✓"),
    ],
)
async def test_streamer_honours_the_declared_charset(
    streamer: N8nStreamer, fake: FakeN8n, query: str, said: str
) -> None:
    url = f"{fake.url}/webhook/agent-stream?scenario=charset&{query}"
    text, _stats, failure = await relay(streamer, url, chatInput=said)
    assert failure is None, failure and failure.detail
    assert text == f"Echo: {said}"


@pytest.mark.parametrize("charset", ["x-no-such-charset", "base64", "rot13"])
async def test_streamer_unknown_charset_is_bad_upstream_response(
    streamer: N8nStreamer, fake: FakeN8n, charset: str
) -> None:
    url = f"{fake.url}/webhook/agent-stream?scenario=charset&charset={charset}"
    text, _stats, failure = await relay(streamer, url, chatInput="café")
    assert failure is not None
    assert failure.code == "bad_upstream_response"
    assert "charset" in failure.detail["reason"]
    assert text == ""


def test_parse_ndjson_and_sse_lines_in_a_declared_charset() -> None:
    ndjson = '{"type":"item","content":"Café"}\n{"type":"item","content":" crème"}\n'.encode("latin-1")
    parser = BodyParser(max_line_bytes=MB, max_response_bytes=10 * MB)
    parser.use_charset("latin-1")
    out = parser.feed(ndjson) + parser.finish()
    assert ("".join(out), parser.mode, parser.failure) == ("Café crème", "ndjson", None)
    sse = 'data: {"content": "né"}\n\ndata: [DONE]\n\n'.encode("cp1252")
    parser = BodyParser(max_line_bytes=MB, max_response_bytes=10 * MB)
    parser.use_charset("windows-1252")
    assert "".join(parser.feed(sse) + parser.finish()) == "né"


def test_parse_bytes_undefined_in_the_declared_charset_are_bad_upstream_response() -> None:
    parser = BodyParser(max_line_bytes=MB, max_response_bytes=10 * MB)
    parser.use_charset("windows-1252")
    parser.feed(b"caf\x81")
    parser.finish()
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


async def test_streamer_utf8_split_across_reads(streamer: N8nStreamer, fake: FakeN8n) -> None:
    url = f"{fake.url}/webhook/agent-stream?scenario=fragmented"
    text, _stats, failure = await relay(streamer, url, chatInput="héllo wörld ✓")
    assert failure is None
    assert text == "Echo: héllo wörld ✓"


@pytest.mark.parametrize(
    ("scenario", "code", "partial"),
    [
        ("hang_headers&hang=3", "upstream_timeout", ""),
        ("stall&hang=3", "upstream_timeout", "Echo: hello"),
        ("reset", "upstream_disconnected", "Echo: hello"),
        ("malformed", "bad_upstream_response", "Echo: hello"),
        ("oversized&size=2000000", "bad_upstream_response", "Echo: hello"),
        ("in_band_error", "upstream_error", "Echo: hello"),
        ("status&status=502", "upstream_error", ""),
        ("empty", "empty_response", ""),
    ],
)
async def test_streamer_faults(streamer: N8nStreamer, fake: FakeN8n, scenario: str, code: str, partial: str) -> None:
    text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario={scenario}")
    assert failure is not None
    assert failure.code == code
    assert text == partial


async def test_streamer_read_timeout_distinguishes_first_byte(streamer: N8nStreamer, fake: FakeN8n) -> None:
    _t, _s, first = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario=hang_headers&hang=3")
    _t, _s, later = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario=stall&hang=3")
    assert first is not None
    assert later is not None
    assert first.detail["timeout"] == "first_byte"
    assert later.detail["timeout"] == "read"


async def test_streamer_total_timeout(fake: FakeN8n, database_url: str, tmp_path: Path) -> None:
    streamer = N8nStreamer(stream_settings(database_url, tmp_path, N8N_TOTAL_TIMEOUT=0.4, N8N_READ_TIMEOUT=5))
    try:
        text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=150")
    finally:
        await streamer.close()
    assert failure is not None
    assert failure.code == "upstream_timeout"
    assert failure.detail["timeout"] == "total"
    assert text.startswith("Echo:")


async def test_streamer_slow_tokens_within_read_timeout(streamer: N8nStreamer, fake: FakeN8n) -> None:
    text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=100")
    assert failure is None
    assert text == "Echo: hello there"


async def test_streamer_refused_connection_is_unreachable_and_fast(streamer: N8nStreamer) -> None:
    import time

    from tests.live import free_port

    started = time.monotonic()
    _text, _stats, failure = await relay(streamer, f"http://127.0.0.1:{free_port()}/webhook/x")
    assert failure is not None
    assert failure.code == "upstream_unreachable"
    assert time.monotonic() - started < 0.5


async def test_streamer_dns_failure_is_unreachable(streamer: N8nStreamer) -> None:
    _text, _stats, failure = await relay(streamer, "http://no-such-host.invalid/webhook/x")
    assert failure is not None
    assert failure.code == "upstream_unreachable"


async def test_streamer_policy_refusal_is_blocked(fake: FakeN8n, database_url: str, tmp_path: Path) -> None:
    streamer = N8nStreamer(stream_settings(database_url, tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False))
    try:
        _t, _s, literal = await relay(streamer, f"{fake.url}/webhook/agent-stream")
        _t, _s, resolved = await relay(streamer, f"http://localhost.:{fake.port}/webhook/agent-stream")
    finally:
        await streamer.close()
    assert literal is not None
    assert literal.code == "upstream_blocked"
    assert resolved is not None
    assert resolved.code == "upstream_blocked"
    assert fake.requests == []


async def test_streamer_does_not_follow_redirects(streamer: N8nStreamer, fake: FakeN8n) -> None:
    _text, stats, failure = await relay(streamer, f"{fake.url}/webhook/x?scenario=status&status=302")
    assert failure is not None
    assert failure.code == "upstream_error"
    assert stats.upstream_status == 302
    assert len(fake.requests) == 1


async def test_streamer_404_keeps_n8n_hint_for_admins_only(streamer: N8nStreamer, fake: FakeN8n) -> None:
    _text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/does-not-exist")
    assert failure is not None
    assert failure.upstream_status == 404
    assert "not registered" in failure.detail["n8n_message"]
    assert "activate the workflow" in failure.detail["n8n_hint"]
    assert "hint" not in failure.message
    assert "does-not-exist" not in failure.message


async def test_streamer_sends_body_and_headers(streamer: N8nStreamer, fake: FakeN8n) -> None:
    out: list[str] = []
    await streamer.run(
        url=f"{fake.url}/webhook/agent-stream",
        headers={"X-N8N-Auth": "s3cret"},
        payload={"chatInput": "hi", "sessionId": "c1"},
        on_chunks=out.extend,
        stats=StreamStats(),
    )
    received = fake.requests[-1]
    assert received["json"] == {"chatInput": "hi", "sessionId": "c1"}
    assert received["headers"]["X-N8N-Auth"] == "s3cret"
    assert received["headers"]["Content-Type"] == "application/json"


# --- Generation: what SSE readers see ------------------------------------------------------------


def _generation() -> Generation:
    new = NewGeneration(
        chat_id=uuid.uuid4(),
        team_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        index=1,
        assistant_id="a1",
        user_message={"id": "u1", "role": "user", "content": "hi", "status": "complete", "created_at": "t"},
        webhook_url="http://x",
        webhook_headers_encrypted=None,
        payload={},
        created_at=utcnow(),
    )
    return Generation(new=new)


async def _collect(generation: Generation, ping: float = 5) -> list[tuple[str | None, str | None, Any]]:
    out = []
    async for block in generation.sse(ping):
        # One write may hold several events (everything available when the reader woke).
        for event in parse_sse(block.decode()):
            out.append((event.id, event.comment, event.data))
    return out


async def test_generation_merges_pending_chunks_into_one_event() -> None:
    generation = _generation()
    generation.add_event("status", {"description": "Waiting for the agent", "done": False})
    generation.add_chunks(["Hel", "lo"])
    generation.add_chunks([" there"])
    generation.finish("done", {"message": {"id": "a1"}})
    events = await _collect(generation)
    assert [e[0] for e in events] == ["1", "2", "3", "4"]
    assert events[2][2] == {"type": "message", "data": {"content": "Hello there"}}
    assert events[3][2] == {"type": "done", "data": {"message": {"id": "a1"}}}


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
    assert [d["type"] for d in data] == ["start", "message", "message", "error"]
    assert [e[0] for e in events if e[2] is not None] == ["1", "2", "3", "4"]
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


async def test_streamer_session_has_no_hidden_total_timeout(streamer: N8nStreamer) -> None:
    session = streamer.session()
    assert session is streamer.session()
    assert session.timeout.total is None
    assert session.timeout.connect == 0.5
    assert session.timeout.sock_read is None
    connector = session.connector
    assert isinstance(connector, aiohttp.TCPConnector)
    assert connector.limit == 0
    await streamer.close()
    assert session.closed


# --- parser: odd bodies seen behind proxies --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b'\xef\xbb\xbf{"output": "Echo: hi"}', b'\xef\xbb\xbf{"type":"item","content":"Echo: hi"}\n'],
)
def test_parse_body_with_utf8_bom(body: bytes) -> None:
    for pieces in every_cut(body):
        text, parser = parse(pieces)
        assert (text, parser.failure) == ("Echo: hi", None)


@pytest.mark.parametrize("page", [b"<!DOCTYPE html><html><body>Sign in</body></html>", b"\n  <html><p>502</p></html>"])
def test_parse_html_page_is_bad_upstream_response(page: bytes) -> None:
    text, parser = parse([page])
    assert text == ""
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


def test_parse_deeply_nested_json_is_bad_upstream_response() -> None:
    _text, parser = parse([b"[" * 100_000 + b"]" * 100_000])
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


# --- N8nStreamer: every way of failing maps to the same code, message, status and detail --------------


class _FailingContent:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def readany(self) -> bytes:
        raise self.exc


class _FailingResponse:
    """A 200 whose body read raises `exc` (or whose opening raises it, with `at="post"`)."""

    status = 200
    charset = None

    def __init__(self, exc: BaseException, at: str) -> None:
        self.exc = exc
        self.at = at
        self.content = _FailingContent(exc)

    async def __aenter__(self) -> _FailingResponse:
        if self.at == "post":
            raise self.exc
        return self

    async def __aexit__(self, *args: object) -> None:
        return None


class _FailingSession:
    """Stands in for the pooled aiohttp session: aiohttp's own exceptions, without a network."""

    closed = False

    def __init__(self, exc: BaseException, at: str) -> None:
        self.exc = exc
        self.at = at

    def post(self, *args: object, **kwargs: object) -> _FailingResponse:
        return _FailingResponse(self.exc, self.at)

    async def close(self) -> None:
        return None


def _response_error() -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(None, (), status=200, message="bad chunk")  # type: ignore[arg-type]


TIMEOUT_FIRST = {"timeout": "first_byte", "seconds": 0.5}
NOT_IN_TIME = "The agent did not answer in time"
UNREACHABLE = "The agent could not be reached"
FAILURE_TABLE = [
    # (exception, raised at, code, message, upstream_status, detail)
    (TimeoutError(), "post", "upstream_timeout", NOT_IN_TIME, None, TIMEOUT_FIRST),
    (TimeoutError(), "read", "upstream_timeout", NOT_IN_TIME, 200, TIMEOUT_FIRST),
    (
        aiohttp.ConnectionTimeoutError(),
        "post",
        "upstream_timeout",
        "The agent did not answer in time",
        None,
        TIMEOUT_FIRST,
    ),
    (
        WebhookPolicyError("no private addresses"),
        "post",
        "upstream_blocked",
        "The agent's webhook address is not allowed",
        None,
        {"reason": "no private addresses"},
    ),
    (
        aiohttp.ClientPayloadError("cut"),
        "read",
        "upstream_disconnected",
        "The connection to the agent was lost",
        200,
        {"error": "ClientPayloadError"},
    ),
    (
        aiohttp.ServerDisconnectedError(),
        "post",
        "upstream_disconnected",
        "The connection to the agent was lost",
        None,
        {"error": "ServerDisconnectedError"},
    ),
    (
        aiohttp.ClientOSError(),
        "read",
        "upstream_disconnected",
        "The connection to the agent was lost",
        200,
        {"error": "ClientOSError"},
    ),
    (
        _response_error(),
        "read",
        "bad_upstream_response",
        "The agent's answer could not be read",
        200,
        {"error": "ClientResponseError"},
    ),
    (
        aiohttp.ClientError("x"),
        "read",
        "upstream_unreachable",
        "The agent could not be reached",
        None,
        {"error": "ClientError"},
    ),
    (ValueError("x"), "read", "upstream_unreachable", UNREACHABLE, None, {"error": "ValueError"}),
    (ValueError("x"), "post", "upstream_unreachable", UNREACHABLE, None, {"error": "ValueError"}),
]


@pytest.mark.parametrize(("exc", "at", "code", "message", "status", "detail"), FAILURE_TABLE)
async def test_streamer_maps_each_failure_to_its_error(
    streamer: N8nStreamer, exc: BaseException, at: str, code: str, message: str, status: int | None, detail: Any
) -> None:
    streamer._session = _FailingSession(exc, at)  # type: ignore[assignment]
    _text, stats, failure = await relay(streamer, "http://127.0.0.1:9/webhook/x")
    assert failure is not None
    assert (failure.code, failure.message, failure.upstream_status, failure.detail) == (code, message, status, detail)
    assert failure.__suppress_context__
    assert stats.format is None
    assert stats.bytes == 0


async def test_streamer_lets_unexpected_errors_through(streamer: N8nStreamer) -> None:
    """Anything else is a bug, not an upstream failure: it reaches the generation (internal_error)."""
    streamer._session = _FailingSession(RuntimeError("bug"), "read")  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="bug"):
        await relay(streamer, "http://127.0.0.1:9/webhook/x")


@pytest.mark.parametrize(
    ("scenario", "code", "message", "status", "detail"),
    [
        (
            "hang_headers&hang=3",
            "upstream_timeout",
            "The agent did not answer in time",
            None,
            {"timeout": "first_byte", "seconds": 0.5},
        ),
        (
            "stall&hang=3",
            "upstream_timeout",
            "The agent stopped sending its answer",
            200,
            {"timeout": "read", "seconds": 0.5},
        ),
        (
            "reset",
            "upstream_disconnected",
            "The connection to the agent was lost",
            200,
            {"error": "ClientPayloadError"},
        ),
        (
            "status&status=502",
            "upstream_error",
            "The agent answered with an error (HTTP 502)",
            502,
            {"n8n_message": "Error in workflow"},
        ),
        (
            "status&status=302",
            "upstream_error",
            "The agent answered with a redirect (HTTP 302), which is not followed",
            302,
            {"n8n_message": "Error in workflow"},
        ),
        (
            "malformed",
            "bad_upstream_response",
            "The agent sent an invalid line",
            200,
            {"reason": "line is not JSON", "format": "ndjson"},
        ),
        ("empty", "empty_response", "The agent returned an empty answer", 200, {"format": None}),
    ],
)
async def test_streamer_fault_errors_are_exact(
    streamer: N8nStreamer, fake: FakeN8n, scenario: str, code: str, message: str, status: int | None, detail: Any
) -> None:
    _text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario={scenario}")
    assert failure is not None
    assert (failure.code, failure.message, failure.upstream_status, failure.detail) == (code, message, status, detail)


async def test_streamer_total_timeout_error_is_exact(fake: FakeN8n, database_url: str, tmp_path: Path) -> None:
    streamer = N8nStreamer(stream_settings(database_url, tmp_path, N8N_TOTAL_TIMEOUT=0.4, N8N_READ_TIMEOUT=5))
    try:
        _text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=150")
    finally:
        await streamer.close()
    assert failure is not None
    assert (failure.code, failure.message, failure.upstream_status, failure.detail) == (
        "upstream_timeout",
        "The agent's answer took too long",
        200,
        {"timeout": "total", "seconds": 0.4},
    )


async def test_streamer_unreachable_and_blocked_errors_are_exact(
    fake: FakeN8n, database_url: str, tmp_path: Path
) -> None:
    from tests.live import free_port

    streamer = N8nStreamer(stream_settings(database_url, tmp_path))
    port = free_port()
    try:
        _t, _s, refused = await relay(streamer, f"http://127.0.0.1:{port}/webhook/x")
    finally:
        await streamer.close()
    assert refused is not None
    assert (refused.code, refused.message, refused.upstream_status) == (
        "upstream_unreachable",
        "The agent could not be reached",
        None,
    )
    assert refused.detail == {
        "error": "ClientConnectorError",
        "reason": f"[Errno 111] Connect call failed ('127.0.0.1', {port})",
    }

    strict = N8nStreamer(stream_settings(database_url, tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False))
    try:
        _t, _s, literal = await relay(strict, f"{fake.url}/webhook/agent-stream")
        _t, _s, resolved = await relay(strict, f"http://localhost.:{fake.port}/webhook/agent-stream")
    finally:
        await strict.close()
    for failure in (literal, resolved):
        assert failure is not None
        assert (failure.code, failure.message, failure.upstream_status) == (
            "upstream_blocked",
            "The agent's webhook address is not allowed",
            None,
        )
        assert failure.detail == {
            "reason": "webhook address is private or loopback; "
            "set WEBHOOK_ALLOW_PRIVATE_NETWORKS or WEBHOOK_ALLOWED_HOSTS"
        }
