"""A chat's messages: send (checks and the start transaction as a dependency, then the SSE stream), list every
branch, feedback on an answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.sse import EventSourceResponse
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import CurrentUser, current_caller, send_credentials
from app.config import Settings
from app.deps import SessionDep
from app.generations import GenerationRegistry
from app.routers.responses import R401, Responses, error_doc, json_only, total_count
from app.schemas import FeedbackUpdate, MessageCreate, MessageRead
from app.security import Caller
from app.services import fast_start, idempotency, tree
from app.services.chats import CHAT_NOT_FOUND
from app.services.messages import AGENT_INACTIVE, start_message
from app.services.usage import QUOTA_REACHED
from app.state import app_state
from app.streaming import SSE_HEADERS

router = APIRouter(prefix="/api/chats", tags=["messages"])

STREAM_EXAMPLE = (
    'id: 1\ndata: {"type": "start", "data": {"user_message": {"id": "…", "role": "user", "content": "Hi", '
    '"status": "complete", "created_at": "2026-12-02T10:00:00.120000Z", "error": null, "metadata": null, '
    '"parent_id": null, "sibling_ids": ["…"], "feedback": null, "files": []}, "assistant_message_id": "…"}}\n\n'
    'id: 2\ndata: {"type": "status", "data": {"description": "Waiting for the agent", "done": false}}\n\n'
    ": ping\n\n"
    'id: 3\ndata: {"type": "message", "data": {"content": "Hel"}}\n\n'
    'id: 4\ndata: {"type": "message", "data": {"content": "lo"}}\n\n'
    'id: 5\ndata: {"type": "done", "data": {"message": {"id": "…", "role": "assistant", "content": "Hello", '
    '"status": "complete", "created_at": "2026-12-02T10:00:00.125000Z", "error": null, "metadata": {"chunks": 2}, '
    '"parent_id": "…", "sibling_ids": ["…"], "feedback": null, "files": []}}}\n\n'
)
STREAM_GRAMMAR = (
    "Server-Sent Events (UTF-8). Each event is `id: <n>` then `data: <one JSON object>` and a blank line; "
    'the object is `{"type": ..., "data": {...}}` with type `start` (`user_message`, '
    "`assistant_message_id`), `status` (`description`, `done`), `message` (`content`: the next chunk), then "
    "exactly one terminal `done` (`message`: the stored assistant message) or `error` (`message`, `code`). "
    "Lines starting with `:` are keep-alive comments (`: ping`)."
)
STREAM_SCHEMA = {"type": "string", "description": STREAM_GRAMMAR}
RESPONSES: Responses = {
    200: {
        "description": "An SSE stream: `start`, `status`, `message`…, then exactly one `done` or `error` "
        "(`{message, code}`; codes in docs/API_REFERENCE.md). `: ping` comments keep it open. "
        "Every failure before the stream starts is a JSON error below.",
        "content": {
            "text/event-stream": {
                "schema": {"type": "string", "description": STREAM_GRAMMAR},
                "example": STREAM_EXAMPLE,
            }
        },
    },
    **json_only(
        {
            **R401,
            404: error_doc("No such chat, or not yours", CHAT_NOT_FOUND),
            409: error_doc(
                "The chat's agent is inactive, or a generation is already running in this chat", AGENT_INACTIVE
            ),
            429: error_doc(
                "The team's daily message quota is used up for you (`Retry-After`: seconds until midnight UTC)",
                QUOTA_REACHED,
            ),
            503: error_doc(
                "The server is shutting down; retry on another worker", "The server is shutting down; try again"
            ),
        }
    ),
}


#: What the bearer-scheme dependency (`oauth2_scheme`) writes into an operation's schema, for the send route,
#: which authenticates without it (in its own statement, app.services.fast_start).
SECURITY: dict[str, Any] = {"security": [{"OAuth2PasswordBearer": []}]}


class EventStream(Response):
    """Documents the 200 as `text/event-stream` only; the endpoint returns its EventSourceResponse as is."""

    media_type = "text/event-stream"


async def start_generation(
    request: Request,
    chat_id: uuid.UUID,
    body: MessageCreate,
    idempotency_key: str | None,
    credentials: dict[str, Any] | Caller,
) -> AsyncIterator[bytes]:
    """Everything that can fail with a plain JSON error happens here, before the 200 and the stream.

    A plain send tries the one-statement start first (app.services.fast_start: one round trip); when it stores
    nothing, or the send is not plain, the general path below runs the same checks one by one and raises the
    error. Its session is closed when the endpoint returns; the new rows are committed before n8n is called.
    An Idempotency-Key is looked up first: a retry answers the stream its key started, and nothing else runs.
    """
    # One dependency only (`send_credentials`): FastAPI works out a cache key for every sub-dependency of every
    # request, which with settings, database, revocations, generations and the bearer scheme cost ~0.2 ms of
    # CPU per send (docs/PERFORMANCE.md). The route documents its Bearer security itself (`SECURITY`).
    state = app_state(request.app)
    settings, db, registry = state.settings, state.db, state.generations
    key = idempotency_key
    fingerprint = None
    if key is not None:
        fingerprint = idempotency.request_hash(f"/api/chats/{chat_id}/messages", body.model_dump(mode="json"))
    claims = credentials if isinstance(credentials, dict) else None
    if (
        claims is not None
        and registry.accepting
        and state.revocations.in_database
        and fast_start.applies(
            settings,
            edit=body.edit_of is not None,
            regenerate=body.regenerate_of is not None,
            files=bool(body.file_ids),
            content=body.content,
        )
    ):
        registry.warm_for(uuid.UUID(claims["sub"]), chat_id)
        assert body.content is not None  # applies() checked it
        started = await fast_start.start(
            db=db,
            settings=settings,
            claims=claims,
            chat_id=chat_id,
            content=body.content,
            worker_id=registry.worker_id,
            key=key,
            fingerprint=fingerprint,
        )
        if started is not None:
            return registry.start(started).sse(settings.STREAM_PING_INTERVAL)
    # The general path's session: closed when the endpoint returns, before the stream (no open stream keeps one).
    async with db.sessionmaker() as session:
        if isinstance(credentials, Caller):
            user = credentials  # an API key, checked by `send_credentials`
        else:
            user = await current_caller(request, session, settings, state.revocations)
        return await _start_checked(chat_id, body, session, settings, user, registry, key, fingerprint)


async def _start_checked(
    chat_id: uuid.UUID,
    body: MessageCreate,
    session: AsyncSession,
    settings: Settings,
    user: Caller,
    registry: GenerationRegistry,
    key: str | None,
    fingerprint: str | None,
) -> AsyncIterator[bytes]:
    """The general path: the Idempotency-Key, then each check and write of `start_message` in its transaction."""
    if key is not None:
        assert fingerprint is not None
        recorded = await idempotency.claim(
            session=session, user_id=user.id, key=key, fingerprint=fingerprint, chat_id=chat_id
        )
        if recorded is not None:
            return await registry.replay(recorded, session=session)
    try:
        registry.check_accepting()
        new = await start_message(
            session=session,
            settings=settings,
            user=user,
            chat_id=chat_id,
            content=body.content,
            edit_of=body.edit_of,
            regenerate_of=body.regenerate_of,
            file_ids=body.file_ids,
            worker_id=registry.worker_id,
            idempotency_key=key,
        )
    except BaseException:
        if key is not None:
            # Shielded, as the quota's give-back: a send cancelled here (a shutdown) frees its key too, or the
            # client's retry with it would answer 409 "still starting" until the claim counts as abandoned.
            with anyio.CancelScope(shield=True):
                await idempotency.release(session=session, user_id=user.id, key=key)
        raise
    return registry.start(new).sse(settings.STREAM_PING_INTERVAL)


@router.post(
    "/{chat_id}/messages",
    # Not EventSourceResponse as the class: FastAPI would then expect a generator of events. EventStream only
    # names the media type; the endpoint returns the EventSourceResponse itself.
    response_class=EventStream,
    response_model=None,
    summary="Send a message, edit one or regenerate an answer; the answer streams back as Server-Sent Events",
    description="`{content}` adds a message under the chat's current leaf; `{content, edit_of}` adds a new "
    "version of a user message (its sibling); `{regenerate_of}` asks again for an answer to the question of "
    "that assistant message (a new sibling of it; the `start` event's `user_message` is that question). The "
    "new messages become the current branch, and n8n receives that branch only.",
    responses=RESPONSES,
    openapi_extra=SECURITY,
)
async def send_message(
    request: Request,
    chat_id: uuid.UUID,
    body: MessageCreate,
    credentials: Annotated[dict[str, Any] | Caller, Depends(send_credentials)],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=idempotency.KEY_MAX_LENGTH,
            pattern=idempotency.KEY_PATTERN,
            description="1-255 printable ASCII characters; a retry with the same key (24 h) answers the same "
            "stream and starts nothing",
        ),
    ] = None,
) -> EventSourceResponse:
    # FastAPI's EventSourceResponse over pre-encoded events (fastapi.sse.format_sse_event), not a generator
    # of ServerSentEvent: that path runs two extra tasks, two memory streams and a timeout scope per event,
    # 5x the bare relay's CPU per chunk. Events available together go out in one write.
    stream = await start_generation(request, chat_id, body, idempotency_key, credentials)
    # One turn of the loop before the response is set up: the new generation's task runs first, up to its
    # request to n8n (over a kept-alive connection its bytes go out before the head), and the head follows.
    # The other order put the response's own set-up (~0.1-0.2 ms at one stream) before n8n was called
    # (docs/PERFORMANCE.md).
    await asyncio.sleep(0)
    return EventSourceResponse(stream, headers=SSE_HEADERS)


@router.get(
    "/{chat_id}/messages",
    response_model=list[MessageRead],
    summary="Every message of every branch of one of my chats, oldest first",
    description="`parent_id` and `sibling_ids` give the tree; the total is in the `X-Total-Count` header.",
    responses={**total_count(), **R401, 404: error_doc("No such chat, or not yours", CHAT_NOT_FOUND)},
)
async def list_messages(
    chat_id: uuid.UUID,
    response: Response,
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[MessageRead]:
    page = await tree.list_messages(session=session, user=user, chat_id=chat_id, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(page.total)
    return [MessageRead.model_validate(m) for m in page.messages]


@router.put(
    "/{chat_id}/messages/{message_id}/feedback",
    response_model=MessageRead,
    summary="Rate an answer of one of my chats (1, -1, or null to clear) with an optional comment",
    description="On assistant messages only (a user message: 422), once they have ended (a streaming one: 409). "
    "A null rating without a comment removes the feedback (`feedback` becomes null).",
    responses={
        **R401,
        404: error_doc("No such chat or message, or not yours", CHAT_NOT_FOUND),
        409: error_doc("The answer is still streaming", tree.FEEDBACK_WHILE_STREAMING),
    },
)
async def set_feedback(
    chat_id: uuid.UUID, message_id: uuid.UUID, data: FeedbackUpdate, session: SessionDep, user: CurrentUser
) -> MessageRead:
    message = await tree.set_feedback(
        session=session, user=user, chat_id=chat_id, message_id=message_id, rating=data.rating, comment=data.comment
    )
    return MessageRead.model_validate(message)
