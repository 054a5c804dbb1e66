"""Redis is an accelerator: stopped and started again mid-run (a redis-server of the test's own), nothing is
lost and no request is refused for want of it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from app import eventlog, generations
from app.config import Settings
from app.db import Database
from app.eventlog import log_key
from app.sse import Generation, event_of, frame
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import bearer, login
from tests.factories import create_chat
from tests.live import (
    SSE,
    EventReader,
    FreezingProxy,
    RedisProcess,
    chat_with_agent,
    fill_pool,
    live_server,
    parse_sse,
    streamed_text,
)
from tests.test_stop_resume import LONG, has_text, live_settings, send
from tests.test_stream_live import assistant_of, first_checkpoint, settled
from tools.fake_n8n import FakeN8n

pytestmark = pytest.mark.slow


def pairs(events: list[SSE]) -> list[tuple[str | None, object]]:
    return [(e.id, e.data) for e in events]


async def until_true(value: Callable[[], Awaitable[Any]], within: float = 10) -> None:
    """Until `value()` is truthy (polled), within `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            if await value():
                return
            await asyncio.sleep(0.02)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a listener task and wait for it to end."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def redis_log(url: str, key: str, *, within: float = 10) -> list[bytes]:
    """The frames of a generation's Redis log once it holds its terminal event."""
    client = aioredis.from_url(url)
    try:
        async with asyncio.timeout(within):
            while True:
                rows: Any = await client.xrange(key)
                if rows and rows[-1][1].get(b"e"):
                    return [bytes(fields[b"f"]) for _id, fields in rows]
                await asyncio.sleep(0.1)
    finally:
        await client.aclose()


async def test_redis_stopped_and_started_mid_run_refuses_nothing_and_loses_nothing(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    own = RedisProcess(tmp_path)
    await own.start()
    try:
        settings = live_settings(database_url, tmp_path, REDIS_URL=own.url)
        async with live_server(settings) as server:
            setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
            echo_chat = await create_chat(session, user=setup.user, agent=setup.agent)
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                assert (await client.get("/ready")).json() == {"status": "ready"}
                first_login = await login(client, setup.user.email)
                assert first_login.status_code == 200
                sender = send(client, setup, key="outage")
                await sender.wait_for(has_text)

                await own.stop()  # ------------------------------------------------ Redis down
                ready = await client.get("/ready")
                assert (ready.status_code, ready.json()) == (200, {"status": "degraded"})
                # Logins (rate limited per process now) and authenticated requests are served.
                during_login = await login(client, setup.user.email)
                assert during_login.status_code == 200
                token = during_login.json()["access_token"]
                assert (await client.get("/api/auth/me", headers=bearer(token))).status_code == 200
                # A revocation while Redis is down holds (it is a database row) ...
                assert (await client.post("/api/auth/logout", headers=bearer(token))).status_code == 204
                assert (await client.get("/api/auth/me", headers=bearer(token))).status_code == 401
                # ... follow, an idempotent retry and stop work on this instance.
                follower = EventReader(client, "GET", f"/api/chats/{setup.chat.id}/stream", headers=setup.headers)
                retry = send(client, setup, key="outage")
                await follower.wait_for(has_text)
                stopped = await client.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers)
                assert stopped.status_code == 200
                first, followed, retried = await sender.finish(), await follower.finish(), await retry.finish()
                assert first[-1].data["data"]["message"]["status"] == "cancelled"  # type: ignore[index]
                assert pairs(followed) == pairs(first)
                assert pairs(retried) == pairs(first)
                # A new generation starts and completes.
                url = f"/api/chats/{echo_chat.id}/messages"
                plain = await client.post(url, json={"content": "during"}, headers=setup.headers)
                assert plain.status_code == 200
                assert '"type": "done"' in plain.text

                await own.start()  # ----------------------------------------------- Redis back
                async with asyncio.timeout(10):
                    while True:
                        if (await client.get("/ready")).json() == {"status": "ready"}:
                            break
                        await asyncio.sleep(0.1)
                assert (await client.get("/api/auth/me", headers=bearer(token))).status_code == 401
                # The generation that ended during the outage reaches the Redis log once Redis is back ...
                start = first[0].data["data"]  # type: ignore[index]
                frames = await redis_log(own.url, log_key(setup.chat.id, start["assistant_message_id"]))
                assert len(frames) == len(first)
                # ... and new ones are shared again.
                after = await send(client, setup, content="after").finish()
                assistant_id = after[0].data["data"]["assistant_message_id"]  # type: ignore[index]
                assert len(await redis_log(own.url, log_key(setup.chat.id, assistant_id))) == len(after)
                assert (await login(client, setup.user.email)).status_code == 200
    finally:
        await own.stop()
    stored = await settled(app, setup.chat.id)
    assert stored["status"] == "complete"
    assert stored["content"] == streamed_text(after)


async def test_the_redis_log_is_written_in_batches_and_ends_at_once(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """A streaming answer's events go to Redis at most every MIRROR_INTERVAL (one MULTI/EXEC per batch, not per
    chunk), all of them, under their own ids; the terminal one is written at once, not a batch later."""
    from app.eventlog import MIRROR_INTERVAL

    own = RedisProcess(tmp_path)
    await own.start()
    client = aioredis.from_url(own.url)
    try:
        settings = live_settings(database_url, tmp_path, REDIS_URL=own.url)
        async with live_server(settings) as server:
            setup = await chat_with_agent(
                session, settings, f"{fake.url}/webhook/agent-stream?scenario=paced&chunks=40&interval_ms=10"
            )
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                before: Any = await client.info("commandstats")
                events = await send(http, setup).finish()
                ended = asyncio.get_running_loop().time()
                key = log_key(setup.chat.id, str(events[0].data["data"]["assistant_message_id"]))  # type: ignore[index]
                logged = await redis_log(own.url, key, within=5)
                in_redis_after = asyncio.get_running_loop().time() - ended
                after: Any = await client.info("commandstats")
    finally:
        await client.aclose()
        await own.stop()
    assert events[-1].type == "done"
    shown = [(e.id, e.data) for e in events if e.data is not None]
    assert [(e.id, e.data) for f in logged for e in parse_sse(f.decode())] == shown  # every event, its own id
    batches = after["cmdstat_exec"]["calls"] - before.get("cmdstat_exec", {"calls": 0})["calls"]
    message_events = sum(e.type == "message" for e in events)
    assert message_events >= 20  # the chunks came 10 ms apart: one event each
    assert batches <= message_events // 3, (batches, message_events)
    assert in_redis_after < MIRROR_INTERVAL + 0.5


@contextlib.asynccontextmanager
async def held_redis(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FastAPI, str, asyncio.Event]]:
    """An app on its own Redis whose writes (pipelines: the event log's batches) wait until the event is set;
    checkpoints every 50 ms."""
    own = RedisProcess(tmp_path)
    await own.start()
    gate = asyncio.Event()
    real_execute = Pipeline.execute

    async def held(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await real_execute(self, *args, **kwargs)

    app = create_app(settings.model_copy(update={"REDIS_URL": own.url, "STREAM_CHECKPOINT_INTERVAL": 0.05}))
    try:
        async with app.router.lifespan_context(app):
            monkeypatch.setattr(Pipeline, "execute", held)
            try:
                yield app, own.url, gate
            finally:
                gate.set()
    finally:
        await shutdown(app)
        await own.stop()


async def first_text(app: FastAPI) -> None:
    """Until the running generation has read its first text from n8n."""
    registry = app_state(app).generations
    async with asyncio.timeout(10):
        while True:
            if any(g.chunks for g in registry.running.values()):
                return
            await asyncio.sleep(0.01)


PACED_LONG = "scenario=paced&chunks=150&interval_ms=20"


async def test_a_checkpoint_stores_no_text_the_shared_log_does_not_hold_yet(
    settings: Settings, session: AsyncSession, fake: FakeN8n, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpointer waits until Redis holds the events of the text it stores: if the instance dies, its
    followers elsewhere have read at least what the stored message says. Redis held back (and the wait's bound
    out of reach): no text is stored meanwhile; once Redis has it, the checkpoint follows, within it."""
    monkeypatch.setattr(generations, "SHARED_LOG_WAIT", 60.0)
    async with held_redis(settings, tmp_path, monkeypatch) as (app, url, gate):
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{PACED_LONG}")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=20) as c:
            reading = asyncio.create_task(send(c, setup).finish())
            await first_text(app)
            await asyncio.sleep(0.5)  # ten checkpoint intervals
            assert (await assistant_of(app, setup.chat.id))["content"] == ""
            gate.set()
            stored = await first_checkpoint(app, setup.chat.id)
            (assistant_id,) = [str(key) for key in app_state(app).generations.running]
            reader = aioredis.from_url(url)
            try:  # what Redis holds now, right after the checkpoint was seen
                rows: Any = await reader.xrange(log_key(setup.chat.id, assistant_id))
            finally:
                await reader.aclose()
            events = await reading
    events_in_redis = [event_of(bytes(fields[b"f"])) for _id, fields in rows]
    text_in_redis = "".join(data["content"] for kind, data in events_in_redis if kind == "message")
    assert stored["status"] == "streaming"
    assert text_in_redis.startswith(stored["content"])
    assert events[-1].type == "done"


async def test_a_checkpoint_waits_for_a_slow_shared_log_only_so_long(
    settings: Settings, session: AsyncSession, fake: FakeN8n, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis that never takes the events: checkpoints still come, each after SHARED_LOG_WAIT, and the answer
    ends as usual, its final write storing all of it."""
    monkeypatch.setattr(generations, "SHARED_LOG_WAIT", 0.3)
    async with held_redis(settings, tmp_path, monkeypatch) as (app, _url, _gate):
        setup = await chat_with_agent(
            session, settings, f"{fake.url}/webhook/agent-stream?scenario=paced&chunks=40&interval_ms=20"
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=20) as c:
            reading = asyncio.create_task(send(c, setup).finish())
            await first_text(app)
            stored = await first_checkpoint(app, setup.chat.id)
            assert stored["status"] == "streaming"
            events = await reading
            final = await settled(app, setup.chat.id)
    assert events[-1].type == "done"
    assert final["status"] == "complete"
    assert final["content"].startswith(stored["content"])
    assert streamed_text(events) == final["content"]


# --- a connection dropped silently on the way -------------------------------------------------------------------


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    """A redis-server of the test's own: its channels hear no other test's instances."""
    own = RedisProcess(tmp_path)
    await own.start()
    try:
        yield own
    finally:
        await own.stop()


@pytest.fixture
async def freezing(own_redis: RedisProcess) -> AsyncIterator[FreezingProxy]:
    proxy = FreezingProxy(own_redis.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.mark.timeout(30)
async def test_a_reply_lost_on_a_silently_dropped_connection_does_not_hang(
    settings: Settings, freezing: FreezingProxy
) -> None:
    """Without a reply deadline, a command on a connection a NAT had forgotten would wait forever (a follower's
    read, the event log's writer, a rate-limit count). The client sets its own (the library's default is the
    same 5 s today): the command fails, and the next one gets a new connection."""
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": freezing.redis_url}))
    assert client is not None
    try:
        assert await client.ping()
        freezing.freeze()
        async with asyncio.timeout(15):
            with contextlib.suppress(RedisError):
                await client.get("anything")
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.timeout(30)
async def test_the_stop_channel_subscribes_again_after_its_connection_dropped_silently(
    settings: Settings, own_redis: RedisProcess, freezing: FreezingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscription hears nothing while no one publishes, so a connection dropped on the way went unnoticed
    and every stop sent from another instance was lost, with no word in the log. The listener now pings Redis
    when it has heard nothing for a while, and subscribes again on a new connection when no pong comes."""
    monkeypatch.setattr(eventlog, "LISTEN_POLL", 0.1)
    monkeypatch.setattr(eventlog, "LISTEN_IDLE", 0.5)
    monkeypatch.setattr(eventlog, "PONG_WAIT", 0.5)
    listening = eventlog.connect(settings.model_copy(update={"REDIS_URL": freezing.redis_url}))
    publisher = aioredis.from_url(own_redis.url)
    assert listening is not None
    heard: list[str] = []

    async def on_stop(assistant_id: str) -> None:
        heard.append(assistant_id)

    async def published_until_heard(assistant_id: str) -> None:
        async with asyncio.timeout(10):
            while assistant_id not in heard:
                await publisher.publish(eventlog.STOP_CHANNEL, assistant_id)
                await asyncio.sleep(0.1)

    db = Database(settings)  # unused by the channels
    log = eventlog.RedisEventLog(listening, settings, db)
    listener = asyncio.create_task(log.listen_for_stops(on_stop))
    try:
        await published_until_heard("before")
        freezing.freeze()
        await published_until_heard("after")
        assert freezing.connections >= 2  # heard on a new connection
    finally:
        await cancel_and_wait(listener)
        await listening.aclose()
        await publisher.aclose()
        await db.dispose()


@pytest.mark.timeout(30)
async def test_a_quiet_answer_followed_through_redis_is_not_reported_as_an_outage(
    settings: Settings, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A follow's blocking read waited a whole ping interval (15 s), longer than the client's 5 s reply deadline:
    every 5 s of a quiet answer it failed, was logged as "redis unreachable", and its connection was replaced.
    Reads now block within the deadline, and the ping (and the storage check) still come once per interval."""
    ping = eventlog.REPLY_TIMEOUT + 1.5
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": redis_url}))
    assert client is not None
    db = Database(settings)
    chat_id, assistant_id = uuid.uuid4(), str(uuid.uuid4())
    key = eventlog.log_key(chat_id, assistant_id)
    await client.xadd(key, {"f": frame(1, "start", {"assistant_message_id": assistant_id})}, id="1-0")
    try:
        log = eventlog.RedisEventLog(client, settings, db)
        frames = await log.follow(chat_id, assistant_id, 0, ping)
        assert frames is not None
        assert event_of(await anext(frames))[0] == "start"
        started = asyncio.get_running_loop().time()
        # Nothing more comes: after one ping interval the storage check finds no such answer, which ends it.
        assert event_of(await anext(frames)) == (
            "error",
            {"message": "The answer is no longer stored", "code": "not_found"},
        )
        assert asyncio.get_running_loop().time() - started >= ping - 0.1
        assert not [r for r in caplog.records if "redis unreachable" in r.getMessage()]
    finally:
        await client.delete(key)
        await client.aclose()
        await db.dispose()


@pytest.mark.timeout(30)
async def test_an_answers_late_last_batch_leaves_the_chats_newer_pointer_alone(
    settings: Settings, own_redis: RedisProcess
) -> None:
    """An answer's last batch (the terminal event) reached Redis after the chat's next answer had started (its
    writer was retrying a failed batch): its `EXPIRE genchat:<chat> 60` cut the newer answer's pointer to a
    minute, after which followers on other instances that name no answer got 204 while it still ran."""
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": own_redis.url}))
    assert client is not None
    db = Database(settings)
    chat_id = uuid.uuid4()
    pointer = eventlog.chat_key(chat_id)
    first = Generation(new=SimpleNamespace(chat_id=chat_id, assistant_id="first"))  # type: ignore[arg-type]
    try:
        eventlog.RedisEventLog(client, settings, db).attach(first)
        first.add_event("start", {"assistant_message_id": "first"})
        async with asyncio.timeout(5):
            while True:  # the first batch is in
                if await client.get(pointer) == b"first":
                    break
                await asyncio.sleep(0.02)
        await client.set(pointer, "second", ex=3600)  # the chat's next answer started, on another instance
        first.finish("done", {"message": {}})
        await redis_log(own_redis.url, eventlog.log_key(chat_id, "first"))
        assert await client.get(pointer) == b"second"
        assert await client.ttl(pointer) > settings.STREAM_LOG_TTL
        # The answer that ended still expires its own pointer.
        second = Generation(new=SimpleNamespace(chat_id=chat_id, assistant_id="second"))  # type: ignore[arg-type]
        eventlog.RedisEventLog(client, settings, db).attach(second)
        second.add_event("start", {"assistant_message_id": "second"})
        second.finish("done", {"message": {}})
        await redis_log(own_redis.url, eventlog.log_key(chat_id, "second"))
        assert 0 < await client.ttl(pointer) <= settings.STREAM_LOG_TTL
    finally:
        await client.aclose()
        await db.dispose()


@pytest.mark.timeout(30)
async def test_an_answer_that_reaches_redis_only_after_its_end_leaves_the_chats_newer_pointer_alone(
    settings: Settings, own_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same late write, when the answer's first batch failed too (it ran while Redis could not be written):
    its retried batch, the whole answer, began with `SET genchat:<chat> <this answer>`. It named the ended
    answer as the chat's current one in place of the next answer, already running, and then expired it: on
    other instances followers that name no answer followed the old answer, then got 204, while the new one ran."""
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": own_redis.url}))
    assert client is not None
    db = Database(settings)
    chat_id = uuid.uuid4()
    pointer = eventlog.chat_key(chat_id)
    real_execute = Pipeline.execute
    failed: list[bool] = []

    async def fails_once(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            # Meanwhile the chat's next answer starts, on an instance that reaches Redis.
            await client.set(pointer, "second", ex=3600)
            raise RedisError("connection lost")
        return await real_execute(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", fails_once)
    first = Generation(new=SimpleNamespace(chat_id=chat_id, assistant_id="first"))  # type: ignore[arg-type]
    try:
        eventlog.RedisEventLog(client, settings, db).attach(first)
        first.add_event("start", {"assistant_message_id": "first"})
        first.finish("done", {"message": {}})
        await redis_log(own_redis.url, eventlog.log_key(chat_id, "first"))
        assert failed
        assert await client.get(pointer) == b"second"
        assert await client.ttl(pointer) > settings.STREAM_LOG_TTL
        # With no other answer running, an answer that ended before its first write still names itself, until
        # its log expires (a previous answer's pointer, already ended, gives way to it).
        await client.set(pointer, "second", ex=int(settings.STREAM_LOG_TTL))
        third = Generation(new=SimpleNamespace(chat_id=chat_id, assistant_id="third"))  # type: ignore[arg-type]
        eventlog.RedisEventLog(client, settings, db).attach(third)
        third.add_event("start", {"assistant_message_id": "third"})
        third.finish("done", {"message": {}})
        await redis_log(own_redis.url, eventlog.log_key(chat_id, "third"))
        assert await client.get(pointer) == b"third"
        assert 0 < await client.ttl(pointer) <= settings.STREAM_LOG_TTL
    finally:
        await client.aclose()
        await db.dispose()


@pytest.mark.timeout(30)
async def test_a_writer_whose_read_after_a_failure_failed_too_reads_again_before_writing(
    settings: Settings, own_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed batch the writer reads how far Redis got. When that read failed too, it went on from the
    count it had: Redis back empty (restarted without its data) got the answer from the next event on, and
    followers elsewhere a log without its `start`. It reads before its next batch now, until a read succeeds."""
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": own_redis.url}))
    assert client is not None
    db = Database(settings)
    chat_id = uuid.uuid4()
    key = eventlog.log_key(chat_id, "restarted")
    real_execute = Pipeline.execute
    real_last_entry = eventlog._last_entry
    failures = {"batch": 0, "read": 0}

    async def execute_fails_once(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        if not failures["batch"]:
            failures["batch"] += 1
            await client.flushdb()  # Redis restarted empty meanwhile
            raise RedisError("connection lost")
        return await real_execute(self, *args, **kwargs)

    async def read_fails_once(redis: aioredis.Redis, log: str) -> Any:
        if not failures["read"]:
            failures["read"] += 1
            raise RedisError("connection lost")
        return await real_last_entry(redis, log)

    generation = Generation(new=SimpleNamespace(chat_id=chat_id, assistant_id="restarted"))  # type: ignore[arg-type]
    try:
        eventlog.RedisEventLog(client, settings, db).attach(generation)
        generation.add_event("start", {"assistant_message_id": "restarted"})
        await until_true(lambda: client.xlen(key))  # the first batch is in Redis
        monkeypatch.setattr(Pipeline, "execute", execute_fails_once)
        monkeypatch.setattr(eventlog, "_last_entry", read_fails_once)
        generation.add_chunks(["Hello"])
        generation.finish("done", {"message": {}})
        assert await redis_log(own_redis.url, key) == list(generation.frames)
        assert failures == {"batch": 1, "read": 1}
    finally:
        await client.aclose()
        await db.dispose()


# --- a stop published while its owner's subscription is away ----------------------------------------------------


async def subscribers(client: aioredis.Redis, channel: str = eventlog.STOP_CHANNEL) -> int:
    """How many connections Redis has subscribed to `channel` (the stop channel unless named)."""
    answer: Any = await client.pubsub_numsub(channel)
    return int(answer[0][1])


@pytest.mark.timeout(30)
async def test_a_stop_published_while_no_one_was_subscribed_is_acted_on_once_the_owner_subscribes(
    settings: Settings, own_redis: RedisProcess
) -> None:
    """Pub/sub delivers a message only to the subscriptions alive when it is published: a stop sent while the
    owner's subscription was away (being restored after a lost connection) was lost. The stop is now also kept
    in a key that the owner reads after each subscription, once Redis has run its SUBSCRIBE (the listener here
    is on a slow network, where the SUBSCRIBE reaches Redis well after it was sent: a read that did not wait
    for its confirmation would come first, and a stop published between the two would be missed both ways)."""
    slow = FreezingProxy(own_redis.port, delay=0.3)
    await slow.start()
    listening = eventlog.connect(settings.model_copy(update={"REDIS_URL": slow.redis_url}))
    direct = eventlog.connect(settings.model_copy(update={"REDIS_URL": own_redis.url}))
    assert listening is not None
    assert direct is not None
    db = Database(settings)  # unused by the channels
    owner = eventlog.RedisEventLog(listening, settings, db)
    asker = eventlog.RedisEventLog(direct, settings, db)
    heard: list[str] = []
    subscribed_when_read: list[int] = []

    news = asyncio.Event()

    async def on_stop(assistant_id: str) -> None:
        heard.append(assistant_id)
        news.set()

    async def on_subscribed() -> None:
        subscribed_when_read.append(await subscribers(direct))
        heard.extend(await owner.stops_requested(["missed", "running-on"]))
        news.set()

    async def until_heard(assistant_id: str) -> None:
        async with asyncio.timeout(10):
            while assistant_id not in heard:
                await news.wait()
                news.clear()

    try:
        assert await asker.publish_stop("missed", lasting=30)  # no one subscribed
        listener = asyncio.create_task(owner.listen_for_stops(on_stop, on_subscribed))
        try:
            await until_heard("missed")
            assert subscribed_when_read == [1]  # read after Redis ran the SUBSCRIBE
            assert await asker.publish_stop("live", lasting=30)  # from now on, through the channel
            await until_heard("live")
        finally:
            await cancel_and_wait(listener)
        assert heard == ["missed", "live"]
        assert 0 < await direct.ttl(eventlog.STOP_REQUEST + "live") <= 30
    finally:
        await listening.aclose()
        await direct.aclose()
        await slow.close()
        await db.dispose()


@pytest.mark.timeout(30)
async def test_a_stop_published_before_its_owner_registered_the_generation_is_acted_on_at_its_first_write(
    settings: Settings, own_redis: RedisProcess
) -> None:
    """Another instance asks to stop an answer once its row is stored (it reads the row), which can be before
    the instance that stored it has registered the generation: the owner's listener hears the stop and finds
    nothing of its own to stop (as `Generations._stop_requested` does here). The generation's first write to
    its log reads the kept request in the same round trip and hands it to the same handler; an answer no one
    asked to stop is left alone."""
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": own_redis.url}))
    assert client is not None
    db = Database(settings)  # unused by the log and the channel
    owner = eventlog.RedisEventLog(client, settings, db)
    asker = eventlog.RedisEventLog(client, settings, db)
    chat_id = uuid.uuid4()
    registered: set[str] = set()
    ignored: list[str] = []
    acted_on: list[str] = []
    news = asyncio.Event()

    async def on_stop(assistant_id: str) -> None:
        (acted_on if assistant_id in registered else ignored).append(assistant_id)
        news.set()

    async def until(found: list[str], assistant_id: str) -> None:
        async with asyncio.timeout(10):
            while assistant_id not in found:
                await news.wait()
                news.clear()

    listener = asyncio.create_task(owner.listen_for_stops(on_stop))
    try:
        await until_true(lambda: subscribers(client))
        assert await asker.publish_stop("early", lasting=30)
        await until(ignored, "early")  # heard before the generation was registered: nothing stopped
        for assistant_id in ("early", "unasked"):
            registered.add(assistant_id)
            generation = Generation(new=SimpleNamespace(chat_id=chat_id, assistant_id=assistant_id))  # type: ignore[arg-type]
            owner.attach(generation)
            generation.add_event("start", {"assistant_message_id": assistant_id})
        await until(acted_on, "early")
        await until_true(lambda: client.xlen(eventlog.log_key(chat_id, "unasked")))  # its first write is done
        assert acted_on == ["early"]
    finally:
        await cancel_and_wait(listener)
        await client.aclose()
        await db.dispose()


#: An answer of 20 s: it runs on while the owner's subscription is away, unless a stop ends it.
VERY_LONG = "scenario=paced&chunks=1000&interval_ms=20"


class OwnerAway:
    """Instance A runs an answer, its Redis connections through `proxy` (B's and the watcher's go straight to
    Redis); `away()` closes the proxy, so A's subscription ends and cannot be renewed until `back()`."""

    def __init__(self, a: httpx.AsyncClient, b: httpx.AsyncClient, redis_url: str, proxy: FreezingProxy) -> None:
        self.a, self.b, self.proxy = a, b, proxy
        self.watcher = aioredis.from_url(redis_url)
        self.heard = self.watcher.pubsub()

    async def subscribers_become(self, count: int) -> None:
        async with asyncio.timeout(10):
            while await subscribers(self.watcher) != count:  # noqa: ASYNC110  # Redis, not this process, changes it
                await asyncio.sleep(0.05)

    async def away(self) -> None:
        await self.heard.subscribe(eventlog.STOP_CHANNEL)
        await self.subscribers_become(3)  # A, B and the watcher
        await self.proxy.close()
        await self.subscribers_become(2)

    async def published(self) -> str:
        """The next stop published (by B), once A could not have heard it."""
        async with asyncio.timeout(10):
            while True:
                message = await self.heard.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    break
        assert await subscribers(self.watcher) == 2  # A was not subscribed
        return bytes(message["data"]).decode()

    async def back(self) -> None:
        await self.proxy.start()

    async def aclose(self) -> None:
        await self.heard.aclose()  # type: ignore[no-untyped-call]
        await self.watcher.aclose()


@contextlib.asynccontextmanager
async def owner_away(
    database_url: str, tmp_path: Path, own_redis: RedisProcess, freezing: FreezingProxy
) -> AsyncIterator[OwnerAway]:
    from tests.test_instances import instance

    settings = live_settings(database_url, tmp_path)
    # The asker waits the grace + 5 s for the owner's stop; 8 s leave room for a loaded machine.
    async with (
        instance(settings, freezing.redis_url, SHUTDOWN_GRACE_SECONDS="3") as (url_a, _a),
        instance(settings, own_redis.url, SHUTDOWN_GRACE_SECONDS="3") as (url_b, _b),
        httpx.AsyncClient(base_url=url_a, timeout=20) as a,
        httpx.AsyncClient(base_url=url_b, timeout=20) as b,
    ):
        owner = OwnerAway(a, b, own_redis.url, freezing)
        try:
            yield owner
        finally:
            await owner.aclose()


@pytest.mark.timeout(90)
async def test_a_stop_sent_while_the_owners_subscription_is_away_stops_the_answer(
    session: AsyncSession,
    database_url: str,
    tmp_path: Path,
    fake: FakeN8n,
    own_redis: RedisProcess,
    freezing: FreezingProxy,
) -> None:
    """The instance running the answer lost its Redis connection; a stop sent to another instance before it had
    subscribed again was published to no one: the asker waited the grace + 5 s and answered 503 while the
    answer ran on. The owner now reads the stop requests kept in Redis when it subscribes again, and stops it."""
    setup = await chat_with_agent(
        session, live_settings(database_url, tmp_path), f"{fake.url}/webhook/agent-stream?{VERY_LONG}"
    )
    async with owner_away(database_url, tmp_path, own_redis, freezing) as owner:
        sender = send(owner.a, setup)
        await sender.wait_for(has_text)
        assistant_id = sender.data[0].data["data"]["assistant_message_id"]  # type: ignore[index]
        await owner.away()
        stopping = asyncio.create_task(owner.b.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers))
        assert await owner.published() == assistant_id
        await owner.back()
        stopped = await stopping
        assert stopped.status_code == 200, stopped.text
        events = await sender.finish()
    assert stopped.json()["status"] == "cancelled"
    assert events[-1].type == "done"
    assert events[-1].data["data"]["message"] == stopped.json()  # type: ignore[index]
    assert fake.requests[0]["client_closed"]


@pytest.mark.timeout(90)
async def test_a_chat_deleted_while_the_owners_subscription_is_away_stops_its_answer(
    session: AsyncSession,
    database_url: str,
    tmp_path: Path,
    fake: FakeN8n,
    own_redis: RedisProcess,
    freezing: FreezingProxy,
) -> None:
    """The same window for a deletion, whose stop no one waits for: it was lost entirely, and the answer ran on in
    n8n until its end. The owner now stops it once it has subscribed again: its stream ends `chat_deleted`."""
    setup = await chat_with_agent(
        session, live_settings(database_url, tmp_path), f"{fake.url}/webhook/agent-stream?{VERY_LONG}"
    )
    async with owner_away(database_url, tmp_path, own_redis, freezing) as owner:
        sender = send(owner.a, setup)
        await sender.wait_for(has_text)
        assistant_id = sender.data[0].data["data"]["assistant_message_id"]  # type: ignore[index]
        await owner.away()
        deleted = await owner.b.delete(f"/api/chats/{setup.chat.id}", headers=setup.headers)
        assert await owner.published() == assistant_id
        await owner.back()
        events = await sender.finish(within=10)  # the answer alone would take 20 s
    assert deleted.status_code == 204
    assert events[-1].type == "error"
    assert events[-1].data["data"]["code"] == "chat_deleted"  # type: ignore[index]
    assert fake.requests[0]["client_closed"]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("owner", ["applies it at once", "takes it only later"])
async def test_a_relayed_callback_whose_reply_is_lost_is_never_applied_twice(
    settings: Settings, own_redis: RedisProcess, freezing: FreezingProxy, owner: str
) -> None:
    """The instance that received a callback waits for its owner's reply on a connection that a NAT drops
    silently (frozen here as soon as the owner hears the callback): its read fails. It answered 503 without
    claiming the callback, so an owner that had applied it (its reply lost) left n8n's retry to add the text
    a second time, and an owner that took it only afterwards applied it late, then the retry again. It now
    claims the callback on a new connection: applied already, it answers as applied; else the owner drops it."""
    receiving = eventlog.connect(settings.model_copy(update={"REDIS_URL": freezing.redis_url}))
    owning = aioredis.from_url(own_redis.url)
    assert receiving is not None
    db = Database(settings)  # unused by the channels
    receiver = eventlog.RedisEventLog(receiving, settings, db)
    owner_log = eventlog.RedisEventLog(owning, settings, db)
    relayed: asyncio.Future[bool | None] | None = None
    claims: list[bool] = []
    heard, claimed = asyncio.Event(), asyncio.Event()

    async def on_callback(_assistant_id: str, _body: dict[str, Any], reply: str | None) -> None:
        assert reply is not None
        freezing.freeze()  # the receiver's connection, waiting for the reply, is gone from now on
        heard.set()
        if owner == "takes it only later":
            assert relayed is not None
            await asyncio.wait({relayed})
        claims.append(await owner_log.claim_callback(reply))
        claimed.set()
        if claims[-1]:
            await owner_log.answer_callback(reply, True)

    listener = asyncio.create_task(owner_log.listen_for_callbacks(on_callback))
    try:
        await asyncio.sleep(0.5)  # subscribed
        relayed = asyncio.ensure_future(receiver.relay_callback(str(uuid.uuid4()), {"type": "message", "content": "x"}))
        async with asyncio.timeout(25):
            await heard.wait()
            outcome = await relayed
            await claimed.wait()
        if owner == "applies it at once":
            assert (claims, outcome) == ([True], True)  # applied once: no 503, no retry
        else:
            assert (claims, outcome) == ([False], None)  # a 503, and the owner does not apply it late
    finally:
        await cancel_and_wait(listener)
        if relayed is not None and not relayed.done():
            relayed.cancel()
        await receiving.aclose()
        await owning.aclose()
        await db.dispose()


@pytest.mark.timeout(30)
async def test_a_relayed_callback_given_up_on_stays_unclaimable_while_its_answer_can_run(
    settings: Settings, own_redis: RedisProcess
) -> None:
    """An owner whose callback listener is behind hears a relayed callback after its receiver gave up waiting
    (and answered n8n 503, which sends it again). The receiver's claim lived 12 s: an owner later than that
    claimed it and applied it, and n8n's retry applied it again. The claim now lives as long as the answer can."""
    client = aioredis.from_url(own_redis.url)
    db = Database(settings)  # unused by the channels
    receiver = eventlog.RedisEventLog(client, settings, db)
    owner = eventlog.RedisEventLog(client, settings, db)
    replies: list[str] = []
    heard = asyncio.Event()

    async def on_callback(_assistant_id: str, _body: dict[str, Any], reply: str | None) -> None:
        assert reply is not None
        replies.append(reply)  # and says nothing: it is behind
        heard.set()

    listener = asyncio.create_task(owner.listen_for_callbacks(on_callback))
    try:
        await until_true(lambda: subscribers(client, eventlog.CALLBACK_CHANNEL))
        outcome = await receiver.relay_callback(str(uuid.uuid4()), {"type": "message", "content": "x"})
        await heard.wait()
        assert outcome is None  # answered 503
        kept = await client.ttl(eventlog.CALLBACK_CLAIM + replies[0])
        assert kept >= max(settings.N8N_TOTAL_TIMEOUT, settings.CALLBACK_TOTAL_TIMEOUT) - 5
        assert not await owner.claim_callback(replies[0])
    finally:
        await cancel_and_wait(listener)
        await client.aclose()
        await db.dispose()


async def test_the_owners_claim_outlives_the_receiving_instances_longest_way_to_its_own(
    settings: Settings, own_redis: RedisProcess
) -> None:
    """The owner claims a relayed callback, applies it and answers; the receiving instance, its wait for that
    answer failed (Redis slow, its connection lost), claims it too, to learn its fate. Each of its steps may take a
    pool wait, a new connection and a reply deadline: ~42 s from its publish in the worst case, and the owner's
    claim lived 12 s. Gone by then, the receiver's claim succeeded: 503 for a callback applied, which n8n's retry
    applied again."""
    client = aioredis.from_url(own_redis.url)
    db = Database(settings)  # unused by the claims
    log = eventlog.RedisEventLog(client, settings, db)
    longest = 2 * eventlog.RELAY_WAIT + 4 * (eventlog.POOL_WAIT + eventlog.CONNECT_TIMEOUT + eventlog.REPLY_TIMEOUT)
    try:
        token = uuid.uuid4().hex
        assert await log.claim_callback(token)  # the owner
        assert await client.ttl(eventlog.CALLBACK_CLAIM + token) > longest
        assert not await log._give_up(token)  # the receiving instance learns it was applied
    finally:
        await client.aclose()
        await db.dispose()


@pytest.mark.timeout(30)
async def test_a_burst_of_commands_beyond_the_pool_waits_for_connections_instead_of_failing(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance's one Redis client has 100 connections. A few hundred commands in the same instant (every
    stream's writer batch on a loaded instance, each request's rate-limit count) failed past the 100th with
    "Too many connections", as if Redis were down. They wait for a connection now, briefly. The wait is
    lengthened here: in a full test run on two cores another test's processes could hold this event loop back
    past the 2 s wait ("No connection available"), while the pool this guards against refuses at once."""
    monkeypatch.setattr(eventlog, "POOL_WAIT", 20.0)
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": redis_url}))
    assert client is not None
    assert client.connection_pool.max_connections == eventlog.POOL_SIZE
    try:
        await fill_pool(client)
        key = f"burst:{uuid.uuid4()}"
        answers = await asyncio.gather(*(client.incr(key) for _ in range(3 * eventlog.POOL_SIZE)))
        assert sorted(answers) == list(range(1, 3 * eventlog.POOL_SIZE + 1))
        await client.delete(key)
    finally:
        await client.aclose()


@pytest.mark.timeout(60)
async def test_followers_of_another_instances_answer_leave_the_instances_redis_connections_to_the_rest(
    settings: Settings, redis_url: str
) -> None:
    """Each follower of an answer running on another instance blocks in a read (`XREAD BLOCK`, up to 4 s) on one
    of the Redis client's connections (100, shared with the rate limits, the event-log writers, stops and
    callbacks). 100 followers (browser tabs a load balancer sent to another instance) took every one: all other
    Redis work of the instance failed at once ("Too many connections"), the next followers' too. Only half of
    them block now; the others poll the log, and every follower gets the whole answer."""
    redis_settings = settings.model_copy(update={"REDIS_URL": redis_url})
    owner_client, client = eventlog.connect(redis_settings), eventlog.connect(redis_settings)
    assert owner_client is not None
    assert client is not None
    pool = client.connection_pool.max_connections
    db = Database(settings)
    chat_id, assistant_id = uuid.uuid4(), str(uuid.uuid4())
    running = Generation(new=SimpleNamespace(chat_id=chat_id, assistant_id=assistant_id))  # type: ignore[arg-type]
    local = Generation(new=SimpleNamespace(chat_id=uuid.uuid4(), assistant_id=str(uuid.uuid4())))  # type: ignore[arg-type]
    keys = [log_key(g.new.chat_id, g.new.assistant_id) for g in (running, local)]
    log = eventlog.RedisEventLog(client, redis_settings, db)
    eventlog.RedisEventLog(owner_client, redis_settings, db).attach(running)  # the owner, another instance
    running.add_event("start", {"assistant_message_id": assistant_id})
    await redis_log_holds(redis_url, keys[0], 1)

    async def follower() -> list[bytes]:
        frames = await log.follow(chat_id, assistant_id, 0, 15.0)
        assert frames is not None
        return [chunk async for chunk in frames]

    followers: list[asyncio.Task[list[bytes]]] = []
    try:
        for _ in range(pool + 20):  # tabs opened one after another
            followers.append(asyncio.create_task(follower()))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)  # every follower has read `start` and waits for more
        # This instance's other Redis work goes on: a ping, a stop, a writer's batch.
        assert await client.ping()
        assert not [f.exception() for f in followers if f.done()]
        assert await log.publish_stop(str(uuid.uuid4()), 5)
        log.attach(local)
        local.add_event("start", {"assistant_message_id": local.new.assistant_id})
        local.finish("done", {"message": {}})
        assert len(await redis_log(redis_url, keys[1], within=3)) == 2
        # The answer goes on and ends: every follower gets all of it, the terminal event last.
        running.add_chunks(["Hello, "])
        running.add_chunks(["world"])
        running.finish("done", {"message": {"content": "Hello, world"}})
        async with asyncio.timeout(10):
            streams = await asyncio.gather(*followers)
        whole = [(e.id, e.data) for f in running.frames for e in parse_sse(f.decode())]
        for stream in streams:
            assert [(e.id, e.data) for chunk in stream for e in parse_sse(chunk.decode())] == whole
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        await client.delete(*keys)
        await client.aclose()
        await owner_client.aclose()
        await db.dispose()


async def redis_log_holds(url: str, key: str, count: int) -> None:
    """Until the generation's Redis log holds `count` events."""
    client = aioredis.from_url(url)
    try:
        async with asyncio.timeout(5):
            while True:
                if await client.xlen(key) >= count:
                    return
                await asyncio.sleep(0.02)
    finally:
        await client.aclose()


@pytest.mark.timeout(30)
async def test_a_listener_whose_cancel_a_library_swallowed_still_ends(settings: Settings, redis_url: str) -> None:
    """A cancel landing while redis-py opens a pub/sub connection on uvloop can be swallowed below the listener
    (the task is left `cancelling` and polls on): a shutdown right after start-up, as `app.cli serve` on a port
    already in use does, then hung for ever after "Waiting for application shutdown". The listener honours a
    cancel still pending at its next poll; a swallowing `on_subscribed` stands in for the library here."""
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": redis_url}))
    assert client is not None
    db = Database(settings)  # unused by the channel
    log = eventlog.RedisEventLog(client, settings, db)
    reading = asyncio.Event()

    async def on_stop(assistant_id: str) -> None:
        pass

    async def swallowing() -> None:
        reading.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)

    listener = asyncio.create_task(log.listen_for_stops(on_stop, swallowing))
    try:
        await reading.wait()
        listener.cancel()
        done, _ = await asyncio.wait([listener], timeout=3 * eventlog.LISTEN_POLL)
        assert done, "the listener polled on after its cancel"
        assert listener.cancelled()
    finally:
        await cancel_and_wait(listener)
        await client.aclose()
        await db.dispose()
