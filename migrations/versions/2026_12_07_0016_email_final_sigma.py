"""emails: a final sigma (ς) stored as σ, the form every comparison now uses

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

Python lower-cases a Σ at the end of a word to ς, so `ΟΔΥΣΣΕΥΣ@…` was stored as `οδυσσευς@…` while the same
address typed in lower case, `οδυσσευσ@…`, was another one: two accounts for one address in a team, and its
owner could not log in with it. `canonical_email` now folds ς to σ; this does the same to what is stored. A
user whose folded email another user of the team already has keeps it unfolded (the unique index would refuse
the update): such a pair was already two accounts. The downgrade keeps the folded form, which is correct for
the code before too.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE users SET email = replace(email, 'ς', 'σ') WHERE email LIKE '%ς%'"
        " AND NOT EXISTS (SELECT 1 FROM users other WHERE other.team_id = users.team_id"
        " AND other.id <> users.id AND lower(other.email) = lower(replace(users.email, 'ς', 'σ')))"
    )
    op.execute("UPDATE invites SET email = replace(email, 'ς', 'σ') WHERE email LIKE '%ς%'")


def downgrade() -> None:
    pass
