"""Sharing within a team: snapshot a chat (and replace or revoke it), list and read the team's shares, fork one."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.auth import CurrentUser
from app.deps import SessionDep
from app.routers.files import DOWNLOAD_200, file_response
from app.routers.responses import R401, Responses, error_doc, total_count
from app.schemas import ChatRead, ShareRead, ShareSummary
from app.services import shares as shares_service
from app.services import tree
from app.services.agents import AGENT_INACTIVE
from app.services.chats import CHAT_NOT_FOUND
from app.services.files import FILE_NOT_FOUND

router = APIRouter(tags=["shares"])

AUTH_ERRORS: Responses = R401
CHAT_404: Responses = {404: error_doc(CHAT_NOT_FOUND)}
SHARE_404: Responses = {404: error_doc(shares_service.SHARE_NOT_FOUND)}
#: A snapshot is another member's conversation, and its sharer may revoke it at any time: no browser or proxy
#: keeps a copy of an answer that carries one (or its title) past the revocation.
NO_STORE = "no-store"


@router.post(
    "/api/chats/{chat_id}/share",
    response_model=ShareRead,
    status_code=status.HTTP_201_CREATED,
    summary="Share one of my chats with my team (a read-only snapshot of its current branch)",
    description="Members of your team (only) can read the snapshot at `GET /api/shares/{id}`. Sharing again "
    "replaces the snapshot under the same id, so a link already sent shows the new one. A branch whose answer "
    "is still being written: 409.",
    responses={**AUTH_ERRORS, **CHAT_404, 409: error_doc(shares_service.SHARE_WHILE_STREAMING)},
)
async def share_chat(chat_id: uuid.UUID, response: Response, session: SessionDep, user: CurrentUser) -> ShareRead:
    response.headers["Cache-Control"] = NO_STORE
    return ShareRead.model_validate(await shares_service.share_chat(session=session, user=user, chat_id=chat_id))


@router.delete(
    "/api/chats/{chat_id}/share",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Stop sharing one of my chats (the snapshot is deleted)",
    responses={**AUTH_ERRORS, 404: error_doc(f"{CHAT_NOT_FOUND}, or: {shares_service.NOT_SHARED}")},
)
async def unshare_chat(chat_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> Response:
    await shares_service.unshare_chat(session=session, user=user, chat_id=chat_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/api/shares",
    response_model=list[ShareSummary],
    summary="List my team's shares, most recently shared first (without messages)",
    responses={**total_count(), **AUTH_ERRORS},
)
async def list_shares(
    response: Response,
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[ShareSummary]:
    page = await shares_service.list_shares(session=session, user=user, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(page.total)
    response.headers["Cache-Control"] = NO_STORE
    return [ShareSummary.model_validate(share) for share in page.shares]


@router.get(
    "/api/shares/{share_id}",
    response_model=ShareRead,
    summary="Read a share of my team",
    responses={**AUTH_ERRORS, **SHARE_404},
)
async def read_share(share_id: uuid.UUID, response: Response, session: SessionDep, user: CurrentUser) -> ShareRead:
    response.headers["Cache-Control"] = NO_STORE
    return ShareRead.model_validate(await shares_service.get_share(session=session, user=user, share_id=share_id))


@router.get(
    "/api/shares/{share_id}/files/{file_id}",
    response_class=Response,
    summary="Download a file of a share of my team (by the id its snapshot's message shows)",
    description="Served like the owner's download: an attachment, never rendered. The share keeps its own copy, "
    "so this works after the chat is deleted, and answers 404 as soon as the share is revoked.",
    responses={
        **DOWNLOAD_200,
        **AUTH_ERRORS,
        404: error_doc("No such file in this share, or the share is not your team's", FILE_NOT_FOUND),
    },
)
async def download_share_file(
    share_id: uuid.UUID, file_id: uuid.UUID, session: SessionDep, user: CurrentUser
) -> Response:
    download = await shares_service.read_share_file(session=session, user=user, share_id=share_id, file_id=file_id)
    return file_response(download)


@router.delete(
    "/api/shares/{share_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a share of my team (the member who shared it, or an admin), also once its chat is gone",
    responses={**AUTH_ERRORS, **SHARE_404, 403: error_doc(shares_service.DELETE_NOT_ALLOWED)},
)
async def delete_share(share_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> Response:
    await shares_service.delete_share(session=session, user=user, share_id=share_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/api/shares/{share_id}/fork",
    response_model=ChatRead,
    status_code=status.HTTP_201_CREATED,
    summary="Continue a share in a new chat of mine (the snapshot's messages, the same agent)",
    description="The new chat holds copies of the snapshot's messages (new ids and times) and can be "
    "continued at once. The agent must still be active: otherwise 409, as for starting a chat.",
    responses={
        **AUTH_ERRORS,
        **SHARE_404,
        409: error_doc(f"{AGENT_INACTIVE}, or: {shares_service.AGENT_GONE}", AGENT_INACTIVE),
    },
)
async def fork_share(share_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> ChatRead:
    chat_id = await shares_service.fork_share(session=session, user=user, share_id=share_id)
    return ChatRead.model_validate(await tree.read_chat(session=session, user=user, chat_id=chat_id))
