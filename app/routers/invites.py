"""What an invite token opens, for a sign-up page to show before registering with it."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.deps import SessionDep
from app.ratelimit import rate_limit
from app.routers.responses import R429, error_doc
from app.schemas import InvitePreviewRead
from app.services import invites as invites_service

router = APIRouter(prefix="/api/invites", tags=["invites"])


@router.get(
    "/{token}",
    response_model=InvitePreviewRead,
    summary="Preview an invite: the team it joins, the email it is bound to, the role (no login needed)",
    dependencies=[Depends(rate_limit("invite_preview"))],
    responses={
        404: error_doc(
            "Unknown, used-up, expired or revoked token (one answer for all)", invites_service.INVITE_NOT_FOUND
        ),
        **R429,
    },
)
async def preview_invite(token: str, session: SessionDep) -> InvitePreviewRead:
    """Rate limited per client IP like registration; the token is 256 random bits, so guessing is hopeless."""
    preview = await invites_service.preview_invite(session=session, token=token)
    return InvitePreviewRead(
        team_name=preview.team_name, email=preview.email, role=preview.role, expires_at=preview.expires_at
    )
