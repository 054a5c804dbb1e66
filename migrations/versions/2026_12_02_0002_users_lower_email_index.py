"""index users by lower(email) for login without team_id

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_users_lower_email", "users", [sa.literal_column("lower(email)")], unique=False)


def downgrade() -> None:
    op.drop_index("ix_users_lower_email", table_name="users")
