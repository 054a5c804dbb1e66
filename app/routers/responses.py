"""OpenAPI descriptions of error responses shared by the routers (examples in Swagger UI)."""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorRead
from app.services.auth import LOGIN_FAILED

Responses = dict[int | str, dict[str, Any]]


def error_doc(description: str, example: str | None = None) -> dict[str, Any]:
    """One documented `{"detail": ...}` error; the example is the description unless given."""
    return {
        "model": ErrorRead,
        "description": description,
        "content": {"application/json": {"example": {"detail": example or description}}},
    }


R401: Responses = {401: error_doc("Missing, invalid, expired or revoked credentials", "Could not validate credentials")}
R401_LOGIN: Responses = {
    401: {
        "model": ErrorRead,
        "description": "Wrong email or password, unknown or inactive user (one message for all). When the "
        "credentials are right in several teams, `teams` lists them: retry with `team_id`.",
        "content": {
            "application/json": {
                "examples": {
                    "failed": {"value": {"detail": LOGIN_FAILED}},
                    "several_teams": {
                        "value": {
                            "detail": "These credentials match accounts in several teams; send team_id",
                            "teams": [{"id": "7d3c1d8e-6b1e-4c1f-9a53-2a0e8b1d4f00", "name": "Acme", "slug": "acme"}],
                        }
                    },
                }
            }
        },
    }
}
R403_ADMIN: Responses = {403: error_doc("Admin role required")}
R403_ORIGIN: Responses = {
    403: error_doc("Cookie-authenticated write from an origin that is not allowed", "Origin not allowed")
}
R429: Responses = {
    429: {
        **error_doc("Too many attempts from this client IP; see the Retry-After header", "Too many requests"),
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    }
}
