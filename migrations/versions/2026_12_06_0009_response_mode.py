"""response mode: an agent answers by its webhook's stream (default) or by progress callbacks

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Existing agents keep answering by stream (the server default fills the column).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN with a default, on both dialects: no rebuild of `agents` (on SQLite a rebuild would
    # cascade-delete the chats that reference it).
    op.add_column(
        "agents", sa.Column("response_mode", sa.String(length=16), nullable=False, server_default="stream")
    )


def downgrade() -> None:
    op.drop_column("agents", "response_mode")
