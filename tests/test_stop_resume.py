"""Stop and follow (POST /api/chats/{id}/stop, GET /api/chats/{id}/stream) against a live uvicorn."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Team, UsageRecord
from app.security import Caller
from app.services.messages import NewGeneration, start_message
from app.sse import event_of
from app.state import app_state
from tests.conftest import REDIS_URL, count_rows, make_settings
from tests.factories import auth_headers, create_admin, create_user
from tests.live import SSE, ChatSetup, EventReader, chat_with_agent, live_server, streamed_text
from tests.test_stream_live import FAST, assistant_of, idle, settled
from tools.fake_n8n import FakeN8n

pytestmark = pytest.mark.slow

#: 200 chunks 20 ms apart: about 4 s, long enough to stop or follow in the middle.
LONG = "scenario=paced&chunks=200&interval_ms=20"


def live_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(database_url, tmp_path, **{**FAST, "N8N_READ_TIMEOUT": 5, **overrides})


def send(
    client: httpx.AsyncClient, setup: ChatSetup, content: str = "hello there", *, key: str | None = None
) -> EventReader:
    headers = setup.headers if key is None else {**setup.headers, "Idempotency-Key": key}
    return EventReader(
        client, "POST", f"/api/chats/{setup.chat.id}/messages", json={"content": content}, headers=headers
    )


def follow(
    client: httpx.AsyncClient, setup: ChatSetup, *, headers: dict[str, str] | None = None, **params: Any
) -> EventReader:
    return EventReader(
        client, "GET", f"/api/chats/{setup.chat.id}/stream", headers={**setup.headers, **(headers or {})}, params=params
    )


def has_text(reader: EventReader, words: int = 3) -> bool:
    return len(streamed_text(reader.data).split()) >= words


def ids(events: list[SSE]) -> list[int]:
    return [int(e.id or 0) for e in events]


async def test_stop_stores_cancelled_before_answering_and_ends_every_stream_with_done(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sender = send(client, setup)
            await sender.wait_for(has_text)
            start = sender.data[0].data["data"]  # type: ignore[index]
            follower = follow(client, setup, assistant_message_id=start["assistant_message_id"])
            await follower.wait_for(lambda r: len(r.data) > 1)
            response = await client.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers)
            assert response.status_code == 200
            answered = response.json()
            # The task, and with it the request to n8n, ended before the answer.
            assert server.running_generations() == 0
            # Stored before the answer: the database already says so.
            stored = await assistant_of(app, setup.chat.id)
            assert (stored["status"], stored["content"]) == ("cancelled", answered["content"])
            first, second = await sender.finish(), await follower.finish()
        await idle(server)
    assert answered["status"] == "cancelled"
    assert answered["id"] == start["assistant_message_id"]
    assert answered["error"] is None
    assert 0 < len(answered["content"]) < len(" ".join(f"t{i}" for i in range(200)))
    for events in (first, second):
        assert events[-1].type == "done"
        assert events[-1].data["data"]["message"] == answered  # type: ignore[index]
        assert [e.type for e in events].count("done") == 1
    assert streamed_text(first) == answered["content"]
    assert ids(first) == list(range(1, len(first) + 1))
    # The follower's events are the same events with the same ids.
    assert [(e.id, e.data) for e in second] == [(e.id, e.data) for e in first[ids(second)[0] - 1 :]]
    assert len(fake.requests) == 1
    # The request to n8n was closed: the fake's next write (20 ms later) found the connection gone, long
    # before its 4 s answer would have ended on its own.
    async with asyncio.timeout(1.5):
        while not fake.requests[0]["client_closed"]:  # noqa: ASYNC110  # the fake records, it does not signal
            await asyncio.sleep(0.02)
    async with app_state(app).db.sessionmaker() as s:
        assert await count_rows(s, "error_logs") == 0


async def test_deleting_a_chat_stops_its_answer_and_ends_its_streams_with_chat_deleted(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """The answer of a deleted chat went on to its end (nothing could stop it: the chat's stop is a 404), then
    ended with a `done` naming a message that was never stored. Now the deletion stops it: n8n's request is
    closed, every stream ends `chat_deleted`, the usage is counted as cancelled, and a retry is the chat's 404."""
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        url = f"/api/chats/{setup.chat.id}"
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sender = send(client, setup, key="k1")
            await sender.wait_for(has_text)
            follower = follow(client, setup)
            await follower.wait_for(lambda r: len(r.data) > 1)
            assert (await client.delete(url, headers=setup.headers)).status_code == 204
            first, second = await sender.finish(within=5), await follower.finish(within=5)
            retry = await client.post(
                f"{url}/messages", json={"content": "hello there"}, headers={**setup.headers, "Idempotency-Key": "k1"}
            )
        await idle(server)
    for events in (first, second):
        assert [e.type for e in events][-1] == "error"
        assert events[-1].data["data"] == {"message": "The chat was deleted", "code": "chat_deleted"}  # type: ignore[index]
        assert "done" not in [e.type for e in events]
    assert (retry.status_code, retry.json()) == (404, {"detail": "Chat not found"})
    async with asyncio.timeout(1.5):
        while not fake.requests[0]["client_closed"]:  # noqa: ASYNC110  # the fake records, it does not signal
            await asyncio.sleep(0.02)
    async with app_state(app).db.sessionmaker() as s:
        assert (await count_rows(s, "chats"), await count_rows(s, "messages")) == (0, 0)
        [row] = (await s.execute(select(UsageRecord))).scalars().all()
        assert (row.chat_id, row.outcome) == (setup.chat.id, "cancelled")
        assert 0 < row.chars_out < len(" ".join(f"t{i}" for i in range(200)))


async def test_stop_of_a_foreign_chat_is_404_and_changes_nothing(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        stranger = auth_headers(settings, await create_user(session))
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sender = send(client, setup)
            await sender.wait_for(has_text)
            for url in (f"/api/chats/{setup.chat.id}/stop", f"/api/chats/{uuid.uuid4()}/stop"):
                response = await client.post(url, headers=stranger)
                assert response.status_code == 404
                assert response.json() == {"detail": "Chat not found"}
            followed = await client.get(f"/api/chats/{setup.chat.id}/stream", headers=stranger)
            assert followed.status_code == 404
            assert (await client.post(f"/api/chats/{setup.chat.id}/stop")).status_code == 401
            assert server.running_generations() == 1
            events = await sender.finish()
        await idle(server)
    assert events[-1].type == "done"
    assert (await assistant_of(app, setup.chat.id))["status"] == "complete"


async def test_stop_with_nothing_running_is_409(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            url = f"/api/chats/{setup.chat.id}/stop"
            empty = await client.post(url, headers=setup.headers)
            await send(client, setup).finish()
            ended = await client.post(url, headers=setup.headers)
        await idle(server)
    for response in (empty, ended):
        assert response.status_code == 409
        assert response.json() == {"detail": "No generation is running in this chat"}
    assert (await assistant_of(app, setup.chat.id))["status"] == "complete"


async def test_stop_racing_the_natural_end_stores_exactly_one_final_state(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """Stops sent as the answer ends (a 6-chunk answer, stops after 0-60 ms): either the stop wins (200,
    `cancelled`) or the end does (409, `complete`); the stored message and the stream's single `done` agree."""
    # Not FAST's 0.5 s to n8n's first byte: on a loaded machine a send then ended `upstream_timeout`.
    settings = live_settings(database_url, tmp_path, N8N_FIRST_BYTE_TIMEOUT=5)
    outcomes = set()
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=5")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for attempt in range(12):
                sender = send(client, setup, content="one two three four")
                await sender.wait_for(lambda r: len(r.data) >= 1)
                await asyncio.sleep(attempt * 0.005)
                response = await client.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers)
                events = await sender.finish()
                stored = await settled(app, setup.chat.id)
                done = [e for e in events if e.type in ("done", "error")]
                assert len(done) == 1
                assert done[0].type == "done", done[0].data
                assert done[0].data["data"]["message"]["status"] == stored["status"]  # type: ignore[index]
                assert streamed_text(events) == stored["content"]
                if response.status_code == 200:
                    assert stored["status"] == "cancelled"
                    assert response.json()["content"] == stored["content"]
                else:
                    assert response.status_code == 409
                    assert stored["status"] == "complete"
                outcomes.add(stored["status"])
        await idle(server)
    assert outcomes <= {"cancelled", "complete"}


async def stored_send(app: FastAPI, settings: Settings, setup: ChatSetup) -> NewGeneration:
    """A send's rows committed (the question and the answer's `streaming` placeholder), its generation not
    registered yet: `registry.start` does that."""
    async with app_state(app).db.sessionmaker() as s:
        return await start_message(
            session=s,
            settings=settings,
            user=Caller(id=setup.user.id, team_id=setup.user.team_id),
            chat_id=setup.chat.id,
            content="hello",
            worker_id=app_state(app).generations.worker_id,
        )


async def test_stop_before_the_generation_task_ran_stores_cancelled_and_calls_no_one(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A stop that lands between the task's creation and its first step (the same loop iteration: another
    request's stop, or one from another instance): the task is cancelled before its body runs, so nothing
    of `_run` (its final write included) would run. The answer is still stored `cancelled`, once."""
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    registry = app_state(app).generations
    new = await stored_send(app, settings, setup)
    generation = registry.start(new)
    async with asyncio.timeout(10):
        stored = await registry.stop(generation)  # no await in between: the task has not started
    assert stored is not None
    assert (stored["status"], stored["content"]) == ("cancelled", "")
    assert (await assistant_of(app, setup.chat.id))["status"] == "cancelled"
    assert generation.terminal == "done"
    assert fake.requests == []
    async with app_state(app).db.sessionmaker() as s:
        assert await count_rows(s, "usage_records") == 1


@pytest.mark.usefixtures("redis_url")  # flushed before and after
@pytest.mark.settings(REDIS_URL=REDIS_URL, STREAM_PING_INTERVAL=0.2)
async def test_a_generation_task_cancelled_before_its_first_step_still_ends_its_streams_and_its_row(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """asyncio cancels a task that has not taken its first step without ever starting its coroutine: none of
    `_run` ran (no final write, no terminal event), so every reader got keep-alives until its connection closed
    and the answer stayed `streaming` until recovery. Whoever cancels it (the registry's own stop and drain do
    not), the answer now ends `interrupted`, with n8n not called, for the sender's stream, a follower on this
    instance and one reading the shared log (as another instance does)."""
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    registry = app_state(app).generations
    assert registry.shared is not None
    new = await stored_send(app, settings, setup)
    generation = registry.start(new)
    assert generation.task is not None
    generation.task.cancel()  # no await since `start`: the coroutine has not started
    sender = b""
    async with asyncio.timeout(10):
        async for chunk in generation.sse(settings.STREAM_PING_INTERVAL):
            sender += chunk
        followed = await client.get(f"/api/chats/{setup.chat.id}/stream", headers=setup.headers)
        shared = await registry.shared.follow(setup.chat.id, new.assistant_id, 0, settings.STREAM_PING_INTERVAL)
        assert shared is not None
        relayed = b"".join([chunk async for chunk in shared])
    interrupted = {"message": "The server stopped before the answer was complete", "code": "interrupted"}
    for stream in (sender, followed.content, relayed):
        events = [event_of(block) for block in stream.split(b"\n\n") if b"data:" in block]
        assert [kind for kind, _data in events] == ["start", "status", "error"], stream
        assert events[-1][1] == interrupted
    stored = await assistant_of(app, setup.chat.id)
    assert (stored["status"], stored["error"]) == ("interrupted", interrupted)
    assert fake.requests == []
    async with app_state(app).db.sessionmaker() as s:
        assert await count_rows(s, "usage_records") == 1
    assert registry.running_in(setup.chat.id) is None


async def test_a_stop_after_a_cancel_before_the_first_step_stores_cancelled(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A stop that comes while the task cancelled before its first step is being run again: the new task sees
    `stopping` as it starts, and the answer is `cancelled` (`done`), as for any stop, stored once."""
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    registry = app_state(app).generations
    new = await stored_send(app, settings, setup)
    generation = registry.start(new)
    assert generation.task is not None
    generation.task.cancel()
    async with asyncio.timeout(10):
        stored = await registry.stop(generation)
    assert stored is not None
    assert (stored["status"], stored["content"]) == ("cancelled", "")
    assert generation.terminal == "done"
    assert fake.requests == []
    async with app_state(app).db.sessionmaker() as s:
        assert await count_rows(s, "usage_records") == 1


async def test_a_task_cancelled_before_its_first_step_is_run_again_once_only(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """Whatever cancels every task it meets before it starts (a loop being closed does) must not meet a new one
    for ever: the task run again for a first cancel is not run again when it is cancelled before its first
    step too. The registry lets the generation go as for any ended task."""
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    registry = app_state(app).generations
    new = await stored_send(app, settings, setup)
    generation = registry.start(new)
    first = generation.task
    assert first is not None
    # After the registry's own done-callback (added first) has run the generation again, and before that new
    # task's first step: cancel it too.
    first.add_done_callback(lambda _t: generation.task.cancel() if generation.task is not None else None)
    first.cancel()
    async with asyncio.timeout(5):
        await asyncio.wait([first])
    second = generation.task
    assert second is not None
    assert second is not first
    async with asyncio.timeout(5):
        await asyncio.wait([second])
    for _ in range(10):  # a third task would be on its way by now
        await asyncio.sleep(0)
    assert new.assistant_id not in registry.running  # let go, as any ended task's generation
    assert generation.task is second
    assert second.cancelled()
    assert fake.requests == []


async def test_a_chat_deleted_before_its_answer_was_registered_stops_it_before_n8n_is_called(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A deletion reads the chat's running answer as soon as the send's rows are committed, which can be before
    the send registered its generation (one instance, no Redis): there was nothing to stop, and the answer ran
    on in n8n to its end. Remembered for a moment, the generation starts stopped: n8n is not called, and its
    stream ends `chat_deleted`."""
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    registry = app_state(app).generations
    new = await stored_send(app, settings, setup)
    deleted = await client.delete(f"/api/chats/{setup.chat.id}", headers=setup.headers)
    assert deleted.status_code == 204
    generation = registry.start(new)
    async with asyncio.timeout(10):
        await generation.ended()
    assert generation.terminal == "error"
    assert event_of(generation.frames[-1])[1]["code"] == "chat_deleted"
    assert fake.requests == []


async def test_follow_after_a_reload_gives_the_rest_with_the_original_ids(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """The text of the first connection's events up to N plus the follower's equals the stored answer."""
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sender = send(client, setup)
            await sender.wait_for(lambda r: has_text(r, 10))
            await sender.leave()  # the reload
            seen = sender.data
            last = seen[-1].id
            assistant_id = seen[0].data["data"]["assistant_message_id"]  # type: ignore[index]
            follower = follow(client, setup, headers={"Last-Event-ID": str(last)}, assistant_message_id=assistant_id)
            rest = await follower.finish()
            stored = await settled(app, setup.chat.id)
            # After the end, within the log's lifetime: the tail again, and 204 once everything was seen.
            end = ids(rest)[-1]
            tail = await follow(client, setup, last_event_id=str(end - 1)).finish()
            nothing = await client.get(
                f"/api/chats/{setup.chat.id}/stream", headers={**setup.headers, "Last-Event-ID": str(end)}
            )
        await idle(server)
    assert follower.status_code == 200
    assert ids(seen + rest) == list(range(1, len(seen) + len(rest) + 1))
    assert streamed_text(seen) + streamed_text(rest) == stored["content"]
    assert stored["status"] == "complete"
    assert rest[-1].type == "done"
    assert [(e.id, e.type) for e in tail] == [(rest[-1].id, "done")]
    assert nothing.status_code == 204


async def test_a_last_event_id_beyond_the_running_generation_gives_it_from_its_start(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """An EventSource reconnecting with an older, longer answer's id: this generation never had it, so it is
    given whole, to its terminal event (a follower that skipped to that id waited and got no end)."""
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sender = send(client, setup)
            await sender.wait_for(has_text)
            tab = follow(client, setup, headers={"Last-Event-ID": "100000"})
            first, followed = await sender.finish(), await tab.finish()
        await idle(server)
    assert tab.status_code == 200
    assert first[-1].type == "done"
    assert [(e.id, e.data) for e in followed] == [(e.id, e.data) for e in first]


async def test_two_followers_get_the_same_events(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sender = send(client, setup)
            await sender.wait_for(has_text)
            tabs = [follow(client, setup), follow(client, setup, headers={"Last-Event-ID": "0"})]
            first = await sender.finish()
            seen = [await tab.finish() for tab in tabs]
        await idle(server)
    for events in seen:
        assert [(e.id, e.data) for e in events] == [(e.id, e.data) for e in first]


async def test_follow_refusals_and_nothing_to_follow(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
        url = f"/api/chats/{setup.chat.id}/stream"
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            assert (await client.get(url, headers=setup.headers)).status_code == 204
            for bad in ("x", "-1", "1e3", "9" * 10):
                response = await client.get(url, headers={**setup.headers, "Last-Event-ID": bad})
                assert response.status_code == 422
                assert bad not in response.text
                assert response.json()["detail"][0]["loc"] == ["header", "last-event-id"]
                # The same in the query: the refusal names the query parameter, the field that was sent.
                response = await client.get(url, headers=setup.headers, params={"last_event_id": bad})
                assert response.status_code == 422
                assert response.json()["detail"][0]["loc"] == ["query", "last_event_id"]
            # A non-ASCII digit (Arabic-Indic one) in the query form: refused too, not read as 1.
            arabic_one = await client.get(url, headers=setup.headers, params={"last_event_id": "\u0661"})
            assert arabic_one.status_code == 422
            named = await client.get(url, headers=setup.headers, params={"assistant_message_id": str(uuid.uuid4())})
            assert named.status_code == 204
            assert (
                await client.get(url, headers=setup.headers, params={"assistant_message_id": "x"})
            ).status_code == 422
            assert (await client.get(url)).status_code == 401
            events = await send(client, setup).finish()
            # A follow is the same stream for proxies: not cached, not compressed, not buffered.
            tail = await client.get(url, headers={**setup.headers, "Last-Event-ID": "1"})
            assert tail.status_code == 200
            assert tail.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert tail.headers["cache-control"] == "no-cache, no-transform"
            assert tail.headers["x-accel-buffering"] == "no"
            assert "content-length" not in tail.headers
            # Another chat's generation id never answers under this chat.
            other = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
            assistant_id = events[0].data["data"]["assistant_message_id"]  # type: ignore[index]
            foreign = await client.get(
                f"/api/chats/{other.chat.id}/stream",
                headers=other.headers,
                params={"assistant_message_id": assistant_id},
            )
            assert foreign.status_code == 204
        await idle(server)


async def test_an_agent_edited_and_deactivated_while_it_answers_finishes_that_answer_as_it_started(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """The running answer keeps the agent as it was when it started (URL, secret headers): an admin's edit
    or deactivation meanwhile changes the next send, which an inactive agent refuses (409), not this one.
    Following it and stopping it work as for any answer."""
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(
            session, settings, f"{fake.url}/webhook/agent-stream?{LONG}", webhook_headers={"X-Auth": "first"}
        )
        admin = auth_headers(
            settings, await create_admin(session, team=await session.get_one(Team, setup.user.team_id))
        )
        agent_url = f"/api/agents/{setup.agent.id}"
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sender = send(client, setup)
            await sender.wait_for(has_text)
            edited = await client.put(
                agent_url,
                json={"webhook_url": f"{fake.url}/webhook/other", "webhook_headers": {"X-Auth": "second"}},
                headers=admin,
            )
            assert edited.status_code == 200
            assert (await client.delete(agent_url, headers=admin)).status_code == 204
            follower = follow(client, setup)
            await follower.wait_for(lambda r: len(r.data) > 1)
            stopped = await client.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers)
            first, second = await sender.finish(), await follower.finish()
            refused = await client.post(
                f"/api/chats/{setup.chat.id}/messages", json={"content": "again"}, headers=setup.headers
            )
        await idle(server)
    assert stopped.status_code == 200
    for events in (first, second):
        assert events[-1].type == "done"
        assert events[-1].data["data"]["message"] == stopped.json()  # type: ignore[index]
    assert (await assistant_of(app, setup.chat.id))["status"] == "cancelled"
    assert refused.status_code == 409
    [request] = fake.requests
    assert (request["path"], request["headers"]["X-Auth"]) == ("/webhook/agent-stream", "first")
