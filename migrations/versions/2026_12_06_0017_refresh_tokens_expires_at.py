"""refresh_tokens by expires_at, for the retention sweep

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06

The heartbeat's sweep (app.services.retention) deletes refresh tokens a day past their expiry, oldest first in
bounded batches; without this index each batch scanned the whole table (a row per sign-in and per refresh).
Built CONCURRENTLY on PostgreSQL (app.migrations.create_index_concurrently): the table's writes go on during
the build; an INVALID index left by a failed build is dropped and built again when `migrate` runs again.
"""

from collections.abc import Sequence

from app.migrations import create_index_concurrently, drop_index_concurrently

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_index_concurrently("ix_refresh_tokens_expires_at", "refresh_tokens", ["expires_at"])


def downgrade() -> None:
    drop_index_concurrently("ix_refresh_tokens_expires_at", "refresh_tokens")
