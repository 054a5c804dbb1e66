"""Request and response bodies: `XCreate` / `XUpdate` in, `XRead` out. Inputs forbid unknown fields."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    field_validator,
    model_validator,
)


class InputModel(BaseModel):
    """Base of every request body: unknown fields are a 422, never silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ReadModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class HealthRead(ReadModel):
    status: str


# --- teams, users and auth -------------------------------------------------------------------

EMAIL_MAX_LENGTH = 320
PASSWORD_MIN_LENGTH = 8
#: Passwords are pre-hashed (SHA-256) before bcrypt, so length never truncates; this cap bounds the work.
PASSWORD_MAX_LENGTH = 1024
PREFERENCES_MAX_BYTES = 16_384


def normalize_email(value: str) -> str:
    """Trim and lower-case, then check the syntax (no DNS lookup): emails compare case-insensitively."""
    value = value.strip().lower()
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError("not a valid email address") from exc
    return value


def _strip_login_email(value: str) -> str:
    return value.strip().lower()


def _clean_name(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


Email = Annotated[
    str, Field(max_length=EMAIL_MAX_LENGTH, examples=["ada@example.com"]), AfterValidator(normalize_email)
]
NewPassword = Annotated[
    str,
    Field(
        min_length=PASSWORD_MIN_LENGTH,
        max_length=PASSWORD_MAX_LENGTH,
        description=f"{PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters; every character counts.",
        examples=["correct-horse-battery"],
    ),
]
FullName = Annotated[str | None, Field(max_length=200, examples=["Ada Lovelace"]), AfterValidator(_clean_name)]
Role = Literal["user", "admin"]


class _NoNulls(InputModel):
    """Partial updates: a field may be left out, but `null` is refused where the column cannot be empty."""

    _nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _refuse_nulls(self) -> Self:
        for name in self.model_fields_set:
            if name not in self._nullable and getattr(self, name) is None:
                raise ValueError(f"{name} may be left out but not null")
        return self


class TeamSettings(ReadModel):
    open_registration: bool = Field(True, description="Anyone may register into the team with its id.")


class TeamSettingsUpdate(_NoNulls):
    open_registration: StrictBool | None = Field(None, examples=[False])


class TeamRead(ReadModel):
    id: uuid.UUID
    name: str
    slug: str
    settings: TeamSettings
    created_at: datetime


class TeamCreate(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "Acme support",
                    "admin_email": "boss@acme.example.com",
                    "admin_password": "correct-horse-battery",
                    "admin_full_name": "Ada Lovelace",
                }
            ]
        },
    )

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)] = Field(
        examples=["Acme support"]
    )
    admin_email: Email
    admin_password: NewPassword
    admin_full_name: FullName = None


class TeamUpdate(_NoNulls):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "Acme support", "settings": {"open_registration": False}}]},
    )

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)] | None = Field(
        None, examples=["Acme support"]
    )
    settings: TeamSettingsUpdate | None = None


class UserRead(ReadModel):
    id: uuid.UUID
    team_id: uuid.UUID
    email: str
    full_name: str | None
    role: Role
    is_active: bool
    preferences: dict[str, Any]
    created_at: datetime
    last_login_at: datetime | None


class TeamSignupRead(BaseModel):
    team: TeamRead
    user: UserRead


class UserCreate(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "email": "grace@example.com",
                    "password": "correct-horse-battery",
                    "full_name": "Grace Hopper",
                    "role": "user",
                }
            ]
        },
    )

    email: Email
    password: NewPassword
    full_name: FullName = None
    role: Role = "user"


class UserUpdate(_NoNulls):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"role": "admin", "is_active": True, "full_name": "Grace Hopper"}]},
    )

    _nullable: ClassVar[frozenset[str]] = frozenset({"full_name"})

    role: Role | None = Field(None, examples=["admin"])
    is_active: StrictBool | None = Field(None, examples=[False])
    full_name: FullName = None


class MeUpdate(_NoNulls):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"full_name": "Grace Hopper", "preferences": {"theme": "dark"}}]},
    )

    _nullable: ClassVar[frozenset[str]] = frozenset({"full_name"})

    full_name: FullName = None
    preferences: dict[str, Any] | None = Field(None, examples=[{"theme": "dark"}])

    @field_validator("preferences")
    @classmethod
    def _small_preferences(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > PREFERENCES_MAX_BYTES:
            raise ValueError(f"preferences must serialize to at most {PREFERENCES_MAX_BYTES} bytes")
        return value


class PasswordChange(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"current_password": "correct-horse-battery", "new_password": "a-much-longer-passphrase"}]
        },
    )

    current_password: str = Field(min_length=1, max_length=PASSWORD_MAX_LENGTH)
    new_password: NewPassword


class RegisterRequest(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "team_id": "7d3c1d8e-6b1e-4c1f-9a53-2a0e8b1d4f00",
                    "email": "grace@example.com",
                    "password": "correct-horse-battery",
                    "full_name": "Grace Hopper",
                }
            ]
        },
    )

    team_id: uuid.UUID
    email: Email
    password: NewPassword
    full_name: FullName = None


class LoginRequest(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"email": "grace@example.com", "password": "correct-horse-battery"}]},
    )

    # Not syntax-checked: a malformed email is simply a failed login (the same 401 as any other).
    email: Annotated[str, Field(min_length=1, max_length=EMAIL_MAX_LENGTH, examples=["ada@example.com"])]
    password: str = Field(min_length=1, max_length=PASSWORD_MAX_LENGTH, examples=["correct-horse-battery"])
    team_id: uuid.UUID | None = Field(None, description="Needed only when the email exists in several teams.")

    @field_validator("email")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return _strip_login_email(value)


class LoginRead(BaseModel):
    user: UserRead
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires.")
    refresh_token: str = Field(description="Also set as the httpOnly refresh_token cookie; for non-browser clients.")


class TokenRead(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"


class RefreshRequest(InputModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"refresh_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9..."}]}
    )

    refresh_token: str | None = Field(None, max_length=4096, description="Leave out to use the refresh cookie.")


class RefreshRead(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    refresh_token: str


class TeamChoice(BaseModel):
    id: uuid.UUID
    name: str
    slug: str


class AmbiguousLoginRead(BaseModel):
    detail: str
    teams: list[TeamChoice]


class ErrorRead(BaseModel):
    detail: str


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
