"""spent refresh tokens holding their successor, by use, for the retention sweep

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07

A spent refresh token's `successor_encrypted` (the live token it was rotated into, under ENCRYPTION_KEY) served
only within REFRESH_REUSE_GRACE_SECONDS of its use, and stayed until the row went, a day past its expiry: a
copy of the database plus that key gave live refresh tokens for days. The heartbeat's sweep
(app.services.retention) now clears it a minute after the window, in bounded batches; the partial index holds
only the rows still holding one (those spent in the last minutes, once the first sweeps have worked off the
rows written before this revision), so a batch reads no other token.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WITH_SUCCESSOR = sa.text("successor_encrypted IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_refresh_tokens_successor_used_at",
        "refresh_tokens",
        ["used_at"],
        unique=False,
        postgresql_where=WITH_SUCCESSOR,
        sqlite_where=WITH_SUCCESSOR,
    )


def downgrade() -> None:
    op.drop_index("ix_refresh_tokens_successor_used_at", table_name="refresh_tokens")
