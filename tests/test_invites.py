"""Invitations: admins create, list and revoke them; registering with one joins its team atomically.

Also the second wave's default: new teams are closed, so registering by team id needs an admin to open it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.models import Invite, Team, User
from app.services.invites import hash_invite_token, new_token
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import https_client, login
from tests.conftest import _plain_url, count_rows, make_settings, run_migrations
from tests.factories import auth_headers, create_admin, create_team, create_user
from tests.test_teams import NO_QUOTA

INVITES = "/api/teams/current/invites"
NOT_FOUND = {"detail": "Invite not found or no longer valid"}
PASSWORD = "long-enough-pw"


# Registration is rate limited; the limit itself is tested below with its own app.
pytestmark = pytest.mark.settings(RATE_LIMIT_ENABLED=False)


async def _team_and_admin(session: AsyncSession, **team: Any) -> tuple[Team, User]:
    created = await create_team(session, **team)
    return created, await create_admin(session, team=created)


async def _invite(web: httpx.AsyncClient, settings: Settings, admin: User, **body: Any) -> dict[str, Any]:
    response = await web.post(INVITES, json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _register(web: httpx.AsyncClient, token: str, email: str, **extra: Any) -> httpx.Response:
    body = {"invite_token": token, "email": email, "password": PASSWORD, **extra}
    return await web.post("/api/auth/register", json=body)


async def _row(session: AsyncSession, invite_id: str) -> Invite:
    query = select(Invite).where(Invite.id == uuid.UUID(invite_id)).execution_options(populate_existing=True)
    return (await session.execute(query)).scalar_one()


def _parse(stamp: str) -> datetime:
    assert stamp.endswith("Z"), stamp
    return datetime.fromisoformat(stamp)


# --- closed by default ---------------------------------------------------------------------------


async def test_new_team_is_closed_until_an_admin_opens_it(web: httpx.AsyncClient) -> None:
    signup = {"name": "Closed Co", "admin_email": "boss@closed.example.com", "admin_password": PASSWORD}
    created = await web.post("/api/teams", json=signup)
    assert created.status_code == 201
    assert created.json()["team"]["settings"] == {"open_registration": False, "quota": NO_QUOTA}
    team_id = created.json()["team"]["id"]
    body = {"team_id": team_id, "email": "walk-in@example.com", "password": PASSWORD}
    closed = await web.post("/api/auth/register", json=body)
    assert closed.status_code == 403
    assert closed.json() == {"detail": "Registration is closed for this team"}

    token = (await login(web, "boss@closed.example.com", PASSWORD)).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    opened = await web.put("/api/teams/current", json={"settings": {"open_registration": True}}, headers=headers)
    assert opened.json()["settings"] == {"open_registration": True, "quota": NO_QUOTA}
    joined = await web.post("/api/auth/register", json=body)
    assert joined.status_code == 201, joined.text
    assert joined.json()["role"] == "user"
    assert joined.json()["team_id"] == team_id


async def test_team_without_the_setting_stored_is_closed(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """A row whose settings lack the key reads as closed, and registration agrees with what GET shows."""
    team, admin = await _team_and_admin(session, settings={})
    shown = await web.get("/api/teams/current", headers=auth_headers(settings, admin))
    assert shown.json()["settings"] == {"open_registration": False, "quota": NO_QUOTA}
    body = {"team_id": str(team.id), "email": "walk-in@example.com", "password": PASSWORD}
    assert (await web.post("/api/auth/register", json=body)).status_code == 403


async def test_existing_open_team_stays_open(web: httpx.AsyncClient, session: AsyncSession) -> None:
    """Teams keep the value they have stored: only the default for new teams changed."""
    team = await create_team(session, settings={"open_registration": True})
    body = {"team_id": str(team.id), "email": "walk-in@example.com", "password": PASSWORD}
    assert (await web.post("/api/auth/register", json=body)).status_code == 201


# --- create, list, revoke ------------------------------------------------------------------------


async def test_create_invite_returns_token_once_and_stores_only_its_hash(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team, admin = await _team_and_admin(session)
    before = utcnow()
    response = await web.post(
        INVITES,
        json={"email": " Grace@Example.COM ", "role": "admin", "expires_in_days": 3, "max_uses": 5},
        headers=auth_headers(settings, admin),
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert {"id", "token", "email", "role", "expires_at", "max_uses", "uses", "created_at"} <= set(body)
    assert body["email"] == "grace@example.com"
    assert (body["role"], body["max_uses"], body["uses"], body["status"]) == ("admin", 5, 0, "active")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", body["token"])  # token_urlsafe(32): 256 bits
    expires = _parse(body["expires_at"])
    assert before + timedelta(days=3) <= expires <= utcnow() + timedelta(days=3)

    row = await _row(session, body["id"])
    assert row.team_id == team.id
    assert row.created_by == admin.id
    assert row.token_hash == hashlib.sha256(body["token"].encode()).hexdigest()
    stored = [str(getattr(row, column.key)) for column in Invite.__table__.columns]
    assert all(body["token"] not in value for value in stored)


async def test_create_invite_defaults(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    _, admin = await _team_and_admin(session)
    body = await _invite(web, settings, admin)
    assert (body["email"], body["role"], body["max_uses"], body["uses"]) == (None, "user", 1, 0)
    days = (_parse(body["expires_at"]) - _parse(body["created_at"])).total_seconds() / 86400
    assert 6.99 < days <= 7


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expires_in_days": 0}, "expires_in_days"),
        ({"expires_in_days": 31}, "expires_in_days"),
        ({"expires_in_days": "7"}, "expires_in_days"),
        ({"max_uses": 0}, "max_uses"),
        ({"max_uses": 1001}, "max_uses"),
        ({"role": "owner"}, "role"),
        ({"email": "not-an-email"}, "email"),
        ({"token": "chosen-by-me"}, "token"),
        ({"team_id": str(uuid.uuid4())}, "team_id"),
    ],
)
async def test_create_invite_bad_input_is_422_and_creates_nothing(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, body: dict[str, Any], field: str
) -> None:
    _, admin = await _team_and_admin(session)
    response = await web.post(INVITES, json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == field
    assert await count_rows(session, "invites") == 0


async def test_list_shows_the_teams_invites_never_tokens(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, admin = await _team_and_admin(session)
    _, other_admin = await _team_and_admin(session)
    first = await _invite(web, settings, admin, email="a@example.com")
    second = await _invite(web, settings, admin, max_uses=3)
    theirs = await _invite(web, settings, other_admin)
    response = await web.get(INVITES, headers=auth_headers(settings, admin))
    assert response.status_code == 200
    listed = response.json()
    assert [item["id"] for item in listed] == [second["id"], first["id"]]  # newest first
    assert all("token" not in item and "token_hash" not in item for item in listed)
    for token in (first["token"], second["token"], theirs["token"]):
        assert token not in response.text
        assert hashlib.sha256(token.encode()).hexdigest() not in response.text
    assert listed[1]["email"] == "a@example.com"
    assert {item["status"] for item in listed} == {"active"}
    assert listed[0]["revoked_at"] is None


async def _invites_of(session: AsyncSession, team: Team, count: int) -> list[str]:
    """`count` invites of the team, every one with the same `created_at`, so only the tie-breaker orders
    them; ids in the list's order (newest first, then by id)."""
    session.add_all(
        Invite(
            team_id=team.id,
            token_hash=hash_invite_token(new_token()),
            role="user",
            expires_at=utcnow() + timedelta(days=7),
            max_uses=1,
            uses=0,
        )
        for _ in range(count)
    )
    await session.commit()
    await session.execute(update(Invite).where(Invite.team_id == team.id).values(created_at=utcnow()))
    await session.commit()
    ids = (await session.execute(select(Invite.id).where(Invite.team_id == team.id).order_by(Invite.id))).scalars()
    return [str(i) for i in ids]


async def test_list_without_limit_is_complete_with_its_total(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Existing clients (the web client's admin page) send no parameters and expect every invite: no default
    page size applies (here over the 100 a page may hold)."""
    team, admin = await _team_and_admin(session)
    ids = await _invites_of(session, team, 110)
    await _invite(web, settings, (await _team_and_admin(session))[1])  # another team's: neither listed nor counted
    response = await web.get(INVITES, headers=auth_headers(settings, admin))
    assert response.status_code == 200
    assert [i["id"] for i in response.json()] == ids
    assert response.headers["X-Total-Count"] == "110"


async def test_list_pages_in_a_stable_order(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    """Pages of equal `created_at` rows never repeat or skip one: the id breaks ties."""
    team, admin = await _team_and_admin(session)
    ids = await _invites_of(session, team, 8)
    newest = await _invite(web, settings, admin)
    ids.insert(0, newest["id"])
    headers = auth_headers(settings, admin)
    paged: list[str] = []
    for offset in range(0, 9, 2):
        page = await web.get(INVITES, params={"limit": 2, "offset": offset}, headers=headers)
        assert page.status_code == 200, page.text
        assert page.headers["X-Total-Count"] == "9"
        paged += [i["id"] for i in page.json()]
    assert paged == ids
    rest = await web.get(INVITES, params={"offset": 7}, headers=headers)  # `offset` alone: the rest
    assert [i["id"] for i in rest.json()] == ids[7:]
    beyond = await web.get(INVITES, params={"limit": 100, "offset": 9}, headers=headers)
    assert (beyond.json(), beyond.headers["X-Total-Count"]) == ([], "9")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": 1_000_001}, "offset"),
        ({"offset": "x"}, "offset"),
    ],
)
async def test_list_bad_paging_is_422(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, params: dict[str, Any], field: str
) -> None:
    _, admin = await _team_and_admin(session)
    response = await web.get(INVITES, params=params, headers=auth_headers(settings, admin))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", field]
    assert set(error) == {"type", "loc", "msg"}


async def test_revoke_stops_the_token_at_once(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, max_uses=5)
    assert (await web.get(f"/api/invites/{invite['token']}")).status_code == 200
    headers = auth_headers(settings, admin)
    revoked = await web.delete(f"{INVITES}/{invite['id']}", headers=headers)
    assert revoked.status_code == 204
    assert revoked.content == b""
    assert "content-type" not in revoked.headers
    assert (await web.get(f"/api/invites/{invite['token']}")).json() == NOT_FOUND
    register = await _register(web, invite["token"], "late@example.com")
    assert register.status_code == 404
    assert register.json() == NOT_FOUND
    listed = (await web.get(INVITES, headers=headers)).json()
    assert listed[0]["status"] == "revoked"
    first_revoked_at = listed[0]["revoked_at"]
    assert first_revoked_at is not None
    # Revoking again is harmless and keeps the first instant.
    assert (await web.delete(f"{INVITES}/{invite['id']}", headers=headers)).status_code == 204
    assert (await web.get(INVITES, headers=headers)).json()[0]["revoked_at"] == first_revoked_at
    assert await count_rows(session, "users") == 1


async def test_other_teams_invite_id_is_404_and_keeps_working(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, admin = await _team_and_admin(session)
    _, intruder = await _team_and_admin(session)
    invite = await _invite(web, settings, admin)
    response = await web.delete(f"{INVITES}/{invite['id']}", headers=auth_headers(settings, intruder))
    assert response.status_code == 404
    assert response.json() == {"detail": "Invite not found"}
    unknown = await web.delete(f"{INVITES}/{uuid.uuid4()}", headers=auth_headers(settings, admin))
    assert unknown.json() == response.json()
    assert (await _row(session, invite["id"])).revoked_at is None
    assert (await _register(web, invite["token"], "still@example.com")).status_code == 201


async def test_invites_are_for_admins_only(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team, admin = await _team_and_admin(session)
    member = await create_user(session, team=team)
    invite = await _invite(web, settings, admin)
    headers = auth_headers(settings, member)
    for response in (
        await web.post(INVITES, json={"role": "admin"}, headers=headers),
        await web.get(INVITES, headers=headers),
        await web.delete(f"{INVITES}/{invite['id']}", headers=headers),
    ):
        assert response.status_code == 403
        assert invite["token"] not in response.text
    assert (await web.post(INVITES, json={})).status_code == 401
    assert (await web.get(INVITES)).status_code == 401
    assert (await web.delete(f"{INVITES}/{invite['id']}")).status_code == 401
    assert await count_rows(session, "invites") == 1
    assert (await _row(session, invite["id"])).revoked_at is None


# --- registering with an invite ------------------------------------------------------------------


@pytest.mark.parametrize("change", [{"is_active": False}, {"role": "user"}])
async def test_an_admin_deactivated_or_demoted_takes_their_invites_along(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, change: dict[str, Any]
) -> None:
    """A removed admin's invite for an admin would bring them (or anyone holding it) back as admin until it
    expired. Deactivating or demoting an admin revokes the invites they made; other admins' invites stay."""
    team, admin = await _team_and_admin(session)
    rogue = await create_admin(session, team=team)
    theirs = await _invite(web, settings, rogue, role="admin", max_uses=1000, expires_in_days=30)
    ours = await _invite(web, settings, admin, role="user")
    changed = await web.patch(f"/api/users/{rogue.id}", json=change, headers=auth_headers(settings, admin))
    assert changed.status_code == 200, changed.text
    back = await _register(web, theirs["token"], "back@example.com")
    assert (back.status_code, back.json()) == (404, NOT_FOUND)
    assert (await _row(session, theirs["id"])).revoked_at is not None
    assert (await _row(session, ours["id"])).revoked_at is None
    assert (await _register(web, ours["token"], "welcome@example.com")).status_code == 201
    assert await count_rows(session, "users") == 3


async def test_an_invite_made_while_its_admin_is_being_removed_is_refused(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """The admin's request passed its role check before the demotion committed, and its invite was inserted
    after the demotion's revocation ran: it stayed usable. The invite now waits for the team's row (the
    demotion holds it) and checks the role again: 403, nothing stored."""
    team, admin = await _team_and_admin(session)
    rogue = await create_admin(session, team=team)
    demotion = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        async with demotion.transaction():  # as app.services.users.update_user runs it
            await demotion.execute("SELECT id FROM teams WHERE id = $1 FOR UPDATE", team.id)
            await demotion.execute("UPDATE users SET role = 'user' WHERE id = $1", rogue.id)
            await demotion.execute(
                "UPDATE invites SET revoked_at = now() WHERE created_by = $1 AND revoked_at IS NULL", rogue.id
            )
            creating = asyncio.create_task(
                web.post(INVITES, json={"role": "admin"}, headers=auth_headers(settings, rogue))
            )
            await asyncio.wait({creating}, timeout=1.0)  # it answered at once before: 201
        created = await creating
    finally:
        await demotion.close()
    assert (created.status_code, created.json()) == (403, {"detail": "Admin role required"})
    usable = select(Invite).where(Invite.created_by == rogue.id, Invite.revoked_at.is_(None))
    assert (await session.execute(usable)).scalars().all() == []
    assert (await web.post(INVITES, json={}, headers=auth_headers(settings, admin))).status_code == 201


async def test_register_with_invite_joins_its_team_with_its_role(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team, admin = await _team_and_admin(session)
    assert team.settings == {"open_registration": False}
    invite = await _invite(web, settings, admin, role="admin")
    response = await _register(web, invite["token"], " New@Example.com ", full_name="New Admin")
    assert response.status_code == 201, response.text
    user = response.json()
    assert (user["team_id"], user["role"], user["email"]) == (str(team.id), "admin", "new@example.com")
    assert user["full_name"] == "New Admin"
    assert "token" not in user
    assert (await _row(session, invite["id"])).uses == 1
    assert (await login(web, "new@example.com", PASSWORD, team_id=team.id)).status_code == 200
    # Single use: the same token again is the same 404 as an unknown one.
    again = await _register(web, invite["token"], "second@example.com")
    assert again.status_code == 404
    assert again.json() == NOT_FOUND
    listed = (await web.get(INVITES, headers=auth_headers(settings, admin))).json()
    assert (listed[0]["uses"], listed[0]["status"]) == (1, "used_up")


async def test_register_with_user_invite_gets_role_user(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, max_uses=2)
    response = await _register(web, invite["token"], "plain@example.com")
    assert response.json()["role"] == "user"


async def test_email_bound_invite_compares_emails_case_insensitively(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, email="Grace@Example.com")
    response = await _register(web, invite["token"], "GRACE@example.COM")
    assert response.status_code == 201, response.text
    assert response.json()["email"] == "grace@example.com"


async def test_email_bound_invite_accepts_its_domain_in_either_spelling(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """`a@bücher.de` and `a@xn--bcher-kva.de` are one mailbox: an invite bound to one spelling refused the
    other. Bound emails are stored with the domain in Unicode; one stored in ASCII before (set directly here)
    accepts the Unicode spelling too."""
    team, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, email="A@XN--BCHER-KVA.de")
    assert invite["email"] == "a@b\u00fccher.de"
    response = await _register(web, invite["token"], "a@xn--bcher-kva.de")
    assert response.status_code == 201, response.text
    assert response.json()["email"] == "a@b\u00fccher.de"
    legacy = await _invite(web, settings, admin, email="b@b\u00fccher.de")
    await session.execute(update(Invite).where(Invite.id == uuid.UUID(legacy["id"])).values(email="b@xn--bcher-kva.de"))
    await session.commit()
    response = await _register(web, legacy["token"], "B@B\u00fcCHER.de")
    assert response.status_code == 201, response.text
    assert response.json()["email"] == "b@b\u00fccher.de"
    # A member stored in ASCII before the folding (inserted directly) is taken in either spelling.
    await create_user(session, team=team, email="c@xn--bcher-kva.de")
    made = await web.post(INVITES, json={"email": "c@b\u00fccher.de"}, headers=auth_headers(settings, admin))
    assert made.status_code == 409
    open_invite = await _invite(web, settings, admin)
    assert (await _register(web, open_invite["token"], "c@b\u00fccher.de")).status_code == 409
    assert (await _row(session, open_invite["id"])).uses == 0


async def _make_invalid(
    case: str, web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> tuple[str, str]:
    """A token that must be refused in the given way, and the id of its invite (or "" when there is none)."""
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, email="bound@example.com" if case == "wrong_email" else None)
    if case == "unknown":
        token = invite["token"]
        return ("y" if token[0] == "x" else "x") + token[1:], ""  # one character changed, never the same token
    if case == "used_up":
        assert (await _register(web, invite["token"], "first@example.com")).status_code == 201
    elif case == "expired":
        await session.execute(
            update(Invite)
            .where(Invite.id == uuid.UUID(invite["id"]))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    elif case == "revoked":
        response = await web.delete(f"{INVITES}/{invite['id']}", headers=auth_headers(settings, admin))
        assert response.status_code == 204
    return invite["token"], invite["id"]


@pytest.mark.parametrize("case", ["unknown", "used_up", "expired", "revoked", "wrong_email"])
async def test_every_refused_token_is_the_same_404_and_uses_nothing(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, case: str
) -> None:
    token, invite_id = await _make_invalid(case, web, session, settings)
    uses_before = (await _row(session, invite_id)).uses if invite_id else None
    users_before = await count_rows(session, "users")
    response = await _register(web, token, "someone@example.com")
    assert response.status_code == 404
    assert response.json() == NOT_FOUND
    assert await count_rows(session, "users") == users_before
    if invite_id:
        assert (await _row(session, invite_id)).uses == uses_before
    if case != "wrong_email":
        preview = await web.get(f"/api/invites/{token}")
        assert preview.status_code == 404
        assert preview.json() == NOT_FOUND


async def test_wrong_email_leaves_the_invite_for_its_owner(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, email="owner@example.com")
    assert (await _register(web, invite["token"], "thief@example.com")).status_code == 404
    assert (await _row(session, invite["id"])).uses == 0
    assert (await _register(web, invite["token"], "owner@example.com")).status_code == 201


async def test_taken_email_is_409_and_does_not_use_the_invite(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team, admin = await _team_and_admin(session)
    await create_user(session, team=team, email="taken@example.com")
    invite = await _invite(web, settings, admin)
    response = await _register(web, invite["token"], "TAKEN@example.com")
    assert response.status_code == 409
    assert response.json() == {"detail": "This email is already registered in this team"}
    assert (await _row(session, invite["id"])).uses == 0
    assert (await _register(web, invite["token"], "free@example.com")).status_code == 201


async def test_an_invite_for_a_members_email_is_refused_when_made(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """An invite bound to the email of someone already in the team (active or not) could never be used: every
    registration with it is a 409. It was made (201) and the admin learnt nothing until the invitee wrote back."""
    team, admin = await _team_and_admin(session)
    await create_user(session, team=team, email="member@example.com")
    await create_user(session, team=team, email="gone@example.com", is_active=False)
    other_team, _ = await _team_and_admin(session)
    await create_user(session, team=other_team, email="elsewhere@example.com")
    for email in (" MEMBER@example.com", "gone@example.com"):
        response = await web.post(INVITES, json={"email": email}, headers=auth_headers(settings, admin))
        assert response.status_code == 409, email
        assert response.json() == {"detail": "This email is already registered in this team"}
    assert await count_rows(session, "invites") == 0
    # Another team's member may be invited: emails are unique per team.
    invite = await _invite(web, settings, admin, email="elsewhere@example.com")
    assert (await _register(web, invite["token"], "elsewhere@example.com")).status_code == 201


async def test_racing_duplicate_email_gives_the_use_back(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Two registrations of one email race past the pre-check: one joins, the other is a 409 that uses nothing."""
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, max_uses=5)
    responses = await asyncio.gather(*(_register(web, invite["token"], "twin@example.com") for _ in range(4)))
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409]
    assert (await _row(session, invite["id"])).uses == 1


async def test_concurrent_registrations_never_exceed_max_uses(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, max_uses=2)
    responses = await asyncio.gather(*(_register(web, invite["token"], f"racer{i}@example.com") for i in range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [201, 201, 404, 404, 404, 404], [r.text for r in responses]
    assert all(r.json() == NOT_FOUND for r in responses if r.status_code == 404)
    assert (await _row(session, invite["id"])).uses == 2
    members = await session.execute(select(User.id).where(User.team_id == team.id))
    assert len(members.all()) == 3  # the admin and two racers


@pytest.mark.parametrize(
    "body",
    [
        {"email": "a@example.com", "password": PASSWORD},
        {"team_id": "TEAM", "invite_token": "TOKEN", "email": "a@example.com", "password": PASSWORD},
        {"team_id": None, "invite_token": None, "email": "a@example.com", "password": PASSWORD},
        {"invite_token": "", "email": "a@example.com", "password": PASSWORD},
        {"invite_token": "t" * 129, "email": "a@example.com", "password": PASSWORD},
        {"invite_token": "TOKEN", "email": "a@example.com", "password": PASSWORD, "role": "admin"},
    ],
)
async def test_register_needs_exactly_one_of_team_id_and_invite_token(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, body: dict[str, Any]
) -> None:
    team, admin = await _team_and_admin(session, settings={"open_registration": True})
    invite = await _invite(web, settings, admin, max_uses=5)
    filled = {
        key: (str(team.id) if value == "TEAM" else invite["token"] if value == "TOKEN" else value)
        for key, value in body.items()
    }
    response = await web.post("/api/auth/register", json=filled)
    assert response.status_code == 422
    assert invite["token"] not in response.text
    assert await count_rows(session, "users") == 1
    assert (await _row(session, invite["id"])).uses == 0


# --- preview -------------------------------------------------------------------------------------


async def test_preview_shows_what_the_invite_joins(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    _, admin = await _team_and_admin(session, name="Acme Support")
    invite = await _invite(web, settings, admin, email="grace@example.com", role="admin")
    response = await web.get(f"/api/invites/{invite['token']}")
    assert response.status_code == 200
    assert response.json() == {
        "team_name": "Acme Support",
        "email": "grace@example.com",
        "role": "admin",
        "expires_at": invite["expires_at"],
    }
    assert (await _row(session, invite["id"])).uses == 0  # looking does not use it
    too_long = await web.get(f"/api/invites/{'t' * 500}")
    assert too_long.status_code == 404
    assert too_long.json() == NOT_FOUND


async def test_answers_to_a_url_holding_a_token_are_never_cached(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """The preview's URL holds the token: a stored answer kept it (and the bound email) in the browser's cache
    after the web client had taken it out of the tab's history, and let a proxy show a revoked invite."""
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, email="cached@example.com")
    shown = await web.get(f"/api/invites/{invite['token']}")
    assert shown.status_code == 200
    unknown = await web.get("/api/invites/no-such-token")
    assert unknown.status_code == 404
    # Every path that carries a secret, errors included (a signed file link, a callback link).
    for path in ("/api/files/signed/x/y/z", "/api/callbacks/x/y"):
        answer = await web.get(path)
        assert answer.status_code in (404, 405), path
        assert answer.headers["cache-control"] == "no-store", path
    for answer in (shown, unknown):
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["pragma"] == "no-cache"
    # Other API answers say no-store too (test_middleware), without the Pragma of the secret-holding paths.
    team = await web.get("/api/teams/current", headers=auth_headers(settings, admin))
    assert (team.headers["cache-control"], "pragma" in team.headers) == ("no-store", False)


@pytest.mark.usefixtures("app")  # its teardown truncates what this test's own app wrote
async def test_preview_is_rate_limited_per_client_ip(database_url: str, tmp_path: Path) -> None:
    app = create_app(make_settings(database_url, tmp_path, RATE_LIMIT_REGISTER="2/minute"))
    try:
        async with https_client(app, client=("203.0.113.7", 1234)) as c:
            codes = [(await c.get(f"/api/invites/guess-{i}")).status_code for i in range(3)]
            assert codes == [404, 404, 429]
            limited = await c.get("/api/invites/guess-again")
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
        async with https_client(app, client=("203.0.113.8", 1234)) as other:
            assert (await other.get("/api/invites/guess")).status_code == 404
    finally:
        await shutdown(app)


async def test_token_never_reaches_the_logs(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin)
    assert (await web.get(f"/api/invites/{invite['token']}")).status_code == 200
    assert (await _register(web, invite["token"], "logged@example.com")).status_code == 201
    assert (await web.get(f"/api/invites/{invite['token']}")).status_code == 404
    # Every server-side record (httpx's own records are the test client's, not the server's).
    messages = [record.getMessage() for record in caplog.records if not record.name.startswith("httpx")]
    assert any("/api/invites/***" in message for message in messages if "GET" in message)
    assert [m for m in messages if invite["token"] in m] == []


# --- OpenAPI and SQLite --------------------------------------------------------------------------


async def test_openapi_documents_the_invite_routes_and_their_errors(web: httpx.AsyncClient) -> None:
    paths = (await web.get("/openapi.json")).json()["paths"]
    assert {"201", "401", "403", "422"} <= set(paths[INVITES]["post"]["responses"])
    assert {"200", "401", "403", "422"} <= set(paths[INVITES]["get"]["responses"])
    assert "X-Total-Count" in paths[INVITES]["get"]["responses"]["200"]["headers"]
    params = {p["name"]: p for p in paths[INVITES]["get"]["parameters"]}
    assert (params["limit"]["required"], params["offset"]["required"]) == (False, False)
    assert "every invite" in params["limit"]["description"]
    assert {"204", "401", "403", "404", "422"} <= set(paths[f"{INVITES}/{{invite_id}}"]["delete"]["responses"])
    assert {"200", "404", "429"} <= set(paths["/api/invites/{token}"]["get"]["responses"])
    register = paths["/api/auth/register"]["post"]["responses"]
    assert {"201", "403", "404", "409", "422", "429"} <= set(register)
    examples = register["404"]["content"]["application/json"]["examples"]
    assert examples["invite"]["value"] == NOT_FOUND


async def test_invites_work_on_sqlite(tmp_path: Path) -> None:
    """The embedded default: the conditional UPDATE ... RETURNING spends uses there too."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'invites.db'}"
    await asyncio.to_thread(run_migrations, url)
    settings = make_settings(url, tmp_path, RATE_LIMIT_ENABLED=False)
    app = create_app(settings)
    try:
        async with app_state(app).db.sessionmaker() as session:
            team, admin = await _team_and_admin(session)
        async with https_client(app) as c:
            invite = await _invite(c, settings, admin, role="admin", max_uses=2, email="lite@example.com")
            assert (await c.get(f"/api/invites/{invite['token']}")).json()["team_name"] == team.name
            assert (await _register(c, invite["token"], "other@example.com")).status_code == 404
            joined = await _register(c, invite["token"], "LITE@example.com")
            assert joined.status_code == 201, joined.text
            assert (joined.json()["role"], joined.json()["team_id"]) == ("admin", str(team.id))
            assert (await _register(c, invite["token"], "lite@example.com")).status_code == 409
            expired_at = utcnow() - timedelta(seconds=1)
            async with app_state(app).db.sessionmaker() as session:
                assert (await _row(session, invite["id"])).uses == 1
                await session.execute(update(Invite).values(expires_at=expired_at))
                await session.commit()
            assert (await c.get(f"/api/invites/{invite['token']}")).status_code == 404
    finally:
        await shutdown(app)


async def test_an_email_bound_invite_with_several_uses_is_accepted_and_used_once(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """The contract lets `max_uses` be 1-1000 with or without an `email`: such an invite is made, and its one
    address registers once (a second registration is the 409 of an email taken; the invite is not used again)."""
    _, admin = await _team_and_admin(session)
    invite = await _invite(web, settings, admin, email="once@example.com", max_uses=3)
    assert (invite["email"], invite["max_uses"]) == ("once@example.com", 3)
    assert (await _register(web, invite["token"], "once@example.com")).status_code == 201
    again = await _register(web, invite["token"], "Once@Example.com")
    assert again.status_code == 409, again.text
    row = await _row(session, invite["id"])
    assert row.uses == 1
