"""Application factory: `create_app()` wires settings, database, middleware, errors and routers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app import eventlog, metrics
from app.config import Settings, get_settings
from app.db import Database
from app.error_handlers import install_error_handlers
from app.logs import setup_logging
from app.middleware import RequestContextMiddleware
from app.ratelimit import RateLimiter
from app.routers import (
    agents,
    api_keys,
    auth,
    callbacks,
    chats,
    error_logs,
    exports,
    health,
    invites,
    messages,
    metrics_route,
    n8n_chat,
    openai_api,
    shares,
    stream,
    teams,
    usage,
    users,
)
from app.routers import files as files_router
from app.routers.responses import complete_openapi
from app.serve import limit_uvicorn_write_stalls, release_uvicorn_proxy_headers
from app.services.health import migration_head
from app.services.imports import ImportGate
from app.services.revocation import make_revocation_store
from app.state import AppState, app_state
from app.streaming import GenerationRegistry, N8nStreamer
from app.uploads import UploadSlots
from app.webclient import install_web_client

logger = logging.getLogger("app")

DESCRIPTION = """
Chat with your team's n8n agents. Authenticate with the **Authorize** button (email as username,
your team id as `client_id` when your email exists in several teams), or send
`Authorization: Bearer <token>`. Message answers stream as Server-Sent Events.

Errors are `{"detail": "..."}`; a 422 always has FastAPI's validation shape (`detail[].loc/msg/type`, never
the value sent). Text anywhere in a JSON body (keys of free JSON included) must not contain NUL characters,
which PostgreSQL cannot store: 422.
"""
#: Swagger UI and ReDoc builds shipped by the fastapi-offline package, served by the app itself.
DOCS_ASSETS_DIR = str(files("fastapi_offline") / "static")
DOCS_ASSETS_URL = "/docs/assets"


#: Container allocations (net of frees) between two collections of the youngest generation; CPython's is 700.
GC_YOUNG_THRESHOLD = 2_000


def tune_gc() -> None:
    """Fewer garbage collections, none over what startup built (docs/PERFORMANCE.md, "Garbage collection").

    Startup leaves ~185,000 long-lived objects (modules, SQLAlchemy, pydantic, the routes), which every full
    collection walked again: 130 ms with the event loop stopped, every ~1,000 streams. Frozen, the collector
    never looks at them. The youngest generation, collected every 700 allocations by default, walked what the
    open streams hold each time: at 2,000 the collections cost ~0.09 ms per stream in total instead of ~0.16
    ms, with shorter longest pauses (a larger threshold costs less in total but pauses longer each time).
    """
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app_state(app)
    logger.info("starting (database: %s)", state.settings.DATABASE_URL.split(":", 1)[0])
    await state.generations.startup()
    if state.settings.APP_ENV != "test":
        # Not in the test suite's process: it builds and drops an app per test, and frozen objects are never
        # collected, so their cycles would pile up there.
        tune_gc()
    try:
        yield
    finally:
        await shutdown(app)


async def shutdown(app: FastAPI) -> None:
    """Release what `create_app` opened; tests call it for apps they never ran a lifespan on."""
    # First: running generations get their grace period and their final write while the database is up.
    state = app_state(app)
    await state.generations.shutdown()
    if state.redis is not None:
        await state.redis.aclose()
    await state.db.dispose()
    metrics.worker_exited()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    setup_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    release_uvicorn_proxy_headers()  # when uvicorn calls us as a factory: TRUSTED_PROXIES alone decides
    limit_uvicorn_write_stalls(settings)  # ... and a client that stops reading is cut off (app.write_stall)
    app = FastAPI(
        title="n8n Chat Relay",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        swagger_ui_parameters={"persistAuthorization": True},
        # FastAPI's native OpenTelemetry: this service exports Prometheus metrics and JSON logs, and with no
        # OpenTelemetry provider installed the check alone cost every request ~60 µs (docs/PERFORMANCE.md).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.container = build_state(settings)

    install_error_handlers(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.CORS_ORIGINS,
        allow_credentials=True,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        # The headers the API documents: Last-Event-ID (follow), Idempotency-Key (send), X-Session-Id (/v1), and
        # those OpenAI's SDKs send on every call (a browser page using one could not call /v1 without them).
        allow_headers=[
            "Authorization",
            "Content-Type",
            "X-Request-ID",
            "Last-Event-ID",
            "Idempotency-Key",
            "X-Session-Id",
            *openai_api.SDK_HEADERS,
        ],
        expose_headers=["X-Total-Count", "X-Request-ID", "Retry-After"],
        max_age=600,
    )
    # Outermost, so even CORS and error responses carry the request id and security headers.
    app.add_middleware(RequestContextMiddleware, settings=settings)

    # The streaming routes' routers first: FastAPI matches a request against the included routers in order,
    # checking every route of each router it passes (the send paid ~0.1 ms of CPU for it, a `/v1` completion
    # ~0.2 ms; docs/PERFORMANCE.md). Their paths shadow no other route (tests/test_layers.py). The document
    # keeps the reading order.
    for router in (*STREAMING_ROUTERS, *(router for router in ROUTERS if router not in STREAMING_ROUTERS)):
        app.include_router(router)
    install_docs(app)
    install_web_client(app, settings)
    install_openapi(app, settings)
    return app


def build_state(settings: Settings) -> AppState:
    """What the app holds, built once; its stores share the one database and the one Redis client."""
    db = Database(settings)
    redis = eventlog.connect(settings)
    return AppState(
        settings=settings,
        db=db,
        redis=redis,
        limiter=RateLimiter(settings, redis),
        revocations=make_revocation_store(sessionmaker=db.sessionmaker),
        generations=GenerationRegistry(settings=settings, db=db, streamer=N8nStreamer(settings), redis=redis),
        uploads=UploadSlots(settings.FILE_UPLOADS_PER_USER),
        imports=ImportGate(settings.IMPORT_MAX_CONCURRENT),
        migration_head=migration_head(),
    )


#: The routers in reading order (the API document's order). `create_app` includes them in this order but for
#: the send route's, which it includes first.
ROUTERS = (
    health.router,
    auth.router,
    teams.router,
    invites.router,
    users.router,
    api_keys.router,
    agents.router,
    n8n_chat.router,
    exports.router,  # before `chats`: `/api/chats/export` and `/api/chats/import` are not chat ids
    chats.router,
    shares.router,
    messages.router,
    files_router.router,
    stream.router,
    error_logs.router,
    usage.router,
    metrics_route.router,
    callbacks.router,
    openai_api.router,
)
#: What a stream's requests use (a send, a follow or stop, n8n's callbacks, `/v1`, the widget): matched first.
STREAMING_ROUTERS = (messages.router, stream.router, callbacks.router, openai_api.router, n8n_chat.router)


def _reading_order(paths: dict[str, Any]) -> dict[str, Any]:
    """The document's paths in `ROUTERS` order (each path where its router's first route with it is)."""
    rank: dict[str, int] = {}
    for index, router in enumerate(ROUTERS):
        for route in router.routes:
            rank.setdefault(getattr(route, "path", ""), index)
    return dict(sorted(paths.items(), key=lambda item: rank.get(item[0], len(ROUTERS))))


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """FastAPI's document, completed with the answers every route shares and this server's limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = complete_openapi(FastAPI.openapi(app), message_max_chars=settings.MESSAGE_MAX_CHARS)
            document["paths"] = _reading_order(document["paths"])
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_docs(app: FastAPI) -> None:
    """/docs and /redoc from the app's own assets (FastAPI's "self-hosting JavaScript and CSS for docs").

    FastAPI's default pages load swagger-ui-dist and redoc from a CDN, so they stay blank without internet.
    """
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui_html(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + redirect_url,
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc_html(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
