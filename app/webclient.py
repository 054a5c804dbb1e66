"""The browser client: `GET /` and its static files under `/web/` (app/web), gzip-compressed, outside the schema."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.middleware.gzip import GZipMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from app.config import Settings

WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_URL = "/web"
#: No build step means no hashed file names: the browser revalidates every file (ETag, 304) instead of caching
#: an old copy after an upgrade.
CACHE_CONTROL = "no-cache"


class RevalidatedStaticFiles(StaticFiles):
    """StaticFiles whose answers carry `Cache-Control: no-cache` (a cheap 304 on every load after the first)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_cache_control(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"cache-control", CACHE_CONTROL.encode())]
            await send(message)

        await super().__call__(scope, receive, with_cache_control)


def install_web_client(app: FastAPI, settings: Settings) -> None:
    """Serve the client unless `WEB_CLIENT_ENABLED` is off; its CSP is set by the middleware (`WEB_CSP`)."""
    if not settings.WEB_CLIENT_ENABLED:
        return
    # Text files compress 3-4x; SSE never passes here (the API routes are not wrapped).
    app.mount(WEB_URL, GZipMiddleware(RevalidatedStaticFiles(directory=WEB_DIR), minimum_size=512), name="web")
    index = WEB_DIR / "index.html"

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def web_client() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers={"Cache-Control": CACHE_CONTROL})
