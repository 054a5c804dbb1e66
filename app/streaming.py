"""The n8n relay's entry point: N8nStreamer calls an agent and names every way that call can fail.

Over modules with one job each: `app.n8n_parser` (the answer parser, pure), `app.upstream` (the aiohttp
client), `app.sse` (a generation's events as SSE bytes), `app.generations` (running generations, this
worker's heartbeat and recovery); their public names are re-exported here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from aiohttp.http_exceptions import ContentEncodingError

from app.config import Settings
from app.generations import WAITING, GenerationRegistry
from app.n8n_parser import BodyParser, StreamFailure, clean_text, excerpt, masked
from app.sse import PING, SSE_HEADERS, Generation
from app.upstream import (
    N8N_AUTH_REFUSALS,
    Attachment,
    ConnectTimeout,
    FirstByteTimeout,
    ReadTimeout,
    StreamStats,
    TotalTimeout,
    client_timeout,
    exchange,
    multipart_body,
    open_session,
)
from app.webhooks import WebhookPolicyError, webhook_target

__all__ = [
    "PING",
    "SSE_HEADERS",
    "WAITING",
    "BodyParser",
    "Generation",
    "GenerationRegistry",
    "N8nStreamer",
    "StreamFailure",
    "StreamStats",
    "clean_text",
]

UNREACHABLE = "The agent could not be reached"
#: Webhook URLs whose pool key `N8nStreamer.warm` keeps (all forgotten at once when full).
POOL_KEYS_KEPT = 10_000


def _error_name(exc: BaseException, _s: Settings) -> dict[str, Any]:
    return {"error": type(exc).__name__}


def _unreachable(exc: BaseException, _s: Settings) -> dict[str, Any]:
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    return {"error": type(exc).__name__, "reason": excerpt(str(cause)) or ""}


@dataclass(frozen=True, slots=True)
class _Failure:
    """What one kind of failure tells the client (`code`, `message`) and the error log (`detail`)."""

    code: str
    message: str
    detail: Callable[[BaseException, Settings], dict[str, Any]]
    #: Whether n8n's HTTP status (if it answered at all) is kept with the failure.
    with_status: bool = False

    def of(self, exc: BaseException, stats: StreamStats, settings: Settings) -> StreamFailure:
        """The failure for `exc` in this call (`stats` holds n8n's status if it answered)."""
        status = stats.upstream_status if self.with_status else None
        return StreamFailure(self.code, self.message, upstream_status=status, detail=self.detail(exc, settings))


#: The address, or what its name resolves to, is refused by the webhook policy (app.webhooks).
_BLOCKED = _Failure("upstream_blocked", "The agent's webhook address is not allowed", lambda e, _s: {"reason": str(e)})


#: Every way of failing to talk to n8n, the first matching type wins (aiohttp's classes nest: the
#: connector error is an OSError, as ClientOSError is). StreamFailures pass through as they are.
FAILURES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], _Failure], ...] = (
    (
        TotalTimeout,
        _Failure(
            "upstream_timeout",
            "The agent's answer took too long",
            lambda _e, s: {"timeout": "total", "seconds": s.N8N_TOTAL_TIMEOUT},
            with_status=True,
        ),
    ),
    (
        ReadTimeout,
        _Failure(
            "upstream_timeout",
            "The agent stopped sending its answer",
            lambda _e, s: {"timeout": "read", "seconds": s.N8N_READ_TIMEOUT},
            with_status=True,
        ),
    ),
    (
        FirstByteTimeout,
        _Failure(
            "upstream_timeout",
            "The agent did not answer in time",
            lambda _e, s: {"timeout": "first_byte", "seconds": s.N8N_FIRST_BYTE_TIMEOUT},
            with_status=True,
        ),
    ),
    (WebhookPolicyError, _BLOCKED),
    # aiohttp's connect deadline (TCP and TLS, N8N_CONNECT_TIMEOUT, or cut under the first byte's: its seconds then),
    # which `exchange` names ConnectTimeout.
    (
        (ConnectTimeout, aiohttp.ConnectionTimeoutError),
        _Failure(
            "upstream_timeout",
            "The agent could not be reached in time",
            lambda e, s: {"timeout": "connect", "seconds": getattr(e, "seconds", None) or s.N8N_CONNECT_TIMEOUT},
        ),
    ),
    (aiohttp.ClientConnectorError, _Failure("upstream_unreachable", UNREACHABLE, _unreachable)),
    # A body whose gzip or deflate cannot be decoded (`_underlying` finds it inside aiohttp's payload error).
    (
        ContentEncodingError,
        _Failure("bad_upstream_response", "The agent's answer could not be read", _error_name, with_status=True),
    ),
    (
        (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError),
        _Failure("upstream_disconnected", "The connection to the agent was lost", _error_name, with_status=True),
    ),
    (
        aiohttp.ClientResponseError,
        _Failure("bad_upstream_response", "The agent's answer could not be read", _error_name, with_status=True),
    ),
    ((aiohttp.ClientError, ValueError), _Failure("upstream_unreachable", UNREACHABLE, _error_name)),
)


def _underlying(exc: BaseException) -> BaseException:
    """What aiohttp's wrapper hides when it decides the failure, else `exc`: the resolver's policy refusal inside
    a connector error (the address a name resolved to), and a body that cannot be decompressed inside the
    ClientPayloadError a cut connection raises too (the answer arrived, unreadable: nothing was lost)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, WebhookPolicyError) or isinstance(cause.__cause__, WebhookPolicyError):
            return WebhookPolicyError(str(cause))
    if isinstance(exc, aiohttp.ClientPayloadError) and isinstance(exc.__cause__, ContentEncodingError):
        return exc.__cause__
    return exc


def without_secrets(failure: StreamFailure, headers: dict[str, str]) -> StreamFailure:
    """`failure` (changed in place) with every secret header value masked in its detail's texts: n8n's
    `message`, `hint` or in-band error may be built from the request's headers (an API refusing the key it
    was handed), and the error log shows them to admins, who never see header values. n8n's fixed refusals
    carry none and stay whole (the connection test's hint is chosen by them; a wrong value may be their word)."""
    if headers and failure.detail:
        secrets = list(headers.values())
        failure.detail = {
            k: masked(v, secrets) if isinstance(v, str) and v not in N8N_AUTH_REFUSALS else v
            for k, v in failure.detail.items()
        }
    return failure


def failure_for(exc: BaseException, stats: StreamStats, settings: Settings) -> StreamFailure | None:
    """The StreamFailure that `exc` means (FAILURES), or None for an exception that is a bug, not n8n's doing."""
    exc = _underlying(exc)
    for types, failure in FAILURES:
        if isinstance(exc, types):
            return failure.of(exc, stats, settings)
    return None


class N8nStreamer:
    """The n8n client: one pooled aiohttp ClientSession for the app's lifetime, policy-checking resolver."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        #: Connections being opened ahead of a request (`warm`), by origin: `run` waits for one rather than
        #: opening a second.
        self._warming: dict[tuple[str, str, int | None], asyncio.Task[None]] = {}
        #: Per webhook URL warmed: its origin, its checked `yarl.URL` and aiohttp's pool key (`warm`).
        self._pool_keys: dict[str, tuple[tuple[str, str, int | None], yarl.URL, Any]] = {}

    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use (inside the running loop)."""
        if self._session is None or self._session.closed:
            self._session = open_session(self.settings)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def warm(self, url: str) -> None:
        """Open a connection to `url`'s origin into the pool now, unless one is idle there or already opening.

        Called while a send's statement (and its commit) is in flight, so the TCP (and TLS) connect overlaps
        the database's WAL flush instead of following it; nothing is sent on it until `run` posts the request.
        The connection goes through the same policy-checking resolver; a URL the policy refuses is left to
        `run` to refuse. Best effort: any failure is dropped (`run` connects, and reports, by itself).
        """
        session = self.session()
        connector = session.connector
        known = self._pool_keys.get(url)
        if known is None:
            # Judged and keyed once per URL (both depend on the URL alone; no DNS): building the request that
            # yields the pool key cost more CPU than the rest of the check, on every send.
            try:
                target = webhook_target(url, self.settings)
            except WebhookPolicyError:
                return
            key = aiohttp.ClientRequest("POST", target, loop=asyncio.get_running_loop(), ssl=True).connection_key
            if len(self._pool_keys) >= POOL_KEYS_KEPT:
                self._pool_keys.clear()
            known = self._pool_keys[url] = ((target.scheme, target.host or "", target.port), target, key)
        origin, target, key = known
        if origin in self._warming or connector is None:
            return
        if getattr(connector, "_conns", {}).get(key):
            return  # an idle pooled connection is there: the request will reuse it
        loop = asyncio.get_running_loop()
        request = aiohttp.ClientRequest("POST", target, loop=loop, ssl=True)

        async def connect() -> None:
            try:
                connection = await connector.connect(request, [], session.timeout)
            except Exception:  # a warm-up never fails a send: `run` connects and reports by itself
                return
            connection.release()

        task = loop.create_task(connect())
        self._warming[origin] = task
        task.add_done_callback(lambda _t: self._warming.pop(origin, None))

    def _warming_for(self, target: yarl.URL) -> asyncio.Task[None] | None:
        """A warm-up of `target`'s origin still in flight: the request waits for its connection (within its
        first-byte deadline, `upstream.exchange`) rather than opening a second one. If it failed, the request
        connects (and reports a failure) by itself."""
        return self._warming.get((target.scheme, target.host or "", target.port))

    async def run(
        self,
        *,
        url: str,
        headers: dict[str, str],
        payload: dict[str, Any],
        on_chunks: Callable[[list[str]], None],
        stats: StreamStats,
        limits: Settings | None = None,
        attachments: list[Attachment] | None = None,
    ) -> None:
        """POST `payload` to `url` and hand every parsed text chunk to `on_chunks`; raise StreamFailure.

        `limits` replaces the settings' timeouts and caps for this call (the connection test's shorter ones).
        With `attachments` the request is multipart/form-data (`upstream.multipart_body`), else JSON.
        """
        s = limits or self.settings
        try:
            # The checked yarl.URL itself is posted to: aiohttp connects to exactly the host judged here.
            target = webhook_target(url, s)
        except WebhookPolicyError as exc:
            raise _BLOCKED.of(exc, stats, s) from None
        body: bytes | aiohttp.FormData
        if attachments is not None:
            body = multipart_body(payload, attachments)
        else:
            body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        del payload  # the encoded body is all that is needed from here on
        parser = BodyParser(max_line_bytes=s.N8N_MAX_LINE_BYTES, max_response_bytes=s.N8N_MAX_RESPONSE_BYTES)
        try:
            await exchange(
                self.session(),
                target=target,
                body=body,
                headers=headers,
                parser=parser,
                on_chunks=on_chunks,
                stats=stats,
                settings=s,
                ready=self._warming_for(target),
                deadlines=None if limits is None else client_timeout(s),
            )
        except StreamFailure as answered:
            without_secrets(answered, headers)
            raise
        except Exception as exc:
            failure = failure_for(exc, stats, s)
            if failure is None:
                raise
            raise failure from None
        finally:
            stats.format = parser.mode
            stats.bytes = parser.total
            stats.body_format = parser.body_format
            stats.usage = parser.usage
        if parser.failure is not None:
            parser.failure.upstream_status = stats.upstream_status
            parser.failure.detail.setdefault("format", parser.mode)
            raise without_secrets(parser.failure, headers)
