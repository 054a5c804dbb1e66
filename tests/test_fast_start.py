"""The one-statement start of a plain send (app.services.fast_start): one round trip before n8n is called, the
same rows, payload and events as the general path, and every refusal still the general path's."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aiohttp
import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from fastapi.sse import EventSourceResponse
from sqlalchemy import func, literal, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette import types as asgi

from app import metrics
from app.config import Settings
from app.db import ConnectionLost, Database, Direct
from app.generations import GenerationRegistry
from app.models import Chat, ErrorLog, IdempotencyKey, Message, Team, UsageDaily, UsageRecord
from app.routers import messages as messages_router
from app.security import create_token, decode_token
from app.services import fast_start
from app.state import app_state
from bench.bench_finish import CountingProxy
from main import create_app, shutdown
from tests.conftest import assert_rollup_matches_ledger
from tests.factories import auth_headers, create_chat, create_user
from tests.live import ChatSetup, chat_with_agent, data_events, free_port, parse_sse
from tools.fake_n8n import FakeN8n

pytestmark = pytest.mark.timeout(60)


@contextmanager
def round_trips_before_start(proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The database round trips (the proxy's count) made until a generation starts (n8n is called after it)."""
    seen: list[int] = []
    first = proxy.round_trips
    real_start = GenerationRegistry.start

    def start(self: GenerationRegistry, new: Any) -> Any:
        seen.append(proxy.round_trips - first)
        return real_start(self, new)

    monkeypatch.setattr(GenerationRegistry, "start", start)
    yield seen
    monkeypatch.setattr(GenerationRegistry, "start", real_start)


class CuttingProxy(CountingProxy):
    """The counting proxy, which can also lose a reply: once `armed`, PostgreSQL's next reply is dropped and
    the connection closed. The statement ran and committed (autocommit: the server flushes its reply after the
    commit); its client never learns it."""

    armed = False

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if self.armed:
                    self.armed = False
                    return  # the proxy then closes both sides
                writer.write(data)
                await writer.drain()


class CommitCuttingProxy(CuttingProxy):
    """Once `cut_commit` is set, cuts the connection at the first COMMIT sent after an INSERT into messages (the
    general path's start, which commits its transaction): `reply`: PostgreSQL committed, its reply is lost;
    `commit`: the COMMIT never reaches PostgreSQL, which rolls the transaction back."""

    cut_commit: Literal["", "reply", "commit"] = ""
    inserted = False

    def _passes(self, head: bytes, body: bytes) -> bool:
        if not self.cut_commit:
            return True
        self.inserted = self.inserted or b"INSERT INTO messages" in body
        if not (self.inserted and head[:1] == b"Q" and body.startswith(b"COMMIT")):
            return True
        cut, self.cut_commit, self.inserted = self.cut_commit, "", False
        if cut == "commit":
            return False
        self.armed = True  # its reply (sent once committed) is dropped, the connection closed
        return True


@pytest.fixture
async def proxied(settings: Settings) -> AsyncIterator[tuple[FastAPI, CommitCuttingProxy]]:
    """The app on one pooled connection through a proxy that counts round trips (Sync and Query messages) and,
    when armed, drops a reply (`CuttingProxy`, `CommitCuttingProxy`)."""
    host_port = settings.DATABASE_URL.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    proxy = CommitCuttingProxy(host, int(port or 5432))
    url = settings.DATABASE_URL.replace(f"@{host_port}/", f"@127.0.0.1:{await proxy.start()}/")
    application = create_app(settings.model_copy(update={"DATABASE_URL": url, "DB_POOL_SIZE": 1, "DB_MAX_OVERFLOW": 0}))
    try:
        yield application, proxy
    finally:
        await shutdown(application)
        await proxy.close()


async def send(client: httpx.AsyncClient, setup: ChatSetup, body: dict[str, Any], **headers: str) -> httpx.Response:
    return await client.post(f"/api/chats/{setup.chat.id}/messages", json=body, headers={**setup.headers, **headers})


@pytest.mark.parametrize("key", [None, "key-1"])
async def test_a_plain_send_is_one_round_trip_before_n8n(
    proxied: tuple[FastAPI, CountingProxy],
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
    key: str | None,
) -> None:
    """Counted on the wire: one round trip (the statement, its commit included: no BEGIN, no COMMIT) before
    n8n is called, once the statement is prepared on the connection (the first send also prepares it)."""
    app, proxy = proxied
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await send(client, setup, {"content": "first"})).status_code == 200
        extra = {"Idempotency-Key": key} if key else {}
        with round_trips_before_start(proxy, monkeypatch) as seen:
            response = await send(client, setup, {"content": "second"}, **extra)
        assert response.status_code == 200
        assert data_events(parse_sse(response.text))[-1].type == "done"
        assert seen == [1]
        # The count is real: the general path (an edit) makes several round trips, in a transaction.
        first = (await session.execute(select(Message).where(Message.chat_id == setup.chat.id))).scalars().first()
        assert first is not None
        with round_trips_before_start(proxy, monkeypatch) as seen:
            edited = await send(client, setup, {"content": "first, again", "edit_of": str(first.id)})
        assert edited.status_code == 200
        assert seen[0] >= 5


def _shape(messages: list[Message]) -> list[tuple[Any, ...]]:
    """What must be equal between two chats: each row but its ids and times, and the tree by position."""
    ids = [m.id for m in messages]
    return [
        (
            m.role,
            m.content,
            m.status,
            m.error,
            m.files,
            m.worker_id is None,
            ids.index(m.parent_id) if m.parent_id in ids else None,
        )
        for m in messages
    ]


async def test_the_fast_and_the_general_path_store_and_send_the_same(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream", title=None)
    general_chat = await create_chat(session, user=fast.user, agent=fast.agent, title=None)
    general = ChatSetup(fast.user, fast.agent, general_chat, fast.headers)
    outcomes: dict[str, list[Any]] = {"fast": [], "general": []}
    for name, setup in (("fast", fast), ("general", general)):
        if name == "general":
            monkeypatch.setattr(fast_start, "applies", lambda *_a, **_k: False)
        for turn in ("What is 2 + 2?", "And 3 + 3?", "Thanks, bye"):
            fake.requests.clear()
            response = await send(client, setup, {"content": turn}, **{"Idempotency-Key": f"{name}-{turn}"})
            assert response.status_code == 200
            events = data_events(parse_sse(response.text))
            start = events[0].data["data"]  # type: ignore[index]
            question = start["user_message"]
            payload = fake.requests[-1]["json"]
            outcomes[name].append(
                (
                    {k: v for k, v in question.items() if k not in ("id", "created_at", "parent_id", "sibling_ids")},
                    len(question["sibling_ids"]),
                    question["parent_id"] is None,
                    [e.type for e in events][:2] + [e.type for e in events][-1:],
                    payload["messages"],
                    payload["chatInput"],
                    payload["system_prompt"],
                    payload["config"],
                    sorted(payload["metadata"]),
                )
            )
    assert outcomes["fast"] == outcomes["general"]
    rows = {}
    chat_ids = {"fast": fast.chat.id, "general": general.chat.id}
    await session.rollback()
    for name, chat_id in chat_ids.items():
        chat = await session.get(Chat, chat_id, populate_existing=True)
        assert chat is not None
        messages = list(
            (
                await session.execute(
                    select(Message).where(Message.chat_id == chat.id).order_by(Message.created_at, Message.id)
                )
            ).scalars()
        )
        keys = list((await session.execute(select(IdempotencyKey).where(IdempotencyKey.chat_id == chat.id))).scalars())
        assert {(k.user_message_id, k.assistant_message_id) for k in keys} == {
            (str(q.id), str(a.id)) for q, a in zip(messages[::2], messages[1::2], strict=True)
        }
        assert chat.current_message_id == messages[-1].id
        rows[name] = (_shape(messages), chat.title, chat.message_count)
    assert rows["fast"] == rows["general"]
    assert rows["fast"][1] == "What is 2 + 2?"
    assert rows["fast"][2] == 6


async def test_a_send_refused_by_any_check_stores_nothing_and_gives_the_general_paths_error(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """Each check of the statement, refused: the general path's status and message, and no row written."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    other = await create_user(session)
    team = await session.get(Team, setup.user.team_id)
    assert team is not None

    async def refused(headers: dict[str, str], chat_id: uuid.UUID = setup.chat.id) -> tuple[int, Any]:
        before = await session.scalar(text("SELECT count(*) FROM messages"))
        response = await client.post(f"/api/chats/{chat_id}/messages", json={"content": "hi"}, headers=headers)
        assert await session.scalar(text("SELECT count(*) FROM messages")) == before
        await session.commit()  # ends the read's transaction; the objects stay loaded (no expiry on commit)
        return response.status_code, response.json()

    not_found = (404, {"detail": "Chat not found"})
    assert await refused(auth_headers(settings, other)) == not_found  # another user's (and team's) chat
    assert await refused(setup.headers, uuid.uuid4()) == not_found
    # A token naming another team than the user's.
    forged = create_token(settings=settings, user_id=setup.user.id, team_id=other.team_id, token_type="access")
    assert (await refused({"Authorization": f"Bearer {forged.token}"}))[0] == 401
    # The quota: 0, then reached.
    team.settings = {"quota": {"messages_per_user_per_day": 0}}
    await session.commit()
    assert (await refused(setup.headers))[0] == 429
    team.settings = {"quota": {"messages_per_user_per_day": 1}}
    await session.commit()
    assert (
        await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers)
    ).status_code == 200
    assert (await refused(setup.headers))[0] == 429
    # A quota that is not an integer is no quota (usage.quota_of), as on the general path.
    team.settings = {"quota": {"messages_per_user_per_day": 1.5}}
    await session.commit()
    ok = await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers)
    assert ok.status_code == 200
    # The agent made inactive.
    setup.agent.is_active = False
    await session.commit()
    assert await refused(setup.headers) == (409, {"detail": "This chat's agent is no longer active"})


async def test_the_one_statement_claims_the_quota_counting_the_days_earlier_generations(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    for _ in range(2):  # two generations before any quota: the ledger has them
        assert (await send(client, setup, {"content": "hi"})).status_code == 200
    team = await session.get(Team, setup.user.team_id)
    assert team is not None
    team.settings = {"quota": {"messages_per_user_per_day": 3}}
    await session.commit()
    assert (await send(client, setup, {"content": "third"})).status_code == 200
    day = await session.execute(text("SELECT generations FROM usage_daily WHERE user_id = :u"), {"u": setup.user.id})
    assert day.scalar() == 3
    fourth = await send(client, setup, {"content": "fourth"})
    assert fourth.status_code == 429
    assert int(fourth.headers["Retry-After"]) > 0


async def test_a_token_issued_at_the_instant_of_tokens_valid_after_is_accepted(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """`issued_before` at microsecond precision, as SQL compares it: the same instant passes, one µs more fails."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    issued = create_token(settings=settings, user_id=setup.user.id, team_id=setup.user.team_id, token_type="access")
    claims = decode_token(issued.token, settings=settings, expected_type="access")
    instant = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(claims["iat_us"]))
    headers = {"Authorization": f"Bearer {issued.token}"}
    setup.user.tokens_valid_after = instant
    await session.commit()
    assert (
        await send(client, ChatSetup(setup.user, setup.agent, setup.chat, headers), {"content": "hi"})
    ).status_code == 200
    setup.user.tokens_valid_after = instant + timedelta(microseconds=1)
    await session.commit()
    assert (
        await send(client, ChatSetup(setup.user, setup.agent, setup.chat, headers), {"content": "hi"})
    ).status_code == 401


def _drop_idle_connections(app: FastAPI) -> None:
    """Close the n8n pool's idle connections, as n8n's keep-alive does after a few quiet seconds."""
    connector = app_state(app).generations.streamer.session().connector
    assert connector is not None
    conns = connector._conns
    for idle in conns.values():
        for protocol, _at in idle:
            protocol.close()
    conns.clear()


def _pooled(app: FastAPI) -> int:
    connector = app_state(app).generations.streamer.session().connector
    assert connector is not None
    return sum(len(idle) for idle in connector._conns.values())


async def test_the_next_send_opens_its_n8n_connection_while_its_statement_runs(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After an answered send, the chat's next send starts connecting to n8n before its statement goes to the
    database, and the request then uses that connection (one connection, not two). Another user's send to the
    same chat id warms nothing."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    assert (await send(client, setup, {"content": "first"})).status_code == 200
    _drop_idle_connections(app)
    streamer = app_state(app).generations.streamer
    warming_at_statement: list[int] = []
    real_fetch = Database.fetch_direct

    async def fetch(self: Database, direct: Any, params: Any) -> Any:
        if direct is fast_start.START_DIRECT:  # the start's statement (the final write goes this way too)
            warming_at_statement.append(len(streamer._warming))
        return await real_fetch(self, direct, params)

    monkeypatch.setattr(Database, "fetch_direct", fetch)
    stranger = await create_user(session)
    refused = await client.post(
        f"/api/chats/{setup.chat.id}/messages", json={"content": "x"}, headers=auth_headers(settings, stranger)
    )
    assert refused.status_code == 404
    response = await send(client, setup, {"content": "second"})
    assert response.status_code == 200
    assert data_events(parse_sse(response.text))[-1].type == "done"
    assert warming_at_statement == [0, 1]  # the stranger's send warmed nothing; the owner's was connecting
    assert _pooled(app) == 1


async def test_a_send_calls_n8n_before_it_sets_up_its_response(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generation's task gets the loop first: it hands aiohttp its request before the send builds its
    response, and over a kept-alive connection the request's bytes go out before the head. (Before, the task
    first ran once the response was set up, and on Python 3.11, where aiohttp writes a request's bytes in a
    task of their own, after the head.)"""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    order: list[str] = []
    real_send, real_write = aiohttp.ClientRequest.send, aiohttp.ClientRequest.write_bytes

    async def sent(self: aiohttp.ClientRequest, *args: Any, **kwargs: Any) -> aiohttp.ClientResponse:
        order.append("n8n called")
        return await real_send(self, *args, **kwargs)

    async def write_bytes(self: aiohttp.ClientRequest, *args: Any, **kwargs: Any) -> None:
        order.append("n8n request written")  # the buffered request line and headers go out with the body
        await real_write(self, *args, **kwargs)

    class Recorded(EventSourceResponse):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            order.append("response built")
            super().__init__(*args, **kwargs)

    async def recording(scope: asgi.Scope, receive: asgi.Receive, send_: asgi.Send) -> None:
        async def sending(message: asgi.Message) -> None:
            if message["type"] == "http.response.start":
                order.append("head")
            await send_(message)

        await app(scope, receive, sending)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=recording), base_url="http://test") as client:
        assert (await send(client, setup, {"content": "first"})).status_code == 200  # kept alive from here
        assert _pooled(app) == 1
        monkeypatch.setattr(aiohttp.ClientRequest, "send", sent)
        monkeypatch.setattr(aiohttp.ClientRequest, "write_bytes", write_bytes)
        monkeypatch.setattr(messages_router, "EventSourceResponse", Recorded)
        order.clear()
        response = await send(client, setup, {"content": "second"})
    assert data_events(parse_sse(response.text))[-1].type == "done"
    assert order.index("n8n called") < order.index("response built")
    assert order.index("n8n request written") < order.index("head")


async def test_a_webhook_that_never_answered_is_not_warmed(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Only a webhook that answered is remembered: a send to a dead one does not make the next send wait on it."""
    setup = await chat_with_agent(session, settings, f"http://127.0.0.1:{free_port()}/webhook/x")
    response = await send(client, setup, {"content": "hello?"})
    assert data_events(parse_sse(response.text))[-1].type == "error"
    registry = app_state(app).generations
    assert registry._webhooks == {}
    registry.warm_for(setup.user.id, setup.chat.id)
    assert registry.streamer._warming == {}


async def _pooled_pids(db: Database, count: int) -> set[int]:
    """The server pids behind `count` connections of the pool, held at once (so they are distinct ones)."""
    async with contextlib.AsyncExitStack() as stack:
        pids = set()
        for _ in range(count):
            conn = await stack.enter_async_context(db.engine.connect())
            pids.add(int((await conn.execute(select(func.pg_backend_pid()))).scalar_one()))
        return pids


async def _terminate(settings: Settings, pids: set[int]) -> None:
    """What a database restart does to a pool: the server ends these backends (and they are gone when this returns)."""

    from tests.conftest import _plain_url

    admin = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        assert await admin.fetchval("SELECT count(pg_terminate_backend(p)) FROM unnest($1::int[]) p", list(pids)) == 3
        for _ in range(100):
            left = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])"
            if await admin.fetchval(left, list(pids)) == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        await admin.close()


@pytest.fixture
async def small_pool(settings: Settings) -> AsyncIterator[Database]:
    db = Database(settings.model_copy(update={"DB_POOL_SIZE": 3, "DB_MAX_OVERFLOW": 0}))
    yield db
    await db.dispose()


PID = Direct(select(func.pg_backend_pid()))


async def _each_pooled(db: Database, count: int) -> list[int | str]:
    """`PID` through `fetch_direct` once on each of `count` pooled connections in turn (its pid, or "lost"):
    the connection a statement used is held after it (last in, first out: it is the next one handed out), so
    the next statement takes another."""
    outcomes: list[int | str] = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            try:
                outcomes.append(int((await db.fetch_direct(PID, {}))[0][0]))
            except ConnectionLost:
                outcomes.append("lost")
            held = await stack.enter_async_context(db.engine.connect())
            pid = int((await held.execute(select(func.pg_backend_pid()))).scalar_one())
            assert outcomes[-1] in (pid, "lost")  # the walk is real: the one just used is the one held
    return outcomes


async def test_a_quiet_pool_sends_its_statements_to_the_connection_used_last(small_pool: Database) -> None:
    """Last in, first out: one request at a time keeps to one connection, which prepares the statements once
    and reaches PostgreSQL's generic plan after five runs (first-in-first-out spread a new pool's
    preparations and first plans over every connection: docs/PERFORMANCE.md)."""
    assert len(await _pooled_pids(small_pool, 3)) == 3  # three connections open, all idle now
    used = [int((await small_pool.fetch_direct(PID, {}))[0][0]) for _ in range(6)]
    async with small_pool.sessionmaker() as session:
        used.append(int((await session.execute(select(func.pg_backend_pid()))).scalar_one()))
    assert len(set(used)) == 1


async def test_pooled_connections_killed_by_a_restart_cost_no_direct_statement(
    settings: Settings, small_pool: Database
) -> None:
    """Every pooled connection dies while idle (a restart) and asyncpg has read the server's goodbye: each is
    replaced when the pool hands it out (`app.db._replace_if_closed`), before a statement is sent on it. No
    statement fails, through asyncpg directly or through SQLAlchemy; none runs on a killed backend."""
    idle: list[asyncpg.Connection] = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            conn = await stack.enter_async_context(small_pool.engine.connect())
            idle.append((await conn.get_raw_connection()).driver_connection)
    killed = {conn.get_server_pid() for conn in idle}
    assert len(killed) == 3
    await _terminate(settings, killed)
    # The event loop reads each connection's goodbye (its EOF) while they sit in the pool.
    for _ in range(250):
        if all(conn.is_closed() for conn in idle):
            break
        await asyncio.sleep(0.02)
    assert all(conn.is_closed() for conn in idle)
    used = await _each_pooled(small_pool, 3)
    assert "lost" not in used
    assert len(set(used)) == 3
    assert not killed & set(used)
    assert not killed & await _pooled_pids(small_pool, 3)


async def test_a_connection_lost_under_a_direct_statement_is_one_retryable_failure(small_pool: Database) -> None:
    """The connection dies while the statement runs: `ConnectionLost` (a ConnectionError, so a request answers
    503 and may retry), and the pool's other, older connections are replaced too (a restart kills them all)."""
    before = await _pooled_pids(small_pool, 3)
    suicide = Direct(select(func.pg_terminate_backend(func.pg_backend_pid())))
    with pytest.raises(ConnectionLost) as lost:
        await small_pool.fetch_direct(suicide, {})
    assert isinstance(lost.value, ConnectionError)
    assert isinstance(lost.value.__cause__, asyncpg.PostgresConnectionError | asyncpg.InterfaceError)
    assert not before & await _pooled_pids(small_pool, 3)
    assert (await small_pool.fetch_direct(Direct(select(literal(1))), {}))[0][0] == 1


async def test_a_restart_racing_the_first_statement_costs_at_most_that_statement(
    settings: Settings, small_pool: Database
) -> None:
    """Killed and used at once (asyncpg may still be reading the goodbye, or not have seen it): whatever the
    timing, only the first statement may fail, as `ConnectionLost`, and the rest run on fresh connections."""
    killed = await _pooled_pids(small_pool, 3)
    await _terminate(settings, killed)
    outcomes = await _each_pooled(small_pool, 3)  # each killed connection reached in turn
    assert "lost" not in outcomes[1:]
    assert not killed & {pid for pid in outcomes if isinstance(pid, int)}


async def test_a_start_committed_but_unanswered_is_closed_as_interrupted_and_the_send_is_a_503(
    proxied: tuple[FastAPI, CuttingProxy], session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """The connection dies after the statement committed, before its reply arrived: the question and the
    placeholder exist, but no task will write the answer. It is closed at once as `interrupted` (not left to
    block the chat until the sweeper), the send is a 503 with Retry-After, a retry with the same key replays
    that interrupted answer, and the next send is answered."""
    app, proxy = proxied
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    await session.close()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await send(client, setup, {"content": "first"})).status_code == 200
        fake.requests.clear()
        proxy.armed = True
        cut = await send(client, setup, {"content": "lost reply"}, **{"Idempotency-Key": "k-cut"})
        assert cut.status_code == 503
        assert cut.headers["Retry-After"] == "5"
        assert fake.requests == []  # n8n was never called
        rows = (
            await session.execute(
                select(Message.role, Message.content, Message.status, Message.error)
                .where(Message.chat_id == setup.chat.id)
                .order_by(Message.created_at)
            )
        ).all()
        await session.close()
        assert [(r.role, r.content, r.status) for r in rows[-2:]] == [
            ("user", "lost reply", "complete"),
            ("assistant", "", "interrupted"),
        ]
        assert rows[-1].error["code"] == "interrupted"
        replay = await send(client, setup, {"content": "lost reply"}, **{"Idempotency-Key": "k-cut"})
        assert replay.status_code == 200
        assert data_events(parse_sse(replay.text))[-1].type == "error"
        after = await send(client, setup, {"content": "next"})
        assert after.status_code == 200
        assert data_events(parse_sse(after.text))[-1].type == "done"


async def test_a_start_closed_as_interrupted_is_counted_as_the_sweeper_counts_it(
    proxied: tuple[FastAPI, CuttingProxy], session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """The answer closed as `interrupted` after its start's reply was lost is a generation the quota counted:
    it gets the ledger row (and roll-up) and the error_logs row the sweeper writes for any answer it closes.
    Without them the report showed one generation fewer than the quota counted, and the error log nothing."""
    app, proxy = proxied
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    team = await session.get_one(Team, setup.user.team_id)
    team.settings = {**team.settings, "quota": {"messages_per_user_per_day": 5}}
    await session.commit()
    await session.close()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await send(client, setup, {"content": "first"})).status_code == 200
        proxy.armed = True
        assert (await send(client, setup, {"content": "lost reply"})).status_code == 503
    interrupted = await session.scalar(
        select(Message.id).where(Message.chat_id == setup.chat.id, Message.status == "interrupted")
    )
    assert interrupted is not None
    rows = (await session.execute(select(UsageRecord.outcome, UsageRecord.error_code, UsageRecord.chars_in))).all()
    assert sorted(rows) == [("complete", None, 5), ("interrupted", "interrupted", 10)]
    assert await session.scalar(select(UsageDaily.generations)) == 2  # what the quota counted
    logged = (await session.execute(select(ErrorLog.code, ErrorLog.chat_id))).all()
    assert logged == [("interrupted", setup.chat.id)]
    await assert_rollup_matches_ledger(session)


async def test_a_general_start_committed_but_unanswered_is_closed_as_interrupted_and_counted(
    proxied: tuple[FastAPI, CommitCuttingProxy], session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """The same on the general path (here a regenerate): its transaction's COMMIT succeeded, its reply was lost
    with the connection. The placeholder stayed `streaming` until the sweeper (the chat's sends 409 meanwhile)
    and the quota claim was given back for an answer that was stored. It is closed at once as `interrupted`, with
    its ledger and error_logs rows, the claim kept; the send is a 503, a retry with its key replays that answer,
    and the next send is answered."""
    app, proxy = proxied
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    team = await session.get_one(Team, setup.user.team_id)
    team.settings = {**team.settings, "quota": {"messages_per_user_per_day": 5}}
    await session.commit()
    await session.close()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        first = await send(client, setup, {"content": "first"})
        assert first.status_code == 200
        answer = data_events(parse_sse(first.text))[0].data["data"]["assistant_message_id"]  # type: ignore[index]
        fake.requests.clear()
        proxy.cut_commit = "reply"
        counted = {"outcome": "interrupted", "agent": str(setup.agent.id)}
        before = metrics.REGISTRY.get_sample_value("relay_generations_total", counted) or 0
        cut = await send(client, setup, {"regenerate_of": answer}, **{"Idempotency-Key": "k-cut"})
        assert (cut.status_code, proxy.cut_commit) == (503, "")  # the COMMIT's reply was the one lost
        assert cut.headers["Retry-After"] == "5"
        assert fake.requests == []
        # Kept at once, not only once the next claim reads the ledger; and counted in the metrics.
        assert await session.scalar(select(UsageDaily.generations)) == 2
        assert metrics.REGISTRY.get_sample_value("relay_generations_total", counted) == before + 1
        rows = (
            await session.execute(
                select(Message.role, Message.status, Message.error)
                .where(Message.chat_id == setup.chat.id)
                .order_by(Message.created_at)
            )
        ).all()
        await session.close()
        assert [(r.role, r.status) for r in rows] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("assistant", "interrupted"),
        ]
        assert rows[-1].error["code"] == "interrupted"
        replay = await send(client, setup, {"regenerate_of": answer}, **{"Idempotency-Key": "k-cut"})
        assert replay.status_code == 200
        assert data_events(parse_sse(replay.text))[-1].type == "error"
        after = await send(client, setup, {"content": "next"})
        assert after.status_code == 200
        assert data_events(parse_sse(after.text))[-1].type == "done"
    ledger = (await session.execute(select(UsageRecord.outcome, UsageRecord.error_code))).all()
    assert sorted(ledger, key=str) == [("complete", None), ("complete", None), ("interrupted", "interrupted")]
    assert await session.scalar(select(UsageDaily.generations)) == 3  # the lost one's claim was kept
    logged = (await session.execute(select(ErrorLog.code, ErrorLog.chat_id))).all()
    assert logged == [("interrupted", setup.chat.id)]
    await assert_rollup_matches_ledger(session)


async def test_a_general_start_whose_commit_never_arrived_stores_nothing_and_gives_its_claim_back(
    proxied: tuple[FastAPI, CommitCuttingProxy], session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """The other side of the same failure: the connection died before PostgreSQL got the COMMIT. The check for a
    committed start finds no answer, so nothing is closed or counted: the claim is given back, the send is a
    503, and a retry with its key starts the answer anew."""
    app, proxy = proxied
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    team = await session.get_one(Team, setup.user.team_id)
    team.settings = {**team.settings, "quota": {"messages_per_user_per_day": 5}}
    await session.commit()
    await session.close()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        first = await send(client, setup, {"content": "first"})
        answer = data_events(parse_sse(first.text))[0].data["data"]["assistant_message_id"]  # type: ignore[index]
        proxy.cut_commit = "commit"
        cut = await send(client, setup, {"regenerate_of": answer}, **{"Idempotency-Key": "k-cut"})
        assert (cut.status_code, proxy.cut_commit) == (503, "")
        assert await session.scalar(select(func.count()).select_from(Message)) == 2
        assert await session.scalar(select(UsageDaily.generations)) == 1  # the claim was given back
        await session.close()
        retry = await send(client, setup, {"regenerate_of": answer}, **{"Idempotency-Key": "k-cut"})
        assert retry.status_code == 200
        assert data_events(parse_sse(retry.text))[-1].type == "done"
    assert await session.scalar(select(func.count()).select_from(ErrorLog)) == 0
    await assert_rollup_matches_ledger(session)


async def test_sends_after_a_database_restart_are_answered_and_stored(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """Every pooled connection of the service is killed between two sends: the first send afterwards is
    answered in full (its statement never runs on a dead connection) or, if the kill raced it, is one 503 with
    Retry-After that stored nothing; the next ones are answered, and every answer is stored."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    await session.close()
    assert (await send(client, setup, {"content": "before"})).status_code == 200
    async with contextlib.AsyncExitStack() as stack:
        pool = app_state(app).db
        pids = set()
        for _ in range(3):
            conn = await stack.enter_async_context(pool.engine.connect())
            pids.add(int((await conn.execute(select(func.pg_backend_pid()))).scalar_one()))
    await _terminate(settings, pids)
    statuses = []
    for turn in ("after 1", "after 2", "after 3"):
        response = await send(client, setup, {"content": turn})
        statuses.append(response.status_code)
        if response.status_code == 200:
            assert data_events(parse_sse(response.text))[-1].type == "done"
        else:
            assert response.headers["Retry-After"] == "5"
    assert statuses[0] in (200, 503)
    assert statuses[1:] == [200, 200]
    rows = (
        await session.execute(select(Message.content, Message.status).where(Message.chat_id == setup.chat.id))
    ).all()
    answered = 1 + statuses.count(200)
    assert len(rows) == 2 * answered
    assert all(status == "complete" for _content, status in rows)


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, {"content": 5}, 401),  # no token, a body that is not even valid
        ({}, {}, 401),
        ({"Authorization": "Bearer not-a-token"}, {}, 401),
        ({"Authorization": "Bearer n8nr_" + "x" * 43}, {"content": 5}, 401),  # an unknown API key
        ({"Cookie": "access_token=x", "Origin": "https://evil.example"}, {}, 403),  # the cookie's CSRF check
        ({"Idempotency-Key": ""}, {"content": "hi"}, 401),  # an invalid header, no token
    ],
)
async def test_the_send_route_authenticates_before_it_validates(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    headers: dict[str, str],
    body: dict[str, Any],
    status: int,
) -> None:
    """As on every authenticated route: 401 (or the cookie's 403) before any 422 of the body or headers, though
    the send route resolves its credentials in one dependency of its own (no database work for a token)."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    response = await client.post(f"/api/chats/{setup.chat.id}/messages", json=body, headers=headers)
    assert response.status_code == status, response.text
    valid = await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": 5}, headers=setup.headers)
    assert valid.status_code == 422
    assert await session.scalar(text("SELECT count(*) FROM messages")) == 0
