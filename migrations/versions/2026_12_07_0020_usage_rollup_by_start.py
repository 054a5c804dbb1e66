"""usage roll-up dated by the day each generation began, the day the quota counts it on

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07

The roll-up dated a ledger row by its final write, while the daily quota counts a generation on the UTC day it
began (its final write less its duration): an answer begun before midnight and ended after it was one day's
for the quota and the next day's in the usage reports. The roll-up is emptied and summed from the ledger
again, each row dated by its start (`RollupBuilder`, frozen in migrations/frozen/usage_rollup.py), reading one
team's UTC day of final writes at a time as migration 0011's back-fill does. Downgrading sums it again dated by
the final write, as the code before this revision kept it. Nothing else changes (no schema change). It takes as
long as 0011's back-fill (about a minute per million ledger rows: docs/PERFORMANCE.md, usage reports).
"""

from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op

# Frozen copies (migrations/frozen): app.services.usage_rollup and app.dialects may change, what this
# migration does must not.
from migrations.frozen.usage_rollup import Histogram, RollupBuilder, UTCDateTime

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEDGER_COLUMNS = ("team_id", "user_id", "agent_id", "outcome", "chars_in", "chars_out", "tokens_in", "tokens_out",
                  "ttfc_ms", "duration_ms")  # fmt: skip
#: Roll-up rows per INSERT.
BATCH = 5_000

ledger = sa.table(
    "usage_records",
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
    """(the team's last day?, the day, the rows whose final write was that day), one team's UTC day at a time:
    one index range scan per team and day, so a big ledger is never held in memory."""
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


def _refill(*, by_end: bool) -> None:
    if op.get_context().as_sql:  # offline (schema.sql): there are no rows to read
        return
    bind = op.get_bind()
    bind.execute(sa.delete(rollups))
    pending: list[dict[str, Any]] = []
    builder = RollupBuilder(by_end=by_end)
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
    _refill(by_end=False)


def downgrade() -> None:
    _refill(by_end=True)
