"""Agents API: admin writes, member reads, team isolation, SSRF at save, write-only encrypted headers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import decrypt_headers, encrypt_headers
from app.models import Agent, Team, User
from tests.conftest import _plain_url, count_rows, until_a_statement_waits
from tests.factories import auth_headers, create_admin, create_agent, create_chat, create_team, create_user

SECRET = "s3cr3t-header-value-DO-NOT-LEAK"
BASE_BODY = {"name": "Support", "webhook_url": "https://n8n.example.com/webhook/support"}
MEMBER_FIELDS = {
    "id",
    "team_id",
    "name",
    "slug",
    "description",
    "system_prompt",
    "config",
    "avatar_url",
    "is_active",
    "created_at",
    "updated_at",
}
ADMIN_FIELDS = MEMBER_FIELDS | {"webhook_url", "webhook_header_names", "response_mode", "file_delivery"}


@dataclass
class World:
    team: Team
    admin: User
    member: User
    other_admin: User
    settings: Settings

    def h(self, user: User) -> dict[str, str]:
        return auth_headers(self.settings, user)


@pytest.fixture
async def world(session: AsyncSession, settings: Settings) -> World:
    team = await create_team(session)
    return World(
        team=team,
        admin=await create_admin(session, team=team),
        member=await create_user(session, team=team),
        other_admin=await create_admin(session),
        settings=settings,
    )


async def _create(client: httpx.AsyncClient, world: World, **body: object) -> httpx.Response:
    return await client.post("/api/agents", json={**BASE_BODY, **body}, headers=world.h(world.admin))


# --- create ----------------------------------------------------------------------------------


async def test_create_agent_returns_admin_view(client: httpx.AsyncClient, world: World) -> None:
    response = await _create(
        client,
        world,
        description="Answers tickets",
        system_prompt="Be kind",
        config={"model": "gpt-4", "temperature": 0.7},
        webhook_headers={"X-N8N-Auth": SECRET, "A-Second": "x"},
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == ADMIN_FIELDS
    assert body["team_id"] == str(world.team.id)
    assert body["config"] == {"model": "gpt-4", "temperature": 0.7}
    assert body["webhook_header_names"] == ["A-Second", "X-N8N-Auth"]
    assert body["avatar_url"] is None
    assert body["is_active"] is True
    assert SECRET not in response.text


async def test_create_agent_stores_headers_encrypted(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    response = await _create(client, world, webhook_headers={"X-N8N-Auth": SECRET})
    agent = await session.get(Agent, uuid.UUID(response.json()["id"]))
    assert agent is not None
    assert agent.webhook_headers_encrypted is not None
    assert SECRET not in agent.webhook_headers_encrypted
    assert decrypt_headers(agent.webhook_headers_encrypted, world.settings.fernet) == {"X-N8N-Auth": SECRET}


async def test_create_agent_by_member_is_403(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    response = await client.post("/api/agents", json=BASE_BODY, headers=world.h(world.member))
    assert response.status_code == 403
    assert await count_rows(session, "agents") == 0


async def test_create_agent_without_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/agents", json=BASE_BODY)
    assert response.status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "   "},
        {"name": "\t\n"},
        {"name": "x" * 101},
        {"description": "x" * 2001},
        {"system_prompt": "x" * 20_001},
        {"config": {"blob": "x" * 17_000}},
        {"config": [1, 2]},
        {"webhook_url": "x" * 2049},
        {"unknown": 1},
        {"is_active": "maybe"},
    ],
)
async def test_create_agent_bad_field_is_422_and_stores_nothing(
    client: httpx.AsyncClient, world: World, session: AsyncSession, body: dict[str, object]
) -> None:
    response = await _create(client, world, **body)
    assert response.status_code == 422
    assert await count_rows(session, "agents") == 0


async def test_agent_name_is_stored_without_surrounding_whitespace(client: httpx.AsyncClient, world: World) -> None:
    """A blank name (the picker's empty entry, slug `agent`) is refused like a team's; spaces around are dropped."""
    created = await _create(client, world, name="  Support  ")
    assert created.status_code == 201
    assert (created.json()["name"], created.json()["slug"]) == ("Support", "support")
    updated = await client.put(
        f"/api/agents/{created.json()['id']}", json={"name": " Help desk\n"}, headers=world.h(world.admin)
    )
    assert updated.json()["name"] == "Help desk"


async def test_create_agent_missing_required_field_is_422(client: httpx.AsyncClient, world: World) -> None:
    response = await client.post("/api/agents", json={"name": "x"}, headers=world.h(world.admin))
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://2852039166/", "link-local"),
        ("http://0xa9fea9fe/", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[fd00:ec2::254]/", "link-local"),
        ("http://100.100.100.200/", "link-local"),
        ("http://metadata.google.internal/", "metadata"),
        ("ftp://n8n.example.com/webhook", "http:// or https://"),
        ("https://user:pass@n8n.example.com/webhook", "user name or password"),
    ],
)
async def test_create_agent_blocked_webhook_url_is_422_with_reason(
    client: httpx.AsyncClient, world: World, session: AsyncSession, url: str, reason: str
) -> None:
    response = await _create(client, world, webhook_url=url)
    assert response.status_code == 422
    assert reason in response.json()["detail"][0]["msg"]
    assert await count_rows(session, "agents") == 0


async def test_private_webhook_url_refused_unless_allowed(
    database_url: str, tmp_path, session: AsyncSession, world: World
) -> None:
    from main import create_app, shutdown
    from tests.conftest import make_settings

    strict = make_settings(database_url, tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False)
    app = create_app(strict)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            headers = auth_headers(strict, world.admin)
            refused = await c.post(
                "/api/agents", json={**BASE_BODY, "webhook_url": "http://127.1:5678/webhook/x"}, headers=headers
            )
            assert refused.status_code == 422
            assert "private or loopback" in refused.json()["detail"][0]["msg"]
            assert await count_rows(session, "agents") == 0
            public = await c.post("/api/agents", json=BASE_BODY, headers=headers)
            assert public.status_code == 201
    finally:
        await shutdown(app)


# --- header validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example"},
        {"content-length": "10"},
        {"Transfer-Encoding": "chunked"},
        {"Connection": "close"},
        {"Keep-Alive": "1"},
        {"Upgrade": "h2c"},
        {"TE": "trailers"},
        {"Trailer": "x"},
        {"Proxy-Authorization": "Basic x"},
        {"Content-Type": "text/plain"},
        {"Accept-Encoding": "br"},
        {"Expect": "100-continue"},
        {"Bad Name": "x"},
        {"Bad:Name": "x"},
        {"": "x"},
        {"X-Auth": SECRET + "\r\nX-Injected: 1"},
        {"X-Auth": SECRET + "\n"},
        {"X-Auth": SECRET + "\x00"},
        {"X-Auth": "é" + SECRET},
        {"X-Auth": "x" * 4097},
        {f"X-{i}": "v" for i in range(21)},
        {"X-Auth": SECRET, "x-auth": SECRET},
    ],
)
async def test_create_agent_bad_webhook_header_is_422_without_echoing_value(
    client: httpx.AsyncClient, world: World, session: AsyncSession, headers: dict[str, str]
) -> None:
    response = await _create(client, world, webhook_headers=headers)
    assert response.status_code == 422
    assert SECRET not in response.text
    assert "\r" not in response.text
    assert await count_rows(session, "agents") == 0


async def test_webhook_header_value_must_be_a_string(client: httpx.AsyncClient, world: World) -> None:
    response = await _create(client, world, webhook_headers={"X-Auth": 12345})
    assert response.status_code == 422
    assert "12345" not in response.text


# --- read / list -----------------------------------------------------------------------------


async def test_member_view_has_no_webhook_fields(client: httpx.AsyncClient, world: World) -> None:
    created = await _create(client, world, webhook_headers={"X-N8N-Auth": SECRET})
    agent_id = created.json()["id"]
    one = await client.get(f"/api/agents/{agent_id}", headers=world.h(world.member))
    many = await client.get("/api/agents", headers=world.h(world.member))
    assert one.status_code == 200
    assert set(one.json()) == MEMBER_FIELDS
    assert [set(a) for a in many.json()] == [MEMBER_FIELDS]
    for response in (one, many):
        assert "n8n.example.com" not in response.text
        assert SECRET not in response.text


async def test_admin_view_has_url_and_header_names_only(client: httpx.AsyncClient, world: World) -> None:
    created = await _create(client, world, webhook_headers={"X-N8N-Auth": SECRET})
    agent_id = created.json()["id"]
    one = await client.get(f"/api/agents/{agent_id}", headers=world.h(world.admin))
    many = await client.get("/api/agents", headers=world.h(world.admin))
    assert set(one.json()) == ADMIN_FIELDS
    assert one.json()["webhook_url"] == BASE_BODY["webhook_url"]
    assert one.json()["webhook_header_names"] == ["X-N8N-Auth"]
    assert [set(a) for a in many.json()] == [ADMIN_FIELDS]
    assert SECRET not in one.text + many.text


async def test_secret_header_value_never_in_logs(
    client: httpx.AsyncClient, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await _create(client, world, webhook_headers={"X-N8N-Auth": SECRET})
    agent_id = created.json()["id"]
    await client.put(
        f"/api/agents/{agent_id}", json={"webhook_headers": {"X-N8N-Auth": SECRET + "2"}}, headers=world.h(world.admin)
    )
    await client.put(
        f"/api/agents/{agent_id}", json={"webhook_headers": {"Host": SECRET}}, headers=world.h(world.admin)
    )
    await client.get(f"/api/agents/{agent_id}", headers=world.h(world.admin))
    await client.get("/api/agents", headers=world.h(world.member))
    assert caplog.records, "logging was captured"
    assert SECRET not in caplog.text
    assert all(SECRET not in str(r.args) for r in caplog.records)


async def test_list_agents_hides_inactive_and_foreign(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    active = await create_agent(session, team=world.team, name="B active")
    inactive = await create_agent(session, team=world.team, name="A inactive", is_active=False)
    other_team = await create_team(session)
    await create_agent(session, team=other_team, name="Foreign")
    response = await client.get("/api/agents", headers=world.h(world.member))
    assert [a["id"] for a in response.json()] == [str(active.id)]
    admin_all = await client.get("/api/agents?include_inactive=true", headers=world.h(world.admin))
    assert [a["id"] for a in admin_all.json()] == [str(inactive.id), str(active.id)]
    member_all = await client.get("/api/agents?include_inactive=true", headers=world.h(world.member))
    assert member_all.status_code == 200
    assert [a["id"] for a in member_all.json()] == [str(active.id)]


async def test_read_agent_of_other_team_is_same_404_as_random(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    foreign = await create_agent(session, team=await create_team(session))
    a = await client.get(f"/api/agents/{foreign.id}", headers=world.h(world.admin))
    b = await client.get(f"/api/agents/{uuid.uuid4()}", headers=world.h(world.admin))
    assert a.status_code == b.status_code == 404
    assert a.json() == b.json() == {"detail": "Agent not found"}


async def test_read_agent_malformed_id_is_422(client: httpx.AsyncClient, world: World) -> None:
    response = await client.get("/api/agents/not-a-uuid", headers=world.h(world.member))
    assert response.status_code == 422


async def test_member_can_read_inactive_agent_by_id(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    agent = await create_agent(session, team=world.team, is_active=False)
    response = await client.get(f"/api/agents/{agent.id}", headers=world.h(world.member))
    assert response.status_code == 200
    assert response.json()["is_active"] is False


# --- update ----------------------------------------------------------------------------------


async def test_update_agent_changes_only_sent_fields(client: httpx.AsyncClient, world: World) -> None:
    created = await _create(
        client, world, description="d", system_prompt="p", config={"a": 1}, webhook_headers={"X-A": SECRET}
    )
    agent_id = created.json()["id"]
    response = await client.put(f"/api/agents/{agent_id}", json={"name": "Renamed"}, headers=world.h(world.admin))
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Renamed"
    before = created.json()
    for field in ("description", "system_prompt", "config", "webhook_url", "webhook_header_names", "is_active"):
        assert body[field] == before[field]


async def test_update_agent_headers_replace_keep_and_clear(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    created = await _create(client, world, webhook_headers={"X-A": SECRET, "X-B": "b"})
    agent_id = created.json()["id"]
    url = f"/api/agents/{agent_id}"
    replaced = await client.put(url, json={"webhook_headers": {"X-C": "c"}}, headers=world.h(world.admin))
    assert replaced.json()["webhook_header_names"] == ["X-C"]
    kept = await client.put(url, json={"description": "new"}, headers=world.h(world.admin))
    assert kept.json()["webhook_header_names"] == ["X-C"]
    cleared = await client.put(url, json={"webhook_headers": {}}, headers=world.h(world.admin))
    assert cleared.json()["webhook_header_names"] == []
    agent = (await session.execute(select(Agent).where(Agent.id == uuid.UUID(agent_id)))).scalar_one()
    assert agent.webhook_headers_encrypted is None


async def test_a_refused_update_changes_nothing_not_even_the_headers(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    """A PUT refused for its slug (409) stores none of its fields: the new headers are encrypted before the slug
    is checked, and must not be kept by a refusal (bad input changes nothing)."""
    taken = (await _create(client, world, name="Taken")).json()["slug"]
    created = await _create(client, world, name="Mine", webhook_headers={"X-A": SECRET})
    agent_id = uuid.UUID(created.json()["id"])
    before = await session.get(Agent, agent_id)
    assert before is not None
    stored = (before.name, before.slug, before.webhook_headers_encrypted)
    refused = await client.put(
        f"/api/agents/{agent_id}",
        json={"slug": taken, "name": "Renamed", "webhook_headers": {"X-B": "replaced"}},
        headers=world.h(world.admin),
    )
    assert refused.status_code == 409
    after = await session.get(Agent, agent_id, populate_existing=True)
    assert after is not None
    assert (after.name, after.slug, after.webhook_headers_encrypted) == stored
    shown = await client.get(f"/api/agents/{agent_id}", headers=world.h(world.admin))
    assert shown.json()["webhook_header_names"] == ["X-A"]


async def test_moving_the_webhook_needs_the_headers_again(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    """The secret headers are write-only, but an admin could point the webhook at a host of their own, or at a
    workflow of their own on the same n8n, and have another admin's secrets sent there. Any other URL needs
    them given again ({} drops them); the same URL sent again (an edit of other fields) does not."""
    created = await _create(client, world, webhook_headers={"X-A": SECRET})
    url = f"/api/agents/{created.json()['id']}"
    before = created.json()["webhook_url"]
    for elsewhere in ("http://127.0.0.2:5678/webhook/x", "https://127.0.0.1:5678/x", before + "-mine"):
        refused = await client.put(url, json={"webhook_url": elsewhere}, headers=world.h(world.admin))
        assert refused.status_code == 422
        [error] = refused.json()["detail"]
        assert error["loc"] == ["body", "webhook_headers"]
        assert error["msg"].startswith("The webhook URL changes")
    agent = await session.get(Agent, uuid.UUID(created.json()["id"]), populate_existing=True)
    assert agent is not None
    assert agent.webhook_url == before
    same = await client.put(url, json={"webhook_url": before, "name": "Renamed"}, headers=world.h(world.admin))
    assert same.status_code == 200
    assert same.json()["webhook_header_names"] == ["X-A"]
    moved = await client.put(
        url, json={"webhook_url": before + "-v2", "webhook_headers": {"X-A": "new"}}, headers=world.h(world.admin)
    )
    assert moved.status_code == 200
    assert moved.json()["webhook_header_names"] == ["X-A"]
    dropped = await client.put(
        url,
        json={"webhook_url": "http://127.0.0.2:5678/webhook/x", "webhook_headers": {}},
        headers=world.h(world.admin),
    )
    assert dropped.status_code == 200
    assert dropped.json()["webhook_header_names"] == []
    # Without stored headers there is nothing to protect.
    again = await client.put(url, json={"webhook_url": "http://127.0.0.3:5678/webhook/y"}, headers=world.h(world.admin))
    assert again.status_code == 200


async def test_moving_the_webhook_waits_for_a_concurrent_save_of_the_headers(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    """Another admin's save of secret headers is in flight (it holds the agent's row) when a move of the
    webhook without headers arrives. The move read the agent before that commit, saw no headers and passed its
    check: both writes landed, the secrets bound for the old webhook went to the new one. The move now reads
    the agent under a row lock, so it sees the saved headers and is refused."""
    created = await _create(client, world)
    agent_id = uuid.UUID(created.json()["id"])
    before = created.json()["webhook_url"]
    secret = encrypt_headers({"X-A": SECRET}, world.settings.fernet)
    saving = await asyncpg.connect(_plain_url(world.settings.DATABASE_URL), timeout=5)
    try:
        async with saving.transaction():  # the other admin's save, as update_agent writes it
            await saving.execute("UPDATE agents SET webhook_headers_encrypted = $1 WHERE id = $2", secret, agent_id)
            moving = asyncio.create_task(
                client.put(
                    f"/api/agents/{agent_id}",
                    json={"webhook_url": "http://127.0.0.2:5678/webhook/mine"},
                    headers=world.h(world.admin),
                )
            )
            await until_a_statement_waits(saving, "%agents%")
        moved = await moving
    finally:
        await saving.close()
    assert moved.status_code == 422, moved.text
    assert moved.json()["detail"][0]["msg"].startswith("The webhook URL changes")
    agent = await session.get(Agent, agent_id, populate_existing=True)
    assert agent is not None
    assert agent.webhook_url == before


async def test_update_agent_clears_description_with_null(client: httpx.AsyncClient, world: World) -> None:
    created = await _create(client, world, description="d")
    response = await client.put(
        f"/api/agents/{created.json()['id']}", json={"description": None}, headers=world.h(world.admin)
    )
    assert response.status_code == 200
    assert response.json()["description"] is None


@pytest.mark.parametrize(
    "body",
    [
        {"name": None},
        {"name": "  "},
        {"webhook_url": None},
        {"config": None},
        {"is_active": None},
        {"name": "x" * 101},
        {"webhook_url": "http://169.254.169.254/"},
        {"webhook_url": "http://[::ffff:a9fe:a9fe]/"},
        {"webhook_headers": {"Connection": "close"}},
        {"team_id": str(uuid.uuid4())},
    ],
)
async def test_update_agent_bad_body_is_422_and_changes_nothing(
    client: httpx.AsyncClient, world: World, session: AsyncSession, body: dict[str, object]
) -> None:
    agent = await create_agent(session, team=world.team)
    response = await client.put(f"/api/agents/{agent.id}", json=body, headers=world.h(world.admin))
    assert response.status_code == 422
    await session.refresh(agent)
    assert agent.name == "Helper"
    assert agent.webhook_url == "http://127.0.0.1:5678/webhook/agent-stream"
    assert agent.team_id == world.team.id


async def test_update_agent_by_member_is_403(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    agent = await create_agent(session, team=world.team)
    response = await client.put(f"/api/agents/{agent.id}", json={"name": "x"}, headers=world.h(world.member))
    assert response.status_code == 403
    await session.refresh(agent)
    assert agent.name == "Helper"


async def test_update_agent_of_other_team_is_404(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    agent = await create_agent(session, team=world.team)
    response = await client.put(f"/api/agents/{agent.id}", json={"name": "x"}, headers=world.h(world.other_admin))
    assert response.status_code == 404
    assert response.json() == {"detail": "Agent not found"}
    await session.refresh(agent)
    assert agent.name == "Helper"


async def test_update_agent_can_reactivate(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    agent = await create_agent(session, team=world.team, is_active=False)
    response = await client.put(f"/api/agents/{agent.id}", json={"is_active": True}, headers=world.h(world.admin))
    assert response.json()["is_active"] is True


# --- delete ----------------------------------------------------------------------------------


async def test_delete_agent_is_soft_and_chats_stay_readable(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    agent = await create_agent(session, team=world.team)
    message = {"id": str(uuid.uuid4()), "role": "user", "content": "hi", "status": "complete",
               "created_at": "2026-12-02T00:00:00+00:00"}  # fmt: skip
    chat = await create_chat(session, user=world.member, agent=agent, messages=[message], message_count=1)
    response = await client.delete(f"/api/agents/{agent.id}", headers=world.h(world.admin))
    assert response.status_code == 204
    await session.refresh(agent)
    assert agent.is_active is False
    listed = await client.get("/api/agents", headers=world.h(world.member))
    assert listed.json() == []
    read = await client.get(f"/api/chats/{chat.id}", headers=world.h(world.member))
    assert read.status_code == 200
    assert read.json()["messages"][0]["content"] == "hi"
    again = await client.delete(f"/api/agents/{agent.id}", headers=world.h(world.admin))
    assert again.status_code == 204


async def test_delete_agent_by_member_is_403(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    agent = await create_agent(session, team=world.team)
    response = await client.delete(f"/api/agents/{agent.id}", headers=world.h(world.member))
    assert response.status_code == 403
    await session.refresh(agent)
    assert agent.is_active is True


async def test_delete_agent_of_other_team_is_404(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    agent = await create_agent(session, team=world.team)
    response = await client.delete(f"/api/agents/{agent.id}", headers=world.h(world.other_admin))
    assert response.status_code == 404
    await session.refresh(agent)
    assert agent.is_active is True


async def test_openapi_documents_agent_schemas(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert "webhook_headers" not in components["AgentAdminRead"]["properties"]
    assert "webhook_headers" in components["AgentCreate"]["properties"]
    assert json.dumps(components).count("webhook_url") >= 3


@pytest.mark.parametrize(
    "raw",
    [
        r'{"name": "a\u0000b", "webhook_url": "https://n8n.example.com/w"}',
        r'{"name": "a\ud800b", "webhook_url": "https://n8n.example.com/w"}',
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w", "description": "\u0000"}',
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w", "system_prompt": "x\u0000"}',
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w", "config": {"k": "v\u0000"}}',
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w", "config": {"k\u0000": "v"}}',
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w", "config": {"k": ["\ud800"]}}',
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w", "config": {"a": 1e400}}',
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w", "config": {"a": NaN}}',
        '{"name": "ab", "webhook_url": "https://n8n.example.com/w", "config": ' + '{"a":' * 40 + "1" + "}" * 40 + "}",
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w", "webhook_headers": {"X-\ud800": "v"}}',
        r'{"name": "ab", "webhook_url": "https://n8n.example.com/w\u0000"}',
    ],
)
async def test_create_agent_unstorable_text_is_422_not_500(
    client: httpx.AsyncClient, world: World, session: AsyncSession, raw: str
) -> None:
    headers = {**world.h(world.admin), "Content-Type": "application/json"}
    response = await client.post("/api/agents", content=raw.encode(), headers=headers)
    assert response.status_code == 422
    assert await count_rows(session, "agents") == 0


async def test_webhook_headers_absent_from_every_agent_response(client: httpx.AsyncClient, world: World) -> None:
    created = await _create(client, world, webhook_headers={"X-N8N-Auth": SECRET})
    agent_id = created.json()["id"]
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    admin, member = world.h(world.admin), world.h(world.member)
    responses = [
        created,
        await client.get("/api/agents", headers=admin),
        await client.get("/api/agents?include_inactive=true", headers=admin),
        await client.get("/api/agents", headers=member),
        await client.get("/api/agents?include_inactive=true", headers=member),
        await client.get(f"/api/agents/{agent_id}", headers=admin),
        await client.get(f"/api/agents/{agent_id}", headers=member),
        await client.put(f"/api/agents/{agent_id}", json={"name": "n"}, headers=admin),
        await client.put(f"/api/agents/{agent_id}", json={"webhook_headers": {"X-N8N-Auth": SECRET}}, headers=admin),
        await client.post(f"/api/agents/{agent_id}/avatar", files={"file": ("a.png", png.getvalue())}, headers=admin),
    ]
    for response in responses:
        assert response.status_code in (200, 201), response.text
        assert SECRET not in response.text
        items = response.json() if isinstance(response.json(), list) else [response.json()]
        assert items
        for item in items:
            assert "webhook_headers" not in item
            assert "webhook_headers_encrypted" not in item


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/agents"),
        ("POST", "/api/agents"),
        ("GET", "/api/agents/{id}"),
        ("PUT", "/api/agents/{id}"),
        ("DELETE", "/api/agents/{id}"),
        ("POST", "/api/agents/{id}/avatar"),
        ("GET", "/api/agents/{id}/avatar"),
    ],
)
async def test_agent_endpoints_without_token_are_401(
    client: httpx.AsyncClient, world: World, session: AsyncSession, method: str, path: str
) -> None:
    agent = await create_agent(session, team=world.team)
    response = await client.request(method, path.format(id=agent.id), headers={"Authorization": "Bearer junk"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    await session.refresh(agent)
    assert (agent.name, agent.is_active) == ("Helper", True)


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/api/agents/{id}"), ("DELETE", "/api/agents/{id}"), ("GET", "/api/agents/{id}/avatar")],
)
async def test_agent_endpoints_with_random_id_are_404_and_malformed_422(
    client: httpx.AsyncClient, world: World, method: str, path: str
) -> None:
    body = {"name": "x"} if method == "PUT" else None
    random_id = await client.request(method, path.format(id=uuid.uuid4()), headers=world.h(world.admin), json=body)
    assert random_id.status_code == 404
    assert random_id.json() == {"detail": "Agent not found"}
    malformed = await client.request(method, path.format(id="nope"), headers=world.h(world.admin), json=body)
    assert malformed.status_code == 422


# --- response_mode (callbacks) ---------------------------------------------------------------


async def test_response_mode_defaults_to_stream_and_is_shown_to_admins_only(
    client: httpx.AsyncClient, world: World
) -> None:
    created = await _create(client, world)
    assert created.status_code == 201
    assert created.json()["response_mode"] == "stream"
    member_view = await client.get(f"/api/agents/{created.json()['id']}", headers=world.h(world.member))
    assert "response_mode" not in member_view.json()


async def test_callback_mode_without_public_base_url_is_a_422_that_stores_nothing(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    refused = await _create(client, world, response_mode="callback")
    assert refused.status_code == 422
    assert "PUBLIC_BASE_URL" in refused.text
    assert await count_rows(session, "agents") == 0
    created = (await _create(client, world)).json()
    update = await client.put(
        f"/api/agents/{created['id']}", json={"response_mode": "callback"}, headers=world.h(world.admin)
    )
    assert update.status_code == 422
    stored = await session.get(Agent, uuid.UUID(created["id"]))
    assert stored is not None
    await session.refresh(stored)
    assert stored.response_mode == "stream"


@pytest.mark.settings(PUBLIC_BASE_URL="https://chat.example.com/")
async def test_callback_mode_with_public_base_url_is_saved(client: httpx.AsyncClient, world: World) -> None:
    created = await _create(client, world, response_mode="callback")
    assert created.status_code == 201
    assert created.json()["response_mode"] == "callback"
    agent_id = created.json()["id"]
    back = await client.put(f"/api/agents/{agent_id}", json={"response_mode": "stream"}, headers=world.h(world.admin))
    assert back.json()["response_mode"] == "stream"
    for bad in ("push", None, 1):
        wrong = await client.put(f"/api/agents/{agent_id}", json={"response_mode": bad}, headers=world.h(world.admin))
        assert wrong.status_code == 422
