"""Request and response bodies: `XCreate` / `XUpdate` in, `XRead` out. Inputs forbid unknown fields."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from app.chat_schemas import (
    AgentAdminRead,
    AgentCreate,
    AgentRead,
    AgentTestResult,
    AgentUpdate,
    CallbackAccepted,
    CallbackBody,
    ChatCreate,
    ChatRead,
    ChatSummary,
    ChatUpdate,
    ErrorLogRead,
    FeedbackUpdate,
    FileRead,
    MessageCreate,
    MessageFeedback,
    MessageRead,
)
from app.fields import (
    EMAIL_LENGTH_NOTE,
    EMAIL_MAX_LENGTH,
    PASSWORD_MAX_LENGTH,
    PREFERENCES_MAX_BYTES,
    SESSION_ID_MAX,
    TRIMMED,
    Email,
    FullName,
    InputModel,
    InUtc,
    JsonInt,
    NewPassword,
    NotNull,
    ReadModel,
    Role,
    canonical_email,
    check_session_id,
    check_storable_json,
    email_too_long,
    name_field,
)
from app.share_schemas import ExportedChat, ShareRead, ShareSummary

#: Every request and response body; the conversation side is defined in app/chat_schemas.py.
__all__ = [
    "INVITE_TOKEN_MAX_LENGTH",
    "AgentAdminRead",
    "AgentCreate",
    "AgentRead",
    "AgentTestResult",
    "AgentUpdate",
    "AmbiguousLoginRead",
    "ApiKeyCreate",
    "ApiKeyCreatedRead",
    "ApiKeyRead",
    "CallbackAccepted",
    "CallbackBody",
    "ChatCreate",
    "ChatRead",
    "ChatSummary",
    "ChatUpdate",
    "ErrorLogRead",
    "ErrorRead",
    "ExportedChat",
    "FeedbackUpdate",
    "FileRead",
    "HealthRead",
    "InviteCreate",
    "InviteCreatedRead",
    "InvitePreviewRead",
    "InviteRead",
    "InviteStatus",
    "LoginRead",
    "LoginRequest",
    "MeUpdate",
    "MessageCreate",
    "MessageFeedback",
    "MessageRead",
    "N8nChatError",
    "N8nChatHistory",
    "N8nChatOutput",
    "N8nChatRequest",
    "OpenAIErrorRead",
    "PasswordChange",
    "QuotaSettings",
    "QuotaSettingsUpdate",
    "RefreshRead",
    "RefreshRequest",
    "RegisterRequest",
    "ShareRead",
    "ShareSummary",
    "TeamChoice",
    "TeamCreate",
    "TeamRead",
    "TeamSettings",
    "TeamSettingsUpdate",
    "TeamSignupRead",
    "TeamUpdate",
    "TokenRead",
    "UsageRowRead",
    "UserCreate",
    "UserRead",
    "UserUpdate",
]


#: A team's name as typed: surrounding spaces dropped, 1-100 characters.
TeamName = Annotated[str, name_field(100), TRIMMED]


class HealthRead(ReadModel):
    status: str


# --- teams, users and auth -------------------------------------------------------------------


QUOTA_DESCRIPTION = (
    "Generations each member may start per UTC day (every send counts, failed ones included); past it a "
    "send is refused with 429 and `Retry-After` until midnight UTC. null = unlimited."
)


class QuotaSettings(ReadModel):
    messages_per_user_per_day: int | None = Field(None, description=QUOTA_DESCRIPTION, examples=[200])


class QuotaSettingsUpdate(InputModel):
    # StrictInt, not JsonInt: inside an optional, JsonInt's validator hides the bounds from the JSON schema;
    # the validator below gives it JsonInt's meaning (`200.0` is 200).
    messages_per_user_per_day: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = Field(
        None, description=QUOTA_DESCRIPTION, examples=[200]
    )

    @field_validator("messages_per_user_per_day", mode="before")
    @classmethod
    def _integral_float(cls, value: object) -> object:
        return int(value) if isinstance(value, float) and value.is_integer() else value


class TeamSettings(ReadModel):
    open_registration: bool = Field(
        False,
        description="Anyone who knows the team id may register into it (role user). Off by default: "
        "people join with an invite instead.",
    )
    quota: QuotaSettings = Field(default_factory=QuotaSettings)


class TeamSettingsUpdate(InputModel):
    open_registration: Annotated[StrictBool | None, NotNull] = Field(None, examples=[False])
    quota: Annotated[QuotaSettingsUpdate | None, NotNull] = Field(
        None, description="Sent = replaced as a whole (`{}` or a null limit = unlimited)."
    )


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

    name: TeamName = Field(examples=["Acme support"])
    admin_email: Email
    admin_password: NewPassword
    admin_full_name: FullName = None


class TeamUpdate(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "Acme support", "settings": {"open_registration": False}}]},
    )

    name: Annotated[TeamName | None, NotNull] = Field(None, examples=["Acme support"])
    settings: Annotated[TeamSettingsUpdate | None, NotNull] = None


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


class UserUpdate(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"role": "admin", "is_active": True, "full_name": "Grace Hopper"}]},
    )

    role: Annotated[Role | None, NotNull] = Field(None, examples=["admin"])
    is_active: Annotated[StrictBool | None, NotNull] = Field(None, examples=[False])
    full_name: FullName = None


class MeUpdate(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"full_name": "Grace Hopper", "preferences": {"theme": "dark"}}]},
    )

    full_name: FullName = None
    preferences: Annotated[dict[str, Any] | None, NotNull] = Field(None, examples=[{"theme": "dark"}])

    @field_validator("preferences")
    @classmethod
    def _small_preferences(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        return check_storable_json(value, max_bytes=PREFERENCES_MAX_BYTES, label="preferences")  # type: ignore[no-any-return]


class PasswordChange(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"current_password": "correct-horse-battery", "new_password": "a-much-longer-passphrase"}]
        },
    )

    current_password: str = Field(min_length=1, max_length=PASSWORD_MAX_LENGTH)
    new_password: NewPassword


# --- invitations ---------------------------------------------------------------------------

#: Tokens we issue are 43 characters; anything much longer is no token of ours.
INVITE_TOKEN_MAX_LENGTH = 128
InviteStatus = Literal["active", "used_up", "expired", "revoked"]


class InviteCreate(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"email": "grace@example.com", "role": "user", "expires_in_days": 7, "max_uses": 1}]
        },
    )

    email: Email | None = Field(None, description="When set, only this email (any case) may use the invite.")
    role: Role = "user"
    expires_in_days: JsonInt = Field(7, ge=1, le=30)
    max_uses: JsonInt = Field(1, ge=1, le=1000)


class InviteRead(ReadModel):
    """An invite as the team's admins see it: never its token, which only its creator saw once."""

    id: uuid.UUID
    email: str | None
    role: Role
    expires_at: datetime
    max_uses: int
    uses: int
    created_at: datetime
    revoked_at: datetime | None
    created_by: uuid.UUID | None
    status: InviteStatus = Field(description="active, or why the token no longer works (revoked wins).")


class InviteCreatedRead(InviteRead):
    token: str = Field(description="Shown only in this answer; the server keeps only a hash of it.")


class InvitePreviewRead(BaseModel):
    """What a sign-up page shows before registering with the token."""

    team_name: str
    email: str | None
    role: Role
    expires_at: datetime


#: "This key is present with a string value", for RegisterRequest's oneOf.
_GIVEN: dict[str, dict[str, Any]] = {
    name: {"required": [name], "properties": {name: {"type": "string"}}} for name in ("team_id", "invite_token")
}


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
                },
                {
                    "invite_token": "q7Xo3w0mBv9yC2pL8sZt1rKdE4fGhJ6uNaM5bVcQxYw",
                    "email": "grace@example.com",
                    "password": "correct-horse-battery",
                },
            ],
            # `_one_way_in`, stated for clients: exactly one of the two is a non-null string.
            "oneOf": [
                {"required": [one], "properties": {one: {"type": "string"}}, "not": _GIVEN[other]}
                for one, other in (("team_id", "invite_token"), ("invite_token", "team_id"))
            ],
        },
    )

    team_id: uuid.UUID | None = Field(
        None, description="Join this team (needs its open_registration on). Exactly one of team_id, invite_token."
    )
    invite_token: str | None = Field(
        None,
        min_length=1,
        max_length=INVITE_TOKEN_MAX_LENGTH,
        description="Join the invite's team with the invite's role, whatever open_registration says.",
    )
    email: Email
    password: NewPassword
    full_name: FullName = None

    @model_validator(mode="after")
    def _one_way_in(self) -> Self:
        if (self.team_id is None) == (self.invite_token is None):
            raise ValueError("send exactly one of team_id and invite_token")
        return self


class LoginRequest(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"email": "grace@example.com", "password": "correct-horse-battery"}]},
    )

    # Not syntax-checked: a malformed email is simply a failed login (the same 401 as any other).
    email: Annotated[
        str,
        Field(
            min_length=1,
            description=EMAIL_LENGTH_NOTE,
            examples=["ada@example.com"],
            json_schema_extra={"maxLength": EMAIL_MAX_LENGTH},
        ),
    ]
    password: str = Field(min_length=1, max_length=PASSWORD_MAX_LENGTH, examples=["correct-horse-battery"])
    team_id: uuid.UUID | None = Field(None, description="Needed only when the email exists in several teams.")

    @field_validator("email")
    @classmethod
    def _normalize(cls, value: str) -> str:
        if email_too_long(value):
            raise ValueError(f"must be at most {EMAIL_MAX_LENGTH} characters once trimmed")
        return canonical_email(value)


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
    refresh_token: str | None = Field(
        None, description="The rotated refresh token, only when the old one was sent in the JSON body (curl)."
    )


class TeamChoice(BaseModel):
    id: uuid.UUID
    name: str
    slug: str


class AmbiguousLoginRead(BaseModel):
    detail: str
    teams: list[TeamChoice]


class ErrorRead(BaseModel):
    detail: str


class UsageRowRead(ReadModel):
    """Usage of one day, agent or user in the period asked for."""

    key: str | None = Field(
        description="The day (`YYYY-MM-DD`, UTC), or the agent's or user's id (null: deleted since).",
        examples=["2026-12-06"],
    )
    label: str = Field(description="The day, the agent's name, or the user's name (else email).")
    generations: int = Field(description="Answers started (every outcome).")
    completed: int
    errors: int = Field(description="Answers that ended in an error or were interrupted by a server stop.")
    cancelled: int
    chars_in: int = Field(description="Characters of the user messages sent.")
    chars_out: int = Field(description="Characters of the answers stored.")
    tokens_in: int | None = Field(description="Tokens the workflows reported; null when none reported usage.")
    tokens_out: int | None
    ttfc_ms_p50: float | None = Field(description="Median milliseconds to the first text chunk.")
    duration_ms_p50: float | None = Field(description="Median milliseconds from the call to n8n to the end.")


# --- API keys ------------------------------------------------------------------------------------


class ApiKeyCreate(InputModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "laptop scripts", "expires_at": "2027-06-30T00:00:00Z"}]},
    )

    name: Annotated[str, name_field(100), TRIMMED]
    expires_at: Annotated[AwareDatetime, InUtc] | None = Field(
        None, description="When the key stops working (with a time zone, in the future); null = never."
    )


class ApiKeyRead(ReadModel):
    """A key as lists show it: its name and first characters, never the key."""

    id: uuid.UUID
    name: str
    prefix: str = Field(description="The key's first characters, to recognise it (e.g. `n8nr_AbCd1234`).")
    user_id: uuid.UUID
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = Field(description="Updated at most once a minute.")


class ApiKeyCreatedRead(ApiKeyRead):
    key: str = Field(description="The key itself, shown only in this answer; the server keeps only a keyed hash.")


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="e.g. invalid_request_error, authentication_error, rate_limit_error, server_error")
    param: str | None = Field(description="The request field at fault, e.g. `temperature`, `messages.[0].content`")
    code: str | None = Field(description="e.g. model_not_found, invalid_api_key, or the agent's failure code")


class OpenAIErrorRead(BaseModel):
    """Every error of the `/v1` routes: OpenAI's shape, which its client libraries read."""

    error: OpenAIError


# --- n8n's chat widget ---------------------------------------------------------------------------


class N8nChatRequest(InputModel):
    """What n8n's chat widget (@n8n/chat) sends to a Chat Trigger: `sendMessage` with `chatInput`, or
    `loadPreviousSession`. `metadata` (the widget's option of that name) is accepted and not used."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"action": "sendMessage", "sessionId": "2f0c5a7e-7f61-4a43-9a0e-1f3c2b8d9e10", "chatInput": "Hi"},
                {"action": "loadPreviousSession", "sessionId": "2f0c5a7e-7f61-4a43-9a0e-1f3c2b8d9e10"},
            ]
        },
    )

    action: Literal["sendMessage", "loadPreviousSession"]
    session_id: Annotated[str, AfterValidator(check_session_id)] = Field(
        alias="sessionId",
        min_length=1,
        max_length=SESSION_ID_MAX,
        description="The widget's session id (a UUID it keeps in localStorage): names one chat of yours with "
        "this agent, created by its first `sendMessage`. Printable characters only, as `/v1`'s `X-Session-Id`: "
        "a control, format or separator character other than the space is a 422",
    )
    chat_input: Annotated[str | None, NotNull] = Field(
        None,
        alias="chatInput",
        description="The message (not blank; at most MESSAGE_MAX_CHARS characters): required with "
        "`sendMessage`, refused with `loadPreviousSession`",
        json_schema_extra={"minLength": 1, "pattern": r"\S"},
    )
    metadata: dict[str, Any] | None = Field(None, description="The widget's `metadata` option; not used")

    @model_validator(mode="after")
    def _input_for_send_only(self) -> Self:
        if self.action == "sendMessage" and self.chat_input is None:
            raise ValueError("chatInput is required with sendMessage")
        if self.action == "loadPreviousSession" and self.chat_input is not None:
            raise ValueError("chatInput is only sent with sendMessage")
        return self


class N8nChatOutput(BaseModel):
    """The last-node answer of a `sendMessage` (without `Accept: text/plain`)."""

    output: str


class N8nChatHistory(BaseModel):
    """`loadPreviousSession`: the chat's current branch as LangChain-serialized messages (`HumanMessage`,
    `AIMessage`), as n8n's chat memory stores them."""

    data: list[dict[str, Any]]


class N8nChatError(BaseModel):
    """A failed answer in last-node mode, as a Chat Trigger reports it (the widget shows `message`)."""

    message: str
