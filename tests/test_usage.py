"""Usage: a ledger row per generation and outcome, the reports' grouping and tenancy on both databases, quotas."""

from __future__ import annotations

import asyncio
import random
import statistics
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics
from app.config import Settings
from app.db import utcnow
from app.errors import RateLimited
from app.models import Agent, Chat, Message, Team, UsageDaily, UsageRecord, UsageRollup, User
from app.routers.openai_api import Run
from app.security import Caller, create_token, decode_token
from app.services import fast_start
from app.services import usage as usage_service
from app.services.completions import prepare_completion
from app.services.messages import NewGeneration, finish_message, start_message
from app.services.usage_rollup import NIL, counts
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import assert_rollup_matches_ledger, clear_tables, count_rows, make_settings, run_migrations
from tests.factories import auth_headers, branch_of, create_admin, create_agent, create_chat, create_team, create_user
from tests.live import chat_with_agent
from tools.fake_n8n import FakeN8n

ROW_FIELDS = {
    "key",
    "label",
    "generations",
    "completed",
    "errors",
    "cancelled",
    "chars_in",
    "chars_out",
    "tokens_in",
    "tokens_out",
    "ttfc_ms_p50",
    "duration_ms_p50",
}


async def ledger(app: FastAPI) -> list[UsageRecord]:
    """The ledger's rows, after checking that the roll-up equals a fresh aggregation of them."""
    async with app_state(app).db.sessionmaker() as s:
        await assert_rollup_matches_ledger(s)
        return list((await s.execute(select(UsageRecord).order_by(UsageRecord.created_at))).scalars())


# --- one ledger row per generation, for every outcome -----------------------------------------------


async def test_completed_send_writes_one_ledger_row(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    response = await client.post(
        f"/api/chats/{setup.chat.id}/messages", json={"content": "hello there"}, headers=setup.headers
    )
    assert response.status_code == 200
    [row] = await ledger(app)
    assert (row.team_id, row.user_id, row.agent_id, row.chat_id) == (
        setup.user.team_id,
        setup.user.id,
        setup.agent.id,
        setup.chat.id,
    )
    assert (row.outcome, row.error_code) == ("complete", None)
    assert (row.chars_in, row.chars_out) == (len("hello there"), len("Echo: hello there"))
    assert (row.tokens_in, row.tokens_out) == (None, None)  # this workflow reported no usage
    assert row.ttfc_ms is not None
    assert row.duration_ms >= row.ttfc_ms


@pytest.mark.parametrize(
    ("path", "tokens"),
    [("/webhook/agent-stream?scenario=echo_usage", (12, 3)), ("/webhook/agent-json?scenario=json_usage", (12, 3))],
)
async def test_ledger_keeps_the_token_usage_n8n_reports(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    path: str,
    tokens: tuple[int, int],
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + path)
    await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": "hello there"}, headers=setup.headers)
    [row] = await ledger(app)
    assert (row.outcome, row.tokens_in, row.tokens_out) == ("complete", *tokens)
    branch = await branch_of(session, setup.chat.id)
    assert branch[-1]["metadata"]["tokens_in"] == tokens[0]


async def test_failed_send_writes_error_row_with_its_code(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/does-not-exist")
    await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers)
    [row] = await ledger(app)
    assert (row.outcome, row.error_code, row.chars_out, row.ttfc_ms) == ("error", "upstream_error", 0, None)
    assert await count_rows(session, "error_logs") == 1


async def stalling_send(app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n) -> NewGeneration:
    """A send's rows stored (its question and `streaming` placeholder) in a new chat whose agent streams two
    tokens and then stalls for 30 s; its generation not started yet (`registry.start` does)."""
    url = fake.url + "/webhook/agent-stream?scenario=stall&hang=30&after=2"
    setup = await chat_with_agent(session, settings, url)
    async with app_state(app).db.autocommit() as s:
        return await start_message(
            session=s,
            settings=settings,
            user=Caller(id=setup.user.id, team_id=setup.user.team_id),
            chat_id=setup.chat.id,
            content="one two",
            worker_id=app_state(app).generations.worker_id,
        )


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=0.05)
async def test_interrupted_generation_writes_interrupted_row(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    registry = app_state(app).generations
    generation = registry.start(await stalling_send(app, session, settings, fake))
    async with asyncio.timeout(10):
        while not generation.chunks:  # noqa: ASYNC110  # the registry exposes no event for "first chunk"
            await asyncio.sleep(0.01)
    await registry.begin_shutdown()
    [row] = await ledger(app)
    assert (row.outcome, row.error_code) == ("interrupted", "interrupted")
    # The stored partial answer (the generation's own text is released once it ended).
    assert generation.stored is not None
    assert row.chars_out == len(generation.stored["content"]) > 0


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=0.3)
async def test_a_generation_started_while_the_shutdown_drains_is_drained_too(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A send whose check passed just before the shutdown began starts its generation after the drain took its
    list: the drain waited for the others only, and the late one was cut when the loop closed, with no
    terminal event and its row left `streaming`. The drain takes in generations that start while it runs."""
    registry = app_state(app).generations
    first = registry.start(await stalling_send(app, session, settings, fake))
    draining = registry.begin_shutdown()
    late = registry.start(await stalling_send(app, session, settings, fake))  # already past `check_accepting`
    async with asyncio.timeout(10):
        await draining
    assert first.task is not None
    assert first.task.done()
    assert late.task is not None
    assert late.task.done()
    assert late.terminal is not None
    rows = await ledger(app)
    assert sorted((row.outcome, row.error_code) for row in rows) == [("interrupted", "interrupted")] * 2


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=0.3)
async def test_a_generation_started_after_the_drain_returned_is_drained_by_the_shutdown(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """The drain found nothing running and returned; then a send already past its check started its
    generation, and its client left. The shutdown went on at once: its HTTP client closed under the
    generation, which the loop then cut. The shutdown drains again, within the same grace."""
    registry = app_state(app).generations
    await registry.begin_shutdown()
    late = registry.start(await stalling_send(app, session, settings, fake))  # already past `check_accepting`
    async with asyncio.timeout(10):
        await registry.shutdown()
    assert late.task is not None
    assert late.task.done()
    assert late.terminal == "error"
    [row] = await ledger(app)
    assert (row.outcome, row.error_code) == ("interrupted", "interrupted")


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=0.3)
async def test_a_generation_started_after_the_drain_returned_ends_when_the_grace_ends(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """The drain found nothing running and returned; then a send already past its check started its
    generation, and its client stayed. The server waits for that connection (longer than the grace) before
    the application shutdown runs: nothing interrupted the generation when the grace ran out, and the
    server's own timeout then cut its stream with no terminal event. The drain runs again for it."""
    registry = app_state(app).generations
    await registry.begin_shutdown()
    late = registry.start(await stalling_send(app, session, settings, fake))  # already past `check_accepting`
    received = b""
    async with asyncio.timeout(5):  # the agent stalls for 30 s: only the grace's end can end it this soon
        async for chunk in late.sse(settings.STREAM_PING_INTERVAL):
            received += chunk
    assert late.terminal == "error"
    assert b'"code": "interrupted"' in received.rstrip().rsplit(b"\n\n", 1)[-1]
    [row] = await ledger(app)
    assert (row.outcome, row.error_code) == ("interrupted", "interrupted")


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=0.05)
async def test_a_generation_started_after_the_grace_ran_out_is_stored_interrupted(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A send resuming as the drain interrupts the others starts a generation whose task has not taken its
    first step: a cancel then ended it before its body ran (no terminal event, its row left `streaming`).
    It sees the interrupt as it starts, calls no one, and is stored `interrupted`."""
    registry = app_state(app).generations
    first = registry.start(await stalling_send(app, session, settings, fake))
    late_new = await stalling_send(app, session, settings, fake)  # a send already past `check_accepting`
    late: list[Any] = []
    draining = registry.begin_shutdown()
    async with asyncio.timeout(5):
        while not registry.interrupting:  # noqa: ASYNC110  # the drain sets it as the grace runs out
            await asyncio.sleep(0.001)
    assert first.task is not None
    # The late send's handler resumes in the loop turn in which the interrupted one ends.
    first.task.add_done_callback(lambda _task: late.append(registry.start(late_new)))
    async with asyncio.timeout(10):
        await draining
    [generation] = late
    assert generation.terminal == "error"
    assert len(fake.requests) == 1  # the late one called no one
    status = await session.scalar(
        text("SELECT status FROM messages WHERE id = :id"), {"id": uuid.UUID(late_new.assistant_id)}
    )
    assert status == "interrupted"


@pytest.mark.settings(SHUTDOWN_GRACE_SECONDS=0.05)
async def test_a_completion_started_after_the_grace_ran_out_is_answered_interrupted(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """The same for a `/v1` completion: a cancel before its first step left its client with no answer and its
    claimed quota with no usage row. It sees the interrupt as it starts, calls no one, and ends `interrupted`."""
    state = app_state(app)
    registry = state.generations
    team = await create_team(session)
    user = await create_user(session, team=team)
    await create_agent(session, team=team, slug="helper", webhook_url=fake.url + "/webhook/agent-stream")
    async with state.db.sessionmaker() as s:
        completion = await prepare_completion(
            session=s,
            settings=settings,
            user=Caller(id=user.id, team_id=user.team_id),
            model="helper",
            messages=[{"role": "user", "content": "hi"}],
            session_header=None,
        )
    first = registry.start(await stalling_send(app, session, settings, fake))
    late: list[asyncio.Task[Any]] = []
    draining = registry.begin_shutdown()
    async with asyncio.timeout(5):
        while not registry.interrupting:  # noqa: ASYNC110  # the drain sets it as the grace runs out
            await asyncio.sleep(0.001)
    assert first.task is not None
    first.task.add_done_callback(lambda _task: late.append(Run(registry, completion, state.db, settings).start()))
    async with asyncio.timeout(10):
        await draining
    [task] = late
    assert not task.cancelled()
    failure = task.result()
    assert failure is not None
    assert failure.code == "interrupted"
    assert len(fake.requests) == 1  # the chat's generation only: the completion called no one
    rows = (await session.execute(select(UsageRecord.outcome, UsageRecord.chat_id))).all()
    assert sorted(outcome for outcome, _chat in rows) == ["interrupted", "interrupted"]


async def test_generation_of_a_dead_worker_writes_interrupted_row_when_recovered(
    app: FastAPI, session: AsyncSession
) -> None:
    """Its worker never wrote the final message: the recovery that does writes the ledger row with it."""
    question = {"role": "user", "content": "question?"}
    orphan = {"role": "assistant", "content": "half", "status": "streaming", "_worker": str(uuid.uuid4())}
    team = await create_team(session)
    user = await create_user(session, team=team)
    agent = await create_agent(session, team=team)
    await create_chat(session, user=user, agent=agent, messages=[question, orphan])
    registry = app_state(app).generations
    await registry.startup()
    await registry.shutdown()
    [row] = await ledger(app)
    assert (row.outcome, row.error_code) == ("interrupted", "interrupted")
    assert (row.team_id, row.user_id, row.agent_id) == (team.id, user.id, agent.id)
    assert (row.chars_in, row.chars_out) == (len("question?"), len("half"))


async def orphan_begun_at(session: AsyncSession, began: datetime) -> Agent:
    """A chat whose answer a vanished worker left `streaming`, begun at `began`; its agent."""
    question = {"role": "user", "content": "question?"}
    orphan = {"role": "assistant", "content": "half", "status": "streaming", "_worker": str(uuid.uuid4())}
    team = await create_team(session)
    user = await create_user(session, team=team)
    agent = await create_agent(session, team=team)
    chat = await create_chat(session, user=user, agent=agent, messages=[question, orphan])
    await session.execute(update(Message).where(Message.chat_id == chat.id).values(created_at=began))
    await session.commit()
    return agent


async def recovered(app: FastAPI) -> UsageRecord:
    """The ledger's one row, once a start-up recovered the orphan."""
    registry = app_state(app).generations
    await registry.startup()
    await registry.shutdown()
    [row] = await ledger(app)
    return row


async def test_a_recovered_generation_counts_from_its_start_and_in_the_metrics(
    app: FastAPI, session: AsyncSession
) -> None:
    """Recovery wrote its ledger row with no duration: the quota, which dates a generation by its row's time
    less its duration, took one from before midnight for today's and counted it again; and the metrics never
    showed it. Its duration now runs from its start, and it counts as an `interrupted` generation."""
    began = datetime.now(UTC) - timedelta(hours=2)
    agent = await orphan_begun_at(session, began)
    labels = {"outcome": "interrupted", "agent": str(agent.id)}
    before = metrics.REGISTRY.get_sample_value("relay_generations_total", labels) or 0
    row = await recovered(app)
    assert row.duration_ms is not None
    started = row.created_at - timedelta(milliseconds=row.duration_ms)
    assert abs((started - began).total_seconds()) < 1
    assert metrics.REGISTRY.get_sample_value("relay_generations_total", labels) == before + 1


async def test_a_generation_recovered_a_month_after_its_start_is_held_at_the_ledgers_limit(
    app: FastAPI, session: AsyncSession
) -> None:
    """Its duration in milliseconds no longer fits the ledger's 32-bit column: held at its limit (the recovery
    failed at each start, and the message stayed `streaming`)."""
    await orphan_begun_at(session, datetime.now(UTC) - timedelta(days=40))
    row = await recovered(app)
    assert (row.outcome, row.duration_ms) == ("interrupted", 2**31 - 1)


async def test_cancelled_final_write_writes_cancelled_row(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    """The stop of a generation ends in a `cancelled` final write; the ledger takes it like any other."""
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    async with app_state(app).db.autocommit() as s:
        new = await start_message(
            session=s,
            settings=settings,
            user=Caller(id=setup.user.id, team_id=setup.user.team_id),
            chat_id=setup.chat.id,
            content="abc",
            worker_id=uuid.uuid4(),
        )
    await finish_message(
        db=app_state(app).db,
        new=new,
        content="par",
        status="cancelled",
        error=None,
        metadata={"duration_ms": 12.4, "ttfc_ms": 3.6},
        failure_detail=None,
        upstream_status=None,
    )
    [row] = await ledger(app)
    assert (row.outcome, row.chars_in, row.chars_out, row.ttfc_ms, row.duration_ms) == ("cancelled", 3, 3, 4, 12)


async def test_refused_send_writes_no_row(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    response = await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": " "}, headers=setup.headers)
    assert response.status_code == 422
    assert await ledger(app) == []


# --- reports ---------------------------------------------------------------------------------------

DAY = date(2026, 11, 20)


def at(day: date, hour: int = 12) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


LEDGER_DEFAULTS: dict[str, Any] = {
    "user_id": None,
    "agent_id": None,
    "chat_id": None,
    "error_code": None,
    "chars_in": 1,
    "chars_out": 2,
    "tokens_in": None,
    "tokens_out": None,
    "ttfc_ms": None,
    "duration_ms": 0,  # unless a row says otherwise, it began at its `created_at`
}


def began(row: dict[str, Any]) -> date:
    """The UTC day a seeded row's generation began: the day the reports (and the quota) count it on."""
    moment: datetime = row["created_at"] - timedelta(milliseconds=row["duration_ms"])
    return moment.astimezone(UTC).date()


async def seed_rows(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Ledger rows at given times, through the service's own write (ledger and roll-up)."""
    await usage_service.add_ledger_rows(session=session, rows=[{**LEDGER_DEFAULTS, **row} for row in rows])
    await session.commit()


async def world(session: AsyncSession) -> dict[str, Any]:
    """Team A (admin, member, two agents) with rows on two days; team B with a row the same day."""
    team = await create_team(session)
    admin = await create_admin(session, team=team, full_name="Ada")
    member = await create_user(session, team=team, full_name=None, email="m@example.com")
    alpha = await create_agent(session, team=team, name="Alpha")
    beta = await create_agent(session, team=team, name="Beta")
    other_team = await create_team(session)
    stranger = await create_admin(session, team=other_team)
    other_agent = await create_agent(session, team=other_team)
    a = {"team_id": team.id}
    await seed_rows(
        session,
        [
            {**a, "user_id": admin.id, "agent_id": alpha.id, "outcome": "complete", "ttfc_ms": 10, "duration_ms": 100,
             "tokens_in": 5, "tokens_out": 7, "created_at": at(DAY, 0) + timedelta(milliseconds=100)},  # began at 0:00
            {**a, "user_id": admin.id, "agent_id": alpha.id, "outcome": "complete", "ttfc_ms": 30, "duration_ms": 300,
             "created_at": at(DAY, 23)},
            {**a, "user_id": member.id, "agent_id": beta.id, "outcome": "error", "error_code": "upstream_error",
             "ttfc_ms": None, "duration_ms": 50, "created_at": at(DAY)},
            {**a, "user_id": member.id, "agent_id": alpha.id, "outcome": "cancelled", "ttfc_ms": 20,
             "duration_ms": 200, "created_at": at(DAY + timedelta(days=1))},
            {**a, "user_id": member.id, "agent_id": alpha.id, "outcome": "interrupted", "ttfc_ms": 40,
             "duration_ms": 400, "created_at": at(DAY + timedelta(days=1))},
            # Outside the period asked for, and another team's row on the same day.
            {**a, "user_id": admin.id, "agent_id": alpha.id, "outcome": "complete",
             "created_at": at(DAY - timedelta(days=1), 23)},
            {"team_id": other_team.id, "user_id": stranger.id, "agent_id": other_agent.id, "outcome": "complete",
             "created_at": at(DAY)},
        ],
    )  # fmt: skip
    return {"team": team, "admin": admin, "member": member, "alpha": alpha, "beta": beta, "stranger": stranger}


PERIOD = {"from": DAY.isoformat(), "to": (DAY + timedelta(days=1)).isoformat()}


async def test_team_usage_by_day(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    w = await world(session)
    response = await client.get("/api/usage", params=PERIOD, headers=auth_headers(settings, w["admin"]))
    assert response.status_code == 200
    rows = response.json()
    assert all(set(r) == ROW_FIELDS for r in rows)
    # Medians are exact below 64 ms (ttfc here) and within 2.5 % above (durations): the roll-up's histograms.
    assert rows == [
        {"key": "2026-11-20", "label": "2026-11-20", "generations": 3, "completed": 2, "errors": 1, "cancelled": 0,
         "chars_in": 3, "chars_out": 6, "tokens_in": 5, "tokens_out": 7, "ttfc_ms_p50": 20.0,
         "duration_ms_p50": pytest.approx(100.0, rel=0.025)},
        {"key": "2026-11-21", "label": "2026-11-21", "generations": 2, "completed": 0, "errors": 1, "cancelled": 1,
         "chars_in": 2, "chars_out": 4, "tokens_in": None, "tokens_out": None, "ttfc_ms_p50": 30.0,
         "duration_ms_p50": pytest.approx(300.0, rel=0.025)},
    ]  # fmt: skip


async def test_team_usage_by_agent_and_user(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    w = await world(session)
    headers = auth_headers(settings, w["admin"])
    by_agent = (await client.get("/api/usage", params={**PERIOD, "group_by": "agent"}, headers=headers)).json()
    assert [(r["key"], r["label"], r["generations"]) for r in by_agent] == [
        (str(w["alpha"].id), "Alpha", 4),
        (str(w["beta"].id), "Beta", 1),
    ]
    assert by_agent[0]["ttfc_ms_p50"] == 25.0  # 10, 20, 30, 40
    by_user = (await client.get("/api/usage", params={**PERIOD, "group_by": "user"}, headers=headers)).json()
    assert [(r["key"], r["label"], r["generations"]) for r in by_user] == [
        (str(w["member"].id), "m@example.com", 3),
        (str(w["admin"].id), "Ada", 2),
    ]


async def test_my_usage_is_mine_only(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    w = await world(session)
    headers = auth_headers(settings, w["member"])
    mine = (await client.get("/api/usage/me", params=PERIOD, headers=headers)).json()
    assert [(r["key"], r["generations"]) for r in mine] == [("2026-11-20", 1), ("2026-11-21", 2)]
    by_agent = (await client.get("/api/usage/me", params={**PERIOD, "group_by": "agent"}, headers=headers)).json()
    assert [(r["label"], r["generations"]) for r in by_agent] == [("Alpha", 2), ("Beta", 1)]
    response = await client.get("/api/usage/me", params={"group_by": "user"}, headers=headers)
    assert response.status_code == 422


async def test_usage_tenancy_and_roles(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    w = await world(session)
    assert (await client.get("/api/usage")).status_code == 401
    assert (await client.get("/api/usage", headers=auth_headers(settings, w["member"]))).status_code == 403
    theirs = (await client.get("/api/usage", params=PERIOD, headers=auth_headers(settings, w["stranger"]))).json()
    assert [(r["key"], r["generations"]) for r in theirs] == [("2026-11-20", 1)]


async def test_usage_default_period_is_the_last_30_days(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    today = utcnow().date()
    await seed_rows(
        session,
        [
            {"team_id": team.id, "user_id": admin.id, "outcome": "complete", "created_at": at(today, 0)},
            {"team_id": team.id, "user_id": admin.id, "outcome": "complete",
             "created_at": at(today - timedelta(days=29), 0)},
            {"team_id": team.id, "user_id": admin.id, "outcome": "complete",
             "created_at": at(today - timedelta(days=30), 23)},
        ],
    )  # fmt: skip
    rows = (await client.get("/api/usage", headers=auth_headers(settings, admin))).json()
    assert [r["key"] for r in rows] == [(today - timedelta(days=29)).isoformat(), today.isoformat()]
    assert rows[1]["label"] == today.isoformat()


@pytest.mark.parametrize(
    "params",
    [
        {"from": "2026-11-02", "to": "2026-11-01"},
        {"from": "2025-01-01", "to": "2026-11-01"},
        {"from": "yesterday"},
        {"to": "2026-13-01"},
        {"to": "0"},
        {"from": "1700000000"},
        {"group_by": "week"},
        {"from": "9999-12-31", "to": "9999-12-31"},
        {"to": "0001-01-10"},
    ],
)
async def test_usage_bad_query_is_422(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, params: dict[str, str]
) -> None:
    admin = await create_admin(session)
    response = await client.get("/api/usage", params=params, headers=auth_headers(settings, admin))
    assert response.status_code == 422


async def test_usage_report_on_sqlite_matches_postgresql(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, tmp_path: Path
) -> None:
    """The embedded database computes the same rows (its medians come from window functions)."""
    w = await world(session)
    expected = {
        group: (await client.get("/api/usage", params={**PERIOD, "group_by": group},
                                 headers=auth_headers(settings, w["admin"]))).json()
        for group in ("day", "agent", "user")
    }  # fmt: skip
    url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    await asyncio.to_thread(run_migrations, url)
    lite_settings = make_settings(url, tmp_path)
    lite = create_app(lite_settings)
    try:
        async with app_state(lite).db.sessionmaker() as s:
            for model in (Team, User, Agent, UsageRecord, UsageRollup):
                rows = [dict(row) for row in (await session.execute(select(model.__table__))).mappings()]
                await s.execute(insert(model), rows)
            await s.commit()
        transport = httpx.ASGITransport(app=lite)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            for group, rows in expected.items():
                got = await c.get(
                    "/api/usage", params={**PERIOD, "group_by": group}, headers=auth_headers(lite_settings, w["admin"])
                )
                assert got.json() == rows, group
    finally:
        await shutdown(lite)


# --- the roll-up the reports read -------------------------------------------------------------------


async def test_rollup_equals_the_ledger_after_mixed_outcomes(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Every outcome, with and without tokens and timings, across teams, days, agents and users (one of
    them deleted before its row was written): the roll-up is the ledger summed, and the reports agree."""
    w = await world(session)
    rng = random.Random(7)
    people = [(w["admin"].id, w["alpha"].id), (w["member"].id, w["beta"].id), (w["member"].id, None)]
    rows: list[dict[str, Any]] = []
    for i in range(120):
        user_id, agent_id = people[i % 3]
        tokens = rng.random() < 0.4
        rows.append({
            "team_id": w["team"].id, "user_id": user_id, "agent_id": agent_id,
            "outcome": rng.choice(["complete", "complete", "error", "cancelled", "interrupted"]),
            "chars_in": rng.randint(0, 500), "chars_out": rng.randint(0, 5000),
            "tokens_in": rng.randint(1, 900) if tokens else None, "tokens_out": rng.randint(1, 900) if tokens else None,
            "ttfc_ms": rng.choice([None, rng.randint(0, 90), rng.randint(100, 5000)]),
            "duration_ms": rng.randint(0, 120_000), "created_at": at(DAY, 0) + timedelta(minutes=37 * i),
        })  # fmt: skip
    await seed_rows(session, rows)
    await assert_rollup_matches_ledger(session)
    headers = auth_headers(settings, w["admin"])
    period = {"from": DAY.isoformat(), "to": (DAY + timedelta(days=3)).isoformat()}
    by_day = (await client.get("/api/usage", params=period, headers=headers)).json()
    in_period = [r for r in rows if DAY <= began(r) <= DAY + timedelta(days=3)]
    assert sum(r["generations"] for r in by_day) == len(in_period) + 5  # and world()'s five rows of the team
    assert sum(r["cancelled"] for r in by_day) == sum(r["outcome"] == "cancelled" for r in in_period) + 1
    by_agent = (await client.get("/api/usage", params={**period, "group_by": "agent"}, headers=headers)).json()
    gone = [r for r in by_agent if r["key"] is None]
    assert [(r["label"], r["generations"]) for r in gone] == [("(deleted)", sum(not r["agent_id"] for r in in_period))]


TASKS = 15  # within the pool (10 + 10 overflow), the test's own session included


@pytest.mark.timeout(60)
async def test_concurrent_finishes_lose_no_counts(app: FastAPI, session: AsyncSession) -> None:
    """Many transactions adding to the same roll-up rows at once (PostgreSQL, one connection each): the
    upsert's row locks make them queue, so every count, sum and histogram entry is kept."""
    team = await create_team(session)
    user = await create_user(session, team=team)
    agent = await create_agent(session, team=team)
    ready, start = asyncio.Barrier(TASKS + 1), asyncio.Event()

    async def finish(i: int) -> None:
        async with app_state(app).db.sessionmaker() as s:
            await s.execute(text("SELECT 1"))  # its own connection and transaction, open
            await ready.wait()
            await start.wait()
            row = {**LEDGER_DEFAULTS, "team_id": team.id, "user_id": user.id, "agent_id": agent.id,
                   "outcome": "complete", "chars_in": i, "ttfc_ms": 100 + i, "created_at": at(DAY)}  # fmt: skip
            await usage_service.add_ledger_rows(session=s, rows=[row])
            await s.commit()

    tasks = [asyncio.create_task(finish(i)) for i in range(TASKS)]
    await ready.wait()  # every task holds a connection of its own
    start.set()
    await asyncio.gather(*tasks)
    rollups = (await session.execute(select(UsageRollup))).scalars().all()
    assert len(rollups) == 4  # the team's day, the agent's, the user's, the user's with the agent
    assert {r.generations for r in rollups} == {TASKS}
    assert {r.chars_in for r in rollups} == {sum(range(TASKS))}
    assert {sum(c for _, c in counts(r.ttfc_hist)) for r in rollups} == {TASKS}
    await assert_rollup_matches_ledger(session)


async def test_usage_days_end_at_midnight_utc(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """A generation begun at 23:59:59.999999 UTC is its day's, one begun at 00:00 UTC the next day's, whatever
    the offset it was written with (these took no time: their final write is their start)."""
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    last_moment = datetime.combine(DAY + timedelta(days=1), datetime.min.time(), UTC) - timedelta(microseconds=1)
    paris = timezone(timedelta(hours=1))
    await seed_rows(
        session,
        [
            {"team_id": team.id, "user_id": admin.id, "outcome": "complete", "duration_ms": 0,
             "created_at": last_moment},
            {"team_id": team.id, "user_id": admin.id, "outcome": "error", "duration_ms": 0,
             "created_at": last_moment + timedelta(microseconds=1)},
            # 00:30 in Paris is 23:30 UTC the day before.
            {"team_id": team.id, "user_id": admin.id, "outcome": "cancelled", "duration_ms": 0,
             "created_at": datetime(2026, 11, 21, 0, 30, tzinfo=paris)},
        ],
    )  # fmt: skip
    headers = auth_headers(settings, admin)
    for day, expected in ((DAY, (2, 1, 0, 1)), (DAY + timedelta(days=1), (1, 0, 1, 0))):
        params = {"from": day.isoformat(), "to": day.isoformat()}
        [row] = (await client.get("/api/usage", params=params, headers=headers)).json()
        assert row["key"] == day.isoformat()
        assert (row["generations"], row["completed"], row["errors"], row["cancelled"]) == expected
    before = {"from": (DAY - timedelta(days=5)).isoformat(), "to": (DAY - timedelta(days=1)).isoformat()}
    assert (await client.get("/api/usage", params=before, headers=headers)).json() == []


async def test_an_answer_over_midnight_is_reported_on_the_day_the_quota_counted_it(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Begun at 23:59:59 UTC, ended at 00:00:02: the quota counted it yesterday (its claim, and the day's first
    claim skips it), so the report is yesterday's too; it was today's (dated by its final write), and a
    report of today disagreed with what the quota let through. The rebuild dates it the same way."""
    team = await create_team(session, settings={"quota": {"messages_per_user_per_day": 1}})
    admin = await create_admin(session, team=team)
    today = utcnow().date()
    midnight = datetime.combine(today, datetime.min.time(), UTC)
    await seed_rows(
        session,
        [{"team_id": team.id, "user_id": admin.id, "outcome": "complete", "duration_ms": 3_000,
          "created_at": midnight + timedelta(seconds=2)}],
    )  # fmt: skip
    headers = auth_headers(settings, admin)

    async def report(day: date) -> list[tuple[str, int]]:
        params = {"from": day.isoformat(), "to": day.isoformat()}
        response = await client.get("/api/usage/me", params=params, headers=headers)
        assert response.status_code == 200
        return [(r["key"], r["generations"]) for r in response.json()]

    yesterday = today - timedelta(days=1)
    for rebuilt in (False, True):
        if rebuilt:
            await usage_service.rebuild_rollups(session=session)
        assert await report(yesterday) == [(yesterday.isoformat(), 1)]
        assert await report(today) == []
    # The quota agrees: none of today's one generation is used.
    caller = Caller(id=admin.id, team_id=team.id)
    assert await usage_service.claim_generation(session=session, user=caller) == today


async def test_rebuilding_gives_the_live_roll_up_with_answers_over_midnight_and_recovered_weeks_later(
    session: AsyncSession,
) -> None:
    """Read one day of final writes at a time, the rebuild met the same day's key again on the next day (an
    answer begun before midnight, one recovered weeks after its start): a duplicate key. It now writes each
    roll-up row once, equal to the one each ledger row's own write built."""
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    agent = await create_agent(session, team=team)
    a = {"team_id": team.id, "user_id": admin.id, "agent_id": agent.id}
    midnight = datetime.combine(DAY, datetime.min.time(), UTC)
    await seed_rows(
        session,
        [
            {**a, "outcome": "complete", "duration_ms": 100, "created_at": midnight - timedelta(hours=1)},
            {**a, "outcome": "error", "duration_ms": 5_000, "created_at": midnight + timedelta(seconds=1)},
            {**a, "outcome": "complete", "duration_ms": 100, "created_at": midnight + timedelta(hours=1)},
            # Recovered a month after its start: its duration held at the ledger's limit (24.8 days).
            {**a, "outcome": "interrupted", "duration_ms": 2**31 - 1, "created_at": midnight + timedelta(days=30)},
            {**a, "outcome": "complete", "duration_ms": 100,
             "created_at": midnight + timedelta(days=30) - timedelta(milliseconds=2**31 - 1)},
        ],
    )  # fmt: skip

    async def rollup() -> list[tuple[Any, ...]]:
        rows = (await session.execute(select(UsageRollup).where(UsageRollup.team_id == team.id))).scalars().all()
        return sorted(
            (r.day, str(r.agent_id), str(r.user_id), r.generations, r.completed, r.errors, r.duration_hist)
            for r in rows
        )

    live = await rollup()
    await usage_service.rebuild_rollups(session=session)
    session.expunge_all()
    assert await rollup() == live
    await assert_rollup_matches_ledger(session)
    team_days = [(r[0], r[3]) for r in live if r[1] == r[2] == str(NIL)]
    recovered_on = (midnight + timedelta(days=30) - timedelta(milliseconds=2**31 - 1)).date()
    assert team_days == [(DAY - timedelta(days=1), 2), (DAY, 1), (recovered_on, 2)]


@pytest.mark.parametrize("group_by", ["day", "agent", "user"])
async def test_usage_medians_are_within_the_stated_error(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, group_by: str
) -> None:
    """Against the exact median of the ledger's values (statistics.median: the middle two averaged, as
    percentile_cont(0.5)): exact below 64 ms, within 2.5 % above, odd and even counts, wide spreads."""
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    users = [admin, *[await create_user(session, team=team) for _ in range(2)]]
    agents = [await create_agent(session, team=team) for _ in range(3)]
    rng = random.Random(group_by)
    rows: list[dict[str, Any]] = []
    for i in range(301):
        spread = [rng.randint(0, 63), rng.randint(64, 3000), int(rng.lognormvariate(9, 2)) % 2**31][i % 3]
        duration = min(spread + rng.randint(0, 99), 2**31 - 1)
        rows.append({
            "team_id": team.id, "user_id": users[i % 3].id, "agent_id": agents[i // 3 % 3].id,
            "outcome": "complete", "ttfc_ms": rng.choice([None, spread]), "duration_ms": duration,
            # Begun at that hour (the day a report counts it on), ended `duration` later.
            "created_at": at(DAY + timedelta(days=i % 4), i % 24) + timedelta(milliseconds=duration),
        })  # fmt: skip
    await seed_rows(session, rows)
    period = {"from": DAY.isoformat(), "to": (DAY + timedelta(days=3)).isoformat(), "group_by": group_by}
    report = (await client.get("/api/usage", params=period, headers=auth_headers(settings, admin))).json()

    def key_of(row: dict[str, Any]) -> str:
        if group_by == "day":
            return began(row).isoformat()
        return str(row["agent_id"] if group_by == "agent" else row["user_id"])

    assert len(report) == (4 if group_by == "day" else 3)
    for got in report:
        mine = [r for r in rows if key_of(r) == got["key"]]
        for field, column in (("ttfc_ms_p50", "ttfc_ms"), ("duration_ms_p50", "duration_ms")):
            values: list[int] = [r[column] for r in mine if r[column] is not None]
            exact = statistics.median(values)
            assert got[field] == pytest.approx(exact, rel=0.025, abs=0.05), (got["key"], field)


async def test_usage_of_deleted_users_and_agents_is_kept_as_deleted(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Deleting agents or users (in SQL: the API only deactivates them) keeps their usage: reported as one
    `(deleted)` row with a null key, their counts and medians merged; deleting the team removes it all."""
    w = await world(session)
    await session.execute(delete(Agent).where(Agent.id.in_([w["alpha"].id, w["beta"].id])))
    await session.execute(delete(User).where(User.id == w["member"].id))
    await session.commit()
    headers = auth_headers(settings, w["admin"])
    by_agent = (await client.get("/api/usage", params={**PERIOD, "group_by": "agent"}, headers=headers)).json()
    assert [(r["key"], r["label"], r["generations"], r["errors"]) for r in by_agent] == [(None, "(deleted)", 5, 2)]
    assert by_agent[0]["ttfc_ms_p50"] == 25.0  # 10, 20, 30, 40 from both agents' histograms
    by_user = (await client.get("/api/usage", params={**PERIOD, "group_by": "user"}, headers=headers)).json()
    assert [(r["key"], r["label"], r["generations"]) for r in by_user] == [
        (None, "(deleted)", 3),
        (str(w["admin"].id), "Ada", 2),
    ]
    by_day = (await client.get("/api/usage", params=PERIOD, headers=headers)).json()
    assert [r["generations"] for r in by_day] == [3, 2]
    await session.execute(delete(Team).where(Team.id == w["team"].id))
    await session.commit()
    assert (await session.execute(select(UsageRollup.team_id).distinct())).scalars().all() == [w["stranger"].team_id]
    await assert_rollup_matches_ledger(session)


# --- quotas ----------------------------------------------------------------------------------------


async def set_quota(client: httpx.AsyncClient, settings: Settings, admin: User, value: Any) -> httpx.Response:
    return await client.put(
        "/api/teams/current",
        json={"settings": {"quota": {"messages_per_user_per_day": value}}},
        headers=auth_headers(settings, admin),
    )


@pytest.mark.parametrize("value", [0, -1, "5", 1.5, True, 1_000_001, {}])
async def test_quota_setting_is_validated(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, value: Any
) -> None:
    admin = await create_admin(session)
    assert (await set_quota(client, settings, admin, value)).status_code == 422
    team = (await client.get("/api/teams/current", headers=auth_headers(settings, admin))).json()
    assert team["settings"]["quota"] == {"messages_per_user_per_day": None}


async def test_quota_refuses_past_the_limit_before_storing(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    admin = await create_admin(session, team=await session.get_one(Team, setup.user.team_id))
    response = await set_quota(client, settings, admin, 2.0)  # JSON has one number type: 2.0 is 2
    assert response.status_code == 200
    assert response.json()["settings"]["quota"] == {"messages_per_user_per_day": 2}
    url = f"/api/chats/{setup.chat.id}/messages"
    for _ in range(2):
        assert (await client.post(url, json={"content": "hi"}, headers=setup.headers)).status_code == 200
    refused = await client.post(url, json={"content": "hi"}, headers=setup.headers)
    assert refused.status_code == 429
    assert refused.json() == {"detail": usage_service.QUOTA_REACHED}
    now = utcnow()
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    assert abs(int(refused.headers["Retry-After"]) - (midnight - now).total_seconds()) < 5
    chat = await session.get_one(Chat, setup.chat.id, populate_existing=True)
    assert chat.message_count == 4  # two sends of two messages; the refused one stored nothing
    assert len(fake.requests) == 2
    # Other members have their own count; lifting the quota lets the user send again.
    other = await create_user(session, team=await session.get_one(Team, setup.user.team_id))
    other_chat = await create_chat(session, user=other, agent=setup.agent)
    sent = await client.post(
        f"/api/chats/{other_chat.id}/messages", json={"content": "hi"}, headers=auth_headers(settings, other)
    )
    assert sent.status_code == 200
    assert (await set_quota(client, settings, admin, None)).status_code == 200
    assert (await client.post(url, json={"content": "hi"}, headers=setup.headers)).status_code == 200


async def test_quota_counts_generations_of_the_day_before_it_was_set(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    admin = await create_admin(session, team=await session.get_one(Team, setup.user.team_id))
    url = f"/api/chats/{setup.chat.id}/messages"
    await client.post(url, json={"content": "hi"}, headers=setup.headers)
    await set_quota(client, settings, admin, 1)
    assert (await client.post(url, json={"content": "hi"}, headers=setup.headers)).status_code == 429


async def quota_chat(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> tuple[User, Callable[[], Awaitable[int]]]:
    """A chat and an admin of its team, sends taking `path` ("one statement", or the general path); the admin,
    and a send's status code."""
    if path == "general":
        monkeypatch.setattr(fast_start, "applies", lambda *_args, **_kwargs: False)
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    admin = await create_admin(session, team=await session.get_one(Team, setup.user.team_id))

    async def send() -> int:
        response = await client.post(
            f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers
        )
        return response.status_code

    return admin, send


@pytest.mark.parametrize("path", ["one statement", "general"])
async def test_a_quota_lifted_and_set_again_counts_the_sends_in_between(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """Quota 2, one send; quota lifted, three sends (no counter moves); quota 2 again: the counter still said
    one, so a fifth send went through. A claim now starts from the ledger when that is ahead of the counter."""
    admin, send = await quota_chat(client, session, settings, fake, monkeypatch, path)
    await set_quota(client, settings, admin, 2)
    assert await send() == 200
    await set_quota(client, settings, admin, None)
    for _ in range(3):
        assert await send() == 200
    await set_quota(client, settings, admin, 2)
    assert await send() == 429
    assert len(await ledger(app)) == 4


@pytest.mark.parametrize("path", ["one statement", "general"])
async def test_a_send_refused_by_a_quota_set_below_the_days_count_is_not_counted(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """Two sends, then a quota of one: the day's first claim stored the ledger's count plus one (3) although it
    refused the send, so with the quota raised to 3 the user's third generation was refused too."""
    admin, send = await quota_chat(client, session, settings, fake, monkeypatch, path)
    for _ in range(2):
        assert await send() == 200
    await set_quota(client, settings, admin, 1)
    assert await send() == 429
    await set_quota(client, settings, admin, 3)
    assert await send() == 200
    assert await send() == 429
    assert len(await ledger(app)) == 3


@pytest.mark.parametrize("path", ["one statement", "general"])
async def test_claims_refused_while_a_generation_runs_leave_the_counter_alone(
    app: FastAPI, session: AsyncSession, settings: Settings, path: str
) -> None:
    """Quota 1, claimed by a generation still running (counted by the day's counter, not yet in the ledger): the
    next claims are refused and leave the counter at 1. Counted, they used up generations the user never had
    once the quota was raised the same day."""
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    team = await session.get_one(Team, setup.user.team_id)
    team.settings = {"quota": {"messages_per_user_per_day": 1}}
    await session.commit()
    db = app_state(app).db
    chats = [setup.chat] + [await create_chat(session, user=setup.user, agent=setup.agent) for _ in range(2)]
    started = []
    for chat in chats:
        if path == "general":
            async with db.sessionmaker() as s:
                try:
                    await usage_service.claim_generation(session=s, user=Caller(id=setup.user.id, team_id=team.id))
                    started.append(True)
                except RateLimited:
                    started.append(False)
        else:
            issued = create_token(settings=settings, user_id=setup.user.id, team_id=team.id, token_type="access")
            claims = decode_token(issued.token, settings=settings, expected_type="access")
            new = await fast_start.start(
                db=db, settings=settings, claims=claims, chat_id=chat.id, content="hi", worker_id=uuid.uuid4()
            )
            started.append(new is not None)
    assert started == [True, False, False]
    counter = await session.scalar(select(UsageDaily.generations).where(UsageDaily.user_id == setup.user.id))
    assert counter == 1


async def a_generation_over_midnight(session: AsyncSession, setup: Any, quota: int) -> date:
    """The quota set to `quota`; yesterday's counter holding one generation that began before midnight and
    ended a second after it (its ledger row dated today, after running two minutes). Returns today."""
    team = await session.get_one(Team, setup.user.team_id)
    team.settings = {**team.settings, "quota": {"messages_per_user_per_day": quota}}
    today = utcnow().date()
    midnight = datetime.combine(today, datetime.min.time(), UTC)
    session.add(UsageDaily(user_id=setup.user.id, day=today - timedelta(days=1), generations=1))
    session.add(
        UsageRecord(
            team_id=setup.user.team_id,
            user_id=setup.user.id,
            agent_id=setup.agent.id,
            chat_id=setup.chat.id,
            outcome="complete",
            duration_ms=120_000,
            created_at=midnight + timedelta(seconds=1),
        )
    )
    await session.commit()
    return today


async def test_a_generation_over_midnight_counts_on_the_day_it_began(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """Its claim was yesterday's; the day's first claim counted it again from the ledger (dated by its end), so
    a quota of one refused the user's first send of the day. The one-statement send path."""
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    today = await a_generation_over_midnight(session, setup, quota=1)
    url = f"/api/chats/{setup.chat.id}/messages"
    assert (await client.post(url, json={"content": "hi"}, headers=setup.headers)).status_code == 200
    counted = await session.scalar(select(UsageDaily.generations).where(UsageDaily.day == today))
    assert counted == 1
    assert (await client.post(url, json={"content": "hi"}, headers=setup.headers)).status_code == 429


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
async def test_the_days_first_claim_skips_a_generation_that_began_yesterday(
    settings: Settings, tmp_path: Path, dialect: str
) -> None:
    """The general path's claim (`claim_generation`), on both dialects: the same count as the one statement."""
    if dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
        await asyncio.to_thread(run_migrations, url)
        settings = make_settings(url, tmp_path)
    application = create_app(settings)
    try:
        async with app_state(application).db.sessionmaker() as s:
            setup = await chat_with_agent(s, settings, "http://127.0.0.1:9/webhook/x")
            today = await a_generation_over_midnight(s, setup, quota=1)
        caller = Caller(id=setup.user.id, team_id=setup.user.team_id)
        async with app_state(application).db.sessionmaker() as s:
            assert await usage_service.claim_generation(session=s, user=caller) == today
        async with app_state(application).db.sessionmaker() as s:
            with pytest.raises(RateLimited):
                await usage_service.claim_generation(session=s, user=caller)
    finally:
        await shutdown(application)
        if dialect == "postgresql":
            await clear_tables(settings.DATABASE_URL)  # as the `app` fixture does


async def test_quota_holds_under_concurrent_sends(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    admin = await create_admin(session, team=await session.get_one(Team, setup.user.team_id))
    await set_quota(client, settings, admin, 3)
    chats = [setup.chat] + [await create_chat(session, user=setup.user, agent=setup.agent) for _ in range(7)]
    responses = await asyncio.gather(
        *(
            client.post(f"/api/chats/{chat.id}/messages", json={"content": "hi"}, headers=setup.headers)
            for chat in chats
        )
    )
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 5
    assert len(await ledger(app)) == 3
    assert len(fake.requests) == 3


async def test_send_refused_for_a_running_generation_gives_its_claim_back(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    setup = await chat_with_agent(session, settings, "http://127.0.0.1:9/webhook/x")
    team = await session.get_one(Team, setup.user.team_id)
    team.settings = {**team.settings, "quota": {"messages_per_user_per_day": 5}}
    await session.commit()
    caller = Caller(id=setup.user.id, team_id=setup.user.team_id)
    async with app_state(app).db.autocommit() as s:
        day = await usage_service.claim_generation(session=s, user=caller)
        assert day == utcnow().date()
        await usage_service.release_generation(session=s, user=caller, day=day)
        for _ in range(5):
            await usage_service.claim_generation(session=s, user=caller)
        with pytest.raises(RateLimited):
            await usage_service.claim_generation(session=s, user=caller)


async def test_quota_counter_on_sqlite(tmp_path: Path) -> None:
    """The embedded database runs the same conditional upsert (SQLite's ON CONFLICT ... WHERE, RETURNING)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
    await asyncio.to_thread(run_migrations, url)
    lite = create_app(make_settings(url, tmp_path))
    try:
        async with app_state(lite).db.sessionmaker() as s:
            team = await create_team(s, settings={"quota": {"messages_per_user_per_day": 2}})
            user = await create_user(s, team=team)
            caller = Caller(id=user.id, team_id=team.id)
            await seed_rows(
                s, [{"team_id": team.id, "user_id": user.id, "outcome": "complete", "created_at": utcnow()}]
            )
            assert await usage_service.claim_generation(session=s, user=caller) == utcnow().date()
            with pytest.raises(RateLimited):
                await usage_service.claim_generation(session=s, user=caller)
    finally:
        await shutdown(lite)


async def test_rebuilding_the_roll_up_sums_the_ledger_again_and_touches_nothing_else(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """The documented repair was to downgrade below migration 0011 and upgrade again, which also undid the
    later migrations: every file, share and file copy was dropped. `rebuild_rollups` (`app.cli
    rebuild-usage`) empties the roll-up and sums the ledger into it, and nothing else."""
    await world(session)
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    upload = await client.post(
        f"/api/chats/{setup.chat.id}/files", files={"file": ("a.txt", b"hello", "text/plain")}, headers=setup.headers
    )
    assert upload.status_code == 201, upload.text
    await session.execute(delete(UsageRollup).where(UsageRollup.user_id == NIL))  # a roll-up in doubt
    await session.execute(update(UsageRollup).values(generations=UsageRollup.generations + 5))
    await session.commit()
    async with app_state(app).db.sessionmaker() as s:
        written = await usage_service.rebuild_rollups(session=s)
    assert written == await count_rows(session, "usage_rollups") > 0
    await assert_rollup_matches_ledger(session)
    assert await count_rows(session, "files") == 1
