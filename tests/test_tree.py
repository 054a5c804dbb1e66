"""The message tree: edit, regenerate, switching branches, what n8n receives, one generation per chat across
branches, foreign ids, feedback, `?last=N` and the paginated list of every message."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Team
from app.state import app_state
from tests.factories import branch_of, create_chat, create_user
from tests.live import ChatSetup, chat_with_agent, data_events, parse_sse
from tools.fake_n8n import FakeN8n

ECHO = "/webhook/agent-stream"


async def post(client: httpx.AsyncClient, setup: ChatSetup, body: dict[str, Any]) -> httpx.Response:
    return await client.post(f"/api/chats/{setup.chat.id}/messages", json=body, headers=setup.headers)


async def sent(client: httpx.AsyncClient, setup: ChatSetup, body: dict[str, Any]) -> dict[str, Any]:
    """Send and return the start event's data with the done message (the stream must end with `done`)."""
    response = await post(client, setup, body)
    assert response.status_code == 200, response.text
    events = data_events(parse_sse(response.text))
    assert events[-1].type == "done", events[-1].data
    start: dict[str, Any] = events[0].data["data"]  # type: ignore[index]
    return {**start, "done": events[-1].data["data"]["message"]}  # type: ignore[index]


async def chat(client: httpx.AsyncClient, setup: ChatSetup, query: str = "") -> dict[str, Any]:
    response = await client.get(f"/api/chats/{setup.chat.id}{query}", headers=setup.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def texts(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"]]


@pytest.fixture
async def setup(session: AsyncSession, settings: Settings, fake: FakeN8n) -> ChatSetup:
    return await chat_with_agent(session, settings, fake.url + ECHO)


async def two_turns(client: httpx.AsyncClient, setup: ChatSetup) -> tuple[dict[str, Any], dict[str, Any]]:
    first = await sent(client, setup, {"content": "one"})
    second = await sent(client, setup, {"content": "two"})
    return first, second


# --- edit -----------------------------------------------------------------------------------------


async def test_edit_makes_a_sibling_and_the_current_branch(
    client: httpx.AsyncClient, setup: ChatSetup, fake: FakeN8n
) -> None:
    first, second = await two_turns(client, setup)
    edited = await sent(client, setup, {"content": "TWO again", "edit_of": second["user_message"]["id"]})
    question = edited["user_message"]
    assert question["parent_id"] == first["done"]["id"]
    assert question["sibling_ids"] == [second["user_message"]["id"], question["id"]]
    assert edited["done"]["parent_id"] == question["id"]
    assert edited["done"]["sibling_ids"] == [edited["done"]["id"]]
    body = await chat(client, setup)
    assert texts(body) == ["one", "Echo: one", "TWO again", "Echo: TWO again"]
    assert body["current_message_id"] == edited["done"]["id"]
    assert body["messages"][2]["sibling_ids"] == question["sibling_ids"]
    assert body["message_count"] == 6
    # n8n got the branch above the edited question, never the replaced one.
    assert fake.requests[-1]["json"]["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "TWO again"},
    ]
    assert fake.requests[-1]["json"]["chatInput"] == "TWO again"


async def test_edit_of_the_first_message_is_a_new_root(client: httpx.AsyncClient, setup: ChatSetup) -> None:
    first, _second = await two_turns(client, setup)
    edited = await sent(client, setup, {"content": "zero", "edit_of": first["user_message"]["id"]})
    assert edited["user_message"]["parent_id"] is None
    assert edited["user_message"]["sibling_ids"] == [first["user_message"]["id"], edited["user_message"]["id"]]
    assert texts(await chat(client, setup)) == ["zero", "Echo: zero"]


# --- regenerate -------------------------------------------------------------------------------------


async def test_regenerate_answers_the_same_question_again(
    client: httpx.AsyncClient, setup: ChatSetup, fake: FakeN8n
) -> None:
    first, second = await two_turns(client, setup)
    again = await sent(client, setup, {"regenerate_of": second["done"]["id"]})
    # No new user message: the start event names the existing question, as stored.
    assert again["user_message"] == second["user_message"]
    assert again["done"]["parent_id"] == second["user_message"]["id"]
    assert again["done"]["sibling_ids"] == [second["done"]["id"], again["done"]["id"]]
    body = await chat(client, setup)
    assert [m["id"] for m in body["messages"]] == [
        first["user_message"]["id"],
        first["done"]["id"],
        second["user_message"]["id"],
        again["done"]["id"],
    ]
    assert body["message_count"] == 5
    assert fake.requests[-1]["json"]["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
    ]
    assert fake.requests[-1]["json"]["chatInput"] == "two"


async def test_history_sent_upstream_is_the_current_branch_only(
    client: httpx.AsyncClient, setup: ChatSetup, fake: FakeN8n
) -> None:
    first = await sent(client, setup, {"content": "shared root"})
    secret = await sent(client, setup, {"content": "SIBLING-BRANCH-TEXT"})
    await sent(client, setup, {"content": "other branch", "edit_of": secret["user_message"]["id"]})
    await sent(client, setup, {"content": "and on"})
    await sent(client, setup, {"regenerate_of": first["done"]["id"]})
    await sent(client, setup, {"content": "last"})
    for request in fake.requests[2:]:
        assert "SIBLING-BRANCH-TEXT" not in json.dumps(request["json"]), request["json"]["chatInput"]
    assert fake.requests[-1]["json"]["messages"] == [
        {"role": "user", "content": "shared root"},
        {"role": "assistant", "content": "Echo: shared root"},
        {"role": "user", "content": "last"},
    ]


# --- switching branches -------------------------------------------------------------------------------


async def test_switch_branch_continues_through_newest_descendants(client: httpx.AsyncClient, setup: ChatSetup) -> None:
    first, second = await two_turns(client, setup)
    third = await sent(client, setup, {"content": "three"})
    edited = await sent(client, setup, {"content": "two bis", "edit_of": second["user_message"]["id"]})
    url = f"/api/chats/{setup.chat.id}"
    # Back to the old question: the branch goes on through its answer and the newest question after it.
    back = await client.put(url, json={"current_message_id": second["user_message"]["id"]}, headers=setup.headers)
    assert back.status_code == 200, back.text
    assert back.json()["current_message_id"] == third["done"]["id"]
    assert texts(back.json()) == ["one", "Echo: one", "two", "Echo: two", "three", "Echo: three"]
    assert texts(await chat(client, setup)) == texts(back.json())
    # From the shared answer, the newest child is the edit.
    fork = await client.put(url, json={"current_message_id": first["done"]["id"]}, headers=setup.headers)
    assert fork.json()["current_message_id"] == edited["done"]["id"]
    # A send continues the branch shown.
    after = await sent(client, setup, {"content": "four"})
    assert after["user_message"]["parent_id"] == edited["done"]["id"]


@pytest.mark.parametrize("value", ["not-a-uuid", None, 3])
async def test_switch_branch_malformed_id_is_422(client: httpx.AsyncClient, setup: ChatSetup, value: Any) -> None:
    await two_turns(client, setup)
    before = await chat(client, setup)
    response = await client.put(
        f"/api/chats/{setup.chat.id}", json={"current_message_id": value}, headers=setup.headers
    )
    assert response.status_code == 422
    assert await chat(client, setup) == before


async def test_switch_to_another_chats_message_is_422_and_changes_nothing(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup
) -> None:
    await two_turns(client, setup)
    other = await create_chat(
        session,
        user=setup.user,
        agent=setup.agent,
        messages=[{"id": str(uuid.uuid4()), "role": "user", "content": "elsewhere"}],
    )
    foreign = (await client.get(f"/api/chats/{other.id}", headers=setup.headers)).json()["messages"][0]["id"]
    before = await chat(client, setup)
    for message_id in (foreign, str(uuid.uuid4())):
        response = await client.put(
            f"/api/chats/{setup.chat.id}",
            json={"current_message_id": message_id, "title": "renamed"},
            headers=setup.headers,
        )
        assert response.status_code == 422
        assert response.json()["detail"][0]["msg"] == "current_message_id is not a message of this chat"
    assert await chat(client, setup) == before


async def sent_during_a_deletion(
    app: FastAPI, chat_id: uuid.UUID, request: Coroutine[Any, Any, httpx.Response]
) -> httpx.Response:
    """`request`'s answer, sent while the chat's deletion is under way (uncommitted): it must wait for the
    deletion's commit (the chat's row is locked), not read the chat before it goes."""
    async with app_state(app).db.sessionmaker() as deletion:
        await deletion.execute(text("DELETE FROM chats WHERE id = :id"), {"id": chat_id})
        sent = asyncio.ensure_future(request)
        await asyncio.wait({sent}, timeout=0.5)
        assert not sent.done()  # waiting for the deleted chat's row
        await deletion.commit()
    return await sent


@pytest.mark.parametrize("body", [{"title": "renamed"}, {"pinned": True}, {"current_message_id": "replaced"}])
async def test_update_of_a_chat_being_deleted_is_404_not_500(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup, body: dict[str, Any]
) -> None:
    """A rename, pin or branch switch read the chat, then wrote it: a deletion committed in between (another
    tab, a client deleting what it just renamed) left its UPDATE matching no row, a 500. It now waits for the
    deletion and answers 404, as after it."""
    _, second = await two_turns(client, setup)
    await sent(client, setup, {"content": "TWO again", "edit_of": second["user_message"]["id"]})
    if "current_message_id" in body:
        body = {"current_message_id": second["done"]["id"]}  # back to the branch the edit replaced
    response = await sent_during_a_deletion(
        app, setup.chat.id, client.put(f"/api/chats/{setup.chat.id}", json=body, headers=setup.headers)
    )
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "Chat not found"}


async def test_feedback_on_a_chat_being_deleted_is_404_not_still_streaming(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    """A rating read the answer, then wrote it: a deletion committed in between left its UPDATE matching no row,
    which was answered as an answer still streaming (409, "rate it once it has ended"). It now waits for the
    deletion and answers 404, as after it."""
    first, _ = await two_turns(client, setup)
    rate = f"/api/chats/{setup.chat.id}/messages/{first['done']['id']}/feedback"
    response = await sent_during_a_deletion(
        app, setup.chat.id, client.put(rate, json={"rating": 1}, headers=setup.headers)
    )
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "Chat not found"}


# --- one generation per chat, across branches ------------------------------------------------------


async def test_send_on_another_branch_while_one_streams_is_409(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    question = {"id": str(uuid.uuid4()), "role": "user", "content": "q"}
    answer = {"id": str(uuid.uuid4()), "role": "assistant", "content": "a"}
    running = {"id": str(uuid.uuid4()), "role": "user", "content": "later"}
    streaming = {
        "id": str(uuid.uuid4()),
        "role": "assistant",
        "content": "",
        "status": "streaming",
        "_worker": str(uuid.uuid4()),
    }
    setup = await chat_with_agent(session, settings, fake.url + ECHO, messages=[question, answer, running, streaming])
    # Point the chat at the first answer: the streaming row is on a branch that is not shown.
    async with app_state(app).db.sessionmaker() as s:
        from app.models import Chat

        row = await s.get(Chat, setup.chat.id)
        assert row is not None
        row.current_message_id = uuid.UUID(answer["id"])
        await s.commit()
    for body in ({"content": "x"}, {"regenerate_of": answer["id"]}, {"content": "y", "edit_of": question["id"]}):
        response = await post(client, setup, body)
        assert response.status_code == 409, body
        assert response.json() == {"detail": "A generation is already running in this chat"}
    assert fake.requests == []
    async with app_state(app).db.sessionmaker() as s:
        assert len(await branch_of(s, setup.chat.id)) == 2


async def test_racing_edit_regenerate_and_send_give_one_200_and_409s(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    # The answers last ~1 s: at 30 ms a token the winner could end before a loaded machine sent the others.
    setup = await chat_with_agent(session, settings, fake.url + ECHO + "?scenario=slow&delay_ms=300")
    first, _ = await two_turns(client, setup)
    responses = await asyncio.gather(
        post(client, setup, {"regenerate_of": first["done"]["id"]}),
        post(client, setup, {"content": "edited", "edit_of": first["user_message"]["id"]}),
        post(client, setup, {"content": "plain"}),
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 409, 409], [r.text[:200] for r in responses]
    body = await chat(client, setup)
    assert all(m["status"] == "complete" for m in body["messages"])
    listed = await client.get(f"/api/chats/{setup.chat.id}/messages", headers=setup.headers)
    assert listed.headers["x-total-count"] in ("5", "6")  # the winner added one or two messages


# --- foreign and malformed ids --------------------------------------------------------------------------


async def test_send_with_foreign_or_wrong_role_ids_is_422_and_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup, fake: FakeN8n
) -> None:
    first, _ = await two_turns(client, setup)
    other = await create_chat(
        session,
        user=setup.user,
        agent=setup.agent,
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    )
    other_body = (await client.get(f"/api/chats/{other.id}", headers=setup.headers)).json()
    other_question, other_answer = (m["id"] for m in other_body["messages"])
    before = await chat(client, setup)
    calls = len(fake.requests)
    cases = [
        ({"content": "x", "edit_of": other_question}, "edit_of is not a message of this chat"),
        ({"regenerate_of": other_answer}, "regenerate_of is not a message of this chat"),
        ({"content": "x", "edit_of": str(uuid.uuid4())}, "edit_of is not a message of this chat"),
        ({"content": "x", "edit_of": first["done"]["id"]}, "edit_of must be a user message"),
        ({"regenerate_of": first["user_message"]["id"]}, "regenerate_of must be an assistant message"),
    ]
    for body, detail in cases:
        response = await post(client, setup, body)
        assert response.status_code == 422, body
        assert response.json()["detail"][0]["msg"] == detail
    for body in (
        {"content": "x", "edit_of": "nope"},
        {"regenerate_of": first["done"]["id"], "content": "x"},
        {"regenerate_of": first["done"]["id"], "edit_of": first["user_message"]["id"]},
        {"regenerate_of": None},
        {"edit_of": first["user_message"]["id"]},
        {"content": "x", "edit_of": None},
        {"content": "   ", "edit_of": first["user_message"]["id"]},
    ):
        response = await post(client, setup, body)
        assert response.status_code == 422, body
    assert await chat(client, setup) == before
    assert len(fake.requests) == calls


async def test_send_edit_or_regenerate_in_another_users_chat_is_404(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup, fake: FakeN8n
) -> None:
    first, _ = await two_turns(client, setup)
    stranger = await chat_with_agent(session, settings, fake.url + ECHO)
    intruder = ChatSetup(stranger.user, stranger.agent, setup.chat, stranger.headers)
    for body in (
        {"regenerate_of": first["done"]["id"]},
        {"content": "x", "edit_of": first["user_message"]["id"]},
    ):
        response = await post(client, intruder, body)
        assert response.status_code == 404
        assert response.json() == {"detail": "Chat not found"}
    for path in ("", "/messages"):
        assert (await client.get(f"/api/chats/{setup.chat.id}{path}", headers=stranger.headers)).status_code == 404
    switch = await client.put(
        f"/api/chats/{setup.chat.id}", json={"current_message_id": first["done"]["id"]}, headers=stranger.headers
    )
    assert switch.status_code == 404


# --- feedback -------------------------------------------------------------------------------------------


async def test_feedback_set_change_and_clear(client: httpx.AsyncClient, setup: ChatSetup) -> None:
    first, _ = await two_turns(client, setup)
    url = f"/api/chats/{setup.chat.id}/messages/{first['done']['id']}/feedback"
    good = await client.put(url, json={"rating": 1, "comment": "  spot on "}, headers=setup.headers)
    assert good.status_code == 200, good.text
    feedback = good.json()["feedback"]
    assert (feedback["rating"], feedback["comment"]) == (1, "spot on")
    assert feedback["updated_at"].endswith("Z")
    assert good.json()["id"] == first["done"]["id"]
    assert good.json()["sibling_ids"] == [first["done"]["id"]]
    shown = (await chat(client, setup))["messages"][1]
    assert shown["feedback"] == feedback
    bad = await client.put(url, json={"rating": -1}, headers=setup.headers)
    assert (bad.json()["feedback"]["rating"], bad.json()["feedback"]["comment"]) == (-1, None)
    cleared = await client.put(url, json={"rating": None}, headers=setup.headers)
    assert cleared.json()["feedback"] is None
    assert (await chat(client, setup))["messages"][1]["feedback"] is None
    comment_only = await client.put(url, json={"rating": None, "comment": "hmm"}, headers=setup.headers)
    assert comment_only.json()["feedback"]["rating"] is None
    assert comment_only.json()["feedback"]["comment"] == "hmm"


async def test_feedback_refusals(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup
) -> None:
    first, _ = await two_turns(client, setup)
    base = f"/api/chats/{setup.chat.id}/messages"
    answer = f"{base}/{first['done']['id']}/feedback"
    on_question = await client.put(
        f"{base}/{first['user_message']['id']}/feedback", json={"rating": 1}, headers=setup.headers
    )
    assert on_question.status_code == 422
    assert on_question.json()["detail"][0]["msg"] == "Feedback is for assistant messages only"
    for body in (
        {"rating": 2},
        {"rating": True},
        {"rating": "1"},
        {"rating": 1.0},
        {},
        {"rating": 1, "comment": "x" * 2001},
        {"rating": 1, "extra": 1},
    ):
        response = await client.put(answer, json=body, headers=setup.headers)
        assert response.status_code == 422, body
    capped = await client.put(answer, json={"rating": 1, "comment": "x" * 2000}, headers=setup.headers)
    assert capped.status_code == 200
    missing = await client.put(f"{base}/{uuid.uuid4()}/feedback", json={"rating": 1}, headers=setup.headers)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Message not found"}
    stranger = await create_user(session)
    from tests.factories import auth_headers

    foreign = await client.put(answer, json={"rating": -1}, headers=auth_headers(settings, stranger))
    assert foreign.status_code == 404
    assert foreign.json() == {"detail": "Chat not found"}
    assert (await chat(client, setup))["messages"][1]["feedback"]["rating"] == 1
    # An answer still streaming: its stop's answer and its `done` would not show a rating given now.
    await session.execute(
        text("UPDATE messages SET status = 'streaming' WHERE id = :id"), {"id": uuid.UUID(first["done"]["id"])}
    )
    await session.commit()
    streaming = await client.put(answer, json={"rating": -1, "comment": "meh"}, headers=setup.headers)
    assert streaming.status_code == 409
    assert streaming.json() == {"detail": "This answer is still being written; rate it once it has ended"}
    stored = await session.scalar(
        text("SELECT feedback FROM messages WHERE id = :id"), {"id": uuid.UUID(first["done"]["id"])}
    )
    assert (stored["rating"], stored["comment"]) == (1, "x" * 2000)


# --- reading: ?last=N and every message -----------------------------------------------------------------


async def test_read_chat_last_n_with_has_more(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup
) -> None:
    await two_turns(client, setup)
    await sent(client, setup, {"content": "three"})
    full = await chat(client, setup)
    assert full["has_more"] is False
    assert len(full["messages"]) == 6
    last_two = await chat(client, setup, "?last=2")
    assert last_two["messages"] == full["messages"][-2:]
    assert last_two["has_more"] is True
    assert last_two["current_message_id"] == full["current_message_id"]
    exact = await chat(client, setup, "?last=6")
    assert (exact["messages"], exact["has_more"]) == (full["messages"], False)
    more = await chat(client, setup, "?last=50")
    assert (more["messages"], more["has_more"]) == (full["messages"], False)
    for bad in ("?last=0", "?last=-1", "?last=x"):
        assert (await client.get(f"/api/chats/{setup.chat.id}{bad}", headers=setup.headers)).status_code == 422
    empty = await create_chat(session, user=setup.user, agent=setup.agent)
    body = (await client.get(f"/api/chats/{empty.id}?last=3", headers=setup.headers)).json()
    assert (body["messages"], body["has_more"], body["current_message_id"]) == ([], False, None)


async def test_list_messages_every_branch_oldest_first_paginated(client: httpx.AsyncClient, setup: ChatSetup) -> None:
    first, second = await two_turns(client, setup)
    again = await sent(client, setup, {"regenerate_of": second["done"]["id"]})
    url = f"/api/chats/{setup.chat.id}/messages"
    everything = await client.get(url, headers=setup.headers)
    assert everything.status_code == 200
    assert everything.headers["x-total-count"] == "5"
    ids = [m["id"] for m in everything.json()]
    assert ids == [
        first["user_message"]["id"],
        first["done"]["id"],
        second["user_message"]["id"],
        second["done"]["id"],
        again["done"]["id"],
    ]
    regenerated = everything.json()[3]
    assert regenerated["sibling_ids"] == [second["done"]["id"], again["done"]["id"]]
    page = await client.get(url, params={"limit": 2, "offset": 2}, headers=setup.headers)
    assert [m["id"] for m in page.json()] == ids[2:4]
    assert page.headers["x-total-count"] == "5"
    assert page.json()[1]["sibling_ids"] == regenerated["sibling_ids"]
    past = await client.get(url, params={"offset": 10}, headers=setup.headers)
    assert (past.json(), past.headers["x-total-count"]) == ([], "5")
    for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}):
        assert (await client.get(url, params=params, headers=setup.headers)).status_code == 422
    missing = await client.get(f"/api/chats/{uuid.uuid4()}/messages", headers=setup.headers)
    assert missing.status_code == 404


async def switch_webhook(session: AsyncSession, setup: ChatSetup, url: str) -> None:
    setup.agent.webhook_url = url
    session.add(setup.agent)
    await session.commit()


async def test_failed_regenerate_keeps_the_tree_consistent_and_the_switch_stored(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup, fake: FakeN8n
) -> None:
    _, second = await two_turns(client, setup)
    await switch_webhook(session, setup, fake.url + ECHO + "?scenario=status&status=500")
    response = await post(client, setup, {"regenerate_of": second["done"]["id"]})
    events = data_events(parse_sse(response.text))
    assert events[-1].type == "error"
    body = await chat(client, setup)
    failed = body["messages"][-1]
    assert failed["status"] == "error"
    assert failed["sibling_ids"] == [second["done"]["id"], failed["id"]]
    assert body["current_message_id"] == failed["id"]
    # The chat works on: the next send goes under the failed answer, and regenerating it again works.
    await switch_webhook(session, setup, fake.url + ECHO)
    retry = await sent(client, setup, {"regenerate_of": failed["id"]})
    assert retry["done"]["sibling_ids"] == [second["done"]["id"], failed["id"], retry["done"]["id"]]


# --- the tree with the other second-wave features ---------------------------------------------------


async def test_regenerate_with_an_idempotency_key_is_answered_again_and_counts_once_against_the_quota(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup, fake: FakeN8n
) -> None:
    """A retried regenerate starts nothing (no third answer, no n8n call, no second quota count); the quota
    counts regenerates like sends; a retry past the quota is still answered (looked up before the 429)."""
    team = await session.get_one(Team, setup.user.team_id)
    team.settings = {**team.settings, "quota": {"messages_per_user_per_day": 2}}
    await session.commit()
    first = await sent(client, setup, {"content": "one"})
    body = {"regenerate_of": first["done"]["id"]}
    headers = {**setup.headers, "Idempotency-Key": "regen-1"}
    url = f"/api/chats/{setup.chat.id}/messages"
    original = await client.post(url, json=body, headers=headers)
    again = await client.post(url, json=body, headers=headers)
    refused = await post(client, setup, body)  # a third generation: past the quota of 2
    assert original.status_code == again.status_code == 200
    events, replayed = data_events(parse_sse(original.text)), data_events(parse_sse(again.text))
    assert [(e.id, e.data) for e in replayed] == [(e.id, e.data) for e in events]
    start = events[0].data["data"]  # type: ignore[index]
    assert start["user_message"] == first["user_message"]
    assert refused.status_code == 429
    assert len(fake.requests) == 2
    tree = await branch_of(session, setup.chat.id)
    assert [m["role"] for m in tree] == ["user", "assistant"]
    listed = await client.get(url, headers=setup.headers)
    assert [m["role"] for m in listed.json()] == ["user", "assistant", "assistant"]
    assert events[-1].data["data"]["message"]["sibling_ids"] == [  # type: ignore[index]
        first["done"]["id"],
        start["assistant_message_id"],
    ]
