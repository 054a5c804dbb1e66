"""The final write of an answer (app.services.messages.finish_message): on PostgreSQL one statement in autocommit
(one round trip, atomic), on SQLite one transaction; the same rows either way."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app import generations, metrics
from app.config import Settings
from app.db import Database, utcnow
from app.models import Agent, Chat, ErrorLog, Message, UsageRecord, UsageRollup, User
from app.security import Caller
from app.services.messages import (
    FinalWrite,
    NewGeneration,
    final_state,
    finish_message,
    mark_interrupted,
    start_message,
)
from app.services.usage_rollup import NIL
from app.state import app_state
from bench.bench_finish import CountingProxy
from main import create_app, shutdown
from tests.conftest import (
    _plain_url,
    assert_rollup_matches_ledger,
    clear_tables,
    count_rows,
    make_settings,
    run_migrations,
    until_a_statement_waits,
)
from tests.factories import create_agent, create_chat, create_team, create_user
from tests.live import ChatSetup, chat_with_agent, data_events, parse_sse
from tools.fake_n8n import FakeN8n

FAILURE = {"message": "n8n answered 502", "code": "upstream_error"}
METADATA = {"ttfc_ms": 40.4, "duration_ms": 900.6, "tokens_in": 7}
FINAL_WRITE = "WITH h AS%"  # the final write's statement, as pg_stat_activity shows it


async def started(db: Database, settings: Settings, setup: ChatSetup) -> NewGeneration:
    """A generation started in the chat (its placeholder answer is `streaming`)."""
    async with db.autocommit() as s:
        return await start_message(
            session=s,
            settings=settings,
            user=Caller(id=setup.user.id, team_id=setup.user.team_id),
            chat_id=setup.chat.id,
            content="question?",
            worker_id=uuid.uuid4(),
        )


async def finish(
    db: Database, new: NewGeneration, *, failed: bool = False, last_event_id: int | None = None
) -> FinalWrite | None:
    """The final write as app/generations.py `_finish` makes it (None: the row was final already)."""
    return await finish_message(
        db=db,
        new=new,
        content="the answer",
        status="error" if failed else "complete",
        error=FAILURE if failed else None,
        metadata=METADATA,
        failure_detail={"n8n_error": "bad gateway", "api_token": "t0ken"} if failed else None,
        upstream_status=502 if failed else None,
        last_event_id=last_event_id,
    )


@pytest.fixture(params=["postgresql", "sqlite"])
async def any_app(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> AsyncIterator[FastAPI]:
    """The application on PostgreSQL (one statement; emptied after, as `app` is) and on SQLite (one
    transaction; a fresh file)."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'final.db'}"
        await asyncio.to_thread(run_migrations, url)
        settings = make_settings(url, tmp_path)
    application = create_app(settings)
    try:
        yield application
    finally:
        await shutdown(application)
        if request.param == "postgresql":
            await clear_tables(settings.DATABASE_URL)


@pytest.mark.parametrize("failed", [False, True])
async def test_final_write_stores_the_answer_its_chat_time_ledger_and_error_rows(
    any_app: FastAPI, failed: bool
) -> None:
    """Both dialects write the same rows; the chat's other columns are left alone (no parameter of the
    statement is taken for a column of the chat's UPDATE)."""
    state = app_state(any_app)
    async with state.db.sessionmaker() as s:
        setup = await chat_with_agent(s, state.settings, "http://127.0.0.1:9/webhook/x")
        chat_created = setup.chat.created_at
    new = await started(state.db, state.settings, setup)
    before = utcnow()
    written = await finish(state.db, new, failed=failed)
    assert written is not None
    assert written.kept
    shown = written.message
    assert (shown["content"], shown["status"]) == ("the answer", "error" if failed else "complete")
    async with state.db.sessionmaker() as s:
        message = await s.get(Message, uuid.UUID(new.assistant_id))
        chat = await s.get(Chat, setup.chat.id)
        assert message is not None
        assert chat is not None
        assert (message.content, message.status, message.meta) == (shown["content"], shown["status"], METADATA)
        assert message.error == (FAILURE if failed else None)
        assert message.created_at == new.assistant_started
        assert chat.last_message_at is not None
        assert chat.last_message_at >= before
        assert chat.updated_at == chat.last_message_at
        assert (chat.created_at, chat.title) == (chat_created, "A chat")
        [row] = (await s.execute(select(UsageRecord))).scalars().all()
        assert (row.chat_id, row.user_id, row.agent_id, row.outcome) == (
            setup.chat.id,
            setup.user.id,
            setup.agent.id,
            shown["status"],
        )
        assert (row.error_code, row.chars_in, row.chars_out) == ("upstream_error" if failed else None, 9, 10)
        assert (row.ttfc_ms, row.duration_ms, row.tokens_in, row.tokens_out) == (40, 901, 7, None)
        await assert_rollup_matches_ledger(s)
        assert await count_rows(s, "usage_rollups") == 4
        logs = (await s.execute(select(ErrorLog))).scalars().all()
        if not failed:
            assert logs == []
            return
        [log] = logs
        assert (log.team_id, log.user_id, log.chat_id, log.agent_id) == (
            setup.user.team_id,
            setup.user.id,
            setup.chat.id,
            setup.agent.id,
        )
        assert (log.code, log.message, log.upstream_status) == ("upstream_error", FAILURE["message"], 502)
        assert log.detail == {"n8n_error": "bad gateway"}  # stored, and the token's key never kept


@pytest.mark.parametrize("failed", [False, True])
async def test_a_final_write_sent_again_writes_nothing(any_app: FastAPI, failed: bool) -> None:
    """Once the row is final (by this write, or by recovery's `interrupted`), the same write sent again changes
    nothing and counts nothing: no second ledger or error-log row, the first final state kept. So a try whose
    answer was lost can be sent again."""
    state = app_state(any_app)
    async with state.db.sessionmaker() as s:
        setup = await chat_with_agent(s, state.settings, "http://127.0.0.1:9/webhook/x")
    first = await started(state.db, state.settings, setup)
    assert await finish(state.db, first, failed=failed, last_event_id=9) is not None
    assert await finish(state.db, first, failed=not failed, last_event_id=12) is None
    second = await started(state.db, state.settings, setup)
    async with state.db.sessionmaker() as s:
        assert await mark_interrupted(s, message_id=uuid.UUID(second.assistant_id), chat_id=setup.chat.id)
        await s.commit()
    assert await finish(state.db, second, failed=failed) is None
    async with state.db.sessionmaker() as s:
        one = await s.get(Message, uuid.UUID(first.assistant_id))
        two = await s.get(Message, uuid.UUID(second.assistant_id))
        assert one is not None
        assert two is not None
        assert (one.status, one.last_event_id) == ("error" if failed else "complete", 9)
        assert (two.status, two.last_event_id, two.content) == ("interrupted", None, "")
        assert await count_rows(s, "usage_records") == 1
        assert await count_rows(s, "error_logs") == (1 if failed else 0)
        await assert_rollup_matches_ledger(s)


async def final_write_behind(
    settings: Settings, db: Database, new: NewGeneration, sql: str, *args: Any, failed: bool = False
) -> Any:
    """`new`'s final write, sent while another transaction that ran `sql` holds its row; what it returned once
    that transaction committed."""
    other = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        holding = other.transaction()
        await holding.start()
        await other.execute(sql, *args)
        writing = asyncio.create_task(finish(db, new, failed=failed, last_event_id=5))
        await until_a_statement_waits(other, FINAL_WRITE)
        await holding.commit()
        return await writing
    finally:
        await other.close()


async def test_a_final_write_waiting_for_recoverys_commit_writes_nothing(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    """Recovery marks the row `interrupted` in a transaction the final write has to wait for: once it commits,
    the final write's UPDATE re-reads the row and leaves it, and so does everything else of the statement (a
    check on the statement's snapshot, taken before that commit, would still have added the ledger row)."""
    db = app_state(app).db
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    new = await started(db, settings, setup)
    recovery = "UPDATE messages SET status = 'interrupted' WHERE id = $1 AND status = 'streaming'"
    assert await final_write_behind(settings, db, new, recovery, uuid.UUID(new.assistant_id)) is None
    answer = await session.get(Message, uuid.UUID(new.assistant_id))
    assert answer is not None
    assert (answer.status, answer.last_event_id) == ("interrupted", None)
    assert await count_rows(session, "usage_records") == 0
    assert await count_rows(session, "usage_rollups") == 0


@pytest.mark.parametrize("failed", [False, True])
async def test_a_final_write_waiting_for_its_chats_deletion_still_counts_the_usage(
    app: FastAPI, session: AsyncSession, settings: Settings, failed: bool
) -> None:
    """The chat is deleted in a transaction the final write has to wait for: once it commits, the answer's row
    is gone, and the usage is recorded as for any answer whose chat went (a snapshot check would have seen the
    row and recorded nothing). A failed answer's error_logs row names no chat: its snapshot still showed the
    chat, which the foreign key would then refuse."""
    db = app_state(app).db
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    new = await started(db, settings, setup)
    deleted = "DELETE FROM chats WHERE id = $1"
    written = await final_write_behind(settings, db, new, deleted, setup.chat.id, failed=failed)
    assert (written is not None, written and written.kept) == (True, False)  # counted; the row was gone
    [row] = (await session.execute(select(UsageRecord))).scalars().all()
    assert (row.chat_id, row.outcome) == (setup.chat.id, "error" if failed else "complete")
    logs = (await session.execute(select(ErrorLog.chat_id, ErrorLog.detail))).all()
    assert logs == ([(None, {"n8n_error": "bad gateway", "stored": False})] if failed else [])
    await assert_rollup_matches_ledger(session)
    assert await count_rows(session, "messages") == 0


async def test_failed_final_write_of_a_deleted_chat_logs_stored_false(any_app: FastAPI) -> None:
    """The answer's row was gone when the final write ran (its chat deleted during the stream): the error log
    row says `stored: false` and names no chat; the ledger keeps the generation, as for any other."""
    state = app_state(any_app)
    async with state.db.sessionmaker() as s:
        setup = await chat_with_agent(s, state.settings, "http://127.0.0.1:9/webhook/x")
    new = await started(state.db, state.settings, setup)
    async with state.db.sessionmaker() as s:
        await s.execute(delete(Chat).where(Chat.id == setup.chat.id))
        await s.commit()
    written = await finish(state.db, new, failed=True)
    assert (written is not None, written and written.kept) == (True, False)
    async with state.db.sessionmaker() as s:
        [log] = (await s.execute(select(ErrorLog))).scalars().all()
        assert log.detail == {"n8n_error": "bad gateway", "stored": False}
        assert (log.chat_id, log.user_id, log.agent_id) == (None, setup.user.id, setup.agent.id)
        [row] = (await s.execute(select(UsageRecord))).scalars().all()
        assert (row.chat_id, row.outcome) == (setup.chat.id, "error")
        await assert_rollup_matches_ledger(s)
        assert await count_rows(s, "messages") == 0
        assert await count_rows(s, "chats") == 0


async def test_final_write_is_one_round_trip_on_postgresql(settings: Settings, session: AsyncSession) -> None:
    """Through a proxy counting the frontend's Sync and Query messages: one statement, no BEGIN or COMMIT,
    whether the answer completed or failed (the statements already prepared, as on a pooled connection)."""
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    host_port = settings.DATABASE_URL.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    proxy = CountingProxy(host, int(port or 5432))
    proxied = settings.DATABASE_URL.replace(f"@{host_port}/", f"@127.0.0.1:{await proxy.start()}/")
    db = Database(settings.model_copy(update={"DATABASE_URL": proxied, "DB_POOL_SIZE": 1, "DB_MAX_OVERFLOW": 0}))
    try:
        trips = []
        for failed in (False, True, False, True):
            new = await started(db, settings, setup)
            before = proxy.round_trips
            await finish(db, new, failed=failed)
            trips.append(proxy.round_trips - before)
        assert trips[2:] == [1, 1], trips  # the first two also prepare their statement: one more round trip
    finally:
        await db.dispose()
        await proxy.close()
    await assert_rollup_matches_ledger(session)
    assert await count_rows(session, "usage_records") == 4
    assert await count_rows(session, "error_logs") == 2


@asynccontextmanager
async def refused_rollups(session: AsyncSession, times: int | None) -> AsyncIterator[None]:
    """A trigger that refuses the final write's roll-up (its last part) the first `times` attempts (None:
    always); `attempts` (a sequence, not rolled back with the statement) counts the refused ones."""
    limit = "nextval('refused_attempts') > 0" if times is None else f"nextval('refused_attempts') <= {times}"
    await session.execute(text("CREATE SEQUENCE refused_attempts"))
    await session.execute(
        text(
            "CREATE FUNCTION refuse_rollup() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF {limit} THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$"
        )
    )
    await session.execute(
        text("CREATE TRIGGER refuse BEFORE INSERT ON usage_rollups FOR EACH ROW EXECUTE FUNCTION refuse_rollup()")
    )
    await session.commit()
    try:
        yield
    finally:
        await session.execute(text("DROP TRIGGER refuse ON usage_rollups"))
        await session.execute(text("DROP FUNCTION refuse_rollup()"))
        await session.execute(text("DROP SEQUENCE refused_attempts"))
        await session.commit()


async def test_failed_final_write_stores_nothing_and_ends_the_stream_with_storage_error(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The statement always fails: it is tried again a few times, nothing of it is kept, not even the parts
    before the one refused, and the stream ends with `storage_error`."""
    monkeypatch.setattr(generations, "FINAL_WRITE_RETRY_DELAYS", (0.05, 0.05))
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    async with refused_rollups(session, None):
        response = await client.post(
            f"/api/chats/{setup.chat.id}/messages", json={"content": "hello there"}, headers=setup.headers
        )
        attempts = (await session.execute(text("SELECT last_value FROM refused_attempts"))).scalar_one()
        await session.commit()
    assert attempts == 3  # the first try and the two retries
    last = data_events(parse_sse(response.text))[-1]
    assert (last.type, last.data["data"]["code"]) == ("error", "storage_error")  # type: ignore[index]
    for table in ("usage_records", "usage_rollups", "error_logs"):
        assert await count_rows(session, table) == 0, table
    answer = (await session.execute(select(Message).where(Message.role == "assistant"))).scalar_one()
    assert answer.status == "streaming"  # as a crash would leave it: recovery marks it interrupted


async def test_a_final_write_that_fails_once_is_tried_again_and_loses_nothing(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A database briefly refusing (a failover, dropped connections): the answer is still stored, once, with
    its one ledger row, and the stream ends with `done` as if nothing happened."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    async with refused_rollups(session, 1):
        response = await client.post(
            f"/api/chats/{setup.chat.id}/messages", json={"content": "hello there"}, headers=setup.headers
        )
        refused = (await session.execute(text("SELECT last_value FROM refused_attempts"))).scalar_one()
        await session.commit()
    events = data_events(parse_sse(response.text))
    assert refused >= 2  # the first try was refused, a later one passed the trigger
    assert events[-1].type == "done"
    answer = (await session.execute(select(Message).where(Message.role == "assistant"))).scalar_one()
    assert (answer.status, answer.content) == ("complete", "Echo: hello there")
    assert answer.last_event_id == int(events[-1].id or 0)
    assert await count_rows(session, "usage_records") == 1
    assert await count_rows(session, "error_logs") == 0
    await assert_rollup_matches_ledger(session)


async def test_final_state_tells_a_committed_write_from_one_that_was_not(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """What a retry reads first when the last try's outcome is unknown, so it never writes an answer twice."""
    db = app_state(app).db
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    new = await started(db, settings, setup)
    assert await final_state(db, new.assistant_id) == ("streaming", None)
    await finish(db, new, last_event_id=7)
    assert await final_state(db, new.assistant_id) == ("complete", 7)
    await session.execute(delete(Chat).where(Chat.id == setup.chat.id))
    await session.commit()
    assert await final_state(db, new.assistant_id) is None


async def test_an_answer_recovery_ended_while_its_final_write_failed_is_not_written_again(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database away long enough for recovery (on another instance) to mark the answer `interrupted`: the
    first final state wins. The retry reads the row, writes nothing (no second ledger row, no rewrite), and
    the stream ends as the stored message says. Nor does it count the generation in the metrics: recovery did
    (it counted twice in `relay_generations_total` and `relay_upstream_errors_total`)."""
    monkeypatch.setattr(generations, "FINAL_WRITE_RETRY_DELAYS", (1.0, 1.0))
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    counted = {"outcome": "interrupted", "agent": str(setup.agent.id)}
    errors_before = metrics.REGISTRY.get_sample_value("relay_upstream_errors_total", {"code": "interrupted"})
    async with refused_rollups(session, None):
        sending = asyncio.create_task(
            client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": "hello there"}, headers=setup.headers)
        )
        async with asyncio.timeout(10):  # until the first try was refused
            while not (await session.execute(text("SELECT is_called FROM refused_attempts"))).scalar_one():
                await session.commit()
                await asyncio.sleep(0.02)
        answer_id = (await session.execute(select(Message.id).where(Message.role == "assistant"))).scalar_one()
        assert await mark_interrupted(session, message_id=answer_id, chat_id=setup.chat.id)  # what recovery does
        await session.commit()
        response = await sending
        attempts = (await session.execute(text("SELECT last_value FROM refused_attempts"))).scalar_one()
        await session.commit()
    last = data_events(parse_sse(response.text))[-1]
    assert (last.type, last.data["data"]["code"]) == ("error", "interrupted")  # type: ignore[index]
    assert attempts == 1  # never written again
    session.expire_all()
    stored = (await session.execute(select(Message).where(Message.id == answer_id))).scalar_one()
    assert (stored.status, stored.last_event_id) == ("interrupted", None)
    assert await count_rows(session, "usage_records") == 0
    assert metrics.REGISTRY.get_sample_value("relay_generations_total", counted) is None
    errors_after = metrics.REGISTRY.get_sample_value("relay_upstream_errors_total", {"code": "interrupted"})
    assert errors_after == errors_before


CONCURRENT = 12  # within the pool (10 + 10 overflow), with the blocker and the test's session


@pytest.mark.timeout(60)
async def test_concurrent_final_writes_of_one_team_all_count(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    """Final writes of one team's users and agents queue on the roll-up rows they share (held locked here
    until all of them wait): one lock order, so none deadlocks, and every count is kept."""
    db = app_state(app).db
    team = await create_team(session)
    users = [await create_user(session, team=team) for _ in range(2)]
    agents = [await create_agent(session, team=team) for _ in range(2)]
    setups = []
    for i in range(CONCURRENT):
        user, agent = users[i % 2], agents[i // 2 % 2]
        chat = await create_chat(session, user=user, agent=agent)
        setups.append(ChatSetup(user, agent, chat, {}))
    news = [await started(db, settings, setup) for setup in setups]
    await finish(db, news[0])  # the team's roll-up rows of today exist: the others update them
    async with db.sessionmaker() as blocker:
        await blocker.execute(select(UsageRollup).where(UsageRollup.team_id == team.id).with_for_update())
        tasks = [asyncio.create_task(finish(db, new, failed=i % 3 == 0)) for i, new in enumerate(news[1:])]
        waiting = 0
        for _ in range(300):
            waiting = await _waiting_on_locks(session)
            if waiting == len(tasks):
                break
            await asyncio.sleep(0.02)
        assert waiting == len(tasks)
        await blocker.commit()
    await asyncio.gather(*tasks)
    session.expire_all()
    rollups = (await session.execute(select(UsageRollup))).scalars().all()
    assert max(r.generations for r in rollups) == CONCURRENT  # the team's day
    assert await count_rows(session, "usage_records") == CONCURRENT
    assert await count_rows(session, "error_logs") == sum(i % 3 == 0 for i in range(CONCURRENT - 1))
    await assert_rollup_matches_ledger(session)


async def _waiting_on_locks(session: AsyncSession) -> int:
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    count = int((await session.execute(query)).scalar_one())
    await session.commit()
    return count


async def test_a_chat_deleted_while_its_final_write_runs_does_not_deadlock(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    """The chat's deletion locks the chat, then its messages (by cascade); the final write locks the chat before
    the answer's row, in that same order, so the two queue rather than deadlock: the deletion commits, and the
    final write, run once, records the usage of an answer whose chat went."""
    db = app_state(app).db
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    new = await started(db, settings, setup)
    other = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        async with other.transaction():
            await other.execute("SELECT id FROM chats WHERE id = $1 FOR UPDATE", setup.chat.id)  # as delete_chat
            writing = asyncio.create_task(finish(db, new, failed=True, last_event_id=5))
            await until_a_statement_waits(other, FINAL_WRITE)
            await other.execute("DELETE FROM chats WHERE id = $1", setup.chat.id)  # deadlock_timeout is 1 s
        written = await writing  # not refused by a deadlock
        assert (written is not None, written and written.kept) == (True, False)  # the row was gone
    finally:
        await other.close()
    [log] = (await session.execute(select(ErrorLog))).scalars().all()
    assert (log.chat_id, log.detail) == (None, {"n8n_error": "bad gateway", "stored": False})
    [row] = (await session.execute(select(UsageRecord))).scalars().all()
    assert (row.chat_id, row.outcome) == (setup.chat.id, "error")
    await assert_rollup_matches_ledger(session)
    assert await count_rows(session, "messages") == 0


async def test_recovery_marking_an_answer_while_its_chat_is_deleted_does_not_deadlock(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    """Recovery (`mark_interrupted`) locks the chat before the answer's row too: behind a deletion it waits,
    then finds the row gone, and the deletion commits."""
    db = app_state(app).db
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    new = await started(db, settings, setup)

    async def recover() -> bool:
        async with db.sessionmaker() as s:
            marked = await mark_interrupted(s, message_id=uuid.UUID(new.assistant_id), chat_id=setup.chat.id)
            await s.commit()
            return marked

    other = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        async with other.transaction():
            await other.execute("SELECT id FROM chats WHERE id = $1 FOR UPDATE", setup.chat.id)  # as delete_chat
            marking = asyncio.create_task(recover())
            await until_a_statement_waits(other, "%")  # any statement: only the recovery can wait
            await other.execute("DELETE FROM chats WHERE id = $1", setup.chat.id)  # deadlock_timeout is 1 s
        assert await marking is False
    finally:
        await other.close()
    assert await count_rows(session, "chats") == 0


async def test_a_final_write_of_an_answer_recovery_ended_does_not_deadlock_with_a_reply_to_it(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    """Recovery ended the answer `interrupted`; a send in the chat stores a question replying to it (its foreign
    key check holds the answer's row FOR KEY SHARE), then moves the chat's leaf. The final write, holding the
    chat, reads the answer's row with the weakest lock a deletion waits for, so it does not wait for that
    check: no deadlock, and it writes nothing (the first final state won)."""
    db = app_state(app).db
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    new = await started(db, settings, setup)
    answer = uuid.UUID(new.assistant_id)
    send = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        await send.execute("UPDATE messages SET status = 'interrupted' WHERE id = $1", answer)  # recovery
        async with send.transaction():
            await send.execute("SELECT 1 FROM messages WHERE id = $1 FOR KEY SHARE", answer)  # the reply's FK check
            writing = asyncio.create_task(finish(db, new, last_event_id=5))
            await asyncio.wait({writing}, timeout=0.5)  # done at once now; it waited for the row with FOR UPDATE
            await send.execute("UPDATE chats SET updated_at = now() WHERE id = $1", setup.chat.id)  # the new leaf
        assert await writing is None  # deadlock_timeout is 1 s: a deadlock would have failed one side by now
    finally:
        await send.close()
    assert await count_rows(session, "usage_records") == 0


@pytest.mark.parametrize("gone", ["user", "agent"])
async def test_the_usage_of_an_answer_whose_user_or_agent_was_deleted_meanwhile_is_kept(
    any_app: FastAPI, gone: str
) -> None:
    """A user or an agent deleted (in SQL) while an answer streams takes the chat with it; the final write then
    counts the usage as for any deleted chat, the ledger's id NULL as the deletion would have made it, as the
    error log stores it. The ledger's foreign key refused the row: the write failed on every try, the answer
    ended `storage_error` and its usage was lost."""
    state = app_state(any_app)
    async with state.db.sessionmaker() as s:
        setup = await chat_with_agent(s, state.settings, "http://127.0.0.1:9/webhook/x")
    new = await started(state.db, state.settings, setup)
    model = User if gone == "user" else Agent
    async with state.db.sessionmaker() as s:
        await s.execute(delete(model).where(model.id == (setup.user.id if gone == "user" else setup.agent.id)))
        await s.commit()
    written = await finish(state.db, new, failed=True)
    assert (written is not None, written and written.kept) == (True, False)
    async with state.db.sessionmaker() as s:
        [row] = (await s.execute(select(UsageRecord))).scalars().all()
        assert (row.user_id, row.agent_id, row.outcome) == (
            (None, setup.agent.id, "error") if gone == "user" else (setup.user.id, None, "error")
        )
        [log] = (await s.execute(select(ErrorLog))).scalars().all()
        assert (log.user_id, log.agent_id) == (row.user_id, row.agent_id)
        # The roll-up keeps the id, as when the row is deleted after its final write (a "(deleted)" row).
        keys = {(r.agent_id, r.user_id) for r in (await s.execute(select(UsageRollup))).scalars()}
        assert keys == {(NIL, NIL), (setup.agent.id, NIL), (NIL, setup.user.id), (setup.agent.id, setup.user.id)}
