"""Progress callbacks: the signed per-generation URL n8n posts to, and what a generation keeps of them.

A callback URL is `{PUBLIC_BASE_URL}/api/callbacks/{generation id}/{signature}`, the signature an HMAC-SHA256
of the generation id under a key derived from JWT_SECRET (no secret of its own to manage; a label keeps it
apart from the tokens' use of that secret). It is accepted only while that generation runs (app.generations),
so a URL leaked from n8n's execution log is worthless once the answer ended. No FastAPI here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from typing import Any

from app.config import Settings
from app.n8n_parser import StreamFailure, add_usages

#: The path callbacks are posted to (app/logs.py redacts everything after it).
PATH_PREFIX = "/api/callbacks/"
_KEY_LABEL = b"n8n-chat-relay callback url v1"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _key(settings: Settings) -> bytes:
    return hmac.new(settings.JWT_SECRET.encode(), _KEY_LABEL, hashlib.sha256).digest()


def sign(settings: Settings, message: str) -> str:
    """The URL-safe HMAC-SHA256 of `message` under the link key (callback links, signed file links)."""
    digest = hmac.new(_key(settings), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signature(settings: Settings, generation_id: str) -> str:
    return sign(settings, f"callback:{generation_id}")


def callback_url(settings: Settings, generation_id: str) -> str | None:
    """The generation's callback URL, or None without PUBLIC_BASE_URL (n8n could not reach us)."""
    if settings.PUBLIC_BASE_URL is None:
        return None
    return f"{settings.PUBLIC_BASE_URL}{PATH_PREFIX}{generation_id}/{signature(settings, generation_id)}"


def verify(settings: Settings, generation_id: str, given: str) -> bool:
    """Whether `given` is the signature of `generation_id` (constant-time; a malformed id never matches)."""
    if not _UUID.match(generation_id):
        return False
    return hmac.compare_digest(signature(settings, generation_id).encode(), given.encode("utf-8", "replace"))


#: In callback mode, webhook outcomes that do not mean "the workflow did not run": a proxy (or our own request
#: timeouts) gave up waiting, or the immediate answer has no text (it is not the reply anyway). A generation
#: keeps waiting for callbacks after them; the connection test reports them as a started workflow.
CUT_CODES = frozenset({"upstream_disconnected", "upstream_timeout", "empty_response", "bad_upstream_response"})
CUT_STATUSES = frozenset({502, 504, 524})


def outlived_in_callback_mode(exc: BaseException) -> bool:
    """A webhook failure that callback mode outlives (CUT_CODES, or a proxy's gateway status). A connection
    never made (N8N_CONNECT_TIMEOUT) sent no request: the workflow did not run, and nothing will post."""
    if not isinstance(exc, StreamFailure):
        return False
    if exc.code == "upstream_timeout" and exc.detail.get("timeout") == "connect":
        return False
    return exc.code in CUT_CODES or (exc.code == "upstream_error" and exc.upstream_status in CUT_STATUSES)


def shortened(value: Any, limit: int) -> Any:
    """`value` as sent when its JSON has at most `limit` characters, else that JSON cut to `limit` plus `…`."""
    if value is None or (isinstance(value, str) and len(value) <= limit):
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) <= limit:
        return value
    return text[:limit] + "…"


class CallbackInbox:
    """What one generation received by callback: its steps (bounded), token usage, and the first terminal.

    `last_at` (loop time) is when the latest callback came, for callback mode's silence timeout; `ended` is
    set by the first `done` or `error`; `closed` once the generation's outcome is decided otherwise, after
    which nothing is accepted.
    """

    __slots__ = (
        "closed",
        "ended",
        "error",
        "last_at",
        "limit",
        "max_steps",
        "max_text_bytes",
        "on_text",
        "steps",
        "steps_dropped",
        "text_bytes",
        "too_large",
        "usage",
    )

    def __init__(self, settings: Settings, now: float) -> None:
        self.max_steps = settings.CALLBACK_MAX_STEPS
        self.limit = settings.CALLBACK_STEP_MAX_CHARS
        self.steps: list[dict[str, Any]] = []
        self.steps_dropped = 0
        #: The answer's text, by callback and (stream mode) from the webhook together, counts against one cap,
        #: the one a streamed answer has (N8N_MAX_RESPONSE_BYTES): each path alone let an answer hold twice it.
        self.max_text_bytes = settings.N8N_MAX_RESPONSE_BYTES
        self.text_bytes = 0
        #: Set with `ended` when a piece of text would have passed the cap: the path it came by ("callback" or
        #: "webhook"). The answer fails.
        self.too_large: str | None = None
        self.usage: tuple[int, int] | None = None
        self.error: str | None = None
        self.last_at = now
        self.ended = asyncio.Event()
        self.closed = False
        #: Set by the generation task: appends text exactly as a streamed chunk is appended.
        self.on_text: Callable[[list[str]], None] | None = None

    @property
    def open(self) -> bool:
        return not self.closed and not self.ended.is_set()

    def within_cap(self, chunks: list[str], via: str) -> list[str]:
        """The leading `chunks` that keep the answer's text within the cap, counted; when one would pass it, the
        answer ends (`too_large`) and neither it nor any later piece, by either path, is kept."""
        if self.too_large is not None:
            return []
        for index, chunk in enumerate(chunks):
            self.text_bytes += len(chunk.encode("utf-8", "surrogatepass"))
            if self.text_bytes > self.max_text_bytes:
                self.too_large = via
                self.ended.set()
                return chunks[:index]
        return chunks

    def counting(self, on_chunks: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
        """`on_chunks` for the webhook's streamed text (stream mode): counted against the same cap as the
        callbacks' text, so the answer's total stays within it whichever path each piece came by."""

        def counted(chunks: list[str]) -> None:
            kept = self.within_cap(chunks, "webhook")
            if kept:
                on_chunks(kept)

        return counted

    def step(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """A `status` or `tool` callback as its SSE event data (shortened), kept in `steps` while room remains;
        None past CALLBACK_MAX_STEPS (only counted: the stream and the event log stay bounded too)."""
        if len(self.steps) >= self.max_steps:
            self.steps_dropped += 1
            return None
        if body["type"] == "status":
            data: dict[str, Any] = {"description": shortened(body["description"], self.limit), "done": False}
            stored: dict[str, Any] = {"type": "status", "description": data["description"]}
        else:
            data = {"name": body["name"]}
            for name in ("input", "output"):
                if body.get(name) is not None:
                    data[name] = shortened(body[name], self.limit)
            stored = {"type": "tool", **data}
        self.steps.append(stored)
        return data

    def add_usage(self, input_tokens: int, output_tokens: int) -> None:
        """Summed over the callbacks, each sum held at TOKENS_MAX: the ledger could not store more, and its
        final write would then fail (the answer lost)."""
        self.usage = add_usages(self.usage, (input_tokens, output_tokens))

    def end(self, error: str | None) -> None:
        self.error = error
        self.ended.set()

    def metadata(self) -> dict[str, Any]:
        """What the stored message's metadata gains (nothing when no step came)."""
        extra: dict[str, Any] = {}
        if self.steps:
            extra["steps"] = self.steps
        if self.steps_dropped:
            extra["steps_dropped"] = self.steps_dropped
        return extra
