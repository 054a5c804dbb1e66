"""Idempotency-Key on POST /api/chats/{id}/messages: retries start nothing and answer the same stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asyncpg.exceptions import ConnectionDoesNotExistError
from fastapi import FastAPI
from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat_schemas import MessageCreate
from app.db import utcnow
from app.models import Chat, IdempotencyKey, Message, Team, UsageDaily
from app.services import idempotency
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import count_rows, make_settings, run_migrations
from tests.factories import auth_headers, branch_of, create_chat, create_user
from tests.live import SSE, chat_with_agent, data_events, live_server, parse_sse, streamed_text
from tests.test_stop_resume import LONG, has_text, live_settings, send
from tools.fake_n8n import FakeN8n

pytestmark = pytest.mark.slow
KEY = "send-1 retry"


def same_events(events: list[SSE]) -> list[tuple[str | None, object]]:
    return [(e.id, e.data) for e in events]


@asynccontextmanager
async def key_trigger(session: AsyncSession, when: str, body: str) -> AsyncIterator[None]:
    """A trigger on idempotency_keys (`when`: e.g. "BEFORE UPDATE") running `body` (PL/pgSQL) for the block:
    a write of the key that fails, or waits, where a test needs it to."""
    await session.execute(text(f"CREATE FUNCTION key_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ {body} $$"))
    await session.execute(
        text(f"CREATE TRIGGER key_trigger {when} ON idempotency_keys FOR EACH ROW EXECUTE FUNCTION key_trigger()")
    )
    await session.commit()
    try:
        yield
    finally:
        await session.rollback()
        await session.execute(text("DROP TRIGGER key_trigger ON idempotency_keys"))
        await session.execute(text("DROP FUNCTION key_trigger()"))
        await session.commit()


async def messages_of(app: FastAPI, setup_chat: Chat) -> list[dict[str, object]]:
    async with app_state(app).db.sessionmaker() as s:
        return await branch_of(s, setup_chat.id)


async def test_retry_during_and_after_the_generation_answers_the_same_stream_and_calls_n8n_once(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = live_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            first = send(client, setup, key=KEY)
            await first.wait_for(has_text)
            # A retry while the generation runs: no 409, the same stream from its first event.
            during = send(client, setup, key=KEY)
            original, again = await first.finish(), await during.finish()
            # And after its end, while the live log is kept.
            after = await send(client, setup, key=KEY).finish()
            # Once the live log is gone: rebuilt from storage (same generation, same text, same final message).
            registry = app_state(server.app).generations
            for generation in list(registry.logs.values()):
                registry._forget(generation)
            rebuilt = await send(client, setup, key=KEY).finish()
    assert original[-1].type == "done"
    assert same_events(again) == same_events(original)
    assert same_events(after) == same_events(original)
    assert len(fake.requests) == 1
    messages = await messages_of(app, setup.chat)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert [e.type for e in rebuilt] == ["start", "message", "done"]
    # The terminal event keeps its id (the final write stored it), the text comes as one event just before.
    end = int(original[-1].id or 0)
    assert end > 4
    assert [e.id for e in rebuilt] == ["1", str(end - 1), str(end)]
    assert rebuilt[0].data == original[0].data
    assert rebuilt[-1].data == original[-1].data
    assert streamed_text(rebuilt) == streamed_text(original) == messages[1]["content"]


async def test_same_key_with_another_body_or_chat_is_422_and_changes_nothing(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = live_settings(database_url, tmp_path)
    key = {"Idempotency-Key": "k"}
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
        other = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            await send(client, setup, content="one", key="k").finish()
            url = f"/api/chats/{setup.chat.id}/messages"
            other_body = await client.post(url, json={"content": "two"}, headers={**setup.headers, **key})
            # The same key and body on another chat of the same user.
            second_chat = await create_chat(session, user=setup.user, agent=setup.agent)
            other_path = await client.post(
                f"/api/chats/{second_chat.id}/messages", json={"content": "one"}, headers={**setup.headers, **key}
            )
            # Another user may use the same key: keys are per user (their own chat, their own generation).
            theirs = await send(client, other, content="one", key="k").finish()
    for response in (other_body, other_path):
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
        assert "another request" in response.json()["detail"][0]["msg"]
    assert theirs[-1].type == "done"
    assert len(await messages_of(app, setup.chat)) == 2
    assert len(fake.requests) == 2


@pytest.mark.parametrize("value", ["", "x" * 256, "tab\there", "del\x7f"])
async def test_malformed_key_is_422(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, fake: FakeN8n, value: str
) -> None:
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    response = await client.post(
        f"/api/chats/{setup.chat.id}/messages",
        json={"content": "hi"},
        headers={**setup.headers, "Idempotency-Key": value},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert fake.requests == []
    assert await count_rows(session, "idempotency_keys") == 0


async def test_non_ascii_key_is_422(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, fake: FakeN8n
) -> None:
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    response = await client.post(
        f"/api/chats/{setup.chat.id}/messages",
        json={"content": "hi"},
        headers=[*((k.encode(), v.encode()) for k, v in setup.headers.items()), (b"Idempotency-Key", "clé".encode())],
    )
    assert response.status_code == 422
    assert fake.requests == []


async def test_refused_send_gives_the_key_back_and_an_expired_key_starts_anew(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, fake: FakeN8n
) -> None:
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    stranger = await create_user(session)
    url = f"/api/chats/{setup.chat.id}/messages"
    key = {"Idempotency-Key": "again"}
    # Refused (another user's chat: 404): nothing is remembered for the key.
    refused = await client.post(url, json={"content": "hi"}, headers={**auth_headers(settings, stranger), **key})
    assert refused.status_code == 404
    missing = await client.post(
        f"/api/chats/{uuid.uuid4()}/messages", json={"content": "hi"}, headers={**setup.headers, **key}
    )
    assert missing.status_code == 404
    assert await count_rows(session, "idempotency_keys") == 0
    first = await client.post(url, json={"content": "hi"}, headers={**setup.headers, **key})
    assert first.status_code == 200
    async with app_state(app).db.sessionmaker() as s:
        await s.execute(update(IdempotencyKey).values(expires_at=utcnow() - timedelta(seconds=1)))
        await s.commit()
    second = await client.post(url, json={"content": "hi"}, headers={**setup.headers, **key})
    assert second.status_code == 200
    assert len(fake.requests) == 2
    assert len(await messages_of(app, setup.chat)) == 4


async def test_a_refused_send_whose_key_cannot_be_given_back_still_answers_its_refusal(
    app: FastAPI, session: AsyncSession, fake: FakeN8n, caplog: pytest.LogCaptureFixture
) -> None:
    """Giving the key back runs while the refusal propagates: when that write fails (the database refuses
    it here), the client still gets its 404, not a 500 raised over it, and the failure is logged; the claim
    then stays until it counts as abandoned."""
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    stranger = await create_user(session)
    url = f"/api/chats/{setup.chat.id}/messages"
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    body = "BEGIN RAISE EXCEPTION 'the delete failed'; END"
    async with key_trigger(session, "BEFORE DELETE", body):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            refused = await client.post(
                url,
                json={"content": "hi"},
                headers={**auth_headers(settings, stranger), "Idempotency-Key": "kept"},
            )
    assert refused.status_code == 404, refused.text
    assert refused.json() == {"detail": "Chat not found"}
    assert "giving back a refused send's Idempotency-Key failed" in caplog.text
    assert await count_rows(session, "idempotency_keys") == 1
    assert fake.requests == []


async def test_a_claim_abandoned_before_its_message_was_stored_does_not_block_the_key(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, fake: FakeN8n
) -> None:
    """A request that claimed the key and died before recording its generation (a crash between the two):
    a retry a minute later starts the generation instead of answering 409 "still starting" for 24 h."""
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    url = f"/api/chats/{setup.chat.id}/messages"
    body = {"content": "hi"}
    claimed_at = utcnow() - timedelta(minutes=2)
    session.add(
        IdempotencyKey(
            user_id=setup.user.id,
            key="orphan",
            request_hash=idempotency.request_hash(url, MessageCreate.model_validate(body).model_dump(mode="json")),
            chat_id=setup.chat.id,
            created_at=claimed_at,
            expires_at=claimed_at + idempotency.KEY_LIFETIME,
        )
    )
    await session.commit()
    response = await client.post(url, json=body, headers={**setup.headers, "Idempotency-Key": "orphan"})
    assert response.status_code == 200, response.text
    assert data_events(parse_sse(response.text))[-1].type == "done"
    assert len(fake.requests) == 1
    assert len(await messages_of(app, setup.chat)) == 2


async def test_a_send_whose_key_could_not_be_recorded_stores_nothing_so_a_retry_calls_n8n_once(
    app: FastAPI, session: AsyncSession, fake: FakeN8n
) -> None:
    """The key names its generation in the transaction that stores the messages: a send cannot have stored
    (and called n8n) while its claim still looks unused. Before, the general path recorded the key in a commit
    of its own after n8n was called; when that write failed (here a trigger refuses it; a crash does the same),
    the claim stayed empty, the send answered an error, and the retry a minute later, finding it abandoned,
    started a second generation: two answers, two calls to n8n, two quota counts."""
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    url = f"/api/chats/{setup.chat.id}/messages"
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = await client.post(url, json={"content": "one"}, headers=setup.headers)
        answer = data_events(parse_sse(first.text))[-1].data["data"]["message"]["id"]  # type: ignore[index]
        # A regenerate takes the general path (the one-statement start takes plain sends only).
        body, headers = {"regenerate_of": answer}, {**setup.headers, "Idempotency-Key": "unrecorded"}
        async with key_trigger(session, "BEFORE UPDATE", "BEGIN RAISE EXCEPTION 'the write failed'; END"):
            failed = await client.post(url, json=body, headers=headers)
        assert failed.status_code >= 500
        for _ in range(100):  # whatever the failed send started has ended
            if not app_state(app).generations.running:
                break
            await asyncio.sleep(0.05)
        # A minute later (the claim of a request that stored nothing is then free again).
        await session.execute(update(IdempotencyKey).values(created_at=utcnow() - timedelta(minutes=2)))
        await session.commit()
        retry = await client.post(url, json=body, headers=headers)
        again = await client.post(url, json=body, headers=headers)
    assert retry.status_code == again.status_code == 200, retry.text
    assert same_events(parse_sse(again.text)) == same_events(parse_sse(retry.text))
    assert len(fake.requests) == 2  # the first send and one regenerate
    roles = await session.scalars(select(Message.role).where(Message.chat_id == setup.chat.id))
    assert sorted(roles) == ["assistant", "assistant", "user"]


async def test_a_send_whose_commit_answered_an_error_but_was_stored_keeps_its_key(
    app: FastAPI, session: AsyncSession, fake: FakeN8n, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start's COMMIT can fail on the client's side after the server committed (the connection died before
    the reply): the messages and the key's record are stored, the request answers an error. The key is not given
    back then (only a claim without a generation is): the client's retry replays that send instead of starting
    a second generation (a second call to n8n, a second quota count)."""
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    url = f"/api/chats/{setup.chat.id}/messages"
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    recorded = idempotency.record
    committed: Callable[[AsyncAdapt_asyncpg_connection], None] = AsyncAdapt_asyncpg_connection.commit
    armed: list[object] = []

    async def record_then_lose_the_commits_reply(**kwargs: Any) -> None:
        await recorded(**kwargs)
        armed.append(True)  # the start's COMMIT comes next

    def commit_and_lose_the_reply(connection: AsyncAdapt_asyncpg_connection) -> None:
        committed(connection)
        if armed:
            armed.clear()
            connection._handle_exception(
                ConnectionDoesNotExistError("connection was closed in the middle of operation")
            )

    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = await client.post(url, json={"content": "one"}, headers=setup.headers)
        answer = data_events(parse_sse(first.text))[-1].data["data"]["message"]["id"]  # type: ignore[index]
        # A regenerate takes the general path (the one-statement start takes plain sends only).
        body, headers = {"regenerate_of": answer}, {**setup.headers, "Idempotency-Key": "lost reply"}
        monkeypatch.setattr(idempotency, "record", record_then_lose_the_commits_reply)
        monkeypatch.setattr(AsyncAdapt_asyncpg_connection, "commit", commit_and_lose_the_reply)
        failed = await client.post(url, json=body, headers=headers)
        monkeypatch.undo()
        assert failed.status_code >= 500
        stored = await session.scalar(
            select(IdempotencyKey.assistant_message_id).execution_options(populate_existing=True)
        )
        assert stored is not None
        retry = await client.post(url, json=body, headers=headers)
    assert retry.status_code == 200, retry.text
    assert len(fake.requests) == 1  # the first send's only: the stored regenerate is replayed, not started again
    roles = await session.scalars(select(Message.role).where(Message.chat_id == setup.chat.id))
    assert sorted(roles) == ["assistant", "assistant", "user"]


async def test_retry_after_the_chat_was_deleted_is_404(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, fake: FakeN8n
) -> None:
    """Once the live log is gone there is nothing to rebuild the stream from: the chat's 404, not a 200
    stream whose `start` has no user message."""
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    url = f"/api/chats/{setup.chat.id}/messages"
    headers = {**setup.headers, "Idempotency-Key": "gone"}
    assert (await client.post(url, json={"content": "hi"}, headers=headers)).status_code == 200
    assert (await client.delete(f"/api/chats/{setup.chat.id}", headers=setup.headers)).status_code == 204
    registry = app_state(app).generations
    for generation in list(registry.logs.values()):
        registry._forget(generation)
    retry = await client.post(url, json={"content": "hi"}, headers=headers)
    assert retry.status_code == 404
    assert retry.json() == {"detail": "Chat not found"}
    assert len(fake.requests) == 1


async def test_retry_on_the_embedded_sqlite_database(tmp_path: Path, fake: FakeN8n) -> None:
    """The key's claim (INSERT ... ON CONFLICT DO NOTHING) and the replay work on SQLite too."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
    await asyncio.to_thread(run_migrations, url)
    settings = make_settings(url, tmp_path)
    application = create_app(settings)
    try:
        async with app_state(application).db.sessionmaker() as s:
            setup = await chat_with_agent(s, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://test") as c:
            url_ = f"/api/chats/{setup.chat.id}/messages"
            headers = {**setup.headers, "Idempotency-Key": "lite"}
            first = await c.post(url_, json={"content": "hi"}, headers=headers)
            again = await c.post(url_, json={"content": "hi"}, headers=headers)
            other = await c.post(url_, json={"content": "ho"}, headers=headers)
    finally:
        await shutdown(application)
    assert first.status_code == again.status_code == 200
    assert parse_sse(again.text) == parse_sse(first.text)
    assert other.status_code == 422
    assert len(fake.requests) == 1


@pytest.mark.parametrize("cancel", ["task", "cancel scope"])
async def test_a_send_cancelled_before_its_commit_frees_its_key_and_its_quota_claim_at_once(
    app: FastAPI, session: AsyncSession, fake: FakeN8n, cancel: str
) -> None:
    """A shutdown cancels the requests still running. A general-path send cancelled after claiming its key
    (and its quota slot) and before its commit stores nothing, so both are given back then and there: before,
    the key was given back on errors only, and the client's retry with it (the browser client retries a send
    that got no answer) answered 409 "still starting" for a minute. A cancel scope (anyio's, as Starlette's
    task groups use) cancels every later wait too: the give-backs are shielded from it."""
    settings = app_state(app).settings
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=echo")
    team = await session.get_one(Team, setup.user.team_id)
    team.settings = {"quota": {"messages_per_user_per_day": 5}}
    await session.commit()
    url = f"/api/chats/{setup.chat.id}/messages"
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = await client.post(url, json={"content": "one"}, headers=setup.headers)
        answer = data_events(parse_sse(first.text))[-1].data["data"]["message"]["id"]  # type: ignore[index]
        # A regenerate takes the general path; the key's record (the last write before the commit) waits for a
        # lock this test holds, so the request is cancelled with its claims made and its messages written.
        body, headers = {"regenerate_of": answer}, {**setup.headers, "Idempotency-Key": "cut"}
        hold = "BEGIN PERFORM pg_advisory_xact_lock(424242); RETURN NEW; END"
        async with key_trigger(session, "BEFORE UPDATE", hold):
            try:
                await session.execute(text("SELECT pg_advisory_lock(424242)"))
                scope = anyio.CancelScope()

                async def post() -> httpx.Response | None:
                    with scope:
                        return await client.post(url, json=body, headers=headers)
                    return None

                send = asyncio.create_task(post())
                for _ in range(200):
                    waiting = await session.scalar(
                        text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 424242"
                            " AND NOT granted"
                            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                        )
                    )
                    if waiting:
                        break
                    await asyncio.sleep(0.025)
                assert waiting == 1
                counted = await session.scalar(
                    select(UsageDaily.generations).where(UsageDaily.user_id == setup.user.id)
                )
                assert counted == 2  # the first send's and this one's claim
                send.cancel() if cancel == "task" else scope.cancel()
                # The lock goes with the cancel: a cancel scope's cancel may also cut asyncpg's request to cancel the
                # waiting statement, which then runs on until it has its lock (as it would at a shutdown).
                await session.execute(text("SELECT pg_advisory_unlock(424242)"))
                await session.commit()
                if cancel == "task":
                    with pytest.raises(asyncio.CancelledError):
                        await send
                else:
                    assert await send is None
                for _ in range(200):  # the shielded give-back runs on after the cancel
                    if await count_rows(session, "idempotency_keys") == 0:
                        break
                    await asyncio.sleep(0.025)
            finally:
                await session.execute(text("SELECT pg_advisory_unlock_all()"))
                await session.commit()
        assert await count_rows(session, "idempotency_keys") == 0
        counted = await session.scalar(
            select(UsageDaily.generations)
            .where(UsageDaily.user_id == setup.user.id)
            .execution_options(populate_existing=True)
        )
        assert counted == 1
        assert len(await messages_of(app, setup.chat)) == 2
        # The retry starts at once (not a 409 after waiting for the claim), and stores one answer.
        retry = await asyncio.wait_for(client.post(url, json=body, headers=headers), 5)
    assert retry.status_code == 200, retry.text
    assert data_events(parse_sse(retry.text))[-1].type == "done"
    assert len(fake.requests) == 2
