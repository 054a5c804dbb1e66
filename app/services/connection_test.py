"""The agent connection test: one probe sent as a real message would be, and what to change in n8n."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from yarl import URL

from app.callbacks import outlived_in_callback_mode
from app.config import Settings
from app.crypto import DecryptionError
from app.models import Agent, User
from app.n8n_parser import StreamFailure, clean_text, masked
from app.services.agents import checked_response_mode, checked_url, webhook_headers_of
from app.upstream import StreamStats


class N8nStreamer(Protocol):
    """What the probe needs of `app.streaming.N8nStreamer` (which this layer cannot import: it pulls in the
    web framework through the SSE module)."""

    async def run(
        self,
        *,
        url: str,
        headers: dict[str, str],
        payload: dict[str, Any],
        on_chunks: Callable[[list[str]], None],
        stats: StreamStats,
        limits: Settings | None = None,
    ) -> None: ...


PROBE_TEXT = "ping"
SAMPLE_CHARS = 200

# One sentence each, naming what to change in n8n (or here). The n8n texts they are chosen by are the
# recorded answers of n8n 1.123 (recordings/n8n) and its Webhook node's authentication refusals.
HINT_STREAMING_OFF = (
    "n8n answered 200 with an empty body: turn on streaming in the AI Agent node's options (a Webhook set to "
    "respond with 'Streaming' needs it), or check that the workflow reaches its Respond to Webhook node."
)
HINT_NOT_STREAMING = (
    "The agent works but answers in one piece: set the Webhook node's Respond option to 'Streaming' and turn on "
    "streaming in the AI Agent node so users see the answer as it is written."
)
HINT_TEST_URL = (
    "This is the editor's test URL, which only listens right after 'Execute workflow': use the Webhook node's "
    "Production URL (/webhook/...) and activate the workflow."
)
HINT_TEST_URL_LISTENING = (
    "This is the editor's test URL: it answered because the editor was listening, but it answers only once after "
    "'Execute workflow': use the Webhook node's Production URL (/webhook/...) and activate the workflow."
)
HINT_INACTIVE = (
    "n8n has no active webhook at this path: activate the workflow with the toggle in the editor and check that "
    "the URL is the Webhook node's Production URL."
)
HINT_METHOD = "The Webhook node listens for another HTTP method: set its HTTP Method to POST."
HINT_NOT_FOUND = "Nothing answered at this path (HTTP 404): copy the Production URL from the n8n Webhook node again."
HINT_AUTH_MISSING = (
    "The Webhook node requires authentication and none was sent: add the credential's header (for Basic Auth, "
    "`Authorization: Basic ...`) to the agent's webhook headers."
)
HINT_AUTH_WRONG = (
    "n8n refused the credentials: the webhook header's name and value must match the Header Auth (or Basic "
    "Auth) credential of the Webhook node."
)
HINT_FORBIDDEN = "Something in front of n8n refused the request (HTTP 403): check the proxy or firewall rules."
HINT_REDIRECT = (
    "The URL redirects (often http to https, or a login page), and redirects are not followed: use the final URL."
)
HINT_WORKFLOW_FAILED = (
    "The workflow ran and failed: open the failed execution in n8n's Executions list to see which node broke."
)
HINT_NOT_STARTED = (
    "n8n could not start the workflow: check the Webhook node's Respond option ('Using Respond to Webhook Node' "
    "needs that node in the workflow, and a Respond to Webhook node needs that option or 'Streaming'); the "
    "execution in n8n's Executions list names the error."
)
HINT_IN_BAND = "The workflow started answering and then a node failed: open the execution in n8n's Executions list."
HINT_STATUS = "n8n (or a proxy in front of it) answered HTTP {status}: check n8n's log for that request."
HINT_HTML = "An HTML page answered instead of n8n (a proxy's login or error page): use n8n's own webhook URL."
HINT_NO_TEXT = (
    "The answer has no text: make the last node return an `output` (what the AI Agent node returns) or `text` field."
)
HINT_UNREADABLE = "The answer could not be read: return n8n's streaming output, JSON with an `output` field, or text."
HINT_UNREACHABLE = (
    "Nothing accepted the connection: check the host and port, that n8n is running, and that it is reachable from "
    "this server."
)
HINT_TIMEOUT = (
    "n8n did not answer within the test's {seconds:g} seconds: the workflow may wait on something slow; open its "
    "execution in n8n."
)
HINT_DISCONNECTED = "The connection to n8n was cut before the answer ended: check n8n's log and any proxy's timeouts."
HINT_BLOCKED = (
    "This server's address policy refuses the webhook address: use n8n's public URL, or have the operator list "
    "its host in WEBHOOK_ALLOWED_HOSTS."
)
HINT_MISCONFIGURED = "The stored webhook headers cannot be decrypted: save the agent's webhook headers again."
HINT_CALLBACK = (
    "n8n started the workflow; in callback mode the reply comes by callbacks to `metadata.callback_url`, which a "
    "test does not carry, so send a message in a chat to see the whole answer."
)
HINT_CALLBACK_NO_URL = (
    "The agent answers by callback, which needs this server's PUBLIC_BASE_URL: have the operator set it, or "
    "switch the agent to stream mode."
)

_WRONG_METHOD = re.compile(r"not registered for \w+ requests")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What the connection test answers (`AgentTestResult`)."""

    ok: bool
    http_status: int | None
    format: str | None
    first_byte_ms: float | None
    total_ms: float
    sample: str | None
    code: str | None
    hint: str | None


def probe_limits(settings: Settings) -> Settings:
    """The settings with AGENT_TEST_TIMEOUT capping every timeout. The connect one at half of it: left longer
    (or equal), the total or first-byte deadline ended a connection never made, which callback mode reads as a
    started workflow."""
    cap = settings.AGENT_TEST_TIMEOUT
    return settings.model_copy(
        update={
            "N8N_CONNECT_TIMEOUT": min(cap / 2, settings.N8N_CONNECT_TIMEOUT),
            "N8N_FIRST_BYTE_TIMEOUT": min(cap, settings.N8N_FIRST_BYTE_TIMEOUT),
            "N8N_READ_TIMEOUT": min(cap, settings.N8N_READ_TIMEOUT),
            "N8N_TOTAL_TIMEOUT": min(cap, settings.N8N_TOTAL_TIMEOUT),
        }
    )


def probe_payload(
    *, user: User, agent_id: uuid.UUID | None, system_prompt: str | None, config: dict[str, Any]
) -> dict[str, Any]:
    """The body of a real message (what n8n receives), with `chatInput` "ping" and `metadata.probe` true.

    `sessionId` is fresh, so a memory node in the workflow keeps no trace of the probe in a real conversation.
    """
    return {
        "messages": [{"role": "user", "content": PROBE_TEXT}],
        "system_prompt": system_prompt or "",
        "config": config,
        "chatInput": PROBE_TEXT,
        "sessionId": str(uuid.uuid4()),
        "metadata": {
            "chat_id": None,
            "agent_id": None if agent_id is None else str(agent_id),
            "user_id": str(user.id),
            "team_id": str(user.team_id),
            "message_id": None,
            "probe": True,
        },
    }


def hint_for(failure: StreamFailure | None, stats: StreamStats, *, url: str, timeout: float) -> str | None:
    """One sentence on what to change, from what n8n answered; None when there is nothing to change."""
    if failure is None:
        if _is_test_url(url):  # it works now, and fails every message once the editor stops listening
            return HINT_TEST_URL_LISTENING
        return HINT_NOT_STREAMING if stats.body_format in ("json", "text") else None
    code, status, detail = failure.code, failure.upstream_status, failure.detail
    n8n_message = str(detail.get("n8n_message") or "")
    if code == "upstream_error" and status is not None and not 200 <= status < 300:
        return _status_hint(status, n8n_message, str(detail.get("n8n_hint") or ""), url)
    reason = str(detail.get("reason") or "")
    by_code = {
        "upstream_error": HINT_IN_BAND,
        "empty_response": HINT_STREAMING_OFF,
        "bad_upstream_response": HINT_HTML
        if reason == "an HTML page"
        else HINT_NO_TEXT
        if reason.startswith("no text") or reason.startswith("array item")
        else HINT_UNREADABLE,
        "upstream_unreachable": HINT_UNREACHABLE,
        # No connection in time (N8N_CONNECT_TIMEOUT: a firewall dropping it, a TLS handshake nobody answers)
        # is the unreachable case, not a slow workflow.
        "upstream_timeout": HINT_UNREACHABLE
        if detail.get("timeout") == "connect"
        else HINT_TIMEOUT.format(seconds=timeout),
        "upstream_disconnected": HINT_DISCONNECTED,
        "upstream_blocked": HINT_BLOCKED,
        "agent_misconfigured": HINT_MISCONFIGURED,
    }
    return by_code.get(code, HINT_UNREADABLE)


def _is_test_url(url: str) -> bool:
    """n8n's editor URL of a Webhook node (`/webhook-test/...`), which listens only after 'Execute workflow'."""
    return "/webhook-test/" in URL(url).path


def _status_hint(status: int, n8n_message: str, n8n_hint: str, url: str) -> str:
    if status == 404:
        if _WRONG_METHOD.search(n8n_message):
            return HINT_METHOD
        if _is_test_url(url) or "Execute workflow" in n8n_hint:
            return HINT_TEST_URL
        if "is not registered" in n8n_message:
            return HINT_INACTIVE
        return HINT_NOT_FOUND
    if status == 401:
        return HINT_AUTH_MISSING
    if status == 403:
        return HINT_AUTH_WRONG if n8n_message == "Authorization data is wrong!" else HINT_FORBIDDEN
    if 300 <= status < 400:
        return HINT_REDIRECT
    if status == 500:
        # n8n's answer when the trigger node refused to run (WebhookHelpers): no node of the workflow ran.
        return HINT_NOT_STARTED if "could not be started" in n8n_message else HINT_WORKFLOW_FAILED
    return HINT_STATUS.format(status=status)


async def run_probe(
    *,
    streamer: N8nStreamer,
    settings: Settings,
    url: str,
    headers: dict[str, str],
    payload: dict[str, Any],
    callback_mode: bool = False,
) -> ProbeResult:
    """Send one probe under the relay's policy and parser with the test's timeouts; never raises for n8n.

    In callback mode the webhook's answer is judged as a real message judges it: only a failure that means the
    workflow did not start counts (an immediate acknowledgement, empty or without text, is no failure, and no
    reason to stream); a connection never accepted is one."""
    limits = probe_limits(settings)
    stats = StreamStats()
    pieces: list[str] = []
    size = 0
    # Enough that a secret beginning inside the sample is whole in what is kept (else its start would show);
    # masking may shorten the text, so twice the sample.
    keep = SAMPLE_CHARS * 2 + max((len(value) for value in headers.values()), default=0)

    def on_chunks(chunks: list[str]) -> None:
        nonlocal size
        for chunk in chunks:
            if size < keep:
                pieces.append(clean_text(chunk))
                size += len(chunk)

    started = time.perf_counter()
    failure: StreamFailure | None = None
    try:
        await streamer.run(url=url, headers=headers, payload=payload, on_chunks=on_chunks, stats=stats, limits=limits)
    except StreamFailure as exc:
        failure = exc
    total_ms = round((time.perf_counter() - started) * 1000, 1)
    sample = masked("".join(pieces), list(headers.values()))[:SAMPLE_CHARS] or None
    hint = hint_for(failure, stats, url=url, timeout=limits.N8N_TOTAL_TIMEOUT)
    if callback_mode and (failure is None or _started(failure)):
        failure = None
        hint = HINT_TEST_URL_LISTENING if _is_test_url(url) else HINT_CALLBACK
    return ProbeResult(
        ok=failure is None,
        http_status=stats.upstream_status,
        format=stats.body_format,
        first_byte_ms=stats.ttfb_ms,
        total_ms=total_ms,
        sample=sample,
        code=None if failure is None else failure.code,
        hint=hint,
    )


def _started(failure: StreamFailure) -> bool:
    """Callback mode: the workflow was reached and may be running (a connection never made is no start)."""
    return outlived_in_callback_mode(failure)


async def probe_unsaved_agent(
    *,
    streamer: N8nStreamer,
    settings: Settings,
    user: User,
    webhook_url: str,
    webhook_headers: dict[str, str] | None,
    system_prompt: str | None,
    config: dict[str, Any],
    response_mode: str = "stream",
) -> ProbeResult:
    """Probe an agent body the admin has not saved (nothing is stored); a URL or a response mode saving would
    refuse is a 422."""
    checked_url(webhook_url, settings)
    checked_response_mode(response_mode, settings)
    payload = probe_payload(user=user, agent_id=None, system_prompt=system_prompt, config=config)
    return await run_probe(
        streamer=streamer,
        settings=settings,
        url=webhook_url,
        headers=webhook_headers or {},
        payload=payload,
        callback_mode=response_mode == "callback",
    )


async def probe_stored_agent(*, streamer: N8nStreamer, settings: Settings, user: User, agent: Agent) -> ProbeResult:
    """Probe a saved agent with its stored (decrypted) webhook headers. Like a real message, a callback-mode
    agent is not called by a server without PUBLIC_BASE_URL."""
    try:
        headers = webhook_headers_of(agent, settings)
    except DecryptionError:
        return ProbeResult(False, None, None, None, 0.0, None, "agent_misconfigured", HINT_MISCONFIGURED)
    callback_mode = agent.response_mode == "callback"
    if callback_mode and settings.PUBLIC_BASE_URL is None:
        return ProbeResult(False, None, None, None, 0.0, None, "agent_misconfigured", HINT_CALLBACK_NO_URL)
    payload = probe_payload(user=user, agent_id=agent.id, system_prompt=agent.system_prompt, config=agent.config)
    return await run_probe(
        streamer=streamer,
        settings=settings,
        url=agent.webhook_url,
        headers=headers,
        payload=payload,
        callback_mode=callback_mode,
    )
