"""The guard every request body shares: text PostgreSQL cannot store is a 422 that changes nothing."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from tests.conftest import count_rows, make_settings
from tests.factories import auth_headers, create_user


@pytest.fixture
def settings(database_url: str, tmp_path) -> Settings:
    return make_settings(database_url, tmp_path, RATE_LIMIT_ENABLED=False)


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
