"""The OpenAI-compatible API, driven by the official `openai` client against a live server and the fake n8n:
models, completions streamed and not, failures in OpenAI's shape, the usage row, n8n's session id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

from app import metrics
from app.config import Settings
from app.db import utcnow
from app.deps import get_generations
from app.models import Agent, ErrorLog, Team, UsageRecord, User
from app.routers.openai_api import Run, _stream
from app.security import Caller
from app.services.api_keys import create_key
from app.services.completions import prepare_completion
from app.services.usage import seconds_to_midnight
from app.state import app_state
from tests.conftest import count_rows
from tests.factories import auth_headers, create_agent, create_team, create_user
from tests.live import LiveServer, live_server
from tests.test_callbacks import ECHO, WORDS, served
from tools.fake_n8n import FakeN8n, ndjson, raw_answer


@dataclass
class Setup:
    server: LiveServer
    user: User
    agent: Agent
    key: str
    client: openai.AsyncOpenAI


@pytest.fixture
async def setup(session: AsyncSession, settings: Settings, fake: FakeN8n) -> AsyncIterator[Setup]:
    team = await create_team(session)
    user = await create_user(session, team=team)
    agent = await create_agent(session, team=team, slug="helper", webhook_url=f"{fake.url}/webhook/agent-stream")
    _row, key = await create_key(session=session, settings=settings, user=user, name="sdk", expires_at=None)
    async with live_server(settings) as server:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=20)
        yield Setup(server, user, agent, key, client)
        await client.close()


async def post_raw(setup: Setup, raw: bytes) -> httpx.Response:
    """A completion request sent as these bytes (JSON the SDK cannot encode, e.g. a lone surrogate escape)."""
    async with httpx.AsyncClient(base_url=setup.server.url, timeout=10) as http:
        return await http.post(
            "/v1/chat/completions",
            content=raw,
            headers={"Authorization": f"Bearer {setup.key}", "Content-Type": "application/json"},
        )


def _frames(text: str) -> list[str]:
    return [block.removeprefix("data: ") for block in text.split("\n\n") if block.strip()]


async def test_models_are_the_teams_active_agents(session: AsyncSession, setup: Setup) -> None:
    team = await session.get(Team, setup.user.team_id)
    assert team is not None
    await create_agent(session, team=team, slug="retired", is_active=False)
    await create_agent(session, team=await create_team(session), slug="elsewhere")
    models = await setup.client.models.list()
    assert [m.id for m in models.data] == ["helper"]
    assert models.data[0].object == "model"
    assert models.data[0].owned_by == f"team-{setup.user.team_id}"
    assert models.data[0].created == int(setup.agent.created_at.timestamp())
    one = await setup.client.models.retrieve("helper")
    assert (one.id, one.owned_by, one.created) == ("helper", models.data[0].owned_by, models.data[0].created)
    for hidden in ("retired", "elsewhere", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            await setup.client.models.retrieve(hidden)
        assert caught.value.code == "model_not_found"
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        nul = await http.get("/v1/models/a%00b", headers={"Authorization": f"Bearer {setup.key}"})
    assert nul.status_code == 422
    assert nul.json()["error"]["type"] == "invalid_request_error"


async def test_non_streaming_completion(session: AsyncSession, setup: Setup, fake: FakeN8n) -> None:
    answer = await setup.client.chat.completions.create(
        model="helper",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "hello there"},
        ],
    )
    assert answer.object == "chat.completion"
    assert answer.model == "helper"
    assert answer.choices[0].message.content == "Echo: hello there"
    assert answer.choices[0].finish_reason == "stop"
    sent = fake.requests[-1]["json"]
    assert sent["chatInput"] == "hello there"
    assert sent["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "hello there"},
    ]
    assert sent["system_prompt"].startswith("Be brief.")
    assert sent["sessionId"].startswith("v1:")
    assert str(setup.user.id) not in sent["sessionId"]  # no X-Session-Id: a fresh session each time
    rows = (await session.execute(select(UsageRecord))).scalars().all()
    assert len(rows) == 1
    assert rows[0].chat_id is None
    assert rows[0].outcome == "complete"
    assert rows[0].user_id == setup.user.id
    assert rows[0].chars_out == len("Echo: hello there")
    assert await count_rows(session, "chats") == 0
    assert await count_rows(session, "messages") == 0


async def test_streaming_completion(session: AsyncSession, setup: Setup) -> None:
    stream = await setup.client.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "stream this please"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Echo: stream this please"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert len({c.id for c in chunks}) == 1
    assert (await session.execute(select(UsageRecord.outcome))).scalars().all() == ["complete"]


async def test_streaming_wire_ends_with_done(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.server.url, timeout=20) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "helper", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {setup.key}"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = _frames(response.text)
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[-2])["choices"][0]["finish_reason"] == "stop"


async def test_line_separators_in_the_answer_never_split_a_streamed_chunk(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """A streamed chunk's `data:` line held NEL, U+2028 and U+2029 raw: the official SDKs split on bytes, but a
    reader on `str.splitlines` (httpx's `aiter_lines`) cut the line there. They are escaped: the same JSON."""
    texts = ["a\x85b", "c\u2028d", "e\u2029f"]
    body = ndjson({"type": "begin", "metadata": {}})
    body += b"".join(ndjson({"type": "item", "content": text, "metadata": {}}) for text in texts)
    body += ndjson({"type": "end", "metadata": {}})
    url = raw_answer(fake.url, body)
    await session.execute(update(Agent).where(Agent.id == setup.agent.id).values(webhook_url=url))
    await session.commit()
    async with httpx.AsyncClient(base_url=setup.server.url, timeout=20) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "helper", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {setup.key}"},
        )
    assert response.status_code == 200
    lines = [line for line in response.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(texts)


async def test_upstream_error_mid_stream_ends_with_an_error_chunk(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    await session.execute(
        update(Agent)
        .where(Agent.id == setup.agent.id)
        .values(webhook_url=f"{fake.url}/webhook/agent-stream?scenario=reset&after=2")
    )
    await session.commit()
    stream = await setup.client.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "one two three four"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Echo: one"  # the two tokens before the fault
    last = chunks[-1].choices[0]
    assert str(last.finish_reason) == "error"
    error = (last.model_extra or {})["error"]
    assert error["code"] == "upstream_disconnected"
    row = (await session.execute(select(UsageRecord))).scalar_one()
    assert row.outcome == "error"
    assert row.error_code == "upstream_disconnected"
    logged = (await session.execute(select(ErrorLog))).scalar_one()
    assert (logged.code, logged.chat_id, logged.agent_id) == ("upstream_disconnected", None, setup.agent.id)
    assert logged.detail["source"] == "openai"
    async with httpx.AsyncClient(base_url=setup.server.url, timeout=20) as http:
        raw = await http.post(
            "/v1/chat/completions",
            json={"model": "helper", "stream": True, "messages": [{"role": "user", "content": "a b c"}]},
            headers={"Authorization": f"Bearer {setup.key}"},
        )
    assert _frames(raw.text)[-1] == "[DONE]"


async def test_upstream_failure_without_stream_is_a_502_in_openai_shape(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    await session.execute(
        update(Agent).where(Agent.id == setup.agent.id).values(webhook_url=f"{fake.url}/webhook/does-not-exist")
    )
    await session.commit()
    with pytest.raises(openai.APIStatusError) as caught:
        await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "server_error"
    assert body["code"] == "upstream_error"
    assert (await session.execute(select(UsageRecord.outcome))).scalars().all() == ["error"]
    # The error log, as for a chat's answer: the code, n8n's status, no chat, nothing secret.
    logged = (await session.execute(select(ErrorLog))).scalar_one()
    assert (logged.code, logged.upstream_status, logged.chat_id) == ("upstream_error", 404, None)
    assert (logged.user_id, logged.team_id) == (setup.user.id, setup.user.team_id)
    assert logged.detail["completion_id"].startswith("chatcmpl-")
    assert setup.key not in json.dumps(logged.detail)


async def _point_agent(session: AsyncSession, setup: Setup, url: str) -> None:
    await session.execute(update(Agent).where(Agent.id == setup.agent.id).values(webhook_url=url))
    await session.commit()


@pytest.mark.parametrize(
    ("retry_after", "should_retry"), [("30", None), ("60", None), ("61", "false"), ("3600", "false")]
)
async def test_an_agents_429_with_retry_after_is_openais_rate_limit_error(
    session: AsyncSession, setup: Setup, fake: FakeN8n, retry_after: str, should_retry: str | None
) -> None:
    """n8n refused the request (its or a proxy's rate limit): the official clients may wait as told and send it
    again, unless the wait is longer than they honour (then they would retry at once, to be refused again)."""
    await _point_agent(session, setup, f"{fake.url}/webhook/x?scenario=status&status=429&retry_after={retry_after}")
    with pytest.raises(openai.RateLimitError) as caught:
        await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 429
    assert caught.value.body == {
        "message": "The agent answered with an error (HTTP 429)",
        "type": "rate_limit_error",
        "param": None,
        "code": "upstream_error",
    }
    assert caught.value.response.headers["retry-after"] == retry_after
    assert caught.value.response.headers.get("x-should-retry") == should_retry
    logged = (await session.execute(select(ErrorLog))).scalar_one()
    assert (logged.code, logged.upstream_status, logged.detail["retry_after"]) == (
        "upstream_error",
        429,
        int(retry_after),
    )


async def test_an_agents_503_with_retry_after_is_a_503_the_client_may_retry(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """n8n (or a proxy) answered 503 "unavailable" with a Retry-After: it ran nothing, as on a 429. It was a 502
    with `x-should-retry: false` and no Retry-After, so the SDK user never learnt the wait (a streamed completion
    had it in its error chunk). Now a 503 with that Retry-After, which the official client waits for and retries
    (each try counting against the quota); past 60 s it says `x-should-retry: false`."""
    await _point_agent(session, setup, f"{fake.url}/webhook/x?scenario=status&status=503&retry_after=1")
    client = openai.AsyncOpenAI(base_url=f"{setup.server.url}/v1", api_key=setup.key, max_retries=1, timeout=20)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert caught.value.status_code == 503
    assert caught.value.body == {
        "message": "The agent answered with an error (HTTP 503)",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }
    assert caught.value.response.headers["retry-after"] == "1"
    assert "x-should-retry" not in caught.value.response.headers
    assert len(fake.requests) == 2  # waited as told, then sent again once
    await _point_agent(session, setup, f"{fake.url}/webhook/x?scenario=status&status=503&retry_after=3600")
    with pytest.raises(openai.InternalServerError) as caught:
        await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    assert (caught.value.status_code, caught.value.response.headers["retry-after"]) == (503, "3600")
    assert caught.value.response.headers["x-should-retry"] == "false"
    # Without a usable Retry-After a 503 is the agent's failure like any other: 502, not to be sent again.
    await _point_agent(session, setup, f"{fake.url}/webhook/x?scenario=status&status=503")
    with pytest.raises(openai.APIStatusError) as failed:
        await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-should-retry"] == "false"


async def test_an_agents_429_without_a_usable_retry_after_stays_a_502(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """A 429 whose Retry-After cannot be read says no wait: the agent's failure like any other, not resent."""
    await _point_agent(session, setup, f"{fake.url}/webhook/x?scenario=status&status=429&retry_after=later")
    with pytest.raises(openai.APIStatusError) as caught:
        await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert "retry-after" not in caught.value.response.headers
    assert caught.value.response.headers["x-should-retry"] == "false"


async def test_an_agents_retry_after_ends_a_stream_in_its_error_chunk(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    await _point_agent(session, setup, f"{fake.url}/webhook/x?scenario=status&status=429&retry_after=30")
    stream = await setup.client.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1].choices[0]
    assert str(last.finish_reason) == "error"
    assert (last.model_extra or {})["error"] == {
        "message": "The agent answered with an error (HTTP 429)",
        "type": "server_error",
        "code": "upstream_error",
        "retry_after": 30,
    }


async def test_revoked_key_is_refused(session: AsyncSession, setup: Setup) -> None:
    assert (await setup.client.models.list()).data
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        keys = (await http.get("/api/api-keys", headers=auth_headers(setup.server.settings, setup.user))).json()
        deleted = await http.delete(
            f"/api/api-keys/{keys[0]['id']}", headers=auth_headers(setup.server.settings, setup.user)
        )
    assert deleted.status_code == 204
    with pytest.raises(openai.AuthenticationError) as caught:
        await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.body == {
        "message": "Could not validate credentials",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert await count_rows(session, "api_keys") == 0
    assert await count_rows(session, "usage_records") == 0


async def test_foreign_teams_slug_is_a_404_in_openai_shape(session: AsyncSession, setup: Setup, fake: FakeN8n) -> None:
    await create_agent(
        session, team=await create_team(session), slug="their-bot", webhook_url=f"{fake.url}/webhook/agent-stream"
    )
    for model in ("their-bot", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            await setup.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.code == "model_not_found"
        body: Any = caught.value.body
        assert body["type"] == "invalid_request_error"
        assert model in body["message"]
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0


async def test_a_model_name_the_database_cannot_hold_is_a_422_in_openai_shape(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """The model is looked up by slug: NUL or a lone surrogate is refused before the query (it made it fail)."""
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await setup.client.chat.completions.create(model="hel\u0000per", messages=[{"role": "user", "content": "hi"}])
    body: Any = caught.value.body
    assert body["type"] == "invalid_request_error"
    assert "model" in body["message"]
    # A lone surrogate, as JSON text (the SDK cannot encode one).
    answer = await post_raw(setup, b'{"model": "hel\\ud800per", "messages": [{"role": "user", "content": "hi"}]}')
    assert answer.status_code == 422
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "messages",
    [
        '[{"role": "user", "content": "hi \\ud800"}]',
        '[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]',
        '[{"role": "system", "content": "be \\ud800 brief"}, {"role": "user", "content": "hi"}]',
    ],
    ids=["content", "content-part", "system"],
)
async def test_messages_n8n_could_not_be_sent_are_a_422_in_openai_shape(
    session: AsyncSession, setup: Setup, fake: FakeN8n, messages: str, stream: bool
) -> None:
    """A lone surrogate anywhere in `messages` cannot be encoded for n8n: a 422 before anything is counted (it
    was a 500, or for a system message a 502 that used a quota slot and logged an error)."""
    answer = await post_raw(
        setup, f'{{"model": "helper", "stream": {str(stream).lower()}, "messages": {messages}}}'.encode()
    )
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "messages" in error["message"]
    assert "Unicode" in error["message"]
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0
    assert await count_rows(session, "error_logs") == 0


@pytest.mark.settings(STREAM_PING_INTERVAL=0.2)
async def test_a_streamed_completion_pings_while_the_agent_thinks(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """While n8n is silent (here 0.6 s between its pieces), `: ping` comments keep proxies from closing the
    connection; the official client skips them."""
    slow = f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=600"
    await session.execute(update(Agent).where(Agent.id == setup.agent.id).values(webhook_url=slow))
    await session.commit()
    body = {"model": "helper", "messages": [{"role": "user", "content": "hi there"}], "stream": True}
    async with httpx.AsyncClient(base_url=setup.server.url, timeout=20) as http:
        raw = await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {setup.key}"})
    blocks = [block for block in raw.text.split("\n\n") if block]
    first_text = next(i for i, block in enumerate(blocks) if '"content":"' in block and '"content":""' not in block)
    assert ": ping" in blocks[1:first_text]
    stream = await setup.client.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "hi there"}], stream=True
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "Echo: hi there"


async def test_a_session_token_works_and_x_session_id_scopes_n8n_memory(
    setup: Setup, fake: FakeN8n, settings: Settings
) -> None:
    token = auth_headers(settings, setup.user)["Authorization"].removeprefix("Bearer ")
    client = openai.AsyncOpenAI(base_url=f"{setup.server.url}/v1", api_key=token, max_retries=0)
    await client.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Session-Id": "conv-1"}
    )
    await client.close()
    assert fake.requests[-1]["json"]["sessionId"] == f"v1:{setup.user.id}:conv-1"


@pytest.mark.parametrize("value", [b"tab\there", b"nel\x85", b"x" * 201])
async def test_an_x_session_id_that_is_not_printable_is_refused_with_the_widgets_words(
    session: AsyncSession, setup: Setup, fake: FakeN8n, value: bytes
) -> None:
    """The rule the chat widget's `sessionId` follows (app.fields.check_session_id), said the same way; the
    bytes an HTTP client may put in a header (a tab, obs-text) but that no key of n8n's memory should hold."""
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "helper", "messages": [{"role": "user", "content": "hi"}]},
            headers=[(b"Authorization", f"Bearer {setup.key}".encode()), (b"X-Session-Id", value)],
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {
        "message": "X-Session-Id: must be 1 to 200 printable characters",
        "type": "invalid_request_error",
        "param": "X-Session-Id",
        "code": "invalid_request",
    }
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "helper", "messages": []}, 422),
        ({"model": "helper"}, 422),
        ({"model": "helper", "messages": [{"role": "assistant", "content": "no question"}]}, 422),
        ({"model": "helper", "messages": [{"role": "user", "content": "   "}]}, 422),
        ({"model": "helper", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422),
        # The last message has no text: not the earlier question answered again in its place.
        (
            {
                "model": "helper",
                "messages": [
                    {"role": "user", "content": "first question"},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]},
                ],
            },
            422,
        ),
        (
            {
                "model": "helper",
                "messages": [
                    {"role": "user", "content": "the weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                ],
            },
            422,
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, 422),
        ("not json", 422),
        ({"model": "helper", "n": 2, "messages": [{"role": "user", "content": "hi"}]}, 422),  # one answer a call
        # OpenAI's ranges: a client's bug is told, not hidden by a parameter that is not used anyway.
        ({"model": "helper", "temperature": 5, "messages": [{"role": "user", "content": "hi"}]}, 422),
        ({"model": "helper", "top_p": -0.5, "messages": [{"role": "user", "content": "hi"}]}, 422),
        ({"model": "helper", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 422),
        # What the answer cannot carry: the client would read logprobs that are not there.
        ({"model": "helper", "logprobs": True, "messages": [{"role": "user", "content": "hi"}]}, 422),
        ({"model": "helper", "top_logprobs": 3, "messages": [{"role": "user", "content": "hi"}]}, 422),
        # An image beside the question (or earlier in the history) was dropped: the agent answered about a
        # picture it never saw.
        (
            {
                "model": "helper",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is in this picture?"},
                            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                        ],
                    }
                ],
            },
            422,
        ),
        (
            {
                "model": "helper",
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA=="}}]},
                    {"role": "user", "content": "and now?"},
                ],
            },
            422,
        ),
        ({"model": "helper", "stream": "yes", "messages": [{"role": "user", "content": "hi"}]}, 422),
        (
            {
                "model": "helper",
                "stream_options": {"include_usage": "yes"},
                "messages": [{"role": "user", "content": "x"}],
            },
            422,
        ),
    ],
)
async def test_bad_requests_are_4xx_in_openai_shape(
    session: AsyncSession, setup: Setup, fake: FakeN8n, body: Any, status: int
) -> None:
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        kwargs: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
        response = await http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {setup.key}", "Content-Type": "application/json"},
            **kwargs,
        )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0


async def test_parameters_in_openais_ranges_and_text_parts_are_accepted(setup: Setup, fake: FakeN8n) -> None:
    """What the SDK sends for a text-only chat still works: sampling parameters in range (not used), `tools` (not
    used), content as a list of text parts, a `developer` message (an instruction, as `system`)."""
    answer = await setup.client.chat.completions.create(
        model="helper",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        ],
        temperature=2,
        top_p=0,
        max_tokens=1,
        max_completion_tokens=5,
        presence_penalty=-2,
        frequency_penalty=2,
        logprobs=False,
        top_logprobs=0,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    )
    assert answer.choices[0].message.content == "Echo: one two"
    sent = fake.requests[0]["json"]
    assert (sent["chatInput"], sent["system_prompt"][:8]) == ("one\ntwo", "be brief")


@pytest.mark.settings(MESSAGE_MAX_CHARS=10)
async def test_refusals_read_as_an_sdk_user_reads_them(setup: Setup, fake: FakeN8n) -> None:
    """The message the SDK shows (`error.message`) and the field it names (`error.param`), as OpenAI words them:
    no pydantic wrapper ("Value error, "), no location prefix of the server's own (`path.`, `header.`), no
    position in an unreadable body taken for a field, the message that is too long named."""
    hi = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, Any], dict[str, str], str, str | None]] = [
        (
            {"model": "helper", "messages": hi, "logprobs": True},
            {},
            "logprobs: only false is accepted: the agent's answer has no log probabilities",
            "logprobs",
        ),
        ({"model": "a\x00", "messages": hi}, {}, "model: must not contain NUL characters", "model"),
        (
            {"model": "helper", "messages": hi},
            {"X-Session-Id": "a\tb"},
            "X-Session-Id: must be 1 to 200 printable characters",
            "X-Session-Id",
        ),
        (
            {"model": "helper", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "x" * 11}]},
            {},
            "messages.1.content: A user message must be at most 10 characters",
            "messages.[1].content",
        ),
        (
            {"model": "helper", "messages": [{"role": "assistant", "content": "x"}]},
            {},
            "messages: The last message must be a user message with text (only system or developer messages may "
            "follow it)",
            "messages",
        ),
    ]
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        for body, headers, message, param in cases:
            response = await http.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {setup.key}", **headers}
            )
            assert response.status_code == 422, response.text
            assert (response.json()["error"]["message"], response.json()["error"]["param"]) == (message, param)
        unreadable = await http.post(
            "/v1/chat/completions",
            content=b'{"model": "helper", "messages": ',
            headers={"Authorization": f"Bearer {setup.key}", "Content-Type": "application/json"},
        )
        assert unreadable.status_code == 422
        assert unreadable.json()["error"] == {
            "message": "We could not parse the JSON body of your request",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_request",
        }
        too_long = await http.get("/v1/models/" + "m" * 65, headers={"Authorization": f"Bearer {setup.key}"})
        assert too_long.json()["error"]["message"] == "model: String should have at most 64 characters"
    assert fake.requests == []


async def test_system_text_parts_are_joined_as_a_user_messages_are(setup: Setup, fake: FakeN8n) -> None:
    """What OpenAI's SDK types allow for an instruction: a string, or a list of `text` parts, joined by newlines
    as the question's parts are, before the agent's own system prompt."""
    await setup.client.chat.completions.create(
        model="helper",
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}]},
            {"role": "developer", "content": [{"type": "text", "text": "answer in English"}]},
            {"role": "user", "content": "hi"},
        ],
    )
    assert fake.requests[0]["json"]["system_prompt"].startswith("be brief\nbe kind\n\nanswer in English")


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "refusal", "refusal": "no"}],  # an assistant's part, not an instruction's
        [{"type": "text", "text": "be brief"}, {"type": "refusal", "refusal": "no"}],
        [],
        [{"type": "text", "text": 5}],
        [{"type": "text"}],
        {"type": "text", "text": "be brief"},  # a part, not a list of them
        None,
        42,
    ],
)
@pytest.mark.parametrize("role", ["system", "developer"])
async def test_an_instruction_without_text_is_refused_naming_it_never_dropped(
    session: AsyncSession, setup: Setup, fake: FakeN8n, content: Any, role: str
) -> None:
    """An instruction the agent would never see was dropped silently: the answer ignored it and the caller could
    not tell. It is a 422 naming the message (its index, as `param` too), before n8n is called or anything counts."""
    messages: Any = [
        {"role": "user", "content": "first"},
        {"role": role, "content": content},
        {"role": "user", "content": "hi"},
    ]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await setup.client.chat.completions.create(model="helper", messages=messages)
    assert caught.value.param == "messages.[1].content"
    assert cast(dict[str, Any], caught.value.body)["message"] == (
        f"messages.1.content: A {role} message must have text content: a string or a list of text parts"
    )
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0


async def test_a_text_part_without_a_string_is_refused_in_any_message(setup: Setup, fake: FakeN8n) -> None:
    """A malformed part of an earlier question was dropped with the rest of that question: the agent saw a
    history the caller did not send."""
    messages: Any = [
        {"role": "user", "content": [{"type": "text", "text": ["not", "a", "string"]}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hi"},
    ]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await setup.client.chat.completions.create(model="helper", messages=messages)
    assert caught.value.param == "messages.[0].content"
    assert fake.requests == []


@pytest.mark.parametrize(
    "message",
    [
        {"role": ["user"], "content": "earlier"},
        {"role": {"name": "user"}, "content": "earlier"},
        {"role": "user", "content": [{"type": ["text"], "text": "earlier"}]},
        {"role": "user", "content": [{"type": {"kind": "text"}, "text": "earlier"}]},
    ],
)
async def test_a_role_or_part_type_that_is_no_string_is_never_a_500(
    session: AsyncSession, setup: Setup, fake: FakeN8n, message: dict[str, Any]
) -> None:
    """A role or a part's type given as a list or an object was looked up in a set (unhashable: a 500). A role
    that is none of OpenAI's is left out as any unknown role is; a part that is not text is refused, naming it."""
    body = {"model": "helper", "messages": [message, {"role": "user", "content": "hi"}]}
    response = await post_raw(setup, json.dumps(body).encode())
    if isinstance(message["role"], str):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "messages.[0].content"
        assert fake.requests == []
        assert await count_rows(session, "usage_records") == 0
    else:
        assert response.status_code == 200, response.text


async def test_an_invalid_request_names_its_param_as_openai_does(setup: Setup, fake: FakeN8n) -> None:
    """OpenAI's errors carry `param`, the field at fault, which the SDK exposes as `error.param`: a client (or its
    user) learns what to fix without parsing the message. Null where no field is at fault."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 3}, "temperature"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.[0].content",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    {"role": "user", "content": "hi"},
                ]
            },
            "messages.[0].content",
        ),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ]
    for change, param in cases:
        request: dict[str, Any] = {"model": "helper", "messages": [{"role": "user", "content": "hi"}], **change}
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            await setup.client.chat.completions.create(**request)
        assert caught.value.param == param, change
    with pytest.raises(openai.NotFoundError) as missing:
        await setup.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert (missing.value.code, missing.value.param) == ("model_not_found", None)
    assert fake.requests == []


async def test_missing_credentials_and_unknown_routes_are_openai_shaped(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        anonymous = await http.get("/v1/models")
        unknown = await http.get("/v1/nothing-here", headers={"Authorization": f"Bearer {setup.key}"})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    assert unknown.status_code == 404
    # Not `model_not_found`: no model was named (OpenAI's own unknown URLs have no code either).
    assert unknown.json() == {
        "error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}
    }
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        bare = await http.get("/v1", headers={"Authorization": f"Bearer {setup.key}"})
    assert bare.status_code == 404
    assert bare.json()["error"]["type"] == "invalid_request_error"


#: What OpenAI's JavaScript SDK sends from a browser (`dangerouslyAllowBrowser`), besides the safelisted
#: `Accept`: its client's `buildHeaders` and `getPlatformHeaders`, `OpenAI-Organization`/`OpenAI-Project` when
#: set, `X-Stainless-Helper-Method` from `chat.completions.stream()`; `User-Agent` is asked for by Firefox and
#: Safari (Chromium drops it). As a browser lists them in `Access-Control-Request-Headers`.
JS_SDK_HEADERS = (
    "authorization,content-type,openai-organization,openai-project,user-agent,x-stainless-arch,"
    "x-stainless-helper-method,x-stainless-lang,x-stainless-os,x-stainless-package-version,"
    "x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout"
)
#: Set by the HTTP layer, never by a script: a browser never asks for them.
TRANSPORT_HEADERS = {"host", "content-length", "accept-encoding", "connection", "accept"}


async def _preflight(setup: Setup, path: str, method: str, asked: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        return await http.options(
            path,
            headers={
                "Origin": "http://spa.test",  # in CORS_ORIGINS (tests.conftest)
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": asked,
            },
        )


async def test_the_official_sdks_pass_the_cors_preflight_from_an_allowed_origin(setup: Setup) -> None:
    """A browser page using OpenAI's SDK: its preflight asks for the `x-stainless-*` family and the organization
    and project headers; refused, the browser never sent the request (with any CORS_ORIGINS)."""
    sent: list[httpx.Headers] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request.headers)

    sdk = openai.AsyncOpenAI(
        base_url=f"{setup.server.url}/v1",
        api_key=setup.key,
        organization="org-1",
        project="proj-1",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]}),
    )
    await sdk.models.list()
    await sdk.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    await sdk.close()
    # The Python client's own names (the same family: it adds -async and -read-timeout), as a browser would ask.
    python_sdk = ",".join(sorted({name.lower() for headers in sent for name in headers} - TRANSPORT_HEADERS))
    assert "x-stainless-os" in python_sdk
    assert "openai-project" in python_sdk
    for asked in (JS_SDK_HEADERS, python_sdk):
        for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET"), ("/v1/models/helper", "GET")):
            allowed = await _preflight(setup, path, method, asked)
            assert allowed.status_code == 200, (path, asked, allowed.text)
            assert allowed.headers["access-control-allow-origin"] == "http://spa.test"
            granted = {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}
            assert set(asked.split(",")) <= granted
    # Still an allow-list: a header no client of this API sends is refused, and so is an origin not listed.
    assert (await _preflight(setup, "/v1/models", "GET", "authorization,x-anything")).status_code == 400
    async with httpx.AsyncClient(base_url=setup.server.url) as http:
        stranger = await http.options(
            "/v1/models",
            headers={
                "Origin": "http://elsewhere.test",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": JS_SDK_HEADERS,
            },
        )
    assert stranger.status_code == 400
    assert "access-control-allow-origin" not in stranger.headers


async def test_streamed_usage_when_asked_for(session: AsyncSession, setup: Setup) -> None:
    """`stream_options.include_usage`, as OpenAI sends it: every chunk has `usage: null`, then one more chunk,
    before [DONE], with empty `choices` and the usage n8n reported."""
    await session.execute(
        update(Agent)
        .where(Agent.id == setup.agent.id)
        .values(webhook_url=f"{setup.agent.webhook_url}?scenario=echo_usage")
    )
    await session.commit()
    stream = await setup.client.chat.completions.create(
        model="helper",
        messages=[{"role": "user", "content": "count these words"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert all(c.choices for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (13, 4)
    assert last.usage.total_tokens == 17
    # Not asked for: no usage chunk, no `usage` key.
    plain = await setup.client.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "count these words"}], stream=True
    )
    assert all(c.choices and c.usage is None for c in [chunk async for chunk in plain])


async def test_stream_options_without_stream_is_refused_as_openai_does(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """OpenAI refuses `stream_options` unless `stream` is true (it was ignored here: a reply without the usage
    the caller asked for); this API's status for an invalid body is 422, before n8n is called or anything counts."""
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await setup.client.chat.completions.create(
            model="helper",
            messages=[{"role": "user", "content": "hi"}],
            stream=False,
            stream_options={"include_usage": True},
        )
    body: Any = caught.value.body
    assert body == {
        "message": "stream_options: The 'stream_options' parameter is only allowed when 'stream' is enabled",
        "type": "invalid_request_error",
        "param": "stream_options",
        "code": "invalid_request",
    }
    # `stream` left out is `false` too; `stream_options: null` is no option at all.
    left_out = await post_raw(
        setup, b'{"model": "helper", "stream_options": {}, "messages": [{"role": "user", "content": "hi"}]}'
    )
    assert left_out.status_code == 422
    assert left_out.json()["error"]["code"] == "invalid_request"
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0
    plain = await post_raw(
        setup, b'{"model": "helper", "stream_options": null, "messages": [{"role": "user", "content": "hi"}]}'
    )
    assert plain.status_code == 200, plain.text
    assert plain.json()["object"] == "chat.completion"


async def test_a_failed_completion_tells_the_official_client_not_to_send_it_again(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """The client retries a 5xx twice by default: each retry ran the workflow again (its side effects, and a
    quota slot). A failure after n8n was called says `x-should-retry: false`, which the client obeys."""
    await session.execute(
        update(Agent).where(Agent.id == setup.agent.id).values(webhook_url=f"{fake.url}/webhook/does-not-exist")
    )
    await session.commit()
    client = openai.AsyncOpenAI(base_url=f"{setup.server.url}/v1", api_key=setup.key, timeout=20)  # default retries
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 1
    assert (await session.execute(select(UsageRecord.outcome))).scalars().all() == ["error"]


async def test_a_server_bug_tells_the_official_client_not_to_send_it_again(setup: Setup) -> None:
    """The last-resort 500 is only ever a bug (a database or Redis that is away is a 503 with Retry-After),
    which a retry does not cure: the client retried it twice by default, each try possibly a quota slot (and,
    past the quota, the workflow). It says `x-should-retry: false` on /v1, which the official client obeys."""

    async def broken() -> None:
        raise RuntimeError("a bug in the completion route")

    setup.server.app.dependency_overrides[get_generations] = broken  # a fault in the route, provoked
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]})
    client = openai.AsyncOpenAI(base_url=f"{setup.server.url}/v1", api_key=setup.key, http_client=http)
    with pytest.raises(openai.InternalServerError) as caught:  # default retries
        await client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert caught.value.status_code == 500
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.type == "server_error"
    assert "Internal server error (request id " in caught.value.message
    assert "a bug" not in caught.value.message
    assert len(sent) == 1


async def test_an_agent_in_callback_mode_without_a_public_address_is_refused_clearly(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """Without PUBLIC_BASE_URL there is no callback URL for its workflow to post the answer to, and the
    webhook's own answer is n8n's "Workflow was started": a 400 that says so, before n8n is called or the
    quota counted (the acknowledgement was returned as the answer)."""
    await session.execute(
        update(Agent)
        .where(Agent.id == setup.agent.id)
        .values(response_mode="callback", webhook_url=f"{fake.url}/webhook/agent-stream?scenario=callbacks&answer=ack")
    )
    await session.commit()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            await setup.client.chat.completions.create(
                model="helper", messages=[{"role": "user", "content": "hi"}], stream=stream
            )
        assert caught.value.code == "model_not_supported"
        assert "PUBLIC_BASE_URL" in caught.value.message
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0
    assert await count_rows(session, "usage_daily") == 0


@asynccontextmanager
async def callback_client(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, query: str, mode: str = "callback"
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    """The official client against a live server whose PUBLIC_BASE_URL is its own address, for a model whose
    agent runs the fake's `callbacks` scenario with `query` in response mode `mode`; and a plain client."""
    async with served(database_url, tmp_path) as server:
        team = await create_team(session)
        user = await create_user(session, team=team)
        url = f"{fake.url}/webhook/agent-stream?scenario=callbacks&{query}"
        await create_agent(session, team=team, slug="slow", webhook_url=url, response_mode=mode)
        _row, key = await create_key(session=session, settings=server.settings, user=user, name="k", expires_at=None)
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=20)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            yield client, http
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_agent_in_callback_mode_answers_a_completion_by_callback(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, stream: bool
) -> None:
    """n8n gets the completion's own callback URL; the workflow posts the answer there (its steps have no
    place in OpenAI's chunks), its usage, then `done`; the webhook's "Workflow was started" is not the reply.
    The URL is dead once the completion ended."""
    async with callback_client(session, database_url, tmp_path, fake, "answer=ack") as (client, http):
        messages: Any = [{"role": "user", "content": WORDS}]
        if stream:
            chunks = [
                c async for c in await client.chat.completions.create(model="slow", messages=messages, stream=True)
            ]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            answer = await client.chat.completions.create(model="slow", messages=messages)
            text = answer.choices[0].message.content or ""
            assert answer.usage is not None
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (12, 7)
        replayed = await http.post(fake.requests[-1]["json"]["metadata"]["callback_url"], json={"type": "done"})
    assert text == ECHO
    url = fake.requests[-1]["json"]["metadata"]["callback_url"]
    assert "/api/callbacks/" in url
    assert {c["status"] for c in fake.callbacks} == {202}
    assert replayed.status_code == 404
    [row] = (await session.execute(select(UsageRecord))).scalars().all()
    assert (row.outcome, row.chars_out, row.tokens_in, row.tokens_out) == ("complete", len(ECHO), 12, 7)


async def test_a_completion_ended_by_an_error_callback_is_a_502_with_its_message(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    async with callback_client(session, database_url, tmp_path, fake, "answer=ack&end=error") as (client, _http):
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="slow", messages=[{"role": "user", "content": WORDS}])
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    body: Any = caught.value.body
    assert body["message"] == "The workflow failed in node Search"
    assert (await session.execute(select(UsageRecord.outcome))).scalars().all() == ["error"]


async def test_a_stream_mode_agent_gets_a_callback_url_and_a_done_callback_ends_the_completion(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """As for a chat: with PUBLIC_BASE_URL every completion's request carries a callback URL; in stream mode
    the webhook's text is the answer, and callback text joins it, until the first end wins."""
    query = "answer=stall&hang=30"  # two tokens streamed, then silence: the `done` callback ends it
    async with callback_client(session, database_url, tmp_path, fake, query, mode="stream") as (client, _http):
        answer = await client.chat.completions.create(model="slow", messages=[{"role": "user", "content": WORDS}])
    assert answer.choices[0].finish_reason == "stop"
    assert ECHO in (answer.choices[0].message.content or "")
    assert (await session.execute(select(UsageRecord.outcome))).scalars().all() == ["complete"]


async def test_quota_applies_to_completions(session: AsyncSession, setup: Setup, fake: FakeN8n) -> None:
    quota = {"open_registration": False, "quota": {"messages_per_user_per_day": 1}}
    await session.execute(update(Team).where(Team.id == setup.user.team_id).values(settings=quota))
    await session.commit()
    await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "one"}])
    with pytest.raises(openai.RateLimitError) as caught:
        await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "two"}])
    assert caught.value.response.headers["retry-after"]
    assert len(fake.requests) == 1


@pytest.mark.timeout(200)
async def test_a_quota_429_tells_the_official_client_not_to_retry(session: AsyncSession, setup: Setup) -> None:
    """The quota's Retry-After (hours, to midnight UTC) is over the 60 s the client honours, so it retried
    twice at once, each retry refused again: `x-should-retry: false` where waiting cannot help."""
    if (wait := seconds_to_midnight(utcnow())) < 120:
        await asyncio.sleep(wait + 1)  # the day's last two minutes: its Retry-After would be one the client honours
    quota = {"open_registration": False, "quota": {"messages_per_user_per_day": 1}}
    await session.execute(update(Team).where(Team.id == setup.user.team_id).values(settings=quota))
    await session.commit()
    await setup.client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "one"}])
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]})
    client = openai.AsyncOpenAI(base_url=f"{setup.server.url}/v1", api_key=setup.key, http_client=http)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "two"}])
    await client.close()
    assert int(caught.value.response.headers["retry-after"]) > 60
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 1


async def test_an_admins_key_lists_models_as_a_member(session: AsyncSession, setup: Setup, settings: Settings) -> None:
    admin = await create_user(session, team=await session.get(Team, setup.user.team_id), role="admin")
    _row, key = await create_key(session=session, settings=settings, user=admin, name="a", expires_at=None)
    client = openai.AsyncOpenAI(base_url=f"{setup.server.url}/v1", api_key=key, max_retries=0)
    assert [m.id for m in (await client.models.list()).data] == ["helper"]
    await client.close()


# --- shutdown: /v1 completions are drained like chat generations --------------------------------------------


async def _completion_setup(session: AsyncSession, settings: Settings, url: str) -> dict[str, str]:
    team = await create_team(session)
    user = await create_user(session, team=team)
    await create_agent(session, team=team, slug="helper", webhook_url=url)
    _row, key = await create_key(session=session, settings=settings, user=user, name="k", expires_at=None)
    return {"Authorization": f"Bearer {key}"}


async def _until_called(fake: FakeN8n, count: int = 1) -> None:
    async with asyncio.timeout(5):
        while True:
            if len(fake.requests) >= count:
                return
            await asyncio.sleep(0.01)


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=0.3, N8N_READ_TIMEOUT=30)
async def test_shutdown_interrupts_running_completions_after_the_grace(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    headers = await _completion_setup(session, settings, f"{fake.url}/webhook/agent-stream?scenario=stall&hang=30")
    body = {"model": "helper", "messages": [{"role": "user", "content": "hello there"}]}
    plain = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=headers))
    streamed = asyncio.create_task(client.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers))
    await _until_called(fake, 2)
    registry = app_state(app).generations
    assert len(registry.detached) == 2
    await registry.begin_shutdown()
    refused = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "service_unavailable"
    answer, stream = await asyncio.gather(plain, streamed)
    assert answer.status_code == 503
    assert answer.json()["error"] == {
        "message": "The server stopped before the answer was complete",
        "type": "server_error",
        "param": None,
        "code": "interrupted",
    }
    frames = _frames(stream.text)
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])["choices"][0]
    assert (last["finish_reason"], last["error"]["code"]) == ("error", "interrupted")
    assert "".join(json.loads(f)["choices"][0]["delta"].get("content") or "" for f in frames[:-1]) == "Echo: hello"
    assert sorted((await session.execute(select(UsageRecord.outcome))).scalars()) == ["interrupted", "interrupted"]
    assert (await session.execute(select(ErrorLog.code))).scalars().all() == ["interrupted", "interrupted"]
    assert len(fake.requests) == 2


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=5)
async def test_shutdown_lets_a_running_completion_finish(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    headers = await _completion_setup(session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=100")
    body = {"model": "helper", "messages": [{"role": "user", "content": "a b c d"}]}
    pending = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=headers))
    await _until_called(fake)
    await app_state(app).generations.begin_shutdown()
    answer = await pending
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Echo: a b c d"
    assert (await session.execute(select(UsageRecord.outcome))).scalars().all() == ["complete"]
    assert await count_rows(session, "error_logs") == 0


async def test_a_completion_holds_no_database_connection_while_the_agent_thinks(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """The request's session is done once the completion is prepared: a long non-streamed answer (or many at
    once) must not keep a pooled connection idle in its transaction until n8n answers."""
    stall = f"{fake.url}/webhook/agent-stream?scenario=stall&hang=1.5"
    await session.execute(update(Agent).where(Agent.id == setup.agent.id).values(webhook_url=stall))
    await session.commit()
    pool = cast(QueuePool, app_state(setup.server.app).db.engine.pool)
    for stream in (False, True):
        pending = asyncio.create_task(
            setup.client.chat.completions.create(
                model="helper", messages=[{"role": "user", "content": "hello there"}], stream=stream
            )
        )
        await _until_called(fake, 1 + stream)
        await asyncio.sleep(0.3)
        assert pool.checkedout() == 0, f"stream={stream}"
        answer = await pending
        if stream:
            assert isinstance(answer, openai.AsyncStream)
            assert "".join([c.choices[0].delta.content or "" async for c in answer]) == "Echo: hello"
        else:
            assert isinstance(answer, openai.types.chat.ChatCompletion)
            assert answer.choices[0].message.content == "Echo: hello"  # two tokens, the silence, the end


@pytest.mark.settings(METRICS_ENABLED=True)
async def test_a_running_completion_counts_as_an_open_stream(
    session: AsyncSession, setup: Setup, fake: FakeN8n
) -> None:
    """`relay_open_streams` is every generation streaming from n8n: a `/v1` completion was never counted (its
    outcome was, in `relay_generations_total`), so the gauge read 0 while API clients kept n8n busy."""
    slow = f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=400"
    await session.execute(update(Agent).where(Agent.id == setup.agent.id).values(webhook_url=slow))
    await session.commit()

    async def open_streams(http: httpx.AsyncClient) -> float:
        text = (await http.get("/metrics")).text
        return next(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "relay_open_streams"
        )

    async with httpx.AsyncClient(base_url=setup.server.url, timeout=20) as http:
        before = await open_streams(http)
        for stream in (False, True):
            body = {"model": "helper", "messages": [{"role": "user", "content": "hi there"}], "stream": stream}
            sent = asyncio.create_task(
                http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {setup.key}"})
            )
            seen = []
            while not sent.done():
                seen.append(await open_streams(http) - before)
                await asyncio.sleep(0.05)
            assert (await sent).status_code == 200
            assert 1 in seen, seen
            async with asyncio.timeout(5):
                while await open_streams(http) != before:  # noqa: ASYNC110  # the task ends just after the answer
                    await asyncio.sleep(0.02)


# --- a client that leaves: its usage row says `cancelled`, however early it left --------------------------------


async def _prepared(app: FastAPI, session: AsyncSession, settings: Settings, url: str) -> Run:
    """A completion claimed against the quota (as the route does before it answers), not started yet."""
    state = app_state(app)
    team = await create_team(session)
    user = await create_user(session, team=team)
    await create_agent(session, team=team, slug="helper", webhook_url=url)
    async with state.db.sessionmaker() as s:
        completion = await prepare_completion(
            session=s,
            settings=settings,
            user=Caller(id=user.id, team_id=user.team_id),
            model="helper",
            messages=[{"role": "user", "content": "a b c d"}],
            session_header=None,
        )
    return Run(state.generations, completion, state.db, settings)


async def _until_ended(app: FastAPI) -> None:
    async with asyncio.timeout(5):
        while app_state(app).generations.detached:  # noqa: ASYNC110  # each completion's task leaves it as it ends
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("chunks_read", [1, 2], ids=["before-its-task-started", "mid-stream"])
async def test_a_stream_whose_client_left_writes_its_cancelled_usage_row(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n, chunks_read: int
) -> None:
    """The server closes the stream's body when the client left (or sending to it failed). Mid-stream that
    cancels the call to n8n, and the usage row says `cancelled`. Closed just after its first chunk (the role,
    sent before any await), the stream cancelled a task that had not taken its first step: its coroutine never
    ran, so the quota's claim had no usage row (and the metrics no outcome). It now has the same row, with n8n
    not called."""
    run = await _prepared(app, session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=200")
    labels = {"outcome": "cancelled", "agent": str(run.completion.agent_id)}
    before = metrics.REGISTRY.get_sample_value("relay_generations_total", labels) or 0
    stream = cast(AsyncGenerator[bytes, None], _stream(run, usage=False))  # a generator, closed as the server does
    async with asyncio.timeout(5):
        read = [await anext(stream) for _ in range(chunks_read)]
        await stream.aclose()
    assert b'"role":"assistant"' in read[0]
    await _until_ended(app)
    rows = (await session.execute(select(UsageRecord.outcome, UsageRecord.error_code, UsageRecord.chat_id))).all()
    assert [tuple(row) for row in rows] == [("cancelled", None, None)]
    assert await count_rows(session, "error_logs") == 0
    assert metrics.REGISTRY.get_sample_value("relay_generations_total", labels) == before + 1
    assert len(fake.requests) == chunks_read - 1


async def test_a_completion_cut_before_its_first_step_during_a_shutdown_is_recorded_interrupted(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """Run again for a task cancelled before its first step while the registry interrupts (the shutdown's grace
    is over), the completion is `interrupted`, as a chat's generation run again then is (`_run` with `cut`) and
    as a completion cancelled mid-stream then is: a cancel at that point is taken for the shutdown's. It was
    recorded `cancelled` (a client that left) although nothing tells the two apart; that run never calls n8n
    either way. Outside a shutdown the same cut is `cancelled` (the client left as it began:
    test_a_stream_whose_client_left_writes_its_cancelled_usage_row)."""
    run = await _prepared(app, session, settings, f"{fake.url}/webhook/agent-stream")
    registry = app_state(app).generations
    registry.interrupting = True
    try:
        run.start().cancel()
        await _until_ended(app)
    finally:
        registry.interrupting = False
    assert fake.requests == []
    rows = (await session.execute(select(UsageRecord.outcome, UsageRecord.error_code))).all()
    assert [tuple(row) for row in rows] == [("interrupted", "interrupted")]


async def test_a_completion_cancelled_before_its_first_step_is_run_again_once_only(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """Whatever cancels every task it meets before it starts (a loop being closed does) must not meet a new one
    for ever: the task run again for a first cancel is not run again when it is cancelled before its first step
    too (no row then: nothing of it ran)."""
    run = await _prepared(app, session, settings, f"{fake.url}/webhook/agent-stream")
    registry = app_state(app).generations
    first = run.start()
    again: list[asyncio.Task[Any]] = []

    def cancel_the_next(_task: asyncio.Task[Any]) -> None:  # after the run's own done-callback (added first)
        again.extend(task for task in registry.detached if task is not first)
        for task in again:
            task.cancel()

    first.add_done_callback(cancel_the_next)
    first.cancel()
    await _until_ended(app)
    for _ in range(10):  # a third task would be on its way by now
        await asyncio.sleep(0)
    assert not registry.detached
    assert len(again) == 1
    assert again[0].cancelled()
    assert fake.requests == []
    assert await count_rows(session, "usage_records") == 0
