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
Built CONCURRENTLY on PostgreSQL (app.migrations.create_index_concurrently): the table's writes go on during
the build; an INVALID index left by a failed build is dropped and built again when `migrate` runs again.
"""

from collections.abc import Sequence

from app.migrations import create_index_concurrently, drop_index_concurrently

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_index_concurrently(
        "ix_refresh_tokens_successor_used_at", "refresh_tokens", ["used_at"], where="successor_encrypted IS NOT NULL"
    )


def downgrade() -> None:
    drop_index_concurrently("ix_refresh_tokens_successor_used_at", "refresh_tokens")
