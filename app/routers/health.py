"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.routers.responses import error_doc
from app.schemas import HealthRead
from app.services import health as health_service
from app.state import StateDep

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthRead, summary="The process is running")
async def health() -> HealthRead:
    return HealthRead(status="ok")


@router.get(
    "/ready",
    response_model=HealthRead,
    summary="Database (and Redis, when configured) reachable and migrated",
    responses={503: error_doc("Not ready; `detail` says why", "database unreachable")},
)
async def ready(state: StateDep) -> HealthRead | JSONResponse:
    problem = await health_service.readiness_problem(
        db=state.db, redis=state.redis, expected_revision=state.migration_head
    )
    if problem:
        return JSONResponse({"detail": problem}, status_code=503)
    return HealthRead(status="ready")
