"""Request and response bodies: `XCreate` / `XUpdate` in, `XRead` out. Inputs forbid unknown fields."""

from __future__ import annotations

import json
import math
import re
import unicodedata
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


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
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "must be valid Unicode"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "must not contain NaN or Infinity"
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


def _drop_null(prop: dict[str, Any]) -> None:
    """`X | None` in the schema becomes `X`: the field may be left out, but `null` is refused."""
    options = prop.get("anyOf")
    if options is not None:
        kept = [option for option in options if option != {"type": "null"}]
        del prop["anyOf"]
        if len(kept) == 1:
            prop.update(kept[0])
        else:
            prop["anyOf"] = kept
    if "default" in prop and prop["default"] is None:
        del prop["default"]


class InputModel(BaseModel):
    """Base of every request body: unknown fields are a 422, never silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    @classmethod
    def null_refused(cls) -> Iterable[str]:
        """Optional fields whose `null` a validator refuses; the schema must not offer `null` for them."""
        return ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = super().__get_pydantic_json_schema__(core_schema, handler)
        refused = set(cls.null_refused())
        if refused:
            properties = handler.resolve_ref_schema(json_schema).get("properties", {})
            for name in refused & properties.keys():
                _drop_null(properties[name])
        return json_schema

    @model_validator(mode="before")
    @classmethod
    def _storable_input(cls, data: Any) -> Any:
        """One guard for every body: text PostgreSQL cannot store (NUL, lone surrogates) is a 422, never a 500."""
        problem = _json_problem(data)
        if problem:
            raise ValueError(f"request body {problem}")
        return data


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


def canonical_email(value: str) -> str:
    """The form emails are stored and compared in: trimmed, Unicode NFC, lower-case.

    NFC first, so `Ame\u0301lie` (e + combining accent) and `Amélie` (precomposed) are one address;
    NFC again after lower-casing, which can decompose a few characters.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", value.strip()).lower())


def normalize_email(value: str) -> str:
    """Canonical form (`canonical_email`), then check the syntax (no DNS lookup)."""
    value = canonical_email(value)
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError("not a valid email address") from exc
    return value


def _strip_login_email(value: str) -> str:
    return canonical_email(value)


def _clean_name(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


Email = Annotated[
    str,
    Field(
        max_length=EMAIL_MAX_LENGTH,
        description="Checked with email-validator (no DNS): special-use domains such as `.test` or `.local` "
        "are refused. Stored lower-case.",
        examples=["ada@example.com"],
        json_schema_extra={"format": "email"},
    ),
    AfterValidator(normalize_email),
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

    @classmethod
    def null_refused(cls) -> Iterable[str]:
        return set(cls.model_fields) - cls._nullable

    @model_validator(mode="after")
    def _refuse_nulls(self) -> Self:
        for name in self.model_fields_set:
            if name not in self._nullable and getattr(self, name) is None:
                raise ValueError(f"{name} may be left out but not null")
        return self


class TeamSettings(ReadModel):
    open_registration: bool = Field(
        False,
        description="Anyone who knows the team id may register into it (role user). Off by default: "
        "people join with an invite instead.",
    )


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


def _integral_float_to_int(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: An integer as JSON Schema means it: `7` and `7.0` alike, never `"7"`, `true` or `7.5`.
JsonInt = Annotated[StrictInt, BeforeValidator(_integral_float_to_int)]


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
#: What check_webhook_url accepts by syntax, for the schema: http(s) in any case, no user info, no CR, LF, tab,
#: NUL or space anywhere, a port 1-65535, and a host name of the characters a resolver is handed (letters,
#: digits, `.`, `_`, `-`, as app.webhooks.HOST_NAME). The host must not start with a digit: numeric hosts are
#: IP literals, and which addresses are allowed is policy, not syntax (a 422 with the reason, like metadata
#: host names). A Unicode host name is accepted too (it is IDNA-encoded as the HTTP client will), but the
#: schema documents its ASCII (`xn--`) form: no pattern can say which Unicode IDNA accepts.
_URL_BANNED = r"\r\n\t\x00 "
_HOST = r"[A-Za-z_-][A-Za-z0-9._-]*"
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
WEBHOOK_URL_PATTERN = rf"^[Hh][Tt][Tt][Pp][Ss]?://{_HOST}(:{_PORT}?)?([/?#][^{_URL_BANNED}]*)?$"
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        description="http(s) URL of the n8n Webhook (or Chat Trigger) node; checked against the SSRF policy "
        "(an IP literal, a private address without WEBHOOK_ALLOW_PRIVATE_NETWORKS, a metadata host: 422).",
        examples=["https://n8n.example.com/webhook/support-agent"],
        # Documented, not enforced here: check_webhook_url enforces it with a reason a person can act on.
        json_schema_extra={"pattern": WEBHOOK_URL_PATTERN},
    ),
    StorableText,
]


def _any_case(word: str) -> str:
    """`host` -> `[Hh][Oo][Ss][Tt]`: JSON Schema patterns have no case-insensitive flag."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


#: `_check_webhook_headers` as a schema: token names the relay does not own, printable ASCII values.
WEBHOOK_HEADERS_SCHEMA: dict[str, Any] = {
    "maxProperties": WEBHOOK_HEADERS_MAX_COUNT,
    "propertyNames": {
        "pattern": f"^[!#$%&'*+\\-.^_`|~0-9A-Za-z]{{1,{WEBHOOK_HEADER_NAME_MAX}}}$",
        "not": {
            "pattern": "^("
            + "|".join(_any_case(name) for name in sorted(FORBIDDEN_HEADERS))
            + f"|{_any_case('proxy-')}.*)$"
        },
    },
    "additionalProperties": {
        "type": "string",
        "maxLength": WEBHOOK_HEADER_VALUE_MAX,
        "pattern": "^([!-~]([\t -~]*[!-~])?)?$",
    },
}
WebhookHeaders = Annotated[
    dict[str, str],
    Field(
        description="Write-only headers sent with every call (e.g. n8n Header Auth). Replaces the whole set; "
        "`{}` clears it. Never returned. Names are case-insensitive and must not repeat.",
        examples=[{"X-N8N-Auth": "a-long-random-secret"}],
        json_schema_extra=WEBHOOK_HEADERS_SCHEMA,
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

    @classmethod
    def null_refused(cls) -> Iterable[str]:
        return _AGENT_REQUIRED

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

    @classmethod
    def null_refused(cls) -> Iterable[str]:
        return ("archived", "pinned")

    @model_validator(mode="after")
    def _no_null_flags(self) -> ChatUpdate:
        for name in ("archived", "pinned"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


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
