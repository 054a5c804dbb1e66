"""GET /metrics: the Prometheus text of every worker; 404 unless METRICS_ENABLED, bearer-protected by METRICS_TOKEN."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Header, Response

from app import metrics
from app.deps import DatabaseDep, SettingsDep
from app.errors import NotFound, Unauthorized
from app.routers.responses import error_doc

router = APIRouter(tags=["operations"])

BAD_TOKEN = "A valid metrics bearer token is required"


@router.get(
    "/metrics",
    summary="Prometheus metrics (scrapers)",
    description="Prometheus text format, every worker's values. 404 unless METRICS_ENABLED; with METRICS_TOKEN "
    "set, `Authorization: Bearer <token>` is required (401 otherwise).",
    response_class=Response,
    responses={
        200: {"content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "The metrics"},
        401: error_doc("Missing or wrong bearer token (only when METRICS_TOKEN is set)", BAD_TOKEN),
        404: error_doc("Metrics are not enabled", "Not Found"),
    },
)
async def read_metrics(
    settings: SettingsDep, db: DatabaseDep, authorization: Annotated[str | None, Header()] = None
) -> Response:
    if not settings.METRICS_ENABLED:
        raise NotFound("Not Found")
    if settings.METRICS_TOKEN:
        scheme, _, token = (authorization or "").partition(" ")
        expected = settings.METRICS_TOKEN.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise Unauthorized(BAD_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    return Response(content=metrics.scrape(db.pool_in_use()), media_type=metrics.CONTENT_TYPE)
