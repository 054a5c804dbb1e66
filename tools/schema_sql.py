"""Render schema.sql from the Alembic migrations (offline mode, PostgreSQL dialect).

`python -m tools.schema_sql` rewrites schema.sql; `--check` exits 1 when it is out of date.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from alembic import command

from app.migrations import MIGRATIONS, alembic_config

ROOT = Path(__file__).resolve().parent.parent
HEADER = "-- Generated from migrations/ by `make schema` (python -m tools.schema_sql). Do not edit.\n"


def render_schema(script_location: Path = MIGRATIONS) -> str:
    buffer = io.StringIO()
    config = alembic_config(
        "postgresql+asyncpg://schema@localhost/schema", script_location=script_location, output_buffer=buffer
    )
    command.upgrade(config, "head", sql=True)
    return HEADER + buffer.getvalue()


def main(argv: list[str]) -> int:
    target = ROOT / "schema.sql"
    rendered = render_schema()
    if "--check" in argv:
        if not target.exists() or target.read_text() != rendered:
            sys.stderr.write("schema.sql is out of date: run `make schema`\n")
            return 1
        return 0
    target.write_text(rendered)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
