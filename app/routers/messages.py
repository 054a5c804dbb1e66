"""POST /api/chats/{id}/messages: checks and the atomic append as a dependency, then the SSE stream."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse

from app.auth import CurrentCaller, SettingsDep
from app.db import AutocommitSessionDep
from app.schemas import MessageCreate
from app.services.messages import start_message
from app.streaming import SSE_HEADERS, Generation, GenerationRegistry

router = APIRouter(prefix="/api/chats", tags=["messages"])

STREAM_EXAMPLE = (
    'id: 1\ndata: {"type": "start", "data": {"user_message": {"id": "…", "role": "user", "content": "Hi", '
    '"status": "complete", "created_at": "2026-12-02T10:00:00+00:00"}, "assistant_message_id": "…"}}\n\n'
    'id: 2\ndata: {"type": "status", "data": {"description": "Waiting for the agent", "done": false}}\n\n'
    ": ping\n\n"
    'id: 3\ndata: {"type": "message", "data": {"content": "Hel"}}\n\n'
    'id: 4\ndata: {"type": "message", "data": {"content": "lo"}}\n\n'
    'id: 5\ndata: {"type": "done", "data": {"message": {"id": "…", "role": "assistant", "content": "Hello", '
    '"status": "complete", "created_at": "…", "metadata": {"chunks": 2}}}}\n\n'
)
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An SSE stream: `start`, `status`, `message`…, then exactly one `done` or `error` "
        "(`{message, code}`; codes in docs/STREAMING_API_GUIDE.md). `: ping` comments keep it open.",
        "content": {"text/event-stream": {"example": STREAM_EXAMPLE}},
    },
    401: {"description": "Not authenticated"},
    404: {"description": "No such chat, or not yours"},
    409: {"description": "The chat's agent is inactive, or a generation is already running in this chat"},
    422: {"description": "Content empty, too long, or the body is invalid"},
    503: {"description": "The server is shutting down; retry on another worker"},
}


async def start_generation(
    request: Request,
    chat_id: uuid.UUID,
    body: MessageCreate,
    user: CurrentCaller,
    session: AutocommitSessionDep,
    settings: SettingsDep,
) -> Generation:
    """Everything that can fail with a plain JSON error happens here, before the 200 and the stream.

    Its session has no transaction: each statement (the user, the chat with its agent, the conditional
    append of the two messages) is atomic on its own, and a transaction would only add two round trips.
    """
    registry: GenerationRegistry = request.app.state.generations
    registry.check_accepting()
    new = await start_message(
        session=session,
        settings=settings,
        user=user,
        chat_id=chat_id,
        content=body.content,
        worker_id=registry.worker_id,
    )
    return registry.start(new)


@router.post(
    "/{chat_id}/messages",
    # No response_class here: with EventSourceResponse as the class FastAPI expects a generator of events;
    # the endpoint returns the EventSourceResponse itself, and RESPONSES documents text/event-stream.
    response_model=None,
    summary="Send a message; the answer streams back as Server-Sent Events",
    responses=RESPONSES,
)
async def send_message(
    generation: Annotated[Generation, Depends(start_generation)], settings: SettingsDep
) -> EventSourceResponse:
    # FastAPI's EventSourceResponse over pre-encoded events (fastapi.sse.format_sse_event), not a generator
    # of ServerSentEvent: that path runs two extra tasks, two memory streams and a timeout scope per event,
    # 5x the bare relay's CPU per chunk. Events available together go out in one write.
    return EventSourceResponse(generation.sse(settings.STREAM_PING_INTERVAL), headers=SSE_HEADERS)
