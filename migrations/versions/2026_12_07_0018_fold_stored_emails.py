"""fold stored emails: users and invites stored before the folding get the form new rows are stored in

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07

A row stored before emails were folded keeps the spelling it was registered with (`a@xn--bcher-kva.de`,
full-width letters in a domain, upper case): lookups reach it only as typed, and its folded form could be
registered again in the same team. Each `users.email` becomes `stored_email` of itself (app.fields' as of this
revision, frozen in migrations/frozen/emails.py), unless another user of its team already holds that form (the
unique index on `team_id, lower(email)`): that row is left as it is and logged by id, never by address, for the
operator to merge (docs/OPERATIONS.md). Of two old rows that fold to one form no one holds yet, the first met takes it.
`invites.email` has no such index: every bound email is folded. Idempotent: a folded row folds to itself.

Downgrade changes nothing: the old spellings are not kept (nothing could restore them), and the folded form is
the one the code before this revision stores and finds too.
"""

import logging
import uuid
from collections.abc import Iterator, Sequence

import sqlalchemy as sa
from alembic import op

# A frozen copy (migrations/frozen): app.fields may change, what this migration does must not.
from migrations.frozen.emails import stored_email

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Rows read per query, by primary key.
BATCH = 1_000
#: Alembic's own logger: `migrate` prints its lines (INFO and up) with alembic's.
log = logging.getLogger("alembic.runtime.migration")

users = sa.table("users", sa.column("id", sa.Uuid()), sa.column("team_id", sa.Uuid()), sa.column("email", sa.String()))
invites = sa.table("invites", sa.column("id", sa.Uuid()), sa.column("email", sa.String()))


def _batches(bind: sa.Connection, table: sa.TableClause, *columns: str) -> Iterator[list[sa.Row[tuple[object, ...]]]]:
    """The rows with an email, BATCH at a time in primary-key order (each query one index range scan)."""
    after: uuid.UUID | None = None
    while True:
        query = sa.select(table.c.id, *(table.c[name] for name in columns)).where(table.c.email.is_not(None))
        if after is not None:
            query = query.where(table.c.id > after)
        rows = list(bind.execute(query.order_by(table.c.id).limit(BATCH)).all())
        if not rows:
            return
        yield rows
        after = rows[-1].id


def fold_users(bind: sa.Connection) -> tuple[int, int]:
    """Fold each user's email where no other user of the team holds the folded form: (folded, left)."""
    folded = left = 0
    for rows in _batches(bind, users, "team_id", "email"):
        for row in rows:
            form = stored_email(row.email)
            if form == row.email:
                continue
            # The unique index's own test (SQL `lower`), so the UPDATE below cannot break it.
            holder = bind.execute(
                sa.select(users.c.id)
                .where(users.c.team_id == row.team_id, users.c.id != row.id)
                .where(sa.func.lower(users.c.email) == sa.func.lower(form))
                .limit(1)
            ).scalar()
            if holder is not None:
                left += 1
                log.warning(
                    "users row %s keeps its email as stored: user %s of the same team holds its folded form "
                    "(merge them, see docs/OPERATIONS.md)",
                    row.id,
                    holder,
                )
                continue
            bind.execute(users.update().where(users.c.id == row.id).values(email=form))
            folded += 1
    return folded, left


def fold_invites(bind: sa.Connection) -> int:
    """Fold every invite's bound email (no uniqueness to keep): how many changed."""
    changed = 0
    for rows in _batches(bind, invites, "email"):
        updates = [{"row_id": row.id, "form": stored_email(row.email)} for row in rows]
        updates = [update for update, row in zip(updates, rows, strict=True) if update["form"] != row.email]
        if updates:
            statement = invites.update().where(invites.c.id == sa.bindparam("row_id"))
            bind.execute(statement.values(email=sa.bindparam("form")), updates)
            changed += len(updates)
    return changed


def upgrade() -> None:
    if op.get_context().as_sql:
        return  # offline (schema.sql): there are no rows to read
    bind = op.get_bind()
    folded, left = fold_users(bind)
    invites_folded = fold_invites(bind)
    log.info(
        "Emails folded: %d of users, %d of invites; users left as stored (logged above by id): %d",
        folded,
        invites_folded,
        left,
    )


def downgrade() -> None:
    # Nothing to undo: the old spellings were not kept, and the folded form is the one the code before this
    # revision stores and finds (in either spelling) too.
    pass
