"""The handlers that render every error as `{"detail": ...}` (AppError, validation, HTTP, infrastructure)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from redis.exceptions import RedisError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from app.errors import AppError, Unprocessable

# The name these records have always had (they moved here from app/errors.py with the handlers).
logger = logging.getLogger("app.errors")


#: pydantic messages that quote a piece of the input (`uuid_parsing`: "... found `x` at 3"), replaced by
#: their input-free first sentence.
INPUT_FREE_MESSAGES = {"uuid_parsing": "Input should be a valid UUID"}


def safe_validation_errors(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's 422 shape without `input` and `ctx`, which would echo what was sent (passwords, secrets)."""
    cleaned = []
    for err in errors:
        kind = err.get("type")
        msg = INPUT_FREE_MESSAGES.get(kind, err.get("msg"))
        cleaned.append({"type": kind, "loc": list(err.get("loc", ())), "msg": msg})
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


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A statement that failed because its pooled connection was dead (database restarted): retryable 503.

    SQLAlchemy has already dropped the pool's older connections, so the retry gets a fresh one. Any other
    database error is a bug and goes on to the last-resort 500.
    """
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return await _unavailable(request, exc)
    raise exc


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for exc_type in UNAVAILABLE_ERRORS:
        app.add_exception_handler(exc_type, _unavailable)
    app.add_exception_handler(sa_exc.DBAPIError, _database_error)
