"""Export one chat (JSON or Markdown) or all of mine (JSON Lines, streamed), and import exported chats."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.auth import CurrentCaller, CurrentUser
from app.db import utcnow
from app.deps import DatabaseDep, ImportGateDep, SessionDep, SettingsDep, ShortSessionDep
from app.errors import MethodNotAllowed
from app.routers.responses import R401, Responses, error_doc, json_only
from app.schemas import ChatSummary, ExportedChat
from app.services import exports, imports
from app.services.chats import CHAT_NOT_FOUND

router = APIRouter(prefix="/api/chats", tags=["export and import"])

AUTH_ERRORS: Responses = R401
JSON_LINES = "application/x-ndjson"
MARKDOWN = "text/markdown; charset=utf-8"


def attachment(filename: str) -> dict[str, str]:
    """A download of the user's conversations: kept by no cache, as a file download is not."""
    return {"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "private, no-store"}


class SpooledDownload(StreamingResponse):
    """A download read whole into a spool first (`exports.spooled`), sent from it with its `Content-Length`,
    the spool closed (its temporary file deleted) when the response ends, however it ends."""

    def __init__(self, spool: exports.Spool, *, media_type: str, headers: dict[str, str]) -> None:
        self.spool = spool
        size = spool.seek(0, os.SEEK_END)
        spool.seek(0)
        super().__init__(self._pieces(spool), media_type=media_type, headers={**headers, "Content-Length": str(size)})

    @staticmethod
    async def _pieces(spool: exports.Spool) -> AsyncIterator[bytes]:
        for piece in exports.spool_pieces(spool):
            yield piece

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.spool.close()


@router.get(
    "/export",
    summary="Export all my chats as JSON Lines (streamed)",
    description="One chat per line, each the same JSON as `GET /api/chats/{id}/export?format=json` (on one "
    "line), oldest chat first; archived chats included. Sent while it is read, 20 chats at a time: each chat read "
    "as that export reads it (a batch of messages at a time), the 20 in one snapshot, into a spool, then sent "
    "(docs/SHARING.md).",
    response_class=StreamingResponse,
    responses={
        200: {"content": {JSON_LINES: {"schema": {"type": "string"}}}, "description": "One exported chat per line"},
        **json_only(AUTH_ERRORS),
    },
)
async def export_all(user: CurrentCaller, db: DatabaseDep) -> StreamingResponse:
    filename = f"chats-{utcnow():%Y%m%d}.jsonl"
    lines = exports.export_lines(db=db, user_id=user.id, team_id=user.team_id)
    return StreamingResponse(lines, media_type=JSON_LINES, headers=attachment(filename))


@router.get(
    "/{chat_id}/export",
    summary="Export one of my chats as a download",
    description="`format=json` (default): every message of every branch, linked by `parent_id`, with the "
    "branch shown (`current_message_id`, `current_branch`); importable with `POST /api/chats/import`. "
    "`format=markdown`: the branch shown, for reading. The format is described in docs/SHARING.md. Read a "
    "batch of messages at a time, all from one snapshot of the chat, into a spool (memory, then a temporary "
    "file), then sent with its `Content-Length` (docs/SHARING.md).",
    responses={
        200: {"model": ExportedChat, "content": {MARKDOWN: {}}, "description": "The chat, as an attachment"},
        **json_only({**AUTH_ERRORS, 404: error_doc(CHAT_NOT_FOUND)}),
    },
)
async def export_chat(
    chat_id: uuid.UUID,
    user: CurrentCaller,
    session: ShortSessionDep,
    db: DatabaseDep,
    export_format: Annotated[Literal["json", "markdown"], Query(alias="format")] = "json",
) -> Response:
    # The caller is checked: its session's connection goes back before the export takes one of its own, so a
    # request never waits for a second connection while holding a first.
    await session.close()
    body = exports.chat_export(
        db=db, user_id=user.id, team_id=user.team_id, chat_id=chat_id, export_format=export_format
    )
    spool = await exports.spooled(body)  # 404, or a database error, here: before anything is sent
    if export_format == "markdown":
        return SpooledDownload(spool, media_type=MARKDOWN, headers=attachment(f"chat-{chat_id}.md"))
    return SpooledDownload(spool, media_type="application/json", headers=attachment(f"chat-{chat_id}.json"))


@router.api_route("/export", methods=["HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False)
async def export_other_methods() -> None:
    """`/export` is a word, not a chat id: without this route, PUT /api/chats/export would be read as an update
    of chat "export" (422 for a malformed id) instead of the 405 a path without that method gets."""
    raise MethodNotAllowed(headers={"Allow": "GET"})


@router.api_route("/import", methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False)
async def import_other_methods() -> None:
    """As `/export`: a word, not a chat id."""
    raise MethodNotAllowed(headers={"Allow": "POST"})


IMPORT_BODY_DOC = (
    "An exported chat (`GET /api/chats/{id}/export`), or exported chats one per line as `GET /api/chats/export` "
    "sends them (JSON Lines, as `application/json`, `application/x-ndjson` or `application/jsonl`)."
)


@router.post(
    "/import",
    response_model=list[ChatSummary],
    status_code=status.HTTP_201_CREATED,
    summary="Import exported chats as new chats of mine (all or nothing)",
    description="Every chat is checked before anything is stored (one transaction): its tree (each `parent_id` "
    "an earlier message of the same chat, roles alternating from a user message, every user message answered "
    "and as a send stores it (complete, no error or metadata, not blank, at most MESSAGE_MAX_CHARS characters), "
    "no `streaming` message, a "
    "`current_message_id` of the chat) and its agent, matched by `agent.slug` in your team (a missing slug is a "
    "422 naming it). Ids and times are new; titles, roles, contents, order, branches and the branch shown are "
    "kept. The body may not exceed IMPORT_MAX_BODY_BYTES (413, counted while it arrives); a server process "
    "reads a few imports at once and one per user (429 with `Retry-After` beyond).",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": IMPORT_BODY_DOC,
            # JSON Lines bodies are described in words: one schema cannot say "one chat per line".
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ExportedChat"}}},
        }
    },
    responses={
        **AUTH_ERRORS,
        413: error_doc("The body is larger than IMPORT_MAX_BODY_BYTES", "Request body too large"),
        422: {
            "description": "A chat that is not a valid export (`loc` is `body`, the chat's position, then the "
            "field), or whose agent slug your team lacks (the message names it), or more chats than "
            "IMPORT_MAX_CHATS or messages than IMPORT_MAX_MESSAGES; nothing was stored",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
        },
        415: error_doc(imports.IMPORT_TYPES_ONLY),
        429: error_doc(imports.IMPORT_BUSY),
    },
)
async def import_chats(
    request: Request, session: SessionDep, user: CurrentUser, gate: ImportGateDep, settings: SettingsDep
) -> list[ChatSummary]:
    imports.check_import_type(request.headers.get("content-type"))
    # No database connection is held while the client sends its body (it may be slow and large).
    await session.close()
    with gate.slot(user.id):
        body = await request.body()
        chats = await imports.import_chats(
            session=session,
            user=user,
            body=body,
            limits=imports.ImportLimits.of(settings),
        )
    return [ChatSummary.model_validate(chat) for chat in chats]
