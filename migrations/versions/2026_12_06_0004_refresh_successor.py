"""refresh successor: a token reused within its grace window is answered with the same successor

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("refresh_tokens", sa.Column("successor_encrypted", sa.Text(), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN: PostgreSQL and SQLite (3.35+) both have it, and no index or key uses the column.
    op.drop_column("refresh_tokens", "successor_encrypted")
