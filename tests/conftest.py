"""Test fixtures: one fresh PostgreSQL database per run, migrated once, truncated after every test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from alembic import command
from cryptography.fernet import Fernet
from fastapi import FastAPI
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings, load_settings
from app.migrations import alembic_config
from app.models import Agent, Base, Team, UsageRecord, UsageRollup, User
from app.services.usage_rollup import GONE, NIL, bucket, counts
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import https_client
from tests.factories import auth_headers, create_admin, create_agent, create_chat, create_team, create_user
from tools.fake_n8n import FakeN8n

if TYPE_CHECKING:
    from playwright.sync_api import Browser

    from tests.live import LiveServer as LiveServerType
    from tests.web import Watched

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
#: One Redis database per pytest-xdist worker (15, 14, ...), so workers never flush each other's keys.
_XDIST_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
REDIS_URL = os.environ.get("TEST_REDIS_URL", f"redis://127.0.0.1:6379/{15 - _XDIST_INDEX % 8}")
PG_HELP = (
    "PostgreSQL is not reachable at {url} ({error}). Start it with:\n"
    "  pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n"
    "or point TEST_DATABASE_URL at a server where the user may create databases."
)
TEST_JWT_SECRET = "test-secret-" + "x" * 40
TEST_ENCRYPTION_KEY = Fernet.generate_key().decode()


def _plain_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def until_a_statement_waits(conn: asyncpg.Connection, query: str) -> None:
    """Until a statement LIKE `query` of this test's database waits for a lock (so a race's order is fixed).
    `conn` may be inside a transaction: PostgreSQL keeps one snapshot of pg_stat_activity per transaction, which
    each poll clears."""
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE $1"
    )
    async with asyncio.timeout(10):
        while True:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            if await conn.fetchval(waiting, query):
                return
            await asyncio.sleep(0.02)


async def sent_during_a_demotion(app: FastAPI, admin: User, request: Awaitable[httpx.Response]) -> httpx.Response:
    """`request` (one of `admin`'s) sent while another transaction holds the team's row, as a demotion does;
    once it waits for that row, `admin` is demoted and the demotion commits. Its answer."""
    async with app_state(app).db.sessionmaker() as demotion:
        await demotion.execute(select(Team.id).where(Team.id == admin.team_id).with_for_update())
        sending = asyncio.ensure_future(request)
        await asyncio.wait({sending}, timeout=0.5)
        assert not sending.done()  # waiting for the team's row
        await demotion.execute(update(User).where(User.id == admin.id).values(role="user"))
        await demotion.commit()
    return await sending


def _with_database(url: str, name: str) -> str:
    base, _, _ = _plain_url(url).rpartition("/")
    return f"{base}/{name}"


async def _admin_execute(sql: str) -> None:
    conn = await asyncpg.connect(_plain_url(ADMIN_URL), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards (for one migration test)."""
    name = f"test_mig_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(ADMIN_URL, name).replace("postgresql://", "postgresql+asyncpg://")
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run_migrations(url: str, revision: str = "head", *, downgrade: bool = False) -> None:
    config = alembic_config(url)
    if downgrade:
        command.downgrade(config, revision)
    else:
        command.upgrade(config, revision)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """Create `test_<random>` for this run, migrate it, drop it at the end. Never skips."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.exit(PG_HELP.format(url=ADMIN_URL, error=type(exc).__name__), returncode=3)
    url = _with_database(ADMIN_URL, name).replace("postgresql://", "postgresql+asyncpg://")
    try:
        run_migrations(url)
        yield url
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in tests come from the test itself, never from the caller's environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


def make_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "APP_ENV": "test",
        "DATABASE_URL": database_url,
        "DATA_DIR": tmp_path / "data",
        "JWT_SECRET": TEST_JWT_SECRET,
        "ENCRYPTION_KEY": TEST_ENCRYPTION_KEY,
        "BCRYPT_ROUNDS": 4,
        "COOKIE_SECURE": True,
        "CORS_ORIGINS": ["http://spa.test"],
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": True,
        "REDIS_URL": None,
        "LOG_LEVEL": "INFO",
    }
    values.update(overrides)
    return load_settings(_env_file=None, **values)


@pytest.fixture
def settings(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Settings:
    """The test settings; a module (`pytestmark`) or a test changes some with `@pytest.mark.settings(NAME=value)`."""
    overrides: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("settings"))):  # the closest marker wins
        overrides.update(marker.kwargs)
    return make_settings(database_url, tmp_path, **overrides)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    try:
        yield application
    finally:
        await shutdown(application)
        await clear_tables(settings.DATABASE_URL)


#: Children first, so no foreign key is in the way.
_CLEAR_TABLES = "; ".join(f'DELETE FROM "{table.name}"' for table in reversed(Base.metadata.sorted_tables))


async def clear_tables(database_url: str) -> None:
    """Empty every table, in one transaction and one round trip. DELETE rather than TRUNCATE: on the few rows a
    test leaves it takes ~1 ms where TRUNCATE, which gives each table new files, takes ~45 ms, and this runs after
    nearly every test."""
    conn = await asyncpg.connect(_plain_url(database_url), timeout=5)
    try:
        await conn.execute(f"BEGIN; {_CLEAR_TABLES}; COMMIT")
    finally:
        await conn.close()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
async def web(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client over https, so the app's Secure cookies are sent back."""
    async with https_client(app) as c:
        yield c


@pytest.fixture
async def fake() -> AsyncIterator[FakeN8n]:
    """The fake n8n on a free port, replaying the recordings at full speed (a module may override it)."""
    server = FakeN8n(speed=0, linger=0.2)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session(app: FastAPI) -> AsyncIterator[AsyncSession]:
    async with app_state(app).db.sessionmaker() as s:
        yield s


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A Redis database reserved for tests, flushed before and after; fails (never skips) when down."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        await client.flushdb()
    except Exception as exc:  # pragma: no cover - environment problem
        await client.aclose()
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    yield REDIS_URL
    await client.flushdb()
    await client.aclose()


async def count_rows(session: AsyncSession, table: str) -> int:
    return int((await session.execute(text(f'SELECT count(*) FROM "{table}"'))).scalar_one())


@dataclass
class TeamWorld:
    """A team with an admin, two members and an agent, and a member of another team with an agent of the
    same slug: what the sharing, export and import tests check tenancy against."""

    team: Team
    admin: User
    member: User
    colleague: User
    foreigner: User
    agent: Agent
    foreign_agent: Agent
    settings: Settings

    def h(self, user: User) -> dict[str, str]:
        return auth_headers(self.settings, user)


@pytest.fixture
async def team_world(session: AsyncSession, settings: Settings) -> TeamWorld:
    team = await create_team(session)
    other_team = await create_team(session)
    agent = await create_agent(session, team=team, slug="helper", name="Helper")
    return TeamWorld(
        team=team,
        admin=await create_admin(session, team=team),
        member=await create_user(session, team=team),
        colleague=await create_user(session, team=team),
        foreigner=await create_user(session, team=other_team),
        agent=agent,
        foreign_agent=await create_agent(session, team=other_team, slug="helper", name="Their helper"),
        settings=settings,
    )


# --- the browser tests (tests/test_web_*.py, helpers in tests/web.py): one server, fake n8n and Chromium per module


@pytest.fixture(scope="module")
def web_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServerType]:
    from tests.live import free_port
    from tests.web import serving, web_settings

    port = free_port()
    with serving(web_settings(database_url, tmp_path_factory.mktemp("web"), port), port) as server:
        yield server


@pytest.fixture(scope="module")
def fake_n8n_url() -> Iterator[str]:
    from tests.web import fake_n8n_process

    with fake_n8n_process() as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from tests.web import chromium

    with chromium() as launched:
        yield launched


@pytest.fixture
def web_page(browser: Browser, web_server: LiveServerType, database_url: str) -> Iterator[Watched]:
    """A fresh browser context (no cookies, no storage) on the module's server; the tables are emptied after."""
    from tests.web import truncate, watch

    context = browser.new_context(base_url=web_server.url)
    context.set_default_timeout(10_000)
    try:
        yield watch(context.new_page())
    finally:
        context.close()
        truncate(database_url)


def _fresh_group() -> dict[str, Any]:
    return {"generations": 0, "completed": 0, "errors": 0, "cancelled": 0, "chars_in": 0, "chars_out": 0,
            "tokens_in": None, "tokens_out": None, "ttfc": Counter(), "duration": Counter()}  # fmt: skip


async def assert_rollup_matches_ledger(session: AsyncSession) -> None:
    """The stored roll-up equals the ledger aggregated here, row by row (its four grains, bucket by bucket)."""
    fresh: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(_fresh_group)
    for r in (await session.execute(select(UsageRecord))).scalars():
        # The day it began, as the quota counts it: its final write less its duration.
        day = (r.created_at - timedelta(milliseconds=r.duration_ms)).astimezone(UTC).date()
        agent, user = r.agent_id or GONE, r.user_id or GONE
        for key in ((r.team_id, day, NIL, NIL), (r.team_id, day, agent, NIL), (r.team_id, day, NIL, user),
                    (r.team_id, day, agent, user)):  # fmt: skip
            g = fresh[key]
            g["generations"] += 1
            g["completed"] += r.outcome == "complete"
            g["errors"] += r.outcome in ("error", "interrupted")
            g["cancelled"] += r.outcome == "cancelled"
            g["chars_in"] += r.chars_in
            g["chars_out"] += r.chars_out
            for name in ("tokens_in", "tokens_out"):
                if getattr(r, name) is not None:
                    g[name] = (g[name] or 0) + getattr(r, name)
            if r.ttfc_ms is not None:
                g["ttfc"][bucket(r.ttfc_ms)] += 1
            g["duration"][bucket(r.duration_ms)] += 1
    stored = {
        (x.team_id, x.day, x.agent_id, x.user_id): {
            **{name: getattr(x, name) for name in _fresh_group() if name not in ("ttfc", "duration")},
            "ttfc": Counter(dict(counts(x.ttfc_hist))),
            "duration": Counter(dict(counts(x.duration_hist))),
        }
        for x in (await session.execute(select(UsageRollup))).scalars()
    }
    assert stored == dict(fresh)


async def chat_with_sent_files(
    client: httpx.AsyncClient,
    session: AsyncSession,
    world: TeamWorld,
    fake: FakeN8n,
    files: list[tuple[str, bytes, str]],
    content: str = "See the files",
) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    """A chat of `world.member` whose first question carries `files` (name, bytes, type), uploaded and sent
    through the API to the fake n8n, which answers; returns the chat's id and the sent Files."""
    await session.execute(
        update(Agent).where(Agent.id == world.agent.id).values(webhook_url=fake.url + "/webhook/agent-stream")
    )
    await session.commit()
    chat = await create_chat(session, user=world.member, agent=world.agent)
    headers = world.h(world.member)
    ids = []
    for name, data, content_type in files:
        response = await client.post(
            f"/api/chats/{chat.id}/files", files={"file": (name, data, content_type)}, headers=headers
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    body = {"content": content, "file_ids": ids}
    sent = await client.post(f"/api/chats/{chat.id}/messages", json=body, headers=headers)
    assert sent.status_code == 200, sent.text
    read = (await client.get(f"/api/chats/{chat.id}", headers=headers)).json()
    assert [m["status"] for m in read["messages"]] == ["complete", "complete"]
    question: dict[str, Any] = read["messages"][0]
    assert [f["id"] for f in question["files"]] == ids
    return chat.id, question["files"]
