"""The retention sweep (app.services.retention) beyond the error log (tests/test_error_logs.py): refresh tokens a
day past their expiry and quota counters of days before yesterday go; what still serves stays."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.errors import RateLimited
from app.models import RefreshToken, UsageDaily, User, Worker
from app.security import Caller
from app.services import retention
from app.services import usage as usage_service
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import bearer, login
from tests.conftest import _plain_url, make_settings, run_migrations, until_a_statement_waits
from tests.factories import create_team, create_user


def expired_token(user: User, *, ago: timedelta, used: bool = False, revoked: bool = False) -> RefreshToken:
    expires_at = utcnow() - ago
    return RefreshToken(
        user_id=user.id,
        family_id=uuid.uuid4(),
        token_hash=uuid.uuid4().hex * 2,
        expires_at=expires_at,
        used_at=expires_at - timedelta(days=1) if used else None,
        revoked_at=expires_at - timedelta(days=1) if revoked else None,
    )


async def token_rows(session: AsyncSession) -> list[RefreshToken]:
    query = select(RefreshToken).order_by(RefreshToken.expires_at).execution_options(populate_existing=True)
    return list((await session.execute(query)).scalars())


async def test_refresh_tokens_go_a_day_after_their_expiry(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Every sign-in and every refresh (hourly, per open tab) added a row that was never deleted. A row a day
    past its expiry now goes; live rows stay, and a spent live token's reuse still ends its family."""
    user = await create_user(session, email="tokens@example.com")
    first = (await login(web, "tokens@example.com")).json()
    second = (await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})).json()
    session.add_all(
        [
            expired_token(user, ago=timedelta(days=30), used=True),
            expired_token(user, ago=timedelta(days=2), revoked=True),
            expired_token(user, ago=timedelta(hours=12)),
        ]
    )
    await session.commit()
    assert (await retention.sweep(session=session, settings=settings)).refresh_tokens == 2
    rows = await token_rows(session)
    assert len(rows) == 3
    assert rows[0].expires_at < utcnow() - timedelta(hours=11)  # expired within the day: kept
    assert all(row.expires_at > utcnow() for row in rows[1:])
    # The live chain works on; the spent live token still counts as a reuse (after the grace window).
    await session.execute(
        update(RefreshToken).where(RefreshToken.used_at.is_not(None)).values(used_at=utcnow() - timedelta(seconds=11))
    )
    await session.commit()
    assert (await web.get("/api/auth/me", headers=bearer(second["access_token"]))).status_code == 200
    assert (await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})).status_code == 401
    assert (await web.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]})).status_code == 401


async def test_quota_counters_of_days_before_yesterday_go(session: AsyncSession, settings: Settings) -> None:
    """`usage_daily` kept a row per member and day for ever; only today's is read (the day's first send starts
    from the ledger) and yesterday's may be given back just after midnight. Older ones now go."""
    team = await create_team(session, settings={"quota": {"messages_per_user_per_day": 3}})
    user, other = await create_user(session, team=team), await create_user(session, team=team)
    today = utcnow().date()
    session.add_all(
        UsageDaily(user_id=who.id, day=today - timedelta(days=age), generations=1)
        for who in (user, other)
        for age in (400, 40, 2, 1, 0)
    )
    await session.commit()
    assert (await retention.sweep(session=session, settings=settings)).usage_daily == 6
    left = (await session.execute(select(UsageDaily.user_id, UsageDaily.day).order_by(UsageDaily.day))).all()
    assert sorted(day for _, day in left) == [today - timedelta(days=1)] * 2 + [today] * 2
    # Today's count goes on where it was: two more, then the quota.
    caller = Caller(id=user.id, team_id=team.id)
    await usage_service.claim_generation(session=session, user=caller)
    await usage_service.claim_generation(session=session, user=caller)
    with pytest.raises(RateLimited):
        await usage_service.claim_generation(session=session, user=caller)


async def test_retention_on_sqlite(tmp_path: Path) -> None:
    """The embedded database runs the same batched deletes (a two-column key picked by a row value)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'retention.db'}"
    await asyncio.to_thread(run_migrations, url)
    lite = create_app(make_settings(url, tmp_path))
    try:
        async with app_state(lite).db.sessionmaker() as s:
            user = await create_user(s)
            today = utcnow().date()
            s.add_all([expired_token(user, ago=timedelta(days=3)), expired_token(user, ago=timedelta(hours=1))])
            s.add_all(UsageDaily(user_id=user.id, day=today - timedelta(days=age), generations=1) for age in (5, 1))
            await s.commit()
            registry = app_state(lite).generations
            await registry.startup()
            assert registry.recovered
            assert registry.sweeping is not None
            await registry.sweeping  # on its own task (a slow sweep holds up nothing)
            assert len(await token_rows(s)) == 1
            assert list((await s.execute(select(UsageDaily.day))).scalars()) == [today - timedelta(days=1)]
    finally:
        await shutdown(lite)


@pytest.mark.settings(WORKER_HEARTBEAT_INTERVAL=0.2)
async def test_a_slow_sweep_holds_up_neither_start_up_nor_the_heartbeat(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    """The sweep ran inside the heartbeat's loop (and the start-up's recovery): while a batch waited on the
    database (here a table lock, as a migration's CREATE INDEX takes), the worker stopped beating, and past
    STALE_HEARTBEATS intervals another worker's recovery marked its live answers interrupted. It now runs on a
    task of its own: start-up and heartbeats go on, the sweep finishes once the table is free, and a shutdown
    does not wait for it."""
    user = await create_user(session)
    session.add(UsageDaily(user_id=user.id, day=utcnow().date() - timedelta(days=5), generations=1))
    await session.commit()
    registry = app_state(app).generations

    async def beat_of_worker() -> Any:
        session.expire_all()
        return await session.scalar(select(Worker.heartbeat_at).where(Worker.id == registry.worker_id))

    holder = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE usage_daily IN ACCESS EXCLUSIVE MODE")
            async with asyncio.timeout(5):  # held here until the lock went
                await registry.startup()
            assert registry.recovered
            await until_a_statement_waits(holder, "DELETE FROM usage_daily%")
            first = await beat_of_worker()
            await asyncio.sleep(1.0)  # five heartbeats (a recovery among them), while the sweep still waits
            assert await beat_of_worker() > first
            assert registry.sweeping is not None
            assert not registry.sweeping.done()
            # One sweep at a time: the recovery meanwhile started no second one (each would hold a connection).
            await holder.execute("SELECT pg_stat_clear_snapshot()")
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM usage_daily%'"
            )
            assert waiting == 1
            await session.rollback()
        async with asyncio.timeout(10):
            await registry.sweeping
        assert list((await session.execute(select(UsageDaily.day))).scalars()) == []
        await session.rollback()

        async with holder.transaction():
            await holder.execute("LOCK TABLE error_logs IN ACCESS EXCLUSIVE MODE")
            await until_a_statement_waits(holder, "DELETE FROM error_logs%")  # the next sweep, three beats on
            async with asyncio.timeout(5):
                await registry.shutdown()  # cancels it: the worker is unregistered in time
            assert registry.sweeping is None
    finally:
        await holder.close()


async def test_a_failed_sweep_is_logged_and_the_next_recovery_sweeps_again(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep that fails (the database is down) logs `retention sweep postponed` (OPERATIONS.md) and ends its
    task quietly (no "exception was never retrieved"); the next recovery starts another."""
    registry = app_state(app).generations
    sweeps = 0

    async def failing(**_kwargs: Any) -> retention.Swept:
        nonlocal sweeps
        sweeps += 1
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(retention, "sweep", failing)
    await registry.startup()
    assert registry.sweeping is not None
    first = registry.sweeping
    await first
    assert first.exception() is None
    assert "retention sweep postponed (ConnectionRefusedError)" in caplog.text
    await registry._register_and_recover()  # the periodic recovery, as every 3rd heartbeat runs it
    assert registry.sweeping is not first
    await registry.sweeping
    assert sweeps == 2
