"""Sharing within a team: snapshots, tenancy, replacing, revoking, listing, forking (sendable afterwards)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.models import Agent, Chat, File, FileBlob, Message, ShareFile, Team, User
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import https_client
from tests.conftest import TeamWorld, chat_with_sent_files, count_rows, make_settings, run_migrations
from tests.factories import auth_headers, create_agent, create_chat, create_user, message_row
from tests.live import data_events, parse_sse, streamed_text
from tools.fake_n8n import FakeN8n

SHARE_KEYS = {"id", "chat_id", "user_id", "agent_id", "title", "message_count", "created_at", "updated_at"}


def msg(content: str, role: str = "user", **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, "status": "complete", "created_at": utcnow(), **extra}


FEEDBACK = {"rating": 1, "comment": "ok", "updated_at": "2026-12-01T10:00:00+00:00"}
CONVERSATION = [
    msg("What is 2+2?"),
    msg("4", "assistant", metadata={"format": "json"}, feedback=FEEDBACK),
    msg("And 3+3?"),
    msg("6", "assistant"),
]


async def chat_of(session: AsyncSession, world: TeamWorld, user: User | None = None, **overrides: Any) -> Chat:
    messages = overrides.pop("messages", CONVERSATION)
    return await create_chat(session, user=user or world.member, agent=world.agent, messages=messages, **overrides)


async def add_sibling(session: AsyncSession, chat: Chat, parent_id: uuid.UUID | None, content: str, role: str) -> None:
    """A message on another branch (not shown): the snapshot must leave it out."""
    session.add(message_row(chat.id, parent_id, msg(content, role)))
    await session.commit()


async def share(client: httpx.AsyncClient, world: TeamWorld, chat: Chat, user: User | None = None) -> httpx.Response:
    return await client.post(f"/api/chats/{chat.id}/share", headers=world.h(user or world.member))


async def branch_ids(session: AsyncSession, chat: Chat) -> list[uuid.UUID]:
    rows = {m.id: m for m in (await session.execute(Message.__table__.select().where(Message.chat_id == chat.id)))}
    ids, node = [], chat.current_message_id
    while node is not None:
        ids.append(node)
        node = rows[node].parent_id
    return ids[::-1]


# --- share -----------------------------------------------------------------------------------


async def test_share_chat_is_snapshot_of_current_branch(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await chat_of(session, team_world)
    shown = await branch_ids(session, chat)
    await add_sibling(session, chat, shown[1], "Other question", "user")  # another branch, not shown
    response = await share(client, team_world, chat)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == SHARE_KEYS | {"messages"}
    assert body["chat_id"] == str(chat.id)
    assert body["agent_id"] == str(team_world.agent.id)
    assert body["user_id"] == str(team_world.member.id)
    assert body["title"] == "A chat"
    assert body["message_count"] == 4
    messages = body["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [(m["role"], m["content"]) for m in CONVERSATION]
    assert [m["id"] for m in messages] == [str(i) for i in shown]
    assert [m["parent_id"] for m in messages] == [None, *[str(i) for i in shown[:-1]]]
    assert all(m["sibling_ids"] == [m["id"]] for m in messages)
    assert all(m["feedback"] is None for m in messages)  # ratings stay private to the owner
    assert messages[1]["metadata"] == {"format": "json"}
    assert body["created_at"].endswith("Z")


async def test_share_is_readable_by_the_team_only(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await chat_of(session, team_world)
    share_id = (await share(client, team_world, chat)).json()["id"]
    for reader in (team_world.colleague, team_world.admin, team_world.member):
        response = await client.get(f"/api/shares/{share_id}", headers=team_world.h(reader))
        assert response.status_code == 200
        assert response.json()["messages"][0]["content"] == "What is 2+2?"
    foreign = await client.get(f"/api/shares/{share_id}", headers=team_world.h(team_world.foreigner))
    unknown = await client.get(f"/api/shares/{uuid.uuid4()}", headers=team_world.h(team_world.foreigner))
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == unknown.json() == {"detail": "Share not found"}
    listed = await client.get("/api/shares", headers=team_world.h(team_world.foreigner))
    assert listed.json() == []
    assert listed.headers["X-Total-Count"] == "0"
    fork = await client.post(f"/api/shares/{share_id}/fork", headers=team_world.h(team_world.foreigner))
    assert fork.status_code == 404
    assert (await client.get(f"/api/shares/{share_id}")).status_code == 401


async def test_share_someone_elses_chat_is_404_and_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await chat_of(session, team_world)
    for intruder in (team_world.colleague, team_world.admin, team_world.foreigner):
        response = await share(client, team_world, chat, intruder)
        assert response.status_code == 404
        assert response.json() == {"detail": "Chat not found"}
        unshare = await client.delete(f"/api/chats/{chat.id}/share", headers=team_world.h(intruder))
        assert unshare.status_code == 404
    missing = await client.post(f"/api/chats/{uuid.uuid4()}/share", headers=team_world.h(team_world.member))
    assert missing.status_code == 404
    malformed = await client.post("/api/chats/not-a-uuid/share", headers=team_world.h(team_world.member))
    assert malformed.status_code == 422
    assert await count_rows(session, "shares") == 0


async def test_share_again_replaces_snapshot_under_same_id(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await chat_of(session, team_world)
    first = (await share(client, team_world, chat)).json()
    # The chat goes on: a new question and answer, and a new title.
    leaf = chat.current_message_id
    question = message_row(chat.id, leaf, msg("And 4+4?"))
    session.add(question)
    await session.flush()
    answer = message_row(chat.id, question.id, msg("8", "assistant"))
    session.add(answer)
    await session.flush()
    await session.execute(
        update(Chat).where(Chat.id == chat.id).values(current_message_id=answer.id, title="Arithmetic")
    )
    await session.commit()

    second = await share(client, team_world, chat)
    assert second.status_code == 201
    again = second.json()
    assert again["id"] == first["id"]
    assert again["created_at"] == first["created_at"]
    assert again["updated_at"] > first["updated_at"]
    assert again["title"] == "Arithmetic"
    assert [m["content"] for m in again["messages"]][-2:] == ["And 4+4?", "8"]
    # The old link shows the new snapshot; the team has one share of this chat.
    read = await client.get(f"/api/shares/{first['id']}", headers=team_world.h(team_world.colleague))
    assert read.json()["message_count"] == 6
    assert await count_rows(session, "shares") == 1


async def test_share_while_an_answer_streams_is_409(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    running = msg("Thinking…", "assistant", status="streaming", _worker=str(uuid.uuid4()))
    chat = await chat_of(session, team_world, messages=[msg("Question"), running])
    response = await share(client, team_world, chat)
    assert response.status_code == 409
    assert "still being written" in response.json()["detail"]
    assert await count_rows(session, "shares") == 0


async def test_unshare_deletes_the_snapshot(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await chat_of(session, team_world)
    share_id = (await share(client, team_world, chat)).json()["id"]
    response = await client.delete(f"/api/chats/{chat.id}/share", headers=team_world.h(team_world.member))
    assert response.status_code == 204
    for path in (f"/api/shares/{share_id}",):
        assert (await client.get(path, headers=team_world.h(team_world.colleague))).status_code == 404
    fork = await client.post(f"/api/shares/{share_id}/fork", headers=team_world.h(team_world.colleague))
    assert fork.status_code == 404
    again = await client.delete(f"/api/chats/{chat.id}/share", headers=team_world.h(team_world.member))
    assert again.status_code == 404
    assert again.json() == {"detail": "This chat is not shared"}
    assert await count_rows(session, "shares") == 0
    # Sharing after a revocation makes a new link: the revoked one stays dead.
    renewed = (await share(client, team_world, chat)).json()
    assert renewed["id"] != share_id


async def test_no_copy_of_a_snapshot_outlives_its_revocation_in_a_cache(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    """A share is another member's conversation, which its sharer may revoke at any time: the answers that carry
    it (or its title) had no Cache-Control, so a browser's disk cache or a proxy could keep the snapshot after
    the link answered 404. Each now says `no-store`."""
    chat = await chat_of(session, team_world)
    made = await share(client, team_world, chat)
    share_id = made.json()["id"]
    reader = team_world.h(team_world.colleague)
    answers = [
        made,
        await client.get(f"/api/shares/{share_id}", headers=reader),
        await client.get("/api/shares", headers=reader),
    ]
    assert [a.status_code for a in answers] == [201, 200, 200]
    assert [a.headers.get("Cache-Control") for a in answers] == ["no-store"] * 3
    assert "ETag" not in answers[1].headers
    assert "Last-Modified" not in answers[1].headers
    await client.delete(f"/api/chats/{chat.id}/share", headers=team_world.h(team_world.member))
    assert (await client.get(f"/api/shares/{share_id}", headers=reader)).status_code == 404


async def test_list_shares_newest_first_paged_without_messages(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    ids = []
    for owner in (team_world.member, team_world.colleague, team_world.member):
        chat = await chat_of(session, team_world, owner)
        ids.append((await share(client, team_world, chat, owner)).json()["id"])
    foreign_chat = await create_chat(
        session, user=team_world.foreigner, agent=team_world.foreign_agent, messages=[msg("hi")]
    )
    await share(client, team_world, foreign_chat, team_world.foreigner)

    page = await client.get("/api/shares", params={"limit": 2}, headers=team_world.h(team_world.admin))
    assert page.status_code == 200
    assert page.headers["X-Total-Count"] == "3"
    assert [s["id"] for s in page.json()] == ids[::-1][:2]
    assert all(set(s) == SHARE_KEYS for s in page.json())
    rest = await client.get("/api/shares", params={"limit": 2, "offset": 2}, headers=team_world.h(team_world.admin))
    assert [s["id"] for s in rest.json()] == [ids[0]]
    beyond = await client.get("/api/shares", params={"offset": 10}, headers=team_world.h(team_world.admin))
    assert beyond.json() == []
    assert beyond.headers["X-Total-Count"] == "3"
    bad = await client.get("/api/shares", params={"limit": 0}, headers=team_world.h(team_world.admin))
    assert bad.status_code == 422


async def test_share_survives_its_chat_and_is_deleted_by_sharer_or_admin(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await chat_of(session, team_world)
    share_id = (await share(client, team_world, chat)).json()["id"]
    deleted = await client.delete(f"/api/chats/{chat.id}", headers=team_world.h(team_world.member))
    assert deleted.status_code == 204
    read = await client.get(f"/api/shares/{share_id}", headers=team_world.h(team_world.colleague))
    assert read.status_code == 200
    assert read.json()["chat_id"] is None
    assert read.json()["message_count"] == 4

    colleague = await client.delete(f"/api/shares/{share_id}", headers=team_world.h(team_world.colleague))
    assert colleague.status_code == 403
    foreign = await client.delete(f"/api/shares/{share_id}", headers=team_world.h(team_world.foreigner))
    assert foreign.status_code == 404
    assert await count_rows(session, "shares") == 1
    admin = await client.delete(f"/api/shares/{share_id}", headers=team_world.h(team_world.admin))
    assert admin.status_code == 204
    assert (await client.get(f"/api/shares/{share_id}", headers=team_world.h(team_world.member))).status_code == 404

    # The sharer may delete their own share too.
    other = await chat_of(session, team_world)
    own_id = (await share(client, team_world, other)).json()["id"]
    own = await client.delete(f"/api/shares/{own_id}", headers=team_world.h(team_world.member))
    assert own.status_code == 204


async def test_share_outlives_its_sharers_account(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await chat_of(session, team_world)
    share_id = (await share(client, team_world, chat)).json()["id"]
    await session.execute(delete(User).where(User.id == team_world.member.id))
    await session.commit()
    read = await client.get(f"/api/shares/{share_id}", headers=team_world.h(team_world.colleague))
    assert read.status_code == 200
    assert read.json()["user_id"] is None
    assert read.json()["chat_id"] is None  # the account's chats went with it
    assert len(read.json()["messages"]) == 4


# --- fork ------------------------------------------------------------------------------------


async def test_fork_makes_a_chat_of_the_caller_that_can_be_continued(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    await session.execute(
        update(Agent).where(Agent.id == team_world.agent.id).values(webhook_url=fake.url + "/webhook/agent-stream")
    )
    await session.commit()
    chat = await chat_of(session, team_world)
    shared = (await share(client, team_world, chat)).json()
    response = await client.post(f"/api/shares/{shared['id']}/fork", headers=team_world.h(team_world.colleague))
    assert response.status_code == 201
    fork = response.json()
    assert fork["user_id"] == str(team_world.colleague.id)
    assert fork["agent_id"] == str(team_world.agent.id)
    assert fork["title"] == "A chat"
    assert fork["message_count"] == 4
    assert fork["id"] != str(chat.id)
    messages = fork["messages"]
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        (m["role"], m["content"], m["status"]) for m in shared["messages"]
    ]
    assert not {m["id"] for m in messages} & {m["id"] for m in shared["messages"]}
    assert [m["parent_id"] for m in messages] == [None, *[m["id"] for m in messages[:-1]]]
    assert fork["current_message_id"] == messages[-1]["id"]
    assert [m["created_at"] for m in messages] == sorted(m["created_at"] for m in messages)

    sent = await client.post(
        f"/api/chats/{fork['id']}/messages", json={"content": "And 5+5?"}, headers=team_world.h(team_world.colleague)
    )
    assert sent.status_code == 200
    events = data_events(parse_sse(sent.text))
    assert events[-1].type == "done"
    assert streamed_text(events) == "Echo: And 5+5?"
    assert events[0].data["data"]["user_message"]["parent_id"] == messages[-1]["id"]  # type: ignore[index]
    history = fake.requests[-1]["json"]["messages"]
    assert [h["content"] for h in history] == ["What is 2+2?", "4", "And 3+3?", "6", "And 5+5?"]
    after = (await client.get(f"/api/chats/{fork['id']}", headers=team_world.h(team_world.colleague))).json()
    assert [m["content"] for m in after["messages"]][-2:] == ["And 5+5?", "Echo: And 5+5?"]
    assert after["message_count"] == 6
    # The original chat and the share are untouched.
    original = (await client.get(f"/api/chats/{chat.id}", headers=team_world.h(team_world.member))).json()
    assert original["message_count"] == 4


async def test_fork_with_inactive_agent_is_409_and_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld
) -> None:
    chat = await chat_of(session, team_world)
    share_id = (await share(client, team_world, chat)).json()["id"]
    await session.execute(update(Agent).where(Agent.id == team_world.agent.id).values(is_active=False))
    await session.commit()
    chats_before = await count_rows(session, "chats")
    response = await client.post(f"/api/shares/{share_id}/fork", headers=team_world.h(team_world.colleague))
    assert response.status_code == 409
    assert await count_rows(session, "chats") == chats_before


@pytest.mark.parametrize("path", ["/api/shares/{id}", "/api/shares/{id}/fork"])
async def test_share_paths_with_malformed_id_are_422(
    client: httpx.AsyncClient, team_world: TeamWorld, path: str
) -> None:
    url = path.format(id="nope")
    method = client.post if url.endswith("fork") else client.get
    response = await method(url, headers=team_world.h(team_world.member))
    assert response.status_code == 422


# --- files -----------------------------------------------------------------------------------

NOTES = ("notes.txt", b"shared notes\n", "text/plain")
TABLE = ("table.csv", b"a,b\n1,2\n", "text/csv")
DOWNLOAD_HEADERS = (
    "content-type",
    "content-disposition",
    "x-content-type-options",
    "content-security-policy",
    "cross-origin-resource-policy",
    "cache-control",
)


def share_file_url(share_id: Any, file_id: Any) -> str:
    return f"/api/shares/{share_id}/files/{file_id}"


async def blob_hashes(session: AsyncSession) -> set[str]:
    return set((await session.execute(select(FileBlob.sha256))).scalars())


async def test_share_keeps_its_own_copies_of_files_when_the_chat_goes(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    chat_id, sent = await chat_with_sent_files(client, session, team_world, fake, [NOTES, TABLE])
    shared = (await client.post(f"/api/chats/{chat_id}/share", headers=team_world.h(team_world.member))).json()
    shown = shared["messages"][0]["files"]
    # The snapshot's files are the share's copies: same metadata, new ids.
    assert [{k: f[k] for k in ("filename", "content_type", "size", "sha256")} for f in shown] == [
        {k: f[k] for k in ("filename", "content_type", "size", "sha256")} for f in sent
    ]
    assert not {f["id"] for f in shown} & {f["id"] for f in sent}
    assert await count_rows(session, "share_files") == 2
    assert await count_rows(session, "file_blobs") == 2  # no byte copied
    # A colleague reads them exactly as the owner downloads the originals.
    owner = await client.get(f"/api/chats/{chat_id}/files/{sent[0]['id']}", headers=team_world.h(team_world.member))
    reader = await client.get(share_file_url(shared["id"], shown[0]["id"]), headers=team_world.h(team_world.colleague))
    assert reader.status_code == 200
    assert reader.content == NOTES[1]
    assert {h: reader.headers[h] for h in DOWNLOAD_HEADERS} == {h: owner.headers[h] for h in DOWNLOAD_HEADERS}
    assert reader.headers["content-disposition"].startswith("attachment;")
    assert reader.headers["x-content-type-options"] == "nosniff"
    assert reader.headers["content-security-policy"] == "default-src 'none'; sandbox"
    # The chat (and its files) deleted: the share's copies and their bytes stay.
    assert (await client.delete(f"/api/chats/{chat_id}", headers=team_world.h(team_world.member))).status_code == 204
    assert await count_rows(session, "files") == 0
    assert await blob_hashes(session) == {f["sha256"] for f in sent}
    for copy, (_, data, _) in zip(shown, [NOTES, TABLE], strict=True):
        again = await client.get(share_file_url(shared["id"], copy["id"]), headers=team_world.h(team_world.admin))
        assert again.status_code == 200
        assert again.content == data


async def test_share_file_route_serves_only_this_shares_files_to_its_team(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    chat_id, sent = await chat_with_sent_files(client, session, team_world, fake, [NOTES])
    other_id, _ = await chat_with_sent_files(client, session, team_world, fake, [TABLE])
    mine = (await client.post(f"/api/chats/{chat_id}/share", headers=team_world.h(team_world.member))).json()
    other = (await client.post(f"/api/chats/{other_id}/share", headers=team_world.h(team_world.member))).json()
    copy = mine["messages"][0]["files"][0]["id"]
    other_copy = other["messages"][0]["files"][0]["id"]
    refused = [
        (team_world.foreigner, share_file_url(mine["id"], copy)),  # another team
        (team_world.colleague, share_file_url(mine["id"], sent[0]["id"])),  # the chat's own file id
        (team_world.colleague, share_file_url(mine["id"], other_copy)),  # another share's copy
        (team_world.colleague, share_file_url(other["id"], copy)),
        (team_world.colleague, share_file_url(mine["id"], uuid.uuid4())),
        (team_world.colleague, share_file_url(uuid.uuid4(), copy)),
    ]
    for user, url in refused:
        response = await client.get(url, headers=team_world.h(user))
        assert response.status_code == 404, url
        assert response.json() == {"detail": "File not found"}
        assert NOTES[1] not in response.content
    # The original chat's download stays the owner's only: a share gives no way into it.
    chat_file = f"/api/chats/{chat_id}/files/{sent[0]['id']}"
    assert (await client.get(chat_file, headers=team_world.h(team_world.colleague))).status_code == 404
    assert (await client.get(share_file_url(mine["id"], copy))).status_code == 401
    assert (
        await client.get(share_file_url(mine["id"], "nope"), headers=team_world.h(team_world.member))
    ).status_code == 422


async def test_revoking_a_share_removes_its_copies_at_once_and_collects_their_bytes(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    member = team_world.h(team_world.member)
    chat_id, sent = await chat_with_sent_files(client, session, team_world, fake, [NOTES])
    shared = (await client.post(f"/api/chats/{chat_id}/share", headers=member)).json()
    copy = share_file_url(shared["id"], shared["messages"][0]["files"][0]["id"])
    assert (await client.delete(f"/api/chats/{chat_id}/share", headers=member)).status_code == 204
    assert (await client.get(copy, headers=team_world.h(team_world.colleague))).status_code == 404
    assert await count_rows(session, "share_files") == 0
    assert await blob_hashes(session) == {sent[0]["sha256"]}  # the chat still uses the bytes

    # Shared again, the chat deleted: the share alone holds the bytes; deleting it collects them.
    again = (await client.post(f"/api/chats/{chat_id}/share", headers=member)).json()
    assert (await client.delete(f"/api/chats/{chat_id}", headers=member)).status_code == 204
    assert await blob_hashes(session) == {sent[0]["sha256"]}
    assert (
        await client.delete(f"/api/shares/{again['id']}", headers=team_world.h(team_world.admin))
    ).status_code == 204
    assert await count_rows(session, "share_files") == 0
    assert await count_rows(session, "file_blobs") == 0
    gone = share_file_url(again["id"], again["messages"][0]["files"][0]["id"])
    assert (await client.get(gone, headers=member)).status_code == 404


async def test_sharing_again_replaces_the_copies(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    member = team_world.h(team_world.member)
    chat_id, _ = await chat_with_sent_files(client, session, team_world, fake, [NOTES])
    first = (await client.post(f"/api/chats/{chat_id}/share", headers=member)).json()
    upload = await client.post(f"/api/chats/{chat_id}/files", files={"file": TABLE}, headers=member)
    sent = await client.post(
        f"/api/chats/{chat_id}/messages",
        json={"content": "And this", "file_ids": [upload.json()["id"]]},
        headers=member,
    )
    assert sent.status_code == 200
    second = (await client.post(f"/api/chats/{chat_id}/share", headers=member)).json()
    assert second["id"] == first["id"]
    copies = [f["id"] for m in second["messages"] for f in m["files"]]
    assert len(copies) == 2
    assert await count_rows(session, "share_files") == 2  # the old copy replaced, not kept beside
    old = share_file_url(first["id"], first["messages"][0]["files"][0]["id"])
    assert (await client.get(old, headers=member)).status_code == 404
    contents = [(await client.get(share_file_url(second["id"], c), headers=member)).content for c in copies]
    assert contents == [NOTES[1], TABLE[1]]


async def test_sharing_one_chat_twice_at_once_leaves_one_share_and_one_set_of_copies(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    chat_id, _ = await chat_with_sent_files(client, session, team_world, fake, [NOTES, TABLE])
    url, member = f"/api/chats/{chat_id}/share", team_world.h(team_world.member)
    responses = await asyncio.gather(*(client.post(url, headers=member) for _ in range(4)))
    assert [r.status_code for r in responses] == [201] * 4
    assert len({r.json()["id"] for r in responses}) == 1
    assert await count_rows(session, "shares") == 1
    assert await count_rows(session, "share_files") == 2
    final = (await client.get(f"/api/shares/{responses[0].json()['id']}", headers=member)).json()
    rows = set((await session.execute(select(ShareFile.id))).scalars())
    assert {uuid.UUID(f["id"]) for f in final["messages"][0]["files"]} == rows


async def test_sharing_one_chat_twice_at_once_on_sqlite(tmp_path: Path) -> None:
    """The embedded database takes no row locks: the second of two first shares met the unique key, a 500.
    It is made again as a re-share of the first."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shares.db'}"
    await asyncio.to_thread(run_migrations, url)
    settings = make_settings(url, tmp_path)
    lite = create_app(settings)
    try:
        async with app_state(lite).db.sessionmaker() as s:
            user = await create_user(s)
            agent = await create_agent(s, team=await s.get_one(Team, user.team_id))
            chat = await create_chat(
                s,
                user=user,
                agent=agent,
                messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            )
        async with https_client(lite) as client:
            share = f"/api/chats/{chat.id}/share"
            answers = await asyncio.gather(
                *(client.post(share, headers=auth_headers(settings, user)) for _ in range(4))
            )
        assert [a.status_code for a in answers] == [201] * 4
        assert len({a.json()["id"] for a in answers}) == 1
    finally:
        await shutdown(lite)


async def test_fork_copies_the_files_for_its_owner_and_sends_their_bytes(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    chat_id, sent = await chat_with_sent_files(client, session, team_world, fake, [NOTES, TABLE])
    shared = (await client.post(f"/api/chats/{chat_id}/share", headers=team_world.h(team_world.member))).json()
    colleague = team_world.h(team_world.colleague)
    fork = (await client.post(f"/api/shares/{shared['id']}/fork", headers=colleague)).json()
    forked = fork["messages"][0]["files"]
    assert [f["sha256"] for f in forked] == [f["sha256"] for f in sent]
    assert not {f["id"] for f in forked} & {f["id"] for f in sent + shared["messages"][0]["files"]}
    rows = (await session.execute(select(File).where(File.chat_id == uuid.UUID(fork["id"])))).scalars().all()
    assert {str(r.id) for r in rows} == {f["id"] for f in forked}
    assert all(r.user_id == team_world.colleague.id for r in rows)
    assert {r.message_id for r in rows} == {uuid.UUID(fork["messages"][0]["id"])}  # sent, not unsent uploads
    assert await count_rows(session, "file_blobs") == 2
    # The original chat and the share go: the fork's files stay its owner's.
    assert (await client.delete(f"/api/chats/{chat_id}", headers=team_world.h(team_world.member))).status_code == 204
    assert (
        await client.delete(f"/api/shares/{shared['id']}", headers=team_world.h(team_world.admin))
    ).status_code == 204
    for copy, (_, data, _) in zip(forked, [NOTES, TABLE], strict=True):
        own = await client.get(f"/api/chats/{fork['id']}/files/{copy['id']}", headers=colleague)
        assert own.status_code == 200
        assert own.content == data
        assert own.headers["content-disposition"].startswith("attachment;")
        other = f"/api/chats/{fork['id']}/files/{copy['id']}"
        assert (await client.get(other, headers=team_world.h(team_world.member))).status_code == 404
    # Regenerating the forked answer with base64 delivery sends n8n the copied bytes.
    await session.execute(update(Agent).where(Agent.id == team_world.agent.id).values(file_delivery="base64"))
    await session.commit()
    regenerated = await client.post(
        f"/api/chats/{fork['id']}/messages", json={"regenerate_of": fork["messages"][1]["id"]}, headers=colleague
    )
    assert regenerated.status_code == 200
    assert data_events(parse_sse(regenerated.text))[-1].type == "done"
    delivered = fake.requests[-1]["json"]["files"]
    assert [(f["id"], f["filename"], base64.b64decode(f["data"])) for f in delivered] == [
        (forked[0]["id"], "notes.txt", NOTES[1]),
        (forked[1]["id"], "table.csv", TABLE[1]),
    ]


async def test_a_fork_keeps_every_file_of_its_snapshot_past_a_lowered_chat_cap(
    client: httpx.AsyncClient,
    session: AsyncSession,
    team_world: TeamWorld,
    fake: FakeN8n,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A snapshot holds no more files than its chat was allowed, so a fork passes FILES_PER_CHAT_MAX only when
    the cap was lowered since. The fork then keeps every file, as the chat does (a lower cap removes nothing,
    and a fork without some files would be a silently different chat); the cap refuses the next upload (409)."""
    chat_id, sent = await chat_with_sent_files(client, session, team_world, fake, [NOTES, TABLE])
    shared = (await client.post(f"/api/chats/{chat_id}/share", headers=team_world.h(team_world.member))).json()
    monkeypatch.setattr(settings, "FILES_PER_CHAT_MAX", 1)
    colleague = team_world.h(team_world.colleague)
    response = await client.post(f"/api/shares/{shared['id']}/fork", headers=colleague)
    assert response.status_code == 201, response.text
    fork = response.json()
    forked = fork["messages"][0]["files"]
    assert [f["sha256"] for f in forked] == [f["sha256"] for f in sent]
    assert await count_rows(session, "files") == 4  # the chat's two and the fork's two
    for chat, headers in ((fork["id"], colleague), (chat_id, team_world.h(team_world.member))):
        refused = await client.post(
            f"/api/chats/{chat}/files", files={"file": ("more.txt", b"more", "text/plain")}, headers=headers
        )
        assert refused.status_code == 409
        assert refused.json() == {"detail": "This chat holds the most files allowed (1)"}
    own = await client.get(f"/api/chats/{fork['id']}/files/{forked[1]['id']}", headers=colleague)
    assert own.content == TABLE[1]


async def test_fork_of_a_share_being_revoked_never_fails_on_missing_bytes(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    """A fork and a revocation at once (the chat gone, so the share alone holds the bytes): either the fork
    happens first and keeps its own rows on the bytes, or it finds no share (404); never a 500."""
    member, colleague = team_world.h(team_world.member), team_world.h(team_world.colleague)
    for _ in range(3):
        chat_id, _ = await chat_with_sent_files(client, session, team_world, fake, [NOTES])
        shared = (await client.post(f"/api/chats/{chat_id}/share", headers=member)).json()
        assert (await client.delete(f"/api/chats/{chat_id}", headers=member)).status_code == 204
        fork, revoke = await asyncio.gather(
            client.post(f"/api/shares/{shared['id']}/fork", headers=colleague),
            client.delete(f"/api/shares/{shared['id']}", headers=member),
        )
        assert revoke.status_code == 204
        assert fork.status_code in (201, 404)
        if fork.status_code == 201:
            copy = fork.json()["messages"][0]["files"][0]["id"]
            own = await client.get(f"/api/chats/{fork.json()['id']}/files/{copy}", headers=colleague)
            assert own.content == NOTES[1]


async def test_resharing_and_revoking_at_once_leave_no_orphan_copies(
    client: httpx.AsyncClient, session: AsyncSession, team_world: TeamWorld, fake: FakeN8n
) -> None:
    """A re-share and a revocation of one chat at once: whichever wins, no 500, and the copies match the
    shares left (one set for a share, none without)."""
    chat_id, _ = await chat_with_sent_files(client, session, team_world, fake, [NOTES, TABLE])
    url, member = f"/api/chats/{chat_id}/share", team_world.h(team_world.member)
    for _ in range(4):
        assert (await client.post(url, headers=member)).status_code == 201
        shared, revoked = await asyncio.gather(client.post(url, headers=member), client.delete(url, headers=member))
        assert shared.status_code == 201
        assert revoked.status_code in (204, 404)
        shares = await count_rows(session, "shares")
        assert await count_rows(session, "share_files") == 2 * shares
        await client.delete(url, headers=member)
    assert await count_rows(session, "share_files") == 0
