"""Request and response bodies: `XCreate` / `XUpdate` in, `XRead` out. Inputs forbid unknown fields."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class InputModel(BaseModel):
    """Base of every request body: unknown fields are a 422, never silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ReadModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class HealthRead(ReadModel):
    status: str


# --- teams, users and auth -------------------------------------------------------------------


# --- agents ----------------------------------------------------------------------------------


# --- chats and messages ----------------------------------------------------------------------


# --- message stream and error logs -----------------------------------------------------------


class MessageCreate(InputModel):
    """The user's message; the answer streams back as Server-Sent Events."""

    content: str = Field(
        description="The message text (not blank; at most MESSAGE_MAX_CHARS characters, default 32,000)",
        examples=["What changed in the Q3 numbers?"],
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
