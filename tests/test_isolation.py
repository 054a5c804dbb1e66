"""Tenant isolation, route by route: every route whose path names a resource answers another team's id (and, for
a member's own chats, another member's) exactly as it answers an id that does not exist, a 404, and changes
nothing. A new route with a path parameter fails `test_every_route_with_a_path_parameter_is_covered` until it is
added to ROUTES (or to EXCLUDED, with the reason and the test that covers it instead)."""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from PIL import Image
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Base, File, Message
from app.services.agents import AGENT_NOT_FOUND
from app.services.api_keys import API_KEY_NOT_FOUND
from app.services.chats import CHAT_NOT_FOUND
from app.services.files import FILE_NOT_FOUND
from app.services.invites import INVITE_ID_NOT_FOUND
from app.services.shares import SHARE_NOT_FOUND
from app.services.tree import MESSAGE_NOT_FOUND
from app.services.users import USER_NOT_FOUND
from tests.authhelpers import bearer
from tests.conftest import ROOT
from tests.factories import auth_headers, create_admin, create_agent, create_chat, create_team, create_user

#: Who may call a route, as the API reference's "who" column says; it decides who else must get the 404:
#: `admin` (another team's admin), `member` (also another team's API key), `session` (also a colleague: an API
#: key is its creator's, or any of the team's for an admin), `owner` (a member's own chat and what is in it:
#: also a colleague, and the team's own admin).
Who = Literal["admin", "member", "session", "owner"]


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, "PNG")
    return out.getvalue()


PNG = _png()
TEXT = b"meeting notes"


@dataclass(frozen=True)
class Probe:
    """How a route is called: the Tenant fields its path parameters name (in order), who may call it, and a
    plausible valid request (JSON, or a multipart `file`); `also` are more bodies, each tried as well. `busy`:
    also on a chat whose answer is still streaming, where the owner gets a 409 that no one else may see."""

    ids: tuple[str, ...]
    who: Who
    json: dict[str, Any] | None = None
    upload: tuple[str, bytes, str] | None = None
    also: tuple[dict[str, Any], ...] = ()
    busy: bool = False


#: The Tenant fields a `busy` probe names instead.
BUSY = {"chat": "busy", "answer": "busy_answer"}


CHAT = ("chat",)
AGENT = ("agent",)
SHARE = ("share",)
WIDGET_SEND = {"action": "sendMessage", "sessionId": "widget-1", "chatInput": "Hello"}
WIDGET_LOAD = {"action": "loadPreviousSession", "sessionId": "widget-1"}

#: Every route with a path parameter that names a resource, and how to call it.
ROUTES: dict[tuple[str, str], Probe] = {
    # A member's chats, and what is in them: the owner's alone.
    ("GET", "/api/chats/{chat_id}"): Probe(CHAT, "owner"),
    ("PUT", "/api/chats/{chat_id}"): Probe(CHAT, "owner", {"title": "Taken", "archived": True, "pinned": True}),
    ("DELETE", "/api/chats/{chat_id}"): Probe(CHAT, "owner"),
    ("GET", "/api/chats/{chat_id}/export"): Probe(CHAT, "owner"),
    ("POST", "/api/chats/{chat_id}/share"): Probe(CHAT, "owner", busy=True),
    ("DELETE", "/api/chats/{chat_id}/share"): Probe(CHAT, "owner"),
    ("POST", "/api/chats/{chat_id}/messages"): Probe(CHAT, "owner", {"content": "Hello"}, busy=True),
    ("GET", "/api/chats/{chat_id}/messages"): Probe(CHAT, "owner"),
    ("PUT", "/api/chats/{chat_id}/messages/{message_id}/feedback"): Probe(
        ("chat", "answer"), "owner", {"rating": -1, "comment": "wrong"}, busy=True
    ),
    ("POST", "/api/chats/{chat_id}/stop"): Probe(CHAT, "owner"),
    ("GET", "/api/chats/{chat_id}/stream"): Probe(CHAT, "owner"),
    ("POST", "/api/chats/{chat_id}/files"): Probe(CHAT, "owner", upload=("more.txt", TEXT, "text/plain")),
    ("GET", "/api/chats/{chat_id}/files/{file_id}"): Probe(("chat", "file"), "owner"),
    ("DELETE", "/api/chats/{chat_id}/files/{file_id}"): Probe(("chat", "upload"), "owner"),
    # The team's agents: members read and chat, admins write.
    ("GET", "/api/agents/{agent_id}"): Probe(AGENT, "member"),
    ("PUT", "/api/agents/{agent_id}"): Probe(AGENT, "admin", {"name": "Taken", "is_active": False}),
    ("DELETE", "/api/agents/{agent_id}"): Probe(AGENT, "admin"),
    ("POST", "/api/agents/{agent_id}/test"): Probe(AGENT, "admin"),
    ("GET", "/api/agents/{agent_id}/avatar"): Probe(AGENT, "member"),
    ("POST", "/api/agents/{agent_id}/avatar"): Probe(AGENT, "admin", upload=("a.png", PNG, "image/png")),
    ("DELETE", "/api/agents/{agent_id}/avatar"): Probe(AGENT, "admin"),
    ("POST", "/api/agents/{agent_id}/n8n-chat"): Probe(AGENT, "member", WIDGET_SEND, also=(WIDGET_LOAD,)),
    ("GET", "/v1/models/{model}"): Probe(("model",), "member"),
    # The team's shares: every member reads and forks them.
    ("GET", "/api/shares/{share_id}"): Probe(SHARE, "member"),
    ("GET", "/api/shares/{share_id}/files/{file_id}"): Probe(("share", "share_file"), "member"),
    ("DELETE", "/api/shares/{share_id}"): Probe(SHARE, "member"),
    ("POST", "/api/shares/{share_id}/fork"): Probe(SHARE, "member"),
    # The team itself: invites and users (admins), API keys (their creator, or an admin).
    ("DELETE", "/api/teams/current/invites/{invite_id}"): Probe(("invite",), "admin"),
    ("PATCH", "/api/users/{user_id}"): Probe(("user",), "admin", {"role": "admin", "is_active": False}),
    ("DELETE", "/api/api-keys/{key_id}"): Probe(("api_key",), "session"),
}

#: Routes with a path parameter that is no team's resource id, so no caller of another team is involved: why,
#: and the test that checks their own 404s instead.
EXCLUDED: dict[tuple[str, str], tuple[str, str]] = {
    ("GET", "/api/invites/{token}"): (
        "public: the invite token is the credential (no login), refused tokens all get one 404",
        "tests/test_invites.py::test_every_refused_token_is_the_same_404_and_uses_nothing",
    ),
    ("POST", "/api/callbacks/{generation_id}/{signature}"): (
        "n8n's callback, authenticated by its signature for one generation alone (no login)",
        "tests/test_callbacks.py::test_signature_attacks_and_bad_bodies_are_refused_and_change_nothing",
    ),
    ("GET", "/api/files/signed/{generation_id}/{file_id}/{signature}"): (
        "the signed link n8n downloads a file through, the signature its only credential (no login)",
        "tests/test_files.py::test_url_delivery_sends_signed_links_that_only_open_their_file",
    ),
}

#: What a 404 of this API says: one message per kind of resource, the same for missing and for someone else's
#: (`/v1` answers in OpenAI's shape, whose code is `model_not_found`).
NOT_FOUND_DETAILS = {
    AGENT_NOT_FOUND,
    API_KEY_NOT_FOUND,
    CHAT_NOT_FOUND,
    FILE_NOT_FOUND,
    INVITE_ID_NOT_FOUND,
    MESSAGE_NOT_FOUND,
    SHARE_NOT_FOUND,
    USER_NOT_FOUND,
    "model_not_found",
}


@dataclass
class Tenant:
    """A team with one of every resource a route's path can name (ids as strings), and its callers' headers:
    `admin`, `owner` (the member whose chat it is) and `colleague` (another member)."""

    admin: dict[str, str]
    owner: dict[str, str]
    colleague: dict[str, str]
    key: dict[str, str]  # the admin's API key, which acts with the role `user`
    agent: str
    model: str
    chat: str
    answer: str
    busy: str  # another chat of the owner, its answer still streaming
    busy_answer: str
    file: str  # sent with the chat's question
    upload: str  # uploaded, not sent yet
    share: str
    share_file: str
    invite: str
    api_key: str
    user: str  # the owner


async def _created(request: Awaitable[httpx.Response]) -> dict[str, Any]:
    answer = await request
    assert answer.status_code in (200, 201), answer.text
    body: dict[str, Any] = answer.json()
    return body


async def make_tenant(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> Tenant:
    """Rows from the factories; what has its own rules (files, the share, invite, key, avatar) through the API."""
    team = await create_team(session)
    admin, owner, colleague = (
        await create_admin(session, team=team),
        await create_user(session, team=team),
        await create_user(session, team=team),
    )
    agent = await create_agent(session, team=team, slug=f"agent-{uuid.uuid4().hex[:12]}")
    question, answer = uuid.uuid4(), uuid.uuid4()
    branch = [{"id": question, "content": "Hi"}, {"id": answer, "role": "assistant", "content": "Hello"}]
    chat = await create_chat(session, user=owner, agent=agent, messages=branch)
    streaming = {"id": uuid.uuid4(), "role": "assistant", "status": "streaming", "_worker": uuid.uuid4()}
    busy = await create_chat(session, user=owner, agent=agent, messages=[{"content": "Hi"}, streaming])
    as_admin, as_owner = auth_headers(settings, admin), auth_headers(settings, owner)
    upload = f"/api/chats/{chat.id}/files"
    sent = await _created(client.post(upload, files={"file": ("a.txt", TEXT, "text/plain")}, headers=as_owner))
    unsent = await _created(client.post(upload, files={"file": ("b.txt", TEXT, "text/plain")}, headers=as_owner))
    # Sent with the question, as a send marks it (so the share below carries a copy of it).
    await session.execute(update(File).where(File.id == uuid.UUID(sent["id"])).values(message_id=question))
    await session.execute(update(Message).where(Message.id == question).values(files=[sent]))
    await session.commit()
    share = await _created(client.post(f"/api/chats/{chat.id}/share", headers=as_owner))
    invite = await _created(client.post("/api/teams/current/invites", json={}, headers=as_admin))
    key = await _created(client.post("/api/api-keys", json={"name": "ci"}, headers=as_admin))
    await _created(client.post(f"/api/agents/{agent.id}/avatar", files={"file": ("a.png", PNG)}, headers=as_admin))
    # A key's first use writes its `last_used_at` (then at most once a minute): here, not during a probe.
    await _created(client.get("/v1/models", headers=bearer(key["key"])))
    return Tenant(
        admin=as_admin,
        owner=as_owner,
        colleague=auth_headers(settings, colleague),
        key=bearer(key["key"]),
        agent=str(agent.id),
        model=agent.slug,
        chat=str(chat.id),
        answer=str(answer),
        busy=str(busy.id),
        busy_answer=str(streaming["id"]),
        file=sent["id"],
        upload=unsent["id"],
        share=share["id"],
        share_file=share["messages"][0]["files"][0]["id"],
        invite=invite["id"],
        api_key=key["id"],
        user=str(owner.id),
    )


#: Every row of every table, in one statement: what a refused request must leave exactly as it was.
SNAPSHOT = text(
    " UNION ALL ".join(
        f"SELECT '{table.name}' AS kind, to_jsonb(r)::text AS line FROM \"{table.name}\" r"
        for table in Base.metadata.sorted_tables
    )
    + " ORDER BY 1, 2"
)


async def snapshot(session: AsyncSession) -> list[tuple[str, str]]:
    rows = [(row.kind, row.line) for row in (await session.execute(SNAPSHOT)).all()]
    await session.commit()  # no transaction (and its locks) left open between requests
    return rows


def callers(probe: Probe, a: Tenant, b: Tenant) -> dict[str, dict[str, str]]:
    """Who must get the 404 for team A's resource: another team's admin always; more by `probe.who`."""
    found = {"another team's admin": b.admin}
    if probe.who in ("member", "owner"):
        found["another team's API key"] = b.key
    if probe.who in ("session", "owner"):
        found["a colleague in the team"] = a.colleague
    if probe.who == "owner":
        found["the team's own admin"] = a.admin
    return found


def not_found_detail(response: httpx.Response) -> Any:
    """The message of a 404: `detail`, or the code of OpenAI's `{"error": {...}}` shape (`/v1`)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return body.get("detail") if isinstance(body, dict) else None


async def call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    probe: Probe,
    body: dict[str, Any] | None,
    headers: dict[str, str],
) -> httpx.Response:
    files = {"file": probe.upload} if probe.upload else None
    return await client.request(method, path, json=body, files=files, headers=headers)


def fill(path: str, values: tuple[str, ...]) -> str:
    names = re.findall(r"\{[^}]+\}", path)
    assert len(names) == len(values), path
    for name, value in zip(names, values, strict=True):
        path = path.replace(name, value, 1)
    return path


@pytest.fixture
async def tenants(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> tuple[Tenant, Tenant]:
    """Team A, whose resources are probed, and team B, whose members probe them."""
    return await make_tenant(client, session, settings), await make_tenant(client, session, settings)


@pytest.mark.parametrize(("method", "path"), list(ROUTES), ids=[f"{m} {p}" for m, p in ROUTES])
async def test_another_teams_or_members_id_is_the_404_of_a_missing_one_and_changes_nothing(
    client: httpx.AsyncClient, session: AsyncSession, tenants: tuple[Tenant, Tenant], method: str, path: str
) -> None:
    """Each caller gets, for team A's id, exactly the answer a random id gets (a 404 with the generic message,
    the id put back), and every row of the database is as it was. For a route with two ids, a member of team B
    also names their own parent (chat, share) with team A's child (message, file). A `busy` probe runs again on a
    chat whose answer is streaming: the owner's 409 there must not show through to anyone else."""
    a, b = tenants
    probe = ROUTES[method, path]
    targets = {"": tuple(getattr(a, name) for name in probe.ids)}
    if probe.busy:
        targets[" (answer streaming)"] = tuple(getattr(a, BUSY[name]) for name in probe.ids)
    missing = tuple("no-such-agent" if name == "model" else str(uuid.uuid4()) for name in probe.ids)
    cases = [
        (who + state, headers, mine, missing)
        for state, mine in targets.items()
        for who, headers in callers(probe, a, b).items()
    ]
    if len(probe.ids) == 2:
        theirs = getattr(b, probe.ids[0])
        for state, mine in targets.items():
            who = "another team's member, in their own" + state
            cases.append((who, b.owner, (theirs, mine[1]), (theirs, missing[1])))
    failures = []
    for body in (probe.json, *probe.also):
        for who, headers, ids, random_ids in cases:
            before = await snapshot(session)
            answer = await call(client, method, fill(path, ids), probe, body, headers)
            changed = before != await snapshot(session)
            expected = await call(client, method, fill(path, random_ids), probe, body, headers)
            shown = answer.text.replace(ids[-1], "<id>")
            if (
                answer.status_code != 404
                or not_found_detail(answer) not in NOT_FOUND_DETAILS
                or shown != expected.text.replace(random_ids[-1], "<id>")
                or changed
            ):
                failures.append(f"{who}: {answer.status_code} {shown[:200]}{' (changed rows)' if changed else ''}")
    # Last (it may change what it names): the same request by the rightful caller reaches the resource, so the
    # 404s above were not those of a probe naming nothing.
    rightful = a.owner if probe.who == "owner" else a.admin
    for state, mine in targets.items():
        for body in (probe.json, *probe.also):
            answer = await call(client, method, fill(path, mine), probe, body, rightful)
            if answer.status_code in (404, 422):
                failures.append(f"the rightful caller{state}: {answer.status_code} {answer.text[:200]}")
    assert not failures, "\n".join(failures)


def routes_with_path_parameters(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route whose path has a parameter (a mount's without methods as `ANY`)."""
    return {
        (method, route.path)
        for route in iter_route_contexts(app.routes)
        if route.path and "{" in route.path
        for method in route.methods or ("ANY",)
    }


def test_every_route_with_a_path_parameter_is_covered(app: FastAPI) -> None:
    """A new route with a path parameter must be added to ROUTES (or EXCLUDED, with its reason) deliberately."""
    served = routes_with_path_parameters(app)
    uncovered = sorted(served - ROUTES.keys() - EXCLUDED.keys())
    assert not uncovered, f"add to ROUTES (or to EXCLUDED, with the reason and the test that covers it): {uncovered}"
    gone = sorted((ROUTES.keys() | EXCLUDED.keys()) - served)
    assert not gone, f"no longer served, remove from the table: {gone}"
    assert not ROUTES.keys() & EXCLUDED.keys()


@pytest.mark.parametrize(("reason", "test"), list(EXCLUDED.values()), ids=[f"{m} {p}" for m, p in EXCLUDED])
def test_each_excluded_route_names_the_test_that_covers_it(reason: str, test: str) -> None:
    assert reason
    file, name = test.split("::")
    assert re.search(rf"^(async )?def {name}\(", (ROOT / file).read_text(), re.MULTILINE), test
