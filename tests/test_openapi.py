"""The OpenAPI schema tells the truth: schemathesis sends what it allows and checks every answer against it.

Run in-process (ASGI) against a fresh app on the test PostgreSQL database, with an admin's Bearer token, all
of schemathesis's checks, at most 25 examples per operation and a fixed seed. One pytest item per operation,
so pytest-xdist can split the run.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi as schemathesis_asgi
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.config import Settings
from app.fields import EMAIL_MAX_LENGTH, normalize_email
from app.models import Team, User
from main import create_app, shutdown
from tests.conftest import clear_tables, make_settings
from tests.factories import auth_headers, create_admin, create_agent, create_chat, create_user, email_of_length

#: The schema comes from an app that never touches a database (routes alone make the OpenAPI document).
_SCHEMA_APP = create_app(
    make_settings("postgresql+asyncpg://postgres@127.0.0.1:5432/unused", Path(tempfile.gettempdir()))
)
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {"enabled": True},
        "generation": {
            "max-examples": 25,
            "deterministic": True,
            "database": "none",
            # PostgreSQL cannot store NUL, so every body refuses it (422, said in the API description); a
            # pattern on every string, keys of free JSON included, cannot say it.
            "allow-x00": False,
        },
        "operations": [
            {
                # A wrong current password is a 400 for a schema-valid body, as documented; any other refusal
                # of a valid body still fails.
                "include-name": "POST /api/auth/password",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "429"]}},
            },
            {
                # Which message comes last, and whether it has text, is a documented 422 no JSON schema of a
                # list can express; a slug no agent has is a 404, and the seeded team has no agents.
                "include-name": "POST /v1/chat/completions",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "422", "429"]}},
            },
            *(
                {
                    # `from` after `to`, or a period over 366 days, is a documented 422 that no schema of two
                    # separate query parameters can express.
                    "include-name": name,
                    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "422"]}},
                }
                for name in ("GET /api/usage", "GET /api/usage/me")
            ),
            {
                # The seeded team has no agents (404); `chatInput` is required with one action and refused with
                # the other, a documented 422 that one JSON schema for both actions cannot express. With an agent
                # (a deeper local run), an inactive one or a session already answering is the documented 409, and
                # the agent's own failure the documented 502/503/504.
                "include-name": "POST /api/agents/{agent_id}/n8n-chat",
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "404", "409", "422", "429", "502", "503", "504"]
                    }
                },
            },
            {
                # With an agent (a deeper local run): bytes that are no image are the documented 415, judged by
                # content, which no schema of a binary field can express.
                "include-name": "POST /api/agents/{agent_id}/avatar",
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "413", "415"]}
                },
            },
            {
                # With a chat (a deeper local run): a `current_message_id` that is no message of the chat is the
                # documented 422, which no schema of an id can express.
                "include-name": "PUT /api/chats/{chat_id}",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "422"]}},
            },
            {
                # With a chat (a deeper local run): an `edit_of`/`regenerate_of`/`file_ids` naming nothing of this
                # chat (or of the wrong role) is the documented 422, a running generation the documented 409.
                "include-name": "POST /api/chats/{chat_id}/messages",
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "403", "404", "409", "422", "429", "503"]
                    }
                },
            },
            {
                # With a chat (a deeper local run): bytes of a type not accepted are the documented 415, judged by
                # content, which no schema of a binary field can express.
                "include-name": "POST /api/chats/{chat_id}/files",
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "403", "404", "409", "413", "415", "429"]
                    }
                },
            },
            {
                # With a chat (a deeper local run): feedback on a user message is the documented 422.
                "include-name": "PUT /api/chats/{chat_id}/messages/{message_id}/feedback",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "422"]}},
            },
            {
                # An exported chat names its agent by slug, and the seeded team has no agents: the documented
                # 422 naming the slug (a tree whose parent ids do not link up is one too).
                "include-name": "POST /api/chats/import",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "422", "429"]}},
            },
            {
                # An `expires_at` in the past is a documented 422 (the field's description says "in the future"),
                # which no JSON schema of a date-time can express.
                "include-name": "POST /api/api-keys",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "422", "429"]}},
            },
            {
                # Without a running generation's own signature a valid callback is the documented 404.
                "include-name": "POST /api/callbacks/{generation_id}/{signature}",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "404"]}},
            },
        ],
    }
)


def _server_accepts_email(value: str) -> bool:
    try:
        normalize_email(value)
    except ValueError:
        return False
    return True


# `format: email` as the server reads it: email-validator's syntax, which also refuses special-use domains
# (`.test`, `.local`, ...) that Hypothesis's generic addresses may use (the field's description says so). Plus
# addresses of the lengths around `maxLength`, which Hypothesis's short ones never reach: without them the
# coverage phase's boundary cases (the longest valid address, one too long) were never sent, and each spent
# Hypothesis's whole search (~5 s) finding that out when the module was collected.
schemathesis.openapi.format(
    "email",
    st.one_of(
        st.emails().filter(_server_accepts_email),
        st.sampled_from([EMAIL_MAX_LENGTH - 1, EMAIL_MAX_LENGTH, EMAIL_MAX_LENGTH + 1]).map(email_of_length),
    ),
)
schema = schemathesis.openapi.from_dict(_SCHEMA_APP.openapi(), config=CONFIG)


async def _seed(settings: Settings) -> User:
    engine = create_async_engine(settings.DATABASE_URL)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            # Not the password of the schema's examples: a right `current_password` would end the admin's session.
            return await create_admin(session, password=secrets.token_urlsafe(24))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def seeded(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, User]]:
    """One team and its admin for the whole module; the rows go when it ends."""
    # Rate limits off: 25 logins per operation would otherwise be (rightly) refused with 429.
    # With a public base URL, so agents may be saved in `callback` response mode.
    settings = make_settings(
        database_url,
        tmp_path_factory.mktemp("openapi"),
        RATE_LIMIT_ENABLED=False,
        PUBLIC_BASE_URL="https://chat.example.com",
    )
    try:
        yield settings, asyncio.run(_seed(settings))
    finally:
        asyncio.run(clear_tables(database_url))


@pytest.fixture
def api_app(seeded: tuple[Settings, User]) -> Iterator[FastAPI]:
    """A fresh app per operation: schemathesis ends the app's lifespan (its shutdown) after each test."""
    yield create_app(seeded[0])
    schemathesis_asgi.shutdown_lifespans()


@pytest.mark.slow
@pytest.mark.timeout(300)
@schema.parametrize()
# Meant: one app (one lifespan) serves every input of an operation, as one server serves every request.
@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(
    case: schemathesis.Case[Any], api_app: FastAPI, seeded: tuple[Settings, User]
) -> None:
    app_settings, admin = seeded
    # A fresh admin token per call: logout revokes the token it is sent with, and the others must not care.
    case.call_and_validate(app=api_app, headers=auth_headers(app_settings, admin))


# --- what the run above cannot see: the stream's documentation, error shapes, headers -------------------

SEND = "/api/chats/{chat_id}/messages"


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_send_route_documents_an_event_stream_and_json_errors(app: FastAPI) -> None:
    """The 200 is `text/event-stream` only (Swagger must not pick JSON); every failure before it is JSON."""
    responses = app.openapi()["paths"][SEND]["post"]["responses"]
    stream = responses["200"]["content"]
    assert list(stream) == ["text/event-stream"]
    assert stream["text/event-stream"]["schema"]["type"] == "string"
    assert "`done`" in stream["text/event-stream"]["schema"]["description"]
    assert stream["text/event-stream"]["example"].startswith('id: 1\ndata: {"type": "start"')
    for status in ("400", "401", "403", "404", "409", "413", "422", "503"):
        assert "schema" in responses[status]["content"]["application/json"], status


async def test_send_route_answers_the_documented_media_type(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """The documented 404 really is JSON: the SSE response class changes the documentation only."""
    user = await create_user(session)
    response = await client.post(
        f"/api/chats/{uuid.uuid4()}/messages", json={"content": "hi"}, headers=auth_headers(settings, user)
    )
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"


async def test_ssrf_refusal_has_the_validation_shape(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """One 422 shape: the policy's refusal reads like FastAPI's, names the field and never echoes the URL."""
    admin = await create_admin(session)
    url = "http://169.254.169.254/latest/meta-data/"
    response = await client.post(
        "/api/agents", json={"name": "A", "webhook_url": url}, headers=auth_headers(settings, admin)
    )
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "webhook_url"]
    assert error["type"] == "value_error"
    assert "link-local" in error["msg"]
    assert "169.254" not in response.text


async def test_validation_errors_never_echo_input_and_are_documented_as_sent(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    secret = "hunter2-" + "s" * 2000
    response = await client.post("/api/auth/login", json={"email": "a@example.com", "password": secret})
    assert response.status_code == 422
    assert all(set(error) == {"type", "loc", "msg"} for error in response.json()["detail"])
    assert "hunter2" not in response.text
    documented = app.openapi()["components"]["schemas"]["ValidationError"]
    assert set(documented["properties"]) == {"type", "loc", "msg"}
    agents = app.openapi()["paths"]["/api/agents"]["post"]["responses"]["422"]
    assert agents["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/HTTPValidationError"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/api/agents", "GET, POST"),
        ("PATCH", f"/api/agents/{uuid.UUID(int=1)}", "DELETE, GET, PUT"),
        ("PUT", f"/api/agents/{uuid.UUID(int=1)}/avatar", "DELETE, GET, POST"),
        ("OPTIONS", "/api/auth/me", "GET, PATCH"),
        ("DELETE", f"/api/chats/{uuid.UUID(int=1)}/messages", "GET, POST"),
    ],
)
async def test_405_allow_lists_every_method_of_the_path(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    response = await client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/api/auth/login", "application/json", b"\x0f\x10\xff"),
        ("/api/auth/token", "multipart/form-data", b"username=a"),
    ],
)
async def test_unparsable_body_is_a_documented_400(
    app: FastAPI, client: httpx.AsyncClient, path: str, content_type: str, body: bytes
) -> None:
    response = await client.post(path, content=body, headers={"content-type": content_type})
    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)
    assert "400" in app.openapi()["paths"][path]["post"]["responses"]


def test_every_route_with_a_body_documents_400_413_and_422(app: FastAPI) -> None:
    with_body = [(path, method, op) for path, method, op in _operations(app.openapi()) if "requestBody" in op]
    assert len(with_body) >= 15
    for path, method, operation in with_body:
        assert {"400", "413", "422"} <= operation["responses"].keys(), (method, path)


def test_form_and_upload_limits_are_in_the_schema(app: FastAPI) -> None:
    schemas = app.openapi()["components"]["schemas"]
    token = schemas["Body_token_api_auth_token_post"]["properties"]
    assert token["username"]["maxLength"] == EMAIL_MAX_LENGTH
    assert token["password"]["maxLength"] == 1024
    upload = app.openapi()["paths"]["/api/agents/{agent_id}/avatar"]["post"]["requestBody"]
    avatar = upload["content"]["multipart/form-data"]["schema"]["properties"]["file"]
    assert avatar["minLength"] == 1
    assert "409" in app.openapi()["paths"]["/api/teams"]["post"]["responses"]


def test_every_documented_error_states_its_json_body(app: FastAPI) -> None:
    """4xx/5xx docs come from app/routers/responses.py: `{"detail": ...}` with an example, or the 422 shape."""
    for path, method, operation in _operations(app.openapi()):
        for status, doc in operation["responses"].items():
            if not status.startswith(("4", "5")):
                continue
            body = doc.get("content", {}).get("application/json", {})
            # The OpenAI-compatible routes answer every error in OpenAI's shape (OpenAIErrorRead), 422 included.
            openai_shaped = path.startswith("/v1/")
            expected = "HTTPValidationError" if status == "422" and not openai_shaped else "ErrorRead"
            if path.endswith("/n8n-chat") and status in ("502", "504"):
                expected = "N8nChatError"  # a failed answer as n8n's Chat Trigger reports it: `{"message"}`
            if path.endswith("/n8n-chat") and status in ("429", "503"):
                # The service's refusal (quota, shutdown), or n8n's own 429/503 with a Retry-After passed on.
                refs = [one.get("$ref", "") for one in body.get("schema", {}).get("anyOf", [])]
                assert [ref.rsplit("/", 1)[-1] for ref in refs] == ["ErrorRead", "N8nChatError"], (path, status)
                assert "Retry-After" in doc.get("headers", {}), (path, status)
                assert "examples" in body, (path, status)
                continue
            assert body.get("schema", {}).get("$ref", "").endswith(expected), (method, path, status)
            assert "example" in body or "examples" in body or status == "422", (method, path, status)


def test_secured_routes_document_401_and_their_writes_403(app: FastAPI) -> None:
    for path, method, operation in _operations(app.openapi()):
        if operation.get("security"):
            assert "401" in operation["responses"], (method, path)
            if method in ("post", "put", "patch", "delete"):
                assert "origin" in operation["responses"]["403"]["description"].lower(), (method, path)


async def test_message_length_limit_in_the_schema_follows_the_settings(database_url: str, tmp_path: Path) -> None:
    app = create_app(make_settings(database_url, tmp_path, MESSAGE_MAX_CHARS=100))
    try:
        content = app.openapi()["components"]["schemas"]["MessageCreate"]["properties"]["content"]
    finally:
        await shutdown(app)
    assert content["maxLength"] == 100
    assert content["minLength"] == 1
    assert content["pattern"] == r"\S"


NAMED_BODIES = [
    ("post", "/api/teams", "TeamCreate", {"admin_email": "ada@example.com", "admin_password": "correct-horse-battery"}),
    ("put", "/api/teams/current", "TeamUpdate", {}),
    ("post", "/api/agents", "AgentCreate", {"webhook_url": "https://n8n.example.com/webhook/a"}),
    ("post", "/api/api-keys", "ApiKeyCreate", {}),
]


@pytest.mark.parametrize(("method", "path", "model", "body"), NAMED_BODIES, ids=[b[2] for b in NAMED_BODIES])
async def test_a_trimmed_name_is_refused_as_its_schema_says(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    method: str,
    path: str,
    model: str,
    body: dict[str, Any],
) -> None:
    """The schema's `maxLength` counts the name as sent and its `pattern` says it is not blank; surrounding
    whitespace is trimmed only once both hold. 100 characters and a space were accepted (schemathesis: a
    schema-violating body accepted), and a space alone was refused though the schema allowed it."""
    name = app.openapi()["components"]["schemas"][model]["properties"]["name"]
    assert (name["minLength"], name["maxLength"], name["pattern"]) == (1, 100, r"\S")
    headers = auth_headers(settings, await create_admin(session))
    for refused in (" " + "x" * 100, "x" * 100 + "\n", " ", "\x1c\x1d"):
        response = await client.request(method, path, json={**body, "name": refused}, headers=headers)
        assert response.status_code == 422, (refused, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "name"], response.text
    accepted = await client.request(method, path, json={**body, "name": " " + "x" * 98 + " "}, headers=headers)
    assert accepted.status_code in (200, 201), accepted.text
    returned = accepted.json()
    assert (returned.get("team") or returned)["name"] == "x" * 98


async def test_the_follow_query_last_event_id_documents_what_it_accepts(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """`?last_event_id=` was documented as any string of at most 32 characters, while only an event id (1-9
    ASCII digits, whitespace around them ignored) or nothing is taken: schemathesis sent `"\x9dÎm"` as valid data
    and got the (right) 422. The schema's pattern now says what the server takes, value for value."""
    user = await create_user(session)
    team = await session.get(Team, user.team_id)
    assert team is not None
    chat = await create_chat(session, user=user, agent=await create_agent(session, team=team))
    [param] = [
        p
        for p in app.openapi()["paths"]["/api/chats/{chat_id}/stream"]["get"]["parameters"]
        if p["name"] == "last_event_id"
    ]
    pattern = param["schema"]["pattern"]  # beside `anyOf` (string or null): it constrains the string
    for value in ("", " ", "0", "7", " 42 ", "000000001", "999999999", "x", "-1", "1e3", "9" * 10, "\u0661", "1 2"):
        documented = re.fullmatch(pattern, value) is not None
        response = await client.get(
            f"/api/chats/{chat.id}/stream", params={"last_event_id": value}, headers=auth_headers(settings, user)
        )
        assert response.status_code == (204 if documented else 422), (value, response.text)
