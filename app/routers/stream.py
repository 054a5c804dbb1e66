"""Stop a running generation, and follow one again (reload, another tab, another instance)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.sse import EventSourceResponse

from app.auth import CurrentCaller
from app.deps import GenerationsDep, ShortSessionDep
from app.generations import STOP_UNREACHABLE
from app.routers.messages import STREAM_GRAMMAR, EventStream
from app.routers.responses import R401, error_doc, json_only
from app.schemas import MessageRead
from app.services import streams as streams_service
from app.services.chats import CHAT_NOT_FOUND
from app.streaming import SSE_HEADERS

router = APIRouter(prefix="/api/chats", tags=["messages"])

FOLLOW_DESCRIPTION = (
    "Replays the events of the chat's running (or just ended) generation after `Last-Event-ID` (the header "
    "a browser's EventSource sends on reconnect, or `?last_event_id=`), with their original ids, then follows "
    "the live ones up to the terminal event. `?assistant_message_id=` (the `start` event's) names the "
    "generation, so an id of an older one never skips the start of a newer one. 204 when there is nothing "
    "to follow: the stored message is then the answer (`GET /api/chats/{id}`)."
)


@router.post(
    "/{chat_id}/stop",
    response_model=MessageRead,
    summary="Stop the chat's running generation",
    description="The partial answer is stored with status `cancelled` before this answer, which is that "
    "stored message; the request to n8n is closed, and every open stream of the generation ends with `done` "
    "carrying it. n8n's own execution may go on.",
    responses=json_only(
        {
            **R401,
            404: error_doc("No such chat, or not yours", CHAT_NOT_FOUND),
            409: error_doc("No generation is running in this chat", streams_service.NOTHING_RUNNING),
            503: error_doc(
                "The answer runs on another instance, which the stop cannot reach now (Redis down); retry",
                STOP_UNREACHABLE,
            ),
        }
    ),
)
async def stop_generation(
    chat_id: uuid.UUID, user: CurrentCaller, session: ShortSessionDep, registry: GenerationsDep
) -> MessageRead:
    await streams_service.check_owned_chat(session=session, user=user, chat_id=chat_id)
    stored = await registry.stop_chat(chat_id)
    if stored is None:
        raise streams_service.nothing_running()
    return MessageRead.model_validate(stored)


@router.get(
    "/{chat_id}/stream",
    response_class=EventStream,
    response_model=None,
    summary="Follow the chat's generation again, from an event id",
    description=FOLLOW_DESCRIPTION,
    responses={
        200: {
            "description": "The events after `Last-Event-ID`, then the live ones (the grammar of the send route).",
            "content": {"text/event-stream": {"schema": {"type": "string", "description": STREAM_GRAMMAR}}},
        },
        204: {"description": "Nothing to follow: no running or recently ended generation, or all seen"},
        **json_only(
            {
                **R401,
                404: error_doc("No such chat, or not yours", CHAT_NOT_FOUND),
            }
        ),
    },
)
async def follow_generation(
    chat_id: uuid.UUID,
    user: CurrentCaller,
    session: ShortSessionDep,
    registry: GenerationsDep,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
    last_event_id: Annotated[
        str | None,
        Query(
            max_length=32,
            description="For clients that cannot set the Last-Event-ID header: an event id (1-9 digits; "
            "whitespace around it and an empty value are ignored)",
            # What app.services.streams.parse_last_event_id takes, documented only: checked there, with the
            # message the header's refusal has.
            json_schema_extra={"pattern": r"^\s*([0-9]{1,9})?\s*$"},
        ),
    ] = None,
    assistant_message_id: Annotated[
        uuid.UUID | None, Query(description="The generation to follow (the `start` event's assistant_message_id)")
    ] = None,
) -> Response:
    await streams_service.check_owned_chat(session=session, user=user, chat_id=chat_id)
    after = streams_service.parse_last_event_id(last_event_id_header, last_event_id)
    named = None if assistant_message_id is None else str(assistant_message_id)
    frames = await registry.follow(chat_id, named, after)
    if frames is None:
        return Response(status_code=204)
    return EventSourceResponse(frames, headers=SSE_HEADERS)
