"""The signed callback URL n8n posts progress to (app.callbacks): no login, the signature is the credential."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, status

from app import callbacks
from app.deps import GenerationsDep, SettingsDep
from app.errors import NotFound
from app.generations import CALLBACK_NOT_ACCEPTED
from app.routers.responses import error_doc
from app.schemas import CallbackAccepted, CallbackBody

router = APIRouter(prefix="/api/callbacks", tags=["callbacks"])


@router.post(
    "/{generation_id}/{signature}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CallbackAccepted,
    summary="Report progress of a running generation (posted by n8n)",
    description="The URL is the generation's `metadata.callback_url`, as n8n received it. `status` and `tool` "
    "become stream events and are stored in the answer's `metadata.steps`; `message` appends text; `usage` "
    "counts tokens; `done` or `error` ends the generation (the first end wins). Answered once applied, also "
    "when relayed to the instance running the generation. Valid only while the "
    "generation runs: any other signature, or one used after the end, is a 404 that changes nothing.",
    responses={
        404: error_doc("Unknown, wrongly signed or already ended generation", CALLBACK_NOT_ACCEPTED),
        413: error_doc("The body is larger than CALLBACK_MAX_BODY_BYTES", "Request body too large"),
        503: error_doc(
            "The generation runs on another instance that Redis cannot reach, or that did not take the callback "
            "within 3 seconds, or too many callbacks wait for their instances already (not applied: send it "
            "again)"
        ),
    },
)
async def post_callback(
    generation_id: str,
    signature: str,
    body: Annotated[CallbackBody, Body()],
    settings: SettingsDep,
    registry: GenerationsDep,
) -> CallbackAccepted:
    if not callbacks.verify(settings, generation_id, signature):
        raise NotFound(CALLBACK_NOT_ACCEPTED)
    if not await registry.callback(generation_id, body.model_dump(mode="json", exclude_none=True)):
        raise NotFound(CALLBACK_NOT_ACCEPTED)
    return CallbackAccepted()
