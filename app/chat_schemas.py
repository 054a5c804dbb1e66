"""Bodies of the conversation side: agents, chats, messages and error logs (re-exported by app/schemas.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictBool, field_validator

from app.fields import (
    AgentConfig,
    AgentDescription,
    AgentName,
    AgentSlug,
    ChatTitle,
    InputModel,
    NotNull,
    ReadModel,
    SystemPrompt,
    WebhookHeaders,
    WebhookUrl,
    check_agent_config,
    check_webhook_headers,
)

# --- agents ----------------------------------------------------------------------------------


class AgentCreate(InputModel):
    name: AgentName
    slug: AgentSlug | None = Field(None, description="Left out or null: made from the name. Taken: 409.")
    description: AgentDescription | None = None
    webhook_url: WebhookUrl
    webhook_headers: WebhookHeaders | None = None
    system_prompt: SystemPrompt | None = None
    config: AgentConfig = Field(default_factory=dict)
    is_active: StrictBool = True

    _headers = field_validator("webhook_headers")(check_webhook_headers)
    _config = field_validator("config")(check_agent_config)


class AgentUpdate(InputModel):
    """Partial update: only the fields sent change. `webhook_headers`: sent = replaced, `{}` or null = cleared."""

    name: Annotated[AgentName | None, NotNull] = None
    slug: Annotated[AgentSlug | None, NotNull] = None
    description: AgentDescription | None = None
    webhook_url: Annotated[WebhookUrl | None, NotNull] = None
    webhook_headers: WebhookHeaders | None = None
    system_prompt: SystemPrompt | None = None
    config: Annotated[AgentConfig | None, NotNull] = None
    is_active: Annotated[StrictBool | None, NotNull] = None

    _headers = field_validator("webhook_headers")(check_webhook_headers)
    _config = field_validator("config")(check_agent_config)


class AgentRead(ReadModel):
    """What every member of the team sees. Never the webhook URL or its headers."""

    id: uuid.UUID
    team_id: uuid.UUID
    name: str
    slug: str = Field(description="Unique in the team; the `model` name of the agent.", examples=["support-bot"])
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


class AgentTestResult(ReadModel):
    """One probe of an agent's webhook: what n8n answered and, when something is off, what to change."""

    ok: bool = Field(description="The probe got an answer a real message would have stored as complete.")
    http_status: int | None = Field(description="n8n's HTTP status; null when nothing answered.", examples=[200])
    format: Literal["ndjson", "sse", "json", "text", "empty"] | None = Field(
        description="The answer's format, judged by its body; null when there was no answer body to judge.",
        examples=["ndjson"],
    )
    first_byte_ms: float | None = Field(description="Milliseconds to n8n's first body byte.", examples=[41.7])
    total_ms: float = Field(description="Milliseconds the whole probe took.", examples=[212.3])
    sample: str | None = Field(
        description="The first 200 characters of the answer text (secret header values masked); null if none.",
        examples=["Echo: ping"],
    )
    code: str | None = Field(
        description="The error code a real message would have ended with; null when ok.", examples=[None]
    )
    hint: str | None = Field(
        description="One sentence on what to change in n8n (or in the agent); null when nothing needs changing.",
        examples=[None],
    )


# --- chats and messages ----------------------------------------------------------------------

MessageRole = Literal["user", "assistant"]
MessageStatus = Literal["complete", "streaming", "error", "cancelled", "interrupted"]


class ChatCreate(InputModel):
    agent_id: uuid.UUID
    title: ChatTitle | None = Field(None, description="Empty = taken from the first message.")


class ChatUpdate(InputModel):
    title: ChatTitle | None = Field(None, description="null or empty makes the chat untitled.")
    archived: Annotated[StrictBool | None, NotNull] = None
    pinned: Annotated[StrictBool | None, NotNull] = None


class MessageError(ReadModel):
    message: str
    code: str | None = None


def format_timestamp(value: datetime) -> str:
    """The API's one timestamp text: ISO 8601 in UTC ending in `Z`, as pydantic renders UTC datetimes."""
    return _in_utc(value).isoformat().replace("+00:00", "Z")


def _in_utc(value: datetime) -> datetime:
    """Naive values are UTC; any other offset is converted, so every rendered timestamp ends in `Z`."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class MessageRead(ReadModel):
    """One stored message, the same everywhere (REST and the stream's start/done events).

    Every key is always present (`error` and `metadata` null when absent); internal `_` keys never leave.
    """

    id: uuid.UUID
    role: MessageRole
    content: str
    status: MessageStatus
    created_at: Annotated[datetime, AfterValidator(_in_utc)]
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


class MessageCreate(InputModel):
    """The user's message; the answer streams back as Server-Sent Events."""

    content: str = Field(
        description="The message text (not blank; at most MESSAGE_MAX_CHARS characters, default 32,000)",
        examples=["What changed in the Q3 numbers?"],
        # The service refuses blank and too long content (422); `maxLength` is set from the settings in the
        # served document (app.routers.responses.complete_openapi).
        json_schema_extra={"minLength": 1, "pattern": r"\S"},
    )


class ErrorLogRead(ReadModel):
    """A failed generation, as admins see it. Never a secret, a token or a raw upstream body."""

    id: uuid.UUID
    code: str = Field(examples=["upstream_timeout"])
    message: str = Field(examples=["The agent stopped sending its answer"])
    upstream_status: int | None = Field(examples=[200])
    chat_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    user_id: uuid.UUID | None
    created_at: datetime
