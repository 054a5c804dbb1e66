"""Personal API keys: create (shown once), list, revoke. Only a signed-in session manages keys."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from app.auth import SessionUser
from app.deps import SessionDep, SettingsDep
from app.errors import Forbidden
from app.routers.responses import R401, Responses, error_doc
from app.schemas import ApiKeyCreate, ApiKeyCreatedRead, ApiKeyRead
from app.services import api_keys as api_keys_service

router = APIRouter(prefix="/api/api-keys", tags=["api-keys"])

R403_KEY: Responses = {403: error_doc("Called with an API key (keys cannot manage keys), or `all=true` by a member")}


def no_store(response: Response) -> None:
    """The created key is in the answer: never cached by a browser or a proxy."""
    response.headers["Cache-Control"] = "no-store"


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreatedRead,
    summary="Create an API key for yourself; the key is shown only in this answer",
    dependencies=[Depends(no_store)],
    responses={**R401, **R403_KEY},
)
async def create_api_key(
    body: ApiKeyCreate, user: SessionUser, session: SessionDep, settings: SettingsDep
) -> ApiKeyCreatedRead:
    """The key acts as you with the role `user` (never admin), until it expires or is revoked."""
    key, secret = await api_keys_service.create_key(
        session=session, settings=settings, user=user, name=body.name, expires_at=body.expires_at
    )
    return ApiKeyCreatedRead(**api_keys_service.key_fields(key), key=secret)


@router.get(
    "",
    response_model=list[ApiKeyRead],
    summary="Your API keys, newest first (never the keys); admins may pass all=true for the team's",
    responses={**R401, **R403_KEY},
)
async def list_api_keys(
    user: SessionUser, session: SessionDep, whole_team: Annotated[bool, Query(alias="all")] = False
) -> list[ApiKeyRead]:
    if whole_team and user.role != "admin":
        raise Forbidden("Admin role required")
    keys = await api_keys_service.list_keys(session=session, user=user, whole_team=whole_team)
    return [ApiKeyRead(**api_keys_service.key_fields(key)) for key in keys]


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,  # a 204 has no body, so no Content-Type either
    summary="Revoke an API key (yours, or any of your team's as an admin): it stops working at once",
    responses={**R401, **R403_KEY, 404: error_doc("No such key of yours (or of your team, for admins)")},
)
async def delete_api_key(key_id: uuid.UUID, user: SessionUser, session: SessionDep) -> None:
    await api_keys_service.delete_key(session=session, user=user, key_id=key_id, as_admin=user.role == "admin")
