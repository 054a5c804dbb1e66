"""share files: a share's own copies of its messages' files (rows over the same blobs, no byte copied)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06

A separate table rather than `files` with a nullable `chat_id`: a share's copy has no chat, no sender whose
account deletion would take it (files.user_id cascades) and is never "unsent", so none of the chat file's
rules apply to it. Its `sha256` restricts like `files.sha256`: a blob cannot go while a share copy names it.
Existing shares get no copies. A snapshot taken at 0013 alone lists its chat's file ids, which the share's file
route does not serve (404); 0013 and 0014 were released together, so no such snapshot exists outside tests.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "share_files",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("share_id", sa.Uuid(), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("content_type", sa.String(length=100), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["share_id"], ["shares.id"], name=op.f("fk_share_files_share_id_shares"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["sha256"], ["file_blobs.sha256"], name=op.f("fk_share_files_sha256_file_blobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_share_files")),
    )
    op.create_index("ix_share_files_share_id", "share_files", ["share_id"])
    op.create_index("ix_share_files_sha256", "share_files", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_share_files_sha256", table_name="share_files")
    op.drop_index("ix_share_files_share_id", table_name="share_files")
    op.drop_table("share_files")
