"""OpenAPI descriptions of error responses shared by the routers (examples in Swagger UI)."""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorRead, OpenAIErrorRead
from app.services.auth import LOGIN_FAILED

Responses = dict[int | str, dict[str, Any]]


def error_doc(description: str, example: str | None = None) -> dict[str, Any]:
    """One documented `{"detail": ...}` error; the example is the description unless given."""
    return {
        "model": ErrorRead,
        "description": description,
        "content": {"application/json": {"example": {"detail": example or description}}},
    }


def openai_error_doc(description: str, type_: str, code: str | None, message: str | None = None) -> dict[str, Any]:
    """One documented error of the `/v1` routes, in OpenAI's shape `{"error": {message, type, param, code}}`."""
    error = {"message": message or description, "type": type_, "param": None, "code": code}
    return {
        "model": OpenAIErrorRead,
        "description": description,
        "content": {"application/json": {"example": {"error": error}}},
    }


def error_examples(description: str, examples: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One documented error with several named example bodies (one answer for several causes)."""
    return {
        "model": ErrorRead,
        "description": description,
        "content": {"application/json": {"examples": {name: {"value": body} for name, body in examples.items()}}},
    }


def total_count(description: str | None = None) -> Responses:
    """A paged list's 200: the `X-Total-Count` header (matches before paging)."""
    header = {"X-Total-Count": {"description": "Matches before paging", "schema": {"type": "integer"}}}
    doc: dict[str, Any] = {"headers": header}
    if description is not None:
        doc["description"] = description
    return {200: doc}


R401: Responses = {401: error_doc("Missing, invalid, expired or revoked credentials", "Could not validate credentials")}
R401_LOGIN: Responses = {
    401: error_examples(
        "Wrong email or password, unknown or inactive user (one message for all). When the "
        "credentials are right in several teams, `teams` lists them: retry with `team_id`.",
        {
            "failed": {"detail": LOGIN_FAILED},
            "several_teams": {
                "detail": "These credentials match accounts in several teams; send team_id",
                "teams": [{"id": "7d3c1d8e-6b1e-4c1f-9a53-2a0e8b1d4f00", "name": "Acme", "slug": "acme"}],
            },
        },
    )
}
R403_ADMIN: Responses = {403: error_doc("Admin role required")}
R403_ORIGIN: Responses = {
    403: error_doc("Cookie-authenticated write from an origin that is not allowed", "Origin not allowed")
}
R429: Responses = {
    429: {
        **error_doc("Too many attempts from this client IP; see the Retry-After header", "Too many requests"),
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    }
}
R422_WEBHOOK: Responses = {
    422: {
        "description": "Invalid body, or the webhook URL is refused by the SSRF policy: both in FastAPI's "
        'validation shape, the policy\'s reason in `msg` with `loc` `["body", "webhook_url"]`',
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/HTTPValidationError"},
                "example": {
                    "detail": [
                        {
                            "type": "value_error",
                            "loc": ["body", "webhook_url"],
                            "msg": "webhook address is link-local, metadata or reserved, which is never allowed",
                        }
                    ]
                },
            }
        },
    }
}

UNSAFE_METHODS = ("post", "put", "patch", "delete")
_MALFORMED = error_doc(
    "The body cannot be parsed (JSON that is not UTF-8, a form without its multipart boundary)",
    "There was an error parsing the body",
)
_TOO_LARGE = error_doc("The body is larger than MAX_REQUEST_BODY_BYTES", "Request body too large")
_UNAUTHENTICATED = R401[401]
_FOREIGN_ORIGIN = "Cookie-authenticated write from an origin that is not allowed"


_ERROR_REF = "#/components/schemas/ErrorRead"


def _json(doc: dict[str, Any]) -> dict[str, Any]:
    """An `error_doc` as it appears in the OpenAPI document (`model` becomes a schema reference)."""
    content = {"application/json": {**doc["content"]["application/json"], "schema": {"$ref": _ERROR_REF}}}
    return {"description": doc["description"], "content": content}


def json_only(responses: Responses) -> Responses:
    """Error docs for a route whose 200 is not JSON: FastAPI files a `model` under the route's own media type."""
    return {status: _json(doc) for status, doc in responses.items()}


def complete_openapi(schema: dict[str, Any], *, message_max_chars: int) -> dict[str, Any]:
    """Add what every route answers the same way, so no route can forget it (new routes included).

    - 400 on routes with a body: one FastAPI's parser cannot read (before validation);
    - 413 on routes with a body: the middleware's MAX_REQUEST_BODY_BYTES cap;
    - 401 on routes with a security requirement, and 403 on their writes (cookie writes from a foreign origin);
    - 422 as actually sent: FastAPI's validation shape without `input` and `ctx` (never echoed);
    - the configured MESSAGE_MAX_CHARS as `maxLength` of a message's content (and of the widget's chatInput).
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault("ErrorRead", ErrorRead.model_json_schema())
    validation = components.get("ValidationError")
    if validation is not None:
        for echoed in ("input", "ctx"):
            validation["properties"].pop(echoed, None)
    for name, field in (("MessageCreate", "content"), ("N8nChatRequest", "chatInput")):
        message = components.get(name)
        if message is not None:
            message["properties"][field]["maxLength"] = message_max_chars
    for methods in schema.get("paths", {}).values():
        for method, operation in methods.items():
            responses = operation.setdefault("responses", {})
            body = operation.get("requestBody")
            if body is not None:
                responses.setdefault("400", _json(_MALFORMED))
                responses.setdefault("413", _json(_TOO_LARGE))
            if operation.get("security"):
                responses.setdefault("401", _json(_UNAUTHENTICATED))
                if method in UNSAFE_METHODS:
                    if "403" not in responses:
                        responses["403"] = _json(error_doc(_FOREIGN_ORIGIN, "Origin not allowed"))
                    elif _FOREIGN_ORIGIN not in responses["403"]["description"]:
                        responses["403"]["description"] += f"; or: {_FOREIGN_ORIGIN}"
    return schema


def file_upload_body(description: str, **file_schema: Any) -> dict[str, Any]:
    """The OpenAPI request body of an upload read by app.uploads (one multipart field `file`), not by FastAPI's
    form parsing, which would write it: `file_schema` adds to the field's schema (e.g. `minLength`)."""
    field = {"type": "string", "format": "binary", **file_schema, "description": description}
    schema = {"type": "object", "required": ["file"], "properties": {"file": field}}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
