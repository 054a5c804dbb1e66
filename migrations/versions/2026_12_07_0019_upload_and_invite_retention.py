"""unsent uploads by upload time, and when an invite was used up, for the retention sweep

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07

The heartbeat's sweep (app.services.retention) deletes uploads no message carries UPLOAD_RETENTION_HOURS after
their upload, oldest first in bounded batches: the partial index holds only the unsent ones (a few per chat),
so a batch reads no sent file. It deletes invites INVITE_RETENTION_DAYS after they ended; `used_up_at` dates
the end of a used-up one (null for those used up before this revision: the sweep dates them by their expiry).
The index is built CONCURRENTLY on PostgreSQL (app.migrations.create_index_concurrently): uploads go on during
the build; an INVALID index left by a failed build is dropped and built again when `migrate` runs again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.migrations import create_index_concurrently, drop_index_concurrently

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_index_concurrently("ix_files_unsent_created_at", "files", ["created_at"], where="message_id IS NULL")
    # A plain ADD COLUMN on both dialects: no table rebuild.
    op.add_column("invites", sa.Column("used_up_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("invites", "used_up_at")
    drop_index_concurrently("ix_files_unsent_created_at", "files")
