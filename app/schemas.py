"""Request and response bodies: `XCreate` / `XUpdate` in, `XRead` out. Inputs forbid unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
