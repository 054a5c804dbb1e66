"""GET /api/error-logs: the admin's view of failed generations in their team."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.auth import AdminUser
from app.deps import SessionDep
from app.routers.responses import R401, R403_ADMIN, total_count
from app.schemas import ErrorLogRead
from app.services.error_logs import list_error_logs

router = APIRouter(prefix="/api/error-logs", tags=["error logs"])


@router.get(
    "",
    response_model=list[ErrorLogRead],
    summary="Failed generations of your team, newest first (admin)",
    responses={**total_count("Rows of this page; the total is in the `X-Total-Count` header"), **R401, **R403_ADMIN},
)
async def read_error_logs(
    response: Response,
    admin: AdminUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Rows per page")] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Rows to skip")] = 0,
) -> list[ErrorLogRead]:
    rows, total = await list_error_logs(session=session, user=admin, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [ErrorLogRead.model_validate(row) for row in rows]
