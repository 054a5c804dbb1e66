"""n8n's chat widget as a client: `POST /api/agents/{id}/n8n-chat` speaks the Chat Trigger's protocol
(framing in app.chat_trigger, sessions and sends in app.services.widget)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import Response, StreamingResponse

from app import chat_trigger
from app.auth import CurrentCaller
from app.deps import GenerationsDep, SettingsDep, ShortSessionDep
from app.errors import Unprocessable
from app.routers.responses import R401, Responses, error_doc
from app.schemas import ErrorRead, N8nChatError, N8nChatHistory, N8nChatOutput, N8nChatRequest
from app.services import widget
from app.services.agents import AGENT_NOT_FOUND
from app.services.messages import AGENT_INACTIVE
from app.services.usage import QUOTA_REACHED

router = APIRouter(prefix="/api/agents", tags=["n8n chat widget"])

NDJSON_EXAMPLE = (
    '{"type":"begin","metadata":{"nodeId":"…","nodeName":"Support bot","itemIndex":0,"runIndex":0,"timestamp":1}}\n'
    '{"type":"item","content":"Hel","metadata":{"nodeId":"…","nodeName":"Support bot","itemIndex":0,"runIndex":0,'
    '"timestamp":2}}\n'
    '{"type":"end","metadata":{"nodeId":"…","nodeName":"Support bot","itemIndex":0,"runIndex":0,"timestamp":3}}\n'
)


def _retry_after(description: str) -> dict[str, Any]:
    return {"Retry-After": {"description": description, "schema": {"type": "integer"}}}


RESPONSES: Responses = {
    200: {
        "description": "`sendMessage` with `Accept: text/plain` (the widget's `enableStreaming`) or "
        "`application/x-ndjson`: the answer as it streams, one JSON object per line (`begin`, `item`..., then "
        "`end`; a failure is an `error` line instead of `end`; an empty line every STREAM_PING_INTERVAL while "
        "nothing else goes out, which the widget skips), under the same Content-Type n8n uses, "
        "`application/json; charset=utf-8`. Otherwise `sendMessage` answers `{output}` once the answer is "
        'complete, and `loadPreviousSession` answers `{data}` (`{"data": []}` for an unknown session).',
        "model": N8nChatOutput | N8nChatHistory,
        "content": {
            "application/json": {
                "examples": {
                    "output": {"value": {"output": "Hello! How can I help?"}},
                    "history": {"value": {"data": []}},
                    "stream": {"summary": "NDJSON (Accept: text/plain)", "value": NDJSON_EXAMPLE},
                },
            }
        },
    },
    **R401,
    404: error_doc("No such agent in your team", AGENT_NOT_FOUND),
    409: error_doc(
        "The agent is inactive (sendMessage), or an answer is already being generated in this session",
        AGENT_INACTIVE,
    ),
    429: {
        "model": ErrorRead | N8nChatError,
        "description": "The team's daily message quota is used up for you (`Retry-After`: seconds until midnight "
        "UTC; refused before anything is stored, `{detail}`). Or, last-node mode only, the agent's n8n (or a proxy "
        "in front of it) answered 429 with a usable `Retry-After`, passed on: `{message}` as for 502, the message "
        "is stored with its error. Streamed, that refusal is the NDJSON `error` line (the 200 went out before n8n "
        "was called), without the wait",
        "headers": _retry_after("Seconds to wait: until midnight UTC (the quota), or as n8n asked"),
        "content": {
            "application/json": {
                "examples": {
                    "quota": {"value": {"detail": QUOTA_REACHED}},
                    "agent_refused": {"value": {"message": "The agent answered with an error (HTTP 429)"}},
                }
            }
        },
    },
    502: {
        "model": N8nChatError,
        "description": "Last-node mode only: the agent failed; `message` says why, as n8n's own Chat Trigger "
        "reports it (the message is stored with its error). n8n's 429 or 503 without a usable `Retry-After` is "
        "such a failure too",
        "content": {"application/json": {"example": {"message": "The agent could not be reached"}}},
    },
    503: {
        "model": ErrorRead | N8nChatError,
        "description": "The server is shutting down; retry on another worker (`{detail}`, nothing stored). Or, "
        "last-node mode only, the agent's n8n (or a proxy in front of it) answered 503 with a usable "
        "`Retry-After`, passed on, as for 429",
        "headers": _retry_after("Seconds to wait, as n8n asked (none on a shutdown)"),
        "content": {
            "application/json": {
                "examples": {
                    "shutting_down": {"value": {"detail": "The server is shutting down; try again"}},
                    "agent_unavailable": {"value": {"message": "The agent answered with an error (HTTP 503)"}},
                }
            }
        },
    },
    504: {
        "model": N8nChatError,
        "description": "Last-node mode only: the agent took too long",
        "content": {"application/json": {"example": {"message": "The agent did not answer in time"}}},
    },
}


def _not_a_form(content_type: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """The widget sends its file uploads (`allowFileUploads`) as multipart/form-data: refused by name (this runs
    before the body's validation), where that validation would say the body "should be a valid dictionary"."""
    if widget.is_form(content_type):
        raise Unprocessable(widget.FILE_UPLOADS_REFUSED, loc=("body", "files"))


@router.post(
    "/{agent_id}/n8n-chat",
    response_model=None,
    summary="n8n's chat widget (@n8n/chat) talking to an agent, as to a Chat Trigger",
    description="Point the widget's `webhookUrl` here with `webhookConfig.method: 'POST'`. `sessionId` names a "
    "chat of yours with this agent (created by its first message; another user's same id names their own "
    "chat). Messages are stored and answered like any chat message (quota, usage, stop and follow on "
    "`/api/chats/{id}`). See docs/CLIENTS.md.",
    responses=RESPONSES,
)
async def n8n_chat(
    agent_id: uuid.UUID,
    body: N8nChatRequest,
    user: CurrentCaller,
    _form: Annotated[None, Depends(_not_a_form)],
    session: ShortSessionDep,
    settings: SettingsDep,
    registry: GenerationsDep,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    if body.action == "loadPreviousSession":
        messages = await widget.previous_session(
            session=session, user=user, agent_id=agent_id, session_id=body.session_id
        )
        return Response(chat_trigger.history(messages), media_type=chat_trigger.CONTENT_TYPE)
    registry.check_accepting()
    send = await widget.start_widget_message(
        session=session,
        settings=settings,
        user=user,
        agent_id=agent_id,
        session_id=body.session_id,
        content=body.chat_input or "",
        worker_id=registry.worker_id,
    )
    generation = registry.start(send.new)
    if chat_trigger.wants_stream(accept):
        return StreamingResponse(
            chat_trigger.ndjson(generation, send.agent_name, settings.STREAM_PING_INTERVAL),
            media_type=chat_trigger.CONTENT_TYPE,
            headers=chat_trigger.STREAM_HEADERS,
        )
    status, content, headers = await chat_trigger.last_node_answer(generation)
    return Response(content, status_code=status, media_type=chat_trigger.CONTENT_TYPE, headers=headers)
