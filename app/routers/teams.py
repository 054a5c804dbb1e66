"""Team sign-up and the caller's own team."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from app.auth import AdminUser, CurrentUser
from app.deps import SessionDep, SettingsDep
from app.errors import Forbidden
from app.ratelimit import rate_limit
from app.routers.responses import R401, R403_ADMIN, R429, error_doc, total_count
from app.schemas import (
    InviteCreate,
    InviteCreatedRead,
    InviteRead,
    TeamCreate,
    TeamRead,
    TeamSignupRead,
    TeamUpdate,
    UserRead,
)
from app.services import invites as invites_service
from app.services import teams as teams_service
from app.services import users as users_service

router = APIRouter(prefix="/api/teams", tags=["teams"])


def signup_enabled(settings: SettingsDep) -> None:
    if not settings.TEAM_SIGNUP_ENABLED:
        raise Forbidden("Team sign-up is disabled on this server")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TeamSignupRead,
    summary="Sign up: create a team and its first admin",
    dependencies=[Depends(signup_enabled), Depends(rate_limit("team_signup"))],
    responses={
        403: error_doc("Team sign-up is disabled (TEAM_SIGNUP_ENABLED=false)", "Team sign-up is disabled"),
        409: error_doc("No free slug for the team name", "Could not allocate a team slug; try again"),
        **R429,
    },
)
async def create_team(body: TeamCreate, session: SessionDep, settings: SettingsDep) -> TeamSignupRead:
    """One transaction: either both the team and its admin exist afterwards, or neither. Log in next."""
    team, user = await teams_service.create_team_with_admin(
        session=session,
        name=body.name,
        admin_email=body.admin_email,
        admin_password=body.admin_password,
        admin_full_name=body.admin_full_name,
        settings=settings,
    )
    return TeamSignupRead(team=TeamRead.model_validate(team), user=UserRead.model_validate(user))


@router.get("/current", response_model=TeamRead, summary="Your team", responses={**R401})
async def current_team(user: CurrentUser, session: SessionDep) -> TeamRead:
    return TeamRead.model_validate(await teams_service.get_team(session=session, team_id=user.team_id))


@router.put(
    "/current",
    response_model=TeamRead,
    summary="Rename your team or change its settings",
    responses={**R401, **R403_ADMIN},
)
async def update_team(body: TeamUpdate, admin: AdminUser, session: SessionDep) -> TeamRead:
    """Unknown settings keys are a 422; settings left out keep their value."""
    changes = body.model_dump(exclude_unset=True)
    team = await teams_service.update_team(session=session, team_id=admin.team_id, admin_id=admin.id, changes=changes)
    return TeamRead.model_validate(team)


# --- invitations -------------------------------------------------------------------------------


def no_store(response: Response) -> None:
    """The created invite carries its token: never cached by a browser or a proxy."""
    response.headers["Cache-Control"] = "no-store"


@router.post(
    "/current/invites",
    status_code=status.HTTP_201_CREATED,
    response_model=InviteCreatedRead,
    summary="Invite people into your team; the token is shown only in this answer",
    dependencies=[Depends(no_store)],
    responses={
        **R401,
        **R403_ADMIN,
        409: error_doc("The email is already registered in this team (active or not)", users_service.EMAIL_TAKEN),
    },
)
async def create_invite(body: InviteCreate, admin: AdminUser, session: SessionDep) -> InviteCreatedRead:
    """Send the token to the invitee (e.g. in a sign-up link); they register with `invite_token`."""
    invite, token = await invites_service.create_invite(
        session=session,
        team_id=admin.team_id,
        created_by=admin.id,
        email=body.email,
        role=body.role,
        expires_in_days=body.expires_in_days,
        max_uses=body.max_uses,
    )
    return InviteCreatedRead(**invites_service.invite_fields(invite), token=token)


@router.get(
    "/current/invites",
    response_model=list[InviteRead],
    summary="Your team's invites, newest first (never their tokens)",
    description="Every invite unless `limit` is given, so clients that do not page still get them all; the "
    "total is in the `X-Total-Count` header either way.",
    responses={
        **total_count("Invites of this page; the total is in the `X-Total-Count` header"),
        **R401,
        **R403_ADMIN,
    },
)
async def list_invites(
    response: Response,
    admin: AdminUser,
    session: SessionDep,
    limit: Annotated[int | None, Query(ge=1, le=100, description="Invites per page; without it, every invite")] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Invites to skip")] = 0,
) -> list[InviteRead]:
    invites, total = await invites_service.list_invites(
        session=session, team_id=admin.team_id, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return [InviteRead(**invites_service.invite_fields(invite)) for invite in invites]


@router.delete(
    "/current/invites/{invite_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,  # a 204 has no body, so no Content-Type either
    summary="Revoke an invite: its token stops working at once",
    responses={
        **R401,
        **R403_ADMIN,
        404: error_doc("No such invite in your team", invites_service.INVITE_ID_NOT_FOUND),
    },
)
async def revoke_invite(invite_id: uuid.UUID, admin: AdminUser, session: SessionDep) -> None:
    """Revoking an already revoked invite is a 204 too; users who joined with it stay members."""
    await invites_service.revoke_invite(session=session, team_id=admin.team_id, invite_id=invite_id)
