"""Teams: creation with their first admin, in one transaction."""

from __future__ import annotations

import re
import secrets
import unicodedata

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import hash_password
from app.errors import Conflict
from app.models import Team, User


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
    bcrypt_rounds: int,
) -> tuple[Team, User]:
    """Create a team and its first admin atomically (one commit, or nothing)."""
    password_hash = await hash_password(admin_password, bcrypt_rounds)
    team = Team(name=name, slug=await unique_slug(session, name))
    session.add(team)
    await session.flush()
    user = User(
        team_id=team.id,
        email=admin_email.strip().lower(),
        password_hash=password_hash,
        full_name=admin_full_name,
        role="admin",
        is_active=True,
    )
    session.add(user)
    await session.commit()
    return team, user


async def database_is_empty(session: AsyncSession) -> bool:
    count = (await session.execute(select(func.count()).select_from(Team))).scalar_one()
    return count == 0


__all__ = ["Conflict", "create_team_with_admin", "database_is_empty", "slugify"]
