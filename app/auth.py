"""Request authentication: the token from header or cookie, and the `CurrentUser` / `CurrentCaller` /
`AdminUser` dependencies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy import Row, Select, bindparam, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import execute_core
from app.deps import RevocationsDep, SessionDep, SettingsDep, ShortSessionDep
from app.errors import Forbidden, Unauthorized
from app.models import User
from app.security import INVALID_TOKEN, Caller, decode_token, family_key, issued_before
from app.services.revocation import REVOKED, RevocationStore, revoked_params

# Documents the Bearer scheme for Swagger's Authorize button; we read the header ourselves.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/auth/token", auto_error=False)


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
    if "authorization" not in request.headers:
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


def _check_account(
    claims: dict[str, Any], *, is_active: bool, team_id: uuid.UUID, tokens_valid_after: datetime | None
) -> None:
    if not is_active or str(team_id) != claims["team_id"] or issued_before(claims, tokens_valid_after):
        raise Unauthorized(INVALID_TOKEN)


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
    """
    claims = access_claims(request, settings)
    user: User = (await _account_row(revocations, session, claims, orm=True))[0]
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
    claims = access_claims(request, settings)
    row = await _account_row(revocations, session, claims, orm=False)
    _check_account(claims, is_active=row.is_active, team_id=row.team_id, tokens_valid_after=row.tokens_valid_after)
    return Caller(id=row.id, team_id=row.team_id)


CurrentUser = Annotated[User, Depends(current_user)]
CurrentCaller = Annotated[Caller, Depends(current_caller)]


async def admin_user(user: CurrentUser) -> User:
    if user.role != "admin":
        raise Forbidden("Admin role required")
    return user


AdminUser = Annotated[User, Depends(admin_user)]
