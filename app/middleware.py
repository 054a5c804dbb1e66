"""Pure ASGI middleware: client address, request id, security headers, body limit, access log, last-resort 500.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through unbuffered.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.error_handlers import NO_RETRY, is_openai_path, openai_error_body
from app.logs import SECRET_PATH_PREFIXES, redact_path, redact_query, request_id_var
from app.proxies import client_address, parse_networks

logger = logging.getLogger("app.access")
error_logger = logging.getLogger("app.errors")

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._\-]{1,128}")  # used with fullmatch (`$` lets a final newline in)
#: A Content-Length as digits Python reads as such (bounded: a longer one is past any limit anyway).
DECIMAL = re.compile(r"[0-9]{1,19}")
AVATAR_UPLOAD_RE = re.compile(r"^/api/agents/[^/]+/avatar/?$")
FILE_UPLOAD_RE = re.compile(r"^/api/chats/[^/]+/files/?$")
CALLBACK_PREFIX = "/api/callbacks/"
#: The auth routes (app.routers.auth), and the paths holding a secret (app.logs.SECRET_PATH_PREFIXES): every
#: answer, errors included, gets `Cache-Control: no-store`.
AUTH_PATH = "/api/auth"
AUTH_PREFIX = AUTH_PATH + "/"
IMPORT_PATH_RE = re.compile(r"^/api/chats/import/?$")
#: Paths that carry a secret (an invite token): logged with the secret cut out.
#: Room for multipart boundaries and part headers around the avatar file itself.
MULTIPART_OVERHEAD = 64 * 1024

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
#: The docs pages load their assets from the app itself (main.install_docs): no third-party host. The inline
#: parts are Swagger UI's start-up script and ReDoc's styles.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")
#: The browser client (app/webclient.py): its own files only; no inline script or style, no eval. Images may be
#: `data:`/`blob:` (a chosen avatar's preview); answers' images from other hosts are blocked (no tracking pixels).
WEB_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; frame-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
WEB_PREFIX = "/web/"


class BodyTooLarge(StarletteHTTPException):
    """An HTTPException so FastAPI's body parsing re-raises it instead of turning it into a 400."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="Request body too large")


def too_large_body(path: str) -> dict[str, Any]:
    """The 413 body: `{"detail"}`, or OpenAI's shape on the OpenAI-compatible routes."""
    if is_openai_path(path):
        return openai_error_body(413, "Request body too large")
    return {"detail": "Request body too large"}


def _internal_error(path: str, request_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The 500 (a bug) and its headers: `{"detail", "request_id"}`, or OpenAI's shape on the OpenAI-compatible
    routes with `x-should-retry: false`. OpenAI's own 500s are transient and its clients retry them (twice by
    default); this one is not (a database or Redis that is away is a 503 with Retry-After, app.error_handlers),
    and each retry could take another quota slot."""
    if is_openai_path(path):
        message = f"Internal server error (request id {request_id})"
        return openai_error_body(500, message), NO_RETRY
    return {"detail": "Internal server error", "request_id": request_id}, {}


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.hsts = settings.COOKIE_SECURE
        self.trusted = parse_networks(settings.TRUSTED_PROXIES)
        # Built once: these are the same for every request (per CSP), and an open stream holds its copy.
        # An API answer holds a team's data for whoever asked: no browser or proxy keeps a copy (past a logout,
        # a deletion, a revoked share) unless the route set its own policy (avatars, SSE streams, files).
        self._api_headers = [*self.security_headers(csp=API_CSP), (b"cache-control", b"no-store")]
        self._docs_headers = self.security_headers(csp=DOCS_CSP)
        self._web_headers = self.security_headers(csp=WEB_CSP)
        # Auth answers carry tokens or personal data, and their errors say whether an account exists or is
        # locked out: none is ever cached by a browser or a proxy, error answers included.
        self._auth_headers = [*self._api_headers, (b"pragma", b"no-cache")]

    def body_limit(self, scope: Scope) -> int:
        if scope.get("method") == "POST" and AVATAR_UPLOAD_RE.match(scope.get("path", "")):
            return self.settings.AVATAR_MAX_BYTES + MULTIPART_OVERHEAD
        if scope.get("method") == "POST" and FILE_UPLOAD_RE.match(scope.get("path", "")):
            return self.settings.FILE_MAX_BYTES + MULTIPART_OVERHEAD
        if scope.get("method") == "POST" and IMPORT_PATH_RE.match(scope.get("path", "")):
            return self.settings.IMPORT_MAX_BODY_BYTES  # exported chats; counted as they arrive
        if scope.get("path", "").startswith(CALLBACK_PREFIX):
            return self.settings.CALLBACK_MAX_BODY_BYTES  # n8n's progress callbacks are small
        return self.settings.MAX_REQUEST_BODY_BYTES

    def security_headers(self, *, csp: str) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"content-security-policy", csp.encode()),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        if self.hsts:
            headers.append((b"strict-transport-security", b"max-age=31536000; includeSubDomains"))
        return headers

    def headers_for(self, path: str) -> list[tuple[bytes, bytes]]:
        """The security headers of a path: the docs and the web client load their own assets, the API none."""
        if path in DOCS_PATHS:
            return self._docs_headers
        if path == "/" or path.startswith(WEB_PREFIX):
            return self._web_headers
        if path == AUTH_PATH or path.startswith(AUTH_PREFIX) or path.startswith(SECRET_PATH_PREFIXES):
            # A URL holding a secret (an invite token, a signed link) is kept out of every cache too.
            return self._auth_headers
        return self._api_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        client = self.resolve_client(scope)
        raw_id = _header(scope, b"x-request-id")
        request_id = raw_id if raw_id and REQUEST_ID_RE.fullmatch(raw_id) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        path: str = scope.get("path", "")
        started = time.perf_counter()
        state: dict[str, Any] = {"started": False, "status": 0}
        limit = self.body_limit(scope)
        extra_headers = [
            (b"x-request-id", request_id.encode()),
            *self.headers_for(path),
        ]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["status"] = message["status"]
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (name, value) for name, value in extra_headers if name not in present
                ]
            await send(message)

        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        try:
            declared = _header(scope, b"content-length")
            # ASCII digits only: `str.isdigit` also takes `²` (a latin-1 byte), which int() refuses.
            if declared is not None and DECIMAL.fullmatch(declared) and int(declared) > limit:
                await self._send_json(send_wrapper, 413, too_large_body(path))
                return
            await self.app(scope, receive_wrapper, send_wrapper)
        except BodyTooLarge:
            if not state["started"]:
                await self._send_json(send_wrapper, 413, too_large_body(path))
        except Exception:
            error_logger.exception("unhandled error on %s %s", scope.get("method"), redact_path(path))
            if not state["started"]:
                body, headers = _internal_error(path, request_id)
                await self._send_json(send_wrapper, 500, body, headers)
        finally:
            query = scope.get("query_string", b"")
            logger.info(
                "%s %s %s%s %s %.1fms",
                client,
                scope.get("method"),
                redact_path(path),
                "?" + redact_query(query.decode("latin-1")) if query else "",
                state["status"] or "-",
                (time.perf_counter() - started) * 1000,
            )
            request_id_var.reset(token)

    def resolve_client(self, scope: Scope) -> str:
        """Decide the client address once, from TRUSTED_PROXIES only, and write it into the scope.

        The rate limiter reads `request.client` and the access log this value: both see the same address.
        """
        peer = scope.get("client")
        if not peer:
            return "-"
        host = str(peer[0])
        if not self.trusted:
            return host
        headers = scope.get("headers", [])
        forwarded = [value.decode("latin-1") for key, value in headers if key.lower() == b"x-forwarded-for"]
        resolved = client_address(host, forwarded, self.trusted)
        if resolved != host:
            scope["client"] = (resolved, 0)
        return resolved

    @staticmethod
    async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        extra = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None
