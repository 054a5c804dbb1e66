"""Chats of the caller: create, list (search, paging), read with its current branch, update, delete."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.auth import CurrentUser
from app.deps import GenerationsDep, SessionDep
from app.routers.responses import R401, Responses, error_doc, total_count
from app.schemas import ChatCreate, ChatRead, ChatSummary, ChatUpdate
from app.services import chats as chats_service
from app.services import tree

router = APIRouter(prefix="/api/chats", tags=["chats"])


AUTH_ERRORS: Responses = R401
NOT_FOUND: Responses = {404: error_doc(chats_service.CHAT_NOT_FOUND)}


@router.get(
    "",
    response_model=list[ChatSummary],
    summary="List my chats",
    description="Newest activity first: the last message (creation for an empty chat); a rename, pin or archive "
    "never reorders chats. `pinned=true` lists only the pinned ones (to show them apart). `q` searches titles "
    "and message text (not JSON keys), "
    "case-insensitively. The total number of matches is in the `X-Total-Count` header.",
    responses={
        **total_count(),
        **AUTH_ERRORS,
    },
)
async def list_chats(
    response: Response,
    session: SessionDep,
    user: CurrentUser,
    archived: Annotated[bool, Query(description="Archived chats instead of current ones")] = False,
    pinned: Annotated[
        bool | None, Query(description="Only the pinned chats (true) or only the others (false); all if left out")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    q: Annotated[
        str | None, Query(max_length=200, pattern=r"^[^\x00]*$", description="Text to find in titles and messages")
    ] = None,
) -> list[ChatSummary]:
    page = await chats_service.list_chats(
        session=session, user=user, archived=archived, pinned=pinned, limit=limit, offset=offset, q=q
    )
    response.headers["X-Total-Count"] = str(page.total)
    return [ChatSummary.model_validate(chat) for chat in page.chats]


@router.post(
    "",
    response_model=ChatRead,
    status_code=status.HTTP_201_CREATED,
    summary="Start a chat with an agent",
    responses={
        **AUTH_ERRORS,
        404: error_doc("Agent not found"),
        409: error_doc("Agent is inactive; an admin must reactivate it before new chats can use it"),
    },
)
async def create_chat(data: ChatCreate, session: SessionDep, user: CurrentUser) -> ChatRead:
    chat = await chats_service.create_chat(session=session, user=user, agent_id=data.agent_id, title=data.title)
    summary = ChatSummary.model_validate(chat).model_dump()
    return ChatRead(**summary, team_id=chat.team_id, user_id=chat.user_id, current_message_id=None, messages=[])


@router.get(
    "/{chat_id}",
    response_model=ChatRead,
    summary="Read one of my chats with its current branch (one query)",
    description="`messages` is the branch shown (root first), ending at `current_message_id`; without "
    "edits or regenerations that is every message. `last=N` returns only its N newest messages, and "
    "`has_more` says whether older ones were left out. Every message of every branch: "
    "`GET /api/chats/{id}/messages`.",
    responses={**AUTH_ERRORS, **NOT_FOUND},
)
async def read_chat(
    chat_id: uuid.UUID,
    session: SessionDep,
    user: CurrentUser,
    last: Annotated[int | None, Query(ge=1, le=10_000, description="Only the N newest messages")] = None,
) -> ChatRead:
    return ChatRead.model_validate(await tree.read_chat(session=session, user=user, chat_id=chat_id, last=last))


@router.put(
    "/{chat_id}",
    response_model=ChatRead,
    summary="Rename, archive, pin one of my chats, or switch its branch (only the fields sent change)",
    description="`current_message_id` (any message of the chat; another chat's: 422) shows the branch through "
    "that message, continued through its newest descendants: the answer's `current_message_id` is that leaf.",
    responses={**AUTH_ERRORS, **NOT_FOUND},
)
async def update_chat(chat_id: uuid.UUID, data: ChatUpdate, session: SessionDep, user: CurrentUser) -> ChatRead:
    changes = data.model_dump(exclude_unset=True)
    await tree.update_chat(session=session, user=user, chat_id=chat_id, changes=changes)
    return ChatRead.model_validate(await tree.read_chat(session=session, user=user, chat_id=chat_id))


@router.delete(
    "/{chat_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete one of my chats and its messages",
    description="An answer running in the chat is stopped, on whichever instance runs it: its streams end with "
    "the error `chat_deleted` (there is no message to store), and its usage is counted as `cancelled`.",
    responses={**AUTH_ERRORS, **NOT_FOUND},
)
async def delete_chat(chat_id: uuid.UUID, session: SessionDep, user: CurrentUser, registry: GenerationsDep) -> Response:
    running = await chats_service.delete_chat(session=session, user=user, chat_id=chat_id)
    await registry.chat_deleted(running)  # its answer stops: n8n's request closes, its streams end
    return Response(status_code=status.HTTP_204_NO_CONTENT)
