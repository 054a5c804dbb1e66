"""N8nStreamer against the fake n8n: formats, charsets, faults, and the one table from failure to error."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from app.config import Settings
from app.streaming import N8nStreamer, StreamFailure, StreamStats
from app.upstream import CONNECT_MARGIN, RETRY_AFTER_MAX, _connect_first, retry_after_seconds
from app.webhooks import WebhookPolicyError
from tests.conftest import make_settings
from tests.live import silent_port
from tools.fake_n8n import FakeN8n, load_captures, raw_answer

CAPTURES = load_captures()


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


@pytest.fixture
async def patient_streamer(tmp_path: Path, database_url: str) -> AsyncIterator[N8nStreamer]:
    """For tests about what is relayed, not about timeouts: a loaded CI machine (a browser test on the other
    worker) can delay a first byte past the 0.5 s the timeout tests use."""
    s = N8nStreamer(stream_settings(database_url, tmp_path, N8N_READ_TIMEOUT=10, N8N_FIRST_BYTE_TIMEOUT=10))
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
async def test_streamer_relays_capture(patient_streamer: N8nStreamer, fake: FakeN8n, name: str) -> None:
    text, stats, failure = await relay(patient_streamer, f"{fake.url}/webhook/x?scenario={name}&speed=50")
    expected_text, expected_code = CAPTURE_OUTCOMES[name]
    assert text == expected_text, failure and (failure.code, failure.message)
    assert (failure.code if failure else None) == expected_code
    assert stats.upstream_status == CAPTURES[name].status


async def test_streamer_finishes_at_message_end_not_socket_close(streamer: N8nStreamer, fake: FakeN8n) -> None:
    # The fake keeps the socket open 5 s after the last chunk; the read timeout is 0.5 s.
    text, stats, failure = await relay(streamer, f"{fake.url}/webhook/x?scenario=stream_ok&speed=50&linger=5")
    assert failure is None
    assert text == "Echo: hello there"
    assert stats.format == "ndjson"


async def test_streamer_decodes_gzip_incrementally(patient_streamer: N8nStreamer, fake: FakeN8n) -> None:
    text, _stats, failure = await relay(patient_streamer, f"{fake.url}/webhook/agent-stream")
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
async def test_streamer_formats(patient_streamer: N8nStreamer, fake: FakeN8n, scenario: str, expected: str) -> None:
    text, _stats, failure = await relay(patient_streamer, f"{fake.url}/webhook/agent-stream?scenario={scenario}")
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
    patient_streamer: N8nStreamer, fake: FakeN8n, query: str, said: str
) -> None:
    url = f"{fake.url}/webhook/agent-stream?scenario=charset&{query}"
    text, _stats, failure = await relay(patient_streamer, url, chatInput=said)
    assert failure is None, failure and failure.detail
    assert text == f"Echo: {said}"


@pytest.mark.parametrize("charset", ["x-no-such-charset", "base64", "rot13"])
async def test_streamer_unknown_charset_is_bad_upstream_response(
    patient_streamer: N8nStreamer, fake: FakeN8n, charset: str
) -> None:
    url = f"{fake.url}/webhook/agent-stream?scenario=charset&charset={charset}"
    text, _stats, failure = await relay(patient_streamer, url, chatInput="café")
    assert failure is not None
    assert failure.code == "bad_upstream_response"
    assert "charset" in failure.detail["reason"]
    assert text == ""


@pytest.mark.parametrize(
    ("charset", "body"),
    [
        ("idna", b'data: {"content": "hi"}\n\n'),  # no `replace` error handling: its SSE lines could not be read
        ("punycode", b'{"output": "hi"}'),  # strict decoding fails with UnicodeError, not UnicodeDecodeError
    ],
)
async def test_streamer_charset_its_codec_cannot_read_is_bad_upstream_response(
    patient_streamer: N8nStreamer, fake: FakeN8n, charset: str, body: bytes
) -> None:
    """n8n answered (200): an answer in a codec that fails as no other does is unreadable, not unreachable."""
    url = raw_answer(fake.url, body, f"text/plain; charset={charset}")
    text, stats, failure = await relay(patient_streamer, url)
    assert failure is not None
    assert (failure.code, failure.upstream_status, stats.upstream_status) == ("bad_upstream_response", 200, 200)
    assert text == ""


async def test_streamer_utf8_split_across_reads(patient_streamer: N8nStreamer, fake: FakeN8n) -> None:
    url = f"{fake.url}/webhook/agent-stream?scenario=fragmented"
    text, _stats, failure = await relay(patient_streamer, url, chatInput="héllo wörld ✓")
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


async def test_streamer_read_timeout_counts_from_the_last_read(streamer: N8nStreamer, fake: FakeN8n) -> None:
    """N8N_READ_TIMEOUT (0.5 s here) is the quiet time allowed after each read, not a deadline set once:
    chunks 0.3 s apart for 1.8 s all arrive; then the 3 s stall fails as a read timeout ~0.5 s after the
    last chunk (the first byte's deadline is no longer in force once bytes came)."""
    text, _stats, failure = await relay(
        streamer, f"{fake.url}/webhook/agent-stream?scenario=paced&chunks=6&interval_ms=300"
    )
    assert failure is None
    assert text.count("t") >= 6
    loop = asyncio.get_running_loop()
    started = loop.time()
    _text, _stats, later = await relay(streamer, f"{fake.url}/webhook/agent-stream?scenario=stall&after=1&hang=3")
    assert later is not None
    assert later.detail["timeout"] == "read"
    assert 0.45 <= loop.time() - started < 2.0


async def test_streamer_refused_connection_is_unreachable_and_fast(streamer: N8nStreamer) -> None:
    import time

    from tests.live import free_port

    started = time.monotonic()
    _text, _stats, failure = await relay(streamer, f"http://127.0.0.1:{free_port()}/webhook/x")
    assert failure is not None
    assert failure.code == "upstream_unreachable"
    assert time.monotonic() - started < 0.5


async def test_streamer_connect_timeout_is_named_as_such(database_url: str, tmp_path: Path) -> None:
    """A TLS handshake that never completes (a port that accepts and stays silent) ends at N8N_CONNECT_TIMEOUT,
    as "could not be reached in time": not as the first byte's much longer deadline, which it did not wait for."""
    import time

    streamer = N8nStreamer(stream_settings(database_url, tmp_path, N8N_CONNECT_TIMEOUT=0.5, N8N_FIRST_BYTE_TIMEOUT=30))
    try:
        async with silent_port() as port:
            started = time.monotonic()
            _text, stats, failure = await relay(streamer, f"https://127.0.0.1:{port}/webhook/x")
            elapsed = time.monotonic() - started
    finally:
        await streamer.close()
    assert failure is not None
    assert (failure.code, failure.message, failure.upstream_status) == (
        "upstream_timeout",
        "The agent could not be reached in time",
        None,
    )
    assert failure.detail == {"timeout": "connect", "seconds": 0.5}
    assert stats.upstream_status is None
    assert elapsed < 5


@pytest.mark.parametrize(
    ("first_byte_timeout", "total_timeout"), [(0.8, 900.0), (20.0, 0.8)], ids=["first-byte", "total"]
)
async def test_streamer_connect_cut_under_a_shorter_deadline_names_that_deadline(
    database_url: str, tmp_path: Path, first_byte_timeout: float, total_timeout: float
) -> None:
    """With N8N_FIRST_BYTE_TIMEOUT (or N8N_TOTAL_TIMEOUT) below N8N_CONNECT_TIMEOUT the connect deadline is cut
    to end just before it. The error log then named N8N_CONNECT_TIMEOUT (20 s) for a connection given up after
    0.8 s; under the total deadline the failure was even reported as the total timeout (which callback mode
    outlives, waiting for callbacks from a workflow that never ran)."""
    settings = stream_settings(
        database_url,
        tmp_path,
        N8N_CONNECT_TIMEOUT=20,
        N8N_FIRST_BYTE_TIMEOUT=first_byte_timeout,
        N8N_TOTAL_TIMEOUT=total_timeout,
    )
    streamer = N8nStreamer(settings)
    try:
        async with silent_port() as port, asyncio.timeout(10):
            _text, _stats, failure = await relay(streamer, f"https://127.0.0.1:{port}/webhook/x")
    finally:
        await streamer.close()
    assert failure is not None
    assert (failure.code, failure.message) == ("upstream_timeout", "The agent could not be reached in time")
    assert failure.detail == {"timeout": "connect", "seconds": 0.8}


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


async def test_a_status_with_a_silent_body_is_an_upstream_error_with_that_status(
    streamer: N8nStreamer, fake: FakeN8n
) -> None:
    """The status says what happened: a body that does not come within the read timeout is left unread,
    not turned into a timeout that hides the status."""
    _text, stats, failure = await relay(streamer, f"{fake.url}/webhook/x?scenario=status&status=502&hang=3")
    assert failure is not None
    assert (failure.code, failure.upstream_status, stats.upstream_status) == ("upstream_error", 502, 502)
    assert "HTTP 502" in failure.message


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


async def test_cookies_one_webhook_sets_are_not_sent_to_another(patient_streamer: N8nStreamer, fake: FakeN8n) -> None:
    """The session is shared by every agent of every team: a cookie one workflow (or a proxy) sets must not
    reach another team's workflow on the same n8n. `localhost`, not an IP: aiohttp's jar keeps cookies of names."""
    base = fake.url.replace("127.0.0.1", "localhost")
    setter = f"{base}/webhook/team-a?scenario=set_cookie&cookie=sid=a-secret"
    text, _stats, failure = await relay(patient_streamer, setter)
    assert (text, failure) == ("Echo: hello there", None)
    text, _stats, failure = await relay(patient_streamer, f"{base}/webhook/team-b?scenario=echo_json")
    assert (text, failure) == ("Echo: hello there", None)
    assert fake.requests[-1]["path"] == "/webhook/team-b"
    assert "Cookie" not in fake.requests[-1]["headers"]


@pytest.mark.parametrize(
    ("body", "status", "key"),
    [
        (b'{"type":"begin"}\n{"type":"error","content":"upstream refused key sk-live-123456"}\n', 200, "n8n_error"),
        (b'{"message":"Bad credential sk-live-123456","hint":"check sk-live-123456"}', 500, "n8n_message"),
    ],
)
async def test_error_details_never_hold_a_secret_header_value(
    patient_streamer: N8nStreamer, fake: FakeN8n, body: bytes, status: int, key: str
) -> None:
    """n8n's error texts go to the error log, shown to admins, who never see header values: a workflow that
    builds its error from its request headers (an API refusing the key it was handed) gets them masked there,
    as in the connection test's sample."""
    stats = StreamStats()
    with pytest.raises(StreamFailure) as caught:
        await patient_streamer.run(
            url=raw_answer(fake.url, body, status=status),
            headers={"X-Api-Key": "sk-live-123456"},
            payload={"chatInput": "hi"},
            on_chunks=lambda _chunks: None,
            stats=stats,
        )
    detail = caught.value.detail
    assert "***" in detail[key]
    assert "sk-live-123456" not in repr(detail)


#: A header value with a tab and a run of spaces (both allowed inside a value, app.fields).
SPACED_SECRET = "Bearer\tsk-live  9f8e7d6c5b4a"
IN_JSON = json.dumps(SPACED_SECRET)[1:-1].encode()


@pytest.mark.parametrize(
    ("body", "status", "key"),
    [
        # n8n's text is shortened to EXCERPT_CHARS and ends in "…": the secret's start must not stay before it.
        (b'{"message":"' + b"x" * 286 + b" k=" + IN_JSON + b'"}', 500, "n8n_message"),
        (
            b'{"type":"begin"}\n{"type":"error","content":"' + b"y" * 286 + b" k=" + IN_JSON + b'"}\n',
            200,
            "n8n_error",
        ),
        # The excerpt folds whitespace: the tab and the double space become single spaces.
        (b'{"message":"refused ' + IN_JSON + b'"}', 500, "n8n_message"),
        (
            b'{"type":"begin"}\n{"type":"error","content":"refused ' + IN_JSON + b' here"}\n',
            200,
            "n8n_error",
        ),
    ],
)
async def test_error_details_hold_no_part_of_a_secret_as_the_excerpt_writes_it(
    patient_streamer: N8nStreamer, fake: FakeN8n, body: bytes, status: int, key: str
) -> None:
    """The error log's n8n texts are excerpts (app.n8n_parser.excerpt: whitespace folded, cut with "…"): the
    secret is masked in the form the excerpt gives it, and its beginning before the "…" of a cut text."""
    with pytest.raises(StreamFailure) as caught:
        await patient_streamer.run(
            url=raw_answer(fake.url, body, status=status),
            headers={"Authorization": SPACED_SECRET},
            payload={"chatInput": "hi"},
            on_chunks=lambda _chunks: None,
            stats=StreamStats(),
        )
    text = caught.value.detail[key]
    assert "***" in text
    assert "Bearer" not in text
    assert "sk-l" not in text


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
    #: As `upstream.open_session` sets it, with the default N8N_CONNECT_TIMEOUT.
    timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_connect=10.0)

    def __init__(self, exc: BaseException, at: str) -> None:
        self.exc = exc
        self.at = at

    def post(self, *_args: object, **_kwargs: object) -> _FailingResponse:
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
        "The agent could not be reached in time",
        None,
        {"timeout": "connect", "seconds": 0.5},
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


# --- byte-level HTTP answers (a raw socket server: what n8n's proxies send, beyond the fake's aiohttp) ----------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_http(handler: Handler) -> AsyncIterator[str]:
    """A local server that runs `handler` on each connection, writing its answer byte for byte; yields its URL.
    Handlers still running at the end are stopped."""
    running: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the relay left, or the test is over
        finally:
            running.discard(task)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/webhook/x"
    finally:
        server.close()
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body) from the relay; its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    return await reader.readexactly(length)


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def ndjson_items(*texts: str) -> bytes:
    items = b"".join(b'{"type":"item","content":"%s"}\n' % text.encode() for text in texts)
    return b'{"type":"begin"}\n' + items + b'{"type":"end"}\n'


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"\x1f\x8b\x08\x00" + b"not a deflate stream"),
        ("deflate", b"\xff" * 20),
    ],
    ids=["gzip", "deflate"],
)
async def test_a_body_that_cannot_be_decompressed_is_unreadable_not_a_lost_connection(
    patient_streamer: N8nStreamer, encoding: str, body: bytes
) -> None:
    """A corrupt gzip or deflate body (a proxy that compressed badly, or cut and re-framed the stream) arrived
    whole: the answer could not be read. It was reported as `upstream_disconnected` ("the connection was lost"),
    because aiohttp wraps the decoding error in the ClientPayloadError a cut connection raises too."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
            % (encoding.encode(), len(body))
            + body
        )
        await writer.drain()
        await asyncio.sleep(1)  # the connection stays open: nothing was cut

    async with raw_http(answer) as url:
        text, stats, failure = await relay(patient_streamer, url)
    assert failure is not None
    assert (failure.code, failure.message, failure.upstream_status) == (
        "bad_upstream_response",
        "The agent's answer could not be read",
        200,
    )
    assert failure.detail == {"error": "ContentEncodingError"}
    assert (text, stats.upstream_status) == ("", 200)


async def test_a_gzip_stream_corrupt_after_some_tokens_keeps_them_and_is_unreadable(
    patient_streamer: N8nStreamer,
) -> None:
    """n8n's gzip stream is flushed per line (FORMATS.md): the tokens before the corrupt block were shown and
    are kept; the end is `bad_upstream_response`, not a lost connection."""
    compressor = zlib.compressobj(wbits=31)  # gzip
    start = compressor.compress(b'{"type":"begin"}\n{"type":"item","content":"Hello"}\n')
    start += compressor.flush(zlib.Z_SYNC_FLUSH)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(http_chunk(start))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(http_chunk(b"\xfe\xff\xff\xff"))  # a deflate block of the reserved type 3: invalid
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_http(answer) as url:
        text, _stats, failure = await relay(patient_streamer, url)
    assert failure is not None
    assert (failure.code, failure.upstream_status) == ("bad_upstream_response", 200)
    assert text == "Hello"


def ok(body: bytes) -> bytes:
    """A whole 200 answer with a Content-Length, kept alive."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_bytes_an_idle_pooled_connection_received_never_answer_the_next_request(
    patient_streamer: N8nStreamer,
) -> None:
    """A kept-alive connection back in the pool that receives a response nobody asked for (a server or proxy
    writing past its own Content-Length, a response sent twice) must not be reused: aiohttp queued it, the next
    request on that connection (any agent on that host, another team's too) got it as its answer, and from then
    on every answer went to the request after its own. Now the connection is dropped and the next request
    opens another: each request gets its own answer, and n8n got each request once."""
    served = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            await read_request(reader)
            served += 1
            writer.write(ok(ndjson_items(f"answer {served}")))
            await writer.drain()
            if served == 1:
                await asyncio.sleep(0.1)
                writer.write(ok(ndjson_items("unasked")))  # on the idle connection, after the answer
                await writer.drain()

    async with raw_http(answer) as url:
        answers = []
        for _ in range(3):
            text, _stats, failure = await relay(patient_streamer, url)
            answers.append((text, failure))
            await asyncio.sleep(0.3)
    assert answers == [("answer 1", None), ("answer 2", None), ("answer 3", None)]
    assert served == 3


async def test_a_pooled_connection_the_server_closed_while_idle_is_not_used_nor_the_request_sent_twice(
    patient_streamer: N8nStreamer,
) -> None:
    """A proxy in front of n8n whose keep-alive is shorter than the pool's 4 s closes the idle connection: the
    next send opens another and succeeds (no `upstream_disconnected`), and n8n gets each request once (a POST is
    never retried by aiohttp). Pins behaviour aiohttp already has."""
    served = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            try:
                await asyncio.wait_for(read_request(reader), 0.2)
            except TimeoutError:
                return  # idle for 0.2 s: the connection is closed (FIN)
            served += 1
            writer.write(ok(ndjson_items(f"answer {served}")))
            await writer.drain()

    async with raw_http(answer) as url:
        first = await relay(patient_streamer, url)
        await asyncio.sleep(0.5)
        second = await relay(patient_streamer, url)
    assert [(text, failure) for text, _stats, failure in (first, second)] == [("answer 1", None), ("answer 2", None)]
    assert served == 2


# --- Retry-After of a refusal (n8n's or a proxy's rate limiting) -------------------------------------------

RETRY_NOW = datetime(2026, 11, 24, 13, 52, 53, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30),
        (" 7 ", 7),
        ("0", 0),
        ("86400", RETRY_AFTER_MAX),
        ("86401", RETRY_AFTER_MAX),
        ("43200", 43200),  # as many digits as a day's 86400: its value decides, not its length
        ("9" * 5000, RETRY_AFTER_MAX),  # past int()'s digit limit: still just "very long"
        ("00000000000030", 30),  # leading zeros are still delta-seconds (RFC 9110: 1*DIGIT), not "very long"
        ("0" * 5000 + "5", 5),
        ("000000", 0),
        ("Tue, 24 Nov 2026 13:54:53 GMT", 120),  # an HTTP-date: the seconds until then
        ("Tue, 24 Nov 2026 13:54:53 -0000", 120),  # "-0000" (no zone given) parses naive: taken as UTC
        ("Tue, 24 Nov 2026 13:52:53.5 GMT", None),
        ("Tuesday, 24-Nov-26 13:53:23 GMT", 30),  # RFC 850's obsolete form, which RFC 9110 still accepts
        ("Tue, 24 Nov 2026 13:50:00 GMT", 0),  # a date already past: retry now
        ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_MAX),
        ("-5", None),
        ("1.5", None),
        ("+3", None),
        ("\uff13\uff10", None),  # full-width digits are digits to str.isdigit, not to HTTP
        ("soon", None),
        ("", None),
        (None, None),
        ("Tue, 31 Feb 2026 13:54:53 GMT", None),
        ("30, 40", None),
    ],
)
def test_retry_after_is_parsed_safely(value: str | None, seconds: int | None) -> None:
    assert retry_after_seconds(value, now=RETRY_NOW) == seconds


def test_a_retry_after_date_is_rounded_up() -> None:
    """119.5 s to the date is 120 (waiting 119 would be refused again), never a second short."""
    later = RETRY_NOW + timedelta(milliseconds=500)
    assert retry_after_seconds("Tue, 24 Nov 2026 13:54:53 GMT", now=later) == 120


@pytest.mark.parametrize(
    ("query", "retry_after"),
    [
        ("status=429&retry_after=30", 30),
        ("status=503&retry_after=5", 5),
        ("status=429&retry_after=86401", RETRY_AFTER_MAX),
        ("status=429&retry_after=soon", None),  # garbage: ignored, the failure is the same otherwise
        ("status=429", None),
        ("status=502&retry_after=30", None),  # not a "try later" status: no wait to pass on
        ("status=429&retry_after=30&hang=3", 30),  # the header counts even when the body never comes
    ],
)
async def test_a_refusals_retry_after_is_kept_with_its_failure(
    streamer: N8nStreamer, fake: FakeN8n, query: str, retry_after: int | None
) -> None:
    _text, _stats, failure = await relay(streamer, f"{fake.url}/webhook/x?scenario=status&{query}")
    assert failure is not None
    status = int(query.split("&")[0].removeprefix("status="))
    assert (failure.code, failure.message, failure.upstream_status) == (
        "upstream_error",
        f"The agent answered with an error (HTTP {status})",
        status,
    )
    assert failure.retry_after == retry_after
    assert failure.detail.get("retry_after") == retry_after


async def test_a_retry_after_date_is_counted_from_now(streamer: N8nStreamer, fake: FakeN8n) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    _text, _stats, failure = await relay(
        streamer, f"{fake.url}/webhook/x?scenario=status&status=429&retry_after={quote(when)}"
    )
    assert failure is not None
    assert failure.retry_after is not None
    assert 85 <= failure.retry_after <= 91


def _latest_end(seconds: float | None, threshold: float) -> float | None:
    """How long after it starts a deadline of `seconds` may fire: aiohttp rounds one over `ceil_threshold` up
    to the next whole second of the loop's clock (up to a second later)."""
    return None if seconds is None else seconds + (1.0 if seconds > threshold else 0.0)


@pytest.mark.parametrize(
    ("connect", "sock_connect", "first_byte", "threshold"),
    [
        (20.0, 20.0, 0.8, 5.0),  # N8N_FIRST_BYTE_TIMEOUT below the connect one
        (20.0, 20.0, 6.5, 5.0),  # the cut one is over the threshold: rounded up by a second
        (6.0, 6.0, 6.5, 5.0),  # shorter than the first byte's, yet over it once rounded up
        (20.0, None, 6.5, 5.0),
        (20.0, 30.0, 5.8, 5.0),
        (20.0, 20.0, 6.5, 2.0),
    ],
)
def test_a_connect_deadline_is_cut_to_end_before_the_first_bytes(
    connect: float, sock_connect: float | None, first_byte: float, threshold: float
) -> None:
    """The connect deadline, as aiohttp rounds it, must fire before the first byte's (less CONNECT_MARGIN), or
    a connection never made is reported as n8n's silence and callback mode waits for a workflow that never
    ran. The live test (tests/test_callbacks.py) meets only some of these cases."""
    now = 1000.0
    deadlines = aiohttp.ClientTimeout(
        total=None, connect=connect, sock_connect=sock_connect, sock_read=None, ceil_threshold=threshold
    )
    cut = _connect_first(now + first_byte, deadlines, now)
    assert cut is not None
    assert cut.connect is not None
    assert 0 < cut.connect
    assert cut.total is None
    assert cut.sock_read is None
    left = first_byte - CONNECT_MARGIN + 1e-9
    for seconds in (cut.connect, cut.sock_connect):
        end = _latest_end(seconds, cut.ceil_threshold)
        assert end is None or end <= left


def test_a_connect_deadline_well_before_the_first_bytes_is_kept() -> None:
    """The usual path: nothing is built (the session's deadlines serve as they are)."""
    deadlines = aiohttp.ClientTimeout(total=None, connect=0.5, sock_connect=0.5, sock_read=None)
    assert _connect_first(1020.0, deadlines, 1000.0) is None
    assert _connect_first(None, deadlines, 1000.0) is None
