"""message last_event_id: the id of an answer's terminal SSE event, so a stream rebuilt from storage keeps it

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06

Written by an answer's final write. Null for the answers stored before (and for those interrupted, which no
final write ended): their rebuilt streams keep the ids 1, 2, 3 they had.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("last_event_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("messages", "last_event_id")
