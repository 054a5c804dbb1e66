"""Reusable validated field types and the base models every request and response body builds on."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, Self

from email_validator import EmailNotValidError, ValidatedEmail, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictInt,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from app.webhooks import MAX_NAME, MAX_URL_LENGTH


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


def to_utc(value: datetime) -> datetime:
    """`value` in UTC (a naive value is UTC already); OverflowError when that leaves the calendar
    (`9999-12-31T23:59:59-05:00`)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in_utc(value: datetime) -> datetime:
    """Converted to UTC, as stored and shown; refused when the conversion leaves the calendar (it failed
    later, as a 500)."""
    try:
        return to_utc(value)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


#: Use for every input time that is stored: `Annotated[datetime, InUtc]` (or AwareDatetime).
InUtc = AfterValidator(_in_utc)


JSON_MAX_DEPTH = 32


def _json_problem(value: Any, max_depth: int = JSON_MAX_DEPTH) -> str | None:
    """Walk the value without recursion: too deep, or a NUL in any key or string."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return f"is nested deeper than {max_depth} levels"
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


def _sendable_json(value: Any) -> Any:
    """JSON that can be encoded to send on (to n8n, to the database): no lone surrogate, NaN or NUL, not too
    deep. Its size is the request body's limit."""
    problem = _json_problem(value)
    if problem:
        raise ValueError(problem)
    return value


#: Use for free-form JSON input (a list or object) that is sent on as it came.
SendableJson = AfterValidator(_sendable_json)


def check_storable_json(value: Any, *, max_bytes: int, label: str, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """JSON that PostgreSQL's JSONB accepts (no NaN/Infinity, NUL or lone surrogates) within size caps."""
    problem = _json_problem(value, max_depth)
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


class _NotNull:
    """See `NotNull`."""

    def __repr__(self) -> str:
        return "NotNull"


#: `Annotated[X | None, NotNull] = None`: in a partial update the field may be left out, but `null` is
#: refused (the column cannot be empty), and the schema does not offer `null`. The one way to say it.
NotNull = _NotNull()


class InputModel(BaseModel):
    """Base of every request body: unknown fields are a 422, never silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    @classmethod
    def null_refused(cls) -> list[str]:
        """The fields marked `NotNull`, in declaration order."""
        return [name for name, field in cls.model_fields.items() if NotNull in field.metadata]

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

    @model_validator(mode="after")
    def _refuse_nulls(self) -> Self:
        for name in self.null_refused():
            if name in self.model_fields_set and getattr(self, name) is None:
                # The name the client sent (the widget's `chatInput`), not the attribute's.
                raise ValueError(f"{type(self).model_fields[name].alias or name} may be left out but not null")
        return self


class ReadModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


#: The longest address email-validator accepts (RFC 5321's 254); the schema said 320 (RFC 3696's sum of the
#: parts), so a documented-valid address of 255-320 characters was refused. Counted once trimmed and normalized
#: (`email_too_long`), so the schema states it as `maxLength` without pydantic checking the value as sent.
EMAIL_MAX_LENGTH = 254
#: What every email field's description says of the limit (the schema's `maxLength` cannot say it).
EMAIL_LENGTH_NOTE = f"At most {EMAIL_MAX_LENGTH} characters once trimmed: whitespace around the address is not counted."
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


def email_too_long(value: str) -> bool:
    """Longer than EMAIL_MAX_LENGTH once trimmed and normalized (`canonical_email`): the longest address with a
    space or a newline around it was refused, though it is stored, and signs in, trimmed."""
    return len(canonical_email(value)) > EMAIL_MAX_LENGTH


def _validated(canonical: str) -> ValidatedEmail | None:
    """email-validator's reading of an address already in canonical form (syntax only, no DNS), or None."""
    try:
        return validate_email(canonical, check_deliverability=False)
    except EmailNotValidError:
        return None


def email_forms(value: str) -> tuple[str, ...]:
    """Every stored form that names the same mailbox as `value`, the form a new row is stored in first.

    An internationalised domain has two spellings, `bücher.de` and its ASCII (IDNA) form `xn--bcher-kva.de`:
    the first form has the domain in Unicode (email-validator's `normalized`, so also folded as IDNA folds
    it: `BÜCHER.de`, full-width letters), the next in ASCII, then `value` only put in canonical form, which is
    how rows were stored before the folding. Each canonical (`canonical_email`), without repeats. A value that
    is no valid address (a mistyped login) has only its canonical form, so it matches what it always did.
    Compare with `func.lower(column).in_(email_forms(value))`.
    """
    canonical = canonical_email(value)
    valid = _validated(canonical)
    if valid is None:
        return (canonical,)
    unicode_form = canonical_email(valid.normalized)
    # Built from the parts, not `ascii_email`: that is None when the local part is not ASCII (`ü@bücher.de`),
    # and the domain still has its ASCII spelling (`ü@xn--bcher-kva.de`).
    ascii_form = canonical_email(f"{valid.local_part}@{valid.ascii_domain}")
    return tuple(dict.fromkeys((unicode_form, ascii_form, canonical)))


def stored_email(value: str) -> str:
    """The form a new address is stored in: `email_forms`' first (the domain in Unicode, canonical)."""
    return email_forms(value)[0]


def normalize_email(value: str) -> str:
    """Check the syntax (no DNS lookup), then the stored form (`stored_email`): `a@xn--bcher-kva.de` and
    `A@Bücher.de` both become `a@bücher.de`."""
    if email_too_long(value):
        raise ValueError(f"must be at most {EMAIL_MAX_LENGTH} characters once trimmed")
    valid = _validated(canonical_email(value))
    if valid is None:
        raise ValueError("not a valid email address")
    return canonical_email(valid.normalized)


def _clean_name(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


Email = Annotated[
    str,
    Field(
        description="Checked with email-validator (no DNS): special-use domains such as `.test` or `.local` "
        "are refused. Stored lower-case, an internationalised domain in Unicode (`xn--bcher-kva.de` is stored as "
        f"`bücher.de`). {EMAIL_LENGTH_NOTE}",
        examples=["ada@example.com"],
        json_schema_extra={"format": "email", "maxLength": EMAIL_MAX_LENGTH},
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


def _integral_float_to_int(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: An integer as JSON Schema means it: `7` and `7.0` alike, never `"7"`, `true` or `7.5`.
JsonInt = Annotated[StrictInt, BeforeValidator(_integral_float_to_int)]


def _iso_day(value: object) -> object:
    if isinstance(value, str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("must be a date written YYYY-MM-DD")
    if not isinstance(value, str | date):
        raise ValueError("must be a date written YYYY-MM-DD")
    return value


#: A day as `YYYY-MM-DD` only (pydantic alone also takes `0` or `1700000000` as Unix times).
IsoDate = Annotated[date, BeforeValidator(_iso_day)]


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


def check_webhook_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
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


def check_agent_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is not None:
        check_storable_json(config, max_bytes=AGENT_CONFIG_MAX_BYTES, label="config")
    return config


def _trimmed_name(value: str) -> str:
    """A name's surrounding whitespace goes once its length, as sent, is checked; a blank one is refused (str's
    whitespace, which includes \x1c-\x1f where the schema's regex `\\S` may not)."""
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


def name_field(max_length: int, **field: Any) -> Any:
    """A name's `Field`: 1 to `max_length` characters as sent (the schema's `minLength` and `maxLength` count them
    so, as JSON Schema does), at least one not whitespace (its `pattern`). With `TRIMMED` after it: a limit
    counted after trimming accepted a body its schema refuses (100 characters and a space), and a blank name,
    which the schema allowed, was refused."""
    return Field(min_length=1, max_length=max_length, json_schema_extra={"pattern": r"\S"}, **field)


#: A name is stored trimmed; a blank one would be an empty entry in a list (the agent picker).
TRIMMED = AfterValidator(_trimmed_name)

AgentName = Annotated[str, name_field(AGENT_NAME_MAX, examples=["Support bot"]), TRIMMED, StorableText]
AgentSlug = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9-]{1,64}$",
        description="Unique in the team (inactive agents keep theirs): lowercase letters, digits and `-`, at "
        "most 64. Made from the name when not given (`-2`, `-3`... when taken).",
        examples=["support-bot"],
    ),
]
#: What check_webhook_url accepts by syntax, for the schema: http(s) in any case, no user info, no control,
#: whitespace or invisible format character anywhere, a port 1-65535, and a host name of the characters a
#: resolver is handed (letters, digits, `.`, `_`, `-`, as app.webhooks.HOST_NAME) in labels of 1-63 characters.
#: At most MAX_NAME characters in all is said in the description only: a lookahead could state it, but made
#: schemathesis's boundary-length search take minutes per operation (tests/test_openapi.py collected in 270 s,
#: not 12).
#: The host must not start with a digit: numeric hosts are IP literals, and which addresses are allowed is
#: policy, not syntax (a 422 with the reason, like metadata host names). A Unicode host name is accepted too
#: (it is IDNA-encoded as the HTTP client will), but the schema documents its ASCII (`xn--`) form: no pattern
#: can say which Unicode IDNA accepts, nor which `xn--` labels are valid Punycode.
#: The unseen characters are app.webhooks' `_has_unseen_characters` as code point ranges (ASCII controls and
#: space; Unicode's Cc, Cf, Zs, Zl and Zp, this Python's Unicode data; tests/test_schemas.py compares them code
#: point by code point): a `\u` escape of four hex digits in the BMP, the character itself beyond it (neither
#: dialect has an escape for it the other reads; JSON Schema reads patterns with Unicode semantics).
_UNSEEN_RANGES = (
    (0x0000, 0x0020), (0x007F, 0x00A0), (0x00AD, 0x00AD), (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD),
    (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2), (0x1680, 0x1680), (0x180E, 0x180E), (0x2000, 0x200F),
    (0x2028, 0x202F), (0x205F, 0x2064), (0x2066, 0x206F), (0x3000, 0x3000), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x13438), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)  # fmt: skip


def _in_class(code: int) -> str:
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


_URL_BANNED = "".join(_in_class(a) + (f"-{_in_class(b)}" if b != a else "") for a, b in _UNSEEN_RANGES)
_HOST = r"[A-Za-z_-][A-Za-z0-9_-]{0,62}(\.[A-Za-z0-9_-]{1,63})*\.?"
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
WEBHOOK_URL_PATTERN = rf"^[Hh][Tt][Tt][Pp][Ss]?://{_HOST}(:{_PORT}?)?([/?#][^{_URL_BANNED}]*)?$"
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL of the n8n Webhook (or Chat Trigger) node; checked against the SSRF policy "
        "(an IP literal, a private address without WEBHOOK_ALLOW_PRIVATE_NETWORKS, a metadata host: 422). The "
        f"pattern states its syntax but for two rules: the host name is at most {MAX_NAME} characters (a trailing dot "
        "not counted), and an `xn--` label must be valid Punycode (IDNA); else 422.",
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


#: A client's own session id (`/v1`'s X-Session-Id header, the chat widget's `sessionId`): a key into n8n's
#: memory or into the stored widget sessions, which may also end up in a log line or an admin's query.
SESSION_ID_MAX = 200
SESSION_ID_RULE = f"must be 1 to {SESSION_ID_MAX} printable characters"


def check_session_id(value: str) -> str:
    """1-SESSION_ID_MAX printable characters (`str.isprintable`: no control, format or line/paragraph separator,
    no space but U+0020). A newline or an escape sequence in a key would forge or garble the lines it is logged
    in, and an invisible character makes two ids that look the same name different chats; a UUID, as the widget
    and most clients make, is always fine. One rule for both ways in (ValueError: the caller says where)."""
    if not value or len(value) > SESSION_ID_MAX or not value.isprintable():
        raise ValueError(SESSION_ID_RULE)
    return value


CHAT_TITLE_MAX = 200
ChatTitle = Annotated[str, Field(max_length=CHAT_TITLE_MAX, examples=["Quarterly report questions"]), StorableText]
