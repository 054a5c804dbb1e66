"""Agents: admins write, members read, within the caller's team; avatars upload and download."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from app.auth import AdminUser, CurrentUser
from app.deps import SessionDep, SettingsDep, StreamerDep, body_chunks
from app.errors import MethodNotAllowed
from app.ratelimit import LimiterDep
from app.routers.responses import R401, R403_ADMIN, R422_WEBHOOK, Responses, error_doc, file_upload_body
from app.schemas import AgentAdminRead, AgentCreate, AgentRead, AgentTestResult, AgentUpdate
from app.services import agents as agents_service
from app.services import avatars as avatars_service
from app.services import connection_test

router = APIRouter(prefix="/api/agents", tags=["agents"])

AgentOut = AgentAdminRead | AgentRead


AUTH_ERRORS: Responses = R401
ADMIN_ERRORS: Responses = {**R401, **R403_ADMIN}
NOT_FOUND: Responses = {404: error_doc("Agent not found")}
SSRF_422: Responses = R422_WEBHOOK
RATE_LIMITED: Responses = {429: error_doc("Too many connection tests; see `Retry-After`")}
TEST_DESCRIPTION = (
    'Sends one probe to the webhook exactly as a message would (`chatInput` "ping", `metadata.probe` true; '
    "same address policy, parser and size limits, timeouts capped by AGENT_TEST_TIMEOUT) and answers 200 "
    "whatever n8n did: `ok`, n8n's status, the detected `format`, timings, a short `sample`, the `code` a "
    "real message would have ended with and a one-sentence `hint`. Rate limited per admin "
    "(RATE_LIMIT_AGENT_TEST). Header values are never echoed."
)


@router.get(
    "",
    response_model=list[AgentOut],
    summary="List the team's agents",
    description="Active agents of the caller's team. Admins may add `include_inactive=true`; members passing it "
    "get the active agents only. Admins see `webhook_url` and `webhook_header_names`; members never do.",
    responses=AUTH_ERRORS,
)
async def list_agents(
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    include_inactive: Annotated[bool, Query(description="Admins only: also list deactivated agents")] = False,
) -> list[AgentRead | AgentAdminRead]:
    agents = await agents_service.list_agents(session=session, user=user, include_inactive=include_inactive)
    return [agents_service.agent_view(agent, user=user, settings=settings) for agent in agents]


@router.post(
    "",
    response_model=AgentAdminRead,
    status_code=status.HTTP_201_CREATED,
    summary="Register an n8n workflow as an agent",
    responses={**ADMIN_ERRORS, **SSRF_422, 409: error_doc("The slug is taken", agents_service.SLUG_TAKEN)},
)
async def create_agent(
    data: AgentCreate, session: SessionDep, settings: SettingsDep, user: AdminUser
) -> AgentRead | AgentAdminRead:
    agent = await agents_service.create_agent(
        session=session,
        settings=settings,
        user=user,
        name=data.name,
        slug=data.slug,
        description=data.description,
        webhook_url=data.webhook_url,
        webhook_headers=data.webhook_headers,
        system_prompt=data.system_prompt,
        config=data.config,
        is_active=data.is_active,
        response_mode=data.response_mode,
        file_delivery=data.file_delivery,
    )
    return agents_service.agent_view(agent, user=user, settings=settings)


@router.post(
    "/test",
    response_model=AgentTestResult,
    summary="Test an unsaved agent's webhook (nothing is stored)",
    description=TEST_DESCRIPTION,
    responses={**ADMIN_ERRORS, **RATE_LIMITED},
)
async def test_agent_body(
    data: AgentCreate,
    request: Request,
    settings: SettingsDep,
    streamer: StreamerDep,
    limiter: LimiterDep,
    user: AdminUser,
) -> connection_test.ProbeResult:
    await limiter.hit("agent_test", request, key=str(user.id))
    return await connection_test.probe_unsaved_agent(
        streamer=streamer,
        settings=settings,
        user=user,
        webhook_url=data.webhook_url,
        webhook_headers=data.webhook_headers,
        system_prompt=data.system_prompt,
        config=data.config,
        response_mode=data.response_mode,
    )


@router.api_route("/test", methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False)
async def test_other_methods() -> None:
    """`/test` is a word, not an agent id: without this route, PUT /api/agents/test would be read as an
    update of agent "test" (422 for a malformed id) instead of the 405 a path without that method gets."""
    raise MethodNotAllowed(headers={"Allow": "POST"})


@router.post(
    "/{agent_id}/test",
    response_model=AgentTestResult,
    summary="Test a saved agent's webhook, with its stored headers",
    description=TEST_DESCRIPTION,
    responses={**ADMIN_ERRORS, **NOT_FOUND, **RATE_LIMITED},
)
async def test_saved_agent(
    agent_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    streamer: StreamerDep,
    limiter: LimiterDep,
    user: AdminUser,
) -> connection_test.ProbeResult:
    await limiter.hit("agent_test", request, key=str(user.id))
    agent = await agents_service.get_team_agent(session=session, user=user, agent_id=agent_id)
    await session.close()  # the probe may take seconds: the connection goes back to the pool first
    return await connection_test.probe_stored_agent(streamer=streamer, settings=settings, user=user, agent=agent)


@router.get(
    "/{agent_id}",
    response_model=AgentOut,
    summary="Read one agent (active or not, so old chats can show it)",
    responses={**AUTH_ERRORS, **NOT_FOUND},
)
async def read_agent(
    agent_id: uuid.UUID, session: SessionDep, settings: SettingsDep, user: CurrentUser
) -> AgentRead | AgentAdminRead:
    agent = await agents_service.get_team_agent(session=session, user=user, agent_id=agent_id)
    return agents_service.agent_view(agent, user=user, settings=settings)


@router.put(
    "/{agent_id}",
    response_model=AgentAdminRead,
    summary="Update an agent (partial: only the fields sent change)",
    description="`webhook_headers`: sent = the whole set is replaced, left out = kept, `{}` = cleared.",
    responses={
        **ADMIN_ERRORS,
        **NOT_FOUND,
        **SSRF_422,
        409: error_doc("The slug is taken", agents_service.SLUG_TAKEN),
    },
)
async def update_agent(
    agent_id: uuid.UUID, data: AgentUpdate, session: SessionDep, settings: SettingsDep, user: AdminUser
) -> AgentRead | AgentAdminRead:
    agent = await agents_service.update_agent(
        session=session, settings=settings, user=user, agent_id=agent_id, changes=data.model_dump(exclude_unset=True)
    )
    return agents_service.agent_view(agent, user=user, settings=settings)


@router.delete(
    "/{agent_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Deactivate an agent (soft delete; its chats keep their history)",
    responses={**ADMIN_ERRORS, **NOT_FOUND},
)
async def delete_agent(agent_id: uuid.UUID, session: SessionDep, user: AdminUser) -> Response:
    await agents_service.deactivate_agent(session=session, user=user, agent_id=agent_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


AVATAR_BODY = file_upload_body(
    "The image (one per request): PNG, JPEG, WebP or GIF, judged by its bytes (anything else, an empty file "
    "included, is a 415)",
    minLength=1,
)


@router.post(
    "/{agent_id}/avatar",
    response_model=AgentAdminRead,
    summary="Upload the agent's avatar (PNG, JPEG, WebP or GIF, judged by content)",
    description="Multipart field `file`. Re-encoded with metadata stripped and the longest side at most "
    "AVATAR_MAX_SIDE pixels; GIFs keep their first frame.",
    openapi_extra={"requestBody": AVATAR_BODY},
    responses={
        **ADMIN_ERRORS,
        **NOT_FOUND,
        413: error_doc("Avatar is larger than AVATAR_MAX_BYTES (or has more than AVATAR_MAX_PIXELS pixels)"),
        415: error_doc("Not multipart, or not a PNG, JPEG, WebP or GIF image", avatars_service.UNSUPPORTED),
    },
)
async def upload_avatar(
    agent_id: uuid.UUID, request: Request, session: SessionDep, settings: SettingsDep, user: AdminUser
) -> AgentRead | AgentAdminRead:
    agent = await avatars_service.set_avatar(
        session=session,
        settings=settings,
        user=user,
        agent_id=agent_id,
        chunks=body_chunks(request),
        content_type=request.headers.get("content-type"),
    )
    return agents_service.agent_view(agent, user=user, settings=settings)


@router.delete(
    "/{agent_id}/avatar",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove the agent's avatar (idempotent; `avatar_url` becomes null)",
    responses={**ADMIN_ERRORS, **NOT_FOUND},
)
async def delete_avatar(agent_id: uuid.UUID, session: SessionDep, user: AdminUser) -> Response:
    await avatars_service.remove_avatar(session=session, user=user, agent_id=agent_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{agent_id}/avatar",
    summary="Download the agent's avatar",
    description="Served with its real content type, `X-Content-Type-Options: nosniff` and an ETag "
    "(`If-None-Match` gives 304). With the current `?v=` it may be cached for a year.",
    response_class=Response,
    responses={
        200: {"content": {t: {} for t in avatars_service.FORMATS.values()}, "description": "The image"},
        304: {"description": "Not modified"},
        **AUTH_ERRORS,
        404: error_doc("Agent not found / Avatar not found"),
    },
)
async def read_avatar(
    agent_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    avatar = await avatars_service.read_avatar(
        session=session, user=user, agent_id=agent_id, if_none_match=if_none_match
    )
    current = request.query_params.get("v") == str(avatar.version)
    headers = {
        "ETag": avatar.etag,
        "Cache-Control": "private, max-age=31536000, immutable" if current else "private, no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    if avatar.data is None:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(content=avatar.data, media_type=avatar.content_type, headers=headers)
