"""Several instances on one PostgreSQL and one Redis: follow, stop and retries work whichever one is asked."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from tests.factories import DEFAULT_PASSWORD
from tests.live import SSE, EventReader, RedisProcess, chat_with_agent, streamed_text
from tests.test_stop_resume import LONG, has_text, live_settings
from tests.test_stream_live import _start_subprocess, assistant_of, settled
from tools.fake_n8n import FakeN8n

pytestmark = pytest.mark.slow
FAST_INSTANCE = {"STREAM_PING_INTERVAL": "0.2", "N8N_READ_TIMEOUT": "5", "SHUTDOWN_GRACE_SECONDS": "0.5"}


@asynccontextmanager
async def instance(
    settings: Settings, redis_url: str, **env: str
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """`uvicorn main:create_app` as its own process, sharing the test database and the given Redis (`env`: more
    settings, over FAST_INSTANCE)."""
    process, port = await _start_subprocess(settings, REDIS_URL=redis_url, **{**FAST_INSTANCE, **env})
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@asynccontextmanager
async def two_instances(
    settings: Settings, redis_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, asyncio.subprocess.Process]]:
    """Instances A and B (`instance`), a client for each, and A's process (to kill it)."""
    async with instance(settings, redis_url) as (url_a, process_a), instance(settings, redis_url) as (url_b, _b):
        async with (
            httpx.AsyncClient(base_url=url_a, timeout=10) as a,
            httpx.AsyncClient(base_url=url_b, timeout=10) as b,
        ):
            yield a, b, process_a


def pairs(events: list[SSE]) -> list[tuple[str | None, object]]:
    return [(e.id, e.data) for e in events]


async def test_two_instances_follow_stop_and_retry_whichever_gets_the_request(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, redis_url: str
) -> None:
    settings = live_settings(database_url, tmp_path)
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    messages = f"/api/chats/{setup.chat.id}/messages"
    keyed = {**setup.headers, "Idempotency-Key": "two-instances"}
    async with two_instances(settings, redis_url) as (a, b, _process_a):
        sender = EventReader(a, "POST", messages, json={"content": "hi"}, headers=keyed)
        await sender.wait_for(has_text)
        start = sender.data[0].data["data"]  # type: ignore[index]
        seen = sender.data[-1].id
        # B follows A's generation from where the client was, and a retry sent to B answers A's stream.
        follower = EventReader(
            b,
            "GET",
            f"/api/chats/{setup.chat.id}/stream",
            headers={**setup.headers, "Last-Event-ID": str(seen)},
            params={"assistant_message_id": start["assistant_message_id"]},
        )
        await follower.wait_for(lambda r: len(r.data) > 0)
        retry = EventReader(b, "POST", messages, json={"content": "hi"}, headers=keyed)
        await retry.wait_for(has_text)
        # A second send while it runs, to the other instance: 409, as on one instance.
        running = await b.post(messages, json={"content": "another"}, headers=setup.headers)
        # Stop sent to B stops the generation running on A.
        stopped = await b.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers)
        first, followed, retried = await sender.finish(), await follower.finish(), await retry.finish()
        # Then a generation on B, followed from A from its start.
        second = EventReader(b, "POST", messages, json={"content": "two"}, headers=setup.headers)
        await second.wait_for(has_text)
        tab = EventReader(a, "GET", f"/api/chats/{setup.chat.id}/stream", headers=setup.headers)
        second_events, tab_events = await second.finish(), await tab.finish()
    assert running.status_code == 409
    assert stopped.status_code == 200
    answer = stopped.json()
    assert answer["status"] == "cancelled"
    assert first[-1].type == "done"
    assert first[-1].data["data"]["message"] == answer  # type: ignore[index]
    assert streamed_text(first) == answer["content"]
    assert pairs(followed) == pairs(first)[int(seen or 0) :]
    assert pairs(retried) == pairs(first)
    assert pairs(tab_events) == pairs(second_events)
    assert second_events[-1].type == "done"
    assert len(fake.requests) == 2
    stored = await settled(app, setup.chat.id)
    assert stored["status"] == "complete"


async def test_deleting_a_chat_on_another_instance_stops_its_answer(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, redis_url: str
) -> None:
    """The deletion, sent to B, stops the answer running on A (through Redis, as a stop would): n8n's request
    closes and A's stream ends `chat_deleted`; a retry of the send, to either instance, is the chat's 404."""
    settings = live_settings(database_url, tmp_path)
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    messages = f"/api/chats/{setup.chat.id}/messages"
    keyed = {**setup.headers, "Idempotency-Key": "deleted"}
    async with two_instances(settings, redis_url) as (a, b, _process_a):
        sender = EventReader(a, "POST", messages, json={"content": "hi"}, headers=keyed)
        await sender.wait_for(has_text)
        deleted = await b.delete(f"/api/chats/{setup.chat.id}", headers=setup.headers)
        events = await sender.finish(within=5)
        retries = [await client.post(messages, json={"content": "hi"}, headers=keyed) for client in (a, b)]
    assert deleted.status_code == 204
    assert events[-1].type == "error"
    assert events[-1].data["data"]["code"] == "chat_deleted"  # type: ignore[index]
    assert [r.status_code for r in retries] == [404, 404]
    assert fake.requests[0]["client_closed"]
    rows = (await session.execute(text("SELECT outcome FROM usage_records"))).all()
    assert [r.outcome for r in rows] == ["cancelled"]


async def test_followers_on_another_instance_get_a_terminal_event_when_the_owner_dies(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, redis_url: str
) -> None:
    settings = live_settings(database_url, tmp_path)
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    async with two_instances(settings, redis_url) as (a, b, process_a):
        sender = EventReader(
            a, "POST", f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers
        )
        await sender.wait_for(has_text)
        follower = EventReader(b, "GET", f"/api/chats/{setup.chat.id}/stream", headers=setup.headers)
        await follower.wait_for(has_text)
        process_a.send_signal(signal.SIGKILL)
        await process_a.wait()
        await sender.leave()
        events = await follower.finish(within=20)
    assert events[-1].type == "error"
    assert events[-1].data["data"]["code"] == "interrupted"  # type: ignore[index]
    ids = [int(e.id or 0) for e in events]
    assert ids == list(range(1, len(events) + 1))
    stored = await assistant_of(app, setup.chat.id)
    assert stored["status"] == "interrupted"
    assert streamed_text(events).startswith(stored["content"])


# Answers of 2 and 3 s: the follow must reach B while the answer runs (one that has ended below the id is a 204,
# on its owner as elsewhere); a 0.4 s answer had ended first on a loaded machine.
@pytest.mark.parametrize(("chunks", "interval_ms"), [(40, 50), (1500, 2)])
async def test_a_follower_on_another_instance_with_an_id_beyond_the_generation_gets_it_whole(
    session: AsyncSession,
    database_url: str,
    tmp_path: Path,
    fake: FakeN8n,
    redis_url: str,
    chunks: int,
    interval_ms: int,
) -> None:
    """A `Last-Event-ID` from an older, longer answer, sent to an instance that follows through Redis (where a
    short lag behind the owner is normal, so the id cannot be judged at once): once the generation ended
    below that id, it is given whole, under its own ids, as its owner gives it; never an id it never had.
    Whole also past 1000 events (one XREAD's count): it was cut there, with no terminal event."""
    settings = live_settings(database_url, tmp_path)
    url = f"{fake.url}/webhook/agent-stream?scenario=paced&chunks={chunks}&interval_ms={interval_ms}"
    setup = await chat_with_agent(session, settings, url)
    async with two_instances(settings, redis_url) as (a, b, _process_a):
        sender = EventReader(
            a, "POST", f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers
        )
        await sender.wait_for(lambda r: len(r.data) >= 2)
        follower = EventReader(
            b, "GET", f"/api/chats/{setup.chat.id}/stream", headers={**setup.headers, "Last-Event-ID": "100000"}
        )
        first, followed = await sender.finish(within=20), await follower.finish(within=20)
    assert first[-1].type == "done"
    assert chunks < 1000 or len(first) > 1000  # (reads may join chunks into one event)
    assert pairs(followed) == pairs(first)


async def test_after_logout_the_first_send_to_another_instance_is_refused(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, redis_url: str
) -> None:
    """A send checks the token in the statement that starts it (app.services.fast_start), so the promise
    holds across instances: once logout's 204 came from A, the very next send to B with that token is 401 and
    stores nothing, and its refresh token is dead there too."""
    settings = live_settings(database_url, tmp_path)
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream")
    messages = f"/api/chats/{setup.chat.id}/messages"
    async with two_instances(settings, redis_url) as (a, b, _process_a):
        login = await a.post("/api/auth/login", json={"email": setup.user.email, "password": DEFAULT_PASSWORD})
        assert login.status_code == 200
        tokens = login.json()
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        # Both instances have run (and prepared) the one-statement start with this token.
        for client in (a, b):
            sent = await client.post(messages, json={"content": "before"}, headers=bearer)
            assert sent.status_code == 200, sent.text
            assert '"type": "done"' in sent.text
        logout = await a.post("/api/auth/logout", headers=bearer, json={"refresh_token": tokens["refresh_token"]})
        assert logout.status_code == 204
        after = await b.post(messages, json={"content": "after"}, headers=bearer)
        refreshed = await b.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert after.status_code == 401
    assert refreshed.status_code == 401
    stored = await session.execute(text("SELECT content FROM messages WHERE role = 'user' ORDER BY created_at"))
    assert [row.content for row in stored] == ["before", "before"]


async def test_a_stop_that_cannot_reach_the_instance_running_the_answer_is_a_503(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """With Redis down, a stop sent to an instance that does not run the answer cannot reach the one that does:
    it said 409 "No generation is running in this chat" while the answer ran on. It is now a 503 to retry."""
    own = RedisProcess(tmp_path)
    await own.start()
    settings = live_settings(database_url, tmp_path)
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
    try:
        async with two_instances(settings, own.url) as (a, b, _process_a):
            sender = EventReader(
                a, "POST", f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers
            )
            await sender.wait_for(has_text)
            await own.stop()
            refused = await b.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers)
            assert (await assistant_of(app, setup.chat.id))["status"] == "streaming"  # it runs on
            stopped = await a.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers)  # on its own instance
            await sender.finish()
    finally:
        await own.stop()
    assert refused.status_code == 503
    assert refused.json() == {"detail": "The instance running this answer cannot be reached right now; try again"}
    assert refused.headers["retry-after"] == "5"
    assert stopped.status_code == 200


async def test_followers_of_another_instances_answer_do_not_hold_a_stopping_instance(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, redis_url: str
) -> None:
    """SIGTERM to B while B relays A's answer to a follower and to an idempotent retry: B's drain has nothing of
    its own to wait for, yet uvicorn waited for those two streams until its graceful-shutdown timeout (for ever
    without one), then cut them mid-response. They now end cleanly once B's grace is over (no terminal event:
    the answer runs on), B stops within it, and each client resumes on A after the last id it got."""
    settings = live_settings(database_url, tmp_path)
    setup = await chat_with_agent(
        session, settings, f"{fake.url}/webhook/agent-stream?scenario=paced&chunks=200&interval_ms=50"
    )
    messages = f"/api/chats/{setup.chat.id}/messages"
    keyed = {**setup.headers, "Idempotency-Key": "leaving"}
    async with instance(settings, redis_url) as (url_a, _process_a):
        process_b, port_b = await _start_subprocess(
            settings, "--timeout-graceful-shutdown", "20", REDIS_URL=redis_url, **FAST_INSTANCE
        )
        try:
            async with (
                httpx.AsyncClient(base_url=url_a, timeout=30) as a,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_b}", timeout=30) as b,
            ):
                sender = EventReader(a, "POST", messages, json={"content": "hi"}, headers=keyed)
                await sender.wait_for(has_text)
                follower = EventReader(b, "GET", f"/api/chats/{setup.chat.id}/stream", headers=setup.headers)
                retry = EventReader(b, "POST", messages, json={"content": "hi"}, headers=keyed)
                await follower.wait_for(has_text)
                await retry.wait_for(has_text)
                signalled = asyncio.get_running_loop().time()
                process_b.send_signal(signal.SIGTERM)
                followed, retried = await follower.finish(within=10), await retry.finish(within=10)
                async with asyncio.timeout(10):
                    await process_b.wait()
                stopped_after = asyncio.get_running_loop().time() - signalled
                resumed = EventReader(
                    a,
                    "GET",
                    f"/api/chats/{setup.chat.id}/stream",
                    headers={**setup.headers, "Last-Event-ID": str(followed[-1].id)},
                )
                first, rest = await sender.finish(within=60), await resumed.finish(within=60)
        finally:
            if process_b.returncode is None:
                process_b.kill()
                await process_b.wait()
    assert stopped_after < 0.5 + 5  # the grace (0.5 s) and the followers' margin, not uvicorn's 20 s
    for events in (followed, retried):
        assert events[-1].type == "message"  # no terminal event: the answer was still running on A
        assert pairs(events) == pairs(first)[int(events[0].id or 0) - 1 : int(events[-1].id or 0)]
    assert first[-1].type == "done"
    assert pairs(followed) + pairs(rest) == pairs(first)[int(followed[0].id or 0) - 1 :]
