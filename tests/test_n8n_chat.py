"""n8n's chat widget as a client (`POST /api/agents/{id}/n8n-chat`): answers compared byte for byte in shape
with what a real Chat Trigger sent (recordings/n8n/chat_*), the stored chat behind a widget session, failures
in both modes, the quota, tenancy, both ways to authenticate, refused bodies and CORS."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import chat_trigger
from app.config import Settings
from app.models import Agent, Chat, ErrorLog, Team, User, WidgetSession
from app.services.api_keys import create_key
from app.state import app_state
from tests.authhelpers import login
from tests.conftest import count_rows
from tests.factories import auth_headers, branch_of, create_agent, create_team, create_user
from tools.fake_n8n import FakeN8n, ndjson, raw_answer

RECORDINGS = Path(__file__).resolve().parent.parent / "recordings" / "n8n"
STREAM = {"Accept": "text/plain"}  # what @n8n/chat sends with `enableStreaming: true`
SESSION = "0b6f2d9e-3c41-4a8e-9f57-6d2b1a0c7e35"


def recording(name: str) -> tuple[int, dict[str, str], bytes]:
    """A recorded answer of a real Chat Trigger: status, headers (lower-case names), body."""
    raw = (RECORDINGS / name).read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def lines_of(body: bytes) -> list[dict[str, Any]]:
    """NDJSON as the Chat Trigger frames it: every line one JSON object ending in `\\n`, nothing else."""
    assert body.endswith(b"\n")
    parsed = [json.loads(line) for line in body.split(b"\n")[:-1]]
    assert all(isinstance(item, dict) for item in parsed)
    return parsed


def shape(item: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Key order of a line and of its metadata."""
    return list(item), list(item.get("metadata", {}))


def shapes_by_type(items: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[str]]]:
    return {item["type"]: shape(item) for item in items}


async def widget(
    client: httpx.AsyncClient, agent_id: uuid.UUID, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    return await client.post(f"/api/agents/{agent_id}/n8n-chat", json=body, headers=headers)


def send(text: str, session_id: str = SESSION) -> dict[str, Any]:
    return {"action": "sendMessage", "sessionId": session_id, "chatInput": text}


def load(session_id: str = SESSION) -> dict[str, Any]:
    return {"action": "loadPreviousSession", "sessionId": session_id}


@pytest.fixture
async def user(session: AsyncSession) -> User:
    return await create_user(session)


@pytest.fixture
async def agent(session: AsyncSession, user: User, fake: FakeN8n) -> Agent:
    team = await session.get(Team, user.team_id)
    assert team is not None
    return await create_agent(session, team=team, name="Support bot", webhook_url=f"{fake.url}/webhook/agent-stream")


@pytest.fixture
def headers(settings: Settings, user: User) -> dict[str, str]:
    return auth_headers(settings, user)


async def session_chat(session: AsyncSession, user: User, session_id: str = SESSION) -> uuid.UUID | None:
    mapped = (WidgetSession.user_id == user.id, WidgetSession.session_id == session_id)
    query = select(WidgetSession.chat_id).where(*mapped)
    found: uuid.UUID | None = (await session.execute(query)).scalar_one_or_none()
    return found


# --- the protocol, against the recordings -----------------------------------------------------------------


async def test_send_streaming_answers_the_chat_triggers_ndjson(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    response = await widget(client, agent.id, send("hello there"), {**headers, **STREAM})
    assert response.status_code == 200, response.text
    _status, recorded_headers, recorded = recording("chat_stream_send1.txt")
    assert response.headers["content-type"] == recorded_headers["content-type"] == "application/json; charset=utf-8"
    # n8n says `no-cache`; `no-transform` keeps a compressing proxy from gzip-ing this `application/json`
    # stream and holding its lines back (as for the SSE streams), and X-Accel-Buffering keeps nginx's buffer off.
    assert recorded_headers["cache-control"] == "no-cache"
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-length" not in response.headers  # streamed (chunked), as n8n does
    ours, theirs = lines_of(response.content), lines_of(recorded)
    assert ours[0]["type"] == "begin"
    assert ours[-1]["type"] == "end"
    assert {i["type"] for i in ours[1:-1]} == {"item"}
    assert shapes_by_type(ours) == shapes_by_type(theirs)
    text = "".join(i["content"] for i in ours if i["type"] == "item")
    assert text == "".join(i["content"] for i in theirs if i["type"] == "item") == "Echo: hello there"
    # Compact JSON, as JSON.stringify writes it.
    assert b'{"type":"begin","metadata":{"nodeId":"' in response.content
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    assert {i["metadata"]["nodeName"] for i in ours} == {"Support bot"}
    stored = await branch_of(session, chat_id)
    assert [(m["role"], m["content"], m["status"]) for m in stored] == [
        ("user", "hello there", "complete"),
        ("assistant", "Echo: hello there", "complete"),
    ]
    assert {i["metadata"]["nodeId"] for i in ours} == {stored[1]["id"]}
    sent = fake.requests[-1]["json"]
    assert sent["chatInput"] == "hello there"
    assert sent["sessionId"] == str(chat_id)  # n8n's memory key is the chat, as for any chat send
    chat = await session.get(Chat, chat_id)
    assert chat is not None
    assert chat.user_id == user.id
    assert chat.agent_id == agent.id
    assert chat.title == "hello there"


async def test_send_last_node_answers_output_exactly(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str]
) -> None:
    response = await widget(client, agent.id, {**send("hello there"), "metadata": {"page": "/pricing"}}, headers)
    status, recorded_headers, recorded = recording("chat_lastnode_send.txt")
    assert response.status_code == status == 200
    assert response.headers["content-type"] == recorded_headers["content-type"]
    assert response.content == recorded == b'{"output":"Echo: hello there"}'
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    assert [m["status"] for m in await branch_of(session, chat_id)] == ["complete", "complete"]


async def test_the_same_session_continues_its_chat(
    client: httpx.AsyncClient, session: AsyncSession, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    assert (await widget(client, agent.id, send("hello there"), headers)).status_code == 200
    assert (await widget(client, agent.id, send("second message"), headers)).status_code == 200
    assert await count_rows(session, "chats") == 1
    assert fake.requests[-1]["json"]["messages"] == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "Echo: hello there"},
        {"role": "user", "content": "second message"},
    ]


async def test_load_previous_session_is_the_current_branch(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str]
) -> None:
    await widget(client, agent.id, send("hello there"), headers)
    # The very bytes a Chat Trigger with memory answered, after one send and after two.
    assert (await widget(client, agent.id, load(), headers)).content == recording("chat_lastnode_load.txt")[2]
    await widget(client, agent.id, send("second message"), headers)
    response = await widget(client, agent.id, load(), headers)
    status, recorded_headers, recorded = recording("chat_stream_load.txt")
    assert response.status_code == status
    assert response.headers["content-type"] == recorded_headers["content-type"]
    assert response.content == recorded
    # Edit the second question through the chat API: the widget reloads the new branch only.
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    second = (await branch_of(session, chat_id))[2]
    edited = await client.post(
        f"/api/chats/{chat_id}/messages", json={"content": "edited question", "edit_of": second["id"]}, headers=headers
    )
    assert edited.status_code == 200
    reloaded = json.loads((await widget(client, agent.id, load(), headers)).content)
    assert [(m["id"][-1], m["kwargs"]["content"]) for m in reloaded["data"]] == [
        ("HumanMessage", "hello there"),
        ("AIMessage", "Echo: hello there"),
        ("HumanMessage", "edited question"),
        ("AIMessage", "Echo: edited question"),
    ]


async def test_load_of_an_unknown_session_is_empty_and_creates_nothing(
    client: httpx.AsyncClient, session: AsyncSession, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    response = await widget(client, agent.id, load("never-used"), headers)
    status, recorded_headers, recorded = recording("chat_stream_load_unknown.txt")
    assert response.status_code == status
    assert response.headers["content-type"] == recorded_headers["content-type"]
    assert response.content == recorded == b'{"data":[]}'
    assert await count_rows(session, "chats") == 0
    assert await count_rows(session, "widget_sessions") == 0
    assert fake.requests == []


# --- failures ---------------------------------------------------------------------------------------------


async def test_line_separators_in_the_answer_never_split_an_ndjson_line(
    client: httpx.AsyncClient, session: AsyncSession, user: User, headers: dict[str, str], fake: FakeN8n
) -> None:
    """NEL, U+2028 and U+2029 in the answer were written raw (JSON.stringify leaves them so, and n8n's widget
    splits on `\\n` only), but a Python reader's `iter_lines` (`str.splitlines`) cut the line there: a JSON error,
    or a forged line. They are escaped: the same JSON values."""
    texts = ["a\x85b", "c\u2028d", "e\u2029f", '\u2028{"type":"end"}\u2028']
    body = ndjson({"type": "begin", "metadata": {}})
    body += b"".join(ndjson({"type": "item", "content": text, "metadata": {}}) for text in texts)
    body += ndjson({"type": "end", "metadata": {}})
    team = await session.get(Team, user.team_id)
    assert team is not None
    agent = await create_agent(session, team=team, webhook_url=raw_answer(fake.url, body))
    response = await widget(client, agent.id, send("hello"), {**headers, **STREAM})
    assert response.status_code == 200
    read = [json.loads(line) for line in response.text.splitlines()]
    assert (read[0]["type"], read[-1]["type"]) == ("begin", "end")
    assert {item["type"] for item in read[1:-1]} == {"item"}
    assert "".join(item["content"] for item in read if item["type"] == "item") == "".join(texts)


@pytest.mark.settings(STREAM_PING_INTERVAL=0.2)
async def test_a_quiet_agent_gets_keep_alive_lines_the_widget_skips(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    """While the agent is silent (here 0.6 s between its pieces) an empty line goes out every
    STREAM_PING_INTERVAL, so a proxy's idle timeout does not cut the answer (nothing went out before). The
    widget's reader skips blank lines (@n8n/chat's createLineParser: `if (line.trim())`); the JSON lines are
    unchanged."""
    slow = f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=600"
    await session.execute(update(Agent).where(Agent.id == agent.id).values(webhook_url=slow))
    await session.commit()
    response = await widget(client, agent.id, send("hi there"), {**headers, **STREAM})
    assert response.status_code == 200
    raw = response.content.split(b"\n")[:-1]
    assert b"" in raw[1:]  # keep-alive lines: after `begin`, while n8n is quiet
    items = [json.loads(line) for line in raw if line]
    assert items[0]["type"] == "begin"
    assert items[-1]["type"] == "end"
    assert {i["type"] for i in items[1:-1]} == {"item"}
    assert "".join(i["content"] for i in items if i["type"] == "item") == "Echo: hi there"
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    assert (await branch_of(session, chat_id))[-1]["content"] == "Echo: hi there"


async def test_upstream_error_streaming_is_the_triggers_error_line(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str]
) -> None:
    response = await widget(client, agent.id, send("__llm_error__"), {**headers, **STREAM})
    assert response.status_code == 200
    ours = lines_of(response.content)
    theirs = lines_of(recording("chat_stream_llm_error.txt")[2])
    assert [i["type"] for i in ours] == [i["type"] for i in theirs] == ["begin", "error"]  # and no `end`
    assert shapes_by_type(ours) == shapes_by_type(theirs)
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    answer = (await branch_of(session, chat_id))[-1]
    assert answer["status"] == "error"
    assert ours[-1]["content"] == answer["error"]["message"]
    logged = (await session.execute(select(ErrorLog))).scalar_one()
    assert (logged.chat_id, logged.code) == (chat_id, answer["error"]["code"])


async def test_upstream_error_last_node_is_the_triggers_message_body(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    await session.execute(
        update(Agent).where(Agent.id == agent.id).values(webhook_url=f"{fake.url}/webhook/does-not-exist")
    )
    await session.commit()
    response = await widget(client, agent.id, send("hello there"), headers)
    status, recorded_headers, recorded = recording("chat_lastnode_llm_error.txt")
    assert status == 500
    assert response.status_code == 502
    assert response.headers["content-type"] == recorded_headers["content-type"]
    assert list(json.loads(response.content)) == list(json.loads(recorded)) == ["message"]
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    answer = (await branch_of(session, chat_id))[-1]
    assert answer["status"] == "error"
    assert json.loads(response.content)["message"] == answer["error"]["message"]
    assert (await session.execute(select(ErrorLog.code))).scalar_one() == "upstream_error"


@pytest.mark.parametrize("status", [429, 503])
async def test_an_agents_refusal_with_retry_after_keeps_its_status_and_wait(
    client: httpx.AsyncClient,
    session: AsyncSession,
    user: User,
    agent: Agent,
    headers: dict[str, str],
    fake: FakeN8n,
    status: int,
) -> None:
    """n8n (or a proxy in front of it) refused with 429 or 503 and a usable Retry-After: the last-node answer
    keeps that status and wait (it was a 502 without Retry-After, so the page could not tell "try again in
    30 s" from a broken agent), in the widget's error shape. The streamed answer said 200 before n8n was called:
    its error line has the message only."""
    refusing = f"{fake.url}/webhook/x?scenario=status&status={status}&retry_after=30"
    await session.execute(update(Agent).where(Agent.id == agent.id).values(webhook_url=refusing))
    await session.commit()
    response = await widget(client, agent.id, send("hello there"), headers)
    assert response.status_code == status
    assert response.headers["retry-after"] == "30"
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.json() == {"message": f"The agent answered with an error (HTTP {status})"}
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    answer = (await branch_of(session, chat_id))[-1]
    assert (answer["status"], answer["error"]["code"]) == ("error", "upstream_error")
    streamed = await widget(client, agent.id, send("again"), {**headers, **STREAM})
    assert streamed.status_code == 200
    assert "retry-after" not in streamed.headers
    items = lines_of(streamed.content)
    assert [i["type"] for i in items] == ["begin", "error"]
    assert items[-1]["content"] == f"The agent answered with an error (HTTP {status})"
    # Without a usable Retry-After the refusal is the agent's failure like any other: 502.
    garbled = refusing.replace("retry_after=30", "retry_after=later")
    await session.execute(update(Agent).where(Agent.id == agent.id).values(webhook_url=garbled))
    await session.commit()
    failed = await widget(client, agent.id, send("once more"), headers)
    assert failed.status_code == 502
    assert "retry-after" not in failed.headers


async def test_quota_refuses_with_429_and_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    quota = {"open_registration": False, "quota": {"messages_per_user_per_day": 1}}
    await session.execute(update(Team).where(Team.id == user.team_id).values(settings=quota))
    await session.commit()
    assert (await widget(client, agent.id, send("one"), headers)).status_code == 200
    for session_id in (SESSION, "a-new-session"):
        refused = await widget(client, agent.id, send("two", session_id), {**headers, **STREAM})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert refused.json() == {"detail": "Daily message quota reached; it resets at midnight UTC"}
    assert await count_rows(session, "chats") == 1  # the refused new session left no chat behind
    assert await count_rows(session, "widget_sessions") == 1
    assert await count_rows(session, "messages") == 2
    assert len(fake.requests) == 1


async def test_inactive_agent_is_409_and_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    await widget(client, agent.id, send("hello there"), headers)
    await session.execute(update(Agent).where(Agent.id == agent.id).values(is_active=False))
    await session.commit()
    refused = await widget(client, agent.id, send("again"), headers)
    assert refused.status_code == 409
    assert refused.json() == {"detail": "This chat's agent is no longer active"}
    assert await count_rows(session, "messages") == 2
    # Its history stays readable.
    assert len(json.loads((await widget(client, agent.id, load(), headers)).content)["data"]) == 2
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"action": "deleteEverything", "sessionId": SESSION, "chatInput": "hi"},
        {"sessionId": SESSION, "chatInput": "hi"},
        {"action": "sendMessage", "chatInput": "hi"},
        {"action": "sendMessage", "sessionId": SESSION},
        {"action": "sendMessage", "sessionId": SESSION, "chatInput": None},
        {"action": "sendMessage", "sessionId": SESSION, "chatInput": "   "},
        {"action": "sendMessage", "sessionId": SESSION, "chatInput": "x" * 32_001},
        {"action": "sendMessage", "sessionId": "s" * 201, "chatInput": "hi"},
        {"action": "sendMessage", "sessionId": "", "chatInput": "hi"},
        {"action": "sendMessage", "sessionId": SESSION, "chatInput": "hi", "files": []},
        {"action": "loadPreviousSession", "sessionId": SESSION, "chatInput": "hi"},
        ["sendMessage"],
    ],
)
async def test_bad_bodies_are_422_and_store_nothing(
    client: httpx.AsyncClient, session: AsyncSession, agent: Agent, headers: dict[str, str], fake: FakeN8n, body: Any
) -> None:
    response = await client.post(f"/api/agents/{agent.id}/n8n-chat", json=body, headers={**headers, **STREAM})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["detail"], list)
    assert "deleteEverything" not in response.text
    assert "chat_input" not in response.text  # the widget's names (chatInput), not the server's field names
    assert "session_id" not in response.text
    assert await count_rows(session, "chats") == 0
    assert await count_rows(session, "messages") == 0
    assert fake.requests == []


#: Control, format and separator characters: `/v1`'s X-Session-Id refuses each (app.fields.check_session_id).
UNPRINTABLE_SESSION_IDS = ["a\nb", "tab\there", "del\x7f", "esc\x1b[2J", "nel\x85", "line\u2028sep", "zero\u200bwidth"]


@pytest.mark.parametrize("session_id", UNPRINTABLE_SESSION_IDS)
@pytest.mark.parametrize("action", ["sendMessage", "loadPreviousSession"])
async def test_a_session_id_with_control_characters_is_refused_as_x_session_id_is(
    client: httpx.AsyncClient,
    session: AsyncSession,
    agent: Agent,
    headers: dict[str, str],
    fake: FakeN8n,
    session_id: str,
    action: str,
) -> None:
    """The id names a stored chat (and shows in the logs of whoever reads the table): the widget's refuses what
    `/v1`'s X-Session-Id does, with the same words, by its wire name, before anything is stored or n8n called."""
    body = send("hi", session_id) if action == "sendMessage" else load(session_id)
    response = await client.post(f"/api/agents/{agent.id}/n8n-chat", json=body, headers={**headers, **STREAM})
    assert response.status_code == 422, response.text
    rule = "Value error, must be 1 to 200 printable characters"
    assert response.json()["detail"] == [{"type": "value_error", "loc": ["body", "sessionId"], "msg": rule}]
    assert await count_rows(session, "chats") == 0
    assert await count_rows(session, "widget_sessions") == 0
    assert fake.requests == []


async def test_a_session_id_with_nul_is_refused_and_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    response = await widget(client, agent.id, send("hi", "a\x00b"), headers)
    assert response.status_code == 422, response.text
    assert await count_rows(session, "chats") == 0
    assert fake.requests == []


async def test_a_session_id_of_any_printable_text_still_names_its_chat(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str]
) -> None:
    """Spaces and letters beyond ASCII are printable: a page's own ids keep working."""
    session_id = "Bestellung 42 für Müller"
    assert (await widget(client, agent.id, send("hi", session_id), headers)).status_code == 200
    assert await session_chat(session, user, session_id) is not None


async def test_a_null_chat_input_is_refused_by_its_wire_name(
    client: httpx.AsyncClient, agent: Agent, headers: dict[str, str]
) -> None:
    body = {"action": "sendMessage", "sessionId": SESSION, "chatInput": None}
    response = await client.post(f"/api/agents/{agent.id}/n8n-chat", json=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"type": "value_error", "loc": ["body"], "msg": "Value error, chatInput may be left out but not null"}
    ]


async def test_a_body_that_is_not_json_is_refused(
    client: httpx.AsyncClient, session: AsyncSession, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    response = await client.post(
        f"/api/agents/{agent.id}/n8n-chat",
        content=b'{"action": "sendMessage", "sessionId": ',
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"
    assert await count_rows(session, "chats") == 0
    assert fake.requests == []


# --- tenancy and authentication ---------------------------------------------------------------------------


async def test_another_users_session_id_never_reaches_their_chat(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, user: User, agent: Agent
) -> None:
    await widget(client, agent.id, send("my secret plan"), auth_headers(settings, user))
    team = await session.get(Team, user.team_id)
    other = await create_user(session, team=team)
    theirs = auth_headers(settings, other)
    assert (await widget(client, agent.id, load(), theirs)).content == b'{"data":[]}'
    answer = await widget(client, agent.id, send("hello there"), theirs)
    assert answer.content == b'{"output":"Echo: hello there"}'
    mine, their_chat = await session_chat(session, user), await session_chat(session, other)
    assert mine is not None
    assert their_chat is not None
    assert mine != their_chat
    assert [m["content"] for m in await branch_of(session, mine)] == ["my secret plan", "Echo: my secret plan"]
    assert [m["content"] for m in await branch_of(session, their_chat)] == ["hello there", "Echo: hello there"]
    history = json.loads((await widget(client, agent.id, load(), theirs)).content)["data"]
    assert "my secret plan" not in json.dumps(history)


async def test_another_teams_agent_is_404_for_both_actions(
    client: httpx.AsyncClient, session: AsyncSession, headers: dict[str, str], fake: FakeN8n
) -> None:
    foreign = await create_agent(
        session, team=await create_team(session), webhook_url=f"{fake.url}/webhook/agent-stream"
    )
    for agent_id in (foreign.id, uuid.uuid4()):
        for body in (send("hi"), load()):
            response = await widget(client, agent_id, body, {**headers, **STREAM})
            assert response.status_code == 404
            assert response.json() == {"detail": "Agent not found"}
    assert await count_rows(session, "chats") == 0
    assert fake.requests == []


async def test_an_api_key_works_and_acts_as_its_user(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, user: User, agent: Agent
) -> None:
    _row, key = await create_key(session=session, settings=settings, user=user, name="widget", expires_at=None)
    response = await widget(client, agent.id, send("hello there"), {"Authorization": f"Bearer {key}", **STREAM})
    assert response.status_code == 200
    assert lines_of(response.content)[-1]["type"] == "end"
    assert await session_chat(session, user) is not None
    wrong = await widget(client, agent.id, send("hi"), {"Authorization": "Bearer n8nr_wrong"})
    assert wrong.status_code == 401
    assert (await client.post(f"/api/agents/{agent.id}/n8n-chat", json=send("hi"))).status_code == 401


async def test_cookie_auth_checks_the_origin(
    web: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, fake: FakeN8n
) -> None:
    assert (await login(web, user.email)).status_code == 200
    url = f"/api/agents/{agent.id}/n8n-chat"
    refused = await web.post(url, json=send("hi"), headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403
    assert refused.json() == {"detail": "Origin not allowed"}
    assert await count_rows(session, "chats") == 0
    assert fake.requests == []
    allowed = await web.post(url, json=send("hello there"), headers={"Origin": "http://spa.test"})
    assert allowed.status_code == 200
    assert allowed.content == b'{"output":"Echo: hello there"}'
    assert allowed.headers["access-control-allow-origin"] == "http://spa.test"


async def test_cors_follows_the_configured_origins(client: httpx.AsyncClient, agent: Agent) -> None:
    """The widget's preflight (chat_cors_preflight.txt asks for content-type; a key adds authorization)."""
    url = f"/api/agents/{agent.id}/n8n-chat"
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = await client.options(url, headers={"Origin": "http://spa.test", **asked})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://spa.test"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    granted = allowed.headers["access-control-allow-headers"].lower()
    assert "authorization" in granted
    assert "content-type" in granted
    refused = await client.options(url, headers={"Origin": "http://elsewhere.test", **asked})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


async def test_a_deleted_chat_frees_its_session_id(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str]
) -> None:
    await widget(client, agent.id, send("hello there"), headers)
    first = await session_chat(session, user)
    assert (await client.delete(f"/api/chats/{first}", headers=headers)).status_code == 204
    assert await count_rows(session, "widget_sessions") == 0
    assert (await widget(client, agent.id, load(), headers)).content == b'{"data":[]}'
    await widget(client, agent.id, send("again"), headers)
    second = await session_chat(session, user)
    assert second is not None
    assert second != first


async def test_file_uploads_and_get_are_refused_clearly(
    client: httpx.AsyncClient, session: AsyncSession, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    """What the widget sends with `allowFileUploads` (multipart) or `webhookConfig.method: 'GET'`."""
    url = f"/api/agents/{agent.id}/n8n-chat"
    # As @n8n/chat sends it: `metadata` as JSON text, one `files` part per file; `Accept: text/plain` when streaming.
    form = {"action": "sendMessage", "sessionId": SESSION, "chatInput": "look", "metadata": "{}"}
    files = {"files": ("a.txt", b"hello", "text/plain")}
    for accept in ({}, STREAM):
        upload = await client.post(url, data=form, files=files, headers={**headers, **accept})
        assert upload.status_code == 422
        # Said by name (the widget without streaming shows this body in its answer bubble), not as a body that
        # "should be a valid dictionary".
        assert upload.json()["detail"] == [
            {
                "type": "value_error",
                "loc": ["body", "files"],
                "msg": "File uploads are not supported by this endpoint; turn the widget's allowFileUploads off",
            }
        ]
    anonymous = await client.post(url, data=form, files=files)
    assert anonymous.status_code == 401  # who asks is checked first, as for every other refusal
    query = await client.get(url, params=load(), headers=headers)
    assert query.status_code == 405
    assert query.headers["allow"] == "POST"
    assert await count_rows(session, "chats") == 0
    assert fake.requests == []


# --- the generation machinery: stop from the chat API, shutdown ---------------------------------------------


async def _until_called(fake: FakeN8n) -> None:
    async with asyncio.timeout(5):
        while True:
            if fake.requests:
                return
            await asyncio.sleep(0.01)


@pytest.mark.settings(STREAM_CHECKPOINT_INTERVAL=0.05)
async def test_stop_from_the_chat_api_ends_the_widgets_stream(
    client: httpx.AsyncClient, session: AsyncSession, user: User, agent: Agent, headers: dict[str, str], fake: FakeN8n
) -> None:
    await session.execute(
        update(Agent)
        .where(Agent.id == agent.id)
        .values(webhook_url=f"{fake.url}/webhook/agent-stream?scenario=stall&hang=30&after=2")
    )
    await session.commit()
    pending = asyncio.create_task(widget(client, agent.id, send("hello there"), {**headers, **STREAM}))
    await _until_called(fake)
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    async with asyncio.timeout(5):
        while True:  # the two tokens before the stall have been read (a checkpoint stored them)
            if (await client.get(f"/api/chats/{chat_id}", headers=headers)).json()["messages"][-1]["content"]:
                break
            await asyncio.sleep(0.05)
    stopped = await client.post(f"/api/chats/{chat_id}/stop", headers=headers)
    assert stopped.status_code == 200
    assert stopped.json()["status"] == "cancelled"
    items = lines_of((await pending).content)
    assert items[-1]["type"] == "end"
    assert "".join(i["content"] for i in items if i["type"] == "item") == stopped.json()["content"] == "Echo: hello"


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=0.3, N8N_READ_TIMEOUT=30)
async def test_shutdown_interrupts_a_widget_answer_and_refuses_new_ones(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    user: User,
    agent: Agent,
    headers: dict[str, str],
    fake: FakeN8n,
) -> None:
    await session.execute(
        update(Agent)
        .where(Agent.id == agent.id)
        .values(webhook_url=f"{fake.url}/webhook/agent-stream?scenario=stall&hang=30&after=2")
    )
    await session.commit()
    pending = asyncio.create_task(widget(client, agent.id, send("hello there"), {**headers, **STREAM}))
    await _until_called(fake)
    await app_state(app).generations.begin_shutdown()
    refused = await widget(client, agent.id, send("another", "other-session"), headers)
    assert refused.status_code == 503
    items = lines_of((await pending).content)
    assert [i["type"] for i in items][-1] == "error"
    assert items[-1]["content"] == "The server stopped before the answer was complete"
    chat_id = await session_chat(session, user)
    assert chat_id is not None
    answer = (await branch_of(session, chat_id))[-1]
    assert (answer["status"], answer["content"]) == ("interrupted", "Echo: hello")
    assert await count_rows(session, "chats") == 1


@pytest.mark.parametrize(
    ("accept", "streamed"),
    [
        (None, False),
        ("", False),
        ("text/plain", True),
        ("application/x-ndjson", True),
        ("application/json, text/plain; charset=utf-8", True),
        ("TEXT/PLAIN;q=0.5", True),
        ("text/plain;q=0", False),  # "not acceptable" (RFC 9110): the one-body answer
        ("text/plain; q=0.000, application/json", False),
        ("application/x-ndjson;q=0, text/plain", True),
        ("text/plain;q=x", True),  # an unreadable weight is ignored
        ("application/json", False),
        ("*/*", False),
    ],
)
def test_the_streamed_answer_is_chosen_by_accept_and_never_when_refused_with_q_0(
    accept: str | None, streamed: bool
) -> None:
    """The widget sends `text/plain` for its streamed answer; a client saying a type is not acceptable
    (`q=0`) got it all the same."""
    assert chat_trigger.wants_stream(accept) is streamed
