"""Teams: creation with their first admin in one transaction, reading and updating the caller's team."""

from __future__ import annotations

import re
import secrets
import unicodedata
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.errors import Conflict, NotFound
from app.fields import stored_email
from app.models import Team, User, default_team_settings
from app.security import hash_password
from app.services.users import lock_team_as_admin

#: Attempts at a free slug when concurrent sign-ups pick the same one.
SLUG_ATTEMPTS = 5


def slugify(name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:100]
    return slug or "team"


async def unique_slug(session: AsyncSession, name: str) -> str:
    base = slugify(name)
    slug = base
    while (await session.execute(select(Team.id).where(Team.slug == slug))).first() is not None:
        slug = f"{base}-{secrets.token_hex(3)}"
    return slug


async def create_team_with_admin(
    *,
    session: AsyncSession,
    name: str,
    admin_email: str,
    admin_password: str,
    admin_full_name: str | None,
    settings: Settings,
) -> tuple[Team, User]:
    """Create a team and its first admin atomically (one commit, or nothing).

    The slug is unique; a concurrent sign-up that takes the same slug first makes us retry with another.
    """
    password_hash = await hash_password(admin_password, settings.BCRYPT_ROUNDS)
    for attempt in range(SLUG_ATTEMPTS):
        team = Team(name=name, slug=await unique_slug(session, name), settings=default_team_settings())
        session.add(team)
        try:
            await session.flush()
        except IntegrityError as exc:
            await session.rollback()
            if attempt == SLUG_ATTEMPTS - 1:
                raise Conflict("Could not allocate a team slug; try again") from exc
            continue
        user = User(
            team_id=team.id,
            email=stored_email(admin_email),
            password_hash=password_hash,
            full_name=admin_full_name,
            role="admin",
            is_active=True,
            preferences={},
        )
        session.add(user)
        await session.commit()
        return team, user
    raise Conflict("Could not allocate a team slug; try again")  # pragma: no cover - loop always returns


async def get_team(*, session: AsyncSession, team_id: uuid.UUID) -> Team:
    team = await session.get(Team, team_id)
    if team is None:
        raise NotFound("Team not found")
    return team


async def update_team(
    *, session: AsyncSession, team_id: uuid.UUID, admin_id: uuid.UUID, changes: dict[str, Any]
) -> Team:
    """Rename and/or change settings; settings keys are merged, so unspecified ones keep their value. The row
    is locked and read afresh first: two admins changing different settings at once both keep theirs, and an
    admin removed while this ran changes nothing (403)."""
    await lock_team_as_admin(session, team_id=team_id, admin_id=admin_id)
    team = (
        await session.execute(select(Team).where(Team.id == team_id).execution_options(populate_existing=True))
    ).scalar_one()
    if "name" in changes:
        team.name = changes["name"]
    if changes.get("settings"):
        # A new dict (not an in-place change) so the JSON column is seen as modified.
        team.settings = {**default_team_settings(), **(team.settings or {}), **changes["settings"]}
    await session.commit()
    return team


async def database_is_empty(session: AsyncSession) -> bool:
    count = (await session.execute(select(func.count()).select_from(Team))).scalar_one()
    return count == 0


__all__ = ["Conflict", "create_team_with_admin", "database_is_empty", "get_team", "slugify", "update_team"]
