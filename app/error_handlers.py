"""The handlers that render every error as `{"detail": ...}` (AppError, validation, HTTP, infrastructure)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from redis.exceptions import RedisError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path

from app.errors import AppError, Unprocessable, short_loc
from app.logs import redact_path

Handler = Callable[[Request, Exception], Awaitable[Response]]

# The name these records have always had (they moved here from app/errors.py with the handlers).
logger = logging.getLogger("app.errors")


#: pydantic messages that quote a piece of the input (`uuid_parsing`: "... found `x` at 3", `union_tag_invalid`:
#: "Input tag 'x' found using ...", `timezone_offset` and `datetime_object_invalid`: the offset or object
#: given), replaced by an input-free one (`pydantic_core.list_all_errors()` lists every template).
INPUT_FREE_MESSAGES = {
    "uuid_parsing": "Input should be a valid UUID",
    "timezone_offset": "Input has the wrong timezone offset",
    "datetime_object_invalid": "Invalid datetime object",
}


def _input_free_message(kind: Any, err: dict[str, Any]) -> Any:
    if kind == "union_tag_invalid":
        # The expected tags are the schema's own; the tag found is the client's.
        expected = (err.get("ctx") or {}).get("expected_tags")
        return "Input tag does not match any of the expected tags" + (f": {expected}" if expected else "")
    return INPUT_FREE_MESSAGES.get(kind, err.get("msg"))


def safe_validation_errors(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's 422 shape without `input` and `ctx`, which would echo what was sent (passwords, secrets), and
    without the few pydantic messages that quote the input. (Field names stay in `loc`, an unknown key's too:
    they name what to fix.)"""
    cleaned = []
    for err in errors:
        kind = err.get("type")
        cleaned.append({"type": kind, "loc": short_loc(err.get("loc", ())), "msg": _input_free_message(kind, err)})
    return cleaned


async def _app_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    if isinstance(exc, Unprocessable):
        detail: Any = [{"type": "value_error", "loc": list(exc.loc), "msg": exc.detail}]
        return JSONResponse({"detail": detail}, status_code=422, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": safe_validation_errors(exc.errors())}, status_code=422)


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: Starlette's 405 names only the first route it matched."""
    root, path = request.scope.get("root_path", ""), request.scope["path"]
    if root and path.startswith(root):
        path = path[len(root) :]
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        if route.path and route.methods and compile_path(route.path)[0].match(path):
            methods.update(route.methods)
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers or None)


#: Infrastructure down (database, Redis): the client did nothing wrong and may retry, so 503, not 500.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    RedisError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    ConnectionError,
    TimeoutError,
)


async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    logger.warning("dependency unavailable: %s", type(exc).__name__)
    return JSONResponse(
        {"detail": "Service temporarily unavailable, try again shortly"}, status_code=503, headers={"Retry-After": "5"}
    )


#: The answer to a request whose client went away while sending its body (nobody reads it; it is logged as
#: that, not as a server error). Routes that read the body themselves may say more (an upload's).
BODY_CUT = "The request body was not received in full"


async def _client_gone(request: Request, _exc: Exception) -> JSONResponse:
    # Redacted as the access log is: a secret-carrying route (a callback's token, an invite) may read its own body.
    logger.info("client disconnected while sending the body of %s %s", request.method, redact_path(request.url.path))
    return JSONResponse({"detail": BODY_CUT}, status_code=400)


#: PostgreSQL errors that say "try again", not "this is wrong": a serialization failure, a deadlock (two
#: requests took the same rows in opposite orders),
#: a lock not available in time. The database rolled the transaction back; nothing of it happened.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A statement that failed because its pooled connection was dead (database restarted), or on a transient
    conflict (`TRANSIENT_SQLSTATES`): retryable 503.

    SQLAlchemy has already dropped the pool's older connections, so the retry gets a fresh one. Any other
    database error is a bug and goes on to the last-resort 500.
    """
    if isinstance(exc, sa_exc.DBAPIError) and (
        exc.connection_invalidated or getattr(exc.orig, "sqlstate", None) in TRANSIENT_SQLSTATES
    ):
        return await _unavailable(request, exc)
    raise exc


# --- the OpenAI-compatible API's shape --------------------------------------------------------------

#: Paths answered in OpenAI's error shape, which its client libraries parse (`/v1` and below).
OPENAI_PREFIX = "/v1/"
#: OpenAI's error `type` (and, where it has one, `code`) by status; an AppError may name its own code
#: (`openai_code`: `model_not_found` for an unknown model, where any other 404 has none, as OpenAI's).
OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", None),
    405: ("invalid_request_error", None),
    409: ("invalid_request_error", None),
    413: ("invalid_request_error", None),
    422: ("invalid_request_error", "invalid_request"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX) or path == OPENAI_PREFIX.rstrip("/")


def openai_error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body for `status`: its `type`, `code` or the status's default (`OPENAI_ERRORS`), and `param`,
    the field at fault (null when none), which the official clients expose as `error.param`."""
    kind, default_code = OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def openai_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(openai_error_body(status, message, code, param), status_code=status, headers=headers)


#: Where a validation error's `loc` starts with its place in the request, a name of the server's own.
_PLACES = ("body", "path", "query", "header")
#: pydantic's wording around a validator's own message (`ValueError("...")`), which OpenAI's never has.
_VALUE_ERROR = "Value error, "
#: OpenAI's words for a body that is not JSON (its `loc` is a position in the bytes, not a field).
UNREADABLE_JSON = "We could not parse the JSON body of your request"


def _field(err: dict[str, Any]) -> list[Any]:
    """The field a validation error names: its `loc` without the place (body, path, query, header); nothing for
    an unreadable body, whose `loc` is the offset where parsing stopped."""
    if err.get("type") == "json_invalid":
        return []
    loc = list(err.get("loc", []))
    return loc[1:] if loc and loc[0] in _PLACES else loc


def _param(detail: Any) -> str | None:
    """The first invalid field of a validation `detail`, written as OpenAI writes it: `messages.[0].content`."""
    if not isinstance(detail, list) or not detail or not isinstance(detail[0], dict):
        return None
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in _field(detail[0])) or None


def _as_message(detail: Any) -> str:
    """A `detail` as one sentence: validation lists become `field: reason; ...` (`messages.0.content: ...`)."""
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if err.get("type") == "json_invalid":
                parts.append(UNREADABLE_JSON)
                continue
            loc = ".".join(str(p) for p in _field(err))
            msg = str(err.get("msg")).removeprefix(_VALUE_ERROR)
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "; ".join(parts)
    return str(detail)


#: The longest Retry-After the official OpenAI clients wait for; past it they retry at once, with their own short
#: backoff (openai-python's `_calculate_retry_timeout`), so each retry is refused again.
CLIENT_RETRY_AFTER_MAX = 60
#: The header those clients obey over their own retry rules (also on a completion that failed after the agent was
#: called: app.routers.openai_api).
NO_RETRY = {"x-should-retry": "false"}


def _waits_longer_than_clients_do(headers: dict[str, str]) -> bool:
    """A 429 whose Retry-After (e.g. the daily quota's, hours to midnight UTC) the official clients ignore."""
    value = headers.get("retry-after", "")
    return value.isdecimal() and int(value) > CLIENT_RETRY_AFTER_MAX


def _openai_shaped(handler: Handler) -> Handler:
    """The same handler, its answer re-shaped as OpenAI's `{"error": {...}}` on the `/v1/` paths."""

    async def shaped(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        if not is_openai_path(request.scope["path"]) or not isinstance(response, JSONResponse):
            return response
        detail = json.loads(bytes(response.body)).get("detail")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        code = getattr(exc, "openai_code", None)
        if response.status_code == 429 and _waits_longer_than_clients_do(headers):
            headers.update(NO_RETRY)
        return openai_error(response.status_code, _as_message(detail), code=code, headers=headers, param=_param(detail))

    return shaped


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _openai_shaped(_app_error))
    app.add_exception_handler(RequestValidationError, _openai_shaped(_validation_error))
    app.add_exception_handler(StarletteHTTPException, _openai_shaped(_http_error))
    for exc_type in UNAVAILABLE_ERRORS:
        app.add_exception_handler(exc_type, _openai_shaped(_unavailable))
    app.add_exception_handler(sa_exc.DBAPIError, _openai_shaped(_database_error))
    app.add_exception_handler(ClientDisconnect, _openai_shaped(_client_gone))
