"""refresh_tokens by expires_at, for the retention sweep

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06

The heartbeat's sweep (app.services.retention) deletes refresh tokens a day past their expiry, oldest first in
bounded batches; without this index each batch scanned the whole table (a row per sign-in and per refresh).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_refresh_tokens_expires_at", "refresh_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_refresh_tokens_expires_at", table_name="refresh_tokens")
