"""Passwords, JWTs and the `CurrentUser` / `AdminUser` dependencies."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import bcrypt
import jwt
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy import Row, Select, bindparam, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import AutocommitSessionDep, SessionDep, execute_core, utcnow
from app.errors import Forbidden, Unauthorized
from app.models import RevokedToken, User

T = TypeVar("T")
TokenType = Literal["access", "refresh"]
REQUIRED_CLAIMS = ["sub", "team_id", "type", "jti", "iat", "exp", "iss", "aud"]
INVALID_TOKEN = "Could not validate credentials"

# Documents the Bearer scheme for Swagger's Authorize button; we read the header ourselves.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/auth/token", auto_error=False)


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


# --- passwords -------------------------------------------------------------------------------


def _prehash(password: str) -> bytes:
    """SHA-256 then base64 before bcrypt, so long passwords are neither truncated at 72 bytes nor rejected."""
    return base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())


def hash_password_sync(password: str, rounds: int) -> str:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds=rounds)).decode()


#: bcrypt threads per process: all cores but one, so a login burst never takes the core the event loop
#: (and every open stream) runs on. bcrypt releases the GIL; the contention is for CPU, not the lock.
BCRYPT_THREADS = max(1, (os.cpu_count() or 2) - 1)
#: ...and they run 10 nice levels below the event loop, so when the machine is busy anyway (a small box
#: shared with PostgreSQL, n8n or a load generator) the scheduler still gives the event loop the CPU first.
BCRYPT_NICE = 10


def _lower_thread_priority() -> None:
    # On Linux a thread id is a valid PRIO_PROCESS target and changes only that thread; elsewhere no-op.
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + BCRYPT_NICE))


_bcrypt_pool = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="bcrypt", initializer=_lower_thread_priority)


async def _in_bcrypt_thread(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_bcrypt_pool, function, *args)


async def hash_password(password: str, rounds: int) -> str:
    """bcrypt runs in a worker thread: at cost 12 it takes ~250 ms, which must not block the event loop."""
    return await _in_bcrypt_thread(hash_password_sync, password, rounds)


def verify_password_sync(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(_prehash(password), password_hash.encode())
    except ValueError:
        return False


async def verify_password(password: str, password_hash: str) -> bool:
    return await _in_bcrypt_thread(verify_password_sync, password, password_hash)


# --- tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: datetime
    expires_in: int


def create_token(
    *,
    settings: Settings,
    user_id: uuid.UUID,
    team_id: uuid.UUID,
    token_type: TokenType,
    extra: dict[str, Any] | None = None,
) -> IssuedToken:
    now = utcnow()
    lifetime = (
        timedelta(minutes=settings.ACCESS_TOKEN_EXPIRE_MINUTES)
        if token_type == "access"
        else timedelta(days=settings.REFRESH_TOKEN_EXPIRE_DAYS)
    )
    jti = uuid.uuid4().hex
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "team_id": str(team_id),
        "type": token_type,
        "jti": jti,
        "iat": int(now.timestamp()),
        # `iat` has whole seconds; revocation by `tokens_valid_after` needs finer grain (see token_issued_us).
        "iat_us": _epoch_us(now),
        "exp": int((now + lifetime).timestamp()),
        "iss": settings.JWT_ISSUER,
        "aud": settings.JWT_AUDIENCE,
        **(extra or {}),
    }
    token = jwt.encode(claims, settings.JWT_SECRET, algorithm=settings.JWT_ALGORITHM)
    return IssuedToken(token=token, jti=jti, expires_at=now + lifetime, expires_in=int(lifetime.total_seconds()))


def decode_token(token: str, *, settings: Settings, expected_type: TokenType) -> dict[str, Any]:
    """Verify signature, algorithm (pinned), issuer, audience, expiry, required claims and type."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.JWT_SECRET,
            algorithms=[settings.JWT_ALGORITHM],
            audience=settings.JWT_AUDIENCE,
            issuer=settings.JWT_ISSUER,
            options={"require": REQUIRED_CLAIMS},
        )
        if claims.get("type") != expected_type:
            raise Unauthorized(INVALID_TOKEN)
        uuid.UUID(str(claims["sub"]))
        uuid.UUID(str(claims["team_id"]))
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise Unauthorized(INVALID_TOKEN) from exc
    return claims


def token_issued_us(claims: dict[str, Any]) -> int:
    """Issue instant in microseconds; a token without `iat_us` counts as issued at the start of its second."""
    value = claims.get("iat_us")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(claims["iat"]) * 1_000_000


def issued_before(claims: dict[str, Any], instant: datetime | None) -> bool:
    """True when the token predates `instant` (a user's `tokens_valid_after`), at microsecond precision."""
    if instant is None:
        return False
    return token_issued_us(claims) < _epoch_us(instant)


def _epoch_us(instant: datetime) -> int:
    delta = instant - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def token_from_request(request: Request) -> str | None:
    """The Bearer header wins over the cookie; a token in the query string is never read."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.cookies.get("access_token") or None


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def check_cookie_origin(request: Request, settings: Settings) -> None:
    """CSRF defence in depth for cookie-authenticated writes (next to SameSite=Strict).

    An unsafe method whose `Origin` is neither an allowed CORS origin nor this server's own host is refused.
    No `Origin` at all is allowed: curl and other non-browser clients send none, and browsers always send
    one on cross-origin writes.
    """
    if request.method not in UNSAFE_METHODS:
        return
    origin = request.headers.get("origin")
    if origin is None:
        return
    if origin.rstrip("/").lower() in {allowed.rstrip("/").lower() for allowed in settings.CORS_ORIGINS}:
        return
    host = request.headers.get("host", "").lower()
    if host and urlsplit(origin).netloc.lower() == host:
        return
    raise Forbidden("Origin not allowed")


class RevocationStore(Protocol):
    """What `app.state.revocations` provides (see app/services/revocation.py).

    `in_database`: revocations are rows in this database, so `current_user` checks them in its own query.
    """

    in_database: bool

    async def is_revoked(self, jti: str) -> bool: ...

    async def is_any_revoked(self, ids: list[str]) -> bool: ...

    async def revoke(self, jti: str, expires_at: datetime) -> None: ...


#: Is any of `:ids` revoked and not expired at `:now`? Built once: building the `IN` clause per request
#: showed up in the profile. `current_user` folds it into the user's SELECT (one round trip).
REVOKED = (
    select(RevokedToken.jti)
    .where(RevokedToken.jti.in_(bindparam("ids", expanding=True)), RevokedToken.expires_at > bindparam("now"))
    .exists()
)


def revoked_params(ids: list[str]) -> dict[str, Any]:
    return {"ids": ids, "now": utcnow()}


def _account_query(*columns: Any, revocation_in_query: bool) -> Select[Any]:
    """The token's user, and whether any of its ids is revoked as the last column (the `REVOKED` check
    with the database store, one round trip; a constant false when revocations are checked elsewhere)."""
    return select(*columns, REVOKED if revocation_in_query else literal(False)).where(User.id == bindparam("uid"))


#: By `revocation_in_query`: the ORM user (`current_user`) and plain columns (`current_caller`).
_USER: dict[bool, Select[Any]] = {
    flag: _account_query(User, revocation_in_query=flag).execution_options(populate_existing=True)
    for flag in (True, False)
}
_CALLER: dict[bool, Select[Any]] = {
    flag: _account_query(User.id, User.team_id, User.is_active, User.tokens_valid_after, revocation_in_query=flag)
    for flag in (True, False)
}


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller as the send path needs it: ids only.

    FastAPI keeps resolved dependencies until the response ends, so an ORM `User` (and its session) would
    live as long as the stream; this costs a few KB per open stream less (docs/PERFORMANCE.md).
    """

    id: uuid.UUID
    team_id: uuid.UUID


def family_key(family_id: str) -> str:
    """Revocation-store key of a refresh family: revoking it also kills the family's access tokens."""
    return f"fam:{family_id}"


def access_claims(request: Request, settings: Settings) -> dict[str, Any]:
    """The verified claims of the request's access token (Bearer header, else cookie)."""
    token = token_from_request(request)
    if not token:
        raise Unauthorized()
    if "authorization" not in request.headers:
        check_cookie_origin(request, settings)
    claims = decode_token(token, settings=settings, expected_type="access")
    return claims


async def _account_row(request: Request, session: AsyncSession, claims: dict[str, Any], *, orm: bool) -> Row[Any]:
    """The token's user row with the revocation verdict as its last column (folded into the same SELECT
    with the database store); a missing user or a revoked token or family is a 401."""
    ids = [claims["jti"]]
    if isinstance(claims.get("fam"), str):
        ids.append(family_key(claims["fam"]))
    revocations: RevocationStore | None = getattr(request.app.state, "revocations", None)
    params: dict[str, Any] = {"uid": uuid.UUID(claims["sub"])}
    in_query = revocations is not None and revocations.in_database
    if in_query:
        params.update(revoked_params(ids))
    elif revocations is not None and await revocations.is_any_revoked(ids):
        raise Unauthorized(INVALID_TOKEN)
    query = (_USER if orm else _CALLER)[in_query]
    row: Row[Any] | None
    if orm:
        row = (await session.execute(query, params)).first()
    else:
        row = (await execute_core(session, query, params)).first()
    if row is None or row[-1]:
        raise Unauthorized(INVALID_TOKEN)
    return row


def _check_account(
    claims: dict[str, Any], *, is_active: bool, team_id: uuid.UUID, tokens_valid_after: datetime | None
) -> None:
    if not is_active or str(team_id) != claims["team_id"] or issued_before(claims, tokens_valid_after):
        raise Unauthorized(INVALID_TOKEN)


async def current_user(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _bearer: Annotated[str | None, Depends(oauth2_scheme)] = None,
) -> User:
    """The user of the access token, re-checked against the database each time, in the request's session
    (so services can change it and commit).

    A deactivated user, a revoked token or family, or a token older than the user's `tokens_valid_after`
    is refused at once; roles are read fresh, so a demoted admin loses admin access on the next request.
    """
    claims = access_claims(request, settings)
    user: User = (await _account_row(request, session, claims, orm=True))[0]
    _check_account(claims, is_active=user.is_active, team_id=user.team_id, tokens_valid_after=user.tokens_valid_after)
    return user


async def current_caller(
    request: Request,
    session: AutocommitSessionDep,
    settings: SettingsDep,
    _bearer: Annotated[str | None, Depends(oauth2_scheme)] = None,
) -> Caller:
    """`current_user`'s checks, for the send route: its own transaction-less session, ids only."""
    claims = access_claims(request, settings)
    row = await _account_row(request, session, claims, orm=False)
    _check_account(claims, is_active=row.is_active, team_id=row.team_id, tokens_valid_after=row.tokens_valid_after)
    return Caller(id=row.id, team_id=row.team_id)


CurrentUser = Annotated[User, Depends(current_user)]
CurrentCaller = Annotated[Caller, Depends(current_caller)]


async def admin_user(user: CurrentUser) -> User:
    if user.role != "admin":
        raise Forbidden("Admin role required")
    return user


AdminUser = Annotated[User, Depends(admin_user)]
