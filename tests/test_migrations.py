"""Migrations upgrade and downgrade on PostgreSQL and SQLite; schema.sql stays generated from them."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.services.health import migration_head
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import ADMIN_URL, ROOT, _admin_execute, _plain_url, _with_database, make_settings, run_migrations
from tools.schema_sql import render_schema

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
    "alembic_version",
}


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


def test_upgrade_downgrade_upgrade_on_postgresql() -> None:
    name = f"test_mig_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    url = _with_database(ADMIN_URL, name).replace("postgresql://", "postgresql+asyncpg://")
    try:
        run_migrations(url)
        assert asyncio.run(_pg_tables(url)) == EXPECTED_TABLES
        run_migrations(url, "base", downgrade=True)
        assert asyncio.run(_pg_tables(url)) == {"alembic_version"}
        run_migrations(url)
        assert asyncio.run(_pg_tables(url)) == EXPECTED_TABLES
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    run_migrations(url)
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES
    run_migrations(url, "base", downgrade=True)
    assert asyncio.run(_sqlite_tables(url)) == {"alembic_version"}
    run_migrations(url)
    assert asyncio.run(_sqlite_tables(url)) == EXPECTED_TABLES


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
