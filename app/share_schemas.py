"""Bodies of sharing and of the chat export format (re-exported by app/schemas.py); docs/SHARING.md."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from app.chat_schemas import (
    ERROR_CODE_MAX_CHARS,
    ERROR_MESSAGE_MAX_CHARS,
    MessageRead,
    MessageRole,
    integer_rating,
)
from app.fields import JSON_MAX_DEPTH, AgentSlug, ChatTitle, InUtc, ReadModel, StorableText, check_storable_json

# --- shares ----------------------------------------------------------------------------------


class ShareSummary(ReadModel):
    """A share as the team's list shows it: everything but the messages."""

    id: uuid.UUID
    chat_id: uuid.UUID | None = Field(description="The shared chat; null once its owner deleted it")
    user_id: uuid.UUID | None = Field(description="Who shared it; null once that account is gone")
    agent_id: uuid.UUID | None
    title: str | None
    message_count: int = Field(description="Messages in the snapshot")
    created_at: datetime = Field(description="When the chat was first shared")
    updated_at: datetime = Field(description="When the snapshot was last taken (sharing again moves it)")


class ShareRead(ShareSummary):
    """A read-only snapshot of the chat's branch at `updated_at`: root first, each message's parent the one
    before it, `sibling_ids` itself only, no feedback (ratings stay private to the chat's owner)."""

    messages: list[MessageRead]


# --- the export format (version 1) ------------------------------------------------------------

#: What an export names itself; an import refuses any other `format` or `version`.
EXPORT_FORMAT = "n8n-chat-relay/chat"
EXPORT_VERSION = 1
#: No size cap of its own on an imported chat's JSON: the body cap (IMPORT_MAX_BODY_BYTES) bounds it, and a
#: message's metadata (tool steps) may be large; the guard is only for what PostgreSQL cannot store.
IMPORT_DOCUMENT_MAX_BYTES = 1 << 40


class ExportPart(BaseModel):
    """Base of the export format's parts. Not an `InputModel`: a service reads them from the bytes of an import,
    never as a request body; unknown keys are refused all the same."""

    model_config = ConfigDict(extra="forbid")


ImportedStatus = Literal["complete", "error", "cancelled", "interrupted", "streaming"]


class ExportedAgent(ExportPart):
    slug: AgentSlug = Field(description="Matched against the importer's team on import")
    name: str | None = Field(None, description="Informative; not matched")


class ExportedFeedback(ExportPart):
    rating: Literal[1, -1] | None
    comment: Annotated[str, Field(max_length=2000), StorableText] | None = None
    updated_at: Annotated[datetime, InUtc] | None = None

    _rating = field_validator("rating", mode="before")(integer_rating)  # as rating a message takes it


#: Files one imported message may name (metadata only); far above what a send attaches.
IMPORT_FILES_PER_MESSAGE_MAX = 100


class ExportedFile(ExportPart):
    """A message's file as exported: metadata only, never bytes or links. An import keeps it on the message as a
    File with a null `id` (nothing to download)."""

    filename: Annotated[str, Field(min_length=1, max_length=255), StorableText]
    content_type: str = Field(
        min_length=3, max_length=100, pattern=r"^[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*$", description="A MIME type"
    )
    size: StrictInt = Field(ge=0, le=2**31 - 1, description="Bytes (an integer, not `true` or text)")
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="Hex SHA-256 of the bytes (lower case)")


class ExportedError(ExportPart):
    """A failed answer's error, as a Message shows it: exactly `message` and `code` (an unknown key is refused,
    not dropped: the chat stored would differ from the file). Bounded as the service's own errors are (a code, a
    line), so an import cannot store megabytes of error text that every read of the chat then sends."""

    message: Annotated[str, Field(max_length=ERROR_MESSAGE_MAX_CHARS)] = Field(
        description=f"At most {ERROR_MESSAGE_MAX_CHARS} characters"
    )
    code: Annotated[str, Field(max_length=ERROR_CODE_MAX_CHARS)] | None = Field(
        None, description=f"At most {ERROR_CODE_MAX_CHARS} characters"
    )


class ExportedMessage(ExportPart):
    """One message of an exported chat, in the order of the export (a parent before its children)."""

    id: uuid.UUID = Field(description="Links the tree within this export; the import makes new ids")
    parent_id: uuid.UUID | None = Field(description="An earlier message of this chat, or null for a first message")
    role: MessageRole
    content: Annotated[
        str,
        Field(description="At most MESSAGE_MAX_CHARS characters (user) or N8N_MAX_RESPONSE_BYTES (assistant)"),
        StorableText,
    ]
    status: ImportedStatus = Field(description="`streaming` is never exported and refused on import")
    created_at: datetime | None = Field(None, description="Informative; the import stamps new times in order")
    error: ExportedError | None = Field(None, description="An answer's only: a user message has none")
    metadata: dict[str, Any] | None = Field(None, description="An answer's only: a user message has none")
    feedback: ExportedFeedback | None = None
    files: list[ExportedFile] = Field(
        default_factory=list,
        max_length=IMPORT_FILES_PER_MESSAGE_MAX,
        description="A user message's files, metadata only (no bytes, no links)",
    )


#: How deep a chat document may nest: what a callback's tool step may carry (JSON_MAX_DEPTH, from its body),
#: plus the export's own levels above that step's `input` (chat, messages, message, metadata, steps, step),
#: so every export can be imported again.
IMPORT_MAX_DEPTH = JSON_MAX_DEPTH + 6


class ExportedChat(ExportPart):
    """One chat as exported (`GET /api/chats/{id}/export?format=json`, one line of `GET /api/chats/export`)
    and as imported (`POST /api/chats/import`)."""

    format: Literal["n8n-chat-relay/chat"] = Field(description="Always `n8n-chat-relay/chat`")
    version: Literal[1] = Field(description="The format's version; an import refuses versions it does not know")
    id: uuid.UUID | None = Field(None, description="The exported chat's id; informative, the import makes a new one")
    title: ChatTitle | None = None
    agent: ExportedAgent
    archived: StrictBool = False
    pinned: StrictBool = False
    created_at: datetime | None = Field(None, description="Informative")
    updated_at: datetime | None = Field(None, description="Informative")
    current_message_id: uuid.UUID | None = Field(
        description="The leaf of the branch shown; null only for a chat without messages"
    )
    current_branch: list[uuid.UUID] | None = Field(
        None, description="The ids of the branch shown, root first (informative; checked against the tree)"
    )
    messages: list[ExportedMessage] = Field(description="Every message of every branch, oldest first")

    @field_validator("version", mode="before")
    @classmethod
    def _integer_version(cls, value: Any) -> Any:
        """Only the JSON integer 1: lax mode took `true` and `1.0` for it, a file no export wrote."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("version must be the integer 1")
        return value

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        """Text PostgreSQL cannot store (NUL, lone surrogates) anywhere in the chat is a 422, never a 500."""
        return check_storable_json(
            data, max_bytes=IMPORT_DOCUMENT_MAX_BYTES, label="the chat", max_depth=IMPORT_MAX_DEPTH
        )
