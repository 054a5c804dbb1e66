"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.routers.responses import error_doc
from app.schemas import HealthRead
from app.services import health as health_service
from app.state import StateDep

router = APIRouter(tags=["operations"])


# HEAD too, for monitors that probe with it (the server sends the head alone); not in the schema.
@router.head("/health", response_model=HealthRead, include_in_schema=False)
@router.get("/health", response_model=HealthRead, summary="The process is running")
async def health() -> HealthRead:
    return HealthRead(status="ok")


@router.head("/ready", response_model=HealthRead, include_in_schema=False)
@router.get(
    "/ready",
    response_model=HealthRead,
    summary="Database reachable and migrated",
    description='`{"status": "ready"}`, or `{"status": "degraded"}` (still 200: every request is served) while '
    "a configured Redis does not answer within half a second.",
    responses={503: error_doc("Not ready; `detail` says why", "database unreachable")},
)
async def ready(state: StateDep) -> HealthRead | JSONResponse:
    problem, status = await health_service.readiness(
        db=state.db, expected_revision=state.migration_head, redis=state.redis
    )
    if problem:
        return JSONResponse({"detail": problem}, status_code=503)
    return HealthRead(status=status)
