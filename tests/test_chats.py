"""Chats API: ownership, listing order and paging, search, one-query reads, updates, title rule."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.models import Agent, Chat, Team, User
from app.services.chats import like_pattern, title_from_message
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import count_rows, make_settings, run_migrations
from tests.factories import auth_headers, create_admin, create_agent, create_chat, create_team, create_user

SUMMARY_FIELDS = {"id", "agent_id", "title", "archived", "pinned", "message_count", "created_at", "updated_at"}
CHAT_FIELDS = SUMMARY_FIELDS | {"team_id", "user_id", "messages", "current_message_id", "has_more"}
MESSAGE_FIELDS = {
    "id",
    "role",
    "content",
    "status",
    "created_at",
    "error",
    "metadata",
    "parent_id",
    "sibling_ids",
    "feedback",
    "files",
}


@dataclass
class World:
    team: Team
    admin: User
    member: User
    other_member: User
    foreigner: User
    agent: Agent
    settings: Settings

    def h(self, user: User) -> dict[str, str]:
        return auth_headers(self.settings, user)


@pytest.fixture
async def world(session: AsyncSession, settings: Settings) -> World:
    team = await create_team(session)
    other_team = await create_team(session)
    return World(
        team=team,
        admin=await create_admin(session, team=team),
        member=await create_user(session, team=team),
        other_member=await create_user(session, team=team),
        foreigner=await create_admin(session, team=other_team),
        agent=await create_agent(session, team=team),
        settings=settings,
    )


def message(content: str, role: str = "user", **extra: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "role": role,
        "content": content,
        "status": "complete",
        "created_at": utcnow().isoformat(),
        **extra,
    }


# --- create ----------------------------------------------------------------------------------


async def test_create_chat_returns_201_chat(client: httpx.AsyncClient, world: World) -> None:
    response = await client.post(
        "/api/chats", json={"agent_id": str(world.agent.id), "title": "Hello"}, headers=world.h(world.member)
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == CHAT_FIELDS
    assert body["title"] == "Hello"
    assert body["messages"] == []
    assert body["message_count"] == 0
    assert body["user_id"] == str(world.member.id)
    assert body["team_id"] == str(world.team.id)
    assert (body["archived"], body["pinned"]) == (False, False)


async def test_create_chat_without_title_is_untitled(client: httpx.AsyncClient, world: World) -> None:
    for payload in ({"agent_id": str(world.agent.id)}, {"agent_id": str(world.agent.id), "title": "   "}):
        response = await client.post("/api/chats", json=payload, headers=world.h(world.member))
        assert response.status_code == 201
        assert response.json()["title"] is None


async def test_create_chat_with_foreign_or_unknown_agent_is_same_404(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    foreign = await create_agent(session, team=await create_team(session))
    a = await client.post("/api/chats", json={"agent_id": str(foreign.id)}, headers=world.h(world.member))
    b = await client.post("/api/chats", json={"agent_id": str(uuid.uuid4())}, headers=world.h(world.member))
    assert a.status_code == b.status_code == 404
    assert a.json() == b.json() == {"detail": "Agent not found"}
    assert await count_rows(session, "chats") == 0


async def test_create_chat_with_inactive_agent_is_409(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    inactive = await create_agent(session, team=world.team, is_active=False)
    response = await client.post("/api/chats", json={"agent_id": str(inactive.id)}, headers=world.h(world.member))
    assert response.status_code == 409
    assert "inactive" in response.json()["detail"]
    assert await count_rows(session, "chats") == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"agent_id": "not-a-uuid"},
        {},
        {"agent_id": "AGENT", "title": "x" * 201},
        {"agent_id": "AGENT", "unknown": True},
        {"agent_id": "AGENT", "title": 5},
        {"agent_id": "AGENT", "title": "nul\u0000"},
    ],
)
async def test_create_chat_bad_body_is_422(
    client: httpx.AsyncClient, world: World, session: AsyncSession, payload: dict[str, Any]
) -> None:
    payload = {k: (str(world.agent.id) if v == "AGENT" else v) for k, v in payload.items()}
    response = await client.post("/api/chats", json=payload, headers=world.h(world.member))
    assert response.status_code == 422
    assert await count_rows(session, "chats") == 0


async def test_create_chat_without_token_is_401(client: httpx.AsyncClient, world: World) -> None:
    response = await client.post("/api/chats", json={"agent_id": str(world.agent.id)})
    assert response.status_code == 401


# --- read ------------------------------------------------------------------------------------


async def test_read_chat_returns_messages_without_internal_keys(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    stored = [
        message("question"),
        message(
            "partial",
            role="assistant",
            status="error",
            error={"message": "n8n timed out", "code": "upstream_timeout"},
            metadata={"model": "gpt-4"},
            _worker=str(uuid.uuid4()),
        ),
    ]
    chat = await create_chat(session, user=world.member, agent=world.agent, messages=stored, message_count=2)
    response = await client.get(f"/api/chats/{chat.id}", headers=world.h(world.member))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == CHAT_FIELDS
    first, second = body["messages"]
    assert set(first) == set(second) == MESSAGE_FIELDS
    assert first["error"] is None
    assert first["metadata"] is None
    assert second["status"] == "error"
    assert second["error"] == {"message": "n8n timed out", "code": "upstream_timeout"}
    assert second["metadata"] == {"model": "gpt-4"}
    assert "_worker" not in response.text
    assert "worker" not in response.text
    assert stored[1]["_worker"] not in response.text


async def test_read_chat_renders_every_stored_timestamp_in_utc_with_z(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    """Messages stored with an offset (older rows wrote `+00:00`; any offset) all read back as `...Z` UTC."""
    stored = [
        message("a", created_at="2026-01-01T00:00:00+00:00"),
        message("b", created_at="2026-01-01T02:30:00.250000+02:00"),
        message("c", created_at="2026-01-01T00:31:00Z"),
    ]
    chat = await create_chat(session, user=world.member, agent=world.agent, messages=stored, message_count=3)
    body = (await client.get(f"/api/chats/{chat.id}", headers=world.h(world.member))).json()
    assert [m["created_at"] for m in body["messages"]] == [
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:30:00.250000Z",
        "2026-01-01T00:31:00Z",
    ]
    assert body["created_at"].endswith("Z")
    assert body["updated_at"].endswith("Z")


@pytest.fixture
def statements(app: FastAPI) -> Iterator[list[str]]:
    seen: list[str] = []

    def _record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engine = app_state(app).db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", _record)
    yield seen
    event.remove(engine, "before_cursor_execute", _record)


async def test_read_chat_reads_chat_and_messages_in_one_query(
    client: httpx.AsyncClient, world: World, session: AsyncSession, statements: list[str]
) -> None:
    stored = [message(f"m{i}") for i in range(30)]
    chat = await create_chat(session, user=world.member, agent=world.agent, messages=stored, message_count=30)
    statements.clear()
    response = await client.get(f"/api/chats/{chat.id}", headers=world.h(world.member))
    assert len(response.json()["messages"]) == 30
    chat_queries = [s for s in statements if "chats" in s]
    assert len(chat_queries) == 1
    assert "messages" in chat_queries[0]


@pytest.mark.parametrize("query", ["", "?last=2"])  # the whole branch, and the newest messages (another query)
@pytest.mark.parametrize("who", ["other_member", "admin", "foreigner"])
async def test_read_chat_of_someone_else_is_same_404_as_random(
    client: httpx.AsyncClient, world: World, session: AsyncSession, who: str, query: str
) -> None:
    chat = await create_chat(session, user=world.member, agent=world.agent)
    caller = getattr(world, who)
    a = await client.get(f"/api/chats/{chat.id}{query}", headers=world.h(caller))
    b = await client.get(f"/api/chats/{uuid.uuid4()}{query}", headers=world.h(caller))
    assert a.status_code == b.status_code == 404
    assert a.json() == b.json() == {"detail": "Chat not found"}


async def test_read_chat_malformed_id_is_422(client: httpx.AsyncClient, world: World) -> None:
    response = await client.get("/api/chats/1234", headers=world.h(world.member))
    assert response.status_code == 422


# --- list ------------------------------------------------------------------------------------


async def test_list_chats_orders_newest_activity_first_and_filters_pinned(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    """The contract's order, pinned or not; `pinned` narrows the list (and its total) to one kind."""
    now = utcnow()
    old = await create_chat(
        session, user=world.member, agent=world.agent, title="old", last_message_at=now - timedelta(2)
    )
    new = await create_chat(session, user=world.member, agent=world.agent, title="new", last_message_at=now)
    pinned = await create_chat(
        session, user=world.member, agent=world.agent, title="pinned", pinned=True, last_message_at=now - timedelta(9)
    )
    await create_chat(session, user=world.member, agent=world.agent, title="archived", archived=True)
    response = await client.get("/api/chats", headers=world.h(world.member))
    assert response.status_code == 200
    assert [c["id"] for c in response.json()] == [str(new.id), str(old.id), str(pinned.id)]
    assert response.headers["x-total-count"] == "3"
    assert all(set(c) == SUMMARY_FIELDS for c in response.json())
    only = await client.get("/api/chats", params={"pinned": "true"}, headers=world.h(world.member))
    assert [c["id"] for c in only.json()] == [str(pinned.id)]
    assert only.headers["x-total-count"] == "1"
    others = await client.get("/api/chats", params={"pinned": "false"}, headers=world.h(world.member))
    assert [c["id"] for c in others.json()] == [str(new.id), str(old.id)]
    bad = await client.get("/api/chats", params={"pinned": "maybe"}, headers=world.h(world.member))
    assert bad.status_code == 422


async def test_list_chats_order_ignores_renames_pins_and_archiving(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    now = utcnow()
    newest = await create_chat(session, user=world.member, agent=world.agent, last_message_at=now - timedelta(1))
    # An empty chat counts from its creation.
    empty = await create_chat(session, user=world.member, agent=world.agent, created_at=now - timedelta(2))
    older = await create_chat(session, user=world.member, agent=world.agent, last_message_at=now - timedelta(3))
    oldest = await create_chat(session, user=world.member, agent=world.agent, last_message_at=now - timedelta(4))
    expected = [str(c.id) for c in (newest, empty, older, oldest)]

    async def order() -> list[str]:
        response = await client.get("/api/chats", headers=world.h(world.member))
        return [c["id"] for c in response.json()]

    assert await order() == expected
    for changes in ({"title": "Renamed"}, {"pinned": True}, {"pinned": False}, {"archived": True}, {"archived": False}):
        response = await client.put(f"/api/chats/{oldest.id}", json=changes, headers=world.h(world.member))
        assert response.status_code == 200
        if changes != {"archived": True}:  # archived: not listed
            assert await order() == expected, changes
    # Pinned chats keep their place too.
    for chat in (older, oldest):
        await client.put(f"/api/chats/{chat.id}", json={"pinned": True}, headers=world.h(world.member))
    await client.put(f"/api/chats/{older.id}", json={"title": "Renamed too"}, headers=world.h(world.member))
    assert await order() == expected


async def test_list_chats_archived_filter(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    archived = await create_chat(session, user=world.member, agent=world.agent, archived=True)
    await create_chat(session, user=world.member, agent=world.agent)
    response = await client.get("/api/chats?archived=true", headers=world.h(world.member))
    assert [c["id"] for c in response.json()] == [str(archived.id)]
    assert response.headers["x-total-count"] == "1"


async def test_list_chats_paging_and_total(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    now = utcnow()
    ids = []
    for i in range(7):
        chat = await create_chat(
            session, user=world.member, agent=world.agent, last_message_at=now - timedelta(minutes=i)
        )
        ids.append(str(chat.id))
    seen = []
    for offset in range(0, 9, 3):
        page = await client.get(f"/api/chats?limit=3&offset={offset}", headers=world.h(world.member))
        assert page.headers["x-total-count"] == "7"
        seen += [c["id"] for c in page.json()]
    assert seen == ids
    beyond = await client.get("/api/chats?offset=50", headers=world.h(world.member))
    assert beyond.json() == []
    assert beyond.headers["x-total-count"] == "7"


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=-1",
        "offset=-1",
        "offset=99999999999999999999999",
        "limit=abc",
        "archived=maybe",
        "q=" + "x" * 201,
        "q=a%00b",
    ],
)
async def test_list_chats_bad_query_is_422(client: httpx.AsyncClient, world: World, query: str) -> None:
    response = await client.get(f"/api/chats?{query}", headers=world.h(world.member))
    assert response.status_code == 422


async def test_list_chats_limit_bounds_accepted(client: httpx.AsyncClient, world: World) -> None:
    for limit in (1, 100):
        response = await client.get(f"/api/chats?limit={limit}", headers=world.h(world.member))
        assert response.status_code == 200


async def test_list_chats_never_shows_other_users_or_teams(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    mine = set()
    for i in range(5):
        mine.add(str((await create_chat(session, user=world.member, agent=world.agent, title=f"mine {i}")).id))
    foreign_agent = await create_agent(session, team=await create_team(session))
    for i in range(4):
        await create_chat(session, user=world.other_member, agent=world.agent, title=f"mine too {i}")
        await create_chat(session, user=world.admin, agent=world.agent, title=f"mine admin {i}")
        await create_chat(session, user=world.foreigner, agent=foreign_agent, title=f"mine foreign {i}")
    for archived in ("false", "true"):
        seen: set[str] = set()
        for offset in range(0, 20, 2):
            page = await client.get(
                f"/api/chats?limit=2&offset={offset}&archived={archived}", headers=world.h(world.member)
            )
            seen |= {c["id"] for c in page.json()}
        assert seen == (mine if archived == "false" else set())
    searched = await client.get("/api/chats?q=mine&limit=100", headers=world.h(world.member))
    assert {c["id"] for c in searched.json()} == mine
    assert searched.headers["x-total-count"] == "5"


# --- search ----------------------------------------------------------------------------------


async def test_search_finds_word_only_in_a_message_body(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    hit = await create_chat(
        session,
        user=world.member,
        agent=world.agent,
        title="Weekly planning",
        messages=[message("hello"), message("The PINEAPPLE budget is approved", role="assistant")],
        message_count=2,
    )
    await create_chat(session, user=world.member, agent=world.agent, title="Other", messages=[message("apple")])
    await create_chat(
        session, user=world.other_member, agent=world.agent, messages=[message("pineapple for someone else")]
    )
    response = await client.get("/api/chats?q=pineApple", headers=world.h(world.member))
    assert [c["id"] for c in response.json()] == [str(hit.id)]
    assert response.headers["x-total-count"] == "1"


async def test_search_matches_titles_case_insensitively(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    hit = await create_chat(session, user=world.member, agent=world.agent, title="Quarterly REPORT")
    await create_chat(session, user=world.member, agent=world.agent, title="Something else")
    response = await client.get("/api/chats?q=report", headers=world.h(world.member))
    assert [c["id"] for c in response.json()] == [str(hit.id)]


async def test_search_takes_percent_and_underscore_literally(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    hit = await create_chat(session, user=world.member, agent=world.agent, title="50% off", messages=[])
    await create_chat(session, user=world.member, agent=world.agent, title="500 off")
    await create_chat(session, user=world.member, agent=world.agent, title="plain", messages=[message("a_b")])
    await create_chat(session, user=world.member, agent=world.agent, title="plain2", messages=[message("axb")])
    percent = await client.get("/api/chats", params={"q": "50%"}, headers=world.h(world.member))
    assert [c["id"] for c in percent.json()] == [str(hit.id)]
    underscore = await client.get("/api/chats", params={"q": "a_b"}, headers=world.h(world.member))
    assert [c["title"] for c in underscore.json()] == ["plain"]
    backslash = await client.get("/api/chats", params={"q": "\\"}, headers=world.h(world.member))
    assert backslash.status_code == 200
    assert backslash.json() == []


async def test_search_finds_quotes_backslashes_newlines_and_accents_in_messages(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    hit = await create_chat(
        session,
        user=world.member,
        agent=world.agent,
        title="t",
        messages=[message('Open C:\\temp\\"quoted" file\nthen the café')],
    )
    await create_chat(session, user=world.member, agent=world.agent, title="u", messages=[message("temp quoted")])
    for q in ('\\temp\\"quoted"', "file\nthen", "café", "CAFÉ", '"QUOTED"'):
        response = await client.get("/api/chats", params={"q": q}, headers=world.h(world.member))
        assert [c["id"] for c in response.json()] == [str(hit.id)], q


async def test_search_does_not_match_across_two_messages(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    await create_chat(session, user=world.member, agent=world.agent, title="t", messages=[message("ab"), message("cd")])
    for q in ('ab", "cd', "abcd", "content"):
        response = await client.get("/api/chats", params={"q": q}, headers=world.h(world.member))
        assert response.json() == [], q


async def test_search_matches_message_text_not_its_json(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    """`,` `"` `content` `role` are in every stored message's JSON, never in these texts or titles."""
    plain = await create_chat(
        session,
        user=world.member,
        agent=world.agent,
        title="Weekly planning",
        messages=[message("ab"), message("Budget approved", role="assistant"), message("cd")],
        message_count=3,
    )
    for q in (",", '"', "content", "role", "status", "complete", "created_at", ":", "{", "[", "assistant"):
        response = await client.get("/api/chats", params={"q": q}, headers=world.h(world.member))
        assert response.json() == [], q
        assert response.headers["x-total-count"] == "0", q
    word = await client.get("/api/chats", params={"q": "budget"}, headers=world.h(world.member))
    assert [c["id"] for c in word.json()] == [str(plain.id)]
    # The same characters do match where a title or a message text really holds them.
    in_title = await create_chat(session, user=world.member, agent=world.agent, title="Costs, roles", messages=[])
    in_text = await create_chat(
        session, user=world.member, agent=world.agent, title="x", messages=[message('the "content" of a role')]
    )
    expectations = {",": {in_title}, '"': {in_text}, "content": {in_text}, "role": {in_title, in_text}}
    for q, chats in expectations.items():
        response = await client.get("/api/chats", params={"q": q}, headers=world.h(world.member))
        assert {c["id"] for c in response.json()} == {str(chat.id) for chat in chats}, q


async def test_search_does_not_match_internal_keys_or_ids(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    stored = message("x", _worker=str(uuid.uuid4()))
    await create_chat(session, user=world.member, agent=world.agent, messages=[stored])
    for q in (stored["id"], stored["_worker"], "streaming", "user"):
        response = await client.get("/api/chats", params={"q": q}, headers=world.h(world.member))
        assert response.json() == [], q


def test_like_pattern_escapes_wildcards() -> None:
    assert like_pattern("50%_\\") == "%50\\%\\_\\\\%"


# --- update ----------------------------------------------------------------------------------


async def test_update_chat_changes_only_sent_fields(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    chat = await create_chat(session, user=world.member, agent=world.agent, title="t", messages=[message("keep")])
    url = f"/api/chats/{chat.id}"
    pinned = await client.put(url, json={"pinned": True}, headers=world.h(world.member))
    assert pinned.status_code == 200
    assert (pinned.json()["title"], pinned.json()["pinned"], pinned.json()["archived"]) == ("t", True, False)
    assert pinned.json()["messages"][0]["content"] == "keep"
    renamed = await client.put(url, json={"title": "New", "archived": True}, headers=world.h(world.member))
    assert (renamed.json()["title"], renamed.json()["pinned"], renamed.json()["archived"]) == ("New", True, True)
    untitled = await client.put(url, json={"title": None}, headers=world.h(world.member))
    assert untitled.json()["title"] is None
    assert untitled.json()["updated_at"] >= pinned.json()["updated_at"]


@pytest.mark.parametrize(
    "body",
    [
        {"title": "x" * 201},
        {"title": "a\u0000"},
        {"archived": None},
        {"pinned": "yes"},
        {"pinned": 1},
        {"messages": []},
        {"agent_id": None},
    ],
)
async def test_update_chat_bad_body_is_422_and_changes_nothing(
    client: httpx.AsyncClient, world: World, session: AsyncSession, body: dict[str, Any]
) -> None:
    chat = await create_chat(session, user=world.member, agent=world.agent, title="t")
    response = await client.put(f"/api/chats/{chat.id}", json=body, headers=world.h(world.member))
    assert response.status_code == 422
    await session.refresh(chat)
    assert (chat.title, chat.archived, chat.pinned) == ("t", False, False)


@pytest.mark.parametrize("who", ["other_member", "admin", "foreigner"])
async def test_update_chat_of_someone_else_is_404(
    client: httpx.AsyncClient, world: World, session: AsyncSession, who: str
) -> None:
    chat = await create_chat(session, user=world.member, agent=world.agent, title="t")
    response = await client.put(f"/api/chats/{chat.id}", json={"title": "x"}, headers=world.h(getattr(world, who)))
    assert response.status_code == 404
    assert response.json() == {"detail": "Chat not found"}
    await session.refresh(chat)
    assert chat.title == "t"


# --- delete ----------------------------------------------------------------------------------


async def test_delete_chat_is_204_then_404(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    chat = await create_chat(session, user=world.member, agent=world.agent)
    response = await client.delete(f"/api/chats/{chat.id}", headers=world.h(world.member))
    assert response.status_code == 204
    assert await count_rows(session, "chats") == 0
    again = await client.delete(f"/api/chats/{chat.id}", headers=world.h(world.member))
    assert again.status_code == 404


@pytest.mark.parametrize("who", ["other_member", "admin", "foreigner"])
async def test_delete_chat_of_someone_else_is_404(
    client: httpx.AsyncClient, world: World, session: AsyncSession, who: str
) -> None:
    chat = await create_chat(session, user=world.member, agent=world.agent)
    response = await client.delete(f"/api/chats/{chat.id}", headers=world.h(getattr(world, who)))
    assert response.status_code == 404
    assert await session.get(Chat, chat.id) is not None


async def test_delete_chat_malformed_id_is_422(client: httpx.AsyncClient, world: World) -> None:
    response = await client.delete("/api/chats/xyz", headers=world.h(world.member))
    assert response.status_code == 422


# --- titles ----------------------------------------------------------------------------------


def test_title_from_short_message_is_the_message() -> None:
    assert title_from_message("  How do I   reset\nmy password?  ") == "How do I reset my password?"


def test_title_from_long_message_is_cut_on_a_word() -> None:
    text = "Please summarise the attached quarterly report and list the three biggest risks for next year"
    title = title_from_message(text)
    assert title.endswith("…")
    assert len(title) <= 61
    assert text.startswith(title[:-1])
    assert title[:-1] == title[:-1].rstrip()
    assert text[len(title) - 1] == " "


def test_title_from_one_long_word_is_cut_hard() -> None:
    title = title_from_message("x" * 500)
    assert title == "x" * 60 + "…"


def test_title_from_exactly_sixty_characters_is_unchanged() -> None:
    assert title_from_message("a" * 60) == "a" * 60


def test_title_from_blank_message_is_placeholder() -> None:
    assert title_from_message(" \n\t ") == "New chat"


# --- the embedded SQLite database -----------------------------------------------------------


async def create_chat_in(app: FastAPI, user: User, agent: Agent, *, title: str, text: str) -> Chat:
    async with app_state(app).db.sessionmaker() as session:
        return await create_chat(session, user=user, agent=agent, title=title, messages=[message(text)])


async def test_list_and_search_work_on_sqlite(tmp_path: Path) -> None:
    """The default embedded database runs the same list and search (json_each instead of jsonb)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    await anyio.to_thread.run_sync(run_migrations, url)
    settings = make_settings(url, tmp_path)
    app = create_app(settings)
    try:
        async with app_state(app).db.sessionmaker() as session:
            team = await create_team(session)
            user = await create_user(session, team=team)
            agent = await create_agent(session, team=team)
            hit = await create_chat(session, user=user, agent=agent, title="t", messages=[message("Find the WALRUS")])
            await create_chat(session, user=user, agent=agent, title="50% walrus-free", messages=[message("no")])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            headers = auth_headers(settings, user)
            found = await c.get("/api/chats", params={"q": "walrus"}, headers=headers)
            assert found.status_code == 200
            assert {ch["id"] for ch in found.json()} >= {str(hit.id)}
            assert found.headers["x-total-count"] == "2"
            body_only = await c.get("/api/chats", params={"q": "find the"}, headers=headers)
            assert [ch["id"] for ch in body_only.json()] == [str(hit.id)]
            percent = await c.get("/api/chats", params={"q": "50%"}, headers=headers)
            assert [ch["title"] for ch in percent.json()] == ["50% walrus-free"]
            # Case is ignored beyond ASCII, as on PostgreSQL (SQLite's own LIKE folds ASCII letters only).
            accented = await create_chat_in(app, user, agent, title="École d'ÉTÉ", text="ΣΟΦΊΑ und Straße")
            for q in ("école", "ÉCOLE D'été", "σοφία", "sTRAße"):
                unicode_case = await c.get("/api/chats", params={"q": q}, headers=headers)
                assert [ch["id"] for ch in unicode_case.json()] == [str(accented.id)], q
            for q in (",", '"', "content", "role"):
                json_only = await c.get("/api/chats", params={"q": q}, headers=headers)
                assert json_only.json() == [], q
            created = await c.post("/api/chats", json={"agent_id": str(agent.id)}, headers=headers)
            assert created.status_code == 201
            read = await c.get(f"/api/chats/{hit.id}", headers=headers)
            assert read.json()["messages"][0]["content"] == "Find the WALRUS"
    finally:
        await shutdown(app)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/chats"),
        ("POST", "/api/chats"),
        ("GET", "/api/chats/{id}"),
        ("PUT", "/api/chats/{id}"),
        ("DELETE", "/api/chats/{id}"),
    ],
)
async def test_chat_endpoints_without_token_are_401(
    client: httpx.AsyncClient, world: World, session: AsyncSession, method: str, path: str
) -> None:
    chat = await create_chat(session, user=world.member, agent=world.agent)
    response = await client.request(method, path.format(id=chat.id))
    assert response.status_code == 401
    assert await session.get(Chat, chat.id) is not None


async def test_update_chat_random_and_malformed_ids(client: httpx.AsyncClient, world: World) -> None:
    random_id = await client.put(f"/api/chats/{uuid.uuid4()}", json={"title": "x"}, headers=world.h(world.member))
    assert random_id.status_code == 404
    assert random_id.json() == {"detail": "Chat not found"}
    malformed = await client.put("/api/chats/zzz", json={"title": "x"}, headers=world.h(world.member))
    assert malformed.status_code == 422
