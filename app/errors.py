"""The one application error type (`AppError` and its subclasses), raised by services; no FastAPI here."""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """Raised by services; the handler turns it into a JSON error with this status code."""

    status_code = 400
    default_detail = "Bad request"
    #: The `code` of OpenAI's error shape on /v1 (None: the status's default, app.error_handlers).
    openai_code: str | None = None

    def __init__(
        self, detail: str | None = None, *, headers: dict[str, str] | None = None, openai_code: str | None = None
    ) -> None:
        self.detail = detail or self.default_detail
        self.headers = headers
        if openai_code is not None:
            self.openai_code = openai_code
        super().__init__(self.detail)


class BadRequest(AppError):
    status_code = 400


class Unauthorized(AppError):
    status_code = 401
    default_detail = "Not authenticated"

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer", **(headers or {})})


#: The 403 of an admin route, whoever refuses it (the route's dependency, or a service re-checking the role).
ADMIN_REQUIRED = "Admin role required"


class Forbidden(AppError):
    status_code = 403
    default_detail = "Not allowed"


class NotFound(AppError):
    status_code = 404
    default_detail = "Not found"


class Conflict(AppError):
    status_code = 409
    default_detail = "Conflict"


class MethodNotAllowed(AppError):
    status_code = 405
    default_detail = "Method Not Allowed"


class PayloadTooLarge(AppError):
    status_code = 413
    default_detail = "Request body too large"


class UnsupportedMediaType(AppError):
    status_code = 415
    default_detail = "Unsupported media type"


class Unprocessable(AppError):
    """A 422 found after validation (SSRF policy, blank message); rendered in FastAPI's validation shape.

    The contract keeps one 422 shape, so clients read `detail[0].msg` whoever refused the input; `loc` names
    the refused field (`("body", "webhook_url")`), never its value.
    """

    status_code = 422
    default_detail = "Unprocessable input"

    def __init__(self, detail: str | None = None, *, loc: tuple[str | int, ...] = ("body",)) -> None:
        super().__init__(detail)
        self.loc = loc


class RateLimited(AppError):
    status_code = 429
    default_detail = "Too many requests"


class ServiceUnavailable(AppError):
    status_code = 503
    default_detail = "Service unavailable"


#: The longest key of a `loc` given back whole: an unknown key is the client's own text, of any size.
LOC_KEY_MAX = 64


def short_loc(loc: Any) -> list[Any]:
    """`loc` with each string longer than LOC_KEY_MAX cut there (marked with an ellipsis)."""
    return [p[:LOC_KEY_MAX] + "…" if isinstance(p, str) and len(p) > LOC_KEY_MAX else p for p in loc]
