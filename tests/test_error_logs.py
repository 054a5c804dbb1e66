"""GET /api/error-logs: admins only, their own team, newest first, paginated with X-Total-Count."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.models import ErrorLog, Team
from app.services import retention
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import make_settings, run_migrations
from tests.factories import auth_headers, create_admin, create_team, create_user


async def add_rows(session: AsyncSession, team: Team, count: int, *, code: str = "upstream_error") -> list[ErrorLog]:
    now = utcnow()
    rows = [
        ErrorLog(
            team_id=team.id,
            code=code,
            message=f"failure {i}",
            upstream_status=500,
            detail={"n8n_message": "Error in workflow"},
            created_at=now - timedelta(minutes=count - i),
        )
        for i in range(count)
    ]
    session.add_all(rows)
    await session.commit()
    return rows


async def test_read_error_logs_newest_first_with_total(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    await add_rows(session, team, 3)
    response = await client.get("/api/error-logs", headers=auth_headers(settings, admin))
    assert response.status_code == 200
    assert response.headers["X-Total-Count"] == "3"
    body = response.json()
    assert [row["message"] for row in body] == ["failure 2", "failure 1", "failure 0"]
    assert set(body[0]) == {"id", "code", "message", "upstream_status", "chat_id", "agent_id", "user_id", "created_at"}
    assert "detail" not in response.text
    assert "Error in workflow" not in response.text


async def test_read_error_logs_paginates(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    await add_rows(session, team, 5)
    headers = auth_headers(settings, admin)
    page = await client.get("/api/error-logs", params={"limit": 2, "offset": 1}, headers=headers)
    assert page.headers["X-Total-Count"] == "5"
    assert [row["message"] for row in page.json()] == ["failure 3", "failure 2"]
    past_end = await client.get("/api/error-logs", params={"offset": 10}, headers=headers)
    assert past_end.json() == []
    assert past_end.headers["X-Total-Count"] == "5"


async def test_read_error_logs_only_own_team(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team, other = await create_team(session), await create_team(session)
    admin = await create_admin(session, team=team)
    await add_rows(session, other, 2)
    response = await client.get("/api/error-logs", headers=auth_headers(settings, admin))
    assert response.json() == []
    assert response.headers["X-Total-Count"] == "0"


async def test_read_error_logs_as_member_is_403(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    member = await create_user(session, team=team)
    await add_rows(session, team, 1)
    response = await client.get("/api/error-logs", headers=auth_headers(settings, member))
    assert response.status_code == 403
    assert "failure" not in response.text


async def test_read_error_logs_without_auth_is_401(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/error-logs")).status_code == 401


async def test_read_error_logs_bad_paging_is_422(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await create_admin(session)
    headers = auth_headers(settings, admin)
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}):
        assert (await client.get("/api/error-logs", params=params, headers=headers)).status_code == 422
    assert (await client.get("/api/error-logs", params={"limit": 100}, headers=headers)).status_code == 200


async def test_record_error_drops_secret_keys_and_missing_ids(session: AsyncSession) -> None:
    import uuid

    from sqlalchemy import select

    from app.services.error_logs import record_error

    team = await create_team(session)
    user = await create_user(session, team=team)
    await record_error(
        session=session,
        team_id=team.id,
        user_id=user.id,
        chat_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        code="upstream_error",
        message="m",
        upstream_status=None,
        detail={"reason": "r", "Authorization": "Bearer x", "webhook_headers": {"k": "v"}, "api_key": "k"},
    )
    await session.commit()
    row = (await session.execute(select(ErrorLog))).scalar_one()
    assert row.detail == {"reason": "r"}
    assert (row.user_id, row.chat_id, row.agent_id) == (user.id, None, None)


async def test_read_error_logs_offset_out_of_range_is_422(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await create_admin(session)
    for offset in ("9223372036854775808", "1000001", "-1"):
        response = await client.get(f"/api/error-logs?offset={offset}", headers=auth_headers(settings, admin))
        assert response.status_code == 422, offset


# --- retention: ERROR_LOG_RETENTION_DAYS, applied by the heartbeat's periodic sweep (app.services.retention) ---


async def aged_rows(session: AsyncSession, team: Team, ages_in_days: list[float]) -> None:
    """One row per age, its message naming the age ("age 91")."""
    now = utcnow()
    session.add_all(
        ErrorLog(team_id=team.id, code="upstream_error", message=f"age {age:g}", created_at=now - timedelta(days=age))
        for age in ages_in_days
    )
    await session.commit()


async def messages_left(session: AsyncSession) -> list[str]:
    rows = await session.execute(select(ErrorLog.message).order_by(ErrorLog.created_at))
    return list(rows.scalars())


@pytest.mark.settings(ERROR_LOG_RETENTION_DAYS=30)
async def test_the_heartbeat_sweep_deletes_error_logs_past_their_retention(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Rows were never deleted: a year of failed calls stayed in the table and in every admin's list. A worker's
    start-up recovery (and every 3rd heartbeat) now deletes rows older than the retention, of every team."""
    team, other = await create_team(session), await create_team(session)
    admin = await create_admin(session, team=team)
    await aged_rows(session, team, [400, 31, 29.9, 1])
    await aged_rows(session, other, [45])
    registry = app_state(app).generations
    await registry.startup()
    assert registry.recovered
    assert registry.sweeping is not None
    await registry.sweeping  # on its own task (a slow sweep holds up nothing)
    assert await messages_left(session) == ["age 29.9", "age 1"]
    response = await client.get("/api/error-logs", headers=auth_headers(settings, admin))
    assert [row["message"] for row in response.json()] == ["age 1", "age 29.9"]
    assert response.headers["X-Total-Count"] == "2"


@pytest.mark.settings(ERROR_LOG_RETENTION_DAYS=0)
async def test_retention_zero_keeps_error_logs_for_ever(session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session)
    await aged_rows(session, team, [3650, 1])
    assert await retention.sweep(session=session, settings=settings) == retention.Swept()
    assert await messages_left(session) == ["age 3650", "age 1"]


async def test_default_retention_is_90_days(session: AsyncSession, settings: Settings) -> None:
    assert settings.ERROR_LOG_RETENTION_DAYS == 90
    team = await create_team(session)
    await aged_rows(session, team, [91, 89])
    assert (await retention.sweep(session=session, settings=settings)).error_logs == 1
    assert await messages_left(session) == ["age 89"]


async def test_a_backlog_goes_oldest_first_in_bounded_sweeps(
    session: AsyncSession, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first sweep after an upgrade may find years of rows: each sweep deletes at most SWEEP_MAX_BATCHES
    batches (so the heartbeat that runs it is not held up), the oldest first; the next sweep goes on."""
    monkeypatch.setattr(retention, "SWEEP_BATCH", 3)
    monkeypatch.setattr(retention, "SWEEP_MAX_BATCHES", 2)
    team = await create_team(session)
    # 11 rows past 90 days, written youngest first: the table's own order is not the age order.
    await aged_rows(session, team, [float(age) for age in range(100, 210, 10)])
    await aged_rows(session, team, [5])
    assert (await retention.sweep(session=session, settings=settings)).error_logs == 6
    assert await messages_left(session) == ["age 140", "age 130", "age 120", "age 110", "age 100", "age 5"]
    assert (await retention.sweep(session=session, settings=settings)).error_logs == 5
    assert (await retention.sweep(session=session, settings=settings)).error_logs == 0
    assert await messages_left(session) == ["age 5"]


async def test_a_sweep_deletes_ten_thousand_rows_in_batches_of_a_thousand(
    session: AsyncSession, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """What OPERATIONS.md says a sweep does to a backlog: at most 10,000 rows per table, the rest the next time."""
    team = await create_team(session)
    old = utcnow() - timedelta(days=200)
    rows = [{"team_id": team.id, "code": "upstream_error", "message": "old", "created_at": old}] * 10_050
    await session.execute(insert(ErrorLog), rows)
    await session.commit()
    caplog.set_level(logging.INFO, logger="app.services.retention")
    assert (await retention.sweep(session=session, settings=settings)).error_logs == 10_000
    assert "retention sweep deleted 10000 error-log row(s)" in caplog.text
    assert (await retention.sweep(session=session, settings=settings)).error_logs == 50
    assert await messages_left(session) == []


async def test_sweepers_of_several_workers_at_once_skip_each_others_rows(
    app: FastAPI, session: AsyncSession, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker of every instance sweeps. A row another transaction holds (another sweeper's batch, a chat
    deletion nulling its chat_id) is skipped, not waited for: the sweeps end at once, a later one takes it."""
    monkeypatch.setattr(retention, "SWEEP_BATCH", 5)
    team = await create_team(session)
    await aged_rows(session, team, [float(age) for age in range(100, 140)])
    oldest = await session.scalar(select(ErrorLog.id).where(ErrorLog.message == "age 139"))
    sessionmaker = app_state(app).db.sessionmaker
    async with sessionmaker() as holder:
        await holder.execute(select(ErrorLog.id).where(ErrorLog.id == oldest).with_for_update())
        sweepers = [sessionmaker() for _ in range(4)]
        try:
            async with asyncio.timeout(10):  # waiting for the held row (the first of every batch) hung here
                swept = await asyncio.gather(*(retention.sweep(session=s, settings=settings) for s in sweepers))
                while (await retention.sweep(session=session, settings=settings)).error_logs:
                    pass
        finally:
            for s in sweepers:
                await s.close()
        assert await messages_left(session) == ["age 139"]
        await holder.rollback()
    assert 0 < sum(result.error_logs for result in swept) <= 39
    assert (await retention.sweep(session=session, settings=settings)).error_logs == 1
    assert await messages_left(session) == []


async def test_error_log_retention_on_sqlite(tmp_path: Path) -> None:
    """The embedded database runs the same batched DELETE (no row locks to skip: one writer at a time)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'retention.db'}"
    await asyncio.to_thread(run_migrations, url)
    lite = create_app(make_settings(url, tmp_path, ERROR_LOG_RETENTION_DAYS=7))
    try:
        registry = app_state(lite).generations
        async with app_state(lite).db.sessionmaker() as s:
            team = await create_team(s)
            await aged_rows(s, team, [8, 6.5])
            await registry.startup()
            assert registry.recovered
            assert registry.sweeping is not None
            await registry.sweeping  # on its own task (a slow sweep holds up nothing)
            assert await messages_left(s) == ["age 6.5"]
    finally:
        await shutdown(lite)
