"""Alembic's configuration, built in one place (the CLI, readiness, schema.sql, tests and benchmarks), and the
migrations' way to index a table that may be large (concurrently on PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import sqlalchemy as sa
from alembic import op
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "migrations"


def alembic_config(
    url: str | None = None,
    *,
    script_location: Path = MIGRATIONS,
    output_buffer: TextIO | None = None,
    configure_logging: bool = False,
) -> Config:
    """alembic.ini with absolute paths (any working directory works) and, when given, the database URL.

    `configure_logging`: let migrations/env.py apply alembic.ini's logging (the operator's `migrate` only;
    inside a process that already set up its logging, it would replace the handlers).
    """
    config = Config(str(ROOT / "alembic.ini"), output_buffer=output_buffer)
    config.set_main_option("script_location", str(script_location))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logging"] = configure_logging
    return config


def create_index_concurrently(name: str, table: str, columns: list[str], *, where: str | None = None) -> None:
    """Inside a migration: add an index to a table that may already be large without blocking its writes.

    On PostgreSQL a plain CREATE INDEX holds a lock that stops every INSERT, UPDATE and DELETE on the table
    (sends, uploads, sign-ins) until the build ends; CONCURRENTLY lets them through, and runs outside a
    transaction (the migrations before it are committed first). A concurrent build that failed (cancelled, a
    lost connection) leaves an INVALID index of that name, which IF NOT EXISTS would keep: it is dropped
    first, so running the migration again builds it. Offline (schema.sql) there is no catalog to ask. SQLite
    locks the whole file for any write anyway: a plain CREATE INDEX there.
    """
    condition = sa.text(where) if where is not None else None
    context = op.get_context()
    if context.dialect.name != "postgresql":
        op.create_index(name, table, columns, sqlite_where=condition)
        return
    with context.autocommit_block():
        if not context.as_sql:
            invalid = op.get_bind().scalar(
                sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"), {"name": name}
            )
            if invalid:
                op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
        op.create_index(
            name, table, columns, postgresql_where=condition, postgresql_concurrently=True, if_not_exists=True
        )


def drop_index_concurrently(name: str, table: str) -> None:
    """Inside a migration's downgrade: drop an index added by `create_index_concurrently`, again without
    blocking the table's writes on PostgreSQL (DROP INDEX CONCURRENTLY, outside a transaction)."""
    context = op.get_context()
    if context.dialect.name != "postgresql":
        op.drop_index(name, table_name=table)
        return
    with context.autocommit_block():
        op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
