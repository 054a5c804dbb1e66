"""Alembic's configuration, built in one place (the CLI, readiness, schema.sql, tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

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
