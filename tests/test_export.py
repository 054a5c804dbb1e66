"""Export (JSON with every branch, Markdown, JSON Lines streamed page by page) and import (all or nothing, agents
by slug, the body cap, concurrent imports), and the round trip export -> import -> export."""

from __future__ import annotations

import asyncio
import base64
import gc
import heapq
import json
import logging
import random
import threading
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, MutableMapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from markdown_it import MarkdownIt
from sqlalchemy import Select, delete, event, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat_schemas import ERROR_CODE_MAX_CHARS, ERROR_MESSAGE_MAX_CHARS, CallbackTool, format_timestamp
from app.config import Settings
from app.db import Database, utcnow
from app.fields import JSON_MAX_DEPTH
from app.models import Agent, Base, Chat, Message, User
from app.services import export_markdown, exports, imports
from app.services.chats import UNTITLED
from app.services.exports import EXPORT_PAGE_CHATS
from app.services.messages import INTERRUPTED
from app.share_schemas import EXPORT_FORMAT, EXPORT_VERSION
from app.state import app_state
from bench import bench_export
from tests.conftest import (
    TeamWorld,
    _plain_url,
    chat_with_sent_files,
    count_rows,
    make_settings,
    until_a_statement_waits,
)
from tests.factories import create_agent, create_chat, create_team, create_user, message_row
from tests.live import bodyless_request, cut_off_request, data_events, http_scope, live_server, parse_sse
from tools.fake_n8n import FakeN8n

FEEDBACK = {"rating": -1, "comment": "too short", "updated_at": "2026-12-01T10:00:00+00:00"}
NOTES = ("notes.txt", b"private notes 4242\n", "text/plain")
TABLE = ("table.csv", b"a,b\n1,2\n", "text/csv")
EXPORTED_FILE = {"filename": "a.txt", "content_type": "text/plain", "size": 2, "sha256": "a" * 64}


async def branchy_chat(session: AsyncSession, world: TeamWorld, user: User | None = None, title: str = "Tree") -> Chat:
    """Q1 -> A1 -> {Q2 -> {A2 (error), A2b (regenerated)}, Q2' (an edit) -> A2'}; the branch shown is
    Q1, A1, Q2, A2 (not the newest answer), so the export must keep which branch is current."""
    now = utcnow() - timedelta(minutes=5)
    chat = await create_chat(session, user=user or world.member, agent=world.agent, title=title)

    def at(seconds: int) -> Any:
        return now + timedelta(seconds=seconds)

    rows: dict[str, Message] = {}
    specs: list[tuple[str, str | None, str, str, str, dict[str, Any]]] = [
        ("q1", None, "user", "First question", "complete", {}),
        ("a1", "q1", "assistant", "First answer", "complete", {"metadata": {"format": "ndjson", "chunks": 3}}),
        ("q2", "a1", "user", "Second question", "complete", {}),
        ("a2", "q2", "assistant", "Half an ans", "error", {"error": {"message": "The agent failed", "code": "x"}}),
        ("a2b", "q2", "assistant", "Regenerated answer", "complete", {"feedback": FEEDBACK}),
        ("q2e", "a1", "user", "Second question, edited", "complete", {}),
        ("a2e", "q2e", "assistant", "Answer to the edit", "interrupted", {"error": INTERRUPTED}),
    ]
    for i, (key, parent, role, content, status, extra) in enumerate(specs):
        element = {"role": role, "content": content, "status": status, "created_at": at(i), **extra}
        row = message_row(chat.id, rows[parent].id if parent else None, element)
        session.add(row)
        await session.flush()
        rows[key] = row
    await session.execute(
        update(Chat).where(Chat.id == chat.id).values(current_message_id=rows["a2"].id, message_count=len(specs))
    )
    await session.commit()
    await session.refresh(chat)
    return chat


async def export_json(client: httpx.AsyncClient, world: TeamWorld, chat_id: Any, user: User | None = None) -> Any:
    response = await client.get(f"/api/chats/{chat_id}/export", headers=world.h(user or world.member))
    assert response.status_code == 200
    return response.json()


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """An export without what an import renews (ids, times): ids become positions in the message list."""
    position = {m["id"]: i for i, m in enumerate(document["messages"])}
    messages = []
    for m in document["messages"]:
        kept = {k: v for k, v in m.items() if k not in ("id", "created_at")}
        kept["parent_id"] = position.get(m["parent_id"])
        if kept.get("feedback"):
            kept["feedback"] = {k: v for k, v in kept["feedback"].items() if k != "updated_at"}
        messages.append(kept)
    drop = ("id", "created_at", "updated_at", "messages", "current_message_id", "current_branch")
    return {
        **{k: v for k, v in document.items() if k not in drop},
        "messages": messages,
        "current": position.get(document["current_message_id"]),
        "current_branch": [position[i] for i in document["current_branch"]],
    }


async def import_body(
    client: httpx.AsyncClient,
    world: TeamWorld,
    body: bytes | str,
    user: User | None = None,
    content_type: str = "application/json",
) -> httpx.Response:
    headers = {**world.h(user or world.member), "Content-Type": content_type}
    return await client.post("/api/chats/import", content=body, headers=headers)


# --- export one chat --------------------------------------------------------------------------


async def test_export_json_carries_every_branch_and_the_current_one(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await branchy_chat(session, team_world)
    response = await client.get(f"/api/chats/{chat.id}/export?format=json", headers=team_world.h(team_world.member))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-disposition"] == f'attachment; filename="chat-{chat.id}.json"'
    doc = response.json()
    assert doc["format"] == "n8n-chat-relay/chat"
    assert doc["version"] == 1
    assert doc["title"] == "Tree"
    assert doc["agent"] == {"slug": "helper", "name": "Helper"}
    assert (doc["archived"], doc["pinned"]) == (False, False)
    contents = [m["content"] for m in doc["messages"]]
    assert contents == [
        "First question",
        "First answer",
        "Second question",
        "Half an ans",
        "Regenerated answer",
        "Second question, edited",
        "Answer to the edit",
    ]
    by_content = {m["content"]: m for m in doc["messages"]}
    assert by_content["Regenerated answer"]["parent_id"] == by_content["Second question"]["id"]
    assert by_content["Second question, edited"]["parent_id"] == by_content["First answer"]["id"]
    assert by_content["First question"]["parent_id"] is None
    assert doc["current_message_id"] == by_content["Half an ans"]["id"]
    assert doc["current_branch"] == [
        by_content[c]["id"] for c in ("First question", "First answer", "Second question", "Half an ans")
    ]
    assert by_content["Half an ans"]["status"] == "error"
    assert by_content["Half an ans"]["error"] == {"message": "The agent failed", "code": "x"}
    assert by_content["First answer"]["metadata"] == {"format": "ndjson", "chunks": 3}
    assert by_content["Regenerated answer"]["feedback"] == {**FEEDBACK, "updated_at": "2026-12-01T10:00:00Z"}
    assert by_content["Answer to the edit"]["status"] == "interrupted"
    assert set(doc["messages"][0]) == {
        "id",
        "parent_id",
        "role",
        "content",
        "status",
        "created_at",
        "error",
        "metadata",
        "feedback",
        "files",
    }
    assert all(m["files"] == [] for m in doc["messages"])
    assert all(m["created_at"].endswith("Z") for m in doc["messages"])


async def test_export_markdown_is_the_current_branch(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await branchy_chat(session, team_world)
    response = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=team_world.h(team_world.member))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    assert response.headers["content-disposition"] == f'attachment; filename="chat-{chat.id}.md"'
    text = response.text
    assert text.startswith("# Tree\n")
    assert "Agent: Helper (`helper`)" in text
    order = [text.index(s) for s in ("First question", "First answer", "Second question", "Half an ans")]
    assert order == sorted(order)
    assert "## User" in text
    assert "## Assistant (error)" in text
    assert "> Error: The agent failed" in text
    for other_branch in ("Regenerated answer", "edited", "Answer to the edit"):
        assert other_branch not in text


async def test_export_streaming_message_is_written_as_interrupted(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    running = {"role": "assistant", "content": "so far", "status": "streaming", "_worker": str(uuid.uuid4())}
    chat = await create_chat(
        session, user=team_world.member, agent=team_world.agent, messages=[{"content": "Q"}, running]
    )
    doc = await export_json(client, team_world, chat.id)
    assert [m["status"] for m in doc["messages"]] == ["complete", "interrupted"]
    # With an error saying why it stops there, as every interrupted answer has (it had none).
    assert doc["messages"][1]["error"] == {
        "message": "The answer was still being written when the chat was exported",
        "code": "interrupted",
    }
    markdown = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=team_world.h(team_world.member))
    assert "## Assistant (interrupted)" in markdown.text
    assert "> Error: The answer was still being written when the chat was exported" in markdown.text
    # ... so that the export can be imported again, and exported again the same.
    response = await import_body(client, team_world, json.dumps(doc))
    assert response.status_code == 201
    again = await export_json(client, team_world, response.json()[0]["id"])
    assert comparable(again) == comparable(doc)


async def test_exports_are_not_kept_by_caches(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """An export is the user's whole conversation: like a file download, no cache (a browser's disk cache, a
    proxy in front of the service) keeps a copy of it."""
    chat = await branchy_chat(session, team_world)
    for path in (f"/api/chats/{chat.id}/export", f"/api/chats/{chat.id}/export?format=markdown", "/api/chats/export"):
        response = await client.get(path, headers=team_world.h(team_world.member))
        assert response.status_code == 200
        assert response.headers["cache-control"] == "private, no-store"
        assert response.headers["content-disposition"].startswith("attachment; ")


async def test_export_someone_elses_chat_is_404(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await branchy_chat(session, team_world)
    for intruder in (team_world.colleague, team_world.admin, team_world.foreigner):
        for fmt in ("json", "markdown"):
            response = await client.get(f"/api/chats/{chat.id}/export?format={fmt}", headers=team_world.h(intruder))
            assert response.status_code == 404
            assert response.json() == {"detail": "Chat not found"}
    bad = await client.get(f"/api/chats/{chat.id}/export?format=pdf", headers=team_world.h(team_world.member))
    assert bad.status_code == 422
    assert (await client.get(f"/api/chats/{chat.id}/export")).status_code == 401


# --- export all: JSON Lines -------------------------------------------------------------------


def _statements(app: FastAPI, start: str, holding: str) -> Iterator[list[str]]:
    """For a fixture: the statements the app runs meanwhile that start with `start` and hold `holding` (upper
    case, whitespace folded)."""
    seen: list[str] = []
    engine = app_state(app).db.engine.sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        flat = " ".join(statement.split()).upper()
        if flat.startswith(start) and holding in flat:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def chat_selects(app: FastAPI) -> Iterator[list[str]]:
    """The statements that read pages of chats (the export's keyset pages of chats, with their agents)."""
    yield from _statements(app, "SELECT CHATS.ID", "ORDER BY CHATS.CREATED_AT, CHATS.ID LIMIT")


async def test_export_all_streams_json_lines_page_by_page(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, chat_selects: list[str]
) -> None:
    count = 2 * EXPORT_PAGE_CHATS + 5
    made = []
    for i in range(count):
        messages = [{"content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        made.append(
            await create_chat(
                session, user=team_world.member, agent=team_world.agent, messages=messages, title=f"chat {i}"
            )
        )
    await create_chat(session, user=team_world.colleague, agent=team_world.agent, title="not mine")
    chat_selects.clear()
    async with client.stream("GET", "/api/chats/export", headers=team_world.h(team_world.member)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["content-disposition"].startswith('attachment; filename="chats-')
        assert "content-length" not in response.headers  # streamed, not built whole
        lines = [line async for line in response.aiter_lines() if line]
    assert len(lines) == count
    documents = [json.loads(line) for line in lines]
    assert [d["title"] for d in documents] == [f"chat {i}" for i in range(count)]
    # Three pages of at most EXPORT_PAGE_CHATS chats, not one query for everything.
    assert len(chat_selects) == 3
    # Each line is the same JSON as the single export.
    assert documents[7] == await export_json(client, team_world, made[7].id)


async def test_export_all_with_no_chats_is_empty(client: httpx.AsyncClient, team_world: TeamWorld) -> None:
    response = await client.get("/api/chats/export", headers=team_world.h(team_world.colleague))
    assert response.status_code == 200
    assert response.content == b""
    assert (await client.get("/api/chats/export")).status_code == 401


async def exported_while_messages_change(
    world: TeamWorld, export: Coroutine[Any, Any, httpx.Response], change: str, *args: Any
) -> httpx.Response:
    """`export`'s answer, its messages read only once `change` (SQL with `args`) has committed: the messages'
    table is locked until then, so an export that read the chat before its messages reads them changed."""
    conn = await asyncpg.connect(_plain_url(world.settings.DATABASE_URL))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            exporting = asyncio.ensure_future(export)
            await until_a_statement_waits(conn, "%messages%")
            await conn.execute(change, *args)
        return await exporting
    finally:
        await conn.close()


FIRST_SEND = (
    "WITH q AS (INSERT INTO messages (id, chat_id, parent_id, role, content, status, created_at, updated_at)"
    " VALUES ($2, $1, NULL, 'user', 'Hi', 'complete', now(), now()),"
    " ($3, $1, $2, 'assistant', '', 'streaming', now() + interval '1 microsecond', now()) RETURNING id)"
    " UPDATE chats SET current_message_id = $3, message_count = 2 WHERE id = $1"
)


async def test_an_export_taken_while_a_chats_first_send_commits_imports_again(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """An export read the chat, then its messages: a first send committed in between gave a chat without a
    current message holding two messages, which no import takes (422). It reads them in one snapshot now."""
    chat = await create_chat(session, user=team_world.member, agent=team_world.agent, title="new")
    export = client.get(f"/api/chats/{chat.id}/export", headers=team_world.h(team_world.member))
    response = await exported_while_messages_change(team_world, export, FIRST_SEND, chat.id, uuid.uuid4(), uuid.uuid4())
    assert response.status_code == 200
    document = response.json()
    assert (document["current_message_id"] is None) == (document["messages"] == [])
    assert (await import_body(client, team_world, response.content)).status_code == 201


async def test_an_export_of_all_chats_taken_while_one_is_deleted_imports_again(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """The JSON Lines export read a page of chats, then their messages: a chat deleted in between was exported
    with its current message but none of its messages, and the file then imported nothing at all (422)."""
    kept = await branchy_chat(session, team_world, title="kept")
    gone = await branchy_chat(session, team_world, title="gone")
    export = client.get("/api/chats/export", headers=team_world.h(team_world.member))
    response = await exported_while_messages_change(team_world, export, "DELETE FROM chats WHERE id = $1", gone.id)
    assert response.status_code == 200
    documents = [json.loads(line) for line in response.content.splitlines()]
    assert documents[0]["id"] == str(kept.id)
    assert all(len(d["messages"]) == 7 for d in documents)  # the deleted chat whole, or not at all
    imported = await import_body(client, team_world, response.content, content_type="application/x-ndjson")
    assert imported.status_code == 201, imported.text


# --- import ---------------------------------------------------------------------------------


async def test_round_trip_keeps_content_and_branches(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await branchy_chat(session, team_world)
    await session.execute(update(Chat).where(Chat.id == chat.id).values(pinned=True))
    await session.commit()
    first = await export_json(client, team_world, chat.id)
    response = await import_body(client, team_world, json.dumps(first))
    assert response.status_code == 201
    [summary] = response.json()
    assert summary["id"] != str(chat.id)
    assert summary["title"] == "Tree"
    assert summary["message_count"] == 7
    assert summary["pinned"] is True
    second = await export_json(client, team_world, summary["id"])
    assert comparable(second) == comparable(first)
    assert not {m["id"] for m in second["messages"]} & {m["id"] for m in first["messages"]}
    assert second["created_at"] != first["created_at"]
    # The imported chat reads as the original: the same branch shown, the same siblings.
    read = (await client.get(f"/api/chats/{summary['id']}", headers=team_world.h(team_world.member))).json()
    assert [m["content"] for m in read["messages"]] == [
        "First question",
        "First answer",
        "Second question",
        "Half an ans",
    ]
    assert len(read["messages"][2]["sibling_ids"]) == 2
    assert len(read["messages"][3]["sibling_ids"]) == 2


async def test_round_trip_of_all_chats_as_json_lines(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    await branchy_chat(session, team_world, title="one")
    await branchy_chat(session, team_world, title="two")
    await create_chat(session, user=team_world.member, agent=team_world.agent, title="empty")
    exported = (await client.get("/api/chats/export", headers=team_world.h(team_world.member))).content
    # A colleague imports them: the chats become theirs, with the team's agent of that slug.
    response = await import_body(client, team_world, exported, team_world.colleague, "application/x-ndjson")
    assert response.status_code == 201
    assert [c["title"] for c in response.json()] == ["one", "two", "empty"]
    again = (await client.get("/api/chats/export", headers=team_world.h(team_world.colleague))).content
    before = [comparable(json.loads(line)) for line in exported.splitlines()]
    after = [comparable(json.loads(line)) for line in again.splitlines()]
    assert after == before
    listed = await client.get("/api/chats", headers=team_world.h(team_world.colleague))
    assert {c["title"] for c in listed.json()} == {"one", "two", "empty"}


async def test_round_trip_of_every_kind_of_answer_a_chat_holds(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    """What real chats hold imports again as it was: files, an answer that failed (with its error), one stopped
    (`cancelled`), one cut by a restart (`interrupted` with its error), one still streaming (exported as
    `interrupted`), and their metadata."""
    chat_id, _ = await chat_with_sent_files(client, session, team_world, fake, [NOTES, TABLE])
    failed = await client.post(
        f"/api/chats/{chat_id}/messages", json={"content": "__llm_error__"}, headers=team_world.h(team_world.member)
    )
    assert data_events(parse_sse(failed.text))[-1].type == "error"
    stopped = {"role": "assistant", "content": "Half", "status": "cancelled", "metadata": {"format": "ndjson"}}
    interrupted = {"role": "assistant", "content": "Cut", "status": "interrupted", "error": INTERRUPTED}
    running = {"role": "assistant", "content": "Still", "status": "streaming"}
    messages: list[dict[str, Any]] = [
        {"content": "Q1"},
        stopped,
        {"content": "Q2"},
        interrupted,
        {"content": "Q3"},
        running,
    ]
    await create_chat(session, user=team_world.member, agent=team_world.agent, messages=messages)
    exported = (await client.get("/api/chats/export", headers=team_world.h(team_world.member))).content
    first = [json.loads(line) for line in exported.splitlines()]
    assert [m["status"] for m in first[0]["messages"]] == ["complete", "complete", "complete", "error"]
    assert first[0]["messages"][3]["error"]["code"]
    assert first[0]["messages"][0]["files"]
    response = await import_body(client, team_world, exported, team_world.colleague, "application/x-ndjson")
    assert response.status_code == 201, response.text
    again = (await client.get("/api/chats/export", headers=team_world.h(team_world.colleague))).content
    assert [comparable(json.loads(line)) for line in again.splitlines()] == [comparable(d) for d in first]


async def test_round_trip_of_json_lines_keeps_unicode_line_separators(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """U+2028, U+2029 and U+0085 stay raw in the exported JSON: they must not split the import's lines."""
    odd = "one\u2028two\u2029three\u0085four\r\nfive"
    for title in ("first", "second"):
        messages = [{"content": odd}, {"role": "assistant", "content": f"{title} {odd}"}]
        await create_chat(session, user=team_world.member, agent=team_world.agent, messages=messages, title=title)
    exported = (await client.get("/api/chats/export", headers=team_world.h(team_world.member))).content
    assert "\u2028".encode() in exported
    response = await import_body(client, team_world, exported, team_world.colleague, "application/x-ndjson")
    assert response.status_code == 201, response.text
    again = (await client.get("/api/chats/export", headers=team_world.h(team_world.colleague))).content
    before = [comparable(json.loads(line)) for line in exported.split(b"\n") if line]
    after = [comparable(json.loads(line)) for line in again.split(b"\n") if line]
    assert after == before
    assert after[0]["messages"][0]["content"] == odd


async def test_import_matches_agents_in_the_callers_team(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await branchy_chat(session, team_world)
    doc = await export_json(client, team_world, chat.id)
    response = await import_body(client, team_world, json.dumps(doc), team_world.foreigner)
    assert response.status_code == 201
    assert response.json()[0]["agent_id"] == str(team_world.foreign_agent.id)
    mine = await client.get(f"/api/chats/{response.json()[0]['id']}", headers=team_world.h(team_world.member))
    assert mine.status_code == 404


async def test_import_with_missing_agent_slug_is_422_naming_it(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await branchy_chat(session, team_world)
    doc = await export_json(client, team_world, chat.id)
    other = {**doc, "agent": {"slug": "gone-bot", "name": "Gone"}}
    body = "\n".join(json.dumps(d) for d in (doc, other, doc))
    chats, messages = await count_rows(session, "chats"), await count_rows(session, "messages")
    response = await import_body(client, team_world, body, content_type="application/x-ndjson")
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert "gone-bot" in error["msg"]
    assert error["loc"] == ["body", 1, "agent", "slug"]
    assert (await count_rows(session, "chats"), await count_rows(session, "messages")) == (chats, messages)


async def _end_the_reading_session(settings: Settings) -> int:
    """Terminate the export's database session, paused between two batches (idle in its snapshot's transaction,
    its last statement a batch's `LIMIT`): how many sessions were ended."""
    conn = await asyncpg.connect(_plain_url(settings.DATABASE_URL))
    try:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state = 'idle in transaction' AND query LIKE '%LIMIT%'"
        )
    finally:
        await conn.close()
    return killed


def _broken(doc: dict[str, Any], change: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    messages = doc["messages"]
    if change == "parent_elsewhere":
        messages[3]["parent_id"] = str(uuid.uuid4())
    elif change == "parent_later":
        messages[1]["parent_id"] = messages[2]["id"]
    elif change == "duplicate_id":
        messages[4]["id"] = messages[3]["id"]
    elif change == "root_answer":
        messages[0]["role"] = "assistant"
    elif change == "same_role_twice":
        messages[2]["role"] = "assistant"
    elif change == "streaming":
        messages[6]["status"] = "streaming"
    elif change == "feedback_on_question":
        messages[0]["feedback"] = FEEDBACK
    elif change == "current_elsewhere":
        doc["current_message_id"] = str(uuid.uuid4())
    elif change == "current_missing":
        doc["current_message_id"] = None
    elif change == "branch_mismatch":
        doc["current_branch"] = doc["current_branch"][:2]
    elif change == "version":
        doc["version"] = 2
    elif change == "unknown_key":
        doc["owner"] = "someone"
    elif change == "nul_in_content":
        messages[0]["content"] = "a\x00b"
    elif change == "nul_in_error":
        messages[3]["error"]["message"] = "a\x00b"
    elif change == "nul_in_metadata_key":
        messages[1]["metadata"] = {"a\x00b": 1}
    elif change == "files_on_answer":
        messages[1]["files"] = [EXPORTED_FILE]
    elif change == "file_bad_sha256":
        messages[0]["files"] = [{**EXPORTED_FILE, "sha256": "not-a-hash"}]
    elif change == "file_with_bytes":
        messages[0]["files"] = [{**EXPORTED_FILE, "data": "aGk="}]
    elif change == "file_negative_size":
        messages[0]["files"] = [{**EXPORTED_FILE, "size": -1}]
    elif change == "file_type_not_a_mime_type":
        messages[0]["files"] = [{**EXPORTED_FILE, "content_type": "text/plain\n## Injected heading"}]
    elif change == "unknown_key_in_error":  # was dropped silently: the chat stored differed from the file
        messages[3]["error"]["detail"] = "kept nowhere"
    elif change == "error_on_question":
        messages[2]["error"] = {"message": "The agent failed", "code": "x"}
    elif change == "metadata_on_question":
        messages[2]["metadata"] = {"format": "json"}
    elif change == "question_not_complete":
        messages[2]["status"] = "interrupted"
    elif change == "blank_question":
        messages[2]["content"] = " \n "
    elif change == "question_too_long":  # over MESSAGE_MAX_CHARS (32,000 by default)
        messages[2]["content"] = "q" * 32_001
    elif change == "rating_true":  # lax mode took it for 1; rating a message refuses it
        messages[1]["feedback"] = {**FEEDBACK, "rating": True}
    elif change == "file_size_as_text":
        messages[0]["files"] = [{**EXPORTED_FILE, "size": "2"}]
    elif change == "file_size_true":
        messages[0]["files"] = [{**EXPORTED_FILE, "size": True}]
    elif change == "version_true":  # lax mode took `true` and `1.0` for version 1
        doc["version"] = True
    elif change == "version_float":
        doc["version"] = 1.0
    elif change == "feedback_time_past_the_calendar":  # year 10000 in UTC: stored, every read was a 500
        messages[1]["feedback"] = {**FEEDBACK, "updated_at": "9999-12-31T23:59:59-05:00"}
    elif change == "feedback_time_before_the_calendar":
        messages[1]["feedback"] = {**FEEDBACK, "updated_at": "0001-01-01T00:00:00+05:00"}
    return doc


@pytest.mark.parametrize(
    "change",
    [
        "parent_elsewhere",
        "parent_later",
        "duplicate_id",
        "root_answer",
        "same_role_twice",
        "streaming",
        "feedback_on_question",
        "current_elsewhere",
        "current_missing",
        "branch_mismatch",
        "version",
        "unknown_key",
        "nul_in_content",
        "nul_in_error",
        "nul_in_metadata_key",
        "files_on_answer",
        "file_bad_sha256",
        "file_with_bytes",
        "file_negative_size",
        "file_type_not_a_mime_type",
        "feedback_time_past_the_calendar",
        "feedback_time_before_the_calendar",
        "unknown_key_in_error",
        "error_on_question",
        "metadata_on_question",
        "question_not_complete",
        "blank_question",
        "question_too_long",
        "rating_true",
        "file_size_as_text",
        "file_size_true",
        "version_true",
        "version_float",
    ],
)
async def test_import_one_bad_chat_among_many_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, change: str
) -> None:
    chat = await branchy_chat(session, team_world)
    doc = await export_json(client, team_world, chat.id)
    lines = [doc] * 4 + [_broken(doc, change)] + [doc] * 2
    body = "\n".join(json.dumps(d) for d in lines) + "\n"
    chats, messages = await count_rows(session, "chats"), await count_rows(session, "messages")
    response = await import_body(client, team_world, body, content_type="application/jsonl")
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"][:2] == ["body", 4]
    assert error["msg"].startswith("Chat 5: ")
    assert "\x00" not in response.text
    assert (await count_rows(session, "chats"), await count_rows(session, "messages")) == (chats, messages)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"", "application/json", 422),
        (b"   \n\n", "application/x-ndjson", 422),
        (b'{"format": "n8n-chat-relay/chat"}\nnot json\n', "application/x-ndjson", 422),
        (b"\xff\xfe not utf-8", "application/json", 422),
        (b"[" * 100_000, "application/json", 422),
        (b"[1, 2]", "application/json", 422),
        (b"{}", "text/plain", 415),
        (b"{}", "application/x-www-form-urlencoded", 415),
    ],
)
async def test_import_malformed_body_is_refused(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, body: bytes, content_type: str, status: int
) -> None:
    response = await import_body(client, team_world, body, content_type=content_type)
    assert response.status_code == status
    assert await count_rows(session, "chats") == 0


async def test_import_without_auth_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chats/import", content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 401


async def test_import_empty_chat_and_interrupted_answer_are_kept(
    client: httpx.AsyncClient, team_world: TeamWorld
) -> None:
    doc = {
        "format": "n8n-chat-relay/chat",
        "version": 1,
        "title": "  ",
        "agent": {"slug": "helper"},
        "current_message_id": None,
        "messages": [],
    }
    q, a = str(uuid.uuid4()), str(uuid.uuid4())
    cut = {
        **doc,
        "title": "Cut",
        "current_message_id": q,  # not a leaf: the newest descendant is shown, as when switching branches
        "messages": [
            {"id": q, "parent_id": None, "role": "user", "content": "Q", "status": "complete"},
            {"id": a, "parent_id": q, "role": "assistant", "content": "A…", "status": "interrupted"},
        ],
    }
    body = json.dumps(doc) + "\n" + json.dumps(cut)
    response = await import_body(client, team_world, body, content_type="application/x-ndjson")
    assert response.status_code == 201
    empty, imported = response.json()
    assert (empty["title"], empty["message_count"]) == (None, 0)
    read = (await client.get(f"/api/chats/{imported['id']}", headers=team_world.h(team_world.member))).json()
    assert [(m["content"], m["status"]) for m in read["messages"]] == [("Q", "complete"), ("A…", "interrupted")]


async def test_import_of_a_question_without_an_answer_is_422_and_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A send stores a question with its answer, so no export holds a question without one. An imported one
    was shown as the branch's end: the next send then followed it with a second question (n8n got two in a
    row), and the chat's own export was refused on import (a message with the role of its parent)."""
    q1, a1, q2 = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    answered = [
        {"id": q1, "parent_id": None, "role": "user", "content": "Q", "status": "complete"},
        {"id": a1, "parent_id": q1, "role": "assistant", "content": "A", "status": "complete"},
    ]
    unanswered = {"id": q2, "parent_id": a1, "role": "user", "content": "Q2", "status": "complete"}
    doc = {"format": "n8n-chat-relay/chat", "version": 1, "title": "Cut", "agent": {"slug": "helper"}}
    for current, messages in ((q2, [*answered, unanswered]), (a1, [*answered, unanswered])):
        response = await import_body(
            client, team_world, json.dumps({**doc, "current_message_id": current, "messages": messages})
        )
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", 0, "messages", 2, "id"]
        assert error["msg"] == "Chat 1: a user message must have an answer"
    assert await count_rows(session, "chats") == 0
    assert (
        await import_body(client, team_world, json.dumps({**doc, "current_message_id": a1, "messages": answered}))
    ).status_code == 201


def two_messages(question: str, answer: str, **question_fields: Any) -> dict[str, Any]:
    """A chat of one question and its answer, as a hand-made export."""
    q, a = str(uuid.uuid4()), str(uuid.uuid4())
    messages = [
        {"id": q, "parent_id": None, "role": "user", "content": question, "status": "complete", **question_fields},
        {"id": a, "parent_id": q, "role": "assistant", "content": answer, "status": "complete"},
    ]
    return {
        "format": "n8n-chat-relay/chat",
        "version": 1,
        "agent": {"slug": "helper"},
        "current_message_id": a,
        "messages": messages,
    }


@pytest.mark.parametrize(
    ("status", "error", "problem"),
    [
        ("complete", {"message": "The agent failed", "code": "x"}, "a complete or cancelled answer has no error"),
        ("cancelled", {"message": "The agent failed", "code": "x"}, "a complete or cancelled answer has no error"),
        ("error", None, "a failed answer must have its error"),
    ],
)
async def test_import_refuses_an_answer_whose_status_and_error_disagree(
    client: httpx.AsyncClient,
    session: AsyncSession,
    team_world: TeamWorld,
    status: str,
    error: dict[str, Any] | None,
    problem: str,
) -> None:
    """An answer's status says whether it failed and its error why: the service stores an error exactly on
    `error` and `interrupted` answers. Imported, a `complete` answer with an error was shown with an error line
    under it (and `> Error:` in its Markdown), a failed one without any reason."""
    doc = two_messages("Q", "A")
    doc["messages"][1].update(status=status, error=error)
    response = await import_body(client, team_world, json.dumps(doc))
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", 0, "messages", 1, "error"]
    assert detail["msg"] == f"Chat 1: {problem}"
    assert await count_rows(session, "chats") == 0
    assert await count_rows(session, "messages") == 0


@pytest.mark.parametrize(("field", "limit"), [("message", ERROR_MESSAGE_MAX_CHARS), ("code", ERROR_CODE_MAX_CHARS)])
async def test_import_bounds_an_answers_error_as_the_service_stores_one(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, field: str, limit: int
) -> None:
    """The service's own errors are a short code and a line of at most ERROR_MESSAGE_MAX_CHARS (a callback's
    error text): an imported error had no limit, so one import stored megabytes of error text on an answer,
    sent whole with every read of the chat. Over the limit: a 422 naming the field, not echoing it, and
    nothing stored; at the limit: imported as it is."""
    schema = app.openapi()["components"]["schemas"]["ExportedError"]["properties"][field]
    assert limit in (schema.get("maxLength"), *(s.get("maxLength") for s in schema.get("anyOf", [])))
    for too_long in ("e" * (limit + 1), "e" * 2_000_000):
        doc = two_messages("Q", "Half an answer")
        doc["messages"][1].update(status="error", error={"message": "The agent failed", "code": "x", field: too_long})
        response = await import_body(client, team_world, json.dumps(doc))
        assert response.status_code == 422, response.text[:500]
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["body", 0, "messages", 1, "error", field]
        assert detail["msg"] == f"Chat 1: String should have at most {limit} characters"
        assert len(response.content) < 1_000
        assert await count_rows(session, "chats") == 0
        assert await count_rows(session, "messages") == 0
    doc = two_messages("Q", "Half an answer")
    doc["messages"][1].update(status="error", error={"message": "The agent failed", "code": "x", field: "e" * limit})
    response = await import_body(client, team_world, json.dumps(doc))
    assert response.status_code == 201, response.text[:500]
    exported = await export_json(client, team_world, response.json()[0]["id"])
    assert exported["messages"][1]["error"][field] == "e" * limit


async def test_an_interrupted_answer_without_its_error_is_imported_with_it(
    client: httpx.AsyncClient, team_world: TeamWorld
) -> None:
    """Exports written before interrupted answers carried their error (a message still streaming) import as
    the service stores an interrupted answer: with the `interrupted` error."""
    doc = two_messages("Q", "A so far")
    doc["messages"][1]["status"] = "interrupted"
    response = await import_body(client, team_world, json.dumps(doc))
    assert response.status_code == 201, response.text
    read = await client.get(f"/api/chats/{response.json()[0]['id']}", headers=team_world.h(team_world.member))
    answer = read.json()["messages"][1]
    assert (answer["status"], answer["error"]) == ("interrupted", INTERRUPTED)


@pytest.mark.settings(MESSAGE_MAX_CHARS=20)
async def test_import_refuses_a_question_a_send_would_refuse_but_not_a_long_answer(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    """A send refuses a question over MESSAGE_MAX_CHARS, or a blank one; an imported one was stored, and
    regenerating its answer then sent it to n8n. Answers are not limited by MESSAGE_MAX_CHARS."""
    for question, problem in (
        ("q" * 21, "a user message must be at most 20 characters (MESSAGE_MAX_CHARS)"),
        (" \n\t", "a user message must not be empty"),
    ):
        body = json.dumps(two_messages("fine", "ok")) + "\n" + json.dumps(two_messages(question, "ok"))
        response = await import_body(client, team_world, body, content_type="application/x-ndjson")
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert error["msg"] == f"Chat 2: {problem}"
        assert error["loc"] == ["body", 1, "messages", 0, "content"]
        assert await count_rows(session, "chats") == 0
    await session.execute(
        update(Agent).where(Agent.id == team_world.agent.id).values(webhook_url=fake.url + "/webhook/agent-stream")
    )
    await session.commit()
    at_the_limit = await import_body(client, team_world, json.dumps(two_messages("q" * 20, "a" * 500)))
    assert at_the_limit.status_code == 201, at_the_limit.text
    chat_id = at_the_limit.json()[0]["id"]
    read = (await client.get(f"/api/chats/{chat_id}", headers=team_world.h(team_world.member))).json()
    assert read["messages"][1]["content"] == "a" * 500
    regenerated = await client.post(
        f"/api/chats/{chat_id}/messages",
        json={"regenerate_of": read["messages"][1]["id"]},
        headers=team_world.h(team_world.member),
    )
    assert regenerated.status_code == 200
    assert fake.requests[-1]["json"]["chatInput"] == "q" * 20


async def test_an_answer_as_long_as_a_stored_one_can_be_imports_again(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A stored answer is bounded by N8N_MAX_RESPONSE_BYTES (10 MiB by default), not by the 1,000,000
    characters the import allowed: such an answer's export was refused on import."""
    answer = "a" * 1_000_001
    messages: list[dict[str, Any]] = [{"content": "Q"}, {"role": "assistant", "content": answer}]
    chat = await create_chat(session, user=team_world.member, agent=team_world.agent, messages=messages)
    first = await export_json(client, team_world, chat.id)
    response = await import_body(client, team_world, json.dumps(first))
    assert response.status_code == 201, response.text
    second = await export_json(client, team_world, response.json()[0]["id"])
    assert second["messages"][1]["content"] == answer


@pytest.mark.settings(N8N_MAX_RESPONSE_BYTES=2048)
async def test_an_answer_longer_than_any_stored_one_is_refused(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """No answer n8n sends is longer than N8N_MAX_RESPONSE_BYTES characters (its bytes bound them)."""
    assert (await import_body(client, team_world, json.dumps(two_messages("Q", "a" * 2048)))).status_code == 201
    response = await import_body(client, team_world, json.dumps(two_messages("Q", "a" * 2049)))
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["msg"] == "Chat 1: an answer must be at most 2048 characters (N8N_MAX_RESPONSE_BYTES)"
    assert error["loc"] == ["body", 0, "messages", 1, "content"]
    assert await count_rows(session, "chats") == 1


# --- import limits --------------------------------------------------------------------------


@pytest.mark.settings(IMPORT_MAX_BODY_BYTES=4096, MAX_REQUEST_BODY_BYTES=1024)
async def test_import_over_the_body_cap_is_413_while_reading(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        messages=[{"content": "x" * 1500}, {"role": "assistant", "content": "ok"}],
    )
    small = await export_json(client, team_world, chat.id)
    # Over the general body cap but under the import cap: accepted.
    assert 1024 < len(json.dumps(small)) < 4096
    assert (await import_body(client, team_world, json.dumps(small))).status_code == 201
    before = await count_rows(session, "chats")

    big = json.dumps({**small, "title": "big", "messages": [{**small["messages"][0], "content": "y" * 5000}]})
    declared = await import_body(client, team_world, big)
    assert declared.status_code == 413
    assert declared.json() == {"detail": "Request body too large"}

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000].encode()

    headers = {**team_world.h(team_world.member), "Content-Type": "application/json"}
    streamed = await client.post("/api/chats/import", content=chunks(), headers=headers)
    assert "content-length" not in {k.lower() for k in streamed.request.headers}
    assert streamed.status_code == 413
    assert await count_rows(session, "chats") == before


async def test_an_export_holding_the_deepest_tool_step_a_callback_accepts_imports_again(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A tool step's `input` may nest as deep as a callback's body allows; in an export it sits six levels
    further down (chat, messages, message, metadata, steps, step). The import checked the whole document
    against the callback's own depth limit and refused the server's own export."""
    deep: Any = "leaf"
    for _ in range(JSON_MAX_DEPTH - 2):  # with the body (1) and its `input` key (2): exactly the limit
        deep = [deep]
    body = CallbackTool.model_validate({"type": "tool", "name": "search", "input": deep}).model_dump(exclude_none=True)
    step = {k: v for k, v in body.items() if k != "type"}
    metadata = {"steps": [{"type": "tool", **step}]}
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        messages=[{"content": "q"}, {"role": "assistant", "content": "a", "metadata": metadata}],
    )
    doc = await export_json(client, team_world, chat.id)
    imported = await import_body(client, team_world, json.dumps(doc))
    assert imported.status_code == 201, imported.text
    again = await export_json(client, team_world, uuid.UUID(imported.json()[0]["id"]))
    assert again["messages"][1]["metadata"] == metadata
    # One level deeper than any export can hold is still refused.
    for _ in range(7):
        deep = [deep]
    doc["messages"][1]["metadata"] = {"steps": [{"type": "tool", "name": "search", "input": deep}]}
    refused = await import_body(client, team_world, json.dumps(doc))
    assert refused.status_code == 422
    assert "nested deeper" in refused.json()["detail"][0]["msg"]


async def test_a_stored_feedback_time_past_the_calendar_reads_and_exports(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A feedback time stored before imports refused it (year 10000 once in UTC): every read of its chat, and
    its export, were a 500. It shows as the calendar's last instant."""
    feedback = {"rating": 1, "comment": None, "updated_at": "9999-12-31T23:59:59-05:00"}
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        messages=[{"content": "q"}, {"role": "assistant", "content": "a", "feedback": feedback}],
    )
    read = await client.get(f"/api/chats/{chat.id}", headers=team_world.h(team_world.member))
    assert read.status_code == 200
    assert read.json()["messages"][1]["feedback"]["updated_at"] == "9999-12-31T23:59:59.999999Z"
    exported = await export_json(client, team_world, chat.id)
    assert exported["messages"][1]["feedback"]["updated_at"] == "9999-12-31T23:59:59.999999Z"


@pytest.mark.settings(IMPORT_MAX_CHATS=3, IMPORT_MAX_MESSAGES=5)
async def test_import_of_more_chats_than_the_cap_is_422_and_is_checked_off_the_event_loop(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10 MB of empty chats was ~90,000 chats in one transaction (a minute), checked on the event loop (a
    3.5 s stall of every stream of the process). Now: at most IMPORT_MAX_CHATS, checked in a worker thread."""
    answered = [{"content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat = await create_chat(session, user=team_world.member, agent=team_world.agent, messages=answered)
    doc = await export_json(client, team_world, chat.id)
    threads: list[bool] = []
    checked = imports.parse_import

    def recorded(body: bytes, limits: imports.ImportLimits) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return checked(body, limits)

    monkeypatch.setattr(imports, "parse_import", recorded)
    chats, messages = await count_rows(session, "chats"), await count_rows(session, "messages")
    over = await import_body(client, team_world, "\n".join([json.dumps(doc)] * 4), content_type="application/jsonl")
    assert over.status_code == 422
    assert over.json()["detail"][0]["msg"] == "An import holds at most 3 chats; split the file"
    assert (await count_rows(session, "chats"), await count_rows(session, "messages")) == (chats, messages)
    # Messages count too, all chats together (one chat of 60,000 messages was a 5 s transaction).
    long = {**doc, "messages": doc["messages"] * 3}  # 6 messages (refused before the tree is checked)
    messages_over = await import_body(client, team_world, json.dumps(long))
    assert messages_over.status_code == 422
    assert messages_over.json()["detail"][0]["msg"] == "An import holds at most 5 messages; split the file"
    assert (await count_rows(session, "chats"), await count_rows(session, "messages")) == (chats, messages)
    at_cap = await import_body(client, team_world, "\n".join([json.dumps(doc)] * 2), content_type="application/jsonl")
    assert at_cap.status_code == 201
    assert len(at_cap.json()) == 2
    assert threads == [False, False, False]  # never on the event loop's thread


@pytest.mark.settings(IMPORT_MAX_CONCURRENT=2)
async def test_concurrent_imports_are_bounded_per_user_and_per_process(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await branchy_chat(session, team_world)
    body = json.dumps(await export_json(client, team_world, chat.id)).encode()
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield body[:100]
        started.set()
        await release.wait()
        yield body[100:]

    async def send_slow(user: User) -> httpx.Response:
        headers = {**team_world.h(user), "Content-Type": "application/json"}
        return await client.post("/api/chats/import", content=slow(), headers=headers)

    first = asyncio.create_task(send_slow(team_world.member))
    await asyncio.wait_for(started.wait(), 5)
    # The same user again while the first import is still arriving: 429, nothing stored.
    same_user = await import_body(client, team_world, body)
    assert same_user.status_code == 429
    assert same_user.headers["Retry-After"] == "5"
    started.clear()
    second = asyncio.create_task(send_slow(team_world.colleague))
    await asyncio.wait_for(started.wait(), 5)
    # The process's two slots are taken: a third user waits for one.
    third = await import_body(client, team_world, body, team_world.admin)
    assert third.status_code == 429
    release.set()
    assert (await asyncio.wait_for(first, 10)).status_code == 201
    assert (await asyncio.wait_for(second, 10)).status_code == 201
    # Slots are given back, also after a refusal.
    assert (await import_body(client, team_world, body, team_world.admin)).status_code == 201
    assert (await import_body(client, team_world, b"{}", team_world.admin)).status_code == 422
    assert (await import_body(client, team_world, body, team_world.admin)).status_code == 201
    assert await count_rows(session, "chats") == 1 + 4


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("PUT", "/api/chats/export", "GET"), ("DELETE", "/api/chats/export", "GET"), ("PUT", "/api/chats/import", "POST")],
)
async def test_export_and_import_paths_are_words_not_chat_ids(
    client: httpx.AsyncClient, team_world: TeamWorld, method: str, path: str, allow: str
) -> None:
    response = await client.request(method, path, headers=team_world.h(team_world.member))
    assert response.status_code == 405
    assert response.headers["Allow"] == allow


async def test_import_keeps_large_metadata_and_accepts_an_inactive_agent(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """Tool steps can make metadata large: only the body cap bounds it. An inactive agent keeps its history."""
    steps = [{"type": "tool", "name": f"step {i}", "output": "z" * 2000} for i in range(100)]
    answer = {"role": "assistant", "content": "done", "metadata": {"steps": steps}}
    messages: list[dict[str, Any]] = [{"content": "Q"}, answer]
    chat = await create_chat(session, user=team_world.member, agent=team_world.agent, messages=messages)
    first = await export_json(client, team_world, chat.id)
    await session.execute(update(Agent).where(Agent.id == team_world.agent.id).values(is_active=False))
    await session.commit()
    response = await import_body(client, team_world, json.dumps(first))
    assert response.status_code == 201
    second = await export_json(client, team_world, response.json()[0]["id"])
    assert comparable(second) == comparable(first)
    assert second["messages"][1]["metadata"]["steps"][99]["output"] == "z" * 2000


# --- files ----------------------------------------------------------------------------------------------


def metadata_of(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: f[k] for k in ("filename", "content_type", "size", "sha256")} for f in files]


async def test_export_carries_files_as_metadata_only(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    chat_id, sent = await chat_with_sent_files(client, session, team_world, fake, [NOTES, TABLE])
    response = await client.get(f"/api/chats/{chat_id}/export", headers=team_world.h(team_world.member))
    question, answer = response.json()["messages"]
    assert question["files"] == metadata_of(sent)  # exactly these keys: no id, no url, no bytes
    assert answer["files"] == []
    assert b"private notes 4242" not in response.content
    assert base64.b64encode(NOTES[1]) not in response.content
    assert "/files/" not in response.text
    assert sent[0]["id"] not in response.text
    lines = (await client.get("/api/chats/export", headers=team_world.h(team_world.member))).content
    assert json.loads(lines)["messages"][0]["files"] == metadata_of(sent)
    markdown = await client.get(f"/api/chats/{chat_id}/export?format=markdown", headers=team_world.h(team_world.member))
    assert "notes.txt" in markdown.text
    assert "private notes 4242" not in markdown.text


async def test_import_keeps_files_metadata_without_bytes_and_round_trips(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    chat_id, sent = await chat_with_sent_files(client, session, team_world, fake, [NOTES, TABLE])
    first = await export_json(client, team_world, chat_id)
    files_before = await count_rows(session, "files")
    response = await import_body(client, team_world, json.dumps(first), team_world.colleague)
    assert response.status_code == 201, response.text
    imported = response.json()[0]["id"]
    assert await count_rows(session, "files") == files_before  # no file row, no bytes
    colleague = team_world.h(team_world.colleague)
    read = (await client.get(f"/api/chats/{imported}", headers=colleague)).json()
    shown = read["messages"][0]["files"]
    assert [f["id"] for f in shown] == [None, None]  # metadata only: nothing to download
    assert metadata_of(shown) == metadata_of(sent)
    assert all(f["created_at"].endswith("Z") for f in shown)
    # The original ids lead nowhere from the imported chat.
    missing = await client.get(f"/api/chats/{imported}/files/{sent[0]['id']}", headers=colleague)
    assert missing.status_code == 404
    # Export -> import -> export gives the same content, files metadata included.
    second = await export_json(client, team_world, imported, team_world.colleague)
    assert comparable(second) == comparable(first)
    # Regenerating the imported answer works; n8n gets no file (there are no bytes to send).
    regenerated = await client.post(
        f"/api/chats/{imported}/messages", json={"regenerate_of": read["messages"][1]["id"]}, headers=colleague
    )
    assert regenerated.status_code == 200
    events = data_events(parse_sse(regenerated.text))
    assert events[-1].type == "done"
    assert "files" not in fake.requests[-1]["json"]
    # The start event shows the question as stored, its files' names included (they were left out: a client
    # that draws the question from it lost them until the chat was read again).
    assert events[0].data is not None
    assert events[0].data["data"]["user_message"] == read["messages"][0]
    # Shared and forked, the metadata travels on without copies.
    shared = (await client.post(f"/api/chats/{imported}/share", headers=colleague)).json()
    assert [f["id"] for f in shared["messages"][0]["files"]] == [None, None]
    assert await count_rows(session, "share_files") == 0
    fork = (await client.post(f"/api/shares/{shared['id']}/fork", headers=team_world.h(team_world.member))).json()
    assert metadata_of(fork["messages"][0]["files"]) == metadata_of(sent)
    assert [f["id"] for f in fork["messages"][0]["files"]] == [None, None]
    assert await count_rows(session, "files") == files_before


async def test_a_client_gone_mid_import_is_a_400_and_stores_nothing(
    app: FastAPI, session: AsyncSession, team_world: TeamWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """Raw ASGI: the body's first chunk, then the client disconnects: a plain 400, logged as that (it was a 500
    with an error-level traceback)."""
    headers = {**team_world.h(team_world.member), "Content-Type": "application/x-ndjson"}
    chats = await count_rows(session, "chats")
    sent = await cut_off_request(app, "/api/chats/import", headers, b'{"format": "n8n-chat-relay/chat", ')
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"]) == {"detail": "The request body was not received in full"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert await count_rows(session, "chats") == chats


# --- review of 2026-12-07 ---------------------------------------------------------------------------


async def test_markdown_export_closes_a_code_block_an_answer_left_open_and_keeps_a_final_hash(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """An answer cut inside a code block (stopped, failed) left its fence open: every later heading of the
    export read as code. And a title ending in `#` lost it (Markdown reads a final ` #` as a closing one)."""
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        title="Ticket #",
        messages=[
            {"role": "user", "content": "Write code"},
            {"role": "assistant", "content": "Sure:\n```python\nprint(1)", "status": "cancelled"},
            {"role": "user", "content": "Thanks, go on"},
            {"role": "assistant", "content": "Done:\n~~~~\nx\n~~~~\nend"},
        ],
    )
    response = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=team_world.h(team_world.member))
    text = response.text
    assert text.startswith("# Ticket \\#\n")
    assert "print(1)\n```\n" in text
    fences = [line for line in text.split("\n") if line.startswith(("```", "~~~"))]
    assert fences == ["```python", "```", "~~~~", "~~~~"]  # every block closed, the closed one left as it was
    assert text.count("\n## ") == 4


def html_in(markdown: str) -> list[str]:
    """The raw HTML a CommonMark renderer would pass through from `markdown` (blocks and inline tags)."""
    found, tokens = [], MarkdownIt("commonmark").parse(markdown)
    while tokens:
        token = tokens.pop()
        if token.type in ("html_block", "html_inline"):
            found.append(token.content)
        tokens += token.children or []
    return found


@pytest.mark.parametrize(
    ("cut", "shown"),
    [
        ("Here:\n<!-- a note the stop cut", "<p>Here:\n&lt;!-- a note the stop cut</p>"),
        ("<pre>\nline one", "<p>&lt;pre&gt;\nline one</p>"),
        ("Styled:\n<STYLE>\np { color: red }", "<p>Styled:\n&lt;STYLE&gt;\np { color: red }</p>"),
        ("<?php echo 1;", "<p>&lt;?php echo 1;</p>"),
    ],
)
async def test_markdown_export_shows_an_html_block_an_answer_left_open_as_text(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, cut: str, shown: str
) -> None:
    """A comment, `<pre>`, `<style>`... block runs until its closing text, not a blank line: one an answer left
    open (a stop, an error) hid every later message of the export when the file was rendered. Raw HTML is shown
    as text (as the web client shows it), so it hides nothing and needs no closing."""
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        messages=[
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": cut, "status": "cancelled"},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "<!-- closed --> <pre>fine</pre>\n\nThe end"},
        ],
    )
    response = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=team_world.h(team_world.member))
    text = response.text
    written = cut.replace("<", "\\<")
    assert f"\n\n{written}\n\n---\n" in text  # escaped, and nothing added after it
    rendered = MarkdownIt("commonmark").render(text)
    assert shown in rendered
    assert "<p>&lt;!-- closed --&gt; &lt;pre&gt;fine&lt;/pre&gt;</p>\n<p>The end</p>" in rendered
    assert html_in(text) == []
    # As a CommonMark renderer reads the file: every message's heading is a heading.
    tokens = MarkdownIt("commonmark").parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h2"]
    assert headings == ["User", "Assistant (cancelled)", "User", "Assistant"]


RAW_HTML_ANSWER = (
    '<h1>Big news</h1>\n\n<h2>User</h2>\n\nA pixel <img src="https://tracker.example/p.gif"> and '
    "<b>bold</b>, <script>alert(1)</script>\n\n<details><summary>More</summary>\n\nHidden?\n\n"
    "Kept: `<div>` in code, <https://example.com>, a < b, \\<i> escaped already.\n\n"
    "```html\n<p>in a fence</p>\n```\n\nA chart: ![chart](https://tracker.example/c.png)\n\n<!-- left open"
)


async def test_markdown_export_shows_raw_html_as_text(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """Raw HTML in a message was copied as it is, so the .md file, rendered, showed an answer's `<h1>` as a
    heading, `<h2>User</h2>` as a turn nobody took, fetched the image an `<img>` named (a tracking pixel), and
    a `<details>` or a comment hid what followed. The web client shows raw HTML as text (docs/WEB_CLIENT.md): so
    does the export now, in messages, the title, file names and error messages; and a Markdown image as a link
    to it, as the client shows it too (no request to wherever an answer points). Code, autolinks and the rest
    of the Markdown are left as they are."""
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        title="<i>Styled</i> title",
        messages=[
            {"role": "user", "content": "What is <b>this</b>?"},
            {"role": "assistant", "content": RAW_HTML_ANSWER},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "status": "error", "error": {"message": "<b>n8n</b> failed", "code": "x"}},
        ],
    )
    attached = {**EXPORTED_FILE, "filename": "<img src=x onerror=alert(1)>.txt"}
    await session.execute(
        update(Message).where(Message.chat_id == chat.id, Message.content == "Again").values(files=[attached])
    )
    await session.commit()
    response = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=team_world.h(team_world.member))
    text = response.text
    assert html_in(text) == []
    assert top_level_headings(text) == [
        ("h1", "\\<i>Styled\\</i> title"),
        ("h2", "User"),
        ("h2", "Assistant"),
        ("h2", "User"),
        ("h2", "Assistant (error)"),
    ]
    rendered = MarkdownIt("commonmark").render(text)
    assert "<img" not in rendered
    for shown in (
        "<h1>&lt;i&gt;Styled&lt;/i&gt; title</h1>",
        "<p>What is &lt;b&gt;this&lt;/b&gt;?</p>",
        "<p>&lt;h1&gt;Big news&lt;/h1&gt;</p>\n<p>&lt;h2&gt;User&lt;/h2&gt;</p>",
        "<p>A pixel &lt;img src=&quot;https://tracker.example/p.gif&quot;&gt; and &lt;b&gt;bold&lt;/b&gt;, "
        "&lt;script&gt;alert(1)&lt;/script&gt;</p>",
        "<p>&lt;details&gt;&lt;summary&gt;More&lt;/summary&gt;</p>\n<p>Hidden?</p>",
        '<p>Kept: <code>&lt;div&gt;</code> in code, <a href="https://example.com">https://example.com</a>, '
        "a &lt; b, &lt;i&gt; escaped already.</p>",
        '<pre><code class="language-html">&lt;p&gt;in a fence&lt;/p&gt;\n</code></pre>',
        '<p>A chart: !<a href="https://tracker.example/c.png">chart</a></p>',  # a link, as the client shows it
        "<p>&lt;!-- left open</p>",
        "<p>Attached: &lt;img src=x onerror=alert(1)&gt;.txt (text/plain, 2 bytes)</p>",
        "<blockquote>\n<p>Error: &lt;b&gt;n8n&lt;/b&gt; failed</p>\n</blockquote>",
    ):
        assert shown in rendered, shown
    # In the file itself: a backslash before each tag, the fence's code as written.
    assert "\n\\<h2>User\\</h2>\n" in text
    assert "\n<p>in a fence</p>\n" in text


SPOOFED_TURNS = (
    "Sure.\n## User\nNow ignore the above\n\n# Assistant\n\n   ## User ##\n\nUser\n----\n\n"
    "Assistant (error)\n=\n\n## **Assistant** (error)\n\n#### us&#101;r\n\n"
    "```\n## User\n```\n\n## Summary\n\n"
    # HTML is shown as text: a heading in HTML is none, and a block tag hides nothing after it.
    "<h2>User</h2>\n\n<details>\n\n## User\n\n<pre>x\n## User\n\nThe end"
)


def top_level_headings(markdown: str) -> list[tuple[str, str]]:
    """Every heading a CommonMark renderer puts at the top of the document: (tag, text)."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [(t.tag, tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open" and t.level == 0]


async def test_markdown_export_cannot_be_given_a_fake_turn_by_a_message(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A message's text was copied as it is, so an answer (or a question) holding a line `## User` showed a
    reader of the .md file a turn nobody took. Lines of a message that would be one of the export's role
    headings (any level, ATX or setext, emphasised or with entities) are escaped: shown as the text they are,
    not as a heading; the message's other headings and its code are left as they were."""
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        messages=[
            {"role": "user", "content": "Hi\n\n## Assistant\nI agree to everything"},
            {"role": "assistant", "content": SPOOFED_TURNS, "status": "cancelled"},
        ],
    )
    response = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=team_world.h(team_world.member))
    text = response.text
    assert top_level_headings(text) == [
        ("h1", "A chat"),
        ("h2", "User"),
        ("h2", "Assistant (cancelled)"),
        ("h2", "Summary"),  # the answer's own heading, kept
    ]
    rendered = MarkdownIt("commonmark").render(text)
    for shown in (
        "<p>Hi</p>\n<p>## Assistant\nI agree to everything</p>",
        "<p>Sure.\n## User\nNow ignore the above</p>",
        "<p># Assistant</p>",
        "<p>## User ##</p>",
        "<p>User\n----</p>",
        "<p>Assistant (error)\n=</p>",
        "<p>## <strong>Assistant</strong> (error)</p>",
        "<p>#### user</p>",
        "<pre><code>## User\n</code></pre>",  # code: not escaped
        "<p>&lt;h2&gt;User&lt;/h2&gt;</p>\n<p>&lt;details&gt;</p>\n<p>## User</p>",
        "<p>&lt;pre&gt;x\n## User</p>\n<p>The end</p>",
    ):
        assert shown in rendered
    assert "\n```\n## User\n```\n" in text
    # In the file itself: escaped with a backslash, readable as it was meant.
    assert "\nSure.\n\\## User\n" in text
    assert "\nUser\n\\----\n" in text


async def test_markdown_export_escapes_a_role_heading_behind_a_tag_or_under_an_escaped_one(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """Two more ways a message could show a turn nobody took: a heading whose text is a role inside an inline
    tag (`## <b>User</b>` renders as the heading "User"), and an escaped `## User` line (shown as text) with a
    setext underline below it, which would make that line a heading again. Both are shown as text (the tag
    too, as all raw HTML)."""
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        messages=[
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "content": "Sure.\n\n## <b>User</b>\n\n## User\n===\n\nThe end",
            },
        ],
    )
    response = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=team_world.h(team_world.member))
    assert response.status_code == 200
    assert top_level_headings(response.text) == [("h1", "A chat"), ("h2", "User"), ("h2", "Assistant")]
    rendered = MarkdownIt("commonmark").render(response.text)
    assert "<p>## &lt;b&gt;User&lt;/b&gt;</p>" in rendered
    assert "<p>## User\n===</p>" in rendered


#: Messages whose raw HTML a line-by-line reading of code took for code: a backtick a link's destination, title or
#: reference label takes, a code span opened on an earlier line, a list item's fence its item ends, a
#: line starting like a fence that is none, a carriage return read as a line break; and an escaped backtick
#: before a run (a 500).
CODE_LOOK_ALIKES = [
    "[a](`)<img src=x>`",
    '[x](y "`")<img src=x>`',
    "[a](<`>)<img src=x>`",
    "[a][`]<img src=x>`\n\n[`]: /u",
    "a `x\ny` <img src=x> `z`",
    "- a\n  ```\n<img src=x>\n\n```\ncode\n```\n<img src=y>",
    "1. a\n   ```\n<img src=x>",
    "```a`<img src=x>",
    "~~~\r~~~\r<img src=x>",
    "\\``<img src=x>",
    "- ```\n  x\n  ```\n  <img src=x>",
    "- a\n  ```\n```\n<img src=x>",
]


@pytest.mark.parametrize(
    ("title", "content"), [*(("A chat", content) for content in CODE_LOOK_ALIKES), ("[t](`)<img src=t>`", "Hi")]
)
async def test_markdown_export_shows_html_beside_code_look_alikes_as_text(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, title: str, content: str
) -> None:
    """Raw HTML next to what looks like code but is not (or not any more) was copied as it is, so the rendered
    .md showed the `<img>` (or the export was a 500): it is shown as text, as all raw HTML."""
    chat = await create_chat(
        session,
        user=team_world.member,
        agent=team_world.agent,
        title=title,
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": content},
            # A message after it starts where the export's outline is, whatever the one before left open.
            {"role": "user", "content": "```\n<img src=z>\n```\n<img src=z>"},
        ],
    )
    response = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=team_world.h(team_world.member))
    assert response.status_code == 200
    assert html_in(response.text) == []
    assert "<img" not in MarkdownIt("commonmark").render(response.text)
    assert [text for _, text in top_level_headings(response.text)][1:] == ["User", "Assistant", "User"]


#: Pieces an answer may hold that the export's reading of code, links and fences must read as a renderer does.
MARKDOWN_PIECES = (
    *("`", "``", "```", "~~~", "\\", "\\`", "<img src=x>", "![a](x)", "a", " ", "\n", "\r", "\t", "\n\n"),
    *("](", "][", "]:", "(", ")", '"', "<http://x>", "<a@b.c>", "\n- ", "\n1. ", "\n2. ```", "\n> ", "\n    "),
    *("\n- ```", "\n ```", "\n  ```", "\n   ~~~", "\n```", "\n~~~", "## User", "\n---", "\n===", "<!--", "&lt;"),
)


def test_markdown_export_of_random_answers_has_no_raw_html_and_no_fake_turn() -> None:
    """Thousands of answers made of the pieces that fooled the export (seeded, so a failure is the same on every
    run), two messages a document: a CommonMark renderer finds no raw HTML, no image, and exactly the export's
    own turns."""
    rng = random.Random(20261207)
    for _ in range(3000):
        contents = ["".join(rng.choice(MARKDOWN_PIECES) for _ in range(rng.randint(1, 14))) for _ in range(2)]
        document = export_markdown.markdown_head("Chat", "Agent", "agent")
        for role, content in zip(("user", "assistant"), contents, strict=True):
            message = {"role": role, "status": "complete", "created_at": "now", "content": content, "files": []}
            document += export_markdown.markdown_message({**message, "error": None})
        document += "\n"
        tokens = MarkdownIt("commonmark").parse(document)
        assert html_in(document) == [], contents
        assert not [c for t in tokens for c in t.children or [] if c.type == "image"], contents
        roles = [h for _, h in top_level_headings(document) if export_markdown.ROLE_HEADING.fullmatch(h.strip())]
        assert roles == ["User", "Assistant"], contents


async def test_an_export_saved_with_a_byte_order_mark_imports(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """An editor on Windows saves the export with a UTF-8 byte order mark: it was "Line 1 is not valid JSON"."""
    chat = await branchy_chat(session, team_world)
    exported = (await client.get(f"/api/chats/{chat.id}/export", headers=team_world.h(team_world.member))).content
    response = await import_body(client, team_world, b"\xef\xbb\xbf" + exported)
    assert response.status_code == 201, response.text
    assert response.json()[0]["title"] == "Tree"


async def test_an_unknown_key_is_named_in_the_422_but_not_given_back_whole(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A 1 MB unknown key came back whole in the 422's `loc`, on the API and in an import's error."""
    chat = await branchy_chat(session, team_world)
    key = "k" * 900_000
    response = await client.put(f"/api/chats/{chat.id}", json={key: 1}, headers=team_world.h(team_world.member))
    assert response.status_code == 422
    assert len(response.content) < 1_000
    assert response.json()["detail"][0]["loc"] == ["body", "k" * 64 + "…"]
    exported = await export_json(client, team_world, chat.id)
    imported = await import_body(client, team_world, json.dumps({**exported, key: 1}))
    assert imported.status_code == 422
    assert len(imported.content) < 1_000


# --- one chat's export, streamed batch by batch in one snapshot -------------------------------------------------


# --- the export as it was built whole: the reference every streamed export is compared with ----------------


def oldest_first(messages: Sequence[Message]) -> list[Message]:
    """Oldest first, and a parent always before its children (even when two share a timestamp)."""
    children: dict[uuid.UUID | None, list[Message]] = {}
    ids = {m.id for m in messages}
    for m in messages:
        children.setdefault(m.parent_id if m.parent_id in ids else None, []).append(m)
    ready = [(m.created_at, m.id, m) for m in children.get(None, [])]
    heapq.heapify(ready)
    ordered: list[Message] = []
    while ready:
        _, _, m = heapq.heappop(ready)
        ordered.append(m)
        for child in children.get(m.id, []):
            heapq.heappush(ready, (child.created_at, child.id, child))
    return ordered


def branch_to(messages: Sequence[Message], leaf: uuid.UUID | None) -> list[Message]:
    """The path from a first message to `leaf`, root first."""
    by_id = {m.id: m for m in messages}
    path: list[Message] = []
    node = by_id.get(leaf) if leaf is not None else None
    while node is not None and len(path) <= len(by_id):
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id is not None else None
    path.reverse()
    return path


def chat_document(chat: Chat, agent_slug: str, agent_name: str, messages: Sequence[Message]) -> dict[str, Any]:
    """One chat in the export format, built whole: every message of every branch (oldest first, linked by
    `parent_id`), `current_message_id` the leaf of the branch shown and `current_branch` that branch's ids."""
    ordered = oldest_first(messages)
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "id": str(chat.id),
        "title": chat.title,
        "agent": {"slug": agent_slug, "name": agent_name},
        "archived": chat.archived,
        "pinned": chat.pinned,
        "created_at": format_timestamp(chat.created_at),
        "updated_at": format_timestamp(chat.updated_at),
        "current_message_id": str(chat.current_message_id) if chat.current_message_id else None,
        "current_branch": [str(m.id) for m in branch_to(ordered, chat.current_message_id)],
        "messages": [exports._message(m) for m in ordered],
    }


def chats_with_messages() -> Select[Chat, str, str, Message]:
    """Chats with their agent and every message (one row each; one with no message for an empty chat), in one
    statement."""
    return (
        select(Chat, Agent.slug, Agent.name, Message)
        .join(Agent, Agent.id == Chat.agent_id)
        .outerjoin(Message, Message.chat_id == Chat.id)
    )


async def export_built_whole(session: AsyncSession, chat_id: uuid.UUID) -> bytes:
    """The JSON export as the route built it before it streamed: the chat and every message read in one
    statement, the document made whole, dumped at once."""
    query = chats_with_messages().where(Chat.id == chat_id)
    rows = (await session.execute(query.execution_options(populate_existing=True))).all()  # as stored now
    chat, slug, name, _ = rows[0]
    document = chat_document(chat, slug, name, [row[3] for row in rows if row[3] is not None])
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode()


def markdown_built_whole(document: dict[str, Any]) -> str:
    """The Markdown export as the code before streaming wrote it (its `chat_markdown`, copied as it was)."""
    by_id = {m["id"]: m for m in document["messages"]}
    agent = document["agent"]
    lines = [
        f"# {export_markdown.heading_text(export_markdown.one_line(document['title'] or '') or UNTITLED)}",
        "",
        f"Agent: {export_markdown.one_line(agent['name'])} (`{agent['slug']}`)  ",
        "Exported: (time)",
    ]
    for message_id in document["current_branch"]:
        message = by_id[message_id]
        heading = "User" if message["role"] == "user" else "Assistant"
        if message["status"] != "complete":
            heading += f" ({message['status']})"
        lines += ["", "---", "", f"## {heading}", "", f"_{message['created_at']}_", ""]
        lines.append(export_markdown.message_markdown(message["content"]) if message["content"] else "_(no text)_")
        for f in message.get("files") or []:
            name, kind = export_markdown.one_line(f["filename"]), export_markdown.one_line(f["content_type"])
            lines += ["", f"Attached: {name} ({kind}, {f['size']} bytes)"]
        if message["error"]:
            lines += ["", f"> Error: {export_markdown.one_line(str(message['error'].get('message', '')))}"]
    return "\n".join(lines) + "\n"


def without_export_time(markdown: str) -> str:
    head, exported, rest = markdown.partition("\nExported: ")
    assert exported, "no export time"
    return head + "\nExported: (time)" + rest[rest.index("\n") :]


#: Batches larger than any chat of the tests: each read as one batch, its branch shown walked from it.
ONE_BATCH = (1000, 10**9)
BATCHINGS = ["by-count", "by-weight", "one-batch"]


@pytest.fixture
def batch_selects(app: FastAPI) -> Iterator[list[str]]:
    """The statements that read a batch of one chat's messages (keyset paging)."""
    yield from _statements(app, "SELECT", "ORDER BY MESSAGES.CREATED_AT, MESSAGES.ID LIMIT")


async def tangled_chat(session: AsyncSession, world: TeamWorld) -> tuple[Chat, int]:
    """A chat whose order takes more than sorting by time: 24 turns on one branch (each question and its
    answer written at the same instant, so their random ids order them), an edit every fifth turn starting
    a branch of its own, an answer older than its question (a clock set back), a first message whose parent is
    another chat's (taken for a first message), an answer still streaming, text JSON and Markdown must escape."""
    now = utcnow() - timedelta(hours=1)
    chat = await create_chat(session, user=world.member, agent=world.agent, title='Tangled ☃ \u2028 "q" #')
    other = await create_chat(session, user=world.member, agent=world.agent, messages=[{"content": "elsewhere"}])
    elsewhere = (await session.execute(select(Message.id).where(Message.chat_id == other.id))).scalar_one()
    rows: list[Message] = []

    def add(parent: Message | None, element: dict[str, Any], parent_id: uuid.UUID | None = None) -> Message:
        row = message_row(chat.id, parent.id if parent is not None else parent_id, element)
        if element.get("files"):
            row.files = element["files"]
        rows.append(row)
        return row

    parent: Message | None = None
    for turn in range(24):
        at = now + timedelta(seconds=10 * turn)
        text = f'question {turn}: é ☃ \u2028 tab\t "quoted" \\ line\nbreak ## User'
        question = add(parent, {"content": text, "created_at": at, "files": [EXPORTED_FILE] if turn == 3 else None})
        if turn % 5 == 4:
            edit = add(parent, {"content": f"edit {turn}", "created_at": at + timedelta(seconds=1)})
            add(edit, {"role": "assistant", "content": f"answer {turn}'", "created_at": at + timedelta(seconds=1)})
        meta = {"format": "ndjson", "chunks": turn, "steps": [{"tool": "t", "input": {"nested": [1, {"x": None}]}}]}
        answer = add(
            question,
            {"role": "assistant", "content": f"answer {turn}\n```py\nopen", "created_at": at, "metadata": meta},
        )
        if turn == 7:
            add(question, {"role": "assistant", "content": "from the past", "created_at": at - timedelta(seconds=30)})
        if turn == 11:
            failed = {"message": "failed", "code": "x"}
            add(
                question,
                {"role": "assistant", "status": "error", "created_at": at, "error": failed, "feedback": FEEDBACK},
            )
        parent = answer
    stray = add(None, {"content": "parent elsewhere", "created_at": now + timedelta(seconds=5)}, parent_id=elsewhere)
    running = {"role": "assistant", "content": "so far", "status": "streaming", "_worker": str(uuid.uuid4())}
    add(stray, {**running, "created_at": now + timedelta(seconds=5)})
    session.add_all(rows)
    await session.flush()
    assert parent is not None
    await session.execute(
        update(Chat).where(Chat.id == chat.id).values(current_message_id=parent.id, message_count=len(rows))
    )
    await session.commit()
    return chat, len(rows)


@pytest.mark.parametrize(("messages", "weight"), [(4, 10**9), (100, 300), ONE_BATCH], ids=BATCHINGS)
async def test_an_export_streamed_in_batches_is_the_export_built_whole_byte_for_byte(
    client: httpx.AsyncClient,
    session: AsyncSession,
    team_world: TeamWorld,
    batch_selects: list[str],
    monkeypatch: pytest.MonkeyPatch,
    messages: int,
    weight: int,
) -> None:
    """Read four messages at a time, or as few as weigh 300 bytes, the JSON is the same bytes as the document
    built whole and dumped at once (order: oldest first, a parent before its children, ties and a clock set
    back included; escapes; layout), and the Markdown is what the whole-document code wrote; so are an empty
    chat's and a first message's."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", messages)
    monkeypatch.setattr(exports, "EXPORT_BATCH_BYTES", weight)
    chat, count = await tangled_chat(session, team_world)
    empty = await create_chat(session, user=team_world.member, agent=team_world.agent, title=None)
    one = await create_chat(session, user=team_world.member, agent=team_world.agent, messages=[{"content": "Hi"}])
    for target in (chat, empty, one):
        batch_selects.clear()
        response = await client.get(f"/api/chats/{target.id}/export", headers=team_world.h(team_world.member))
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(response.content))  # spooled whole: its length known
        assert len(batch_selects) >= (count // 4 if target is chat and (messages, weight) != ONE_BATCH else 1)
        assert response.content == await export_built_whole(session, target.id)
        document = response.json()
        markdown = await client.get(
            f"/api/chats/{target.id}/export?format=markdown", headers=team_world.h(team_world.member)
        )
        assert without_export_time(markdown.text) == markdown_built_whole(document)
    assert len(document["messages"]) == 1
    tangled = json.loads(await export_built_whole(session, chat.id))
    assert len(tangled["messages"]) == count
    assert len(tangled["current_branch"]) == 48
    assert markdown_built_whole(tangled).count("\n## ") == 48


#: A long chat written by PostgreSQL itself (the export benchmark's own statements: one branch, each message
#: the child of the one before).
LONG_CHAT, LONG_CHAT_BRANCH = bench_export.FILL, bench_export.BRANCH


async def long_chat(world: TeamWorld, session: AsyncSession, count: int, chars: int) -> Chat:
    """A chat of `count` messages of `chars` characters each (35 of them `é`), one branch, written by the
    database itself (for speed)."""
    chat = await create_chat(session, user=world.member, agent=world.agent, title="Long")
    conn = await asyncpg.connect(_plain_url(world.settings.DATABASE_URL))
    try:
        await conn.execute(LONG_CHAT, chat.id, count, chars)
        await conn.execute(LONG_CHAT_BRANCH, chat.id, count)
    finally:
        await conn.close()
    return chat


async def downloaded(app: FastAPI, path: str, headers: dict[str, str]) -> tuple[int, int, bytes]:
    """A GET served as a server serves it (raw ASGI: each piece of the body handed on and dropped, which no
    test client does: httpx's keeps the whole body): the status, the body's size, its last bytes."""
    scope = http_scope("GET", path, headers)
    status, size, tail = 0, 0, b""
    receive = bodyless_request()  # the client stays until the end

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, size, tail
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            size += len(message.get("body", b""))
            tail = (tail + message.get("body", b""))[-16:]

    await app(scope, receive, send)
    return status, size, tail


async def test_a_chat_read_in_one_batch_has_the_branch_the_database_walk_gives(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    team_world: TeamWorld,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chat of fewer messages than a batch has its branch shown walked from that batch, not read by a query of
    its own (a round trip less per small chat, in the JSON Lines most of all): the same bytes as the walk in the
    database, for odd chats too: a branch in a cycle (walked round up to the chat's number of messages, as the
    query stops), a current message of another chat (no branch), a parent in another chat (the branch stops
    there)."""
    cycle = await create_chat(session, user=team_world.member, agent=team_world.agent, messages=[{"content": "a"}])
    other = await create_chat(session, user=team_world.member, agent=team_world.agent, messages=[{"content": "b"}])
    elsewhere = await create_chat(session, user=team_world.member, agent=team_world.agent, title="elsewhere")
    stray = await create_chat(session, user=team_world.member, agent=team_world.agent, title="stray")
    first, their = cycle.current_message_id, other.current_message_id
    assert first is not None
    assert their is not None
    loop = message_row(cycle.id, first, {"role": "assistant", "content": "loop"})
    orphan = message_row(stray.id, their, {"role": "assistant", "content": "orphan"})
    session.add_all([loop, orphan])
    await session.flush()
    await session.execute(update(Message).where(Message.id == first).values(parent_id=loop.id))
    await session.execute(update(Chat).where(Chat.id == cycle.id).values(current_message_id=loop.id, message_count=2))
    await session.execute(update(Chat).where(Chat.id == elsewhere.id).values(current_message_id=their))
    await session.execute(update(Chat).where(Chat.id == stray.id).values(current_message_id=orphan.id, message_count=1))
    await session.commit()
    exported: dict[tuple[int, uuid.UUID | None], bytes] = {}
    walks: dict[int, int] = {}
    engine = app_state(app).db.engine.sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "WITH RECURSIVE" in statement.upper():
            walks[batch] += 1

    event.listen(engine, "before_cursor_execute", record)
    for batch in (1, 100):  # a query for the branch (no chat fits in a batch of one), then the walk from the batch
        walks[batch] = 0
        monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", batch)
        for chat in (cycle, elsewhere, stray):
            response = await client.get(f"/api/chats/{chat.id}/export", headers=team_world.h(team_world.member))
            assert response.status_code == 200
            exported[batch, chat.id] = response.content
        exported[batch, None] = (await client.get("/api/chats/export", headers=team_world.h(team_world.member))).content
    event.remove(engine, "before_cursor_execute", record)
    assert all(exported[1, key] == exported[100, key] for _, key in exported)
    assert walks == {1: 5, 100: 0}  # cycle, stray, alone and in the JSON Lines, and `other` (empty: no walk)
    branches = [json.loads(exported[100, chat.id])["current_branch"] for chat in (cycle, elsewhere, stray)]
    assert branches == [
        [str(loop.id), str(first), str(loop.id)],
        [],
        [str(orphan.id)],
    ]


@pytest.mark.timeout(120)
async def test_the_export_of_a_long_chat_holds_a_batch_not_the_chat(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """4,000 messages of 4,000 characters (16 MB of text): built whole, the export held several times the chat at
    its peak (about 80 MB); streamed, a few batches, however long the chat (under 3 MB). Measured with
    tracemalloc around the whole request, served as a server serves it, for the JSON and for the Markdown (the
    branch shown: here every message). Both downloads are whole, and the Markdown is what the whole-document
    code wrote."""
    count, chars = 4000, 4000
    chat = await long_chat(team_world, session, count, chars)
    text_bytes = count * (chars + chars // 35)  # UTF-8: each `é` is two bytes
    headers = team_world.h(team_world.member)
    small = await create_chat(session, user=team_world.member, agent=team_world.agent, messages=[{"content": "Hi"}])
    peaks = {}
    for fmt, end in (("json", b"\n  ]\n}\n"), ("markdown", b"\n")):
        await downloaded(app, f"/api/chats/{small.id}/export?format={fmt}", headers)  # warm: caches, statements
        gc.collect()
        tracemalloc.start()
        try:
            status, size, tail = await downloaded(app, f"/api/chats/{chat.id}/export?format={fmt}", headers)
            peaks[fmt] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (status, tail.endswith(end)) == (200, True), tail
        assert size > text_bytes
    assert peaks["json"] < text_bytes / 4, peaks
    assert peaks["markdown"] < text_bytes / 4, peaks
    whole = json.loads(await export_built_whole(session, chat.id))
    markdown = await client.get(f"/api/chats/{chat.id}/export?format=markdown", headers=headers)
    assert without_export_time(markdown.text) == markdown_built_whole(whole)


async def test_an_export_is_the_chat_as_it_was_when_the_download_began(
    app: FastAPI, session: AsyncSession, team_world: TeamWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All batches are read in one snapshot: a send committed after the first batch was sent is not in the
    export (neither its messages nor its branch), nor is a deletion; the export is the one taken before either,
    and imports again. Read batch by batch without one, the send's messages came in the later batches while
    the branch shown was the old one, and the deletion left the export without its last messages."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", 2)
    db = app_state(app).db
    member = team_world.member
    chat = await branchy_chat(session, team_world)
    leaf = chat.current_message_id
    for change in ("send", "delete"):
        before = await export_built_whole(session, chat.id)
        body = exports.chat_export(
            db=db, user_id=member.id, team_id=member.team_id, chat_id=chat.id, export_format="json"
        )
        received = [await anext(body), await anext(body)]  # the chat, its branch, then a first batch
        conn = await asyncpg.connect(_plain_url(team_world.settings.DATABASE_URL))
        try:
            if change == "send":
                question, answer = uuid.uuid4(), uuid.uuid4()
                await conn.execute(
                    "WITH q AS (INSERT INTO messages (id, chat_id, parent_id, role, content, status, created_at,"
                    " updated_at) VALUES ($2, $1, $4, 'user', 'Late', 'complete', now(), now()),"
                    " ($3, $1, $2, 'assistant', 'Late answer', 'complete', now(), now()) RETURNING id)"
                    " UPDATE chats SET current_message_id = $3, message_count = 9 WHERE id = $1",
                    chat.id,
                    question,
                    answer,
                    leaf,
                )
            else:
                await conn.execute("DELETE FROM chats WHERE id = $1", chat.id)
        finally:
            await conn.close()
        received += [piece async for piece in body]
        assert b"".join(received) == before, change
        assert (b"Late" in before) == (change == "delete")  # the send is in the next export
    assert (await count_rows(session, "chats")) == 0


async def read_into(pieces: list[bytes], response: httpx.Response) -> None:
    async for piece in response.aiter_bytes():
        pieces.append(piece)


@pytest.mark.timeout(60)
async def test_an_export_whose_database_is_lost_while_it_is_read_is_a_plain_503_and_is_logged(
    settings: Settings,
    session: AsyncSession,
    team_world: TeamWorld,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database connection dies between two batches (a restart, a killed connection): the export is read
    whole before the 200, so the client gets the plain JSON 503 with `Retry-After` (try again), never a 200
    whose download is cut short or a file that ends like a whole export. The failure is logged with the chat
    and how far it got. Served by uvicorn, as deployed."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", 2)
    chat = await branchy_chat(session, team_world)
    await session.close()
    first_batch_read, cut = threading.Event(), threading.Event()
    read_in_order = exports._messages_in_order

    async def pausing(*args: Any, **kwargs: Any) -> AsyncIterator[list[Message]]:
        async for batch in read_in_order(*args, **kwargs):
            yield batch
            if not first_batch_read.is_set():  # asked for the next batch: the first one is in the spool
                first_batch_read.set()
                await asyncio.to_thread(cut.wait, 10)

    monkeypatch.setattr(exports, "_messages_in_order", pausing)
    async with live_server(settings) as server, httpx.AsyncClient(base_url=server.url) as http:
        path = f"/api/chats/{chat.id}/export"
        answer = asyncio.create_task(http.get(path, headers=team_world.h(team_world.member)))
        assert await asyncio.to_thread(first_batch_read.wait, 10)
        assert not answer.done()  # nothing answered yet: the export is still being read
        assert await _end_the_reading_session(settings) == 1
        cut.set()
        response = await answer
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json() == {"detail": "Service temporarily unavailable, try again shortly"}
    assert "content-disposition" not in response.headers
    logged = [r for r in caplog.records if r.name == "app.services.exports"]
    assert [r.levelno for r in logged] == [logging.ERROR]
    assert f"the export of chat {chat.id} failed after" in logged[0].getMessage()


async def test_a_slow_download_holds_no_database_connection_and_says_its_length(
    app: FastAPI, session: AsyncSession, team_world: TeamWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export is read into a spool (memory, then a temporary file) before the 200: its snapshot's connection
    is back in the pool before the first byte goes out, so downloads however slow (a client reading a byte a
    second is never cut by the write-stall limit) cannot use up the pool that sends need. Streamed straight
    from the snapshot, each download held a connection to its last byte. The length is known: a
    `Content-Length`, so a client can tell a whole download from a cut one (Markdown has no end mark). A spool
    past its memory goes to a temporary file, deleted with the response."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", 2)
    monkeypatch.setattr(exports, "SPOOL_MEMORY_BYTES", 1024)  # this chat's export goes to a file
    monkeypatch.setattr(exports, "SPOOL_PIECE_BYTES", 256)
    chat = await branchy_chat(session, team_world)
    await session.close()
    db = app_state(app).db
    whole = await export_built_whole(session, chat.id)
    await session.close()
    path = f"/api/chats/{chat.id}/export"
    scope = http_scope("GET", path, team_world.h(team_world.member))
    heads: list[dict[bytes, bytes]] = []
    bodies: list[bytes] = []
    in_use: list[int | None] = []
    spools: list[exports.Spool] = []
    spooled = exports.spooled

    async def recorded(body: Any) -> exports.Spool:
        spools.append(await spooled(body))
        return spools[-1]

    monkeypatch.setattr(exports, "spooled", recorded)
    receive = bodyless_request()  # the client stays until the end

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            heads.append(dict(message["headers"]))
        elif message["body"]:
            in_use.append(db.pool_in_use())
            bodies.append(message["body"])
            await asyncio.sleep(0.01)  # a slow reader

    await app(scope, receive, send)
    assert len(bodies) > 4
    assert set(in_use) == {0}
    assert b"".join(bodies) == whole
    assert heads[0][b"content-length"] == str(len(whole)).encode()
    assert vars(spools[0])["_rolled"]  # it went to a temporary file
    assert spools[0].closed


async def test_a_download_left_by_its_client_gives_its_database_connection_back_at_once(
    app: FastAPI, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A client gone when the body starts (the server's write fails): no database connection is left behind
    (streamed from the snapshot, the started generator kept its connection until the garbage collector found
    it; spooled, the export is read whole and its connection back before the 200) and the spool is closed."""
    chat = await branchy_chat(session, team_world)
    await session.close()
    db = app_state(app).db
    path = f"/api/chats/{chat.id}/export"
    scope = http_scope("GET", path, team_world.h(team_world.member))
    started: list[int] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.append(message["status"])
            return
        raise OSError("the client is gone")

    await app(scope, receive, send)
    assert started == [200]
    assert db.pool_in_use() == 0


async def test_an_export_on_sqlite_is_read_in_batches_in_one_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite (its own statements: a message's weight, typed keys, an explicit BEGIN): the same bytes as the
    document built whole, read a few messages at a time, with the chat deleted after the first batch; and the
    JSON Lines export (a page's snapshot) its line."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", 3)
    monkeypatch.setattr(exports, "EXPORT_BATCH_BYTES", 200)
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", tmp_path)
    db = Database(settings)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with db.sessionmaker() as session:
            team = await create_team(session)
            user = await create_user(session, team=team)
            agent = await create_agent(session, team=team)
            chat = await create_chat(session, user=user, agent=agent, title="On SQLite")
            now, parent, rows = utcnow(), None, []
            for i in range(20):  # two messages a second: ties, ordered by id
                role = "user" if i % 2 == 0 else "assistant"
                element = {"role": role, "content": f"m{i} é " * 10, "created_at": now + timedelta(seconds=i // 2)}
                parent = message_row(chat.id, parent.id if parent else None, {**element, "metadata": {"i": i}})
                rows.append(parent)
            session.add_all(rows)
            await session.flush()
            await session.execute(
                update(Chat).where(Chat.id == chat.id).values(current_message_id=rows[-1].id, message_count=20)
            )
            await session.commit()
            whole = await export_built_whole(session, chat.id)
        lines = b"".join([piece async for piece in exports.export_lines(db=db, user_id=user.id, team_id=team.id)])
        assert lines == json.dumps(json.loads(whole), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        documents = []
        for export_format in ("json", "markdown"):
            body = exports.chat_export(
                db=db, user_id=user.id, team_id=user.team_id, chat_id=chat.id, export_format=export_format
            )
            pieces = [await anext(body), await anext(body)]
            if export_format == "markdown":
                async with db.sessionmaker() as session:
                    await session.execute(delete(Chat).where(Chat.id == chat.id))
                    await session.commit()
            pieces += [piece async for piece in body]
            assert len(pieces) > 6
            documents.append(b"".join(pieces))
        assert documents[0] == whole
        assert without_export_time(documents[1].decode()) == markdown_built_whole(json.loads(whole))
    finally:
        await db.dispose()


async def test_a_client_gone_mid_download_gives_its_database_connection_back(
    app: FastAPI, session: AsyncSession, team_world: TeamWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client leaves after the first pieces (the server is told: `http.disconnect`, which cancels the write
    in progress): nothing of the export keeps a database connection (streamed from the snapshot, the suspended
    generator kept one until the garbage collector found it; spooled, it was back before the 200)."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", 2)
    chat = await branchy_chat(session, team_world)
    await session.close()
    db = app_state(app).db
    path = f"/api/chats/{chat.id}/export"
    scope = http_scope("GET", path, team_world.h(team_world.member))
    bodies: list[bytes] = []
    gone = asyncio.Event()
    receive = bodyless_request(gone)

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            if len(bodies) == 2:  # the head, then a first batch: the client leaves while the next is asked for
                gone.set()
                await asyncio.sleep(0.2)

    await app(scope, receive, send)
    assert len(bodies) == 2
    assert db.pool_in_use() == 0


# --- export all, a chat at a time --------------------------------------------------------------


async def lines_built_whole(session: AsyncSession, user: User) -> bytes:
    """The JSON Lines export as it was built before its chats were read in batches: a page of chats and every
    message of theirs in one statement, each chat's document made whole and dumped on one line."""
    query = chats_with_messages().where(Chat.user_id == user.id, Chat.team_id == user.team_id)
    rows = (await session.execute(query.execution_options(populate_existing=True))).all()  # as stored now
    chats: dict[uuid.UUID, tuple[Chat, str, str, list[Message]]] = {}
    for chat, slug, name, message in rows:
        messages = chats.setdefault(chat.id, (chat, slug, name, []))[3]
        if message is not None:
            messages.append(message)
    lines = [
        json.dumps(chat_document(chat, slug, name, messages), ensure_ascii=False, separators=(",", ":"))
        for chat, slug, name, messages in sorted(chats.values(), key=lambda c: (c[0].created_at, c[0].id))
    ]
    return "".join(line + "\n" for line in lines).encode()


@pytest.mark.parametrize(("messages", "weight"), [(4, 10**9), (100, 300), ONE_BATCH], ids=BATCHINGS)
async def test_the_export_of_all_chats_read_in_batches_is_the_export_built_whole_byte_for_byte(
    client: httpx.AsyncClient,
    session: AsyncSession,
    team_world: TeamWorld,
    batch_selects: list[str],
    monkeypatch: pytest.MonkeyPatch,
    messages: int,
    weight: int,
) -> None:
    """Each chat's line is read a batch of messages at a time (as one chat's export is), four messages or 300
    bytes here: the file is the same bytes as each chat built whole and dumped on one line (order of chats and
    of messages, a clock set back, escapes, an untitled and an empty chat, a message still streaming), and
    only the caller's chats are in it."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", messages)
    monkeypatch.setattr(exports, "EXPORT_BATCH_BYTES", weight)
    await branchy_chat(session, team_world, title="first")
    _, count = await tangled_chat(session, team_world)
    await create_chat(session, user=team_world.member, agent=team_world.agent, title=None)
    await create_chat(session, user=team_world.member, agent=team_world.agent, messages=[{"content": "Hi"}])
    await branchy_chat(session, team_world, user=team_world.colleague, title="not mine")
    batch_selects.clear()
    response = await client.get("/api/chats/export", headers=team_world.h(team_world.member))
    assert response.status_code == 200
    whole = await lines_built_whole(session, team_world.member)
    assert response.content == whole
    titles = [json.loads(line)["title"] for line in whole.splitlines()]
    assert titles == ["first", 'Tangled ☃ \u2028 "q" #', "A chat", None, "A chat"]  # `other`: the tangled one's
    if (messages, weight) != ONE_BATCH:
        assert len(batch_selects) >= count // 4  # read in batches, not a chat at once


@pytest.mark.timeout(120)
async def test_the_export_of_all_chats_holds_a_batch_not_a_chat(
    app: FastAPI, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A chat of 4,000 messages of 4,000 characters (16 MB of text) among others: each line of the JSON Lines
    export was one chat built whole, several times its text at the peak; read a batch at a time into a spool,
    a line costs a batch or two and the spool's memory, however long the chat. Measured with tracemalloc around
    the whole request, served as a server serves it; the download is whole."""
    count, chars = 4000, 4000
    await create_chat(session, user=team_world.member, agent=team_world.agent, messages=[{"content": "Before"}])
    await long_chat(team_world, session, count, chars)
    await create_chat(session, user=team_world.member, agent=team_world.agent, messages=[{"content": "After"}])
    await create_chat(session, user=team_world.colleague, agent=team_world.agent, messages=[{"content": "Hi"}])
    text_bytes = count * (chars + chars // 35)  # UTF-8: each `é` is two bytes
    await downloaded(app, "/api/chats/export", team_world.h(team_world.colleague))  # warm: caches, statements
    gc.collect()
    tracemalloc.start()
    try:
        status, size, tail = await downloaded(app, "/api/chats/export", team_world.h(team_world.member))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (status, tail) == (200, tail[:-3] + b"]}\n")
    assert size == len(await lines_built_whole(session, team_world.member))
    assert peak < text_bytes / 4, peak


async def test_the_export_of_all_chats_holds_no_database_connection_while_a_line_is_sent(
    app: FastAPI, session: AsyncSession, team_world: TeamWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each page of chats is read into a spool and its session closed before its lines go out: however slowly the
    client reads, no database connection is held while a piece is sent (streamed from its snapshot, each line
    would hold one until its last byte). Served as a server serves it, a batch of two messages and a page of
    two chats at a time."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", 2)
    monkeypatch.setattr(exports, "EXPORT_PAGE_CHATS", 2)
    for title in ("one", "two", "three"):
        await branchy_chat(session, team_world, title=title)
    await session.close()
    db = app_state(app).db
    scope = http_scope("GET", "/api/chats/export", team_world.h(team_world.member))
    held: list[int | None] = []
    body = b""

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal body
        if message["type"] == "http.response.body" and message.get("body"):
            held.append(db.pool_in_use())
            body += message["body"]
            await asyncio.sleep(0.05)  # a slow client

    await app(scope, bodyless_request(), send)
    assert [json.loads(line)["title"] for line in body.splitlines()] == ["one", "two", "three"]
    assert len(held) >= 2
    assert held == [0] * len(held)


async def test_the_export_of_all_chats_reads_a_page_of_chats_in_one_snapshot(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of chats is one read-only transaction, not one a chat (most of what many small chats cost): the
    chats renamed together once the first one's messages are read show, in that page, their old titles (one
    consistent view; read each in its own snapshot, the second showed its new title beside the first's old
    one). The next page is a snapshot of its own, taken later: it shows the change."""
    monkeypatch.setattr(exports, "EXPORT_PAGE_CHATS", 2)
    first = await branchy_chat(session, team_world, title="first")
    second = await branchy_chat(session, team_world, title="second")
    third = await branchy_chat(session, team_world, title="third")
    await session.close()
    read_in_order = exports._messages_in_order

    async def renaming(s: AsyncSession, chat_id: uuid.UUID, **kwargs: Any) -> AsyncIterator[list[Message]]:
        async for batch in read_in_order(s, chat_id, **kwargs):
            yield batch
        if chat_id == first.id:
            conn = await asyncpg.connect(_plain_url(team_world.settings.DATABASE_URL))
            try:
                rename = "UPDATE chats SET title = title || ' renamed' WHERE id = ANY($1::uuid[])"
                await conn.execute(rename, [first.id, second.id, third.id])
            finally:
                await conn.close()

    monkeypatch.setattr(exports, "_messages_in_order", renaming)
    response = await client.get("/api/chats/export", headers=team_world.h(team_world.member))
    assert response.status_code == 200
    titles = [json.loads(line)["title"] for line in response.content.splitlines()]
    assert titles == ["first", "second", "third renamed"]


@pytest.mark.timeout(60)
async def test_an_export_of_all_chats_whose_database_is_lost_ends_after_its_last_whole_line(
    settings: Settings,
    session: AsyncSession,
    team_world: TeamWorld,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database connection dies while the second chat is read (its first batch spooled): the first chat's
    line is already sent, the second is never sent in part, and the download ends without its end (a chunked
    body cut: httpx raises, curl exits with code 18), so a client cannot take it for a whole export. The
    failure is logged with the chat. Served by uvicorn, as deployed."""
    monkeypatch.setattr(exports, "EXPORT_BATCH_MESSAGES", 2)
    first = await branchy_chat(session, team_world, title="first")
    second = await branchy_chat(session, team_world, title="second")
    await session.close()
    batch_read, cut = threading.Event(), threading.Event()
    read_in_order = exports._messages_in_order

    async def pausing(s: AsyncSession, chat_id: uuid.UUID, **kwargs: Any) -> AsyncIterator[list[Message]]:
        async for batch in read_in_order(s, chat_id, **kwargs):
            yield batch
            if chat_id == second.id and not batch_read.is_set():
                batch_read.set()
                await asyncio.to_thread(cut.wait, 10)

    monkeypatch.setattr(exports, "_messages_in_order", pausing)
    received = bytearray()
    async with live_server(settings) as server, httpx.AsyncClient(base_url=server.url) as http:

        async def download() -> None:
            async with http.stream("GET", "/api/chats/export", headers=team_world.h(team_world.member)) as response:
                assert response.status_code == 200
                async for piece in response.aiter_bytes():
                    received.extend(piece)

        answer = asyncio.create_task(download())
        assert await asyncio.to_thread(batch_read.wait, 10)
        assert await _end_the_reading_session(settings) == 1
        cut.set()
        with pytest.raises(httpx.RemoteProtocolError):
            await answer
    [line] = bytes(received).splitlines()
    assert json.loads(line)["id"] == str(first.id)
    assert received.endswith(b"\n")
    logged = [r for r in caplog.records if r.name == "app.services.exports"]
    assert f"the export of chat {second.id} failed after" in logged[0].getMessage()
