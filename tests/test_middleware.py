"""Request ids, security headers, CORS, body size limit, validation errors and the last-resort 500."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.logs import JsonFormatter, RequestIdFilter, redact_path, redact_query, request_id_var, setup_logging
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import make_settings
from tests.factories import auth_headers, create_agent, create_chat, create_team, create_user


class Secretive(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str
    count: int


def add_test_routes(app: FastAPI) -> None:
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    async def echo(body: Secretive) -> dict[str, int]:
        return {"count": body.count}

    async def db_bug() -> None:
        from sqlalchemy import exc as sa_exc

        raise sa_exc.ProgrammingError("SELECT secret_column", {}, Exception("secret sql detail"))

    async def db_params() -> None:
        from sqlalchemy import text

        async with app_state(app).db.sessionmaker() as session:  # a real statement that fails with its values
            value = 900_000_000 + 18_273_645  # not written out here: the traceback quotes this file's lines
            await session.execute(text("SELECT 1 / (:secret - :secret)"), {"secret": value})

    async def body_cut() -> None:
        from starlette.requests import ClientDisconnect

        raise ClientDisconnect  # as reading the body of a client that left raises it

    async def db_conflict(sqlstate: str) -> None:
        from sqlalchemy import text

        async with app_state(app).db.sessionmaker() as session:  # PostgreSQL itself raising that error
            await session.execute(text(f"DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '{sqlstate}'; END $$"))

    app.add_api_route("/test/boom", boom, methods=["GET"])
    app.add_api_route("/v1/test/boom", boom, methods=["GET"])
    app.add_api_route("/test/db-conflict/{sqlstate}", db_conflict, methods=["GET"])
    app.add_api_route("/test/db-params", db_params, methods=["GET"])
    app.add_api_route("/api/callbacks/{signature}", boom, methods=["GET"])
    app.add_api_route("/api/invites/{token}", body_cut, methods=["POST"])
    app.add_api_route("/test/db-bug", db_bug, methods=["GET"])
    app.add_api_route("/test/echo", echo, methods=["POST"])


@pytest.fixture
async def tclient(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    add_test_routes(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


async def test_a_body_cut_on_a_secret_route_logs_its_path_redacted(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    response = await tclient.post("/api/invites/inv-token-not-to-log")
    assert response.status_code == 400
    logged = [r.getMessage() for r in caplog.records if "client disconnected" in r.getMessage()]
    assert logged == ["client disconnected while sending the body of POST /api/invites/***"]


async def test_request_id_is_generated(tclient: httpx.AsyncClient) -> None:
    response = await tclient.get("/health")
    assert len(response.headers["x-request-id"]) == 32


async def test_well_formed_request_id_is_kept(tclient: httpx.AsyncClient) -> None:
    response = await tclient.get("/health", headers={"X-Request-ID": "abc-123.DEF_4"})
    assert response.headers["x-request-id"] == "abc-123.DEF_4"


async def test_malformed_request_id_is_replaced(tclient: httpx.AsyncClient) -> None:
    response = await tclient.get("/health", headers={"X-Request-ID": "bad id<script>"})
    assert response.headers["x-request-id"] != "bad id<script>"
    assert len(response.headers["x-request-id"]) == 32


async def test_security_headers_on_every_response(tclient: httpx.AsyncClient) -> None:
    for path in ("/health", "/nope"):
        response = await tclient.get(path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert "max-age" in response.headers["strict-transport-security"]


async def test_api_answers_are_never_stored_by_a_cache_unless_they_say_otherwise(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """An API answer holds a team's data (chats, agents, usage) for whoever asked: with no Cache-Control, a
    browser's disk cache or a proxy could keep it past a logout or a deletion, and serve it to the next person
    on a shared computer. Every answer outside the docs and the web client's files says no-store, errors too;
    an answer with its own policy (an avatar's revalidation, an SSE stream's no-cache: test_messages) keeps it."""
    team = await create_team(session)
    user = await create_user(session, team=team)
    agent = await create_agent(session, team=team)
    chat = await create_chat(session, user=user, agent=agent)
    headers = auth_headers(settings, user)
    for path in ("/api/chats", f"/api/chats/{chat.id}", f"/api/chats/{uuid.uuid4()}", "/api/agents", "/v1/models"):
        response = await client.get(path, headers=headers)
        assert response.status_code in (200, 404), path
        assert response.headers["cache-control"] == "no-store", path
    avatar = await client.get(f"/api/agents/{agent.id}/avatar", headers=headers)
    assert avatar.headers["cache-control"] == "no-store"  # a 404 (no avatar)
    for path in ("/docs", "/"):
        assert "no-store" not in (await client.get(path)).headers.get("cache-control", ""), path


async def test_docs_page_has_a_csp_that_lets_swagger_load(tclient: httpx.AsyncClient) -> None:
    response = await tclient.get("/docs")
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "cdn.jsdelivr.net" not in csp
    assert "frame-ancestors 'none'" in csp
    openapi = await tclient.get("/openapi.json")
    assert openapi.status_code == 200


async def test_no_hsts_when_cookies_are_not_secure(database_url: str, tmp_path) -> None:
    app = create_app(make_settings(database_url, tmp_path, COOKIE_SECURE=False))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            response = await c.get("/health")
        assert "strict-transport-security" not in response.headers
    finally:
        await shutdown(app)


async def test_unknown_route_is_json_404(tclient: httpx.AsyncClient) -> None:
    response = await tclient.get("/api/definitely-not-here")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


async def test_unhandled_error_is_generic_500_without_trace(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = await tclient.get("/test/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error", "request_id": "req-500"}
    assert "secret internal detail" not in response.text
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"] == "req-500"
    assert "x-should-retry" not in response.headers  # OpenAI's clients' header, for /v1 only
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


async def test_unhandled_error_on_v1_is_a_500_in_openai_shape(tclient: httpx.AsyncClient) -> None:
    """The OpenAI-compatible paths answer every error in OpenAI's shape, the last-resort 500 included (its
    clients read `error.message`); the request id is in the message, nothing of the error is."""
    response = await tclient.get("/v1/test/boom", headers={"X-Request-ID": "req-v1"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "Internal server error (request id req-v1)",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "secret internal detail" not in response.text
    assert response.headers["x-should-retry"] == "false"  # a bug: the official clients must not resend it


async def test_database_error_on_a_live_connection_is_generic_500(tclient: httpx.AsyncClient) -> None:
    """Only a dead connection is retryable (503); a failing statement is a bug and stays a plain 500."""
    response = await tclient.get("/test/db-bug", headers={"X-Request-ID": "req-db"})
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error", "request_id": "req-db"}
    assert "secret" not in response.text


async def test_a_failing_statement_logs_no_bound_values(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLAlchemy's error text carries the statement's parameters (a token, a secret header...): the engine
    hides them, so the 500's logged traceback holds the SQL but none of the values."""
    response = await tclient.get("/test/db-params")
    assert response.status_code == 500
    logged = [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert logged
    assert logged[0].exc_info is not None
    text = logging.Formatter().format(logged[0])
    assert "SELECT 1 / (" in text  # the traceback and its statement are there
    assert "918273645" not in text


async def test_a_deadlock_or_serialization_failure_is_a_retryable_503(tclient: httpx.AsyncClient) -> None:
    """The database rolled the request's transaction back and says to try again: 503 with Retry-After, not a
    500; any other statement error stays a 500."""
    for sqlstate in ("40P01", "40001", "55P03"):
        response = await tclient.get(f"/test/db-conflict/{sqlstate}")
        assert response.status_code == 503, sqlstate
        assert response.headers["retry-after"] == "5"
        assert response.json() == {"detail": "Service temporarily unavailable, try again shortly"}
    assert (await tclient.get("/test/db-conflict/22012")).status_code == 500  # division_by_zero: a bug


async def test_validation_error_does_not_echo_input(tclient: httpx.AsyncClient) -> None:
    response = await tclient.post("/test/echo", json={"password": "hunter2-SECRET", "count": "many", "x": 1})
    assert response.status_code == 422
    assert "hunter2-SECRET" not in response.text
    assert "many" not in response.text
    detail = response.json()["detail"]
    assert {tuple(d["loc"]) for d in detail} == {("body", "count"), ("body", "x")}
    assert all(set(d) == {"type", "loc", "msg"} for d in detail)


async def test_invalid_uuid_in_a_path_is_422_without_quoting_it(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    response = await client.get("/api/chats/Q-not-a-uuid", headers=auth_headers(settings, user))
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"type": "uuid_parsing", "loc": ["path", "chat_id"], "msg": "Input should be a valid UUID"}
    ]


def test_uuid_parsing_message_quotes_nothing() -> None:
    from app.error_handlers import safe_validation_errors

    errors = [{"type": "uuid_parsing", "loc": ("path", "chat_id"), "msg": "Input should be a valid UUID, found `s`"}]
    assert safe_validation_errors(errors) == [
        {"type": "uuid_parsing", "loc": ["path", "chat_id"], "msg": "Input should be a valid UUID"}
    ]


async def test_malformed_json_is_422(tclient: httpx.AsyncClient) -> None:
    response = await tclient.post(
        "/test/echo", content=b'{"password": "hunter2-SECRET", ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "hunter2-SECRET" not in response.text
    # The documented shape (docs/API_REFERENCE.md, "Errors"): the one validation list, where reading stopped.
    assert response.json() == {"detail": [{"type": "json_invalid", "loc": ["body", 31], "msg": "JSON decode error"}]}


async def test_body_over_limit_is_413_by_content_length(tclient: httpx.AsyncClient) -> None:
    body = json.dumps({"password": "x" * 2_000_000, "count": 1})
    response = await tclient.post("/test/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large"}


async def test_body_over_limit_is_413_when_streamed_without_length(tclient: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"password": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'", "count": 1}'

    response = await tclient.post("/test/echo", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


async def test_cors_allows_listed_origin_with_credentials(tclient: httpx.AsyncClient) -> None:
    response = await tclient.options(
        "/health", headers={"Origin": "http://spa.test", "Access-Control-Request-Method": "GET"}
    )
    assert response.headers["access-control-allow-origin"] == "http://spa.test"
    assert response.headers["access-control-allow-credentials"] == "true"
    simple = await tclient.get("/health", headers={"Origin": "http://spa.test"})
    assert "x-total-count" in simple.headers["access-control-expose-headers"].lower()


async def test_cors_allows_the_headers_the_api_documents(tclient: httpx.AsyncClient) -> None:
    """A browser client may send Idempotency-Key (a send), Last-Event-ID (a follow) and X-Session-Id (/v1)."""
    asked = "authorization,content-type,idempotency-key,last-event-id,x-session-id"
    response = await tclient.options(
        "/v1/chat/completions",
        headers={
            "Origin": "http://spa.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked,
        },
    )
    assert response.status_code == 200
    granted = response.headers["access-control-allow-headers"].lower()
    assert all(header in granted for header in asked.split(","))


async def test_cors_ignores_other_origins(tclient: httpx.AsyncClient) -> None:
    response = await tclient.get("/health", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in response.headers


def test_json_log_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    token = request_id_var.set("rid-42")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "rid-42"
    assert line["message"] == "hello world"
    assert line["level"] == "INFO"


async def test_redis_down_refuses_nothing(database_url: str, tmp_path, session) -> None:
    """Redis is an accelerator: authentication (revocations are in the database) does not need it."""
    from tests.factories import auth_headers, create_user

    settings = make_settings(database_url, tmp_path, REDIS_URL="redis://127.0.0.1:1/0")
    user = await create_user(session)
    app = create_app(settings)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            response = await c.get("/api/auth/me", headers=auth_headers(settings, user))
        assert response.status_code == 200
        assert response.json()["id"] == str(user.id)
    finally:
        await shutdown(app)


async def test_database_down_gives_503_not_500(tmp_path) -> None:
    from app.models import User
    from tests.factories import auth_headers

    settings = make_settings("postgresql+asyncpg://postgres@127.0.0.1:1/nothing", tmp_path, DB_CONNECT_TIMEOUT=1.0)
    ghost = User(id=uuid.uuid4(), team_id=uuid.uuid4())
    app = create_app(settings)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            response = await c.get("/api/auth/me", headers=auth_headers(settings, ghost))
        assert response.status_code == 503
        assert response.json() == {"detail": "Service temporarily unavailable, try again shortly"}
    finally:
        await shutdown(app)


async def test_pool_recovers_after_the_database_drops_its_connections(
    app: FastAPI, client: httpx.AsyncClient, settings, session
) -> None:
    """Without pre-ping (the default), a dead pooled connection costs one 503 at most, never a 500."""
    import asyncpg
    from sqlalchemy import text

    from tests.conftest import _plain_url
    from tests.factories import auth_headers, create_user

    assert settings.DB_POOL_PRE_PING is False
    user = await create_user(session)
    await session.close()
    headers = auth_headers(settings, user)
    assert (await client.get("/api/auth/me", headers=headers)).status_code == 200
    async with app_state(app).db.engine.connect() as conn:
        own_pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    # What a database restart does to every pooled connection.
    admin = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert own_pid
    assert killed >= 1
    statuses = [(await client.get("/api/auth/me", headers=headers)).status_code for _ in range(3)]
    assert statuses[0] in (200, 503)
    assert statuses[1:] == [200, 200]


async def test_access_log_escapes_control_characters(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    await tclient.get("/health/%0a2026-12-02 ERROR forged")
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert lines
    assert all("\n" not in line for line in lines)
    assert any("\\n2026-12-02 ERROR forged" in line for line in lines)


async def test_access_log_leaves_secrets_out(tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    await tclient.get("/health", params={"access_token": "SECRET-1", "page": "2", "API_KEY": "SECRET-2"})
    await tclient.get("/api/invites/SECRET-3")
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert len(lines) == 2
    assert " GET /health?access_token=***&page=2&API_KEY=*** 200 " in lines[0]
    assert " GET /api/invites/*** " in lines[1]
    assert not any("SECRET" in line for line in lines)


async def test_unhandled_error_log_leaves_a_path_token_out(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await tclient.get("/api/callbacks/SECRET-SIG")).status_code == 500
    messages = [r.getMessage() for r in caplog.records if r.name.startswith(("app", "uvicorn"))]
    assert "unhandled error on GET /api/callbacks/***" in messages
    assert not any("SECRET-SIG" in message for message in messages)


def test_redact_query_hides_secret_looking_parameters_only() -> None:
    assert redact_query("page=2&q=token") == "page=2&q=token"
    assert redact_query("token=a&Refresh_Token=b&invite_token=c") == "token=***&Refresh_Token=***&invite_token=***"
    assert redact_query("api_key=a&apikey=b&key=c&X-Api-Key=d") == "api_key=***&apikey=***&key=***&X-Api-Key=***"
    assert redact_query("password=a&client_secret=b&sig=c&X-Amz-Signature=d") == (
        "password=***&client_secret=***&sig=***&X-Amz-Signature=***"
    )
    assert redact_query("code=a&invite=b&monkey=ok&keys=ok") == "code=***&invite=***&monkey=ok&keys=ok"
    # A name written percent-encoded or with a `+` is still recognised; a value-less flag stays a flag.
    assert redact_query("access%5Ftoken=a&secret&%20token=b") == "access%5Ftoken=***&secret=***&%20token=***"
    assert redact_query("next=%0aforged") == "next=%0aforged"
    assert redact_query("a=\nb") == "a=\\nb"


def test_redact_query_sees_through_separators_and_decorated_names() -> None:
    assert redact_query("a=1;access_token=S") == "a=1;access_token=***"
    assert redact_query("access_token[]=S&token.=S&token%00=S&Token%5B0%5D=S") == (
        "access_token[]=***&token.=***&token%00=***&Token%5B0%5D=***"
    )


def test_redact_path_finds_a_token_behind_a_root_path() -> None:
    assert redact_path("/relay/api/invites/SECRET") == "/relay/api/invites/***"
    assert redact_path("/relay//API/Invites/SECRET/x") == "/relay/api/invites/***"


def test_redact_path_hides_tokens_carried_in_paths() -> None:
    assert redact_path("/api/invites/abc.def") == "/api/invites/***"
    assert redact_path("/api/invites/abc/extra/segments") == "/api/invites/***"
    assert redact_path("//API/Invites//abc") == "/api/invites/***"
    assert redact_path("/api/files/signed/f/123?x") == "/api/files/signed/***"
    assert redact_path("/api/callbacks/xyz") == "/api/callbacks/***"
    assert redact_path("/api/invites/") == "/api/invites/"
    assert redact_path("/api/teams/current/invites/123") == "/api/teams/current/invites/123"
    assert redact_path("/api/chats/\n") == "/api/chats/\\n"


def test_setup_logging_leaves_uvicorn_no_access_handler() -> None:
    """uvicorn writes its access line (whole query string) whenever `uvicorn.access` has a handler,
    its own or one reached by propagation; its default logging config gives it one."""
    access = logging.getLogger("uvicorn.access")
    saved = access.handlers[:], access.propagate
    access.addHandler(logging.NullHandler())
    try:
        setup_logging("INFO", "text")
        assert logging.getLogger().handlers  # ours is there ...
        assert not access.hasHandlers()  # ... and uvicorn.access reaches none
        assert logging.getLogger("uvicorn.error").hasHandlers()
    finally:
        access.handlers, access.propagate = saved


@pytest.mark.parametrize("declared", [b"\xb2", b"1" * 5000])
async def test_a_content_length_python_cannot_read_as_a_number_is_no_500(
    tclient: httpx.AsyncClient, declared: bytes
) -> None:
    """`²` (a latin-1 byte) passed `str.isdigit` and failed `int()`; so did 5,000 digits (Python's int limit).
    uvicorn's parsers refuse such headers first; the middleware no longer depends on that."""
    response = await tclient.get("/health", headers={b"content-length": declared})
    assert response.status_code != 500


async def test_a_request_id_with_a_final_newline_is_replaced(tclient: httpx.AsyncClient) -> None:
    """`$` also matches before a final newline: `abc\\n` was kept and written into the response's header."""
    response = await tclient.get("/health", headers={"X-Request-ID": "abc\n"})
    assert response.headers["x-request-id"] != "abc\n"
    assert len(response.headers["x-request-id"]) == 32
