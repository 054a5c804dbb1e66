"""error_logs by created_at, for the retention sweep

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06

The heartbeat's sweep (app.services.retention) deletes error-log rows older than ERROR_LOG_RETENTION_DAYS, oldest
first in bounded batches; without this index each batch scanned the whole table. Nothing else changes.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_error_logs_created_at", "error_logs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_error_logs_created_at", table_name="error_logs")
