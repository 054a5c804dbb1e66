"""The statement set is chosen once, where the Database is created, and every session it makes carries it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from app.config import Settings
from app.db import Database
from app.dialects import PostgresStatements, SqliteStatements, Statements, statements_of
from tests.conftest import make_settings


async def _carried(settings: Settings) -> tuple[Statements, Statements, Statements]:
    db = Database(settings)
    try:
        async with db.sessionmaker() as session, db.autocommit() as autocommit:
            return db.statements, statements_of(session), statements_of(autocommit)
    finally:
        await db.dispose()


async def test_postgres_database_sessions_carry_postgres_statements(settings: Settings) -> None:
    chosen, session_set, autocommit_set = await _carried(settings)
    assert isinstance(chosen, PostgresStatements)
    assert session_set is chosen
    assert autocommit_set is chosen


async def test_sqlite_database_sessions_carry_sqlite_statements(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", tmp_path)
    chosen, session_set, autocommit_set = await _carried(settings)
    assert isinstance(chosen, SqliteStatements)
    assert session_set is chosen
    assert autocommit_set is chosen


async def test_session_not_made_by_a_database_has_no_statements(settings: Settings) -> None:
    """A session from elsewhere fails loudly instead of guessing a dialect."""
    engine = create_async_engine(settings.DATABASE_URL)
    try:
        async with AsyncSession(engine) as session:
            with pytest.raises(KeyError):
                statements_of(session)
    finally:
        await engine.dispose()
