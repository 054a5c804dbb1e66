"""The HTTP client to n8n: the pooled aiohttp session, one POST read into a BodyParser, non-2xx answers."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

import aiohttp
import yarl
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from app.config import Settings
from app.n8n_parser import BodyParser, StreamFailure, excerpt
from app.webhooks import PolicyResolver

USER_AGENT = "n8n-chat-relay/1.0"
ACCEPT = "application/x-ndjson, text/event-stream, application/json;q=0.9, text/plain;q=0.8, */*;q=0.5"
#: Bytes of an error body kept to extract n8n's `message` / `hint` for the error log (never shown to clients).
ERROR_BODY_EXCERPT = 4096
#: The plain-text refusals of n8n's Webhook node authentication (Basic, Header, JWT auth), kept as n8n's
#: message: they carry no secret and tell "no credentials sent" (401) from "wrong credentials" (403).
N8N_AUTH_REFUSALS = ("Authorization is required!", "Authorization data is wrong!")
#: The statuses whose `Retry-After` says when to try again (RFC 9110): too many requests, unavailable.
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: The longest wait passed on from a `Retry-After` (a day); a longer one is shown as this.
RETRY_AFTER_MAX = 86_400
#: Idle pooled connections to n8n are dropped before n8n (Node's 5 s keep-alive) closes them; reusing one
#: n8n is closing fails the POST with ServerDisconnectedError (seen under load in the benchmark).
N8N_KEEPALIVE_SECONDS = 4.0


@dataclass(slots=True)
class StreamStats:
    """What one call to n8n looked like, for the stored message's metadata and the error log."""

    upstream_status: int | None = None
    format: str | None = None
    bytes: int = 0
    ttfb_ms: float | None = None
    #: Milliseconds to the first text chunk (n8n's `begin` line is a byte, not yet text).
    ttfc_ms: float | None = None
    #: The format as the connection test names it (`BodyParser.body_format`).
    body_format: str | None = None
    #: (tokens in, tokens out) when the workflow reported its usage.
    usage: tuple[int, int] | None = None


class Attachment(NamedTuple):
    """A file sent as a `files` part of a multipart request."""

    filename: str
    content_type: str
    data: bytes


def multipart_body(payload: dict[str, Any], attachments: list[Attachment]) -> aiohttp.FormData:
    """The request n8n's Chat Trigger gets from its own chat widget with files (@n8n/chat `sendWithFiles`):
    `action`, `sessionId`, `chatInput`, `metadata` (JSON text), one `files` part per file; then what our JSON
    body carries besides: `messages` and `config` as JSON text, `system_prompt` as text (docs/FILES.md)."""
    form = aiohttp.FormData(quote_fields=False, charset="utf-8")
    metadata = dict(payload.get("metadata") or {})
    metadata["files"] = payload.get("files", [])
    form.add_field("action", "sendMessage")
    form.add_field("sessionId", str(payload.get("sessionId", "")))
    form.add_field("chatInput", str(payload.get("chatInput", "")))
    form.add_field("metadata", _json(metadata))
    for attachment in attachments:
        form.add_field("files", attachment.data, filename=attachment.filename, content_type=attachment.content_type)
    form.add_field("messages", _json(payload.get("messages", [])))
    form.add_field("system_prompt", str(payload.get("system_prompt", "")))
    form.add_field("config", _json(payload.get("config", {})))
    return form


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class TotalTimeout(Exception):
    """N8N_TOTAL_TIMEOUT passed before the answer was complete."""


class ConnectTimeout(Exception):
    """No connection to n8n (TCP and TLS) within N8N_CONNECT_TIMEOUT, or within the first byte's shorter deadline
    (`seconds`: the deadline that ended it, when that was the first byte's)."""

    def __init__(self, seconds: float | None = None) -> None:
        super().__init__()
        self.seconds = seconds


class FirstByteTimeout(Exception):
    """n8n sent nothing within N8N_FIRST_BYTE_TIMEOUT (connecting included)."""


class ReadTimeout(Exception):
    """n8n went quiet for N8N_READ_TIMEOUT after its first byte."""


class PoolConnector(aiohttp.TCPConnector):
    """aiohttp's connector, except that a pooled connection which received anything while idle is not reused.

    aiohttp keeps reading an idle kept-alive connection and queues a whole response that arrives on it (a server
    or proxy writing past its own Content-Length, a response sent twice); the next request on that connection,
    for any agent on that host (another team's too), was answered with it, and every later answer there went to
    the request after its own. Such a protocol says `should_close` (a message queued, a body pending, an error):
    it is closed, and the pool asked for the next one (or a new connection)."""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while True:
            connection = await super()._get(key, traces)
            if connection is None or connection.protocol is None or not connection.protocol.should_close:
                return connection
            connection.close()


def client_timeout(s: Settings) -> aiohttp.ClientTimeout:
    """aiohttp's deadlines: the connect one (TCP and TLS) from `s`; the others are `exchange`'s own.
    total=None: no hidden cap shorter than N8N_TOTAL_TIMEOUT (aiohttp's default total is 300 s)."""
    return aiohttp.ClientTimeout(
        total=None, connect=s.N8N_CONNECT_TIMEOUT, sock_connect=s.N8N_CONNECT_TIMEOUT, sock_read=None
    )


def open_session(s: Settings) -> aiohttp.ClientSession:
    """The shared session: policy-checking resolver, bounded pool, no hidden total timeout, no cookies.

    One session serves every agent of every team: a cookie jar would send what one workflow (or a proxy in
    front of its n8n) set to every other webhook on that host, another team's included."""
    connector = PoolConnector(
        resolver=PolicyResolver(s),
        limit=s.N8N_POOL_LIMIT,
        limit_per_host=0,
        ttl_dns_cache=10,
        keepalive_timeout=N8N_KEEPALIVE_SECONDS,
    )
    timeout = client_timeout(s)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=True,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT},
    )


async def exchange(
    session: aiohttp.ClientSession,
    *,
    target: yarl.URL,
    body: bytes | aiohttp.FormData,
    headers: dict[str, str],
    parser: BodyParser,
    on_chunks: Callable[[list[str]], None],
    stats: StreamStats,
    settings: Settings,
    ready: asyncio.Future[None] | None = None,
    deadlines: aiohttp.ClientTimeout | None = None,
) -> None:
    """POST `body` (JSON bytes, or a multipart form that sets its own Content-Type) and feed the answer to
    `parser`; the deadlines (connect, first byte, read, total) surface as their own exception types. `ready`:
    a connection being opened to the same origin (N8nStreamer.warm), awaited first, within the first byte's
    deadline. `deadlines`: aiohttp's deadlines for this request instead of the session's (`client_timeout`; the
    connection test's shorter connect deadline)."""
    s = settings
    # The admin's own `Accept`, in whatever case, replaces the relay's: one Accept line, the one configured.
    send_headers = dict(headers)
    if not any(name.lower() == "accept" for name in headers):
        send_headers["Accept"] = ACCEPT
    if isinstance(body, bytes):
        send_headers["Content-Type"] = "application/json"
    loop = asyncio.get_running_loop()
    started = loop.time()
    got_first_byte = False
    quiet: _QuietWatch | None = None
    cut: aiohttp.ClientTimeout | None = None
    by_total = False  # the connect deadline is cut under the whole answer's (not the first byte's)
    try:
        async with asyncio.timeout(s.N8N_TOTAL_TIMEOUT) as wall:
            try:
                # One deadline object: the first byte's, then the one `_QuietWatch` moves on after each read.
                async with asyncio.timeout(s.N8N_FIRST_BYTE_TIMEOUT) as idle:
                    if ready is not None:
                        await asyncio.shield(ready)  # never fails: a failed warm-up leaves the connecting to post
                    # The connect deadline must end before whichever of the first byte's and the whole answer's
                    # ends first (`_connect_first`).
                    first, whole = idle.when(), wall.when()
                    by_total = whole is not None and (first is None or whole < first)
                    cut = _connect_first(whole if by_total else first, deadlines or session.timeout, loop.time())
                    deadlines = cut or deadlines
                    post = session.post if deadlines is None else functools.partial(session.post, timeout=deadlines)
                    async with post(target, data=body, headers=send_headers, allow_redirects=False) as response:
                        stats.upstream_status = response.status
                        if not 200 <= response.status < 300:
                            idle.reschedule(None)  # the error body has its own bound: the status is the answer
                            raise await status_failure(response, within=s.N8N_READ_TIMEOUT)
                        parser.use_charset(response.charset)
                        content = response.content
                        while not parser.finished:
                            data = await content.readany()
                            if not data:
                                break
                            if quiet is not None:
                                quiet.last = loop.time()
                            else:
                                got_first_byte = True
                                stats.ttfb_ms = round((loop.time() - started) * 1000, 1)
                                quiet = _QuietWatch(idle, s.N8N_READ_TIMEOUT)
                            chunks = parser.feed(data)
                            if chunks:
                                if stats.ttfc_ms is None:
                                    stats.ttfc_ms = round((loop.time() - started) * 1000, 1)
                                on_chunks(chunks)
                        chunks = parser.finish()
                        if chunks:
                            if stats.ttfc_ms is None:
                                stats.ttfc_ms = round((loop.time() - started) * 1000, 1)
                            on_chunks(chunks)
            except TimeoutError as exc:
                if wall.expired():
                    raise
                if (isinstance(exc, aiohttp.ConnectionTimeoutError) and not idle.expired()) or (
                    ready is not None and not ready.done()
                ):
                    # aiohttp's own connect deadline, or the first byte's while the warm-up was still connecting:
                    # either way no request left, which callback mode must know (nothing will post). Named by the
                    # deadline that ended it when that is another one (the connect one cut under it).
                    if cut is None and isinstance(exc, aiohttp.ConnectionTimeoutError):
                        raise ConnectTimeout(None) from None
                    raise ConnectTimeout(s.N8N_TOTAL_TIMEOUT if by_total else s.N8N_FIRST_BYTE_TIMEOUT) from None
                raise (ReadTimeout() if got_first_byte else FirstByteTimeout()) from None
            finally:
                if quiet is not None:
                    quiet.close()
    except TimeoutError:
        if ready is not None and not ready.done():  # ended while the warm-up was still connecting: nothing left
            raise ConnectTimeout(s.N8N_TOTAL_TIMEOUT) from None
        raise TotalTimeout from None


#: How much earlier than the first byte's deadline a connect deadline cut to fit under it falls: the two timers
#: must not fire in the same turn of the loop, or the connect one might lose and be reported as the first byte's.
CONNECT_MARGIN = 0.05


def _connect_first(when: float | None, deadlines: aiohttp.ClientTimeout, now: float) -> aiohttp.ClientTimeout | None:
    """The request's aiohttp deadlines when its connect deadline must be cut to end before `when` (the loop time
    the first byte's or the whole answer's deadline ends), else None (the session's, or the caller's, as they are).

    A first-byte (or total) deadline that ends while aiohttp is still connecting (N8N_FIRST_BYTE_TIMEOUT set
    below N8N_CONNECT_TIMEOUT, or a warm-up wait that used the time) cannot tell whether the request left, so it
    was reported as n8n's silence, and callback mode waited for callbacks from a workflow that never ran. Cut,
    the connect deadline ends first and is reported as what it is. aiohttp rounds a connect deadline over
    `ceil_threshold` up to a whole second of the loop's clock; the cut one is taken back by that second too.
    A few float operations on the usual path (both deadlines far beyond the connect one)."""
    connect, threshold = deadlines.connect, deadlines.ceil_threshold
    if when is None or connect is None:
        return None
    left = when - now - CONNECT_MARGIN
    if connect + (1.0 if connect > threshold else 0.0) < left:
        return None
    cut = max(left - 1.0 if left - 1.0 > threshold else min(left, threshold), 0.001)
    sock_connect = deadlines.sock_connect
    return aiohttp.ClientTimeout(
        total=deadlines.total,
        connect=cut,
        sock_connect=cut if sock_connect is None else min(sock_connect, cut),
        sock_read=deadlines.sock_read,
        ceil_threshold=threshold,
    )


class _QuietWatch:
    """N8N_READ_TIMEOUT between reads, at the cost of one float store per read (`last`).

    Rescheduling the timeout on every read cancelled and re-created a timer per chunk (~2 µs of CPU each).
    Instead one timer wakes when the deadline would be due, and expires `timeout` (the `asyncio.timeout` around
    the exchange, which then raises TimeoutError in its task) only when no read came since; otherwise it waits
    for the new deadline.
    """

    __slots__ = ("handle", "last", "loop", "seconds", "timeout")

    def __init__(self, timeout: asyncio.Timeout, seconds: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.seconds = seconds
        self.last = self.loop.time()
        timeout.reschedule(None)  # the first byte came: its deadline is over
        self.handle: asyncio.TimerHandle | None = self.loop.call_at(self.last + seconds, self._check)

    def _check(self) -> None:
        due = self.last + self.seconds
        now = self.loop.time()
        if now >= due:
            self.handle = None
            self.timeout.reschedule(now)  # due now: the timeout cancels its task, which raises TimeoutError
        else:
            self.handle = self.loop.call_at(due, self._check)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> int | None:
    """A `Retry-After` value as whole seconds to wait, 0 to RETRY_AFTER_MAX: delta-seconds (ASCII digits only)
    or an HTTP-date (the seconds until then, rounded up; a date already past is 0). None for anything else
    (a sign, a fraction, a list, a date that does not exist): a garbled header is no wait at all."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # More significant digits than a day has never mean less than a day (int() refuses over 4,300 of them);
        # leading zeros are not significant: "000000000030" is 30 s.
        digits = text.lstrip("0") or "0"
        return RETRY_AFTER_MAX if len(digits) > len(str(RETRY_AFTER_MAX)) else min(int(digits), RETRY_AFTER_MAX)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # `-0000`: UTC, as an HTTP-date always is
        when = when.replace(tzinfo=UTC)
    wait = math.ceil((when - (now or datetime.now(UTC))).total_seconds())
    return max(0, min(wait, RETRY_AFTER_MAX))


async def status_failure(response: aiohttp.ClientResponse, *, within: float) -> StreamFailure:
    """A non-2xx answer: n8n's `message`/`hint` (its own text, shortened) for admins, a safe line for users,
    and on a 429 or 503 the wait its `Retry-After` asks for (`retry_after_seconds`).

    Its body is read for at most `within` seconds: a silent one leaves the status as the whole answer (an
    `upstream_error` with it, not a timeout that would hide it)."""
    status = response.status
    detail: dict[str, Any] = {}
    raw = b""
    try:
        async with asyncio.timeout(within):
            raw = await response.content.read(ERROR_BODY_EXCERPT)
        parsed = json.loads(raw) if raw.strip().startswith(b"{") else None
    except (aiohttp.ClientError, ValueError, RecursionError, TimeoutError):
        parsed = None
    if parsed is None and raw.strip().decode("utf-8", "replace") in N8N_AUTH_REFUSALS:
        detail["n8n_message"] = raw.strip().decode()
    if isinstance(parsed, dict):
        for key in ("message", "hint"):
            text = excerpt(parsed.get(key))
            if text:
                detail[f"n8n_{key}"] = text
    if status == 404:
        message = "The agent's n8n webhook is not registered (is the workflow active?)"
    elif 300 <= status < 400:
        message = f"The agent answered with a redirect (HTTP {status}), which is not followed"
    else:
        message = f"The agent answered with an error (HTTP {status})"
    retry_after = None
    if status in RETRY_AFTER_STATUSES:
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        if retry_after is not None:
            detail["retry_after"] = retry_after
    return StreamFailure("upstream_error", message, upstream_status=status, detail=detail, retry_after=retry_after)
