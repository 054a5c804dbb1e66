"""Auth endpoints: register, login (JSON and OAuth2 form), refresh, logout, me, password change."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordRequestForm

from app.auth import CurrentUser, authenticated_by_cookie, check_cookie_origin, token_from_request
from app.config import Settings
from app.deps import RevocationsDep, SessionDep, SettingsDep
from app.errors import Unauthorized, Unprocessable
from app.fields import EMAIL_LENGTH_NOTE, EMAIL_MAX_LENGTH, PASSWORD_MAX_LENGTH, email_too_long
from app.middleware import AUTH_PATH
from app.ratelimit import rate_limit
from app.routers.responses import R401, R401_LOGIN, R403_ORIGIN, R429, error_doc, error_examples
from app.schemas import (
    AmbiguousLoginRead,
    LoginRead,
    LoginRequest,
    MeUpdate,
    PasswordChange,
    RefreshRead,
    RefreshRequest,
    RegisterRequest,
    TeamChoice,
    TokenRead,
    UserRead,
)
from app.services import auth as auth_service
from app.services import invites as invites_service
from app.services import users as users_service
from app.services.auth import AmbiguousLogin, SessionTokens

ACCESS_COOKIE = "access_token"
REFRESH_COOKIE = "refresh_token"
CLOSED = "Registration is closed for this team"


# Every answer here, errors included, gets `Cache-Control: no-store` from the middleware (app.middleware).
router = APIRouter(prefix=AUTH_PATH, tags=["auth"])


def _cookie_flags(settings: Settings) -> dict[str, Any]:
    return {
        "httponly": True,
        "secure": settings.COOKIE_SECURE,
        "samesite": settings.COOKIE_SAMESITE,
        "domain": settings.COOKIE_DOMAIN,
    }


def set_session_cookies(response: Response, settings: Settings, tokens: SessionTokens) -> None:
    common = _cookie_flags(settings)
    response.set_cookie(ACCESS_COOKIE, tokens.access.token, max_age=tokens.access.expires_in, path="/", **common)
    if tokens.refresh is not None:
        response.set_cookie(
            REFRESH_COOKIE, tokens.refresh.token, max_age=tokens.refresh.expires_in, path=AUTH_PATH, **common
        )


def clear_session_cookies(response: Response, settings: Settings) -> None:
    common = _cookie_flags(settings)
    response.delete_cookie(ACCESS_COOKIE, path="/", **common)
    response.delete_cookie(REFRESH_COOKIE, path=AUTH_PATH, **common)


def _ambiguous(exc: AmbiguousLogin) -> JSONResponse:
    body = AmbiguousLoginRead(
        detail=exc.detail, teams=[TeamChoice(id=t.id, name=t.name, slug=t.slug) for t in exc.teams]
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=401, headers=exc.headers)


def _login_read(tokens: SessionTokens) -> LoginRead:
    assert tokens.refresh is not None
    return LoginRead(
        user=UserRead.model_validate(tokens.user),
        access_token=tokens.access.token,
        expires_in=tokens.access.expires_in,
        refresh_token=tokens.refresh.token,
    )


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=UserRead,
    summary="Register into a team: by invite (the invite's role) or by team id (role user, open teams only)",
    dependencies=[Depends(rate_limit("register"))],
    responses={
        403: error_doc("team_id given and the team's open_registration setting is off", CLOSED),
        404: error_examples(
            "No team with this id, or an invite token that is unknown, used up, expired, revoked "
            "or bound to another email (one answer for all; the invite is not used up)",
            {"team": {"detail": "Team not found"}, "invite": {"detail": invites_service.INVITE_NOT_FOUND}},
        ),
        409: error_doc("Email already registered in this team (an invite is not used up)", users_service.EMAIL_TAKEN),
        **R429,
    },
)
async def register(body: RegisterRequest, session: SessionDep, settings: SettingsDep) -> UserRead:
    """Send exactly one of `team_id` and `invite_token` (both or neither is a 422). Unknown fields are a 422
    too: role, team membership and activation are not for the caller to choose."""
    if body.invite_token is not None:
        user = await invites_service.register_with_invite(
            session=session,
            settings=settings,
            token=body.invite_token,
            email=body.email,
            password=body.password,
            full_name=body.full_name,
        )
        return UserRead.model_validate(user)
    assert body.team_id is not None  # the schema requires exactly one of the two
    user = await users_service.register(
        session=session,
        settings=settings,
        team_id=body.team_id,
        email=body.email,
        password=body.password,
        full_name=body.full_name,
    )
    return UserRead.model_validate(user)


@router.post(
    "/login",
    response_model=LoginRead,
    summary="Log in with email and password; sets the access and refresh cookies",
    dependencies=[Depends(rate_limit("login"))],
    responses={**R401_LOGIN, **R429},
)
async def login(
    body: LoginRequest, response: Response, session: SessionDep, settings: SettingsDep
) -> LoginRead | JSONResponse:
    try:
        user = await auth_service.authenticate(
            session=session, settings=settings, email=body.email, password=body.password, team_id=body.team_id
        )
    except AmbiguousLogin as exc:
        return _ambiguous(exc)
    tokens = await auth_service.start_session(session=session, settings=settings, user=user)
    set_session_cookies(response, settings, tokens)
    return _login_read(tokens)


def _client_id_from_basic(request: Request) -> str | None:
    """Swagger UI may send client_id as HTTP Basic credentials ("Authorization header" location)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


class TokenForm(OAuth2PasswordRequestForm):
    """OAuth2's password form, its schema stating the limits `token` enforces (422 past them)."""

    def __init__(
        self,
        *,
        grant_type: Annotated[str | None, Form(pattern="^password$")] = None,
        username: Annotated[
            str, Form(description=f"Your email. {EMAIL_LENGTH_NOTE}", json_schema_extra={"maxLength": EMAIL_MAX_LENGTH})
        ],
        password: Annotated[str, Form(json_schema_extra={"format": "password", "maxLength": PASSWORD_MAX_LENGTH})],
        scope: Annotated[str, Form()] = "",
        client_id: Annotated[str | None, Form(description="Your team id, when your email is in several teams")] = None,
        client_secret: Annotated[str | None, Form(json_schema_extra={"format": "password"})] = None,
    ) -> None:
        super().__init__(
            grant_type=grant_type,
            username=username,
            password=password,
            scope=scope,
            client_id=client_id,
            client_secret=client_secret,
        )


@router.post(
    "/token",
    response_model=TokenRead,
    summary="OAuth2 password flow (Swagger UI's Authorize button): username = email, client_id = team id",
    dependencies=[Depends(rate_limit("login"))],
    responses={**R401_LOGIN, **R429},
)
async def token(
    form: Annotated[TokenForm, Depends()],
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
) -> TokenRead | JSONResponse:
    """Returns an access token only (no cookies, no refresh token): for Swagger and scripts."""
    if len(form.password) > PASSWORD_MAX_LENGTH or email_too_long(form.username):
        raise Unprocessable("username or password too long")
    if "\x00" in f"{form.username}{form.password}{form.client_id or ''}":
        raise Unprocessable("username, password and client_id must not contain NUL characters")
    client_id = form.client_id or _client_id_from_basic(request)
    team_id: uuid.UUID | None = None
    if client_id:
        try:
            team_id = uuid.UUID(client_id)
        except ValueError:
            # Not a team id: no user can match, but do the same bcrypt work as any failure.
            team_id = uuid.UUID(int=0)
    try:
        user = await auth_service.authenticate(
            session=session, settings=settings, email=form.username, password=form.password, team_id=team_id
        )
    except AmbiguousLogin as exc:
        return _ambiguous(exc)
    tokens = await auth_service.start_session(session=session, settings=settings, user=user, with_refresh=False)
    return TokenRead(access_token=tokens.access.token)


@router.post(
    "/refresh",
    response_model=RefreshRead,
    summary="Rotate the refresh token (cookie or JSON body) and get a new access token",
    responses={
        401: error_doc(
            "Missing, invalid, expired, revoked or already used refresh token", "Could not validate credentials"
        ),
        **R403_ORIGIN,
    },
)
async def refresh(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    revocations: RevocationsDep,
    body: RefreshRequest | None = None,
) -> RefreshRead:
    """A refresh token works once. Presenting a used one revokes its whole family (every device's copy)."""
    presented = body.refresh_token if body is not None and body.refresh_token else None
    from_body = presented is not None
    if presented is None:
        presented = request.cookies.get(REFRESH_COOKIE)
        if presented:
            check_cookie_origin(request, settings)
    if not presented:
        raise Unauthorized()
    tokens = await auth_service.refresh_session(
        session=session, settings=settings, revocations=revocations, token=presented
    )
    set_session_cookies(response, settings, tokens)
    assert tokens.refresh is not None
    # A browser refreshing by cookie never sees the new refresh token in the body: script (or an XSS) cannot
    # read what stays in the httpOnly cookie. Callers that sent it in the body get the rotated one back.
    return RefreshRead(
        access_token=tokens.access.token,
        expires_in=tokens.access.expires_in,
        refresh_token=tokens.refresh.token if from_body else None,
    )


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,  # a 204 has no body, so no Content-Type either
    summary="Revoke the presented access and refresh tokens and clear both cookies",
    responses={**R403_ORIGIN},
)
async def logout(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    revocations: RevocationsDep,
    body: RefreshRequest | None = None,
) -> None:
    """Always 204, also with expired or no tokens, so a client can always get back to a clean state."""
    refresh_token = body.refresh_token if body is not None and body.refresh_token else None
    # Checked whenever a cookie is what gets revoked: the access cookie (no Bearer header) or the refresh cookie.
    uses_access_cookie = authenticated_by_cookie(request) and request.cookies.get(ACCESS_COOKIE)
    if uses_access_cookie or (refresh_token is None and request.cookies.get(REFRESH_COOKIE)):
        check_cookie_origin(request, settings)
    await auth_service.logout(
        session=session,
        settings=settings,
        revocations=revocations,
        access_token=token_from_request(request),
        refresh_token=refresh_token or request.cookies.get(REFRESH_COOKIE),
    )
    clear_session_cookies(response, settings)


@router.get("/me", response_model=UserRead, summary="The current user", responses={**R401})
async def me(user: CurrentUser) -> UserRead:
    return UserRead.model_validate(user)


@router.patch(
    "/me",
    response_model=UserRead,
    summary="Change your own name or preferences",
    responses={**R401, **R403_ORIGIN},
)
async def update_me(body: MeUpdate, user: CurrentUser, session: SessionDep) -> UserRead:
    """Only full_name and preferences: role, team_id, is_active or email are refused (422)."""
    updated = await users_service.update_me(session=session, user=user, changes=body.model_dump(exclude_unset=True))
    return UserRead.model_validate(updated)


@router.post(
    "/password",
    response_model=LoginRead,
    summary="Change your password; every other session ends, this one gets fresh tokens",
    dependencies=[Depends(rate_limit("login"))],
    responses={
        400: error_doc("The current password is wrong", "Current password is incorrect"),
        **R401,
        **R403_ORIGIN,
        **R429,
    },
)
async def change_password(
    body: PasswordChange, user: CurrentUser, response: Response, session: SessionDep, settings: SettingsDep
) -> LoginRead:
    updated = await users_service.change_password(
        session=session,
        settings=settings,
        user=user,
        current_password=body.current_password,
        new_password=body.new_password,
    )
    tokens = await auth_service.start_session(session=session, settings=settings, user=updated)
    set_session_cookies(response, settings, tokens)
    return _login_read(tokens)
