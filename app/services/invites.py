"""Invitations into a team: minting, listing and revoking them, and spending one to register."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.dialects import UTCDateTime
from app.errors import Conflict, NotFound
from app.fields import email_forms, stored_email
from app.models import Invite, Team, User
from app.security import hash_password
from app.services.users import EMAIL_TAKEN, email_taken, insert_user, lock_team_as_admin

#: Unknown, used up, expired, revoked and bound to another email: one answer tells a guesser nothing.
INVITE_NOT_FOUND = "Invite not found or no longer valid"
INVITE_ID_NOT_FOUND = "Invite not found"
#: We issue 43-character tokens: a longer one is refused without a database lookup (as in the schema).
TOKEN_MAX_LENGTH = 128


@dataclass(frozen=True)
class InvitePreview:
    team_name: str
    email: str | None
    role: str
    expires_at: datetime


def hash_invite_token(token: str) -> str:
    """Stored instead of the token; 256 random bits need no slow hash, and a leak opens no team."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """256 random bits, URL-safe (43 characters): fits in a link without escaping."""
    return secrets.token_urlsafe(32)


def invite_status(invite: Invite, now: datetime | None = None) -> str:
    """Why a token no longer works, or "active"; revoked wins over used up, which wins over expired."""
    now = now or utcnow()
    if invite.revoked_at is not None:
        return "revoked"
    if invite.uses >= invite.max_uses:
        return "used_up"
    if invite.expires_at <= now:
        return "expired"
    return "active"


def _usable(token_hash: str, now: datetime, email: str | None = None) -> ColumnElement[bool]:
    """The one definition of a working token, in SQL, so a check and the use that follows agree."""
    conditions = [
        Invite.token_hash == token_hash,
        Invite.revoked_at.is_(None),
        Invite.expires_at > now,
        Invite.uses < Invite.max_uses,
    ]
    if email is not None:
        conditions.append(or_(Invite.email.is_(None), func.lower(Invite.email).in_(email_forms(email))))
    return and_(*conditions)


def _hash_or_none(token: str) -> str | None:
    if not token or len(token) > TOKEN_MAX_LENGTH:
        return None
    return hash_invite_token(token)


async def create_invite(
    *,
    session: AsyncSession,
    team_id: uuid.UUID,
    created_by: uuid.UUID,
    email: str | None,
    role: str,
    expires_in_days: int,
    max_uses: int,
) -> tuple[Invite, str]:
    """Store a new invite and return it with its token, which nothing can read back later.

    The team row is locked first, as demoting or deactivating an admin locks it (app.services.users), and
    the creator is checked again under that lock: an admin removed while this request ran cannot leave an
    invite behind that the removal's revocation missed.

    An email already registered in the team (active or not) is a 409: no registration could ever use the invite.
    """
    await lock_team_as_admin(session, team_id=team_id, admin_id=created_by, exclusive=False)
    if email and await email_taken(session, team_id, email):
        await session.rollback()
        raise Conflict(EMAIL_TAKEN)
    token = new_token()
    invite = Invite(
        team_id=team_id,
        token_hash=hash_invite_token(token),
        email=stored_email(email) if email else None,
        role=role,
        expires_at=utcnow() + timedelta(days=expires_in_days),
        max_uses=max_uses,
        uses=0,
        created_by=created_by,
    )
    session.add(invite)
    await session.commit()
    return invite, token


async def list_invites(
    *, session: AsyncSession, team_id: uuid.UUID, limit: int | None = None, offset: int = 0
) -> tuple[list[Invite], int]:
    """The team's invites, newest first (the id breaks ties, so pages never repeat or skip a row), and their
    total; revoked and spent ones included (their status says so) until the retention sweep deletes them,
    INVITE_RETENTION_DAYS after they ended. No `limit` is every invite from `offset` on, as before paging."""
    where = Invite.team_id == team_id
    query = select(Invite).where(where).order_by(Invite.created_at.desc(), Invite.id).offset(offset).limit(limit)
    invites = list((await session.execute(query)).scalars())
    if limit is None and offset == 0:
        return invites, len(invites)
    total = (await session.execute(select(func.count()).select_from(Invite).where(where))).scalar_one()
    return invites, int(total)


async def revoke_invite(*, session: AsyncSession, team_id: uuid.UUID, invite_id: uuid.UUID) -> None:
    """Revoke at once; revoking twice keeps the first instant. Another team's invite is the same 404.

    The row is read locked: the retention sweep deleting it meanwhile makes this wait, then find nothing (404),
    never update a row that is gone."""
    query = select(Invite).where(Invite.id == invite_id, Invite.team_id == team_id).with_for_update()
    invite = (await session.execute(query)).scalar_one_or_none()
    if invite is None:
        raise NotFound(INVITE_ID_NOT_FOUND)
    if invite.revoked_at is None:
        invite.revoked_at = utcnow()
    await session.commit()


async def preview_invite(*, session: AsyncSession, token: str) -> InvitePreview:
    """What a sign-up page may show before registering: the team's name, the bound email, the role."""
    token_hash = _hash_or_none(token)
    if token_hash is None:
        raise NotFound(INVITE_NOT_FOUND)
    query = (
        select(Team.name, Invite.email, Invite.role, Invite.expires_at)
        .join(Team, Team.id == Invite.team_id)
        .where(_usable(token_hash, utcnow()))
    )
    row = (await session.execute(query)).first()
    await session.commit()
    if row is None:
        raise NotFound(INVITE_NOT_FOUND)
    return InvitePreview(team_name=row.name, email=row.email, role=row.role, expires_at=row.expires_at)


async def register_with_invite(
    *, session: AsyncSession, settings: Settings, token: str, email: str, password: str, full_name: str | None
) -> User:
    """Join the invite's team with its role, whatever the team's open_registration says.

    Checked first (cheap 404/409 before bcrypt), then spent for real: the conditional UPDATE re-checks
    everything and takes the row lock, and the user insert commits with it or not at all.
    """
    token_hash = _hash_or_none(token)
    if token_hash is None:
        raise NotFound(INVITE_NOT_FOUND)
    email = stored_email(email)
    invite = (await session.execute(select(Invite).where(_usable(token_hash, utcnow(), email)))).scalar_one_or_none()
    if invite is None:
        await session.rollback()
        raise NotFound(INVITE_NOT_FOUND)
    team_id = invite.team_id
    if await email_taken(session, team_id, email):
        await session.rollback()
        raise Conflict(EMAIL_TAKEN)
    await session.commit()  # release the connection while bcrypt runs
    password_hash = await hash_password(password, settings.BCRYPT_ROUNDS)

    now = utcnow()
    spent = await session.execute(
        update(Invite)
        .where(_usable(token_hash, now, email))
        # The last allowed use dates the invite's end, from which the retention sweep counts.
        .values(
            uses=Invite.uses + 1,
            used_up_at=case((Invite.uses + 1 >= Invite.max_uses, literal(now, UTCDateTime)), else_=None),
        )
        .returning(Invite.team_id, Invite.role)
        .execution_options(synchronize_session=False)
    )
    row = spent.first()
    if row is None:
        # Used up, revoked or expired while we were hashing.
        await session.rollback()
        raise NotFound(INVITE_NOT_FOUND)
    user = User(
        team_id=row.team_id,
        email=email,
        password_hash=password_hash,
        full_name=full_name,
        role=row.role,
        is_active=True,
        preferences={},
    )
    # The same email registered meanwhile: insert_user's rollback (409) gives the use back too.
    return await insert_user(session=session, user=user)


def invite_fields(invite: Invite, now: datetime | None = None) -> dict[str, Any]:
    """The admin's view of an invite (never the token or its hash)."""
    return {
        "id": invite.id,
        "email": invite.email,
        "role": invite.role,
        "expires_at": invite.expires_at,
        "max_uses": invite.max_uses,
        "uses": invite.uses,
        "created_at": invite.created_at,
        "revoked_at": invite.revoked_at,
        "created_by": invite.created_by,
        "status": invite_status(invite, now),
    }
