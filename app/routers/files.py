"""Files in messages: upload into one of my chats, download it, and the signed links n8n downloads through."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response, status

from app.auth import CurrentCaller
from app.config import DEFAULT_FILE_TYPES
from app.deps import SessionDep, SettingsDep, ShortSessionDep, UploadSlotsDep, body_chunks
from app.filetypes import content_disposition
from app.routers.responses import R401, Responses, error_doc, file_upload_body
from app.schemas import FileRead
from app.services import files as files_service
from app.services.chats import CHAT_NOT_FOUND
from app.uploads import NOT_MULTIPART, TOO_MANY_UPLOADS

router = APIRouter(tags=["files"])

UPLOAD_BODY = file_upload_body("The file (one per request); its type is judged by its bytes")
DOWNLOAD_200: Responses = {
    200: {
        "description": "The bytes under the file's own type, as an attachment (`Content-Disposition`), with "
        "`X-Content-Type-Options: nosniff` and `Content-Security-Policy: default-src 'none'; sandbox`",
        # Each type a file may have been stored as (FILE_ALLOWED_TYPES only narrows these): the answer carries
        # the file's own, which a single `application/octet-stream` left undocumented.
        "content": {
            media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in DEFAULT_FILE_TYPES
        },
    }
}


def file_response(download: files_service.Download) -> Response:
    """The bytes as a download a browser never renders or runs, whatever they hold."""
    return Response(
        content=download.data,
        media_type=download.content_type,
        headers={
            "Content-Disposition": content_disposition(download.filename),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": files_service.DOWNLOAD_CSP,
            "Cross-Origin-Resource-Policy": "same-origin",
            "Cache-Control": "private, no-store",
        },
    )


@router.post(
    "/api/chats/{chat_id}/files",
    status_code=status.HTTP_201_CREATED,
    response_model=FileRead,
    summary="Upload a file to one of my chats (multipart field `file`), to attach to a message",
    description="The type is judged from the bytes against FILE_ALLOWED_TYPES (docs/FILES.md), never from the "
    "name or the declared type. Send it with a message through `file_ids`.",
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses={
        **R401,
        404: error_doc("No such chat, or not yours", CHAT_NOT_FOUND),
        409: error_doc(
            "The chat holds the most files, or unsent files, allowed", "This chat holds the most files allowed (200)"
        ),
        413: error_doc("The file is larger than FILE_MAX_BYTES", "The file is larger than 10485760 bytes"),
        415: error_doc("Not multipart, or a file type that is not accepted", NOT_MULTIPART),
        429: {
            **error_doc("Too many uploads of yours at once; see the Retry-After header", TOO_MANY_UPLOADS),
            "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
        },
    },
)
async def upload_file(
    chat_id: uuid.UUID,
    request: Request,
    user: CurrentCaller,
    session: ShortSessionDep,
    settings: SettingsDep,
    slots: UploadSlotsDep,
) -> FileRead:
    view = await files_service.upload_file(
        session=session,
        settings=settings,
        slots=slots,
        user=user,
        chat_id=chat_id,
        chunks=body_chunks(request),
        content_type=request.headers.get("content-type"),
    )
    return FileRead.model_validate(view)


@router.get(
    "/api/chats/{chat_id}/files/{file_id}",
    response_class=Response,
    summary="Download a file of one of my chats",
    responses={
        **DOWNLOAD_200,
        **R401,
        404: error_doc("No such file in this chat, or not yours", files_service.FILE_NOT_FOUND),
    },
)
async def download_file(
    chat_id: uuid.UUID, file_id: uuid.UUID, session: ShortSessionDep, user: CurrentCaller
) -> Response:
    download = await files_service.read_file(session=session, user=user, chat_id=chat_id, file_id=file_id)
    return file_response(download)


@router.delete(
    "/api/chats/{chat_id}/files/{file_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an upload of one of my chats that no message carries yet",
    responses={
        **R401,
        404: error_doc("No such file in this chat, or not yours", files_service.FILE_NOT_FOUND),
        409: error_doc("The file was sent with a message", files_service.FILE_SENT),
    },
)
async def delete_file(
    chat_id: uuid.UUID, file_id: uuid.UUID, session: ShortSessionDep, user: CurrentCaller
) -> Response:
    await files_service.delete_unsent_file(session=session, user=user, chat_id=chat_id, file_id=file_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    files_service.PATH_PREFIX + "{generation_id}/{file_id}/{signature}",
    response_class=Response,
    summary="A file through the signed link n8n received (no other credentials)",
    description="Valid while the generation runs and FILE_URL_GRACE_SECONDS after; anything else, a forged or "
    "malformed link included, is a 404.",
    responses={**DOWNLOAD_200, 404: error_doc("Unknown, forged or expired link", files_service.FILE_NOT_FOUND)},
)
async def download_signed(
    generation_id: str, file_id: str, signature: str, session: SessionDep, settings: SettingsDep
) -> Response:
    download = await files_service.read_signed_link(
        session=session, settings=settings, generation_id=generation_id, file_id=file_id, signature=signature
    )
    return file_response(download)
