"""error_logs by created_at, for the retention sweep

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06

The heartbeat's sweep (app.services.retention) deletes error-log rows older than ERROR_LOG_RETENTION_DAYS, oldest
first in bounded batches; without this index each batch scanned the whole table. Nothing else changes.
Built CONCURRENTLY on PostgreSQL (app.migrations.create_index_concurrently): the table's writes go on during
the build; an INVALID index left by a failed build is dropped and built again when `migrate` runs again.
"""

from collections.abc import Sequence

from app.migrations import create_index_concurrently, drop_index_concurrently

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_index_concurrently("ix_error_logs_created_at", "error_logs", ["created_at"])


def downgrade() -> None:
    drop_index_concurrently("ix_error_logs_created_at", "error_logs")
