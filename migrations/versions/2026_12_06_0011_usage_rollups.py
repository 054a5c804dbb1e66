"""usage roll-up: the ledger summed per team, UTC day, agent and user, which the usage reports read

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

The roll-up is filled from the existing ledger rows, one team's UTC day at a time, as each new ledger row is
summed (`RollupBuilder`, frozen in migrations/frozen/usage_rollup.py as of migration 0020: it writes each
roll-up row once, the day of a row being the one its generation began). The ledger's `(team_id, created_at)`
index loses the columns it carried for the reports (INCLUDE, PostgreSQL): they no longer read the ledger.
Downgrading drops the roll-up (the ledger keeps everything) and gives the index its columns back.
"""

from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op

# Frozen copies (migrations/frozen): app.services.usage_rollup and app.dialects may change, what this
# migration does must not.
from migrations.frozen.usage_rollup import Histogram, RollupBuilder, UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEDGER_COLUMNS = ("team_id", "user_id", "agent_id", "outcome", "chars_in", "chars_out", "tokens_in", "tokens_out",
                  "ttfc_ms", "duration_ms")  # fmt: skip
REPORT_COLUMNS = ["user_id", "agent_id", "outcome", "chars_in", "chars_out", "tokens_in", "tokens_out", "ttfc_ms",
                  "duration_ms"]  # fmt: skip
#: Roll-up rows per INSERT of the back-fill.
BATCH = 5_000

ledger = sa.table(
    "usage_records",
    sa.column("id", sa.Uuid()),
    *(sa.column(name, sa.Uuid()) if name.endswith("_id") else sa.column(name) for name in LEDGER_COLUMNS),
    sa.column("created_at", UTCDateTime()),
)
rollups = sa.table(
    "usage_rollups",
    sa.column("team_id", sa.Uuid()),
    sa.column("day", sa.Date()),
    sa.column("agent_id", sa.Uuid()),
    sa.column("user_id", sa.Uuid()),
    *(sa.column(name) for name in ("generations", "completed", "errors", "cancelled", "chars_in", "chars_out",
                                   "tokens_in", "tokens_out")),
    sa.column("ttfc_hist", Histogram()),
    sa.column("duration_hist", Histogram()),
)  # fmt: skip


def _team_days(bind: sa.Connection) -> Iterator[tuple[bool, date, list[dict[str, Any]]]]:
    """The ledger's rows, one team's UTC day of final writes at a time (whether it is the team's last day, the
    day, its rows): one index range scan per team and day, so a big ledger is never held in memory."""
    spans = bind.execute(
        sa.select(ledger.c.team_id, sa.func.min(ledger.c.created_at), sa.func.max(ledger.c.created_at)).group_by(
            ledger.c.team_id
        )
    ).all()
    for team_id, first, last in spans:
        day, end = first.astimezone(UTC).date(), last.astimezone(UTC).date()
        while day <= end:
            start = datetime.combine(day, time(), UTC)
            query = sa.select(ledger).where(
                ledger.c.team_id == team_id,
                ledger.c.created_at >= start,
                ledger.c.created_at < start + timedelta(days=1),
            )
            yield day == end, day, [dict(row) for row in bind.execute(query).mappings()]
            day += timedelta(days=1)


def fill_rollups(bind: sa.Connection) -> None:
    """Sum the existing ledger into the (empty) roll-up (as migration 0020 does: its rows dated by the day each
    generation began, each roll-up row written once)."""
    pending: list[dict[str, Any]] = []
    builder = RollupBuilder()
    for last, day, records in _team_days(bind):
        pending += builder.add(records, written_on=day)
        if last:
            pending += builder.rest()
        if len(pending) >= BATCH:
            bind.execute(rollups.insert(), pending)
            pending = []
    if pending:
        bind.execute(rollups.insert(), pending)


def upgrade() -> None:
    op.create_table(
        "usage_rollups",
        sa.Column("team_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("generations", sa.BigInteger(), nullable=False),
        sa.Column("completed", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("cancelled", sa.BigInteger(), nullable=False),
        sa.Column("chars_in", sa.BigInteger(), nullable=False),
        sa.Column("chars_out", sa.BigInteger(), nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), nullable=True),
        sa.Column("tokens_out", sa.BigInteger(), nullable=True),
        sa.Column("ttfc_hist", Histogram(), nullable=False),
        sa.Column("duration_hist", Histogram(), nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name=op.f("fk_usage_rollups_team_id_teams"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("team_id", "day", "agent_id", "user_id", name=op.f("pk_usage_rollups")),
    )
    op.drop_index("ix_usage_records_team_id_created_at", table_name="usage_records")
    op.create_index("ix_usage_records_team_id_created_at", "usage_records", ["team_id", "created_at"])
    if not op.get_context().as_sql:  # offline (schema.sql): there are no rows to read
        fill_rollups(op.get_bind())


def downgrade() -> None:
    op.drop_index("ix_usage_records_team_id_created_at", table_name="usage_records")
    op.create_index(
        "ix_usage_records_team_id_created_at",
        "usage_records",
        ["team_id", "created_at"],
        postgresql_include=REPORT_COLUMNS,
    )
    op.drop_table("usage_rollups")
