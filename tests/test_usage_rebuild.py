"""Rebuilding the usage roll-up (`app.cli rebuild-usage`) while the service runs on PostgreSQL: every answer's
final write, committed before, during or after the rebuild, counted once; nothing deadlocks, no final write
fails."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database, utcnow
from app.dialects import statements_of
from app.models import Team, UsageRecord, UsageRollup
from app.security import Caller
from app.services import usage as usage_service
from app.services.messages import NewGeneration, finish_message, start_message
from app.services.usage_rollup import NIL, add_to_rollup, rollup_rows
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import _plain_url, assert_rollup_matches_ledger, count_rows, make_settings, run_migrations
from tests.factories import create_agent, create_user
from tests.live import ChatSetup, chat_with_agent

DAY_MS = 86_400_000


async def answered(db: Database, setup: ChatSetup, *, duration_ms: int = 30) -> None:
    """One answer in the chat, start to final write (the real one: one statement in autocommit), as a
    generation stores it; `duration_ms` dates it (the roll-up's day is the day it began)."""
    settings = db.settings
    async with db.autocommit() as s:
        new: NewGeneration = await start_message(
            session=s,
            settings=settings,
            user=Caller(id=setup.user.id, team_id=setup.user.team_id),
            chat_id=setup.chat.id,
            content="question?",
            worker_id=uuid.uuid4(),
        )
    written = await finish_message(
        db=db,
        new=new,
        content="the answer",
        status="complete",
        error=None,
        metadata={"ttfc_ms": 20, "duration_ms": duration_ms},
        failure_detail=None,
        upstream_status=None,
    )
    assert written is not None  # stored, never refused or failed


def ledger_row(setup: ChatSetup, **overrides: Any) -> dict[str, Any]:
    row = usage_service.ledger_row(
        team_id=setup.user.team_id,
        user_id=setup.user.id,
        agent_id=setup.agent.id,
        chat_id=setup.chat.id,
        outcome="complete",
        error_code=None,
        chars_in=3,
        chars_out=5,
        metadata={"ttfc_ms": 10, "duration_ms": 40},
    )
    return row | overrides


async def waiting_for_locks(conn: asyncpg.Connection, count: int) -> None:
    """Until `count` statements of this test's database wait for a lock."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    async with asyncio.timeout(10):
        while True:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            if await conn.fetchval(query) >= count:
                return
            await asyncio.sleep(0.02)


async def rebuilt(db: Database) -> int:
    async with db.sessionmaker() as s:
        return await usage_service.rebuild_rollups(session=s)


@pytest.mark.timeout(120)
async def test_answers_stored_while_the_roll_up_is_rebuilt_are_each_counted_once(
    app: FastAPI, session: AsyncSession
) -> None:
    """Four chats (four teams) store answers in a loop, before, during and after a rebuild. Each answer
    begins on a day its team has no roll-up row for yet (its duration dates it 1 to 24 days back), so its final
    write inserts new roll-up rows rather than waiting for rows the rebuild deleted: without the ledger's
    lock, one committed after the rebuild's DELETE and before the rebuild read its team's day was summed by
    the rebuild too, whose INSERT then met the row the final write had made (a duplicate key: the rebuild
    failed). Afterwards the roll-up equals the sums over the ledger, which holds every answer."""
    db = app_state(app).db
    setups = [await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x") for _ in range(4)]
    # A ledger for the rebuild to read: each team's last 60 days (its final writes 31-60 days ago, and today's).
    now = utcnow()
    for setup in setups:
        rows = [ledger_row(setup, created_at=now - timedelta(days=31 + i % 30, minutes=i)) for i in range(300)]
        rows += [ledger_row(setup, created_at=now - timedelta(minutes=i)) for i in range(1, 4)]
        await usage_service.add_ledger_rows(session=session, rows=rows)
    await session.commit()
    before = await count_rows(session, "usage_records")

    rebuilding = asyncio.Event()
    done = asyncio.Event()
    stored = [0] * len(setups)

    async def writer(i: int) -> None:
        after = 0
        for days_back in range(1, 25):  # a new day each time: one new roll-up row per grain
            await answered(db, setups[i], duration_ms=days_back * DAY_MS + 3_600_000)
            stored[i] += 1
            if min(stored) >= 2:  # every writer has stored some answers before the rebuild (a busy machine)
                rebuilding.set()
            after += done.is_set()
            if after == 2:
                return

    writers = [asyncio.create_task(writer(i)) for i in range(len(setups))]
    await rebuilding.wait()
    try:
        assert await rebuilt(db) > 0
    finally:
        done.set()
        await asyncio.gather(*writers)
    assert all(2 < n < 24 for n in stored), stored  # some before the rebuild, some after it
    assert await count_rows(session, "usage_records") == before + sum(stored)
    await assert_rollup_matches_ledger(session)


async def test_a_final_write_begun_before_the_rebuild_commits_first_and_is_counted(
    app: FastAPI, session: AsyncSession
) -> None:
    """The worst interleaving for a writer of several statements (a completion's usage, recovery's
    `interrupted`): its ledger row inserted, its roll-up not yet, when the rebuild starts. The rebuild waits for
    it (it holds no roll-up row the writer needs), the writer adds its roll-up and commits, then the rebuild
    reads its row: counted once, no deadlock."""
    db = app_state(app).db
    setup = await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x")
    await usage_service.add_ledger_rows(session=session, rows=[ledger_row(setup) for _ in range(3)])
    await session.commit()
    watcher = await asyncpg.connect(_plain_url(db.settings.DATABASE_URL))
    try:
        async with db.sessionmaker() as writing:
            row = ledger_row(setup)
            await writing.execute(insert(UsageRecord), [row])  # add_ledger_rows' first statement
            rebuild = asyncio.create_task(rebuilt(db))
            await waiting_for_locks(watcher, 1)  # the rebuild waits for this transaction
            await writing.execute(add_to_rollup(statements_of(writing), rollup_rows([row])))
            await writing.commit()
        async with asyncio.timeout(10):
            assert await rebuild == 4
    finally:
        await watcher.close()
    team_day = (
        await session.execute(
            select(UsageRollup.generations).where(UsageRollup.agent_id == NIL, UsageRollup.user_id == NIL)
        )
    ).scalar_one()
    assert team_day == 4
    await assert_rollup_matches_ledger(session)


async def test_the_one_statement_final_write_caught_between_its_roll_up_rows_when_the_rebuild_starts(
    app: FastAPI, session: AsyncSession
) -> None:
    """The worst interleaving for the final write (one statement): its ledger row inserted and its first roll-up
    rows (the team's day, the user's) locked, the next one (the agent's) held by another transaction, when the
    rebuild starts. The roll-up's rows are laid out (three earlier answers) so that a rebuild that deleted the
    roll-up right away would lock the user's row with the agent before reaching the final write's rows, then
    wait for them while the final write waited for that row: a deadlock, one side failed. The rebuild waits for
    the final write instead; both complete and the answer is counted once."""
    db = app_state(app).db
    setup = await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x")
    team = await session.get(Team, setup.user.team_id)
    assert team is not None
    other_agent = (await create_agent(session, team=team)).id
    other_user = (await create_user(session, team=team)).id
    # (user, agent) rows, then (user, other agent) moves the team's and the user's rows after them, then (other
    # user, agent) moves the team's and the agent's: the user-with-agent row is laid out first.
    for overrides in ({}, {"agent_id": other_agent}, {"user_id": other_user}):
        await usage_service.add_ledger_rows(session=session, rows=[ledger_row(setup, **overrides)])
        await session.commit()
    watcher = await asyncpg.connect(_plain_url(db.settings.DATABASE_URL))
    holder = await asyncpg.connect(_plain_url(db.settings.DATABASE_URL))
    try:
        holding = holder.transaction()
        await holding.start()
        await holder.execute(
            "SELECT 1 FROM usage_rollups WHERE team_id = $1 AND agent_id = $2 AND user_id = $3 FOR UPDATE",
            team.id,
            setup.agent.id,
            NIL,
        )
        final = asyncio.create_task(answered(db, setup))
        await waiting_for_locks(watcher, 1)  # the final write, on the agent's row
        rebuild = asyncio.create_task(rebuilt(db))
        await waiting_for_locks(watcher, 2)  # and the rebuild
        await holding.commit()
        async with asyncio.timeout(10):
            await final  # deadlock_timeout is 1 s: a deadlock would have failed one of them by now
            assert await rebuild > 0
    finally:
        await holder.close()
        await watcher.close()
    assert await count_rows(session, "usage_records") == 4
    await assert_rollup_matches_ledger(session)


async def test_two_rebuilds_at_once_take_turns(app: FastAPI, session: AsyncSession) -> None:
    """Two operators (or one twice) at once: the second waits for the first and rebuilds again. Both emptied
    the roll-up first, and the second's DELETE missed the first's new rows: a duplicate key."""
    db = app_state(app).db
    setup = await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x")
    await usage_service.add_ledger_rows(session=session, rows=[ledger_row(setup) for _ in range(3)])
    await session.commit()
    async with asyncio.timeout(20):
        assert list(await asyncio.gather(rebuilt(db), rebuilt(db))) == [4, 4]
    await assert_rollup_matches_ledger(session)


async def test_a_rebuild_that_cannot_lock_the_ledger_lets_the_final_writes_through_meanwhile(
    app: FastAPI, session: AsyncSession
) -> None:
    """A VACUUM (or an index build) of the ledger holds a lock the rebuild's conflicts with: the rebuild's
    request waits, and every final write begun after it queued behind it, for the VACUUM's whole length. A try
    of the rebuild gives up after `LEDGER_LOCK_WAIT` (the final writes go through) and asks again; once the
    VACUUM is over it rebuilds, and every answer is counted once."""
    db = app_state(app).db
    setup = await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x")
    await answered(db, setup)
    holder = await asyncpg.connect(_plain_url(db.settings.DATABASE_URL))
    watcher = await asyncpg.connect(_plain_url(db.settings.DATABASE_URL))
    try:
        vacuum = holder.transaction()
        await vacuum.start()
        await holder.execute("LOCK TABLE usage_records IN SHARE UPDATE EXCLUSIVE MODE")  # VACUUM's lock
        rebuild = asyncio.create_task(rebuilt(db))
        await waiting_for_locks(watcher, 1)  # the rebuild's request
        async with asyncio.timeout(4):  # LEDGER_LOCK_WAIT is 1 s
            for _ in range(3):
                await answered(db, setup)
        assert not rebuild.done()
        await vacuum.commit()
        async with asyncio.timeout(10):
            assert await rebuild == 4
    finally:
        await holder.close()
        await watcher.close()
    assert await count_rows(session, "usage_records") == 4
    await assert_rollup_matches_ledger(session)


async def test_a_rebuild_that_never_gets_the_ledger_gives_up_after_its_patience(
    app: FastAPI, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock on the ledger that never ends (a VACUUM FULL, a forgotten transaction): the rebuild stops asking
    after `LEDGER_LOCK_PATIENCE` (5 min; 1.5 s here) with the lock's error, having changed nothing, rather than
    trying forever."""
    monkeypatch.setattr(usage_service, "LEDGER_LOCK_PATIENCE", 1.5)
    db = app_state(app).db
    setup = await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x")
    await answered(db, setup)
    holder = await asyncpg.connect(_plain_url(db.settings.DATABASE_URL))
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("LOCK TABLE usage_records IN SHARE UPDATE EXCLUSIVE MODE")
        async with asyncio.timeout(6):
            with pytest.raises(DBAPIError) as refused:
                await rebuilt(db)
        assert getattr(refused.value.orig, "sqlstate", None) == usage_service.LOCK_NOT_AVAILABLE
        await held.commit()
    finally:
        await holder.close()
    await assert_rollup_matches_ledger(session)


async def test_once_it_holds_the_ledger_the_rebuild_waits_for_roll_up_rows_as_long_as_it_takes(
    app: FastAPI, session: AsyncSession
) -> None:
    """Only the request for the ledger's lock gives up after `LEDGER_LOCK_WAIT`. Once granted, the rebuild
    waits as the role's settings say: a transaction holding roll-up rows (an operator's fix-up in psql) for
    longer than that delays the rebuild, and it then succeeds, where a rebuild still under the short
    `lock_timeout` failed with "canceling statement due to lock timeout"."""
    db = app_state(app).db
    setup = await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x")
    await usage_service.add_ledger_rows(session=session, rows=[ledger_row(setup) for _ in range(3)])
    await session.commit()
    holder = await asyncpg.connect(_plain_url(db.settings.DATABASE_URL))
    watcher = await asyncpg.connect(_plain_url(db.settings.DATABASE_URL))
    try:
        fixup = holder.transaction()
        await fixup.start()
        await holder.execute("SELECT 1 FROM usage_rollups FOR UPDATE")
        rebuild = asyncio.create_task(rebuilt(db))
        await waiting_for_locks(watcher, 1)  # the rebuild's DELETE waits for the held rows
        await asyncio.sleep(usage_service.LEDGER_LOCK_WAIT + 1)
        assert not rebuild.done()
        await fixup.commit()
        async with asyncio.timeout(10):
            assert await rebuild == 4
    finally:
        await holder.close()
        await watcher.close()
    await assert_rollup_matches_ledger(session)


async def test_the_database_sums_the_ledger_into_the_roll_up_the_final_writes_build(
    app: FastAPI, session: AsyncSession
) -> None:
    """On PostgreSQL the rebuild sums the ledger in SQL (`LEDGER_ROLLUP_SQL`), the final writes add rows built
    in Python (`rollup_rows`): the same roll-up, bucket by bucket, at the edges too (no time to first chunk, 0
    ms, the ledger's largest value, a deleted user's and agent's rows, tokens on some rows only, every
    outcome, answers begun days before their final write)."""
    db = app_state(app).db
    setup = await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x")
    team = await session.get(Team, setup.user.team_id)
    assert team is not None
    agents = [setup.agent.id, (await create_agent(session, team=team)).id, None]  # None: deleted
    users = [setup.user.id, (await create_user(session, team=team)).id, None]
    now = utcnow()
    timings = [None, 0, 1, 63, 64, 65, 999, 60_000, 2**31 - 1]
    rows = [
        ledger_row(
            setup,
            user_id=users[i % 3],
            agent_id=agents[i // 3 % 3],
            outcome=("complete", "error", "cancelled", "interrupted")[i % 4],
            tokens_in=None if i % 5 else i,
            tokens_out=None if i % 7 else 2 * i,
            ttfc_ms=timings[i % len(timings)],
            duration_ms=timings[(i * 5 + 1) % len(timings)] or 0,
            created_at=now - timedelta(hours=7 * i),
        )
        for i in range(120)
    ]
    await usage_service.add_ledger_rows(session=session, rows=rows)
    await session.commit()

    async def stored() -> dict[tuple[Any, ...], tuple[Any, ...]]:
        result = await session.execute(select(*UsageRollup.__table__.columns))
        rollup = {tuple(r[:4]): tuple(r) for r in result}
        await session.commit()
        return rollup

    live = await stored()
    assert await rebuilt(db) == len(live)
    assert await stored() == live
    await assert_rollup_matches_ledger(session)


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "America/Los_Angeles"])
async def test_the_database_dates_roll_up_rows_by_the_utc_day_whatever_the_sessions_time_zone(
    app: FastAPI, session: AsyncSession, zone: str
) -> None:
    """A roll-up row's day is the UTC day its answer began, as the final writes date it, not that day in the
    database session's TimeZone (a server, database or role set to local time): a rebuild in SQL that read the
    day in the session's time zone moved the answers of part of each day to the day before or after."""
    db = app_state(app).db
    setup = await chat_with_agent(session, db.settings, "http://127.0.0.1:9/webhook/x")
    midnight = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    rows = [ledger_row(setup, created_at=midnight - timedelta(hours=hours, minutes=30)) for hours in range(24)]
    await usage_service.add_ledger_rows(session=session, rows=rows)
    await session.commit()

    async def stored() -> dict[tuple[Any, ...], tuple[Any, ...]]:
        result = await session.execute(select(*UsageRollup.__table__.columns))
        rollup = {tuple(r[:4]): tuple(r) for r in result}
        await session.commit()
        return rollup

    live = await stored()
    async with db.sessionmaker() as s:
        await s.execute(text(f"SET TIME ZONE '{zone}'"))
        await s.commit()
        try:
            assert await usage_service.rebuild_rollups(session=s) == len(live)
        finally:
            await s.execute(text("RESET TIME ZONE"))
            await s.commit()
    assert await stored() == live


async def test_on_sqlite_answers_stored_while_the_roll_up_is_rebuilt_are_each_counted_once(tmp_path: Path) -> None:
    """SQLite (the embedded database: one process, one writer at a time): the rebuild's first statement takes the
    write lock, so a final write ends before it (and is read) or waits for its commit (and adds to the rebuilt
    roll-up). Three rebuilds while two chats store answers in a loop (which wait for each, up to SQLite's busy
    timeout); a rebuild that let a final write commit between its DELETE and its INSERT summed that answer
    along with the final write's own row (a duplicate key)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'rebuild.db'}"
    await asyncio.to_thread(run_migrations, url)
    lite = create_app(make_settings(url, tmp_path))
    try:
        db = app_state(lite).db
        async with db.sessionmaker() as s:
            setups = [await chat_with_agent(s, db.settings, "http://127.0.0.1:9/webhook/x") for _ in range(2)]
            now = utcnow()
            for setup in setups:
                rows = [ledger_row(setup, created_at=now - timedelta(days=i % 40, minutes=i)) for i in range(200)]
                await usage_service.add_ledger_rows(session=s, rows=rows)
            await s.commit()
        done = asyncio.Event()
        stored = [0] * len(setups)

        async def writer(i: int) -> None:
            while not done.is_set() or stored[i] < 3:
                await answered(db, setups[i], duration_ms=(stored[i] % 20) * DAY_MS + 30)
                stored[i] += 1

        writers = [asyncio.create_task(writer(i)) for i in range(len(setups))]
        try:
            await asyncio.sleep(0.05)
            for _ in range(3):
                assert await rebuilt(db) > 0
        finally:
            done.set()
            await asyncio.gather(*writers)
        async with db.sessionmaker() as s:
            assert await count_rows(s, "usage_records") == 400 + sum(stored)
            await assert_rollup_matches_ledger(s)
    finally:
        await shutdown(lite)
