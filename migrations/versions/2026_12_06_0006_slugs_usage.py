"""slugs and usage: agents gain a slug unique in their team; the usage ledger

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Agents made before this revision get a slug from their name, oldest first within each team, with `-2`,
`-3`... when two agents of a team share a name (inactive agents included: they keep theirs).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Frozen copies (migrations/frozen): app.slugs may change, what this migration does must not.
from migrations.frozen.slugs import first_free, slugify

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

agents = sa.table(
    "agents",
    sa.column("id", sa.Uuid()),
    sa.column("team_id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("slug", sa.String()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def _fill_slugs() -> None:
    if op.get_context().as_sql:
        return  # offline (schema.sql): there are no rows to read
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(agents.c.id, agents.c.team_id, agents.c.name).order_by(
            agents.c.team_id, agents.c.created_at, agents.c.id
        )
    ).all()
    taken: dict[object, set[str]] = {}
    for row in rows:
        team = taken.setdefault(row.team_id, set())
        slug = first_free(slugify(row.name), team)
        team.add(slug)
        bind.execute(sa.update(agents).where(agents.c.id == row.id).values(slug=slug))


def upgrade() -> None:
    op.add_column("agents", sa.Column("slug", sa.String(length=64), nullable=True))
    _fill_slugs()
    if op.get_context().dialect.name != "sqlite":
        # SQLite cannot add NOT NULL to a column, and rebuilding `agents` for it would cascade-delete the
        # chats that reference it; there the ORM (which always sets a slug) stands in for the constraint.
        op.alter_column("agents", "slug", existing_type=sa.String(length=64), nullable=False)
    op.create_index("uq_agents_team_id_slug", "agents", ["team_id", "slug"], unique=True)

    op.create_table(
        "usage_records",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("team_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("agent_id", sa.Uuid(), nullable=True),
        sa.Column("chat_id", sa.Uuid(), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("error_code", sa.String(length=50), nullable=True),
        sa.Column("chars_in", sa.Integer(), nullable=False),
        sa.Column("chars_out", sa.Integer(), nullable=False),
        sa.Column("tokens_in", sa.Integer(), nullable=True),
        sa.Column("tokens_out", sa.Integer(), nullable=True),
        sa.Column("ttfc_ms", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "outcome IN ('complete', 'error', 'cancelled', 'interrupted')", name=op.f("ck_usage_records_outcome")
        ),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name=op.f("fk_usage_records_team_id_teams"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_usage_records_user_id_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_usage_records_agent_id_agents"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_records")),
    )
    # Covering on PostgreSQL (INCLUDE; SQLite ignores it): the team report is an index-only scan.
    op.create_index(
        "ix_usage_records_team_id_created_at",
        "usage_records",
        ["team_id", "created_at"],
        postgresql_include=[
            "user_id",
            "agent_id",
            "outcome",
            "chars_in",
            "chars_out",
            "tokens_in",
            "tokens_out",
            "ttfc_ms",
            "duration_ms",
        ],
    )
    op.create_index("ix_usage_records_user_id_created_at", "usage_records", ["user_id", "created_at"])
    op.create_table(
        "usage_daily",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("generations", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_usage_daily_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "day", name=op.f("pk_usage_daily")),
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
    op.drop_index("ix_usage_records_user_id_created_at", table_name="usage_records")
    op.drop_index("ix_usage_records_team_id_created_at", table_name="usage_records")
    op.drop_table("usage_records")
    op.drop_index("uq_agents_team_id_slug", table_name="agents")
    # A plain DROP COLUMN: PostgreSQL and SQLite (3.35+) both have it once the index is gone.
    op.drop_column("agents", "slug")
