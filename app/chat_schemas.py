"""Bodies of the conversation side: agents, chats, messages and error logs (re-exported by app/schemas.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, ConfigDict, Field, StrictBool, field_validator, model_validator

from app.fields import (
    AgentConfig,
    AgentDescription,
    AgentName,
    AgentSlug,
    ChatTitle,
    InputModel,
    NotNull,
    ReadModel,
    StorableText,
    SystemPrompt,
    WebhookHeaders,
    WebhookUrl,
    check_agent_config,
    check_webhook_headers,
    to_utc,
)

# --- agents ----------------------------------------------------------------------------------

#: `stream`: the webhook's answer is the reply; `callback`: the reply comes by callbacks (docs/CALLBACKS.md).
ResponseMode = Literal["stream", "callback"]
RESPONSE_MODE_DOC = (
    "`stream` (default): the webhook's answer is the reply. `callback`: the webhook's answer is read for errors "
    "only and the reply comes by callbacks to `metadata.callback_url`; needs PUBLIC_BASE_URL (422 without)."
)
#: How a message's files reach n8n (docs/FILES.md).
FileDelivery = Literal["url", "multipart", "base64"]
FILE_DELIVERY_DOC = (
    "`url` (default): the JSON body's `files` carry signed download links (without PUBLIC_BASE_URL small files "
    "go inline as base64); `multipart`: multipart/form-data as n8n's Chat Trigger receives it from its chat "
    "widget; `base64`: inline in the JSON body (`files[].data`), small files only."
)


class AgentCreate(InputModel):
    name: AgentName
    slug: AgentSlug | None = Field(None, description="Left out or null: made from the name. Taken: 409.")
    description: AgentDescription | None = None
    webhook_url: WebhookUrl
    webhook_headers: WebhookHeaders | None = None
    system_prompt: SystemPrompt | None = None
    config: AgentConfig = Field(default_factory=dict)
    is_active: StrictBool = True
    response_mode: ResponseMode = Field("stream", description=RESPONSE_MODE_DOC)
    file_delivery: FileDelivery = Field("url", description=FILE_DELIVERY_DOC)

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
    response_mode: Annotated[ResponseMode | None, NotNull] = Field(None, description=RESPONSE_MODE_DOC)
    file_delivery: Annotated[FileDelivery | None, NotNull] = Field(None, description=FILE_DELIVERY_DOC)

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
    response_mode: ResponseMode = Field(description=RESPONSE_MODE_DOC)
    file_delivery: FileDelivery = Field(description=FILE_DELIVERY_DOC)


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
    current_message_id: Annotated[uuid.UUID | None, NotNull] = Field(
        None,
        description="Show the branch through this message of the chat, continued through its newest "
        "descendants; the answer's `current_message_id` is that leaf. Another chat's message: 422.",
    )


#: The longest text of a progress callback (a status line, an error): docs/CALLBACKS.md.
CALLBACK_TEXT_MAX_CHARS = 1000
#: The longest error message the service stores on an answer: a callback's `error` text. Its own messages are
#: one line, far shorter.
ERROR_MESSAGE_MAX_CHARS = CALLBACK_TEXT_MAX_CHARS
#: The longest error code: the service's are short identifiers (`upstream_error`), and error logs keep one in
#: 50 characters (error_logs.code).
ERROR_CODE_MAX_CHARS = 50


class MessageError(ReadModel):
    message: str
    code: str | None = None


def format_timestamp(value: datetime) -> str:
    """The API's one timestamp text: ISO 8601 in UTC ending in `Z`, as pydantic renders UTC datetimes."""
    return _in_utc(value).isoformat().replace("+00:00", "Z")


def _in_utc(value: datetime) -> datetime:
    """Naive values are UTC; any other offset is converted, so every rendered timestamp ends in `Z`. A stored
    time that leaves the calendar once in UTC (a feedback time imported before imports refused them) is shown
    as the calendar's first or last instant, not a 500 on every read of its chat."""
    try:
        return to_utc(value)
    except OverflowError:
        return (datetime.max if value.year == datetime.max.year else datetime.min).replace(tzinfo=UTC)


FEEDBACK_COMMENT_MAX = 2000


class MessageFeedback(ReadModel):
    rating: Literal[1, -1] | None
    comment: str | None
    updated_at: Annotated[datetime, AfterValidator(_in_utc)]


class FileRead(ReadModel):
    """A file uploaded to a chat. `content_type` is the type judged from its bytes (docs/FILES.md)."""

    id: uuid.UUID | None = Field(
        description="Null for metadata only (a file of an imported chat): its bytes are not stored here, so "
        "there is nothing to download"
    )
    filename: str = Field(examples=["report.pdf"])
    content_type: str = Field(examples=["application/pdf"])
    size: int = Field(description="Bytes", examples=[48213])
    sha256: str = Field(description="Hex SHA-256 of the bytes", examples=["9f86d081884c7d65..."])
    created_at: Annotated[datetime, AfterValidator(_in_utc)]


class MessageRead(ReadModel):
    """One stored message, the same everywhere (REST and the stream's start/done events).

    Every key is always present (`error`, `metadata`, `feedback` null when absent). `sibling_ids`: every
    message with the same parent, itself included, oldest first (one element when there is no branch).
    """

    id: uuid.UUID
    role: MessageRole
    content: str
    status: MessageStatus
    created_at: Annotated[datetime, AfterValidator(_in_utc)]
    error: MessageError | None = None
    metadata: dict[str, Any] | None = None
    parent_id: uuid.UUID | None = None
    sibling_ids: list[uuid.UUID] = Field(default_factory=list)
    feedback: MessageFeedback | None = None
    files: list[FileRead] = Field(
        default_factory=list, description="A user message's attachments, in the order sent; empty otherwise"
    )

    @field_validator("files", mode="before")
    @classmethod
    def _no_files(cls, value: Any) -> Any:
        return [] if value is None else value


def integer_rating(value: Any) -> Any:
    """Only the JSON integers 1 and -1 (not `true`, `1.0` or `"1"`, which lax mode would take for 1)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError("rating must be 1, -1 or null")
    return value


class FeedbackUpdate(InputModel):
    """A rating of an assistant message: 1 (good), -1 (bad) or null (none), with an optional comment."""

    rating: Literal[1, -1] | None = Field(description="1, -1, or null to clear the rating", examples=[1])
    comment: Annotated[str, Field(max_length=FEEDBACK_COMMENT_MAX), StorableText] | None = Field(
        None, description=f"At most {FEEDBACK_COMMENT_MAX} characters; blank is no comment"
    )

    _rating = field_validator("rating", mode="before")(integer_rating)


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
    current_message_id: uuid.UUID | None = Field(description="The leaf of the branch in `messages`")
    messages: list[MessageRead] = Field(description="The current branch, first message first")
    has_more: bool = Field(False, description="With `?last=N`: older messages of the branch were left out")


# --- message stream and error logs -----------------------------------------------------------


def _one_of_the_send_bodies(schema: dict[str, Any]) -> None:
    """The document says exactly which bodies are accepted: `content` (with `edit_of` or not), or
    `regenerate_of` alone; none of the three is ever null."""
    properties = schema["properties"]
    for name in ("content", "edit_of", "regenerate_of", "file_ids"):
        options = properties[name].pop("anyOf", None)
        if options:
            properties[name].update(next(o for o in options if o.get("type") != "null"))
        properties[name].pop("default", None)
    schema["oneOf"] = [
        {"required": ["content"], "not": {"required": ["regenerate_of"]}},
        {
            "required": ["regenerate_of"],
            "not": {"anyOf": [{"required": ["content"]}, {"required": ["edit_of"]}, {"required": ["file_ids"]}]},
        },
    ]


class MessageCreate(InputModel):
    """One of: `{content}` (a new message on the current branch), `{content, edit_of}` (a new version of a
    user message: its sibling) or `{regenerate_of}` (a new answer to the same question: the assistant
    message's sibling). The answer streams back as Server-Sent Events."""

    content: str | None = Field(
        None,
        description="The message text (not blank; at most MESSAGE_MAX_CHARS characters, default 32,000); "
        "required unless `regenerate_of` is given, refused with it",
        examples=["What changed in the Q3 numbers?"],
        # The service refuses blank and too long content (422); `maxLength` is set from the settings in the
        # served document (app.routers.responses.complete_openapi).
        json_schema_extra={"minLength": 1, "pattern": r"\S"},
    )
    edit_of: uuid.UUID | None = Field(None, description="A user message of this chat that this one replaces")
    regenerate_of: uuid.UUID | None = Field(None, description="An assistant message of this chat to answer again")
    file_ids: list[uuid.UUID] | None = Field(
        None,
        description="Files of this chat to attach (uploaded and not yet sent; for an edit also the edited "
        "message's files), at most FILES_PER_MESSAGE_MAX (default 5), no repeats; refused with `regenerate_of`, "
        "which resends the question's own files",
        max_length=100,
    )

    model_config = ConfigDict(json_schema_extra=_one_of_the_send_bodies)

    @model_validator(mode="after")
    def _one_shape(self) -> Self:
        if self.regenerate_of is not None:
            if self.model_fields_set & {"content", "edit_of", "file_ids"}:
                raise ValueError("regenerate_of takes no content, edit_of or file_ids")
        elif self.content is None:
            raise ValueError("content is required")
        elif "edit_of" in self.model_fields_set and self.edit_of is None:
            raise ValueError("edit_of may be left out but not null")
        elif "file_ids" in self.model_fields_set and self.file_ids is None:
            raise ValueError("file_ids may be left out but not null")
        return self


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


# --- progress callbacks (docs/CALLBACKS.md) ----------------------------------------------------

CallbackText = Annotated[str, Field(min_length=1, max_length=CALLBACK_TEXT_MAX_CHARS), StorableText]


class CallbackStatus(InputModel):
    type: Literal["status"]
    description: CallbackText


class CallbackTool(InputModel):
    """A tool step; `input` and `output` are any JSON (stored shortened, see CALLBACK_STEP_MAX_CHARS)."""

    type: Literal["tool"]
    name: Annotated[str, Field(min_length=1, max_length=200), StorableText]
    input: Any = None
    output: Any = None


class CallbackMessage(InputModel):
    """Text of the answer, appended like a streamed chunk."""

    type: Literal["message"]
    content: Annotated[str, Field(min_length=1), StorableText]


class CallbackUsage(InputModel):
    """Tokens the workflow used; several usage callbacks add up."""

    type: Literal["usage"]
    input_tokens: Annotated[int, Field(ge=0, le=1_000_000_000)]
    output_tokens: Annotated[int, Field(ge=0, le=1_000_000_000)]


class CallbackDone(InputModel):
    type: Literal["done"]


class CallbackError(InputModel):
    type: Literal["error"]
    message: CallbackText


CallbackBody = Annotated[
    CallbackStatus | CallbackTool | CallbackMessage | CallbackUsage | CallbackDone | CallbackError,
    Field(discriminator="type"),
]


class CallbackAccepted(ReadModel):
    accepted: bool = Field(True, description="Always true: a callback that is not accepted is an error status.")
