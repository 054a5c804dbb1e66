"""Logging set-up: plain text or JSON lines, each line tagged with the request id, secrets left out."""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from urllib.parse import unquote_plus

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Route our and uvicorn's loggers through one handler so every line carries the request id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_relay_handler", False):
            root.removeHandler(old)
    handler._relay_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    # The app writes the one access line (app.middleware: request id, client, secrets left out). uvicorn
    # logs its own line only while `uvicorn.access` has a handler, here or through propagation: none.
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False


#: Paths that carry a secret: everything after one of these prefixes is logged as `***`, so a token
#: holding a slash or followed by more segments leaks nothing. A feature with a token in its path adds a line.
SECRET_PATH_PREFIXES: tuple[str, ...] = (
    "/api/invites/",  # GET /api/invites/{token}: invitation preview
    "/api/callbacks/",  # signed callback links
    "/api/files/signed/",  # signed file links
)
#: Query parameters whose value is a secret, compared case-insensitively ...
SECRET_PARAMS = frozenset(
    {"code", "key", "apikey", "auth", "jwt", "otp", "password", "passwd", "pwd", "secret", "session", "sig", "invite"}
)
#: ... and any parameter whose name ends like this (`access_token`, `X-Amz-Signature`, `client_secret`).
SECRET_SUFFIXES = ("token", "_key", "-key", "secret", "password", "signature", "credential", "_sig")
REDACTED = "***"
_SLASHES = re.compile(r"/{2,}")
_QUERY_PARTS = re.compile(r"([^&;]*)([&;]?)")
_PARAM_DECORATION = re.compile(r"[^a-z0-9_-]+")


def redact_path(path: str) -> str:
    """The path as it may be logged: no secret segment, no control character.

    A prefix is looked for anywhere in the path, not only at its start: behind a root path (uvicorn puts
    `root_path` in front of `scope["path"]`) the route still carries its token.
    """
    collapsed = _SLASHES.sub("/", path)
    lowered = collapsed.lower()
    for prefix in SECRET_PATH_PREFIXES:
        at = lowered.find(prefix)
        if at >= 0 and len(collapsed) > at + len(prefix):
            return printable(collapsed[:at]) + prefix + REDACTED
    return printable(path)


def redact_query(query: str) -> str:
    """The query string as it may be logged: every secret-looking parameter keeps its name, not its value.

    Split on `;` as well as `&` (some parsers accept both), and names are judged without the decorations
    frameworks tolerate (`access_token[]`, `token.`, an escaped NUL).
    """
    parts = []
    for part, separator in _QUERY_PARTS.findall(query):
        name = part.partition("=")[0]
        if _is_secret_param(_PARAM_DECORATION.sub("", unquote_plus(name).lower().partition("[")[0])):
            part = f"{name}={REDACTED}"
        parts.append(part + separator)
    return printable("".join(parts))


def _is_secret_param(name: str) -> bool:
    return name in SECRET_PARAMS or name.endswith(SECRET_SUFFIXES)


def printable(text: str) -> str:
    """A decoded path can hold newlines (`%0a`): escape control characters so no one can forge log lines."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
