"""Agent slugs: made from the name, suffixed when taken, unique per team (inactive agents included), editable."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Team, User
from app.slugs import first_free, slugify
from tests.factories import auth_headers, create_admin, create_team, create_user

URL = "https://n8n.example.com/webhook/support"


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("Support Bot", "support-bot"),
        ("  Support -- Bot (EU)!  ", "support-bot-eu"),
        ("Café Crème", "cafe-creme"),
        ("\uff26\uff35\uff2c\uff2c width", "full-width"),
        ("☕ 🤖", "agent"),
        ("a" * 80, "a" * 64),
        ("x" * 63 + " y", "x" * 63),
    ],
)
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug


def test_first_free_suffixes_and_keeps_64_characters() -> None:
    assert first_free("bot", set()) == "bot"
    assert first_free("bot", {"bot"}) == "bot-2"
    assert first_free("bot", {"bot", "bot-2", "bot-3"}) == "bot-4"
    long = "a" * 64
    assert first_free(long, {long}) == "a" * 62 + "-2"
    assert len(first_free(long, {long, *(f"{'a' * 62}-{n}" for n in range(2, 10))})) == 64


async def admin_in(session: AsyncSession, team: Team | None = None) -> User:
    return await create_admin(session, team=team or await create_team(session))


async def create(
    client: httpx.AsyncClient, settings: Settings, admin: User, name: str = "Support Bot", **body: object
) -> httpx.Response:
    return await client.post(
        "/api/agents", json={"name": name, "webhook_url": URL, **body}, headers=auth_headers(settings, admin)
    )


async def test_slug_from_name_with_suffixes(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await admin_in(session)
    slugs = [(await create(client, settings, admin)).json()["slug"] for _ in range(3)]
    assert slugs == ["support-bot", "support-bot-2", "support-bot-3"]
    # Another team has its own namespace.
    other = await admin_in(session)
    assert (await create(client, settings, other)).json()["slug"] == "support-bot"


async def test_given_slug_is_kept_and_409_when_taken_even_by_inactive_agent(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await admin_in(session)
    first = await create(client, settings, admin, slug="helpdesk")
    assert first.status_code == 201
    assert first.json()["slug"] == "helpdesk"
    gone = await client.delete(f"/api/agents/{first.json()['id']}", headers=auth_headers(settings, admin))
    assert gone.status_code == 204
    taken = await create(client, settings, admin, name="Other", slug="helpdesk")
    assert taken.status_code == 409
    assert taken.json() == {"detail": "Another agent of this team (active or not) already has this slug"}
    # The generated slug skips it too.
    assert (await create(client, settings, admin, name="Helpdesk")).json()["slug"] == "helpdesk-2"
    listed = await client.get("/api/agents?include_inactive=true", headers=auth_headers(settings, admin))
    assert sorted(a["slug"] for a in listed.json()) == ["helpdesk", "helpdesk-2"]


@pytest.mark.parametrize("slug", ["", "Upper", "with space", "under_score", "ü", "a" * 65, None, 5])
async def test_bad_slug_is_422(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, slug: object
) -> None:
    admin = await admin_in(session)
    agent = (await create(client, settings, admin)).json()
    if slug is not None:
        assert (await create(client, settings, admin, slug=slug)).status_code == 422
    response = await client.put(
        f"/api/agents/{agent['id']}", json={"slug": slug}, headers=auth_headers(settings, admin)
    )
    assert response.status_code == 422
    again = await client.get(f"/api/agents/{agent['id']}", headers=auth_headers(settings, admin))
    assert again.json()["slug"] == "support-bot"


async def test_slug_is_editable_and_409_when_taken(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await admin_in(session)
    one = (await create(client, settings, admin, name="One")).json()
    await create(client, settings, admin, name="Two")
    headers = auth_headers(settings, admin)
    renamed = await client.put(f"/api/agents/{one['id']}", json={"slug": "first-one"}, headers=headers)
    assert renamed.status_code == 200
    assert renamed.json()["slug"] == "first-one"
    same = await client.put(f"/api/agents/{one['id']}", json={"slug": "first-one", "name": "Uno"}, headers=headers)
    assert same.status_code == 200
    clash = await client.put(f"/api/agents/{one['id']}", json={"slug": "two", "name": "X"}, headers=headers)
    assert clash.status_code == 409
    current = (await client.get(f"/api/agents/{one['id']}", headers=headers)).json()
    assert (current["slug"], current["name"]) == ("first-one", "Uno")
    # The name changing does not change the slug.
    assert (await client.put(f"/api/agents/{one['id']}", json={"name": "Eins"}, headers=headers)).json()[
        "slug"
    ] == "first-one"


async def test_members_see_the_slug(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session)
    admin = await admin_in(session, team)
    member = await create_user(session, team=team)
    await create(client, settings, admin)
    listed = await client.get("/api/agents", headers=auth_headers(settings, member))
    assert [a["slug"] for a in listed.json()] == ["support-bot"]


async def test_concurrent_creates_of_one_name_get_distinct_slugs(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await admin_in(session)
    responses = await asyncio.gather(*(create(client, settings, admin) for _ in range(5)))
    assert [r.status_code for r in responses] == [201] * 5
    assert sorted(r.json()["slug"] for r in responses) == [
        "support-bot",
        "support-bot-2",
        "support-bot-3",
        "support-bot-4",
        "support-bot-5",
    ]
