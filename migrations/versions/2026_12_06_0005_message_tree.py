"""message tree: one row per message in `messages`, linked by parent_id; chats gain current_message_id

Each chat's JSON array becomes one linear branch (every message's parent is the one before it, the last
one is the chat's current message), keeping ids, created_at, status, error, metadata and `_worker`.
Downgrade puts each chat's current branch back as the JSON array (other branches are lost).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
STREAMING_ONLY = sa.text("status = 'streaming'")
ROOTS_ONLY = sa.text("parent_id IS NULL")
BATCH = 500

chats = sa.table(
    "chats",
    sa.column("id", sa.Uuid()),
    sa.column("messages", JSON_TYPE),
    sa.column("current_message_id", sa.Uuid()),
    sa.column("message_count", sa.Integer()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
messages = sa.table(
    "messages",
    sa.column("id", sa.Uuid()),
    sa.column("chat_id", sa.Uuid()),
    sa.column("parent_id", sa.Uuid()),
    sa.column("role", sa.String()),
    sa.column("content", sa.Text()),
    sa.column("status", sa.String()),
    sa.column("error", JSON_TYPE),
    sa.column("metadata", JSON_TYPE),
    sa.column("feedback", JSON_TYPE),
    sa.column("worker_id", sa.Uuid()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _when(value: Any, fallback: datetime) -> datetime:
    try:
        return _utc(datetime.fromisoformat(str(value)))
    except ValueError:
        return fallback


def _rows(chat_id: uuid.UUID, elements: list[Any], chat_created: datetime) -> list[dict[str, Any]]:
    """One chat's array as rows of one branch; ids kept (a missing or repeated one gets a new id)."""
    rows: list[dict[str, Any]] = []
    seen: set[uuid.UUID] = set()
    parent: uuid.UUID | None = None
    for element in elements:
        if not isinstance(element, dict):
            continue
        message_id = _uuid(element.get("id"))
        if message_id is None or message_id in seen:
            message_id = uuid.uuid4()
        seen.add(message_id)
        created = _when(element.get("created_at"), chat_created)
        rows.append(
            {
                "id": message_id,
                "chat_id": chat_id,
                "parent_id": parent,
                "role": str(element.get("role", "user")),
                "content": element.get("content") if isinstance(element.get("content"), str) else "",
                "status": str(element.get("status", "complete")),
                "error": element.get("error"),
                "metadata": element.get("metadata"),
                "feedback": None,
                "worker_id": _uuid(element.get("_worker")) if element.get("_worker") else None,
                "created_at": created,
                "updated_at": created,
            }
        )
        parent = message_id
    return rows


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("chat_id", sa.Uuid(), nullable=False),
        sa.Column("parent_id", sa.Uuid(), nullable=True),
        sa.Column("role", sa.String(length=10), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("error", JSON_TYPE, nullable=True),
        sa.Column("metadata", JSON_TYPE, nullable=True),
        sa.Column("feedback", JSON_TYPE, nullable=True),
        sa.Column("worker_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["chat_id"], ["chats.id"], name=op.f("fk_messages_chat_id_chats"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["messages.id"], name=op.f("fk_messages_parent_id_messages"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
    )
    op.create_index("ix_messages_chat_id_created_at", "messages", ["chat_id", "created_at"], unique=False)
    op.create_index("ix_messages_parent_id_created_at", "messages", ["parent_id", "created_at"], unique=False)
    op.create_index(
        "ix_messages_chat_roots",
        "messages",
        ["chat_id", "created_at"],
        unique=False,
        postgresql_where=ROOTS_ONLY,
        sqlite_where=ROOTS_ONLY,
    )
    op.create_index(
        "uq_messages_chat_id_streaming",
        "messages",
        ["chat_id"],
        unique=True,
        postgresql_where=STREAMING_ONLY,
        sqlite_where=STREAMING_ONLY,
    )
    op.add_column("chats", sa.Column("current_message_id", sa.Uuid(), nullable=True))

    if not op.get_context().as_sql:  # offline SQL (schema.sql) renders the schema only
        _move_arrays_to_rows()
    if op.get_context().dialect.name == "postgresql":
        op.drop_index("ix_chats_messages", table_name="chats")
    op.drop_column("chats", "messages")


def _move_arrays_to_rows() -> None:
    bind = op.get_bind()
    last_id: uuid.UUID | None = None
    while True:
        query = sa.select(chats.c.id, chats.c.messages, chats.c.created_at).order_by(chats.c.id).limit(BATCH)
        if last_id is not None:
            query = query.where(chats.c.id > last_id)
        batch = bind.execute(query).all()
        if not batch:
            break
        for chat_id, elements, chat_created in batch:
            rows = _rows(chat_id, elements if isinstance(elements, list) else [], _utc(chat_created))
            if rows:
                bind.execute(messages.insert(), rows)
                bind.execute(
                    chats.update().where(chats.c.id == chat_id).values(current_message_id=rows[-1]["id"])
                )
        last_id = batch[-1][0]


def _element(row: Any) -> dict[str, Any]:
    created = _utc(row.created_at).isoformat().replace("+00:00", "Z")
    element: dict[str, Any] = {
        "id": str(row.id),
        "role": row.role,
        "content": row.content,
        "status": row.status,
        "created_at": created,
    }
    if row.error is not None:
        element["error"] = row.error
    if row.metadata is not None:
        element["metadata"] = row.metadata
    if row.worker_id is not None:
        element["_worker"] = str(row.worker_id)
    return element


def downgrade() -> None:
    op.add_column("chats", sa.Column("messages", JSON_TYPE, nullable=False, server_default="[]"))
    if not op.get_context().as_sql:
        _move_branches_to_arrays()
    if op.get_context().dialect.name == "postgresql":
        op.alter_column("chats", "messages", server_default=None)
        op.create_index(
            "ix_chats_messages",
            "chats",
            ["messages"],
            unique=False,
            postgresql_using="gin",
            postgresql_ops={"messages": "jsonb_path_ops"},
        )
    op.drop_column("chats", "current_message_id")
    op.drop_table("messages")


def _move_branches_to_arrays() -> None:
    """Each chat's current branch, root first, as the array it was before the tree."""
    bind = op.get_bind()
    current = bind.execute(
        sa.select(chats.c.id, chats.c.current_message_id).where(chats.c.current_message_id.is_not(None))
    ).all()
    for chat_id, leaf in current:
        rows = {
            row.id: row
            for row in bind.execute(
                sa.select(
                    messages.c.id,
                    messages.c.parent_id,
                    messages.c.role,
                    messages.c.content,
                    messages.c.status,
                    messages.c.error,
                    messages.c.metadata,
                    messages.c.worker_id,
                    messages.c.created_at,
                ).where(messages.c.chat_id == chat_id)
            ).all()
        }
        branch: list[dict[str, Any]] = []
        node = rows.get(leaf)
        while node is not None and len(branch) <= len(rows):
            branch.append(_element(node))
            node = rows.get(node.parent_id) if node.parent_id is not None else None
        branch.reverse()
        bind.execute(
            chats.update().where(chats.c.id == chat_id).values(messages=branch, message_count=len(branch))
        )
