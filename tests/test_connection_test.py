"""The agent connection test: every hint against the fake n8n, what n8n receives, secrets, tenancy, limits."""

from __future__ import annotations

import base64
import socket
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import encrypt_headers
from app.models import Team
from app.n8n_parser import masked
from app.services import connection_test as ct
from tests.conftest import count_rows
from tests.factories import auth_headers, create_admin, create_agent, create_team, create_user
from tests.live import silent_port
from tools.fake_n8n import BASIC_AUTH, HEADER_AUTH, FakeN8n, raw_answer

RESULT_FIELDS = {"ok", "http_status", "format", "first_byte_ms", "total_ms", "sample", "code", "hint"}


def basic(login: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}


async def probe(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, url: str, **body: Any
) -> dict[str, Any]:
    admin = await create_admin(session)
    response = await client.post(
        "/api/agents/test",
        json={"name": "Probe", "webhook_url": url, **body},
        headers=auth_headers(settings, admin),
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    assert set(result) == RESULT_FIELDS
    return result


# --- every hint, against the fake n8n replaying the recordings ------------------------------------

CASES: list[tuple[str, dict[str, str], dict[str, Any]]] = [
    # (path on the fake, webhook headers, expected fields of the result)
    (
        "/webhook/agent-stream",
        {},
        {"ok": True, "http_status": 200, "format": "ndjson", "code": None, "hint": None, "sample": "Echo: ping"},
    ),
    ("/webhook/agent-stream?scenario=sse_openai", {}, {"ok": True, "format": "sse", "hint": None}),
    (
        "/webhook/agent-json",
        {},
        {"ok": True, "format": "json", "code": None, "hint": ct.HINT_NOT_STREAMING, "sample": "Echo: ping"},
    ),
    ("/webhook/agent-json?scenario=json_ok", {}, {"ok": True, "format": "json", "hint": ct.HINT_NOT_STREAMING}),
    ("/webhook/agent-json?scenario=plain", {}, {"ok": True, "format": "text", "hint": ct.HINT_NOT_STREAMING}),
    (
        "/webhook/agent-stream-off",
        {},
        {"ok": False, "http_status": 200, "format": "empty", "code": "empty_response", "hint": ct.HINT_STREAMING_OFF},
    ),
    (
        "/webhook/does-not-exist",
        {},
        {"ok": False, "http_status": 404, "format": None, "code": "upstream_error", "hint": ct.HINT_INACTIVE},
    ),
    ("/webhook-test/agent-stream", {}, {"ok": False, "http_status": 404, "hint": ct.HINT_TEST_URL}),
    # The editor was listening: it answered this once, and would refuse every later message.
    (
        "/webhook-test/agent-stream?scenario=echo",
        {},
        {"ok": True, "format": "ndjson", "hint": ct.HINT_TEST_URL_LISTENING},
    ),
    (
        "/webhook-test/agent-json?scenario=echo_json",
        {},
        {"ok": True, "format": "json", "hint": ct.HINT_TEST_URL_LISTENING},
    ),
    ("/webhook/agent-get-only", {}, {"ok": False, "http_status": 404, "hint": ct.HINT_METHOD}),
    ("/webhook/x?scenario=status&status=404", {}, {"http_status": 404, "hint": ct.HINT_NOT_FOUND}),
    (
        "/webhook/agent-header-auth",
        {},
        {"ok": False, "http_status": 403, "code": "upstream_error", "hint": ct.HINT_AUTH_WRONG},
    ),
    ("/webhook/agent-header-auth", {HEADER_AUTH[0]: "wrong"}, {"http_status": 403, "hint": ct.HINT_AUTH_WRONG}),
    ("/webhook/agent-header-auth", dict([HEADER_AUTH]), {"ok": True, "format": "ndjson", "hint": None}),
    ("/webhook/agent-basic-auth", {}, {"ok": False, "http_status": 401, "hint": ct.HINT_AUTH_MISSING}),
    ("/webhook/agent-basic-auth", basic(BASIC_AUTH[0], "nope"), {"http_status": 403, "hint": ct.HINT_AUTH_WRONG}),
    ("/webhook/agent-basic-auth", basic(*BASIC_AUTH), {"ok": True, "sample": "Echo: ping"}),
    ("/webhook/x?scenario=status&status=403", {}, {"http_status": 403, "hint": ct.HINT_FORBIDDEN}),
    ("/webhook/error-json", {}, {"ok": False, "http_status": 500, "hint": ct.HINT_WORKFLOW_FAILED}),
    (
        "/webhook/agent-stream?scenario=stream_llm_error",
        {},
        {"ok": False, "http_status": 200, "format": "ndjson", "code": "upstream_error", "hint": ct.HINT_IN_BAND},
    ),
    ("/webhook/error-stream", {}, {"code": "upstream_error", "hint": ct.HINT_IN_BAND}),
    ("/webhook/x?scenario=status&status=302", {}, {"http_status": 302, "hint": ct.HINT_REDIRECT}),
    ("/webhook/x?scenario=status&status=502", {}, {"http_status": 502, "hint": ct.HINT_STATUS.format(status=502)}),
    (
        "/webhook/x?scenario=chat_stream_load",
        {},
        {"format": "json", "code": "bad_upstream_response", "hint": ct.HINT_NO_TEXT},
    ),
    ("/webhook/x?scenario=html", {}, {"format": "text", "code": "bad_upstream_response", "hint": ct.HINT_HTML}),
    ("/webhook/x?scenario=malformed", {}, {"code": "bad_upstream_response", "hint": ct.HINT_UNREADABLE}),
    ("/webhook/x?scenario=reset", {}, {"code": "upstream_disconnected", "hint": ct.HINT_DISCONNECTED}),
]


@pytest.mark.parametrize(("path", "headers", "expected"), CASES, ids=[f"{c[0]}-{sorted(c[1])}" for c in CASES])
async def test_probe_names_the_problem(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    path: str,
    headers: dict[str, str],
    expected: dict[str, Any],
) -> None:
    result = await probe(client, session, settings, fake.url + path, webhook_headers=headers or None)
    assert {k: result[k] for k in expected} == expected
    assert result["total_ms"] >= 0
    if result["http_status"] is not None:
        assert result["first_byte_ms"] is None or result["first_byte_ms"] <= result["total_ms"]
    if not result["ok"]:
        assert result["code"]
        assert result["hint"]


async def test_probe_unreachable(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await probe(client, session, settings, f"http://127.0.0.1:{port}/webhook/x")
    assert result["ok"] is False
    assert (result["http_status"], result["format"], result["code"]) == (None, None, "upstream_unreachable")
    assert result["hint"] == ct.HINT_UNREACHABLE


@pytest.mark.settings(AGENT_TEST_TIMEOUT=5, N8N_CONNECT_TIMEOUT=0.5)
async def test_probe_connect_timeout_says_nothing_accepted_the_connection(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """No connection in time (here a TLS handshake nobody answers) is no slow workflow: the hint names the
    connection, as for a refused one."""
    async with silent_port() as port:
        result = await probe(client, session, settings, f"https://127.0.0.1:{port}/webhook/x")
    assert (result["ok"], result["http_status"], result["code"]) == (False, None, "upstream_timeout")
    assert result["hint"] == ct.HINT_UNREACHABLE
    assert result["total_ms"] < 4000


@pytest.mark.settings(AGENT_TEST_TIMEOUT=0.5)
async def test_probe_times_out_with_the_shorter_test_timeout(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    result = await probe(client, session, settings, fake.url + "/webhook/x?scenario=hang_headers&hang=5")
    assert result["code"] == "upstream_timeout"
    assert result["hint"] == ct.HINT_TIMEOUT.format(seconds=0.5)
    assert 400 <= result["total_ms"] < 3000


@pytest.mark.settings(WEBHOOK_ALLOW_PRIVATE_NETWORKS=False)
async def test_probe_applies_the_address_policy(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    admin = await create_admin(session)
    body = {"name": "P", "webhook_url": fake.url + "/webhook/agent-stream"}
    response = await client.post("/api/agents/test", json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 422  # as saving it would be
    assert response.json()["detail"][0]["loc"] == ["body", "webhook_url"]
    # A stored agent whose address the policy refuses since (the setting changed) is probed and refused.
    agent = await create_agent(
        session, team=await session.get_one(Team, admin.team_id), webhook_url=fake.url + "/webhook/agent-stream"
    )
    response = await client.post(f"/api/agents/{agent.id}/test", headers=auth_headers(settings, admin))
    result = response.json()
    assert (result["ok"], result["code"], result["hint"]) == (False, "upstream_blocked", ct.HINT_BLOCKED)
    assert result["http_status"] is None
    assert fake.requests == []


# --- what n8n receives; the stored agent; secrets ---------------------------------------------------


async def test_probe_sends_a_real_message_body_marked_as_probe(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    admin = await create_admin(session)
    response = await client.post(
        "/api/agents/test",
        json={
            "name": "Probe",
            "webhook_url": fake.url + "/webhook/agent-stream",
            "system_prompt": "be brief",
            "config": {"model": "m"},
        },
        headers=auth_headers(settings, admin),
    )
    assert response.json()["ok"] is True
    [received] = fake.requests
    body = received["json"]
    assert body["chatInput"] == "ping"
    assert body["messages"] == [{"role": "user", "content": "ping"}]
    assert (body["system_prompt"], body["config"]) == ("be brief", {"model": "m"})
    uuid.UUID(body["sessionId"])
    assert body["metadata"] == {
        "chat_id": None,
        "agent_id": None,
        "user_id": str(admin.id),
        "team_id": str(admin.team_id),
        "message_id": None,
        "probe": True,
    }


async def test_probe_of_stored_agent_uses_its_secret_headers_and_never_echoes_them(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = await create_admin(session)
    team = await session.get_one(Team, admin.team_id)
    agent = await create_agent(
        session,
        team=team,
        webhook_url=fake.url + "/webhook/agent-header-auth",
        webhook_headers_encrypted=encrypt_headers(dict([HEADER_AUTH]), settings.fernet),
    )
    response = await client.post(f"/api/agents/{agent.id}/test", headers=auth_headers(settings, admin))
    assert response.status_code == 200
    result = response.json()
    assert (result["ok"], result["format"], result["sample"]) == (True, "ndjson", "Echo: ping")
    [received] = fake.requests
    assert received["headers"][HEADER_AUTH[0]] == HEADER_AUTH[1]
    assert received["json"]["metadata"]["agent_id"] == str(agent.id)
    assert HEADER_AUTH[1] not in response.text
    assert HEADER_AUTH[1] not in caplog.text


async def test_probe_of_stored_agent_with_refused_secret_names_no_value(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    admin = await create_admin(session)
    team = await session.get_one(Team, admin.team_id)
    agent = await create_agent(
        session,
        team=team,
        webhook_url=fake.url + "/webhook/agent-header-auth",
        webhook_headers_encrypted=encrypt_headers({HEADER_AUTH[0]: "old-secret-value"}, settings.fernet),
    )
    response = await client.post(f"/api/agents/{agent.id}/test", headers=auth_headers(settings, admin))
    assert response.json()["hint"] == ct.HINT_AUTH_WRONG
    assert "old-secret-value" not in response.text


async def test_probe_of_stored_agent_with_unreadable_headers(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    admin = await create_admin(session)
    team = await session.get_one(Team, admin.team_id)
    agent = await create_agent(
        session, team=team, webhook_url=fake.url + "/webhook/agent-stream", webhook_headers_encrypted="not-a-token"
    )
    response = await client.post(f"/api/agents/{agent.id}/test", headers=auth_headers(settings, admin))
    result = response.json()
    assert (result["ok"], result["code"], result["hint"]) == (False, "agent_misconfigured", ct.HINT_MISCONFIGURED)
    assert fake.requests == []


def test_sample_masks_secret_header_values() -> None:
    text = "headers were X-Key: abcd-secret and token zz"
    assert masked(text, ["abcd-secret", "zz"]) == "headers were X-Key: *** and token zz"
    assert masked("cut inside: abcd-se", ["abcd-secret"]) == "cut inside: ***"
    # As written inside a JSON string: quotes, backslashes (and with ensure_ascii, non-ASCII) escaped.
    assert masked('{"v": "pa\\"ss\\\\w0rd-TOP"}', ['pa"ss\\w0rd-TOP']) == '{"v": "***"}'
    assert masked('{"v": "caf\\u00e9-secret"}', ["café-secret"]) == '{"v": "***"}'


async def probe_echoing(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n, secret: str, query: str
) -> httpx.Response:
    """An admin's connection test of an agent whose workflow echoes its `X-Auth` header (stored as `secret`),
    answering as the fake's `echo_header` scenario with `query` says."""
    admin = await create_admin(session)
    agent = await create_agent(
        session,
        team=await session.get_one(Team, admin.team_id),
        webhook_url=f"{fake.url}/webhook/agent?scenario=echo_header&header=X-Auth&{query}",
        webhook_headers_encrypted=encrypt_headers({"X-Auth": secret}, settings.fernet),
    )
    return await client.post(f"/api/agents/{agent.id}/test", headers=auth_headers(settings, admin))


async def test_probe_never_shows_a_secret_echoed_inside_a_json_object(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """An answer whose `output` is an object is shown as its JSON, where the secret's `"` and `\\` are escaped:
    the raw value was not found in it, and the sample showed the secret."""
    response = await probe_echoing(client, session, settings, fake, 'pa"ss\\w0rd-TOPSECRET', "as=object")
    assert response.status_code == 200
    assert response.json()["sample"] == '{"you_sent": "***"}'
    assert "TOPSECRET" not in response.text


@pytest.mark.parametrize(
    "query",
    [
        "size=10",  # a long secret (a JWT's size) echoed in small pieces: it runs past what a short sample keeps
        "size=10&cut=150",  # the answer ends inside the secret
    ],
)
async def test_probe_never_shows_part_of_an_echoed_secret_header(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n, query: str
) -> None:
    secret = "Bearer " + "s3cr3tTOKEN" * 60
    response = await probe_echoing(client, session, settings, fake, secret, query)
    assert response.status_code == 200
    assert response.json()["sample"] == "Your X-Auth header: ***"
    assert not any(secret[i : i + 8] in response.text for i in range(len(secret) - 8))


async def test_probe_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    await probe(client, session, settings, fake.url + "/webhook/does-not-exist")
    await probe(client, session, settings, fake.url + "/webhook/agent-stream")
    assert await count_rows(session, "agents") == 0
    assert await count_rows(session, "error_logs") == 0
    assert await count_rows(session, "chats") == 0


# --- who may test, bad input, rate limit ------------------------------------------------------------


async def test_probe_refuses_members_strangers_and_foreign_agents(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    admin = await create_admin(session)
    member = await create_user(session, team=await session.get_one(Team, admin.team_id))
    body = {"name": "P", "webhook_url": fake.url + "/webhook/agent-stream"}
    assert (await client.post("/api/agents/test", json=body)).status_code == 401
    response = await client.post("/api/agents/test", json=body, headers=auth_headers(settings, member))
    assert response.status_code == 403
    other_team = await create_team(session)
    foreign = await create_agent(session, team=other_team, webhook_url=fake.url + "/webhook/agent-stream")
    response = await client.post(f"/api/agents/{foreign.id}/test", headers=auth_headers(settings, admin))
    assert response.status_code == 404
    response = await client.post(f"/api/agents/{uuid.uuid4()}/test", headers=auth_headers(settings, admin))
    assert response.status_code == 404
    response = await client.post(f"/api/agents/{foreign.id}/test", headers=auth_headers(settings, member))
    assert response.status_code == 403
    assert fake.requests == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "P"},
        {"name": "P", "webhook_url": ""},
        {"name": "P", "webhook_url": "http://x/", "webhook_headers": {"Bad Header": "v"}},
        {"name": "P", "webhook_url": "http://x/", "extra": 1},
    ],
)
async def test_probe_bad_body_is_422_and_sends_nothing(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n, body: dict[str, Any]
) -> None:
    admin = await create_admin(session)
    response = await client.post("/api/agents/test", json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 422
    assert fake.requests == []


@pytest.mark.settings(RATE_LIMIT_AGENT_TEST="2/minute")
async def test_probe_is_rate_limited_per_admin(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    admin = await create_admin(session)
    other = await create_admin(session)
    body = {"name": "P", "webhook_url": fake.url + "/webhook/agent-stream"}
    for _ in range(2):
        assert (
            await client.post("/api/agents/test", json=body, headers=auth_headers(settings, admin))
        ).status_code == 200
    refused = await client.post("/api/agents/test", json=body, headers=auth_headers(settings, admin))
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert len(fake.requests) == 2
    assert (await client.post("/api/agents/test", json=body, headers=auth_headers(settings, other))).status_code == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_other_methods_on_test_path_are_405(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, method: str
) -> None:
    admin = await create_admin(session)
    response = await client.request(method, "/api/agents/test", headers=auth_headers(settings, admin))
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


async def test_a_deeply_nested_answer_is_reported_not_a_500(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """RecursionError escaped the parser: the connection test answered 500."""
    nested = b'{"type":"item","content":"x","m":' + b"[" * 5000 + b"]" * 5000 + b"}\n"
    result = await probe(client, session, settings, raw_answer(fake.url, nested))
    assert (result["ok"], result["code"]) == (False, "bad_upstream_response")


async def test_a_workflow_n8n_could_not_start_names_the_webhook_node(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """n8n answers 500 'Workflow could not be started!' when the Webhook node itself refuses its configuration:
    most often Respond set to 'Using Respond to Webhook Node' with no such node in the workflow (or one present
    with another Respond option). The hint said the workflow ran and a node broke, sending the admin through the
    workflow's nodes instead of to the Webhook node's Respond option."""
    body = b'{"code":0,"message":"Workflow Webhook Error: Workflow could not be started!"}'
    result = await probe(client, session, settings, raw_answer(fake.url, body, status=500))
    assert (result["ok"], result["http_status"], result["code"]) == (False, 500, "upstream_error")
    assert result["hint"] == ct.HINT_NOT_STARTED
    failed = await probe(
        client, session, settings, raw_answer(fake.url, b'{"message":"Error in workflow"}', status=500)
    )
    assert failed["hint"] == ct.HINT_WORKFLOW_FAILED


# --- callback mode: the webhook's answer is not the reply ---------------------------------------------

#: A callback-mode workflow answers at once ("Respond: Immediately", an empty body or any JSON) and posts the
#: reply later: a real message waits for the callbacks, so none of these answers is a failure, and the advice to
#: stream (the answer of a stream-mode agent in one piece) would undo what callback mode is for.
CALLBACK_STARTED = [
    "/webhook/agent-json?scenario=json_ok",
    "/webhook/agent-stream-off",
    "/webhook/x?scenario=chat_stream_load",
    "/webhook/agent-stream",
    # The fake's own callback workflow (docs/CALLBACKS.md): a probe carries no callback URL, and a real n8n
    # answers as its Webhook node says all the same (the HTTP Request nodes fail later, in n8n).
    "/webhook/agent-stream?scenario=callbacks",
    "/webhook/agent-stream?scenario=callbacks&answer=stream&delay_ms=1",
]


@pytest.mark.settings(PUBLIC_BASE_URL="https://chat.example.com")
@pytest.mark.parametrize("path", CALLBACK_STARTED)
async def test_probe_of_a_callback_agent_judges_the_webhook_as_a_callback_message_does(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n, path: str
) -> None:
    unsaved = await probe(client, session, settings, fake.url + path, response_mode="callback")
    admin = await create_admin(session)
    agent = await create_agent(
        session, team=await session.get_one(Team, admin.team_id), webhook_url=fake.url + path, response_mode="callback"
    )
    response = await client.post(f"/api/agents/{agent.id}/test", headers=auth_headers(settings, admin))
    for result in (unsaved, response.json()):
        assert (result["ok"], result["http_status"], result["code"]) == (True, 200, None)
        assert result["hint"] == ct.HINT_CALLBACK
    assert len(fake.requests) == 2
    # A refusal that means the workflow did not start is still one.
    refused = await probe(client, session, settings, fake.url + "/webhook/does-not-exist", response_mode="callback")
    assert (refused["ok"], refused["code"], refused["hint"]) == (False, "upstream_error", ct.HINT_INACTIVE)


@pytest.mark.settings(PUBLIC_BASE_URL="https://chat.example.com", AGENT_TEST_TIMEOUT=1.0, N8N_CONNECT_TIMEOUT=0.3)
async def test_probe_of_a_callback_agent_tells_a_slow_webhook_from_one_never_reached(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A webhook that took the request and answers nothing in time may be running the workflow (a message
    waits for its callbacks): started. A connection never made sent nothing: not started, as a message fails
    at once (test_callbacks)."""
    slow = await probe(
        client, session, settings, fake.url + "/webhook/x?scenario=hang_headers&hang=5", response_mode="callback"
    )
    assert (slow["ok"], slow["code"], slow["hint"]) == (True, None, ct.HINT_CALLBACK)
    async with silent_port() as port:
        unreached = await probe(
            client, session, settings, f"https://127.0.0.1:{port}/webhook/x", response_mode="callback"
        )
    assert (unreached["ok"], unreached["code"], unreached["hint"]) == (False, "upstream_timeout", ct.HINT_UNREACHABLE)


@pytest.mark.settings(PUBLIC_BASE_URL="https://chat.example.com", AGENT_TEST_TIMEOUT=0.5, N8N_CONNECT_TIMEOUT=30)
async def test_probe_of_an_unreachable_callback_agent_fails_when_the_test_timeout_is_below_the_connect_one(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """AGENT_TEST_TIMEOUT capped the first-byte, read and total deadlines but not the connect one: set below
    N8N_CONNECT_TIMEOUT, the probe's total deadline ended a connection never made, a timeout callback mode
    outlives, and an n8n nobody could reach was reported working ("the workflow started"). The connect deadline
    is capped too: a connection not made in time is no start."""
    async with silent_port() as port:
        unreached = await probe(
            client, session, settings, f"https://127.0.0.1:{port}/webhook/x", response_mode="callback"
        )
    assert (unreached["ok"], unreached["code"], unreached["hint"]) == (False, "upstream_timeout", ct.HINT_UNREACHABLE)


async def test_probe_of_a_callback_agent_without_public_base_url_calls_no_one(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """As a real message: a stored callback agent is not called (`agent_misconfigured`); a body is the 422 of
    saving it."""
    admin = await create_admin(session)
    agent = await create_agent(
        session,
        team=await session.get_one(Team, admin.team_id),
        webhook_url=fake.url + "/webhook/agent-json",
        response_mode="callback",
    )
    stored = await client.post(f"/api/agents/{agent.id}/test", headers=auth_headers(settings, admin))
    assert stored.status_code == 200
    result = stored.json()
    assert (result["ok"], result["code"], result["hint"]) == (False, "agent_misconfigured", ct.HINT_CALLBACK_NO_URL)
    unsaved = await client.post(
        "/api/agents/test",
        json={"name": "Probe", "webhook_url": fake.url + "/webhook/agent-json", "response_mode": "callback"},
        headers=auth_headers(settings, admin),
    )
    assert unsaved.status_code == 422
    assert unsaved.json()["detail"][0]["loc"] == ["body", "response_mode"]
    assert fake.requests == []
