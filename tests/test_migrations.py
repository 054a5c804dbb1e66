"""Migrations upgrade and downgrade on PostgreSQL and SQLite; schema.sql stays generated from them."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from app.db import utcnow
from app.dialects import JSONType, UTCDateTime
from app.migrations import alembic_config
from app.models import Chat, Message, User
from app.services.health import migration_head
from app.services.users import email_taken
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import (
    ADMIN_URL,
    ROOT,
    _admin_execute,
    _plain_url,
    _with_database,
    assert_rollup_matches_ledger,
    fresh_postgres,
    make_settings,
    run_migrations,
    until_a_statement_waits,
)
from tests.factories import auth_headers
from tools.schema_sql import render_schema

NOW = datetime(2026, 12, 1, tzinfo=UTC)
EXPECTED_TABLES = {
    "teams",
    "users",
    "agents",
    "chats",
    "messages",
    "refresh_tokens",
    "revoked_tokens",
    "error_logs",
    "workers",
    "invites",
    "usage_records",
    "usage_daily",
    "idempotency_keys",
    "api_keys",
    "widget_sessions",
    "usage_rollups",
    "files",
    "file_blobs",
    "shares",
    "share_files",
    "alembic_version",
}
#: The tables of migrations after 0009 (widget sessions 0010, usage roll-up 0011, files 0012, shares 0013, share
#: files 0014), gone whenever a test goes below them.
LATER_TABLES = {"widget_sessions", "usage_rollups", "files", "file_blobs", "shares", "share_files"}


async def _pg_tables(url: str) -> set[str]:
    conn = await asyncpg.connect(_plain_url(url))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


async def _sqlite_tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))).scalars()
        names = set(rows)
    await engine.dispose()
    return names


async def _column(url: str, sql: str) -> list[Any]:
    """The one column `sql` selects, in its order."""
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        values = list((await conn.execute(text(sql))).scalars())
    await engine.dispose()
    return values


def test_upgrade_downgrade_upgrade_on_postgresql() -> None:
    with fresh_postgres() as url:
        run_migrations(url)
        assert asyncio.run(_pg_tables(url)) == EXPECTED_TABLES
        run_migrations(url, "base", downgrade=True)
        assert asyncio.run(_pg_tables(url)) == {"alembic_version"}
        run_migrations(url)
        assert asyncio.run(_pg_tables(url)) == EXPECTED_TABLES


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    run_migrations(url)
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES
    run_migrations(url, "base", downgrade=True)
    assert asyncio.run(_sqlite_tables(url)) == {"alembic_version"}
    run_migrations(url)
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES


def test_a_failed_migration_keeps_those_before_it_on_postgresql(tmp_path: Path) -> None:
    """Each migration commits by itself: one that fails leaves the database at the last one that succeeded, and
    `migrate` run again goes on from there (0021's index, built outside a transaction, is not built twice)."""
    migrations = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "2099_01_01_9999_fails.py").write_text(
        '"""fails"""\nfrom alembic import op\n\n'
        f"revision = '9999'\ndown_revision = '{migration_head()}'\nbranch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade() -> None:\n    op.execute('SELECT 1 / 0')\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )
    with fresh_postgres() as url:
        with pytest.raises(sa.exc.DBAPIError, match="division by zero"):
            command.upgrade(alembic_config(url, script_location=migrations), "head")
        assert asyncio.run(_column(url, "SELECT version_num FROM alembic_version")) == [migration_head()]
        assert asyncio.run(_pg_tables(url)) == EXPECTED_TABLES


#: What a migration may import from the application: the index helpers of app.migrations, which say how an index
#: is built on PostgreSQL (CONCURRENTLY, outside a transaction), not what a migration changes: a fix to them is
#: meant for every migration that builds an index.
MIGRATIONS_MAY_IMPORT = {"app.migrations": {"create_index_concurrently", "drop_index_concurrently"}}
#: The project's own top-level packages and modules (migrations/frozen holds what migrations need of them).
PROJECT_MODULES = {"app", "main", "tools", "tests", "bench"}


def _project_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of each import of a project module in a file (name "*" for `import module`)."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "*") for alias in node.names if alias.name.split(".")[0] in PROJECT_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT_MODULES:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_migrations_import_no_application_code() -> None:
    """A migration that imports app code (a slug, an email's stored form, the usage roll-up) does something else
    on a fresh database whenever that code changes: they use frozen copies (migrations/frozen), which import
    nothing of the project either."""
    versions = sorted((ROOT / "migrations" / "versions").glob("*.py"))
    frozen = sorted((ROOT / "migrations" / "frozen").glob("*.py"))
    assert len(versions) >= 21
    assert frozen
    wrong = [
        f"{path.relative_to(ROOT)}: {module}.{name}"
        for path in versions
        for module, name in _project_imports(path)
        if name not in MIGRATIONS_MAY_IMPORT.get(module, set())
    ]
    wrong += [
        f"{path.relative_to(ROOT)}: {module}.{name}" for path in frozen for module, name in _project_imports(path)
    ]
    assert wrong == []


def test_schema_sql_matches_migrations() -> None:
    assert (ROOT / "schema.sql").read_text() == render_schema(), "schema.sql is stale: run `make schema`"


def test_schema_check_fails_when_a_migration_changes(tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "2099_01_01_9999_extra.py").write_text(
        '"""extra"""\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f"revision = '9999'\ndown_revision = '{migration_head()}'\nbranch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade() -> None:\n    op.add_column('teams', sa.Column('extra', sa.Integer()))\n\n\n"
        "def downgrade() -> None:\n    op.drop_column('teams', 'extra')\n"
    )
    changed = render_schema(migrations)
    assert changed != (ROOT / "schema.sql").read_text()
    assert "ALTER TABLE teams ADD COLUMN extra INTEGER" in changed


def test_schema_check_command_exit_code() -> None:
    result = subprocess.run([sys.executable, "-m", "tools.schema_sql", "--check"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr


async def test_sqlite_smoke(tmp_path: Path) -> None:
    """The embedded default: migrate a SQLite file, be ready, store and read a team."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'smoke.db'}"
    await asyncio.to_thread(run_migrations, url)
    app = create_app(make_settings(url, tmp_path))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            assert (await c.get("/ready")).status_code == 200
        from tests.factories import create_team

        async with app_state(app).db.sessionmaker() as session:
            team = await create_team(session, name="Smoke")
            assert team.created_at.tzinfo is not None
            assert team.settings == {"open_registration": False}
    finally:
        await shutdown(app)


# --- 0006: agent slugs for the agents made before it, the usage ledger -------------------------------

SLUG_ROWS = [
    # (name, is_active, seconds after the first): oldest first within a team gets the bare slug
    ("Support Bot", True, 0),
    ("support bot", False, 1),
    ("Support-Bot!", True, 2),
    ("Café ☕", True, 3),
    ("☕", True, 4),
]


async def _seed_agents_at_0004(url: str) -> tuple[str, str]:
    """Two teams with agents whose names collide, inserted with plain SQL (the 0004 schema)."""
    engine = create_async_engine(url)
    team_a, team_b = str(uuid.uuid4()), str(uuid.uuid4())
    async with engine.begin() as conn:
        for team, slug in ((team_a, "a"), (team_b, "b")):
            await conn.execute(
                text(
                    "INSERT INTO teams (id, name, slug, settings, created_at, updated_at) "
                    "VALUES (:id, :name, :slug, '{}', :now, :now)"
                ),
                {"id": team if "sqlite" not in url else uuid.UUID(team).hex, "name": slug, "slug": slug, "now": NOW},
            )
        rows = [(team_a, *row) for row in SLUG_ROWS] + [(team_b, "Support Bot", True, 0)]
        for team, name, active, offset in rows:
            await conn.execute(
                text(
                    "INSERT INTO agents (id, team_id, name, webhook_url, config, avatar_version, is_active, "
                    "created_at, updated_at) VALUES (:id, :team, :name, 'http://n8n/webhook/x', '{}', 0, :active, "
                    ":at, :at)"
                ),
                {
                    "id": uuid.uuid4() if "sqlite" not in url else uuid.uuid4().hex,
                    "team": team if "sqlite" not in url else uuid.UUID(team).hex,
                    "name": name,
                    "active": active,
                    "at": NOW + timedelta(seconds=offset),
                },
            )
    await engine.dispose()
    return team_a, team_b


async def _slugs(url: str) -> list[tuple[str, str]]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT name, slug FROM agents ORDER BY created_at, name"))).all()
    await engine.dispose()
    return [(r[0], r[1]) for r in rows]


async def _columns(url: str, table: str) -> set[str]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        names = set((await conn.execute(text(f"SELECT * FROM {table} LIMIT 0"))).keys())
    await engine.dispose()
    return names


def _check_0006(url: str) -> None:
    run_migrations(url, "0004")
    asyncio.run(_seed_agents_at_0004(url))
    run_migrations(url, "0006")
    assert sorted(asyncio.run(_slugs(url))) == sorted(
        [
            ("Support Bot", "support-bot"),
            ("Support Bot", "support-bot"),  # the other team's: slugs are unique per team only
            ("support bot", "support-bot-2"),  # inactive agents get (and keep) theirs too
            ("Support-Bot!", "support-bot-3"),
            ("Café ☕", "cafe"),
            ("☕", "agent"),
        ]
    )
    assert "usage_records" in (
        asyncio.run(_pg_tables(url)) if "postgresql" in url else asyncio.run(_sqlite_tables(url))
    )
    run_migrations(url, "0004", downgrade=True)
    assert "slug" not in asyncio.run(_columns(url, "agents"))
    assert len(asyncio.run(_column(url, "SELECT name FROM agents"))) == 6  # the agents themselves stay
    run_migrations(url)


def test_0006_gives_existing_agents_slugs_on_postgresql() -> None:
    with fresh_postgres() as url:
        _check_0006(url)


def test_0006_gives_existing_agents_slugs_on_sqlite(tmp_path: Path) -> None:
    _check_0006(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")


def test_idempotency_keys_migration_down_and_up_on_sqlite(tmp_path: Path) -> None:
    """0007 alone: down removes only its table (the rest of the schema stays), up brings it back."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"
    run_migrations(url)
    run_migrations(url, "0006", downgrade=True)
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES - {"idempotency_keys", "api_keys"} - LATER_TABLES
    run_migrations(url, "0007")
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES - {"api_keys"} - LATER_TABLES


async def _insert_api_key(url: str) -> None:
    """A key row with its user and team, so the downgrade must drop a table that holds data."""
    engine = create_async_engine(url)
    team_id, user_id = uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            sa.table(
                "teams",
                sa.column("id", sa.Uuid()),
                sa.column("name"),
                sa.column("slug"),
                sa.column("settings", JSONType),
                sa.column("created_at", UTCDateTime()),
                sa.column("updated_at", UTCDateTime()),
            ).insert(),
            {"id": team_id, "name": "T", "slug": "t", "settings": {}, "created_at": NOW, "updated_at": NOW},
        )
        await conn.execute(
            sa.table(
                "users",
                sa.column("id", sa.Uuid()),
                sa.column("team_id", sa.Uuid()),
                sa.column("email"),
                sa.column("password_hash"),
                sa.column("role"),
                sa.column("is_active", sa.Boolean()),
                sa.column("preferences", JSONType),
                sa.column("created_at", UTCDateTime()),
                sa.column("updated_at", UTCDateTime()),
            ).insert(),
            {
                "id": user_id,
                "team_id": team_id,
                "email": "a@example.com",
                "password_hash": "x",
                "role": "user",
                "is_active": True,
                "preferences": {},
                "created_at": NOW,
                "updated_at": NOW,
            },
        )
        await conn.execute(
            sa.table(
                "api_keys",
                sa.column("id", sa.Uuid()),
                sa.column("user_id", sa.Uuid()),
                sa.column("team_id", sa.Uuid()),
                sa.column("name"),
                sa.column("prefix"),
                sa.column("key_hash"),
                sa.column("created_at", UTCDateTime()),
            ).insert(),
            {
                "id": uuid.uuid4(),
                "user_id": user_id,
                "team_id": team_id,
                "name": "k",
                "prefix": "n8nr_abcdefgh",
                "key_hash": "0" * 64,
                "created_at": NOW,
            },
        )
    await engine.dispose()


def test_api_keys_migration_down_and_up_on_sqlite(tmp_path: Path) -> None:
    """0008 alone, with a key stored: down drops only its table, up brings it back empty."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    run_migrations(url)
    asyncio.run(_insert_api_key(url))
    run_migrations(url, "0007", downgrade=True)
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES - {"api_keys"} - LATER_TABLES
    run_migrations(url, "0008")
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES - LATER_TABLES


# --- 0005: the JSON array of each chat becomes one branch of rows ---------------------------------------

OLD_CHATS = sa.table(
    "chats",
    sa.column("id", sa.Uuid()),
    sa.column("team_id", sa.Uuid()),
    sa.column("user_id", sa.Uuid()),
    sa.column("agent_id", sa.Uuid()),
    sa.column("title", sa.String()),
    sa.column("archived", sa.Boolean()),
    sa.column("pinned", sa.Boolean()),
    sa.column("messages", JSONType),
    sa.column("message_count", sa.Integer()),
    sa.column("created_at", UTCDateTime()),
    sa.column("updated_at", UTCDateTime()),
)


async def _seed_before_the_tree(url: str, chat_id: uuid.UUID, elements: list[dict[str, Any]]) -> None:
    """A team, a user, an agent and a chat as revision 0004 stored them (the JSON array)."""
    engine = create_async_engine(url)
    now = utcnow()
    team, user, agent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO teams (id, name, slug, settings, created_at, updated_at)"
                    " VALUES (:id, 'T', :slug, '{}', :now, :now)"
                ).bindparams(sa.bindparam("id", type_=sa.Uuid()), sa.bindparam("now", type_=UTCDateTime())),
                {"id": team, "slug": f"t-{team.hex[:8]}", "now": now},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO users (id, team_id, email, password_hash, role, is_active, preferences, created_at,"
                    " updated_at) VALUES (:id, :team, 'old@example.com', 'x', 'user', true, '{}', :now, :now)"
                ).bindparams(
                    sa.bindparam("id", type_=sa.Uuid()),
                    sa.bindparam("team", type_=sa.Uuid()),
                    sa.bindparam("now", type_=UTCDateTime()),
                ),
                {"id": user, "team": team, "now": now},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO agents (id, team_id, name, webhook_url, config, avatar_version, is_active, created_at,"
                    " updated_at) VALUES (:id, :team, 'A', 'http://127.0.0.1:1/x', '{}', 0, true, :now, :now)"
                ).bindparams(
                    sa.bindparam("id", type_=sa.Uuid()),
                    sa.bindparam("team", type_=sa.Uuid()),
                    sa.bindparam("now", type_=UTCDateTime()),
                ),
                {"id": agent, "team": team, "now": now},
            )
            await conn.execute(
                OLD_CHATS.insert().values(
                    id=chat_id,
                    team_id=team,
                    user_id=user,
                    agent_id=agent,
                    title="old",
                    archived=False,
                    pinned=False,
                    messages=elements,
                    message_count=len(elements),
                    created_at=now,
                    updated_at=now,
                )
            )
    finally:
        await engine.dispose()


async def _rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(sa.text(sql), params)).all())
    finally:
        await engine.dispose()


async def _add_sibling_and_switch(url: str, chat_id: uuid.UUID, parent: str) -> uuid.UUID:
    """An edit made after the migration: a second branch, shown."""
    sibling = uuid.uuid4()
    engine = create_async_engine(url)
    now = utcnow()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(Message).values(
                    id=sibling,
                    chat_id=chat_id,
                    parent_id=uuid.UUID(parent),
                    role="user",
                    content="edited",
                    status="complete",
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(sa.update(Chat).where(Chat.id == chat_id).values(current_message_id=sibling))
    finally:
        await engine.dispose()
    return sibling


def _old_elements() -> list[dict[str, Any]]:
    worker = str(uuid.uuid4())
    return [
        {
            "id": str(uuid.uuid4()),
            "role": "user",
            "content": "first",
            "status": "complete",
            "created_at": "2026-12-01T10:00:00Z",
        },
        {
            "id": str(uuid.uuid4()),
            "role": "assistant",
            "content": "answer",
            "status": "complete",
            "created_at": "2026-12-01T10:00:01.500000Z",
            "metadata": {"chunks": 2},
        },
        {
            "id": str(uuid.uuid4()),
            "role": "user",
            "content": "second",
            "status": "complete",
            "created_at": "2026-12-01T10:01:00+00:00",
        },
        {
            "id": str(uuid.uuid4()),
            "role": "assistant",
            "content": "half",
            "status": "interrupted",
            "created_at": "2026-12-01T10:01:01Z",
            "error": {"message": "stopped", "code": "interrupted"},
            "_worker": worker,
        },
    ]


async def _check_migration_of_a_chat(url: str, tmp_path: Path) -> None:
    chat_id = uuid.uuid4()
    elements = _old_elements()
    await asyncio.to_thread(run_migrations, url, "0004")
    await _seed_before_the_tree(url, chat_id, elements)
    await asyncio.to_thread(run_migrations, url)

    # Read through the API: the same messages, in order, one branch.
    app = create_app(make_settings(url, tmp_path))
    try:
        async with app_state(app).db.sessionmaker() as session:
            user = (await session.execute(sa.select(User))).scalar_one()
            headers = auth_headers(app_state(app).settings, user)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            body = (await c.get(f"/api/chats/{chat_id}", headers=headers)).json()
            listed = await c.get(f"/api/chats/{chat_id}/messages", headers=headers)
            found = await c.get("/api/chats", params={"q": "half"}, headers=headers)
    finally:
        await shutdown(app)
    messages = body["messages"]
    assert [m["id"] for m in messages] == [e["id"] for e in elements]
    assert [m["content"] for m in messages] == ["first", "answer", "second", "half"]
    assert [m["parent_id"] for m in messages] == [None] + [e["id"] for e in elements[:-1]]
    assert [m["sibling_ids"] for m in messages] == [[e["id"]] for e in elements]
    assert [m["created_at"] for m in messages] == [
        "2026-12-01T10:00:00Z",
        "2026-12-01T10:00:01.500000Z",
        "2026-12-01T10:01:00Z",
        "2026-12-01T10:01:01Z",
    ]
    assert messages[1]["metadata"] == {"chunks": 2}
    assert (messages[3]["status"], messages[3]["error"]) == (
        "interrupted",
        {"message": "stopped", "code": "interrupted"},
    )
    assert body["current_message_id"] == elements[-1]["id"]
    assert body["message_count"] == 4
    assert [m["id"] for m in listed.json()] == [e["id"] for e in elements]
    assert [c["id"] for c in found.json()] == [str(chat_id)]
    workers = await _rows(url, "SELECT worker_id FROM messages WHERE worker_id IS NOT NULL")
    assert [uuid.UUID(str(w[0])) for w in workers] == [uuid.UUID(elements[-1]["_worker"])]

    # Down again: the current branch (here after an edit) becomes the array.
    await _add_sibling_and_switch(url, chat_id, elements[1]["id"])
    await asyncio.to_thread(run_migrations, url, "0004", downgrade=True)
    stored = await _rows(url, "SELECT messages, message_count FROM chats")
    array = stored[0][0] if isinstance(stored[0][0], list) else json.loads(stored[0][0])
    assert [e["content"] for e in array] == ["first", "answer", "edited"]
    assert array[0] == elements[0]
    assert array[1] == elements[1] | {"created_at": "2026-12-01T10:00:01.500000Z"}
    assert stored[0][1] == 3


async def test_migration_0005_moves_a_chat_to_rows_and_back_on_postgresql(tmp_path: Path) -> None:
    name = f"test_mig_{uuid.uuid4().hex[:8]}"
    await _admin_execute(f'CREATE DATABASE "{name}"')
    url = _with_database(ADMIN_URL, name).replace("postgresql://", "postgresql+asyncpg://")
    try:
        await _check_migration_of_a_chat(url, tmp_path)
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_migration_0005_moves_a_chat_to_rows_and_back_on_sqlite(tmp_path: Path) -> None:
    await _check_migration_of_a_chat(f"sqlite+aiosqlite:///{tmp_path / 'tree.db'}", tmp_path)


# --- 0009: agents gain response_mode ------------------------------------------------------------------


def _check_0009(url: str) -> None:
    run_migrations(url, "0004")
    asyncio.run(_seed_agents_at_0004(url))
    run_migrations(url, "0009")
    assert (
        asyncio.run(_column(url, "SELECT response_mode FROM agents")) == ["stream"] * 6
    )  # existing agents keep answering by stream
    run_migrations(url, "0008", downgrade=True)
    assert "response_mode" not in asyncio.run(_columns(url, "agents"))
    assert len(asyncio.run(_column(url, "SELECT name FROM agents"))) == 6  # the agents themselves stay
    run_migrations(url)
    assert asyncio.run(_column(url, "SELECT response_mode FROM agents")) == ["stream"] * 6


def test_0009_response_mode_down_and_up_on_postgresql() -> None:
    with fresh_postgres() as url:
        _check_0009(url)


def test_0009_response_mode_down_and_up_on_sqlite(tmp_path: Path) -> None:
    _check_0009(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")


# --- 0010: widget sessions --------------------------------------------------------------------------------


def test_widget_sessions_migration_down_and_up_on_sqlite(tmp_path: Path) -> None:
    """0010: going down to 0009 drops the widget sessions (the chats stay); up to 0010 brings them back."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"
    run_migrations(url)
    run_migrations(url, "0009", downgrade=True)
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES - LATER_TABLES
    run_migrations(url, "0010")
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES - (LATER_TABLES - {"widget_sessions"})


# --- 0011: the usage roll-up, back-filled from the ledger ------------------------------------------------


async def _seed_ledger_at_0009(url: str) -> int:
    """Two teams with users and agents, and more ledger rows than the back-fill reads per query (some of
    them with their user or agent already deleted, with and without tokens, across midnight UTC)."""
    engine = create_async_engine(url)
    rng = random.Random(11)
    rows: list[dict[str, Any]] = []
    try:
        async with engine.begin() as conn:
            for t in range(2):
                team = uuid.uuid4()
                await conn.execute(teams.insert(), [{"id": team, "name": f"t{t}", "slug": f"t{t}", "settings": {},
                                                     "created_at": NOW, "updated_at": NOW}])  # fmt: skip
                users = [uuid.uuid4() for _ in range(3)]
                await conn.execute(users_table.insert(), [
                    {"id": u, "team_id": team, "email": f"u{i}@t{t}.example.com", "password_hash": "x",
                     "role": "admin", "is_active": True, "preferences": {}, "created_at": NOW, "updated_at": NOW}
                    for i, u in enumerate(users)
                ])  # fmt: skip
                agents = [uuid.uuid4() for _ in range(2)]
                await conn.execute(agents_table.insert(), [
                    {"id": a, "team_id": team, "name": f"A{i}", "slug": f"a{i}", "webhook_url": "http://n8n/x",
                     "config": {}, "avatar_version": 0, "is_active": True, "created_at": NOW, "updated_at": NOW}
                    for i, a in enumerate(agents)
                ])  # fmt: skip
                for i in range(3_100):
                    tokens = rng.random() < 0.3
                    rows.append({
                        "id": uuid.uuid4(), "team_id": team, "user_id": rng.choice([*users, None]),
                        "agent_id": rng.choice([*agents, None]), "chat_id": None,
                        "outcome": rng.choice(["complete", "error", "cancelled", "interrupted"]), "error_code": None,
                        "chars_in": rng.randint(0, 99), "chars_out": rng.randint(0, 999),
                        "tokens_in": rng.randint(1, 99) if tokens else None,
                        "tokens_out": rng.randint(1, 99) if tokens else None,
                        "ttfc_ms": rng.choice([None, rng.randint(0, 4000)]), "duration_ms": rng.randint(0, 90_000),
                        "created_at": NOW - timedelta(minutes=7 * i + rng.randint(0, 6)),
                    })  # fmt: skip
                # Answers closed long after they began (recovered days later; the ledger's longest duration):
                # dated by their start, they add to days whose own final writes were read days before (the
                # last, to the day of an answer written at the moment it began, 24.9 days before).
                longest = timedelta(milliseconds=2**31 - 1)
                for duration_ms, ended in ((3 * 86_400_000, NOW), (14 * 86_400_000, NOW), (2**31 - 1, NOW),
                                           (0, NOW - longest)):  # fmt: skip
                    rows.append({
                        "id": uuid.uuid4(), "team_id": team, "user_id": users[0], "agent_id": agents[0],
                        "chat_id": None, "outcome": "interrupted", "error_code": None, "chars_in": 1,
                        "chars_out": 0, "tokens_in": None, "tokens_out": None, "ttfc_ms": None,
                        "duration_ms": duration_ms, "created_at": ended - timedelta(hours=5),
                    })  # fmt: skip
            await conn.execute(ledger_table.insert(), rows)
    finally:
        await engine.dispose()
    return len(rows)


def _table(name: str, *columns: str) -> sa.TableClause:
    """A lightweight table for inserts at an old revision; column types follow the names."""

    def typed(column: str) -> sa.ColumnClause[Any]:
        if column == "id" or column.endswith("_id"):
            return sa.column(column, sa.Uuid())
        if column.endswith("_at"):
            return sa.column(column, UTCDateTime())
        return sa.column(column, JSONType) if column in ("settings", "preferences", "config") else sa.column(column)

    return sa.table(name, *(typed(c) for c in columns))


teams = _table("teams", "id", "name", "slug", "settings", "created_at", "updated_at")
users_table = _table("users", "id", "team_id", "email", "password_hash", "role", "is_active", "preferences",
                     "created_at", "updated_at")  # fmt: skip
agents_table = _table("agents", "id", "team_id", "name", "slug", "webhook_url", "config", "avatar_version",
                      "is_active", "created_at", "updated_at")  # fmt: skip
ledger_table = _table("usage_records", "id", "team_id", "user_id", "agent_id", "chat_id", "outcome",
                      "error_code", "chars_in", "chars_out", "tokens_in", "tokens_out", "ttfc_ms", "duration_ms",
                      "created_at")  # fmt: skip


async def _rollup_state(url: str) -> tuple[int, int]:
    """(ledger rows, roll-up rows), after checking that the roll-up equals the ledger summed."""
    engine = create_async_engine(url)
    try:
        async with AsyncSession(engine) as session:
            await assert_rollup_matches_ledger(session)
            ledger_rows = (await session.execute(text("SELECT count(*) FROM usage_records"))).scalar_one()
            rollup_rows = (await session.execute(text("SELECT count(*) FROM usage_rollups"))).scalar_one()
    finally:
        await engine.dispose()
    return int(ledger_rows), int(rollup_rows)


async def _ledger_index(url: str) -> str:
    conn = await asyncpg.connect(_plain_url(url))
    try:
        return str(await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_usage_records_team_id_created_at'"
        ))  # fmt: skip
    finally:
        await conn.close()


def _check_0011(url: str) -> None:
    tables = _pg_tables if "postgresql" in url else _sqlite_tables
    run_migrations(url, "0009")
    seeded = asyncio.run(_seed_ledger_at_0009(url))
    run_migrations(url, "0011")
    ledger_rows, rollup_rows = asyncio.run(_rollup_state(url))
    assert ledger_rows == seeded
    assert rollup_rows > 2 * 4  # several days, agents and users per team
    if "postgresql" in url:
        assert "INCLUDE" not in asyncio.run(_ledger_index(url))
    run_migrations(url, "0009", downgrade=True)
    assert asyncio.run(tables(url)) == EXPECTED_TABLES - LATER_TABLES
    if "postgresql" in url:
        assert "INCLUDE (user_id, agent_id, outcome" in asyncio.run(_ledger_index(url))
    run_migrations(url)
    assert asyncio.run(_rollup_state(url)) == (seeded, rollup_rows)


@pytest.mark.timeout(120)
def test_0011_usage_rollup_back_filled_down_and_up_on_postgresql() -> None:
    with fresh_postgres() as url:
        _check_0011(url)


@pytest.mark.timeout(120)
def test_0011_usage_rollup_back_filled_down_and_up_on_sqlite(tmp_path: Path) -> None:
    _check_0011(f"sqlite+aiosqlite:///{tmp_path / 'u.db'}")


# --- 0020: the usage roll-up dated by each generation's start -------------------------------------------


async def _team_days(url: str) -> dict[str, int]:
    """The roll-up's team-day rows: {'team day': generations}."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            t = sa.table("usage_rollups", *(sa.column(c, sa.Uuid()) for c in ("team_id", "agent_id", "user_id")),
                         sa.column("day", sa.Date()), sa.column("generations"))  # fmt: skip
            nil = uuid.UUID(int=0)
            query = sa.select(t.c.team_id, t.c.day, t.c.generations).where(t.c.agent_id == nil, t.c.user_id == nil)
            return {f"{r.team_id} {r.day}": int(r.generations) for r in await conn.execute(query)}
    finally:
        await engine.dispose()


async def _ledger_days(url: str, *, by_end: bool) -> dict[str, int]:
    """The ledger's generations per team and UTC day, dated by the final write or by the start."""
    engine = create_async_engine(url)
    found: dict[str, int] = {}
    try:
        async with engine.connect() as conn:
            for r in await conn.execute(sa.select(ledger_table.c.team_id, ledger_table.c.created_at,
                                                  sa.column("duration_ms")).select_from(ledger_table)):  # fmt: skip
                moment = r.created_at if by_end else r.created_at - timedelta(milliseconds=r.duration_ms)
                key = f"{r.team_id} {moment.astimezone(UTC).date()}"
                found[key] = found.get(key, 0) + 1
    finally:
        await engine.dispose()
    return found


def _check_0020(url: str) -> None:
    run_migrations(url, "0009")
    seeded = asyncio.run(_seed_ledger_at_0009(url))  # answers across midnight UTC among them
    run_migrations(url)
    by_start = asyncio.run(_ledger_days(url, by_end=False))
    by_end = asyncio.run(_ledger_days(url, by_end=True))
    assert by_start != by_end
    assert asyncio.run(_team_days(url)) == by_start
    ledger_rows, rollup_rows = asyncio.run(_rollup_state(url))
    assert ledger_rows == seeded
    run_migrations(url, "0019", downgrade=True)  # as the code before 0020 kept it: dated by the final write
    assert asyncio.run(_team_days(url)) == by_end
    run_migrations(url)
    assert asyncio.run(_rollup_state(url)) == (seeded, rollup_rows)
    assert asyncio.run(_team_days(url)) == by_start


@pytest.mark.timeout(120)
def test_0020_usage_rollup_dated_by_start_down_and_up_on_postgresql() -> None:
    with fresh_postgres() as url:
        _check_0020(url)


@pytest.mark.timeout(120)
def test_0020_usage_rollup_dated_by_start_down_and_up_on_sqlite(tmp_path: Path) -> None:
    _check_0020(f"sqlite+aiosqlite:///{tmp_path / 'u.db'}")


# --- 0012: files, file_blobs, messages.files, agents.file_delivery ----------------------------------------


def _check_0012(url: str, tables: Callable[[str], Coroutine[Any, Any, set[str]]]) -> None:
    run_migrations(url, "0004")
    asyncio.run(_seed_agents_at_0004(url))
    run_migrations(url, "0012")
    assert (
        asyncio.run(_column(url, "SELECT file_delivery FROM agents")) == ["url"] * 6
    )  # existing agents get the default delivery
    assert "files" in asyncio.run(_columns(url, "messages"))
    run_migrations(url, "0009", downgrade=True)
    assert asyncio.run(tables(url)) == EXPECTED_TABLES - LATER_TABLES
    assert "file_delivery" not in asyncio.run(_columns(url, "agents"))
    assert "files" not in asyncio.run(_columns(url, "messages"))
    assert len(asyncio.run(_column(url, "SELECT name FROM agents"))) == 6  # the agents themselves stay
    run_migrations(url)
    assert asyncio.run(tables(url)) == EXPECTED_TABLES
    assert asyncio.run(_column(url, "SELECT file_delivery FROM agents")) == ["url"] * 6


def test_0012_files_down_and_up_on_postgresql() -> None:
    with fresh_postgres() as url:
        _check_0012(url, _pg_tables)


def test_0012_files_down_and_up_on_sqlite(tmp_path: Path) -> None:
    _check_0012(f"sqlite+aiosqlite:///{tmp_path / 'f.db'}", _sqlite_tables)


# --- 0013: shares ---------------------------------------------------------------------------------------------


def test_shares_migration_down_and_up_on_sqlite(tmp_path: Path) -> None:
    """0013: down to 0012 drops only the shares table, up brings it back."""
    url = f"sqlite+aiosqlite:///{tmp_path / 's.db'}"
    run_migrations(url)
    run_migrations(url, "0012", downgrade=True)
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES - {"shares", "share_files"}
    run_migrations(url, "0013")
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES - {"share_files"}
    run_migrations(url, "0014")
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES


# --- 0014: share files ----------------------------------------------------------------------------------------


async def _seed_share_copy(url: str) -> None:
    """A team, a share and one share copy over a blob (what 0014 adds), by plain SQL."""
    conn = await asyncpg.connect(_plain_url(url))
    try:
        team, share = uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO teams (id, name, slug, settings, created_at, updated_at) VALUES ($1, 't', $2, '{}', $3, $3)",
            team,
            f"t-{team.hex[:8]}",
            NOW,
        )
        await conn.execute(
            "INSERT INTO shares (id, team_id, messages, message_count, created_at, updated_at)"
            " VALUES ($1, $2, '[]', 0, $3, $3)",
            share,
            team,
            NOW,
        )
        await conn.execute(
            "INSERT INTO file_blobs (sha256, size, data, created_at) VALUES ($1, 2, 'hi', $2)", "a" * 64, NOW
        )
        await conn.execute(
            "INSERT INTO share_files (id, share_id, filename, content_type, size, sha256, created_at)"
            " VALUES ($1, $2, 'a.txt', 'text/plain', 2, $3, $4)",
            uuid.uuid4(),
            share,
            "a" * 64,
            NOW,
        )
    finally:
        await conn.close()


async def _pg_count(url: str, table: str) -> int:
    conn = await asyncpg.connect(_plain_url(url))
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{table}"'))
    finally:
        await conn.close()


def test_0014_share_files_down_and_up_on_postgresql() -> None:
    """0014 down drops only the share copies (the shares and the blobs stay); up brings the table back empty."""
    with fresh_postgres() as url:
        run_migrations(url)
        asyncio.run(_seed_share_copy(url))
        run_migrations(url, "0013", downgrade=True)
        assert asyncio.run(_pg_tables(url)) == EXPECTED_TABLES - {"share_files"}
        assert asyncio.run(_pg_count(url, "shares")) == 1
        assert asyncio.run(_pg_count(url, "file_blobs")) == 1
        run_migrations(url, "0014")
        assert asyncio.run(_pg_tables(url)) == EXPECTED_TABLES
        assert asyncio.run(_pg_count(url, "share_files")) == 0


# --- 0018: stored emails folded ---------------------------------------------------------------------------

#: `example.com` in full-width letters, which IDNA folds to `example.com`.
FULL_WIDTH_EXAMPLE = "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com"
invites_table = _table("invites", "id", "team_id", "token_hash", "email", "role", "expires_at", "max_uses", "uses",
                       "created_at")  # fmt: skip
#: Spread over several of the migration's batches (1,000 rows), a few of them stored unfolded.
BULK_USERS = 2_400


def _bulk_email(i: int) -> str:
    return f"u{i}@\uff42\uff55\uff4c\uff4b.example.com" if i % 200 == 7 else f"u{i}@bulk.example.com"


async def _seed_emails_at_0017(url: str) -> dict[str, uuid.UUID]:
    """Users and invites stored as before the folding, by plain SQL: their ids by name."""
    ids = {name: uuid.uuid4() for name in ("one", "two", "alone", "idn", "pair_ascii", "pair_unicode", "twin_a",
                                           "twin_b", "upper", "invalid", "plain", "other", "inv_ascii", "inv_wide",
                                           "inv_none")}  # fmt: skip
    emails = {
        "alone": f"a@{FULL_WIDTH_EXAMPLE}",
        "idn": "b@xn--bcher-kva.de",
        "pair_ascii": "c@xn--bcher-kva.de",  # its folded form is taken by pair_unicode: left
        "pair_unicode": "c@b\u00fccher.de",
        "twin_a": "d@\uff42\u00fccher.de",  # both fold to d@bücher.de, held by neither: one of them takes it
        "twin_b": "d@xn--bcher-kva.de",
        "upper": "E@Example.COM",
        "invalid": "not-an-address",
        "plain": "f@example.com",
        "other": "c@xn--bcher-kva.de",  # another team: pair_unicode's form is no collision there
    }
    user = {"password_hash": "x", "role": "user", "is_active": True, "preferences": {}, "created_at": NOW,
            "updated_at": NOW}  # fmt: skip
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(teams.insert(), [
                {"id": ids[t], "name": t, "slug": t, "settings": {}, "created_at": NOW, "updated_at": NOW}
                for t in ("one", "two")
            ])  # fmt: skip
            await conn.execute(users_table.insert(), [
                {**user, "id": ids[name], "team_id": ids["two" if name == "other" else "one"], "email": email}
                for name, email in emails.items()
            ])  # fmt: skip
            await conn.execute(users_table.insert(), [
                {**user, "id": uuid.uuid4(), "team_id": ids["two"], "email": _bulk_email(i)} for i in range(BULK_USERS)
            ])  # fmt: skip
            await conn.execute(invites_table.insert(), [
                {"id": ids[name], "team_id": ids["one"], "token_hash": name.ljust(64, "0"), "email": email,
                 "role": "user", "expires_at": NOW, "max_uses": 1, "uses": 0, "created_at": NOW}
                for name, email in (("inv_ascii", "c@xn--bcher-kva.de"), ("inv_wide", f"x@{FULL_WIDTH_EXAMPLE}"),
                                    ("inv_none", None))
            ])  # fmt: skip
    finally:
        await engine.dispose()
    return ids


async def _taken(url: str, team_id: uuid.UUID, *emails: str) -> list[bool]:
    """The "email taken" check of registration, user creation and invites, for each email."""
    engine = create_async_engine(url)
    try:
        async with AsyncSession(engine) as session:
            return [await email_taken(session, team_id, email) for email in emails]
    finally:
        await engine.dispose()


def _check_0018(url: str, caplog: pytest.LogCaptureFixture) -> None:
    run_migrations(url, "0017")
    ids = asyncio.run(_seed_emails_at_0017(url))
    # The hole: a row stored unfolded does not make its folded form taken, so a second account could be made.
    assert asyncio.run(_taken(url, ids["one"], "a@example.com", "b@b\u00fccher.de")) == [False, True]
    caplog.set_level(logging.INFO, logger="alembic.runtime.migration")
    run_migrations(url, "0018")
    by_id = {row[0]: row[1] for row in asyncio.run(_rows(url, "SELECT id, email FROM users"))}
    by_id = {uuid.UUID(str(key)): email for key, email in by_id.items()}
    assert by_id[ids["alone"]] == "a@example.com"
    assert by_id[ids["idn"]] == "b@b\u00fccher.de"
    assert by_id[ids["pair_ascii"]] == "c@xn--bcher-kva.de"
    assert by_id[ids["pair_unicode"]] == "c@b\u00fccher.de"
    twins = {by_id[ids["twin_a"]], by_id[ids["twin_b"]]}
    assert "d@b\u00fccher.de" in twins
    assert twins & {"d@\uff42\u00fccher.de", "d@xn--bcher-kva.de"}
    twin_left = ids["twin_a"] if by_id[ids["twin_a"]] != "d@b\u00fccher.de" else ids["twin_b"]
    assert (by_id[ids["upper"]], by_id[ids["invalid"]], by_id[ids["plain"]]) == (
        "e@example.com",
        "not-an-address",
        "f@example.com",
    )
    assert by_id[ids["other"]] == "c@b\u00fccher.de"
    bulk = sorted(email for email in by_id.values() if email.endswith("example.com") and email.startswith("u"))
    assert bulk == sorted(f"u{i}@bulk.example.com" for i in range(BULK_USERS))
    invites = {uuid.UUID(str(row[0])): row[1] for row in asyncio.run(_rows(url, "SELECT id, email FROM invites"))}
    assert invites == {ids["inv_ascii"]: "c@b\u00fccher.de", ids["inv_wide"]: "x@example.com", ids["inv_none"]: None}

    # Each row left is logged by its id and the holder's, never by address.
    messages = [r.getMessage() for r in caplog.records if r.name == "alembic.runtime.migration"]
    left = [m for m in messages if m.startswith("users row")]
    twin_holder = ids["twin_b"] if twin_left == ids["twin_a"] else ids["twin_a"]
    assert sorted(left) == sorted(
        f"users row {row} keeps its email as stored: user {holder} of the same team holds its folded form "
        "(merge them, see docs/OPERATIONS.md)"
        for row, holder in ((ids["pair_ascii"], ids["pair_unicode"]), (twin_left, twin_holder))
    )
    assert "Emails folded: 17 of users, 2 of invites; users left as stored (logged above by id): 2" in messages
    assert not [m for m in messages if "@" in m]
    # Closed: after the migration every spelling of a mailbox of the team is taken.
    spellings = ["a@example.com", f"A@{FULL_WIDTH_EXAMPLE}", "c@b\u00fccher.de", "c@xn--bcher-kva.de",
                 "d@b\u00fccher.de", "d@xn--bcher-kva.de", "e@example.com"]  # fmt: skip
    assert asyncio.run(_taken(url, ids["one"], *spellings)) == [True] * len(spellings)

    # Idempotent: down (which changes nothing) and up again leaves every row as it was, the same two logged.
    caplog.clear()
    run_migrations(url, "0017", downgrade=True)
    assert {uuid.UUID(str(k)): v for k, v in asyncio.run(_rows(url, "SELECT id, email FROM users"))} == by_id
    run_migrations(url)
    assert {uuid.UUID(str(k)): v for k, v in asyncio.run(_rows(url, "SELECT id, email FROM users"))} == by_id
    messages = [r.getMessage() for r in caplog.records if r.name == "alembic.runtime.migration"]
    assert sorted(m for m in messages if m.startswith("users row")) == sorted(left)
    assert "Emails folded: 0 of users, 0 of invites; users left as stored (logged above by id): 2" in messages


@pytest.mark.timeout(120)
def test_0018_folds_stored_emails_on_postgresql(caplog: pytest.LogCaptureFixture) -> None:
    with fresh_postgres() as url:
        _check_0018(url, caplog)


@pytest.mark.timeout(120)
def test_0018_folds_stored_emails_on_sqlite(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _check_0018(f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", caplog)


# --- 0016, 0017, 0019, 0021: indexes on tables that may be large, built CONCURRENTLY on PostgreSQL --------

#: (revision, index, table, column, its definition after the table)
LATE_INDEXES = [
    ("0016", "ix_error_logs_created_at", "error_logs", "created_at", "(created_at)"),
    ("0017", "ix_refresh_tokens_expires_at", "refresh_tokens", "expires_at", "(expires_at)"),
    ("0019", "ix_files_unsent_created_at", "files", "created_at", "(created_at) WHERE (message_id IS NULL)"),
    ("0021", "ix_refresh_tokens_successor_used_at", "refresh_tokens", "used_at",
     "(used_at) WHERE (successor_encrypted IS NOT NULL)"),
]  # fmt: skip


async def _indexes(url: str) -> dict[str, tuple[bool, str]]:
    """The late indexes present: whether each is valid (usable and kept up), and its definition."""
    conn = await asyncpg.connect(_plain_url(url))
    try:
        rows = await conn.fetch(
            "SELECT c.relname, i.indisvalid AND i.indisready AS valid, pg_get_indexdef(i.indexrelid) AS definition"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY($1::text[])",
            [name for _, name, _, _, _ in LATE_INDEXES],
        )
    finally:
        await conn.close()
    return {r["relname"]: (r["valid"], r["definition"]) for r in rows}


def _built(name: str, table: str, definition: str) -> tuple[bool, str]:
    return True, f"CREATE INDEX {name} ON public.{table} USING btree {definition}"


async def _fail_a_concurrent_build(url: str, name: str, table: str, column: str) -> None:
    """What a concurrent build cancelled midway leaves (a timeout, a Ctrl-C, a lost connection): an INVALID
    index of that name. It is cancelled while it waits for a write in flight on the table."""
    writing = await asyncpg.connect(_plain_url(url))
    building = await asyncpg.connect(_plain_url(url))
    try:
        async with writing.transaction():
            await writing.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")  # as an INSERT in flight holds
            await building.execute("SET statement_timeout = '300ms'")
            with pytest.raises(asyncpg.QueryCanceledError):
                await building.execute(f"CREATE INDEX CONCURRENTLY {name} ON {table} ({column})")
    finally:
        await building.close()
        await writing.close()


def test_late_indexes_built_valid_and_dropped_on_postgresql() -> None:
    """Upgraded past them the indexes are whole; downgraded below 0016 they are gone, and they come back."""
    expected = {name: _built(name, table, definition) for _, name, table, _, definition in LATE_INDEXES}
    with fresh_postgres() as url:
        run_migrations(url)
        assert asyncio.run(_indexes(url)) == expected
        run_migrations(url, "0015", downgrade=True)
        assert asyncio.run(_indexes(url)) == {}
        run_migrations(url)
        assert asyncio.run(_indexes(url)) == expected
        run_migrations(url)  # at the head already: nothing to do
        assert asyncio.run(_indexes(url)) == expected


@pytest.mark.timeout(120)
def test_a_failed_concurrent_build_is_built_again_by_the_next_run() -> None:
    """`migrate` run again after a concurrent build failed replaces the INVALID index it left (IF NOT EXISTS
    alone would keep it: never used, yet slowing every write), for each of the four migrations."""
    with fresh_postgres() as url:
        for revision, name, table, column, definition in LATE_INDEXES:
            run_migrations(url, f"{int(revision) - 1:04d}")
            asyncio.run(_fail_a_concurrent_build(url, name, table, column))
            assert asyncio.run(_indexes(url))[name][0] is False
            run_migrations(url, revision)
            assert asyncio.run(_indexes(url))[name] == _built(name, table, definition)


async def _writes_go_on_while_the_index_changes(url: str, revision: str, *, downgrade: bool) -> None:
    """Migrate to `revision` (0016's index built or dropped) while a write to error_logs is in flight, which
    holds up the index's change; meanwhile another INSERT into error_logs completes at once."""
    team = uuid.uuid4()
    insert = (
        "INSERT INTO error_logs (id, team_id, code, message, detail, created_at)"
        " VALUES (gen_random_uuid(), $1, 'n8n_error', 'x', '{}', now())"
    )
    in_flight = await asyncpg.connect(_plain_url(url))
    writer = await asyncpg.connect(_plain_url(url))
    watcher = await asyncpg.connect(_plain_url(url))
    migrating: asyncio.Future[None] | None = None
    try:
        await writer.execute(
            "INSERT INTO teams (id, name, slug, settings, created_at, updated_at)"
            " VALUES ($1::uuid, 't', $1::text, '{}', now(), now())",
            team,
        )
        await in_flight.execute("BEGIN")
        await in_flight.execute(insert, team)
        migrating = asyncio.ensure_future(asyncio.to_thread(run_migrations, url, revision, downgrade=downgrade))
        await until_a_statement_waits(watcher, "%INDEX%ix_error_logs_created_at%")
        # A plain CREATE or DROP INDEX waits for the write in flight holding a lock every INSERT waits behind.
        await writer.execute("SET lock_timeout = '3s'")
        await writer.execute(insert, team)
        assert not migrating.done()  # the index's change still waits for the write in flight
        await in_flight.execute("COMMIT")
        await asyncio.wait_for(migrating, 30)
    finally:
        await in_flight.close()  # a failed test's migration goes on, then ends
        if migrating is not None:
            await asyncio.wait({migrating}, timeout=30)
        await writer.close()
        await watcher.close()
    assert await _column(url, f"SELECT count(*) FROM error_logs WHERE team_id = '{team}'") == [2]


@pytest.mark.timeout(120)
def test_writes_go_on_while_a_late_index_is_built_or_dropped_on_postgresql() -> None:
    """An upgrade on a busy database blocks no send, upload or sign-in for the build's duration: 0016's index
    is built (and its downgrade drops it) CONCURRENTLY, as are those of 0017, 0019 and 0021."""
    with fresh_postgres() as url:
        run_migrations(url, "0015")
        asyncio.run(_writes_go_on_while_the_index_changes(url, "0016", downgrade=False))
        built = _built("ix_error_logs_created_at", "error_logs", "(created_at)")
        assert asyncio.run(_indexes(url)) == {"ix_error_logs_created_at": built}
        asyncio.run(_writes_go_on_while_the_index_changes(url, "0015", downgrade=True))
        assert asyncio.run(_indexes(url)) == {}
