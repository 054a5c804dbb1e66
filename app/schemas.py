"""Request and response bodies: `XCreate` / `XUpdate` in, `XRead` out. Inputs forbid unknown fields."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator


def _storable_text(value: str) -> str:
    """PostgreSQL text and JSONB cannot hold NUL or lone surrogates: refuse them as a 422, not a 500."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode") from None
    return value


#: Use for every free-text input field that is stored.
StorableText = AfterValidator(_storable_text)


JSON_MAX_DEPTH = 32


def _json_problem(value: Any) -> str | None:
    """Walk the value without recursion: too deep, or a NUL in any key or string."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > JSON_MAX_DEPTH:
            return f"is nested deeper than {JSON_MAX_DEPTH} levels"
        if isinstance(item, str):
            if "\x00" in item:
                return "must not contain NUL characters"
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return None


def check_storable_json(value: Any, *, max_bytes: int, label: str) -> Any:
    """JSON that PostgreSQL's JSONB accepts (no NaN/Infinity, NUL or lone surrogates) within size caps."""
    problem = _json_problem(value)
    if problem:
        raise ValueError(f"{label} {problem}")
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{label} must be valid Unicode") from None
    except ValueError:
        raise ValueError(f"{label} must not contain NaN or Infinity") from None
    if size > max_bytes:
        raise ValueError(f"{label} is larger than {max_bytes} bytes of JSON")
    return value


class InputModel(BaseModel):
    """Base of every request body: unknown fields are a 422, never silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ReadModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class HealthRead(ReadModel):
    status: str


# --- teams, users and auth -------------------------------------------------------------------


# --- agents ----------------------------------------------------------------------------------

AGENT_NAME_MAX = 100
AGENT_DESCRIPTION_MAX = 2_000
AGENT_SYSTEM_PROMPT_MAX = 20_000
AGENT_CONFIG_MAX_BYTES = 16_384
WEBHOOK_HEADERS_MAX_COUNT = 20
WEBHOOK_HEADER_NAME_MAX = 100
WEBHOOK_HEADER_VALUE_MAX = 4_096
#: RFC 7230 `token`: the only characters a header name may contain.
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Headers the relay owns (framing, hop-by-hop, routing, body type and encodings); an admin cannot set them.
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "content-type",
        "content-encoding",
        "accept-encoding",
        "expect",
    }
)


def _check_webhook_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    """Validate names and values; messages name the header at most, never echo a value."""
    if headers is None:
        return None
    if len(headers) > WEBHOOK_HEADERS_MAX_COUNT:
        raise ValueError(f"at most {WEBHOOK_HEADERS_MAX_COUNT} webhook headers")
    seen: set[str] = set()
    for name, value in headers.items():
        if not HEADER_NAME_RE.match(name) or len(name) > WEBHOOK_HEADER_NAME_MAX:
            raise ValueError(
                f"a header name must be 1-{WEBHOOK_HEADER_NAME_MAX} token characters (letters, digits, !#$%&'*+-.^_`|~)"
            )
        lower = name.lower()
        if lower in FORBIDDEN_HEADERS or lower.startswith("proxy-"):
            raise ValueError(f"header {name} is set by the relay and cannot be configured")
        if lower in seen:
            raise ValueError(f"header {name} is given twice (names are case-insensitive)")
        seen.add(lower)
        if len(value) > WEBHOOK_HEADER_VALUE_MAX:
            raise ValueError(f"the value of header {name} is longer than {WEBHOOK_HEADER_VALUE_MAX} characters")
        if any(c in value for c in "\r\n\x00"):
            raise ValueError(f"the value of header {name} contains CR, LF or NUL")
        if not all(" " <= c <= "~" or c == "\t" for c in value):
            raise ValueError(f"the value of header {name} must be printable ASCII")
        if value != value.strip():
            raise ValueError(f"the value of header {name} has leading or trailing whitespace")
    return headers


def _check_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is not None:
        check_storable_json(config, max_bytes=AGENT_CONFIG_MAX_BYTES, label="config")
    return config


AgentName = Annotated[str, Field(min_length=1, max_length=AGENT_NAME_MAX, examples=["Support bot"]), StorableText]
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        description="http(s) URL of the n8n Webhook (or Chat Trigger) node; checked against the SSRF policy.",
        examples=["https://n8n.example.com/webhook/support-agent"],
    ),
    StorableText,
]
WebhookHeaders = Annotated[
    dict[str, str],
    Field(
        description="Write-only headers sent with every call (e.g. n8n Header Auth). Replaces the whole set; "
        "`{}` clears it. Never returned.",
        examples=[{"X-N8N-Auth": "a-long-random-secret"}],
    ),
]
AgentConfig = Annotated[
    dict[str, Any],
    Field(
        description=f"Free JSON passed to n8n as `config` (at most {AGENT_CONFIG_MAX_BYTES} bytes).",
        examples=[{"model": "gpt-4", "temperature": 0.7}],
    ),
]
AgentDescription = Annotated[str, Field(max_length=AGENT_DESCRIPTION_MAX), StorableText]
SystemPrompt = Annotated[str, Field(max_length=AGENT_SYSTEM_PROMPT_MAX, examples=["You answer briefly."]), StorableText]


class AgentCreate(InputModel):
    name: AgentName
    description: AgentDescription | None = None
    webhook_url: WebhookUrl
    webhook_headers: WebhookHeaders | None = None
    system_prompt: SystemPrompt | None = None
    config: AgentConfig = Field(default_factory=dict)
    is_active: StrictBool = True

    _headers = field_validator("webhook_headers")(_check_webhook_headers)
    _config = field_validator("config")(_check_config)


#: Fields of AgentUpdate that cannot be set to null (the column is NOT NULL).
_AGENT_REQUIRED = ("name", "webhook_url", "config", "is_active")


class AgentUpdate(InputModel):
    """Partial update: only the fields sent change. `webhook_headers`: sent = replaced, `{}` or null = cleared."""

    name: AgentName | None = None
    description: AgentDescription | None = None
    webhook_url: WebhookUrl | None = None
    webhook_headers: WebhookHeaders | None = None
    system_prompt: SystemPrompt | None = None
    config: AgentConfig | None = None
    is_active: StrictBool | None = None

    _headers = field_validator("webhook_headers")(_check_webhook_headers)
    _config = field_validator("config")(_check_config)

    @model_validator(mode="after")
    def _no_null_for_required(self) -> AgentUpdate:
        for name in _AGENT_REQUIRED:
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class AgentRead(ReadModel):
    """What every member of the team sees. Never the webhook URL or its headers."""

    id: uuid.UUID
    team_id: uuid.UUID
    name: str
    description: str | None
    system_prompt: str | None
    config: dict[str, Any]
    avatar_url: str | None = Field(
        description="Changes whenever the avatar does (cache-busting `v`); null without an avatar.",
        examples=["/api/agents/5b7c.../avatar?v=2"],
    )
    is_active: bool
    created_at: datetime
    updated_at: datetime


class AgentAdminRead(AgentRead):
    """The admin view adds where the agent lives and which header names are configured (never values)."""

    webhook_url: str
    webhook_header_names: list[str] = Field(description="Sorted names of the configured webhook headers.")


# --- chats and messages ----------------------------------------------------------------------

CHAT_TITLE_MAX = 200
ChatTitle = Annotated[str, Field(max_length=CHAT_TITLE_MAX, examples=["Quarterly report questions"]), StorableText]
MessageRole = Literal["user", "assistant"]
MessageStatus = Literal["complete", "streaming", "error", "cancelled", "interrupted"]


class ChatCreate(InputModel):
    agent_id: uuid.UUID
    title: ChatTitle | None = Field(None, description="Empty = taken from the first message.")


class ChatUpdate(InputModel):
    title: ChatTitle | None = Field(None, description="null or empty makes the chat untitled.")
    archived: StrictBool | None = None
    pinned: StrictBool | None = None

    @model_validator(mode="after")
    def _no_null_flags(self) -> ChatUpdate:
        for name in ("archived", "pinned"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class MessageError(ReadModel):
    message: str
    code: str | None = None


class MessageRead(ReadModel):
    """One stored message. `error` and `metadata` are null when absent; internal `_` keys never leave."""

    id: uuid.UUID
    role: MessageRole
    content: str
    status: MessageStatus
    created_at: datetime
    error: MessageError | None = None
    metadata: dict[str, Any] | None = None


class ChatSummary(ReadModel):
    id: uuid.UUID
    agent_id: uuid.UUID
    title: str | None
    archived: bool
    pinned: bool
    message_count: int
    created_at: datetime
    updated_at: datetime


class ChatRead(ChatSummary):
    team_id: uuid.UUID
    user_id: uuid.UUID
    messages: list[MessageRead]


# --- message stream and error logs -----------------------------------------------------------
