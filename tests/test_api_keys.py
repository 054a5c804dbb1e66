"""API keys: shown once, stored as a keyed hash, role `user` whatever the owner's role, revocable at once,
optional expiry, `last_used_at` without a write per request, failed attempts rate limited, never logged."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import CurrentUser, act_as_key_user
from app.config import Settings
from app.db import utcnow
from app.deps import SessionDep
from app.models import ApiKey, User
from tests.authhelpers import bearer
from tests.conftest import count_rows
from tests.factories import auth_headers, create_admin, create_agent, create_chat, create_team, create_user

KEYS = "/api/api-keys"
INVALID = {"detail": "Could not validate credentials"}
KEY_403 = {"detail": "An API key cannot manage API keys; sign in"}


async def _create(web: httpx.AsyncClient, settings: Settings, user: User, **body: Any) -> dict[str, Any]:
    response = await web.post(KEYS, json={"name": "scripts", **body}, headers=auth_headers(settings, user))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _row(session: AsyncSession, key_id: str) -> ApiKey | None:
    query = select(ApiKey).where(ApiKey.id == uuid.UUID(key_id)).execution_options(populate_existing=True)
    return (await session.execute(query)).scalar_one_or_none()


async def test_created_key_is_shown_once_and_stored_as_a_keyed_hash(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    created = await _create(web, settings, user, expires_at="2099-01-01T00:00:00Z")
    key = created["key"]
    assert key.startswith("n8nr_")
    assert len(key) >= 40
    assert created["prefix"] == key[:13]
    assert created["expires_at"] == "2099-01-01T00:00:00Z"
    assert created["last_used_at"] is None
    row = await _row(session, created["id"])
    assert row is not None
    expected = hmac.new(settings.JWT_SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()
    assert row.key_hash == expected
    assert key not in row.key_hash
    listed = await web.get(KEYS, headers=auth_headers(settings, user))
    assert listed.status_code == 200
    assert listed.json() == [{k: v for k, v in created.items() if k != "key"}]
    assert key not in listed.text


async def test_create_answer_is_not_cached(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    user = await create_user(session)
    response = await web.post(KEYS, json={"name": "k"}, headers=auth_headers(settings, user))
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.settings(API_KEY_SECRET="another-secret-for-api-keys-" + "y" * 20)
async def test_api_key_secret_setting_keys_the_hash(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    created = await _create(web, settings, user)
    row = await _row(session, created["id"])
    assert row is not None
    secret = settings.API_KEY_SECRET.encode()
    assert row.key_hash == hmac.new(secret, created["key"].encode(), hashlib.sha256).hexdigest()
    assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "x" * 101},
        {"name": "k", "expires_at": "2099-01-01T00:00:00"},  # no time zone
        {"name": "k", "expires_at": "2001-01-01T00:00:00Z"},  # in the past
        {"name": "k", "expires_at": "soon"},
        {"name": "k", "expires_at": "9999-12-31T23:59:59-14:00"},  # year 10000 in UTC (was a 500)
        {"name": "k", "user_id": str(uuid.uuid4())},
    ],
)
async def test_bad_create_bodies_are_422_and_store_nothing(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, body: dict[str, Any]
) -> None:
    user = await create_user(session)
    response = await web.post(KEYS, json=body, headers=auth_headers(settings, user))
    assert response.status_code == 422, response.text
    assert await count_rows(session, "api_keys") == 0


async def test_key_acts_as_its_user_with_role_user_only(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await create_admin(session)
    key = (await _create(web, settings, admin))["key"]
    me = await web.get("/api/auth/me", headers=bearer(key))
    assert me.status_code == 200
    assert me.json()["id"] == str(admin.id)
    assert me.json()["role"] == "user"
    # Admin routes refuse the key; the same admin's session token still passes.
    assert (await web.get("/api/users", headers=bearer(key))).status_code == 403
    assert (await web.get("/api/users", headers=auth_headers(settings, admin))).status_code == 200
    # A write through the key changes what it asked for, never the stored role.
    patched = await web.patch("/api/auth/me", json={"full_name": "Via Key"}, headers=bearer(key))
    assert patched.status_code == 200, patched.text
    stored = (
        await session.execute(select(User).where(User.id == admin.id).execution_options(populate_existing=True))
    ).scalar_one()
    assert stored.role == "admin"
    assert stored.full_name == "Via Key"


async def test_key_reads_member_routes_of_its_own_team_only(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    user = await create_user(session, team=team)
    agent = await create_agent(session, team=team)
    other_team = await create_team(session)
    foreign_agent = await create_agent(session, team=other_team)
    key = (await _create(web, settings, user))["key"]
    agents = await web.get("/api/agents", headers=bearer(key))
    assert agents.status_code == 200
    assert [a["id"] for a in agents.json()] == [str(agent.id)]
    assert (await web.get(f"/api/agents/{foreign_agent.id}", headers=bearer(key))).status_code == 404


async def test_key_works_on_the_send_paths_caller_and_keeps_tenancy(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """`current_caller` (send, stop, follow) takes keys too: own chat answers, another user's is a 404."""
    team = await create_team(session)
    user, neighbour = await create_user(session, team=team), await create_user(session, team=team)
    agent = await create_agent(session, team=team)
    own = await create_chat(session, user=user, agent=agent)
    theirs = await create_chat(session, user=neighbour, agent=agent)
    key = (await _create(web, settings, user))["key"]
    assert (await web.post(f"/api/chats/{own.id}/stop", headers=bearer(key))).status_code == 409
    assert (await web.post(f"/api/chats/{theirs.id}/stop", headers=bearer(key))).status_code == 404


async def test_a_key_cannot_manage_keys(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    user = await create_user(session)
    created = await _create(web, settings, user)
    key = created["key"]
    assert (await web.post(KEYS, json={"name": "child"}, headers=bearer(key))).json() == KEY_403
    assert (await web.get(KEYS, headers=bearer(key))).status_code == 403
    assert (await web.delete(f"{KEYS}/{created['id']}", headers=bearer(key))).status_code == 403
    assert await count_rows(session, "api_keys") == 1


async def test_keys_are_read_only_from_the_bearer_header(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    key = (await _create(web, settings, user))["key"]
    as_cookie = await web.get("/api/auth/me", headers={"Cookie": f"access_token={key}"})
    assert as_cookie.status_code == 401
    assert (await web.get(f"/api/auth/me?access_token={key}")).status_code == 401


async def test_owner_revokes_and_the_key_stops_at_once(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    created = await _create(web, settings, user)
    assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).status_code == 200
    deleted = await web.delete(f"{KEYS}/{created['id']}", headers=auth_headers(settings, user))
    assert deleted.status_code == 204
    assert "content-type" not in deleted.headers
    after = await web.get("/api/auth/me", headers=bearer(created["key"]))
    assert after.status_code == 401
    assert after.json() == INVALID
    assert (await web.get(KEYS, headers=auth_headers(settings, user))).json() == []
    again = await web.delete(f"{KEYS}/{created['id']}", headers=auth_headers(settings, user))
    assert again.status_code == 404


async def test_revoking_other_peoples_keys(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    """A member cannot revoke a teammate's key (404); the team's admin can; another team's admin cannot."""
    team = await create_team(session)
    owner, teammate, admin = (
        await create_user(session, team=team),
        await create_user(session, team=team),
        await create_admin(session, team=team),
    )
    foreign_admin = await create_admin(session)
    created = await _create(web, settings, owner)
    path = f"{KEYS}/{created['id']}"
    assert (await web.delete(path, headers=auth_headers(settings, teammate))).status_code == 404
    assert (await web.delete(path, headers=auth_headers(settings, foreign_admin))).status_code == 404
    assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).status_code == 200
    assert (await web.delete(path, headers=auth_headers(settings, admin))).status_code == 204
    assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).status_code == 401
    assert (await web.delete(f"{KEYS}/not-a-uuid", headers=auth_headers(settings, admin))).status_code == 422


async def test_list_all_is_for_admins_and_stays_in_the_team(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    member, admin = await create_user(session, team=team), await create_admin(session, team=team)
    mine = await _create(web, settings, member)
    theirs = await _create(web, settings, admin)
    await _create(web, settings, await create_user(session))  # another team's
    member_all = await web.get(KEYS, params={"all": "true"}, headers=auth_headers(settings, member))
    assert member_all.status_code == 403
    assert [k["id"] for k in (await web.get(KEYS, headers=auth_headers(settings, member))).json()] == [mine["id"]]
    team_keys = await web.get(KEYS, params={"all": "true"}, headers=auth_headers(settings, admin))
    assert team_keys.status_code == 200
    assert {k["id"] for k in team_keys.json()} == {mine["id"], theirs["id"]}
    assert {k["user_id"] for k in team_keys.json()} == {str(member.id), str(admin.id)}


async def test_expired_key_is_refused(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    user = await create_user(session)
    created = await _create(web, settings, user, expires_at=(utcnow() + timedelta(hours=1)).isoformat())
    assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).status_code == 200
    past = utcnow() - timedelta(seconds=1)
    await session.execute(update(ApiKey).where(ApiKey.id == uuid.UUID(created["id"])).values(expires_at=past))
    await session.commit()
    assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).json() == INVALID


async def test_deactivating_the_user_stops_their_keys(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    user, admin = await create_user(session, team=team), await create_admin(session, team=team)
    key = (await _create(web, settings, user))["key"]
    assert (await web.get("/api/auth/me", headers=bearer(key))).status_code == 200
    off = await web.patch(f"/api/users/{user.id}", json={"is_active": False}, headers=auth_headers(settings, admin))
    assert off.status_code == 200
    assert (await web.get("/api/auth/me", headers=bearer(key))).status_code == 401
    on = await web.patch(f"/api/users/{user.id}", json={"is_active": True}, headers=auth_headers(settings, admin))
    assert on.status_code == 200
    assert (await web.get("/api/auth/me", headers=bearer(key))).status_code == 200


@pytest.mark.parametrize("value", ["n8nr_", "n8nr_wrong", "n8nr_" + "a" * 500, "n8nr_\u00e9\u00e9"])
async def test_unknown_keys_are_401(web: httpx.AsyncClient, session: AsyncSession, value: str) -> None:
    await create_user(session)
    response = await web.get("/api/auth/me", headers={b"Authorization": f"Bearer {value}".encode()})
    assert response.status_code == 401
    assert response.json() == INVALID


async def test_last_used_at_is_written_at_most_once_a_minute(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    created = await _create(web, settings, user)
    key_id = created["id"]
    assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).status_code == 200
    row = await _row(session, key_id)
    assert row is not None
    assert row.last_used_at is not None
    first = row.last_used_at
    for _ in range(3):
        assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).status_code == 200
    row = await _row(session, key_id)
    assert row is not None
    assert row.last_used_at == first
    stale = utcnow() - timedelta(minutes=2)
    await session.execute(update(ApiKey).where(ApiKey.id == uuid.UUID(key_id)).values(last_used_at=stale))
    await session.commit()
    assert (await web.get("/api/auth/me", headers=bearer(created["key"]))).status_code == 200
    row = await _row(session, key_id)
    assert row is not None
    assert row.last_used_at is not None
    assert row.last_used_at > first
    listed = (await web.get(KEYS, headers=auth_headers(settings, user))).json()
    assert listed[0]["last_used_at"] is not None


@pytest.mark.settings(DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)
@pytest.mark.parametrize("path", ["/api/auth/me", "/v1/models"])
async def test_a_key_use_that_writes_last_used_at_holds_one_pooled_connection(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, path: str
) -> None:
    """The key's row was read in the request's session, which kept its connection, and `last_used_at` written
    in a second session: two connections at once. With every connection held by such a lookup (a script's
    parallel requests after a quiet minute, each key's first use), each waited for a second until the pool
    timed out (30 s, then an error). With a pool of one, the use that writes it must answer at once."""
    user = await create_user(session)
    created = await _create(web, settings, user)
    await session.close()  # the test's own session holds no connection either
    answered = await asyncio.wait_for(web.get(path, headers=bearer(created["key"])), 5)
    assert answered.status_code == 200, answered.text
    row = await _row(session, created["id"])
    assert row is not None
    assert row.last_used_at is not None
    await session.close()


@pytest.mark.settings(RATE_LIMIT_LOGIN="3/minute")
async def test_failed_key_attempts_are_rate_limited_per_client(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Failures count like logins; once over, even a right key gets 429 from that client, so guessing
    learns nothing; successes never count."""
    user = await create_user(session)
    key = (await _create(web, settings, user))["key"]
    for _ in range(5):
        assert (await web.get("/api/auth/me", headers=bearer(key))).status_code == 200
    for _ in range(3):
        assert (await web.get("/api/auth/me", headers=bearer("n8nr_guess"))).status_code == 401
    refused = await web.get("/api/auth/me", headers=bearer("n8nr_guess"))
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert (await web.get("/api/auth/me", headers=bearer(key))).status_code == 429
    # JWT sessions are not affected by the key limit.
    assert (await web.get("/api/auth/me", headers=auth_headers(settings, user))).status_code == 200


async def test_keys_never_reach_the_logs(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = await create_user(session)
    key = (await _create(web, settings, user))["key"]
    await web.get("/api/auth/me", headers=bearer(key))
    await web.get("/api/auth/me", headers=bearer(key + "x"))
    await web.get(f"/api/agents?key={key}", headers=bearer(key))
    logged = "\n".join(record.getMessage() for record in caplog.records if not record.name.startswith("httpx"))
    assert logged  # the access log saw the requests
    assert key not in logged
    assert key[13:] not in logged


async def test_an_api_keys_user_stays_role_user_through_any_reload_in_the_request(session: AsyncSession) -> None:
    """An admin's key acts as role `user`. That role is set on the loaded object only; a service that reloads
    the object (a rollback expires it, then `refresh`, or a query with `populate_existing`, as a retry after a
    unique violation does) read the stored `admin` back, and a role check after it would have passed."""
    team = await create_team(session)
    owner = await create_admin(session, team=team)
    other = await create_admin(session, team=team)
    act_as_key_user(owner)
    assert owner.role == "user"
    await session.rollback()
    await session.refresh(owner)
    assert owner.role == "user"
    again = (
        await session.execute(select(User).where(User.id == owner.id).execution_options(populate_existing=True))
    ).scalar_one()
    assert again is owner
    assert owner.role == "user"
    # Nothing writes it, even when the user is saved for another change; another user keeps its own role.
    owner.full_name = "Renamed"
    await session.commit()
    await session.refresh(other)
    assert other.role == "admin"
    stored = await session.scalar(
        select(User.role).where(User.id == owner.id).execution_options(populate_existing=True)
    )
    assert stored == "admin"


async def test_a_request_on_an_api_key_keeps_role_user_after_reloading_its_user(
    app: FastAPI, web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """`current_user` marks a key's user so that any reload in the request keeps role `user` (the test above
    checks the marking itself): a route that rolls back and refreshes the caller, as a retry after a unique
    violation does, still sees `user` for an admin's key, and `admin` for the same admin's session token."""

    async def reloaded_role(user: CurrentUser, request_session: SessionDep) -> dict[str, str]:
        await request_session.rollback()
        await request_session.refresh(user)
        return {"role": user.role}

    probe = APIRouter()
    probe.add_api_route("/api/test-probe/reloaded-role", reloaded_role, methods=["GET"])
    app.router.routes[:0] = probe.routes  # before any catch-all route
    admin = await create_admin(session)
    key = (await _create(web, settings, admin))["key"]
    via_key = await web.get("/api/test-probe/reloaded-role", headers=bearer(key))
    assert via_key.status_code == 200, via_key.text
    assert via_key.json() == {"role": "user"}
    via_token = await web.get("/api/test-probe/reloaded-role", headers=auth_headers(settings, admin))
    assert via_token.json() == {"role": "admin"}
