"""/api/teams: sign-up with the first admin, the caller's team and its settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Team
from main import create_app, shutdown
from tests.authhelpers import https_client, login
from tests.conftest import count_rows, make_settings, sent_during_a_demotion
from tests.factories import auth_headers, create_admin, create_team, create_user

SIGNUP = {"name": "Acme Support", "admin_email": " Boss@Acme.example.com ", "admin_password": "long-enough-pw"}

NO_QUOTA = {"messages_per_user_per_day": None}


pytestmark = pytest.mark.settings(RATE_LIMIT_ENABLED=False)


async def test_create_team_creates_team_and_admin(web: httpx.AsyncClient) -> None:
    response = await web.post("/api/teams", json={**SIGNUP, "admin_full_name": "The Boss"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"team", "user"}
    assert set(body["team"]) == {"id", "name", "slug", "settings", "created_at"}
    assert body["team"]["slug"] == "acme-support"
    assert body["team"]["settings"] == {"open_registration": False, "quota": NO_QUOTA}
    assert body["user"]["role"] == "admin"
    assert body["user"]["email"] == "boss@acme.example.com"
    assert body["user"]["team_id"] == body["team"]["id"]
    assert "password" not in response.text
    assert (await login(web, "boss@acme.example.com", "long-enough-pw")).status_code == 200


async def test_create_team_same_name_gets_another_slug(web: httpx.AsyncClient) -> None:
    first = await web.post("/api/teams", json=SIGNUP)
    second = await web.post("/api/teams", json=SIGNUP)
    assert first.status_code == second.status_code == 201
    assert first.json()["team"]["slug"] != second.json()["team"]["slug"]
    assert second.json()["team"]["slug"].startswith("acme-support-")


@pytest.mark.parametrize(
    "changes",
    [
        {"admin_password": "short"},
        {"admin_email": "nope"},
        {"name": "   "},
        {"name": "x" * 101},
        {"role": "admin"},
        {"settings": {"open_registration": False}},
    ],
)
async def test_create_team_bad_input_is_422_and_creates_nothing(
    web: httpx.AsyncClient, session: AsyncSession, changes: dict[str, Any]
) -> None:
    response = await web.post("/api/teams", json={**SIGNUP, **changes})
    assert response.status_code == 422
    assert await count_rows(session, "teams") == 0
    assert await count_rows(session, "users") == 0


async def test_create_team_disabled_is_403(database_url: str, tmp_path: Path, session: AsyncSession) -> None:
    app = create_app(make_settings(database_url, tmp_path, TEAM_SIGNUP_ENABLED=False))
    try:
        async with https_client(app) as c:
            response = await c.post("/api/teams", json=SIGNUP)
        assert response.status_code == 403
        assert response.json() == {"detail": "Team sign-up is disabled on this server"}
        assert await count_rows(session, "teams") == 0
    finally:
        await shutdown(app)


async def test_read_current_team(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session, name="Mine")
    await create_team(session, name="Theirs")
    user = await create_user(session, team=team)
    response = await web.get("/api/teams/current", headers=auth_headers(settings, user))
    assert response.status_code == 200
    assert response.json()["id"] == str(team.id)
    assert response.json()["name"] == "Mine"
    assert response.json()["settings"] == {"open_registration": False, "quota": NO_QUOTA}
    assert (await web.get("/api/teams/current")).status_code == 401


async def test_update_team_as_admin(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    headers = auth_headers(settings, admin)
    response = await web.put("/api/teams/current", json={"name": " Renamed "}, headers=headers)
    assert response.status_code == 200
    assert response.json()["name"] == "Renamed"
    assert response.json()["settings"] == {"open_registration": False, "quota": NO_QUOTA}
    opened = await web.put("/api/teams/current", json={"settings": {"open_registration": True}}, headers=headers)
    assert opened.status_code == 200
    assert opened.json()["settings"] == {"open_registration": True, "quota": NO_QUOTA}
    assert opened.json()["name"] == "Renamed"
    closed = await web.put("/api/teams/current", json={"settings": {"open_registration": False}}, headers=headers)
    assert closed.json()["settings"] == {"open_registration": False, "quota": NO_QUOTA}
    register = await web.post(
        "/api/auth/register", json={"team_id": str(team.id), "email": "new@example.com", "password": "long-enough"}
    )
    assert register.status_code == 403


@pytest.mark.parametrize(
    "body",
    [
        {"settings": {"unknown_key": True}},
        {"settings": {"open_registration": "yes"}},
        {"settings": {"open_registration": None}},
        {"name": ""},
        {"name": None},
        {"slug": "mine"},
    ],
)
async def test_update_team_bad_input_is_422_and_changes_nothing(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, body: dict[str, Any]
) -> None:
    team = await create_team(session, name="Before")
    admin = await create_admin(session, team=team)
    response = await web.put("/api/teams/current", json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 422
    await session.refresh(team)
    assert team.name == "Before"
    assert team.settings == {"open_registration": False}


async def test_update_team_as_member_is_403(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session, name="Before")
    user = await create_user(session, team=team)
    response = await web.put("/api/teams/current", json={"name": "Hijack"}, headers=auth_headers(settings, user))
    assert response.status_code == 403
    refreshed = await session.get(Team, team.id, populate_existing=True)
    assert refreshed is not None
    assert refreshed.name == "Before"


async def test_an_admin_demoted_while_their_team_change_waits_changes_nothing(
    app: FastAPI, web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """The team's settings change waits for the row a demotion holds; the demoted admin is checked again
    under it (403), so opening registration is not the removed admin's last act."""
    team = await create_team(session)
    await create_admin(session, team=team)
    rogue = await create_admin(session, team=team)
    opening = web.put(
        "/api/teams/current", json={"settings": {"open_registration": True}}, headers=auth_headers(settings, rogue)
    )
    refused = await sent_during_a_demotion(app, rogue, opening)
    assert (refused.status_code, refused.json()) == (403, {"detail": "Admin role required"})
    await session.refresh(team)
    assert team.settings == {"open_registration": False}
