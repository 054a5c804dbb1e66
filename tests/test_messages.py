"""POST /api/chats/{id}/messages in-process: pre-stream errors, the events, what is stored, what n8n receives."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.models import ErrorLog, Team, User
from app.security import create_token, family_key
from app.services.messages import build_history, public_message
from app.state import app_state
from app.upstream import ACCEPT
from main import create_app, shutdown
from tests.conftest import count_rows, make_settings, run_migrations
from tests.factories import StoredChat, auth_headers, create_admin, create_user, stored_chat
from tests.live import SSE, ChatSetup, chat_with_agent, data_events, parse_sse, streamed_text
from tools.fake_n8n import FakeN8n, load_captures, raw_answer

CAPTURES = load_captures()
MESSAGE_FIELDS = {
    "id",
    "role",
    "content",
    "status",
    "created_at",
    "error",
    "metadata",
    "parent_id",
    "sibling_ids",
    "feedback",
    "files",
}
TIMESTAMP_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


async def stored(app: FastAPI, chat_id: uuid.UUID) -> StoredChat:
    async with app_state(app).db.sessionmaker() as s:
        return await stored_chat(s, chat_id)


async def error_rows(app: FastAPI) -> list[ErrorLog]:
    async with app_state(app).db.sessionmaker() as s:
        return list((await s.execute(select(ErrorLog).order_by(ErrorLog.created_at))).scalars())


async def send(client: httpx.AsyncClient, setup: ChatSetup, content: Any = "hello there") -> httpx.Response:
    return await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": content}, headers=setup.headers)


# --- the happy path ------------------------------------------------------------------------------


async def test_send_message_streams_events_and_stores_answer(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream", title=None)
    response = await send(client, setup)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    events = data_events(parse_sse(response.text))
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    types = [e.type for e in events]
    assert types[:2] == ["start", "status"]
    assert types[-1] == "done"
    assert set(types[2:-1]) == {"message"}
    assert "_worker" not in response.text
    start = events[0].data["data"]  # type: ignore[index]
    assert start["user_message"]["content"] == "hello there"
    assert start["user_message"]["status"] == "complete"
    assert set(start["user_message"]) == MESSAGE_FIELDS
    assert start["user_message"]["error"] is None
    assert start["user_message"]["metadata"] is None
    assert events[1].data == {"type": "status", "data": {"description": "Waiting for the agent", "done": False}}
    assert streamed_text(events) == "Echo: hello there"
    done = events[-1].data["data"]["message"]  # type: ignore[index]
    assert done["id"] == start["assistant_message_id"]
    assert done["status"] == "complete"
    assert done["content"] == "Echo: hello there"
    assert done["metadata"]["chunks"] == 3
    assert done["metadata"]["format"] == "ndjson"

    chat = await stored(app, setup.chat.id)
    assert chat.message_count == 2
    assert chat.last_message_at is not None
    assert chat.title == "hello there"
    user_msg, assistant = chat.messages
    # The stored rows are what the stream showed (the tree keys come from the stored links).
    assert public_message(user_msg) == {**start["user_message"], "sibling_ids": []}
    assert public_message(assistant) == {**done, "parent_id": None, "sibling_ids": []}
    assert done["parent_id"] == user_msg["id"]
    assert done["sibling_ids"] == [done["id"]]
    assert start["user_message"]["parent_id"] is None
    assert start["user_message"]["sibling_ids"] == [user_msg["id"]]
    assert assistant["_worker"] == str(app_state(app).generations.worker_id)
    assert await error_rows(app) == []
    assert app_state(app).generations.running == {}


def timestamps(value: Any, key: str = "") -> list[str]:
    """Every timestamp in a JSON value: the values of its `*_at` keys (None left out)."""
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in timestamps(v, k)]
    if isinstance(value, list):
        return [t for item in value for t in timestamps(item, key)]
    return [value] if key.endswith("_at") and value is not None else []


async def test_message_has_one_shape_and_one_timestamp_format_in_rest_and_stream(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    response = await send(client, setup)
    events = data_events(parse_sse(response.text))
    start = events[0].data["data"]["user_message"]  # type: ignore[index]
    done = events[-1].data["data"]["message"]  # type: ignore[index]
    read = await client.get(f"/api/chats/{setup.chat.id}", headers=setup.headers)
    rest_messages = read.json()["messages"]
    assert set(start) == set(done) == MESSAGE_FIELDS
    assert all(set(m) == MESSAGE_FIELDS for m in rest_messages)
    # The same message reads the same in the stream and over REST.
    assert rest_messages == [start, done]
    listed = await client.get("/api/chats", headers=setup.headers)
    sse_stamps = [t for e in events for t in timestamps(e.data)]
    rest_stamps = timestamps(read.json()) + timestamps(listed.json())
    assert len(sse_stamps) == 2
    assert len(rest_stamps) >= 6
    for stamp in sse_stamps + rest_stamps:
        assert TIMESTAMP_Z.match(stamp), stamp
    # Stored in the same format, so an export or a direct reader sees it too.
    assert all(TIMESTAMP_Z.match(m["created_at"]) for m in (await stored(app, setup.chat.id)).messages)


async def test_failed_stream_and_error_log_timestamps_end_in_z(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream?scenario=in_band_error")
    events = data_events(parse_sse((await send(client, setup)).text))
    assert events[-1].type == "error"
    read = (await client.get(f"/api/chats/{setup.chat.id}", headers=setup.headers)).json()
    assert all(set(m) == MESSAGE_FIELDS for m in read["messages"])
    assert read["messages"][1]["error"]["code"] == "upstream_error"
    team = await session.get(Team, setup.user.team_id)
    assert team is not None
    admin = await create_admin(session, team=team)
    logs = (await client.get("/api/error-logs", headers=auth_headers(settings, admin))).json()
    assert len(logs) == 1
    for stamp in timestamps(read) + timestamps(logs):
        assert TIMESTAMP_Z.match(stamp), stamp


async def test_assistant_message_is_stamped_after_the_user_message(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    before = utcnow()
    events = data_events(parse_sse((await send(client, setup)).text))
    user_at = datetime.fromisoformat(events[0].data["data"]["user_message"]["created_at"])  # type: ignore[index]
    done_at = datetime.fromisoformat(events[-1].data["data"]["message"]["created_at"])  # type: ignore[index]
    assert before <= user_at < done_at <= utcnow()
    user_msg, assistant = (await stored(app, setup.chat.id)).messages
    assert datetime.fromisoformat(user_msg["created_at"]) == user_at
    assert datetime.fromisoformat(assistant["created_at"]) == done_at


@pytest.mark.parametrize(
    ("charset", "outcome"),
    [("latin-1", "complete"), ("windows-1252", "complete"), ("x-no-such-charset", "bad_upstream_response")],
)
async def test_answer_in_a_declared_charset_is_stored_as_text(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    charset: str,
    outcome: str,
) -> None:
    url = f"{fake.url}/webhook/agent-stream?scenario=charset&charset={charset}"
    setup = await chat_with_agent(session, settings, url)
    response = await send(client, setup, "café crème")
    assert response.status_code == 200
    events = data_events(parse_sse(response.text))
    assistant = (await stored(app, setup.chat.id)).messages[1]
    if outcome == "complete":
        assert events[-1].type == "done"
        assert assistant["content"] == "Echo: café crème"
        assert assistant["status"] == "complete"
    else:
        assert events[-1].type == "error"
        assert events[-1].data["data"]["code"] == outcome  # type: ignore[index]
        assert assistant["status"] == "error"
        assert [r.code for r in await error_rows(app)] == [outcome]


async def test_send_message_keeps_existing_title(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream", title="Mine")
    assert (await send(client, setup)).status_code == 200
    assert (await stored(app, setup.chat.id)).title == "Mine"


async def test_second_message_sends_history(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    assert (await send(client, setup, "first question")).status_code == 200
    response = await send(client, setup, "second question")
    assert streamed_text(parse_sse(response.text)) == "Echo: second question"
    assert fake.requests[-1]["json"]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Echo: first question"},
        {"role": "user", "content": "second question"},
    ]
    chat = await stored(app, setup.chat.id)
    assert chat.message_count == 4
    assert [m["status"] for m in chat.messages] == ["complete"] * 4


async def test_payload_n8n_receives(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    prior = [
        {"role": "user", "content": "old question", "status": "complete"},
        {"role": "assistant", "content": "", "status": "error"},
        {"role": "assistant", "content": "partial", "status": "interrupted"},
    ]
    setup = await chat_with_agent(
        session,
        settings,
        fake.url + "/webhook/agent-stream",
        webhook_headers={"X-N8N-Key": "top-secret-value"},
        messages=prior,
        message_count=3,
    )
    response = await send(client, setup, "new question")
    start = data_events(parse_sse(response.text))[0].data["data"]  # type: ignore[index]
    received = fake.requests[-1]
    body = received["json"]
    assert received["method"] == "POST"
    assert received["path"] == "/webhook/agent-stream"
    assert received["headers"]["X-N8N-Key"] == "top-secret-value"
    assert body["chatInput"] == "new question"
    assert body["sessionId"] == str(setup.chat.id)
    assert body["system_prompt"] == "be brief"
    assert body["config"] == {"model": "gpt-4"}
    assert body["messages"] == [
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "partial"},
        {"role": "user", "content": "new question"},
    ]
    assert body["metadata"] == {
        "chat_id": str(setup.chat.id),
        "agent_id": str(setup.agent.id),
        "user_id": str(setup.user.id),
        "team_id": str(setup.user.team_id),
        "message_id": start["assistant_message_id"],
    }
    assert "top-secret-value" not in response.text


@pytest.mark.settings(N8N_CONNECT_TIMEOUT=3)
async def test_a_hanging_name_lookup_holds_up_no_other_send(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """Webhook host names are looked up without threads (aiodns). A name lookup in a thread that hangs (a DNS
    server that never answers: up to its resolver timeout) held one of asyncio's few default threads, and
    enough of them (a team's agents on such names) stopped every other team's sends that need a lookup."""
    loop = asyncio.get_running_loop()
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        loop.set_default_executor(pool)
        busy = loop.run_in_executor(None, release.wait, 30)  # the one default thread, held as a hung lookup
        try:
            url = fake.url.replace("127.0.0.1", "localhost") + "/webhook/agent-stream"
            setup = await chat_with_agent(session, settings, url)
            response = await send(client, setup, "hi")
        finally:
            release.set()
            await busy
    assert response.status_code == 200
    assert [event.type for event in data_events(parse_sse(response.text))][-1] == "done"


async def test_a_configured_accept_header_replaces_the_relays_own(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """An admin's `Accept` (any case) is the one n8n gets: never two Accept lines, the relay's dropped."""
    setup = await chat_with_agent(
        session, settings, fake.url + "/webhook/agent-stream", webhook_headers={"accept": "application/json"}
    )
    response = await send(client, setup, "hi")
    assert response.status_code == 200
    sent = [value for name, value in fake.requests[-1]["header_lines"] if name.lower() == "accept"]
    assert sent == ["application/json"]
    # Without one, the relay's own list of the formats it reads.
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    await send(client, setup, "hi")
    sent = [value for name, value in fake.requests[-1]["header_lines"] if name.lower() == "accept"]
    assert sent == [ACCEPT]


def test_history_budget_keeps_newest(database_url: str, tmp_path: Path) -> None:
    small = make_settings(database_url, tmp_path, N8N_HISTORY_MAX_MESSAGES=3, N8N_HISTORY_MAX_BYTES=1024)
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}", "status": "complete"} for i in range(6)
    ]
    assert build_history(messages, "new", small) == [
        {"role": "user", "content": "m4"},
        {"role": "assistant", "content": "m5"},
        {"role": "user", "content": "new"},
    ]
    big = [{"role": "user", "content": "x" * 800, "status": "complete"}, {"role": "assistant", "content": "y" * 200}]
    big[1]["status"] = "complete"
    assert build_history(big, "z" * 100, small) == [
        {"role": "assistant", "content": "y" * 200},
        {"role": "user", "content": "z" * 100},
    ]


# --- failures before the stream: plain JSON, nothing changes -------------------------------------


async def test_send_message_without_auth_is_401(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    response = await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"})
    assert response.status_code == 401
    assert (await stored(app, setup.chat.id)).messages == []
    assert fake.requests == []


@pytest.mark.parametrize(
    "case",
    ["revoked token", "revoked family", "deactivated user", "tokens_valid_after", "unknown user", "other team"],
)
async def test_send_message_refuses_a_token_that_is_no_longer_valid(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n, case: str
) -> None:
    """The send route checks the user and the revocations in its own (transaction-less) query: same rules."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    family = uuid.uuid4().hex
    user_id, team_id = setup.user.id, setup.user.team_id
    if case == "unknown user":
        user_id = uuid.uuid4()
    elif case == "other team":
        team_id = (await create_user(session)).team_id
    issued = create_token(
        settings=settings, user_id=user_id, team_id=team_id, token_type="access", extra={"fam": family}
    )
    headers = {"Authorization": f"Bearer {issued.token}"}
    if case == "revoked token":
        await app_state(app).revocations.revoke(issued.jti, issued.expires_at)
    elif case == "revoked family":
        await app_state(app).revocations.revoke(family_key(family), issued.expires_at)
    elif case in ("deactivated user", "tokens_valid_after"):
        assert (await client.get(f"/api/chats/{setup.chat.id}", headers=headers)).status_code == 200
        async with app_state(app).db.sessionmaker() as s:
            user = await s.get(User, setup.user.id)
            assert user is not None
            if case == "deactivated user":
                user.is_active = False
            else:
                user.tokens_valid_after = utcnow() + timedelta(seconds=1)
            await s.commit()
    response = await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "Could not validate credentials"}
    assert (await stored(app, setup.chat.id)).messages == []
    assert fake.requests == []


async def test_send_message_to_other_users_chat_is_404_like_random_id(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    stranger = await create_user(session)
    foreign = await client.post(
        f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=auth_headers(settings, stranger)
    )
    missing = await client.post(
        f"/api/chats/{uuid.uuid4()}/messages", json={"content": "hi"}, headers=auth_headers(settings, stranger)
    )
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == missing.json() == {"detail": "Chat not found"}
    assert (await stored(app, setup.chat.id)).messages == []
    assert fake.requests == []


async def test_send_message_to_a_teammates_chat_is_404_and_stores_nothing(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A chat of the caller's own team but of another user: the agent's team matches, so only the owner check
    of the one-statement start (app.services.fast_start) refuses it. A stranger of another team never reached
    that check (the agent join refused them first)."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    team = await session.get(Team, setup.user.team_id)
    assert team is not None
    teammate = await create_user(session, team=team)
    response = await client.post(
        f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=auth_headers(settings, teammate)
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "Chat not found"}
    assert (await stored(app, setup.chat.id)).messages == []
    assert fake.requests == []


@pytest.mark.parametrize("kind", ["plain", "edit"])
async def test_the_question_is_stored_before_n8n_is_called(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """The question and the answer's placeholder are committed before the webhook is called (a plain send's one
    statement, an edit's general path): read on another connection as the call starts, they are there, so an
    instance lost during the call loses no question."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    body: dict[str, Any] = {"content": "the question"}
    if kind == "edit":
        assert (await send(client, setup, "a first draft")).status_code == 200
        draft = (await stored(app, setup.chat.id)).messages[0]
        body["edit_of"] = draft["id"]
    streamer = app_state(app).generations.streamer
    real_run = streamer.run
    seen: list[list[tuple[str, str, str]]] = []

    async def watched(**kwargs: Any) -> None:
        branch = (await stored(app, setup.chat.id)).messages
        seen.append([(m["role"], m["content"], m["status"]) for m in branch])
        await real_run(**kwargs)

    monkeypatch.setattr(streamer, "run", watched)
    response = await client.post(f"/api/chats/{setup.chat.id}/messages", json=body, headers=setup.headers)
    assert response.status_code == 200
    assert data_events(parse_sse(response.text))[-1].type == "done"
    assert seen == [[("user", "the question", "complete"), ("assistant", "", "streaming")]]


@pytest.mark.parametrize(
    "body",
    [
        {"content": ""},
        {"content": "  \n\t "},
        {"content": "x" * 101},
        {"content": "nul \x00 inside"},
        {"content": 42},
        {"content": None},
        {},
        {"x": 1},
        {"content": "ok", "extra": 1},
    ],
)
async def test_send_message_invalid_content_is_422(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, body: dict[str, Any]
) -> None:
    settings = make_settings(database_url, tmp_path, MESSAGE_MAX_CHARS=100)
    application = create_app(settings)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://t") as c:
            setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
            response = await c.post(f"/api/chats/{setup.chat.id}/messages", json=body, headers=setup.headers)
            ok = await c.post(
                f"/api/chats/{setup.chat.id}/messages", json={"content": "x" * 100}, headers=setup.headers
            )
    finally:
        await shutdown(application)
    assert response.status_code == 422
    assert '"input"' not in response.text
    assert "x" * 50 not in response.text
    assert ok.status_code == 200
    assert len(fake.requests) == 1


async def test_send_message_with_inactive_agent_is_409(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    setup.agent.is_active = False
    await session.commit()
    response = await send(client, setup)
    assert response.status_code == 409
    assert response.json() == {"detail": "This chat's agent is no longer active"}
    assert (await stored(app, setup.chat.id)).messages == []
    assert fake.requests == []


async def test_send_message_while_generation_runs_is_409(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    running = [
        {
            "id": str(uuid.uuid4()),
            "role": "assistant",
            "content": "",
            "status": "streaming",
            "created_at": "2026-01-01T00:00:00Z",
        }
    ]
    setup = await chat_with_agent(
        session, settings, fake.url + "/webhook/agent-stream", messages=running, message_count=1
    )
    response = await send(client, setup)
    assert response.status_code == 409
    assert response.json() == {"detail": "A generation is already running in this chat"}
    chat = await stored(app, setup.chat.id)
    assert chat.messages == running
    assert chat.message_count == 1


async def test_concurrent_sends_give_one_200_and_409s(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    # The answer lasts ~1 s: at 20 ms a token it ended within ~60 ms, and on a loaded machine the last of the six
    # sends could come after it (a second 200).
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream?scenario=slow&delay_ms=300")
    responses = await asyncio.gather(*(send(client, setup, f"message {i}") for i in range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 5
    chat = await stored(app, setup.chat.id)
    assert chat.message_count == 2
    assert len(chat.messages) == 2
    assert [m["status"] for m in chat.messages] == ["complete", "complete"]
    assert len(fake.requests) == 1


# --- outcomes: every capture, through the API ----------------------------------------------------

CAPTURE_OUTCOMES: dict[str, tuple[str, str, str | None]] = {
    "stream_ok": ("Echo: hello there", "complete", None),
    "stream_messages_only": ("Echo: second question", "complete", None),
    "chat_stream_send1": ("Echo: hello there", "complete", None),
    "chat_stream_send2": ("Echo: second message", "complete", None),
    "chat_stream_send": ("Echo: hello there", "complete", None),
    "stream_slow": ("Echo: slow tokens please [delay=400]", "complete", None),
    "json_ok": ("Echo: hello there", "complete", None),
    "json_respond_node_ok": ("Echo: hello there", "complete", None),
    "chat_lastnode_send": ("Echo: hello there", "complete", None),
    "stream_llm_error": ("", "error", "upstream_error"),
    "chat_stream_llm_error": ("", "error", "upstream_error"),
    "chat_stream_no_session": ("", "error", "upstream_error"),
    "stream_code_error": ("", "error", "upstream_error"),
    "stream_agent_streaming_off": ("", "error", "empty_response"),
    "json_respond_node_llm_error": ("", "error", "empty_response"),
    "json_llm_error": ("", "error", "upstream_error"),
    "json_code_error": ("", "error", "upstream_error"),
    "chat_lastnode_llm_error": ("", "error", "upstream_error"),
    "notfound_post": ("", "error", "upstream_error"),
    "test_url_not_listening": ("", "error", "upstream_error"),
    "wrong_method_get": ("", "error", "upstream_error"),
    "stream_invalid_json_body": ("", "error", "upstream_error"),
    "chat_stream_load": ("", "error", "bad_upstream_response"),
    "chat_lastnode_load": ("", "error", "bad_upstream_response"),
    "chat_stream_load_unknown": ("", "error", "bad_upstream_response"),
    "chat_cors_post": ("", "error", "bad_upstream_response"),
    "chat_cors_preflight": ("", "error", "empty_response"),
}


def test_every_capture_is_covered() -> None:
    assert set(CAPTURE_OUTCOMES) == set(CAPTURES)


@pytest.mark.parametrize("name", sorted(CAPTURE_OUTCOMES))
async def test_capture_relayed_and_stored(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n, name: str
) -> None:
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/does-not-exist?scenario={name}&speed=50")
    response = await send(client, setup)
    assert response.status_code == 200
    events = data_events(parse_sse(response.text))
    text, status, code = CAPTURE_OUTCOMES[name]
    terminal = [e for e in events if e.type in ("done", "error")]
    assert len(terminal) == 1
    assert terminal[0] is events[-1]
    assert streamed_text(events) == text
    assistant = (await stored(app, setup.chat.id)).messages[1]
    assert assistant["content"] == text
    assert assistant["status"] == status
    rows = await error_rows(app)
    if code is None:
        assert terminal[0].type == "done"
        assert rows == []
        return
    assert terminal[0].type == "error"
    data = terminal[0].data["data"]  # type: ignore[index]
    assert set(data) == {"message", "code"}
    assert data["code"] == code
    assert assistant["error"] == data
    assert len(rows) == 1
    row = rows[0]
    assert (row.code, row.message) == (code, data["message"])
    assert (row.chat_id, row.agent_id, row.user_id, row.team_id) == (
        setup.chat.id,
        setup.agent.id,
        setup.user.id,
        setup.user.team_id,
    )
    assert row.upstream_status == CAPTURES[name].status
    # n8n's raw body never reaches the client.
    assert "Error in workflow" not in response.text
    assert "hint" not in response.text
    assert "Fake upstream failure" not in response.text


async def test_not_registered_404_hint_goes_to_error_log(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/does-not-exist")
    response = await send(client, setup)
    error = data_events(parse_sse(response.text))[-1].data["data"]  # type: ignore[index]
    assert error["code"] == "upstream_error"
    assert "not registered" in error["message"]
    (row,) = await error_rows(app)
    assert row.upstream_status == 404
    assert "not registered" in row.detail["n8n_message"]
    assert "activate the workflow" in row.detail["n8n_hint"]


async def test_a_rate_limited_agents_retry_after_is_in_the_error_event(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """n8n (or a proxy in front of it) answers 429 with Retry-After: the terminal event says how long to wait;
    the stored error stays `message` and `code` (a wait counted from then would be stale when read later)."""
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/x?scenario=status&status=429&retry_after=30")
    response = await send(client, setup)
    assert response.status_code == 200
    terminal = data_events(parse_sse(response.text))[-1]
    assert terminal.type == "error"
    assert terminal.data["data"] == {  # type: ignore[index]
        "message": "The agent answered with an error (HTTP 429)",
        "code": "upstream_error",
        "retry_after": 30,
    }
    assistant = (await stored(app, setup.chat.id)).messages[1]
    assert assistant["error"] == {"message": "The agent answered with an error (HTTP 429)", "code": "upstream_error"}
    (row,) = await error_rows(app)
    assert (row.code, row.upstream_status, row.detail["retry_after"]) == ("upstream_error", 429, 30)
    # A follower of the ended answer gets the same event, under the same id.
    followed = await client.get(
        f"/api/chats/{setup.chat.id}/stream",
        params={"assistant_message_id": assistant["id"]},
        headers={**setup.headers, "Last-Event-ID": str(int(terminal.id) - 1)},  # type: ignore[arg-type]
    )
    assert followed.status_code == 200
    (again,) = data_events(parse_sse(followed.text))
    assert (again.id, again.data) == (terminal.id, terminal.data)


@pytest.mark.parametrize("retry_after", ["soon", "-1", None])
async def test_a_rate_limit_without_a_usable_retry_after_is_the_plain_error_event(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n, retry_after: str | None
) -> None:
    query = "" if retry_after is None else f"&retry_after={retry_after}"
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/x?scenario=status&status=429{query}")
    terminal = data_events(parse_sse((await send(client, setup)).text))[-1]
    assert terminal.data == {
        "type": "error",
        "data": {"message": "The agent answered with an error (HTTP 429)", "code": "upstream_error"},
    }


@pytest.mark.parametrize(
    ("scenario", "code", "partial"),
    [
        ("stall&hang=3", "upstream_timeout", "Echo: hello"),
        ("hang_headers&hang=3", "upstream_timeout", ""),
        ("reset", "upstream_disconnected", "Echo: hello"),
        ("malformed", "bad_upstream_response", "Echo: hello"),
        ("oversized&size=300000", "bad_upstream_response", "Echo: hello"),
        ("in_band_error", "upstream_error", "Echo: hello"),
    ],
)
async def test_fault_keeps_partial_text_with_status_error(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, scenario: str, code: str, partial: str
) -> None:
    settings = make_settings(
        database_url, tmp_path, N8N_READ_TIMEOUT=0.4, N8N_FIRST_BYTE_TIMEOUT=0.4, N8N_MAX_LINE_BYTES=100_000
    )
    application = create_app(settings)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://t") as c:
            setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario={scenario}")
            response = await c.post(
                f"/api/chats/{setup.chat.id}/messages", json={"content": "hello there"}, headers=setup.headers
            )
        events = data_events(parse_sse(response.text))
        assert streamed_text(events) == partial
        assert events[-1].type == "error"
        assert events[-1].data["data"]["code"] == code  # type: ignore[index]
        assert [e.type for e in events].count("error") == 1
        assistant = (await stored(application, setup.chat.id)).messages[1]
        assert (assistant["content"], assistant["status"], assistant["error"]["code"]) == (partial, "error", code)
        rows = await error_rows(application)
        assert [r.code for r in rows] == [code]
        assert app_state(application).generations.running == {}
    finally:
        await shutdown(application)


async def test_unreachable_agent_is_fast(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    from tests.live import free_port

    setup = await chat_with_agent(session, settings, f"http://127.0.0.1:{free_port()}/webhook/x")
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await send(client, setup)
    assert loop.time() - started < 1
    assert data_events(parse_sse(response.text))[-1].data["data"]["code"] == "upstream_unreachable"  # type: ignore[index]
    assert await count_rows(session, "error_logs") == 1


async def test_policy_refusal_at_send_is_upstream_blocked(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = make_settings(database_url, tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False)
    application = create_app(settings)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://t") as c:
            setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream")
            response = await c.post(
                f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers
            )
        error = data_events(parse_sse(response.text))[-1].data["data"]  # type: ignore[index]
        assert error["code"] == "upstream_blocked"
        assert fake.requests == []
        rows = await error_rows(application)
        assert [r.code for r in rows] == ["upstream_blocked"]
    finally:
        await shutdown(application)


async def test_undecryptable_headers_fail_cleanly(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream")
    setup.agent.webhook_headers_encrypted = "not-a-fernet-token"
    await session.commit()
    response = await send(client, setup)
    error = data_events(parse_sse(response.text))[-1].data["data"]  # type: ignore[index]
    assert error["code"] == "agent_misconfigured"
    assert fake.requests == []
    assert (await stored(app, setup.chat.id)).messages[1]["status"] == "error"


# --- the embedded SQLite database ----------------------------------------------------------------


async def test_send_path_gives_its_pooled_connection_back_transactional(
    database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """The send route's session runs without BEGIN; the one pooled connection must come back to the pool
    in its normal mode, so the next session's rollback still undoes its writes."""
    settings = make_settings(database_url, tmp_path, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)
    application = create_app(settings)
    try:
        async with app_state(application).db.sessionmaker() as s:
            setup = await chat_with_agent(s, settings, f"{fake.url}/webhook/agent-stream")
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.post(
                f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers
            )
        assert data_events(parse_sse(response.text))[-1].type == "done"
        async with app_state(application).db.sessionmaker() as s:
            await s.execute(text("UPDATE chats SET title = 'rolled back' WHERE id = :id"), {"id": setup.chat.id})
            await s.rollback()
        assert (await stored(application, setup.chat.id)).title != "rolled back"
    finally:
        await shutdown(application)


async def test_send_message_on_sqlite(tmp_path: Path, fake: FakeN8n) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    await asyncio.to_thread(run_migrations, url)
    settings = make_settings(url, tmp_path)
    application = create_app(settings)
    try:
        async with app_state(application).db.sessionmaker() as s:
            setup = await chat_with_agent(s, settings, f"{fake.url}/webhook/agent-stream", title=None)
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            url_ = f"/api/chats/{setup.chat.id}/messages"
            first, second = await asyncio.gather(
                c.post(url_, json={"content": "hello there"}, headers=setup.headers),
                c.post(url_, json={"content": "hello there"}, headers=setup.headers),
            )
            assert sorted([first.status_code, second.status_code]) == [200, 409]
            again = await c.post(url_, json={"content": "and again"}, headers=setup.headers)
            failing = await c.post(url_, json={"content": "__llm_error__"}, headers=setup.headers)
            issued = create_token(
                settings=settings, user_id=setup.user.id, team_id=setup.user.team_id, token_type="access"
            )
            await app_state(application).revocations.revoke(issued.jti, issued.expires_at)
            revoked = await c.post(url_, json={"content": "x"}, headers={"Authorization": f"Bearer {issued.token}"})
        assert revoked.status_code == 401
        assert streamed_text(parse_sse(again.text)) == "Echo: and again"
        assert data_events(parse_sse(failing.text))[-1].type == "error"
        chat = await stored(application, setup.chat.id)
        assert chat.title == "hello there"
        assert chat.message_count == 6
        assert [m["status"] for m in chat.messages] == ["complete"] * 5 + ["error"]
        assert chat.messages[3]["content"] == "Echo: and again"
        assert len(await error_rows(application)) == 1
    finally:
        await shutdown(application)


async def test_send_message_during_shutdown_is_503(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    await app_state(app).generations.shutdown()
    response = await send(client, setup)
    assert response.status_code == 503
    assert (await stored(app, setup.chat.id)).messages == []
    assert fake.requests == []


async def test_openapi_documents_stream_and_error_logs(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    send_op = spec["paths"]["/api/chats/{chat_id}/messages"]["post"]
    assert "text/event-stream" in send_op["responses"]["200"]["content"]
    assert {"401", "404", "409", "422"} <= set(send_op["responses"])
    assert send_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("MessageCreate")
    logs_op = spec["paths"]["/api/error-logs"]["get"]
    assert {p["name"] for p in logs_op["parameters"]} == {"limit", "offset"}


async def test_nul_characters_from_n8n_are_stored_as_replacement(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=nul")
    response = await send(client, setup)
    events = data_events(parse_sse(response.text))
    assert streamed_text(events) == "a\ufffdb ? lone surrogate"
    assert events[-1].data["data"]["code"] == "upstream_error"  # type: ignore[index]
    assistant = (await stored(app, setup.chat.id)).messages[1]
    assert (assistant["content"], assistant["status"]) == ("a\ufffdb ? lone surrogate", "error")
    (row,) = await error_rows(app)
    assert row.detail["n8n_error"] == "bad"


async def test_send_message_with_lone_surrogate_is_422(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream")
    response = await client.post(
        f"/api/chats/{setup.chat.id}/messages",
        content=b'{"content": "lone \\ud800 surrogate"}',
        headers={**setup.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert (await stored(app, setup.chat.id)).messages == []
    assert fake.requests == []


# --- what n8n may answer: review of 2026-12-07 ----------------------------------------------------


async def answered(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    url: str,
    content: str = "hello there",
) -> tuple[list[SSE], dict[str, Any]]:
    """One send in a new chat whose agent is `url`: the stream's events and the answer as stored."""
    setup = await chat_with_agent(session, settings, url)
    events = data_events(parse_sse((await send(client, setup, content)).text))
    _question, answer = (await stored(app, setup.chat.id)).messages
    return events, answer


async def test_a_plain_text_answer_that_is_also_json_is_the_answer(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """Respond to Webhook with the text `42` was refused ("has no text"): JSON that holds no text is text."""
    events, answer = await answered(
        app, client, session, settings, raw_answer(fake.url, b"42", "text/plain; charset=utf-8"), "What is 6 times 7?"
    )
    assert events[-1].type == "done"
    assert streamed_text(events) == answer["content"] == "42"


async def test_a_surrogate_pair_cut_between_two_items_is_streamed_and_stored_whole(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    body = b'{"type":"begin"}\n{"type":"item","content":"Party \\ud83c"}\n{"type":"item","content":"\\udf89!"}\n'
    events, answer = await answered(app, client, session, settings, raw_answer(fake.url, body + b'{"type":"end"}\n'))
    assert events[-1].type == "done"
    assert streamed_text(events) == answer["content"] == "Party \U0001f389!"


async def test_a_deeply_nested_line_ends_the_answer_with_its_text_kept(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """RecursionError escaped the parser: the text of the same read was lost, and the code was internal_error."""
    nested = b"[" * 5000 + b"]" * 5000
    body = b'{"type":"begin"}\n{"type":"item","content":"Hi"}\n{"type":"item","content":"x","m":' + nested + b"}\n"
    events, answer = await answered(app, client, session, settings, raw_answer(fake.url, body))
    assert (events[-1].type, events[-1].data["data"]["code"]) == ("error", "bad_upstream_response")  # type: ignore[index]
    assert streamed_text(events) == answer["content"] == "Hi"


async def test_an_error_status_with_a_deeply_nested_body_is_an_upstream_error(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, raw_answer(fake.url, b'{"message":' + b"[" * 3000, status=502))
    events = data_events(parse_sse((await send(client, setup)).text))
    assert (events[-1].type, events[-1].data["data"]["code"]) == ("error", "upstream_error")  # type: ignore[index]


async def test_a_bug_in_the_relay_still_ends_the_stream_and_stores_the_answer(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception that is no upstream failure (a bug, app.streaming lets it through) still gives the client
    a terminal `error` event and stores the answer as `error`, not a stream that never ends and a row left
    `streaming` until recovery."""
    streamer = app_state(app).generations.streamer

    async def broken(**_kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(streamer, "run", broken)
    events, answer = await asyncio.wait_for(
        answered(app, client, session, settings, fake.url + "/webhook/agent-stream"), 10
    )
    assert (events[-1].type, events[-1].data["data"]["code"]) == ("error", "internal_error")  # type: ignore[index]
    assert answer["status"] == "error"
    assert answer["error"]["code"] == "internal_error"


async def test_the_usage_of_two_streaming_nodes_is_stored_summed(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    def block(text: str, tokens_in: int, tokens_out: int) -> bytes:
        end = {"type": "end", "metadata": {"usage": {"input_tokens": tokens_in, "output_tokens": tokens_out}}}
        return (
            b'{"type":"begin"}\n'
            + json.dumps({"type": "item", "content": text}).encode()
            + b"\n"
            + json.dumps(end).encode()
            + b"\n"
        )

    events, answer = await answered(
        app, client, session, settings, raw_answer(fake.url, block("a", 1, 2) + block("b", 10, 20))
    )
    assert events[-1].type == "done"
    assert (answer["metadata"]["tokens_in"], answer["metadata"]["tokens_out"]) == (11, 22)
