"""Sessions: password login, refresh-token rotation with reuse detection, logout and revocation."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import anyio
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import DecryptionError, decrypt_text, encrypt_text
from app.db import utcnow
from app.errors import Unauthorized
from app.fields import canonical_email, email_forms
from app.models import RefreshToken, Team, User
from app.security import (
    INVALID_TOKEN,
    IssuedToken,
    create_token,
    decode_token,
    family_key,
    hash_cost,
    hash_password,
    hash_password_sync,
    hash_refresh_token,
    issued_before,
    needs_rehash,
    same_instant,
    verify_password,
)
from app.services.revocation import RevocationStore

LOGIN_FAILED = "Incorrect email or password"
#: Bounds the bcrypt work of one login without team_id (an email registered in many teams).
MAX_LOGIN_CANDIDATES = 10

#: bcrypt's lowest cost: a stored hash claiming less is no bcrypt hash of ours.
BCRYPT_MIN_ROUNDS = 4

#: Bound on revoke passes: each pass catches the successors of refreshes that raced the previous one.
REVOKE_PASSES = 10


class AmbiguousLogin(Unauthorized):
    """The credentials are right in several teams: the caller must pick one with team_id / client_id.

    Only reachable with a correct password, so listing those teams reveals nothing to a guesser.
    """

    def __init__(self, teams: list[Team]) -> None:
        super().__init__("These credentials match accounts in several teams; send team_id (client_id for /token)")
        self.teams = teams


@dataclass(frozen=True)
class SessionTokens:
    user: User
    access: IssuedToken
    refresh: IssuedToken | None


@lru_cache
def _dummy_hash(rounds: int) -> str:
    return hash_password_sync("no-such-user-dummy-password", rounds)


async def _verify_at_cost(password: str, password_hash: str, rounds: int) -> bool:
    """Check `password` against a stored hash with the bcrypt work of a hash at cost `rounds`, so that a failure
    costs what an unknown email costs (one dummy hash at BCRYPT_ROUNDS).

    A hash made at a lower cost (before BCRYPT_ROUNDS was raised; rehashed only at the user's next login) is
    checked in 2^-k of the time: a wrong password took ~10 ms where an unknown email took ~250 ms, which told
    anyone which emails have a dormant account. The difference is made up with dummy hashes at the costs
    c, c+1, ..., rounds-1, whose work adds up to exactly that of one hash at `rounds` minus one at c.
    """
    matched = await verify_password(password, password_hash)
    cost = hash_cost(password_hash)
    if cost is None or cost < BCRYPT_MIN_ROUNDS:
        await verify_password(password, await anyio.to_thread.run_sync(_dummy_hash, rounds))
        return matched
    for padding in range(cost, rounds):
        await verify_password(password, await anyio.to_thread.run_sync(_dummy_hash, padding))
    return matched


async def authenticate(
    *, session: AsyncSession, settings: Settings, email: str, password: str, team_id: uuid.UUID | None
) -> User:
    """The one active user these credentials name, or the generic 401.

    Every candidate's hash is checked (an unknown email checks a dummy hash), so a wrong password,
    an unknown email and an inactive user cost the same bcrypt work and give the same answer.
    """
    query = select(User).where(func.lower(User.email).in_(email_forms(email)))
    if team_id is not None:
        query = query.where(User.team_id == team_id)
    candidates = list((await session.execute(query.order_by(User.created_at).limit(MAX_LOGIN_CANDIDATES))).scalars())
    # End the read transaction: no pooled connection is held while bcrypt runs (~250 ms per hash).
    await session.commit()
    if not candidates:
        dummy = await anyio.to_thread.run_sync(_dummy_hash, settings.BCRYPT_ROUNDS)
        await verify_password(password, dummy)
        raise Unauthorized(LOGIN_FAILED)
    rounds = settings.BCRYPT_ROUNDS
    matches = [user for user in candidates if await _verify_at_cost(password, user.password_hash, rounds)]
    active = _one_per_team([user for user in matches if user.is_active], canonical_email(email))
    if not active:
        raise Unauthorized(LOGIN_FAILED)
    if len(active) > 1:
        teams = (await session.execute(select(Team).where(Team.id.in_([u.team_id for u in active])))).scalars()
        raise AmbiguousLogin(sorted(teams, key=lambda team: team.name))
    await _rehash_if_needed(session=session, settings=settings, user=active[0], password=password)
    return active[0]


def _one_per_team(users: list[User], typed: str) -> list[User]:
    """At most one user per team, so a team is never offered twice and team_id always settles a login.

    Two rows of one team can name one mailbox only if stored before domains were folded (`a@bücher.de` and
    `a@xn--bcher-kva.de`): the row spelled as typed wins, else the oldest (`users` come oldest first).
    """
    chosen: dict[uuid.UUID, User] = {}
    for user in sorted(users, key=lambda user: canonical_email(user.email) != typed):  # stable: oldest first
        chosen.setdefault(user.team_id, user)
    return list(chosen.values())


async def _rehash_if_needed(*, session: AsyncSession, settings: Settings, user: User, password: str) -> None:
    """A hash made at another cost than BCRYPT_ROUNDS is replaced, so a raised cost reaches existing users at
    their next login (the template's `verify_and_update`).

    Hashed in the bcrypt pool before any statement (no connection held meanwhile); the UPDATE opens the
    login's transaction, which `start_session` commits with `last_login_at`. It only replaces the hash just
    verified: a password changed while this login ran stays changed.
    """
    if not needs_rehash(user.password_hash, settings.BCRYPT_ROUNDS):
        return
    new_hash = await hash_password(password, settings.BCRYPT_ROUNDS)
    await session.execute(
        update(User)
        .where(User.id == user.id, User.password_hash == user.password_hash)
        .values(password_hash=new_hash)
        .execution_options(synchronize_session=False)
    )


async def start_session(
    *, session: AsyncSession, settings: Settings, user: User, with_refresh: bool = True
) -> SessionTokens:
    """Issue an access token and, for browser/API sessions, a refresh token opening a new family.

    The user's row is locked, and read again, first: a password change or a deactivation that committed while
    this login's bcrypt ran (`tokens_valid_after` moved) gives the generic 401; one that comes later waits for
    this commit, so its revocation covers these tokens too (`revoke_all_user_tokens`)."""
    locked = (
        await session.execute(
            select(User.is_active, User.tokens_valid_after)
            .where(User.id == user.id)
            .with_for_update(key_share=True)  # the UPDATE of last_login_at below takes this lock anyway
        )
    ).first()
    if locked is None or not locked.is_active or not same_instant(locked.tokens_valid_after, user.tokens_valid_after):
        await session.rollback()
        raise Unauthorized(LOGIN_FAILED)
    user.last_login_at = utcnow()
    if not with_refresh:
        access = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="access")
        await session.commit()
        return SessionTokens(user=user, access=access, refresh=None)
    tokens = _issue_pair(session=session, settings=settings, user=user, family_id=uuid.uuid4())
    await session.commit()
    return tokens


def _issue_pair(*, session: AsyncSession, settings: Settings, user: User, family_id: uuid.UUID) -> SessionTokens:
    extra = {"fam": family_id.hex}
    refresh = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="refresh", extra=extra)
    access = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="access", extra=extra)
    session.add(
        RefreshToken(
            user_id=user.id,
            family_id=family_id,
            token_hash=hash_refresh_token(refresh.token),
            expires_at=refresh.expires_at,
        )
    )
    return SessionTokens(user=user, access=access, refresh=refresh)


async def refresh_session(
    *, session: AsyncSession, settings: Settings, revocations: RevocationStore, token: str
) -> SessionTokens:
    """Spend the refresh token and issue a new pair in its family; a spent token revokes the family.

    A token spent less than REFRESH_REUSE_GRACE_SECONDS ago (two tabs refreshing at once) is answered
    with the very refresh token it was rotated into, plus a new access token: both callers keep a session
    on one chain. The chain never forks, so a thief replaying a token inside the window shares the
    victim's chain, and the next rotation by either side makes the other's token a detected reuse.
    """
    claims = decode_token(token, settings=settings, expected_type="refresh")
    # The user's row first (shared), then the token's: a password change or deactivation locks them in that
    # order too (`revoke_all_user_tokens`), so it either came first (this is a 401) or waits for this commit
    # and then revokes what it issues.
    user = await _session_user(session, claims)
    now = utcnow()
    token_hash = hash_refresh_token(token)
    live = (
        RefreshToken.token_hash == token_hash,
        RefreshToken.revoked_at.is_(None),
        RefreshToken.expires_at > now,
    )
    # Conditional UPDATEs: on PostgreSQL a concurrent refresh of the same token waits for the row lock,
    # then re-checks the WHERE against the committed row, so exactly one caller spends it.
    spent = (
        await session.execute(
            update(RefreshToken)
            .where(*live, RefreshToken.used_at.is_(None))
            .values(used_at=now)
            .returning(RefreshToken.id, RefreshToken.family_id)
        )
    ).first()
    if spent is not None:
        tokens = _issue_pair(session=session, settings=settings, user=user, family_id=spent.family_id)
        if settings.REFRESH_REUSE_GRACE_SECONDS > 0 and tokens.refresh is not None:
            successor = encrypt_text(tokens.refresh.token, settings.fernet)
            await session.execute(
                update(RefreshToken).where(RefreshToken.id == spent.id).values(successor_encrypted=successor)
            )
        await session.commit()
        return tokens
    if settings.REFRESH_REUSE_GRACE_SECONDS > 0:
        grace_start = now - timedelta(seconds=settings.REFRESH_REUSE_GRACE_SECONDS)
        # A no-op write, to take the same row lock (and see a concurrent revocation) before accepting.
        recent = (
            await session.execute(
                update(RefreshToken)
                .where(*live, RefreshToken.used_at > grace_start, RefreshToken.successor_encrypted.is_not(None))
                .values(used_at=RefreshToken.used_at)
                .returning(RefreshToken.family_id, RefreshToken.successor_encrypted)
            )
        ).first()
        if recent is not None and recent.successor_encrypted is not None:
            try:
                successor = decrypt_text(recent.successor_encrypted, settings.fernet)
            except DecryptionError:
                # Written by an instance with another ENCRYPTION_KEY (a key change under way): it cannot be handed
                # out, yet this is the benign race the window is for, so nothing is revoked; this tab signs in again.
                await session.rollback()
                raise Unauthorized(INVALID_TOKEN) from None
            return await _hand_out_successor(
                session=session, settings=settings, user=user, family_id=recent.family_id, successor=successor
            )
    spent_family = (
        await session.execute(
            select(RefreshToken.family_id).where(
                RefreshToken.token_hash == token_hash, RefreshToken.used_at.is_not(None)
            )
        )
    ).scalar()
    # The locks taken so far go first (the grace check's row, the user's): the revocation then takes the user's
    # row before the family's, like every other writer of tokens; holding a token first deadlocked a logout.
    await session.rollback()
    if spent_family is not None:
        # Reuse of a spent token: whoever holds the newer one may be a thief. End the whole family.
        await revoke_family(session=session, settings=settings, revocations=revocations, family_id=spent_family)
    raise Unauthorized(INVALID_TOKEN)


async def _session_user(session: AsyncSession, claims: dict[str, Any]) -> User:
    """The refresh token's user, still active, in its team, and not logged out everywhere since; its row stays
    share-locked until the refresh commits."""
    query = (
        select(User)
        .where(User.id == uuid.UUID(claims["sub"]))
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    )
    user = (await session.execute(query)).scalar_one_or_none()
    if (
        user is None
        or not user.is_active
        or str(user.team_id) != claims["team_id"]
        or issued_before(claims, user.tokens_valid_after)
    ):
        await session.rollback()
        raise Unauthorized(INVALID_TOKEN)
    return user


async def _hand_out_successor(
    *, session: AsyncSession, settings: Settings, user: User, family_id: uuid.UUID, successor: str
) -> SessionTokens:
    """The grace answer: the successor refresh token again (if it still lives) and a new access token."""
    alive = (
        await session.execute(
            select(RefreshToken.id).where(
                RefreshToken.token_hash == hash_refresh_token(successor),
                RefreshToken.revoked_at.is_(None),
                RefreshToken.expires_at > utcnow(),
            )
        )
    ).first()
    if alive is None:
        await session.rollback()
        raise Unauthorized(INVALID_TOKEN)
    successor_claims = decode_token(successor, settings=settings, expected_type="refresh")
    expires_at = datetime.fromtimestamp(int(successor_claims["exp"]), UTC)
    refresh = IssuedToken(
        token=successor,
        jti=str(successor_claims["jti"]),
        expires_at=expires_at,
        expires_in=max(0, int((expires_at - utcnow()).total_seconds())),
    )
    access = create_token(
        settings=settings, user_id=user.id, team_id=user.team_id, token_type="access", extra={"fam": family_id.hex}
    )
    await session.commit()
    return SessionTokens(user=user, access=access, refresh=refresh)


async def revoke_family(
    *, session: AsyncSession, settings: Settings, revocations: RevocationStore, family_id: uuid.UUID
) -> None:
    """Revoke every refresh token of the family and, through the store, the access tokens it issued.

    The family's user's row is locked first, as every other writer of a user's tokens does (a login, a refresh,
    a password change, a deactivation): they queue on it instead of locking token rows in different orders
    (a refresh's successor, committed meanwhile, was locked out of order and a logout deadlocked)."""
    owner = (
        await session.execute(select(RefreshToken.user_id).where(RefreshToken.family_id == family_id).limit(1))
    ).scalar()
    if owner is not None:
        await session.execute(select(User.id).where(User.id == owner).with_for_update(key_share=True))
    await _revoke_settled(session, RefreshToken.family_id == family_id)
    await session.commit()
    # Access tokens of this family live at most one access lifetime from now.
    until = utcnow() + timedelta(minutes=settings.ACCESS_TOKEN_EXPIRE_MINUTES)
    await revocations.revoke(family_key(family_id.hex), until)


async def _revoke_settled(session: AsyncSession, which: ColumnElement[bool]) -> None:
    """Revoke the matching refresh tokens, again until none is left unrevoked.

    A refresh racing this holds its spent token's row lock, so the first UPDATE waits for it; but that
    UPDATE's snapshot predates the successor the refresh inserted. Each repeat is a new statement with a
    new snapshot (READ COMMITTED), which sees and revokes it; the loop ends when a pass finds nothing.
    """
    for _ in range(REVOKE_PASSES):
        # Rows locked in one order (by id) before the UPDATE, whose own order is the plan's: a logout and a
        # deactivation revoking overlapping sets deadlocked.
        await session.execute(
            select(RefreshToken.id)
            .where(which, RefreshToken.revoked_at.is_(None))
            .order_by(RefreshToken.id)
            .with_for_update()
        )
        result = await session.execute(
            update(RefreshToken).where(which, RefreshToken.revoked_at.is_(None)).values(revoked_at=utcnow())
        )
        if not getattr(result, "rowcount", 0):
            return


def _claims_or_none(token: str | None, *, settings: Settings, expected: Any) -> dict[str, Any] | None:
    if not token:
        return None
    try:
        return decode_token(token, settings=settings, expected_type=expected)
    except Unauthorized:
        return None


async def logout(
    *,
    session: AsyncSession,
    settings: Settings,
    revocations: RevocationStore,
    access_token: str | None,
    refresh_token: str | None,
) -> None:
    """Revoke the presented access token (by jti, until it expires) and the refresh families presented.

    Invalid or expired tokens are ignored: logging out always succeeds and always clears the cookies.
    """
    families: set[str] = set()
    access = _claims_or_none(access_token, settings=settings, expected="access")
    if access is not None:
        expires_at = utcnow() + timedelta(seconds=max(0, int(access["exp"]) - int(utcnow().timestamp())))
        await revocations.revoke(str(access["jti"]), expires_at)
        if isinstance(access.get("fam"), str):
            families.add(access["fam"])
    refresh = _claims_or_none(refresh_token, settings=settings, expected="refresh")
    if refresh is not None and isinstance(refresh.get("fam"), str):
        families.add(refresh["fam"])
    for family in families:
        try:
            family_id = uuid.UUID(family)
        except ValueError:
            continue
        await revoke_family(session=session, settings=settings, revocations=revocations, family_id=family_id)


async def revoke_all_user_tokens(*, session: AsyncSession, user: User) -> None:
    """Password change or deactivation: every token issued until now stops working (caller commits).

    Access tokens are refused by `tokens_valid_after` (compared at microsecond precision), refresh
    tokens by their `revoked_at`. The user's row is locked before the instant is taken: a login or refresh
    that holds it (`start_session`, `_session_user`) commits first, and its tokens are then older than the
    instant and its refresh token is among those revoked.
    """
    await session.execute(select(User.id).where(User.id == user.id).with_for_update(key_share=True))
    user.tokens_valid_after = utcnow()
    await _revoke_settled(session, RefreshToken.user_id == user.id)
