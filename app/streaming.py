"""The n8n relay's entry point: N8nStreamer calls an agent and names every way that call can fail.

Over modules with one job each: `app.n8n_parser` (the answer parser, pure), `app.upstream` (the aiohttp
client), `app.sse` (a generation's events as SSE bytes), `app.generations` (running generations, this
worker's heartbeat and recovery); their public names are re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.config import Settings
from app.generations import WAITING, GenerationRegistry
from app.n8n_parser import BodyParser, StreamFailure, clean_text, excerpt
from app.sse import PING, SSE_HEADERS, Generation
from app.upstream import (
    Attachment,
    FirstByteTimeout,
    ReadTimeout,
    StreamStats,
    TotalTimeout,
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
    # aiohttp's connect timeout is a TimeoutError, which `exchange` already reports as FirstByteTimeout
    # (connecting counts toward the first byte); this row only applies if it ever escapes that deadline.
    (
        aiohttp.ConnectionTimeoutError,
        _Failure(
            "upstream_timeout",
            "The agent could not be reached in time",
            lambda _e, s: {"timeout": "connect", "seconds": s.N8N_CONNECT_TIMEOUT},
        ),
    ),
    (aiohttp.ClientConnectorError, _Failure("upstream_unreachable", UNREACHABLE, _unreachable)),
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


def _policy_refusal(exc: BaseException) -> BaseException:
    """The resolver's policy refusal inside a connector error (the address a name resolved to), else `exc`."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, WebhookPolicyError) or isinstance(cause.__cause__, WebhookPolicyError):
            return WebhookPolicyError(str(cause))
    return exc


def failure_for(exc: BaseException, stats: StreamStats, settings: Settings) -> StreamFailure | None:
    """The StreamFailure that `exc` means (FAILURES), or None for an exception that is a bug, not n8n's doing."""
    exc = _policy_refusal(exc)
    for types, failure in FAILURES:
        if isinstance(exc, types):
            return failure.of(exc, stats, settings)
    return None


class N8nStreamer:
    """The n8n client: one pooled aiohttp ClientSession for the app's lifetime, policy-checking resolver."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use (inside the running loop)."""
        if self._session is None or self._session.closed:
            self._session = open_session(self.settings)
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
            )
        except StreamFailure:
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
            raise parser.failure
