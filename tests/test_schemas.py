"""The guard every request body shares: text PostgreSQL cannot store is a 422 that changes nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.fields import InputModel
from app.schemas import (
    AgentCreate,
    AgentUpdate,
    ChatUpdate,
    MeUpdate,
    TeamSettingsUpdate,
    TeamUpdate,
    UserUpdate,
)
from app.webhooks import WebhookPolicyError, _has_unseen_characters, check_webhook_url
from tests.conftest import count_rows, make_settings
from tests.factories import auth_headers, create_user

pytestmark = pytest.mark.settings(RATE_LIMIT_ENABLED=False)


SIGNUP = {"name": "Acme", "admin_email": "a@example.com", "admin_password": "password123"}


@pytest.mark.parametrize(
    "raw",
    [
        '{"name": "A\\u0000B", "admin_email": "a@example.com", "admin_password": "password123"}',
        '{"name": "AB", "admin_email": "a@example.com", "admin_password": "password123", "admin_full_name": "\\u0000"}',
        '{"name": "A\\ud800B", "admin_email": "a@example.com", "admin_password": "password123"}',
    ],
)
async def test_unstorable_text_in_signup_is_422(client: httpx.AsyncClient, session: AsyncSession, raw: str) -> None:
    response = await client.post("/api/teams", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]
    assert await count_rows(session, "teams") == 0


async def test_nul_in_nested_preferences_is_422(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    response = await client.patch(
        "/api/auth/me", json={"preferences": {"a": ["ok", {"b": "x\u0000"}]}}, headers=auth_headers(settings, user)
    )
    assert response.status_code == 422
    await session.refresh(user)
    assert user.preferences == {}


async def test_clean_body_still_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/teams", json={**SIGNUP, "name": "Zoë & Co"})
    assert response.status_code == 201


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_non_finite_numbers_are_422(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, number: str
) -> None:
    user = await create_user(session)
    response = await client.patch(
        "/api/auth/me",
        content=f'{{"preferences": {{"t": {number}}}}}',
        headers={**auth_headers(settings, user), "content-type": "application/json"},
    )
    assert response.status_code == 422
    await session.refresh(user)
    assert user.preferences == {}


# --- the JSON schema states what validation enforces ------------------------------------------------


def _accepts(model: type[InputModel], body: dict[str, Any]) -> bool:
    try:
        model.model_validate(body)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    ("model", "field", "nullable"),
    [
        (AgentUpdate, "name", False),
        (AgentUpdate, "webhook_url", False),
        (AgentUpdate, "config", False),
        (AgentUpdate, "is_active", False),
        (AgentUpdate, "description", True),
        (AgentUpdate, "webhook_headers", True),
        (ChatUpdate, "archived", False),
        (ChatUpdate, "title", True),
        (UserUpdate, "is_active", False),
        (UserUpdate, "full_name", True),
        (MeUpdate, "preferences", False),
        (TeamUpdate, "settings", False),
        (TeamSettingsUpdate, "open_registration", False),
    ],
)
def test_update_schema_offers_null_only_where_it_is_accepted(
    model: type[InputModel], field: str, nullable: bool
) -> None:
    schema = model.model_json_schema()
    assert jsonschema_rs.validator_for(schema).is_valid({field: None}) is nullable
    assert _accepts(model, {field: None}) is nullable


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (AgentUpdate, "name"),
        (ChatUpdate, "pinned"),
        (UserUpdate, "role"),
        (MeUpdate, "preferences"),
        (TeamUpdate, "name"),
        (TeamSettingsUpdate, "open_registration"),
    ],
)
def test_update_refuses_null_in_one_way(model: type[InputModel], field: str) -> None:
    """Every partial update refuses `null` with the same rule and the same message (`NotNull`)."""
    assert field in model.null_refused()
    with pytest.raises(ValidationError, match=f"{field} may be left out but not null"):
        model.model_validate({field: None})


WEBHOOK_URLS = [
    "https://n8n.example.com/webhook/support",
    "http://n8n:5678/webhook/x?a=1#f",
    "http://a.b.c:65535",
    "https://host_name./p",
    "ftp://n8n.example.com/webhook",
    "https://user:pass@n8n.example.com/",
    "http://n8n.example.com:0/",
    "http://n8n.example.com:65536/",
    "http://n8n.example.com/a b",
    "n8n.example.com/webhook",
    "http:///webhook",
    "http://DdL-JAJFw.*",
    "HTTPS://N8N.example.com/x",
    "http://n8n.example.com:/x",
    "http://0",
    "http://10/x",
    "http://n8n.example.com/\tx",
    "http://n8n.example.com/é\x0b",
    "http://n8n.example.com:99999/",
    # DNS's 253 characters for a whole name, a trailing dot not counted (longer ones: the description's rule).
    "http://" + ("a" * 63 + ".") * 3 + "a" * 61 + "/x",
    "http://" + ("a" * 63 + ".") * 3 + "a" * 61 + "./x",
    # Every invisible character the policy refuses, not only the common ones: format characters of other
    # scripts, rarer spaces, bidi isolates, interlinear annotation, tags beyond the BMP...
    "http://n8n.example.com/\u0600",
    "http://n8n.example.com/a\u061cb",
    "http://n8n.example.com/\u1680",
    "http://n8n.example.com/\u180e",
    "http://n8n.example.com/\u205f",
    "http://n8n.example.com/\u2066",
    "http://n8n.example.com/x#\ufff9",
    "http://n8n.example.com/?q=\U000110bd",
    "http://n8n.example.com/\U000e0001",
    # ...while visible text beyond the BMP is fine.
    "http://n8n.example.com/\U0001f600",
    "http://n8n.example.com/\U00020000",
]


@pytest.mark.parametrize("url", WEBHOOK_URLS)
def test_webhook_url_pattern_agrees_with_the_policy(url: str) -> None:
    """A URL the schema allows is one the policy accepts, and the other way round (host names; an IP literal is
    the policy's to judge, so the schema leaves numeric hosts out)."""
    pattern = AgentCreate.model_json_schema()["properties"]["webhook_url"]["pattern"]
    settings = make_settings("postgresql+asyncpg://unused/unused", Path("/tmp"), WEBHOOK_ALLOW_PRIVATE_NETWORKS=True)
    try:
        check_webhook_url(url, settings)
        accepted = True
    except WebhookPolicyError:
        accepted = False
    assert (re.search(pattern, url) is not None) is accepted
    # As a JSON Schema validator (ECMA-262 regular expressions, Unicode-aware) reads the schema.
    assert jsonschema_rs.validator_for({"type": "string", "pattern": pattern}).is_valid(url) is accepted


def test_webhook_url_pattern_refuses_every_character_the_policy_calls_unseen() -> None:
    """The path's character class is the policy's `_has_unseen_characters`, code point by code point (this
    Python's Unicode data: a newer one moving a character into a format category fails here first)."""
    pattern = AgentCreate.model_json_schema()["properties"]["webhook_url"]["pattern"]
    path_allowed = re.compile(pattern.rsplit("[/?#]", 1)[1].removesuffix("*)?$"))
    differ = [
        f"U+{code:04X}"
        for code in range(0x110000)
        if not 0xD800 <= code <= 0xDFFF
        and (path_allowed.fullmatch(chr(code)) is None) is not _has_unseen_characters(chr(code))
    ]
    assert differ == []


@pytest.mark.parametrize(
    "headers",
    [
        {"X-N8N-Auth": "secret"},
        {"X-A": "two  words\tand a tab"},
        {},
        {"Host": "x"},
        {"proxy-authorization": "x"},
        {"Content-Type": "text/plain"},
        {"X Bad": "x"},
        {"X-A": " leading"},
        {"X-A": "é"},
        {"X-A": "x" * 4097},
        {f"X-{i}": "x" for i in range(21)},
    ],
)
def test_webhook_headers_schema_agrees_with_validation(headers: dict[str, str]) -> None:
    body = {"name": "A", "webhook_url": "https://n8n.example.com/webhook", "webhook_headers": headers}
    schema = AgentCreate.model_json_schema()
    assert jsonschema_rs.validator_for(schema).is_valid(body) is _accepts(AgentCreate, body)
