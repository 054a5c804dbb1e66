"""/api/users: admins manage their own team's users; last-admin rule; deactivation is immediate."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import security
from app.config import Settings
from app.errors import Conflict
from app.models import Team, User
from app.services import users as users_service
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import bearer, https_client, login
from tests.conftest import ROOT, count_rows, make_settings, run_migrations, sent_during_a_demotion
from tests.factories import auth_headers, create_admin, create_team, create_user

pytestmark = pytest.mark.settings(RATE_LIMIT_ENABLED=False)


async def test_list_users_of_own_team_only(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    member = await create_user(session, team=team)
    await create_user(session)  # another team
    response = await web.get("/api/users", headers=auth_headers(settings, admin))
    assert response.status_code == 200
    assert {u["id"] for u in response.json()} == {str(admin.id), str(member.id)}
    assert "password" not in response.text
    assert "$2b$" not in response.text


async def test_users_endpoints_need_admin(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    member = await create_user(session)
    headers = auth_headers(settings, member)
    assert (await web.get("/api/users", headers=headers)).status_code == 403
    body = {"email": "x@example.com", "password": "long-enough"}
    assert (await web.post("/api/users", json=body, headers=headers)).status_code == 403
    assert (await web.patch(f"/api/users/{member.id}", json={"role": "admin"}, headers=headers)).status_code == 403
    assert (await web.get("/api/users")).status_code == 401
    await session.refresh(member)
    assert member.role == "user"


# --- the list: complete without `limit`, paged with it -----------------------------------------------


async def _team_of(session: AsyncSession, members: int) -> tuple[User, list[str]]:
    """An admin and `members` users of one team, every row with the same `created_at` (as rows made in one
    transaction have), so only the tie-breaker orders them; ids in the list's order."""
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    password_hash = admin.password_hash
    session.add_all(
        User(team_id=team.id, email=f"m{n:03}-{uuid.uuid4().hex[:6]}@example.com", password_hash=password_hash)
        for n in range(members)
    )
    await session.commit()
    await session.execute(update(User).where(User.team_id == team.id).values(created_at=admin.created_at))
    await session.commit()
    ids = (await session.execute(select(User.id).where(User.team_id == team.id).order_by(User.id))).scalars()
    return admin, [str(i) for i in ids]


async def test_list_users_without_limit_is_complete_with_its_total(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Existing clients (the web client's admin page, scripts) send no parameters and expect every user: no
    default page size applies, however large the team (here over the 100 a page may hold)."""
    admin, ids = await _team_of(session, 120)
    await create_user(session)  # another team: neither listed nor counted
    response = await web.get("/api/users", headers=auth_headers(settings, admin))
    assert response.status_code == 200
    assert [u["id"] for u in response.json()] == ids
    assert response.headers["X-Total-Count"] == "121"


async def test_list_users_pages_in_a_stable_order(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Pages of equal `created_at` rows never repeat or skip one: the id breaks ties."""
    admin, ids = await _team_of(session, 9)
    headers = auth_headers(settings, admin)
    paged: list[str] = []
    for offset in range(0, 10, 3):
        page = await web.get("/api/users", params={"limit": 3, "offset": offset}, headers=headers)
        assert page.status_code == 200, page.text
        assert page.headers["X-Total-Count"] == "10"
        paged += [u["id"] for u in page.json()]
    assert paged == ids
    rest = await web.get("/api/users", params={"offset": 8}, headers=headers)  # `offset` alone: the rest
    assert [u["id"] for u in rest.json()] == ids[8:]
    beyond = await web.get("/api/users", params={"limit": 100, "offset": 50}, headers=headers)
    assert (beyond.json(), beyond.headers["X-Total-Count"]) == ([], "10")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": "all"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": 1_000_001}, "offset"),
        ({"offset": "9223372036854775808"}, "offset"),
        ({"offset": "x"}, "offset"),
    ],
)
async def test_list_users_bad_paging_is_422(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, params: dict[str, Any], field: str
) -> None:
    admin = await create_admin(session)
    response = await web.get("/api/users", params=params, headers=auth_headers(settings, admin))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", field]
    assert set(error) == {"type", "loc", "msg"}  # the project's one 422 shape: what was sent is not echoed
    assert "X-Total-Count" not in response.headers


async def test_openapi_documents_the_users_paging(web: httpx.AsyncClient) -> None:
    operation = (await web.get("/openapi.json")).json()["paths"]["/api/users"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert (params["limit"]["required"], params["offset"]["required"]) == (False, False)
    limit = params["limit"]["schema"]["anyOf"][0]
    assert (limit["minimum"], limit["maximum"]) == (1, 100)
    assert "every user" in params["limit"]["description"]
    assert (params["offset"]["schema"]["minimum"], params["offset"]["schema"]["default"]) == (0, 0)
    assert "X-Total-Count" in operation["responses"]["200"]["headers"]
    assert "422" in operation["responses"]


async def test_create_user(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    admin = await create_admin(session)
    body = {"email": " New@Example.com", "password": "long-enough", "full_name": "New", "role": "admin"}
    response = await web.post("/api/users", json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["email"] == "new@example.com"
    assert created["role"] == "admin"
    assert created["team_id"] == str(admin.team_id)
    assert (await login(web, "new@example.com", "long-enough")).status_code == 200


async def test_create_user_taken_email_is_409(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    await create_user(session, team=team, email="dup@example.com")
    body = {"email": "DUP@example.com", "password": "long-enough"}
    response = await web.post("/api/users", json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 409
    assert await count_rows(session, "users") == 2


async def test_create_user_email_in_another_unicode_form_is_409(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await create_admin(session)
    headers = auth_headers(settings, admin)
    decomposed = "Ame\u0301lie@example.com"  # e + combining acute accent
    precomposed = "AM\u00c9LIE@example.com"
    first = await web.post("/api/users", json={"email": decomposed, "password": "long-enough"}, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["email"] == "am\u00e9lie@example.com"
    again = await web.post("/api/users", json={"email": precomposed, "password": "long-enough"}, headers=headers)
    assert again.status_code == 409
    assert await count_rows(session, "users") == 2
    for form in (decomposed, precomposed, "am\u00e9lie@example.com"):
        assert (await login(web, form, "long-enough")).status_code == 200, form


async def test_create_user_email_with_its_domain_in_the_other_spelling_is_409(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """`a@bücher.de` and `a@xn--bcher-kva.de` are one mailbox: stored with the domain in Unicode, and a row
    stored in ASCII before that (inserted directly here) counts as taken too."""
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    headers = auth_headers(settings, admin)
    first = await web.post(
        "/api/users", json={"email": "A@XN--BCHER-KVA.de", "password": "long-enough"}, headers=headers
    )
    assert first.status_code == 201, first.text
    assert first.json()["email"] == "a@b\u00fccher.de"
    again = await web.post(
        "/api/users", json={"email": "a@xn--bcher-kva.de", "password": "long-enough"}, headers=headers
    )
    assert again.status_code == 409
    await create_user(session, team=team, email="legacy@xn--bcher-kva.de")
    legacy = await web.post(
        "/api/users", json={"email": "legacy@b\u00fccher.de", "password": "long-enough"}, headers=headers
    )
    assert legacy.status_code == 409
    assert await count_rows(session, "users") == 3


async def test_create_user_concurrent_duplicates_give_one_409(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await create_admin(session)
    headers = auth_headers(settings, admin)
    body = {"email": "race@example.com", "password": "long-enough"}
    responses = await asyncio.gather(*(web.post("/api/users", json=body, headers=headers) for _ in range(4)))
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409]


@pytest.mark.parametrize(
    "changes",
    [{"team_id": str(uuid.uuid4())}, {"is_active": False}, {"role": "owner"}, {"password": "short"}, {"email": "x"}],
)
async def test_create_user_bad_input_is_422(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, changes: dict[str, Any]
) -> None:
    admin = await create_admin(session)
    body = {"email": "x@example.com", "password": "long-enough", **changes}
    response = await web.post("/api/users", json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 422
    assert await count_rows(session, "users") == 1


async def test_update_user(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    member = await create_user(session, team=team)
    headers = auth_headers(settings, admin)
    response = await web.patch(
        f"/api/users/{member.id}", json={"role": "admin", "full_name": "Promoted"}, headers=headers
    )
    assert response.status_code == 200
    assert response.json()["role"] == "admin"
    assert response.json()["full_name"] == "Promoted"
    cleared = await web.patch(f"/api/users/{member.id}", json={"full_name": None}, headers=headers)
    assert cleared.json()["full_name"] is None
    unchanged = await web.patch(f"/api/users/{member.id}", json={}, headers=headers)
    assert unchanged.status_code == 200
    assert unchanged.json()["role"] == "admin"


async def test_update_user_of_other_team_is_404_like_random_id(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await create_admin(session)
    stranger = await create_user(session)
    headers = auth_headers(settings, admin)
    foreign = await web.patch(f"/api/users/{stranger.id}", json={"is_active": False}, headers=headers)
    random = await web.patch(f"/api/users/{uuid.uuid4()}", json={"is_active": False}, headers=headers)
    assert foreign.status_code == random.status_code == 404
    assert foreign.json() == random.json() == {"detail": "User not found"}
    await session.refresh(stranger)
    assert stranger.is_active is True
    assert (await web.patch("/api/users/not-a-uuid", json={}, headers=headers)).status_code == 422


@pytest.mark.parametrize("body", [{"role": None}, {"is_active": None}, {"is_active": "no"}, {"email": "a@b.c"}])
async def test_update_user_bad_input_is_422(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, body: dict[str, Any]
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    member = await create_user(session, team=team)
    response = await web.patch(f"/api/users/{member.id}", json=body, headers=auth_headers(settings, admin))
    assert response.status_code == 422
    await session.refresh(member)
    assert member.is_active is True
    assert member.role == "user"


async def test_last_active_admin_cannot_be_demoted_or_deactivated(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    await create_admin(session, team=team, is_active=False)  # an inactive admin does not count
    headers = auth_headers(settings, admin)
    for body in ({"role": "user"}, {"is_active": False}):
        response = await web.patch(f"/api/users/{admin.id}", json=body, headers=headers)
        assert response.status_code == 409
        assert response.json() == {"detail": "The team's last active admin cannot be demoted or deactivated"}
    await session.refresh(admin)
    assert admin.role == "admin"
    assert admin.is_active is True
    # With a second active admin, demoting yourself is fine.
    await create_admin(session, team=team)
    assert (await web.patch(f"/api/users/{admin.id}", json={"role": "user"}, headers=headers)).status_code == 200


async def test_admins_demoting_each_other_at_once_leave_one_admin(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    first = await create_admin(session, team=team)
    second = await create_admin(session, team=team)
    async with https_client(app) as a, https_client(app) as b:
        responses = await asyncio.gather(
            a.patch(f"/api/users/{second.id}", json={"role": "user"}, headers=auth_headers(settings, first)),
            b.patch(f"/api/users/{first.id}", json={"is_active": False}, headers=auth_headers(settings, second)),
        )
    codes = sorted(r.status_code for r in responses)
    # Whichever runs second sees the first one's change; it is refused (409) or no longer an admin (403).
    assert codes in ([200, 403], [200, 409], [200, 401])
    admins = (
        await session.execute(
            select(User).where(User.team_id == team.id, User.role == "admin", User.is_active.is_(True))
        )
    ).scalars()
    assert len(list(admins)) == 1


async def test_deactivation_takes_effect_on_next_request(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    member = await create_user(session, team=team, email="soon-gone@example.com")
    tokens = (await login(web, "soon-gone@example.com")).json()
    web.cookies.clear()
    assert (await web.get("/api/auth/me", headers=bearer(tokens["access_token"]))).status_code == 200
    response = await web.patch(
        f"/api/users/{member.id}", json={"is_active": False}, headers=auth_headers(settings, admin)
    )
    assert response.status_code == 200
    assert response.json()["is_active"] is False
    assert (await web.get("/api/auth/me", headers=bearer(tokens["access_token"]))).status_code == 401
    assert (await web.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})).status_code == 401
    assert (await login(web, "soon-gone@example.com")).status_code == 401
    # Reactivated, the user logs in again; the old tokens stay dead.
    await web.patch(f"/api/users/{member.id}", json={"is_active": True}, headers=auth_headers(settings, admin))
    assert (await login(web, "soon-gone@example.com")).status_code == 200
    web.cookies.clear()
    assert (await web.get("/api/auth/me", headers=bearer(tokens["access_token"]))).status_code == 401


async def test_demoted_admin_loses_admin_access_at_once(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    first = await create_admin(session, team=team)
    second = await create_admin(session, team=team)
    second_headers = auth_headers(settings, second)
    assert (await web.get("/api/users", headers=second_headers)).status_code == 200
    demote = await web.patch(f"/api/users/{second.id}", json={"role": "user"}, headers=auth_headers(settings, first))
    assert demote.status_code == 200
    assert (await web.get("/api/users", headers=second_headers)).status_code == 403
    assert (await web.get("/api/auth/me", headers=second_headers)).json()["role"] == "user"


# --- operator commands -----------------------------------------------------------------------


def _cli(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    env.update({"DATA_DIR": str(tmp_path / "cli"), "BCRYPT_ROUNDS": "4", "DATABASE_URL": database_url})
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


async def test_cli_reset_password_revokes_sessions(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, tmp_path: Path
) -> None:
    team = await create_team(session)
    await create_user(session, team=team, email="ops@example.com")
    tokens = (await login(web, "ops@example.com")).json()
    web.cookies.clear()
    result = await asyncio.to_thread(
        _cli,
        tmp_path,
        settings.DATABASE_URL,
        "reset-password",
        "--email",
        "OPS@example.com",
        "--password",
        "new-pw-123",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "new-pw-123" not in result.stdout
    assert (await web.get("/api/auth/me", headers=bearer(tokens["access_token"]))).status_code == 401
    assert (await web.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})).status_code == 401
    assert (await login(web, "ops@example.com", "new-pw-123")).status_code == 200


async def test_cli_stores_and_finds_an_idn_email_in_either_spelling(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, tmp_path: Path
) -> None:
    """create-admin stores the domain in Unicode; reset-password finds a row in either spelling, and of a pair
    stored in both spellings in one team (before the folding) only the one spelled as typed."""
    url = settings.DATABASE_URL
    created = await asyncio.to_thread(
        _cli,
        tmp_path,
        url,
        "create-admin",
        "--team",
        "T",
        "--email",
        "Ops@XN--BCHER-KVA.de",
        "--password",
        "long-enough",
    )
    assert created.returncode == 0, created.stdout + created.stderr
    admin = (await session.execute(select(User))).scalar_one()
    assert admin.email == "ops@b\u00fccher.de"
    team = await create_team(session)
    legacy = await create_user(session, team=team, email="old@xn--bcher-kva.de")
    reset = await asyncio.to_thread(
        _cli, tmp_path, url, "reset-password", "--email", "old@b\u00fccher.de", "--password", "new-pw-123"
    )
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert (await login(web, "old@xn--bcher-kva.de", "new-pw-123")).json()["user"]["id"] == str(legacy.id)
    # A pair in one team: the spelling typed picks the row; a third spelling is refused, naming both.
    ascii_row = await create_user(session, team=team, email="two@xn--bcher-kva.de")
    unicode_row = await create_user(session, team=team, email="two@b\u00fccher.de")
    for email, row, password in (
        ("TWO@xn--bcher-kva.de", ascii_row, "ascii-pw-123"),
        ("two@B\u00dccher.de", unicode_row, "unicode-pw-1"),
    ):
        result = await asyncio.to_thread(
            _cli, tmp_path, url, "reset-password", "--email", email, "--password", password
        )
        assert result.returncode == 0, result.stdout + result.stderr
        response = await login(web, email, password, team_id=team.id)
        assert response.json()["user"]["id"] == str(row.id)
    fullwidth = await asyncio.to_thread(
        _cli, tmp_path, url, "reset-password", "--email", "two@\uff42\u00fccher.de", "--password", "other-pw-123"
    )
    assert fullwidth.returncode == 1
    assert "two@xn--bcher-kva.de, two@b\u00fccher.de" in fullwidth.stdout
    assert (await login(web, "two@b\u00fccher.de", "other-pw-123")).status_code == 401


async def test_cli_reset_password_of_an_email_in_several_teams_asks_for_the_team(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, tmp_path: Path
) -> None:
    """One address in two teams (in either spelling of its domain): without --team-id nothing is reset and the
    message says to pass one (not that the address is stored in several forms); with it, only that team's
    user."""
    url = settings.DATABASE_URL
    first, second = await create_team(session, name="One"), await create_team(session, name="Two")
    await create_user(session, team=first, email="ops@b\u00fccher.de")
    other = await create_user(session, team=second, email="ops@xn--bcher-kva.de")
    refused = await asyncio.to_thread(
        _cli, tmp_path, url, "reset-password", "--email", "ops@b\u00fccher.de", "--password", "new-pw-123"
    )
    assert refused.returncode == 1
    assert refused.stdout.strip() == "Email exists in several teams: pass --team-id"
    for team in (first, second):
        assert (await login(web, "ops@b\u00fccher.de", "new-pw-123", team_id=team.id)).status_code == 401
    chosen = await asyncio.to_thread(
        _cli,
        tmp_path,
        url,
        "reset-password",
        "--email",
        "ops@b\u00fccher.de",
        "--password",
        "new-pw-123",
        "--team-id",
        str(second.id),
    )
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    assert (await login(web, "ops@b\u00fccher.de", "new-pw-123", team_id=second.id)).json()["user"]["id"] == str(
        other.id
    )
    assert (await login(web, "ops@b\u00fccher.de", "new-pw-123", team_id=first.id)).status_code == 401


async def test_cli_create_admin_validates_input(session: AsyncSession, settings: Settings, tmp_path: Path) -> None:
    url = settings.DATABASE_URL
    bad_email = await asyncio.to_thread(
        _cli, tmp_path, url, "create-admin", "--team", "T", "--email", "nope", "--password", "long-enough"
    )
    assert bad_email.returncode == 2
    short = await asyncio.to_thread(
        _cli, tmp_path, url, "create-admin", "--team", "T", "--email", "a@example.com", "--password", "short"
    )
    assert short.returncode == 2
    assert await count_rows(session, "teams") == 0
    ok = await asyncio.to_thread(
        _cli, tmp_path, url, "create-admin", "--team", "T", "--email", " Ops@Example.com", "--password", "long-enough"
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    admin = (await session.execute(select(User))).scalar_one()
    assert admin.email == "ops@example.com"
    assert admin.role == "admin"


async def test_last_admin_check_waits_for_a_concurrent_change(app: FastAPI, session: AsyncSession) -> None:
    """While another transaction holds the team lock and deactivates admin A, admin B stepping down must wait,
    then see that B is the last admin (409). Without the lock both changes would pass."""
    team = await create_team(session)
    first = await create_admin(session, team=team)
    second = await create_admin(session, team=team)
    sessionmaker = app_state(app).db.sessionmaker
    async with sessionmaker() as holder, sessionmaker() as contender:
        await holder.execute(select(Team.id).where(Team.id == team.id).with_for_update())
        actor = await contender.get(User, second.id)
        assert actor is not None
        attempt = asyncio.create_task(
            users_service.update_user(session=contender, admin=actor, user_id=second.id, changes={"role": "user"})
        )
        await asyncio.sleep(0.3)
        assert not attempt.done()  # blocked on the team row
        await holder.execute(update(User).where(User.id == first.id).values(is_active=False))
        await holder.commit()
        with pytest.raises(Conflict):
            await attempt
    await session.refresh(second)
    assert second.role == "admin"


async def test_an_admin_demoted_while_their_change_waits_changes_nothing(
    app: FastAPI, web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Admin A demotes admin B (holding the team's row, as `update_user` does) while B's promotion of an
    accomplice, authorised a moment before, waits for that row: it went through, and the removed admin left
    an admin behind. B is checked again under the lock: 403, nothing changed."""
    team = await create_team(session)
    await create_admin(session, team=team)
    rogue = await create_admin(session, team=team)
    accomplice = await create_user(session, team=team)
    promoting = web.patch(f"/api/users/{accomplice.id}", json={"role": "admin"}, headers=auth_headers(settings, rogue))
    promoted = await sent_during_a_demotion(app, rogue, promoting)
    assert (promoted.status_code, promoted.json()) == (403, {"detail": "Admin role required"})
    await session.refresh(accomplice)
    assert accomplice.role == "user"


async def test_an_admin_demoted_while_their_new_users_password_hashes_creates_no_one(
    app: FastAPI, web: httpx.AsyncClient, session: AsyncSession, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demotion lands while bcrypt hashes the new user's password (no lock is held then): the user, an
    admin of the rogue's choosing, was created anyway. The creator is checked again before the insert."""
    team = await create_team(session)
    await create_admin(session, team=team)
    rogue = await create_admin(session, team=team)
    hashing = security.hash_password

    async def demoted_meanwhile(password: str, rounds: int) -> str:
        async with app_state(app).db.sessionmaker() as demotion:
            await demotion.execute(update(User).where(User.id == rogue.id).values(role="user"))
            await demotion.commit()
        return await hashing(password, rounds)

    monkeypatch.setattr(users_service, "hash_password", demoted_meanwhile)
    created = await web.post(
        "/api/users",
        json={"email": "puppet@example.com", "password": "long-enough-password", "role": "admin"},
        headers=auth_headers(settings, rogue),
    )
    assert (created.status_code, created.json()) == (403, {"detail": "Admin role required"})
    assert (await session.execute(select(User).where(User.email == "puppet@example.com"))).first() is None


async def test_admins_demoting_each_other_at_once_leave_one_admin_on_sqlite(tmp_path: Path) -> None:
    """SQLite ignores FOR UPDATE: both demotions counted the other admin, and the team was left with none. A
    locking read there takes the database's write lock first, so the second waits and then is no admin."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'users.db'}"
    await asyncio.to_thread(run_migrations, url)
    settings = make_settings(url, tmp_path)
    lite = create_app(settings)
    try:
        for _ in range(3):
            async with app_state(lite).db.sessionmaker() as s:
                team = await create_team(s)
                first = await create_admin(s, team=team)
                second = await create_admin(s, team=team)
            async with https_client(lite) as a, https_client(lite) as b:
                responses = await asyncio.gather(
                    a.patch(f"/api/users/{second.id}", json={"role": "user"}, headers=auth_headers(settings, first)),
                    b.patch(f"/api/users/{first.id}", json={"role": "user"}, headers=auth_headers(settings, second)),
                )
            assert sorted(r.status_code for r in responses) in ([200, 403], [200, 409])
            async with app_state(lite).db.sessionmaker() as s:
                admins = select(func.count()).select_from(User).where(User.team_id == team.id, User.role == "admin")
                assert (await s.execute(admins)).scalar_one() == 1
    finally:
        await shutdown(lite)
