"""Admin management of the users of the caller's own team."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.auth import AdminUser
from app.deps import SessionDep, SettingsDep
from app.routers.responses import R401, R403_ADMIN, Responses, error_doc, total_count
from app.schemas import UserCreate, UserRead, UserUpdate
from app.services import users as users_service

router = APIRouter(prefix="/api/users", tags=["users"])

R404: Responses = {
    404: error_doc("No such user in your team (another team's id looks the same)", users_service.USER_NOT_FOUND)
}


@router.get(
    "",
    response_model=list[UserRead],
    summary="Users of your team, oldest first",
    description="Every user unless `limit` is given, so clients that do not page still get them all; the "
    "total is in the `X-Total-Count` header either way.",
    responses={**total_count("Users of this page; the total is in the `X-Total-Count` header"), **R401, **R403_ADMIN},
)
async def list_users(
    response: Response,
    admin: AdminUser,
    session: SessionDep,
    limit: Annotated[int | None, Query(ge=1, le=100, description="Users per page; without it, every user")] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Users to skip")] = 0,
) -> list[UserRead]:
    users, total = await users_service.list_users(session=session, admin=admin, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [UserRead.model_validate(u) for u in users]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=UserRead,
    summary="Create a user in your team",
    responses={
        **R401,
        **R403_ADMIN,
        409: error_doc("Email already registered in this team", users_service.EMAIL_TAKEN),
    },
)
async def create_user(body: UserCreate, admin: AdminUser, session: SessionDep, settings: SettingsDep) -> UserRead:
    user = await users_service.create_user(
        session=session,
        settings=settings,
        team_id=admin.team_id,
        email=body.email,
        password=body.password,
        full_name=body.full_name,
        role=body.role,
        created_by=admin.id,
    )
    return UserRead.model_validate(user)


@router.patch(
    "/{user_id}",
    response_model=UserRead,
    summary="Change a user's role, activation or name",
    responses={
        **R401,
        **R403_ADMIN,
        **R404,
        409: error_doc("Would leave the team without an active admin", users_service.LAST_ADMIN),
    },
)
async def update_user(user_id: uuid.UUID, body: UserUpdate, admin: AdminUser, session: SessionDep) -> UserRead:
    """Deactivation revokes every token of the user at once; a demoted admin loses admin access at once."""
    user = await users_service.update_user(
        session=session, admin=admin, user_id=user_id, changes=body.model_dump(exclude_unset=True)
    )
    return UserRead.model_validate(user)
