"""Request authentication: the token from header or cookie, and the `CurrentUser` / `CurrentCaller` /
`AdminUser` dependencies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy import Row, Select, bindparam, event, literal, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from app.config import Settings
from app.db import execute_core, utcnow
from app.deps import RevocationsDep, SessionDep, SettingsDep, ShortSessionDep
from app.errors import ADMIN_REQUIRED, Forbidden, Unauthorized
from app.models import User
from app.security import INVALID_TOKEN, Caller, decode_token, family_key, is_api_key, issued_before
from app.services import api_keys as api_keys_service
from app.services.revocation import REVOKED, RevocationStore, revoked_params
from app.state import app_state

KEY_CANNOT_MANAGE_KEYS = "An API key cannot manage API keys; sign in"

# Documents the Bearer scheme for Swagger's Authorize button; we read the header ourselves.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/auth/token", auto_error=False)


def api_key_from_request(request: Request) -> str | None:
    """An API key is only ever read from the Bearer header (never a cookie, never the query string)."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and is_api_key(value.strip()):
            return value.strip()
    return None


def authenticated_by_key(request: Request) -> bool:
    """True once the request's caller was found by an API key (set by `_key_account`)."""
    return getattr(request.state, "api_key_id", None) is not None


def token_from_request(request: Request) -> str | None:
    """The Bearer header wins over the cookie; a token in the query string is never read."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.cookies.get("access_token") or None


def authenticated_by_cookie(request: Request) -> bool:
    """True when `token_from_request` reads the cookie: no `Authorization` header, or an empty one (which is
    no credential, so the cookie is read; a check keyed on the header's mere presence skipped the Origin
    check for such a cookie-authenticated write)."""
    return not request.headers.get("authorization")


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
    if host and _netloc(origin) == host:
        return
    raise Forbidden("Origin not allowed")


def _netloc(origin: str) -> str | None:
    """The host[:port] of an `Origin` value; None when it is no URL at all (`http://[::1` made urlsplit raise,
    a 500 instead of the 403 any other foreign origin gets)."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return None


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


def access_claims(request: Request, settings: Settings) -> dict[str, Any]:
    """The verified claims of the request's access token (Bearer header, else cookie)."""
    token = token_from_request(request)
    if not token:
        raise Unauthorized()
    if authenticated_by_cookie(request):
        check_cookie_origin(request, settings)
    claims = decode_token(token, settings=settings, expected_type="access")
    return claims


async def _account_row(
    revocations: RevocationStore, session: AsyncSession, claims: dict[str, Any], *, orm: bool
) -> Row[Any]:
    """The token's user row with the revocation verdict as its last column (folded into the same SELECT
    with the database store); a missing user or a revoked token or family is a 401."""
    ids = [claims["jti"]]
    if isinstance(claims.get("fam"), str):
        ids.append(family_key(claims["fam"]))
    params: dict[str, Any] = {"uid": uuid.UUID(claims["sub"])}
    in_query = revocations.in_database
    if in_query:
        params.update(revoked_params(ids))
    elif await revocations.is_any_revoked(ids):
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


async def _key_account(request: Request, session: AsyncSession, settings: Settings, key: str, *, orm: bool) -> Row[Any]:
    """The account of an API key. Failed attempts count against the client's login-rate limit, which is
    checked before the lookup, so a refused client cannot tell a right key from a wrong one."""
    state = app_state(request.app)
    await state.limiter.check("api_key", request)
    row = await api_keys_service.key_account(session, settings, key, orm=orm)
    if row is None:
        await state.limiter.hit("api_key", request)
        raise Unauthorized(INVALID_TOKEN)
    request.state.api_key_id = row.key_id
    now = utcnow()
    if api_keys_service.needs_touch(row.key_last_used_at, now):
        # In the request's session, committed at once (its lookup ended with it; nothing is held for the rest
        # of the request). Not a session of its own: that took a second connection while this one held the
        # first, and a pool full of such lookups (parallel requests on a key's first use in a minute) waited
        # for a second one until the pool timed out.
        await api_keys_service.touch(session, row.key_id, now)
    return row


def _check_account(
    claims: dict[str, Any], *, is_active: bool, team_id: uuid.UUID, tokens_valid_after: datetime | None
) -> None:
    if not is_active or str(team_id) != claims["team_id"] or issued_before(claims, tokens_valid_after):
        raise Unauthorized(INVALID_TOKEN)


#: Set on a `User` loaded for an API key (an attribute of the object, not a column: a reload keeps it).
_KEY_USER = "_acts_for_api_key"


def act_as_key_user(user: User) -> None:
    """The role `user` for an API key's user, set without marking it changed (nothing writes it), and kept
    through any reload of the object in the request (a rollback's expiry then a `refresh`, a query with
    `populate_existing`): a check of the role after one would otherwise see the stored role, an admin's."""
    setattr(user, _KEY_USER, True)
    set_committed_value(user, "role", "user")


@event.listens_for(User, "refresh")
def _keep_key_role(user: User, _context: object, _attrs: object) -> None:
    if getattr(user, _KEY_USER, False):
        set_committed_value(user, "role", "user")


async def current_user(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    revocations: RevocationsDep,
    _bearer: Annotated[str | None, Depends(oauth2_scheme)] = None,
) -> User:
    """The user of the access token, re-checked against the database each time, in the request's session
    (so services can change it and commit).

    A deactivated user, a revoked token or family, or a token older than the user's `tokens_valid_after`
    is refused at once; roles are read fresh, so a demoted admin loses admin access on the next request.

    An API key (`Authorization: Bearer n8nr_...`) authenticates as its user with the role `user`, whatever
    the stored role (`act_as_key_user`): nothing writes it, and no reload of the object in the request undoes it.
    """
    key = api_key_from_request(request)
    if key is not None:
        user: User = (await _key_account(request, session, settings, key, orm=True))[0]
        act_as_key_user(user)
        return user
    claims = access_claims(request, settings)
    user = (await _account_row(revocations, session, claims, orm=True))[0]
    _check_account(claims, is_active=user.is_active, team_id=user.team_id, tokens_valid_after=user.tokens_valid_after)
    return user


async def current_caller(
    request: Request,
    session: ShortSessionDep,
    settings: SettingsDep,
    revocations: RevocationsDep,
    _bearer: Annotated[str | None, Depends(oauth2_scheme)] = None,
) -> Caller:
    """`current_user`'s checks, for the send route: its own short session (closed when the endpoint
    returns, before the stream), ids only."""
    key = api_key_from_request(request)
    if key is not None:
        key_row = await _key_account(request, session, settings, key, orm=False)
        return Caller(id=key_row.id, team_id=key_row.team_id)
    claims = access_claims(request, settings)
    row = await _account_row(revocations, session, claims, orm=False)
    _check_account(claims, is_active=row.is_active, team_id=row.team_id, tokens_valid_after=row.tokens_valid_after)
    return Caller(id=row.id, team_id=row.team_id)


async def send_credentials(request: Request) -> dict[str, Any] | Caller:
    """The send route's authentication, resolved before its body and headers are validated (so 401 and 403 come
    before any 422, as on every route), at no database cost for a token: an access token's verified claims
    (the database checks run in the send's own statement, app.services.fast_start, or in `current_caller` on
    the general path), or the `Caller` of an API key, checked here."""
    state = app_state(request.app)
    if api_key_from_request(request) is not None:
        async with state.db.sessionmaker() as session:
            return await current_caller(request, session, state.settings, state.revocations)
    return access_claims(request, state.settings)


CurrentUser = Annotated[User, Depends(current_user)]
CurrentCaller = Annotated[Caller, Depends(current_caller)]


async def admin_user(user: CurrentUser) -> User:
    if user.role != "admin":
        raise Forbidden(ADMIN_REQUIRED)
    return user


AdminUser = Annotated[User, Depends(admin_user)]


async def session_user(request: Request, user: CurrentUser) -> User:
    """The user of a signed-in session (cookie or JWT), not of an API key: a key cannot make or revoke keys."""
    if authenticated_by_key(request):
        raise Forbidden(KEY_CANNOT_MANAGE_KEYS)
    return user


SessionUser = Annotated[User, Depends(session_user)]
