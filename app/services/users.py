"""Users of a team: admin management, self-service, registration; the last-admin rule."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.errors import ADMIN_REQUIRED, BadRequest, Conflict, Forbidden, NotFound
from app.fields import email_forms, stored_email
from app.models import Invite, Team, User
from app.security import hash_password, verify_password
from app.services.auth import revoke_all_user_tokens

EMAIL_TAKEN = "This email is already registered in this team"
USER_NOT_FOUND = "User not found"
LAST_ADMIN = "The team's last active admin cannot be demoted or deactivated"


async def list_users(
    *, session: AsyncSession, admin: User, limit: int | None = None, offset: int = 0
) -> tuple[list[User], int]:
    """The team's users, oldest first (the id breaks ties, so pages never repeat or skip a row), and their
    total. No `limit` is every user from `offset` on: clients written before paging expect them all."""
    where = User.team_id == admin.team_id
    query = select(User).where(where).order_by(User.created_at, User.id).offset(offset).limit(limit)
    users = list((await session.execute(query)).scalars())
    if limit is None and offset == 0:
        return users, len(users)
    total = (await session.execute(select(func.count()).select_from(User).where(where))).scalar_one()
    return users, int(total)


async def get_team_user(*, session: AsyncSession, admin: User, user_id: uuid.UUID, lock: bool = False) -> User:
    """The ownership helper: a missing id and another team's user are the same 404."""
    query = select(User).where(User.id == user_id, User.team_id == admin.team_id)
    if lock:
        query = query.with_for_update(key_share=True)  # not held against foreign-key checks
    user = (await session.execute(query.execution_options(populate_existing=True))).scalar_one_or_none()
    if user is None:
        raise NotFound(USER_NOT_FOUND)
    return user


async def lock_team_as_admin(
    session: AsyncSession, *, team_id: uuid.UUID, admin_id: uuid.UUID, exclusive: bool = True
) -> None:
    """Lock the team's row, as every change of a role or an activation does (`update_user`), and check the
    caller again under it: an admin demoted or deactivated while this request ran (it passed its role check
    before) changes nothing, 403. `exclusive=False` for writes that only need the roles to hold still. Neither
    lock waits for, nor holds up, the foreign-key checks of rows that name the team (chats, usage rows)."""
    lock = select(Team.id).where(Team.id == team_id).with_for_update(read=not exclusive, key_share=exclusive)
    await session.execute(lock)
    still_admin = select(User.id).where(
        User.id == admin_id, User.team_id == team_id, User.role == "admin", User.is_active.is_(True)
    )
    if (await session.execute(still_admin)).first() is None:
        await session.rollback()
        raise Forbidden(ADMIN_REQUIRED)


async def insert_user(*, session: AsyncSession, user: User) -> User:
    """Commit a new user; a duplicate email (a unique index, so races too) rolls back and is a 409."""
    session.add(user)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(EMAIL_TAKEN) from exc
    return user


async def email_taken(session: AsyncSession, team_id: uuid.UUID, email: str) -> bool:
    """Any row of the team naming this mailbox, in whichever form it was stored (`email_forms`)."""
    query = select(User.id).where(User.team_id == team_id, func.lower(User.email).in_(email_forms(email)))
    return (await session.execute(query)).first() is not None


async def create_user(
    *,
    session: AsyncSession,
    settings: Settings,
    team_id: uuid.UUID,
    email: str,
    password: str,
    full_name: str | None,
    role: str = "user",
    created_by: uuid.UUID | None = None,
) -> User:
    """Insert a user; the unique index on (team_id, lower(email)) settles races as a 409. `created_by`: the
    admin creating it, checked again once bcrypt is done (`lock_team_as_admin`)."""
    if await email_taken(session, team_id, email):
        raise Conflict(EMAIL_TAKEN)
    await session.commit()  # release the connection while bcrypt runs
    password_hash = await hash_password(password, settings.BCRYPT_ROUNDS)
    if created_by is not None:
        await lock_team_as_admin(session, team_id=team_id, admin_id=created_by, exclusive=False)
    user = User(
        team_id=team_id,
        email=stored_email(email),
        password_hash=password_hash,
        full_name=full_name,
        role=role,
        is_active=True,
        preferences={},
    )
    return await insert_user(session=session, user=user)


async def register(
    *, session: AsyncSession, settings: Settings, team_id: uuid.UUID, email: str, password: str, full_name: str | None
) -> User:
    """Self-registration into a team whose `open_registration` setting is on; always role `user`."""
    team = await session.get(Team, team_id)
    if team is None:
        raise NotFound("Team not found")
    if not bool((team.settings or {}).get("open_registration", False)):
        raise Forbidden("Registration is closed for this team")
    return await create_user(
        session=session, settings=settings, team_id=team_id, email=email, password=password, full_name=full_name
    )


async def update_user(*, session: AsyncSession, admin: User, user_id: uuid.UUID, changes: dict[str, Any]) -> User:
    """Apply an admin's changes; deactivation revokes every token of the user, and deactivating or demoting an
    admin revokes the invites they made.

    The team row is locked (`lock_team_as_admin`) before counting admins, so two admins demoting each
    other at the same moment cannot leave the team without one: the second waits, and then is no admin (403).
    """
    await lock_team_as_admin(session, team_id=admin.team_id, admin_id=admin.id)
    user = await get_team_user(session=session, admin=admin, user_id=user_id, lock=True)
    demoting = changes.get("role") == "user" and user.role == "admin"
    deactivating = changes.get("is_active") is False and user.is_active
    if user.role == "admin" and user.is_active and (demoting or deactivating):
        others = await session.execute(
            select(func.count())
            .select_from(User)
            .where(User.team_id == admin.team_id, User.role == "admin", User.is_active.is_(True), User.id != user.id)
        )
        if others.scalar_one() == 0:
            await session.rollback()
            raise Conflict(LAST_ADMIN)
    for name in ("role", "is_active", "full_name"):
        if name in changes:
            setattr(user, name, changes[name])
    if deactivating:
        await revoke_all_user_tokens(session=session, user=user)
    if demoting or deactivating:
        # An invite grants what its creator may grant: a removed admin's open invites stop working (one for an
        # admin would otherwise bring them, or anyone, back as admin until it expires).
        await session.execute(
            update(Invite).where(Invite.created_by == user.id, Invite.revoked_at.is_(None)).values(revoked_at=utcnow())
        )
    await session.commit()
    return user


async def update_me(*, session: AsyncSession, user: User, changes: dict[str, Any]) -> User:
    """Self-service: only the name and preferences; the schema refuses every other field."""
    if "full_name" in changes:
        user.full_name = changes["full_name"]
    if "preferences" in changes:
        user.preferences = dict(changes["preferences"])
    await session.commit()
    return user


async def change_password(
    *, session: AsyncSession, settings: Settings, user: User, current_password: str, new_password: str
) -> User:
    """Check the current password, store the new one and revoke every token issued so far."""
    await session.commit()  # release the connection while bcrypt runs
    if not await verify_password(current_password, user.password_hash):
        raise BadRequest("Current password is incorrect")
    user.password_hash = await hash_password(new_password, settings.BCRYPT_ROUNDS)
    await revoke_all_user_tokens(session=session, user=user)
    await session.commit()
    return user


async def reset_password(*, session: AsyncSession, settings: Settings, user: User, new_password: str) -> User:
    """Operator reset (CLI): new password, every existing token revoked."""
    user.password_hash = await hash_password(new_password, settings.BCRYPT_ROUNDS)
    await revoke_all_user_tokens(session=session, user=user)
    await session.commit()
    return user
