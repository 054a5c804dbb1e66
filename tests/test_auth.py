"""/api/auth: register, login, token, refresh, logout, me, password; token validation and cookies."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import security
from app.config import Settings
from app.db import utcnow
from app.errors import Unauthorized
from app.fields import EMAIL_MAX_LENGTH
from app.models import RefreshToken, RevokedToken, User
from app.security import create_token, hash_password, hash_refresh_token, issued_before, verify_password
from app.services import auth as auth_service
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import bearer, https_client, login, set_cookies
from tests.conftest import TEST_JWT_SECRET, count_rows, make_settings
from tests.factories import DEFAULT_PASSWORD, auth_headers, create_team, create_user, email_of_length

GENERIC_401 = {"detail": "Incorrect email or password"}
#: Teams are closed by default; registering by team id needs an admin to have opened it.
OPEN = {"open_registration": True}
INVALID = {"detail": "Could not validate credentials"}


# These tests log in often; the limits themselves are tested in test_ratelimit.py.
pytestmark = pytest.mark.settings(RATE_LIMIT_ENABLED=False)


# --- register --------------------------------------------------------------------------------


async def test_register_creates_user_with_role_user(web: httpx.AsyncClient, session: AsyncSession) -> None:
    team = await create_team(session, settings=OPEN)
    body = {"team_id": str(team.id), "email": "  Ada@Example.COM ", "password": "long-enough", "full_name": "Ada"}
    response = await web.post("/api/auth/register", json=body)
    assert response.status_code == 201, response.text
    user = response.json()
    assert set(user) == {
        "id",
        "team_id",
        "email",
        "full_name",
        "role",
        "is_active",
        "preferences",
        "created_at",
        "last_login_at",
    }
    assert user["email"] == "ada@example.com"
    assert user["role"] == "user"
    assert user["is_active"] is True
    assert user["team_id"] == str(team.id)
    assert "hash" not in response.text
    assert (await login(web, "ADA@example.com", "long-enough")).status_code == 200


async def test_register_closed_team_is_403(web: httpx.AsyncClient, session: AsyncSession) -> None:
    team = await create_team(session, settings={"open_registration": False})
    body = {"team_id": str(team.id), "email": "a@example.com", "password": "long-enough"}
    response = await web.post("/api/auth/register", json=body)
    assert response.status_code == 403
    assert response.json() == {"detail": "Registration is closed for this team"}
    assert await count_rows(session, "users") == 0


async def test_register_unknown_team_is_404(web: httpx.AsyncClient, session: AsyncSession) -> None:
    body = {"team_id": str(uuid.uuid4()), "email": "a@example.com", "password": "long-enough"}
    response = await web.post("/api/auth/register", json=body)
    assert response.status_code == 404
    assert await count_rows(session, "users") == 0


async def test_register_taken_email_is_409_case_insensitive(web: httpx.AsyncClient, session: AsyncSession) -> None:
    team = await create_team(session, settings=OPEN)
    await create_user(session, team=team, email="taken@example.com")
    body = {"team_id": str(team.id), "email": "TAKEN@example.com", "password": "long-enough"}
    response = await web.post("/api/auth/register", json=body)
    assert response.status_code == 409
    assert response.json() == {"detail": "This email is already registered in this team"}
    assert await count_rows(session, "users") == 1
    # The same email in another team is a different account.
    other = await create_team(session, settings=OPEN)
    body["team_id"] = str(other.id)
    assert (await web.post("/api/auth/register", json=body)).status_code == 201


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"password": "short"}, "password"),
        ({"password": "x" * 1025}, "password"),
        ({"email": "not-an-email"}, "email"),
        ({"role": "admin"}, "role"),
        ({"is_active": False}, "is_active"),
        ({"team": "other"}, "team"),
    ],
)
async def test_register_bad_input_is_422_and_creates_nothing(
    web: httpx.AsyncClient, session: AsyncSession, changes: dict[str, Any], field: str
) -> None:
    team = await create_team(session, settings=OPEN)
    body = {"team_id": str(team.id), "email": "a@example.com", "password": "long-enough", **changes}
    response = await web.post("/api/auth/register", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == field
    assert "long-enough" not in response.text
    assert "xxxxxxxx" not in response.text
    assert await count_rows(session, "users") == 0


# --- passwords -------------------------------------------------------------------------------


async def test_passwords_sharing_first_72_bytes_do_not_both_verify(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    team = await create_team(session, settings=OPEN)
    first = "a" * 72 + "-first"
    second = "a" * 72 + "-second"
    response = await web.post(
        "/api/auth/register", json={"team_id": str(team.id), "email": "long@example.com", "password": first}
    )
    assert response.status_code == 201
    assert (await login(web, "long@example.com", first)).status_code == 200
    assert (await login(web, "long@example.com", second)).status_code == 401
    assert (await login(web, "long@example.com", "a" * 72)).status_code == 401


async def test_password_is_stored_as_bcrypt_with_configured_cost(web: httpx.AsyncClient, session: AsyncSession) -> None:
    team = await create_team(session, settings=OPEN)
    body = {"team_id": str(team.id), "email": "cost@example.com", "password": "long-enough"}
    assert (await web.post("/api/auth/register", json=body)).status_code == 201
    stored = (await session.execute(select(User.password_hash))).scalar_one()
    assert stored.startswith("$2b$04$")
    assert "long-enough" not in stored


# --- login -----------------------------------------------------------------------------------


async def test_login_returns_tokens_and_sets_cookies(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session, email="c@example.com")
    response = await login(web, "C@example.com ")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    assert body["user"]["id"] == str(user.id)
    assert body["user"]["last_login_at"] is not None
    assert response.headers["cache-control"] == "no-store"
    cookies = set_cookies(response)
    access, refresh = cookies["access_token"], cookies["refresh_token"]
    assert access["value"] == body["access_token"]
    assert refresh["value"] == body["refresh_token"]
    assert access["path"] == "/"
    assert refresh["path"] == "/api/auth"
    assert access["max-age"] == "3600"
    assert refresh["max-age"] == str(7 * 86400)
    for cookie in (access, refresh):
        assert cookie["httponly"] == "true"
        assert cookie["secure"] == "true"
        assert cookie["samesite"].lower() == "strict"
    me = await web.get("/api/auth/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["email"] == "c@example.com"
    claims = jwt.decode(body["access_token"], TEST_JWT_SECRET, algorithms=["HS256"], audience=settings.JWT_AUDIENCE)
    assert {"sub", "team_id", "type", "jti", "iat", "exp", "iss", "aud"} <= set(claims)
    assert claims["type"] == "access"


async def test_login_cookies_follow_settings(database_url: str, tmp_path: Path, session: AsyncSession) -> None:
    local = make_settings(database_url, tmp_path, COOKIE_SECURE=False, COOKIE_SAMESITE="lax", RATE_LIMIT_ENABLED=False)
    app = create_app(local)
    try:
        await create_user(session, email="lax@example.com")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            response = await login(c, "lax@example.com")
            cookies = set_cookies(response)
            assert cookies["access_token"]["secure"] == ""
            assert cookies["access_token"]["samesite"].lower() == "lax"
            # Plain-http cookie flow works end to end.
            assert (await c.get("/api/auth/me")).status_code == 200
    finally:
        await shutdown(app)


async def test_login_failures_share_one_401(web: httpx.AsyncClient, session: AsyncSession) -> None:
    team = await create_team(session)
    await create_user(session, team=team, email="known@example.com")
    await create_user(session, team=team, email="gone@example.com", is_active=False)
    attempts = [
        await login(web, "nobody@example.com"),
        await login(web, "known@example.com", "wrong-password"),
        await login(web, "gone@example.com"),
        await login(web, "known@example.com", team_id=uuid.uuid4()),
        await login(web, "not an email"),
    ]
    for response in attempts:
        assert response.status_code == 401
        assert response.json() == GENERIC_401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "set-cookie" not in response.headers


async def test_login_unknown_email_does_bcrypt_work(
    web: httpx.AsyncClient, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    real = verify_password

    async def counting(password: str, password_hash: str) -> bool:
        checked.append(password_hash[:7])
        return await real(password, password_hash)

    monkeypatch.setattr(auth_service, "verify_password", counting)
    await create_user(session, email="known@example.com")
    assert (await login(web, "nobody@example.com")).status_code == 401
    assert (await login(web, "known@example.com", "wrong-password")).status_code == 401
    # One bcrypt verification each, at the configured cost.
    assert checked == ["$2b$04$", "$2b$04$"]


async def test_login_without_team_id_picks_the_only_matching_team(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    first, second = await create_team(session), await create_team(session)
    await create_user(session, team=first, email="two@example.com", password="password-one")
    mine = await create_user(session, team=second, email="two@example.com", password="password-two")
    response = await login(web, "two@example.com", "password-two")
    assert response.status_code == 200
    assert response.json()["user"]["id"] == str(mine.id)


async def test_login_without_team_id_matching_several_teams_lists_them(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    first, second = await create_team(session, name="Alpha"), await create_team(session, name="Beta")
    await create_user(session, team=first, email="both@example.com")
    await create_user(session, team=second, email="both@example.com")
    response = await login(web, "both@example.com")
    assert response.status_code == 401
    body = response.json()
    assert "team_id" in body["detail"]
    assert [t["id"] for t in body["teams"]] == [str(first.id), str(second.id)]
    assert "set-cookie" not in response.headers
    # A wrong password never reveals the teams.
    wrong = await login(web, "both@example.com", "wrong-password")
    assert wrong.json() == GENERIC_401
    chosen = await login(web, "both@example.com", team_id=second.id)
    assert chosen.status_code == 200
    assert chosen.json()["user"]["team_id"] == str(second.id)


async def test_login_unknown_field_is_422(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="u@example.com")
    response = await web.post(
        "/api/auth/login", json={"email": "u@example.com", "password": DEFAULT_PASSWORD, "role": "admin"}
    )
    assert response.status_code == 422


async def test_register_and_login_compare_emails_in_nfc(web: httpx.AsyncClient, session: AsyncSession) -> None:
    team = await create_team(session, settings=OPEN)
    decomposed = "Ame\u0301lie@example.com"
    precomposed = "Am\u00e9lie@example.com"
    body = {"team_id": str(team.id), "email": precomposed, "password": "long-enough"}
    assert (await web.post("/api/auth/register", json=body)).status_code == 201
    body["email"] = decomposed.upper()
    duplicate = await web.post("/api/auth/register", json=body)
    assert duplicate.status_code == 409
    assert await count_rows(session, "users") == 1
    for form in (decomposed, precomposed):
        assert (await login(web, form, "long-enough")).status_code == 200, form
        token = await web.post("/api/auth/token", data={"username": form, "password": "long-enough"})
        assert token.status_code == 200, form


async def test_team_signup_admin_email_is_stored_in_nfc(web: httpx.AsyncClient) -> None:
    body = {"name": "Accents", "admin_email": "Ame\u0301lie@example.com", "admin_password": "long-enough"}
    created = await web.post("/api/teams", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["user"]["email"] == "am\u00e9lie@example.com"
    assert (await login(web, "Am\u00e9lie@example.com", "long-enough")).status_code == 200


#: One mailbox, two spellings of its internationalised domain: Unicode and ASCII (IDNA).
IDN_UNICODE = "a@b\u00fccher.de"
IDN_ASCII = "a@xn--bcher-kva.de"


async def test_an_idn_domain_in_either_spelling_is_one_email(web: httpx.AsyncClient, session: AsyncSession) -> None:
    """`a@bücher.de` and `a@xn--bcher-kva.de` are one mailbox but were stored as two strings: one team
    could hold two users for it, and a login had to use the spelling registered."""
    team = await create_team(session, settings=OPEN)
    body = {"team_id": str(team.id), "email": IDN_UNICODE, "password": "long-enough"}
    created = await web.post("/api/auth/register", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["email"] == IDN_UNICODE
    for other in (IDN_ASCII, "A@XN--BCHER-KVA.DE", "A@B\u00dcCHER.DE"):
        body["email"] = other
        duplicate = await web.post("/api/auth/register", json=body)
        assert duplicate.status_code == 409, other
        assert duplicate.json() == {"detail": "This email is already registered in this team"}
    assert await count_rows(session, "users") == 1
    for form in (IDN_UNICODE, IDN_ASCII, "A@XN--BCHER-KVA.DE"):
        assert (await login(web, form, "long-enough")).status_code == 200, form
        token = await web.post("/api/auth/token", data={"username": form, "password": "long-enough"})
        assert token.status_code == 200, form
    # Given in ASCII, the address is stored with its domain in Unicode.
    other_team = await create_team(session, settings=OPEN)
    body = {"team_id": str(other_team.id), "email": IDN_ASCII, "password": "long-enough"}
    assert (await web.post("/api/auth/register", json=body)).json()["email"] == IDN_UNICODE
    signup = {"name": "IDN", "admin_email": "Boss@XN--BCHER-KVA.de", "admin_password": "long-enough"}
    assert (await web.post("/api/teams", json=signup)).json()["user"]["email"] == "boss@b\u00fccher.de"


async def test_a_user_stored_with_an_ascii_domain_before_the_folding_still_counts(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    """Rows stored before the folding keep the spelling they were registered with; lookups try both."""
    team = await create_team(session, settings=OPEN)
    legacy = await create_user(session, team=team, email=IDN_ASCII)
    for form in (IDN_UNICODE, IDN_ASCII):
        response = await login(web, form)
        assert response.status_code == 200, form
        assert response.json()["user"]["id"] == str(legacy.id)
    body = {"team_id": str(team.id), "email": IDN_UNICODE, "password": "long-enough"}
    duplicate = await web.post("/api/auth/register", json=body)
    assert duplicate.status_code == 409
    assert await count_rows(session, "users") == 1
    # The same for a local part that is not ASCII: its ASCII spelling keeps the local part.
    accented = await create_user(session, team=team, email="\u00fc@xn--bcher-kva.de")
    assert (await login(web, "\u00dc@B\u00fccher.de")).json()["user"]["id"] == str(accented.id)
    body["email"] = "\u00fc@b\u00fccher.de"
    assert (await web.post("/api/auth/register", json=body)).status_code == 409
    # A login that is no address at all still just fails, and matches a row only as typed.
    for malformed in ("a@xn--bcher-kva..de", "a@b\u00fccher", "@b\u00fccher.de", "a@xn--"):
        response = await login(web, malformed)
        assert response.status_code == 401, malformed
        assert response.json() == GENERIC_401


async def test_a_user_stored_in_a_spelling_the_folding_changes_still_logs_in_as_typed(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    """Before the folding a domain with full-width letters was stored as typed (U+FF42 for `b` here), neither
    spelling of the folded domain: that user still signs in typing it as registered (the value's own canonical
    form is one of `email_forms`)."""
    team = await create_team(session, settings=OPEN)
    legacy = await create_user(session, team=team, email="a@\uff42\u00fccher.de")
    response = await login(web, "A@\uff42\u00fcCHER.de")
    assert response.status_code == 200, response.text
    assert response.json()["user"]["id"] == str(legacy.id)


async def test_an_email_stored_in_both_spellings_in_one_team_still_logs_in(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    """Before the folding, one team could store both spellings (two users). A login in either spelling now
    finds both rows: the one whose password matches signs in, the one spelled as typed when both match, and
    the team is never offered as a choice against itself."""
    team = await create_team(session, name="Alpha")
    unicode_row = await create_user(session, team=team, email=IDN_UNICODE, password="password-one")
    ascii_row = await create_user(session, team=team, email=IDN_ASCII, password="password-two")
    for form in (IDN_UNICODE, IDN_ASCII):
        for password, row in (("password-one", unicode_row), ("password-two", ascii_row)):
            response = await login(web, form, password)
            assert response.status_code == 200, (form, password)
            assert response.json()["user"]["id"] == str(row.id)
    same = await create_team(session, name="Beta")
    first = await create_user(session, team=same, email=IDN_ASCII)
    second = await create_user(session, team=same, email=IDN_UNICODE)
    for form, row in ((IDN_UNICODE, second), (IDN_ASCII, first), ("A@B\u00dcCHER.de", second)):
        for team_id in (None, same.id):
            response = await login(web, form, team_id=team_id)
            assert response.status_code == 200, (form, team_id, response.text)
            assert response.json()["user"]["id"] == str(row.id)
        token = await web.post("/api/auth/token", data={"username": form, "password": DEFAULT_PASSWORD})
        assert token.status_code == 200, form
    # Spelled neither way (full-width letters fold to the same domain): the older row.
    response = await login(web, "a@\uff42\u00fccher.de")
    assert response.status_code == 200
    assert response.json()["user"]["id"] == str(first.id)
    # The same pair in another team as well: the choice lists each team once.
    third = await create_team(session, name="Gamma")
    await create_user(session, team=third, email=IDN_UNICODE)
    await create_user(session, team=third, email=IDN_ASCII)
    ambiguous = await login(web, IDN_UNICODE)
    assert ambiguous.status_code == 401
    assert [choice["id"] for choice in ambiguous.json()["teams"]] == [str(same.id), str(third.id)]


async def test_the_documented_email_length_is_the_accepted_one(app: FastAPI, web: httpx.AsyncClient) -> None:
    """The schema said 320 characters (RFC 3696's sum of the parts), but email-validator refuses an address
    over 254 (RFC 5321), so a documented-valid address of 255-320 was refused. The two agree now."""
    signup = app.openapi()["components"]["schemas"]["TeamCreate"]["properties"]["admin_email"]
    assert signup["maxLength"] == EMAIL_MAX_LENGTH == 254
    longest, too_long = email_of_length(EMAIL_MAX_LENGTH), email_of_length(EMAIL_MAX_LENGTH + 1)
    assert (len(longest), len(too_long)) == (254, 255)
    body = {"name": "Long", "admin_email": longest, "admin_password": "long-enough"}
    created = await web.post("/api/teams", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["user"]["email"] == longest
    refused = await web.post("/api/teams", json={**body, "name": "Longer", "admin_email": too_long})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "admin_email"]
    assert (await login(web, longest, "long-enough")).status_code == 200


async def test_the_email_length_is_counted_once_trimmed(app: FastAPI, web: httpx.AsyncClient) -> None:
    """The 254 was checked on the address as sent, before trimming: the longest address with a space (or a
    newline) around it was a 422 everywhere, though it is stored, and signs in, trimmed. The schema still says
    254, the length of the address a client should send; surrounding whitespace is not counted."""
    schemas = app.openapi()["components"]["schemas"]
    for prop in (
        schemas["TeamCreate"]["properties"]["admin_email"],
        schemas["LoginRequest"]["properties"]["email"],
        schemas["Body_token_api_auth_token_post"]["properties"]["username"],
    ):
        assert prop["maxLength"] == EMAIL_MAX_LENGTH
        assert "trimm" in prop["description"]
    longest = email_of_length(EMAIL_MAX_LENGTH)
    body = {"name": "Padded", "admin_email": f" {longest}\n", "admin_password": "long-enough"}
    created = await web.post("/api/teams", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["user"]["email"] == longest
    for padded in (f"{longest} ", f"\t{longest.upper()}"):
        assert (await login(web, padded, "long-enough")).status_code == 200, padded
        token = await web.post("/api/auth/token", data={"username": padded, "password": "long-enough"})
        assert token.status_code == 200, token.text
    # Too long once trimmed is refused as before, by the same field.
    too_long = f" {email_of_length(EMAIL_MAX_LENGTH + 1)} "
    refused = await web.post("/api/teams", json={**body, "name": "Longer", "admin_email": too_long})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "admin_email"]
    # Said as the length, checked before email-validator reads it (not "not a valid email address").
    assert f"at most {EMAIL_MAX_LENGTH} characters" in refused.json()["detail"][0]["msg"]
    assert (await login(web, too_long, "long-enough")).status_code == 422
    token = await web.post("/api/auth/token", data={"username": too_long, "password": "long-enough"})
    assert token.status_code == 422


# --- OAuth2 token endpoint -------------------------------------------------------------------


async def test_token_endpoint_password_form(web: httpx.AsyncClient, session: AsyncSession) -> None:
    user = await create_user(session, email="swagger@example.com")
    response = await web.post("/api/auth/token", data={"username": "swagger@example.com", "password": DEFAULT_PASSWORD})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "token_type"}
    assert body["token_type"] == "bearer"
    assert response.headers["cache-control"] == "no-store"
    me = await web.get("/api/auth/me", headers=bearer(body["access_token"]))
    assert me.json()["id"] == str(user.id)


async def test_token_endpoint_client_id_is_team_id(web: httpx.AsyncClient, session: AsyncSession) -> None:
    first, second = await create_team(session), await create_team(session)
    await create_user(session, team=first, email="multi@example.com")
    await create_user(session, team=second, email="multi@example.com")
    form = {"username": "multi@example.com", "password": DEFAULT_PASSWORD}
    ambiguous = await web.post("/api/auth/token", data=form)
    assert ambiguous.status_code == 401
    assert len(ambiguous.json()["teams"]) == 2
    in_body = await web.post("/api/auth/token", data={**form, "client_id": str(second.id)})
    assert in_body.status_code == 200
    # Swagger UI's default "Authorization header" location sends client_id as Basic credentials.
    basic = base64.b64encode(f"{first.id}:".encode()).decode()
    in_header = await web.post("/api/auth/token", data=form, headers={"Authorization": f"Basic {basic}"})
    assert in_header.status_code == 200
    claims = jwt.decode(in_header.json()["access_token"], options={"verify_signature": False})
    assert claims["team_id"] == str(first.id)
    bad_client = await web.post("/api/auth/token", data={**form, "client_id": "not-a-uuid"})
    assert bad_client.status_code == 401
    assert bad_client.json() == GENERIC_401


async def test_token_endpoint_wrong_password_is_401(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="t@example.com")
    response = await web.post("/api/auth/token", data={"username": "t@example.com", "password": "nope-nope"})
    assert response.status_code == 401
    assert response.json() == GENERIC_401
    missing = await web.post("/api/auth/token", data={"username": "t@example.com"})
    assert missing.status_code == 422


async def test_openapi_documents_password_flow_and_errors(web: httpx.AsyncClient) -> None:
    spec = (await web.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    flows = next(iter(schemes.values()))["flows"]
    assert flows["password"]["tokenUrl"] == "/api/auth/token"
    paths = spec["paths"]
    for path in ("/api/auth/login", "/api/auth/token"):
        assert {"401", "429"} <= set(paths[path]["post"]["responses"])
    assert {"403", "404", "409", "429"} <= set(paths["/api/auth/register"]["post"]["responses"])
    assert "401" in paths["/api/auth/refresh"]["post"]["responses"]
    assert "401" in paths["/api/auth/me"]["get"]["responses"]
    assert "204" in paths["/api/auth/logout"]["post"]["responses"]
    login_example = paths["/api/auth/login"]["post"]["responses"]["401"]["content"]["application/json"]["examples"]
    assert login_example["failed"]["value"] == GENERIC_401


# --- token validation ------------------------------------------------------------------------


def _claims(settings: Settings, user: User, **changes: Any) -> dict[str, Any]:
    now = int(utcnow().timestamp())
    claims: dict[str, Any] = {
        "sub": str(user.id),
        "team_id": str(user.team_id),
        "type": "access",
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 600,
        "iss": settings.JWT_ISSUER,
        "aud": settings.JWT_AUDIENCE,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _none_token(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_forged_expired_wrong_type_and_alg_none_tokens_are_401(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    good = jwt.encode(_claims(settings, user), TEST_JWT_SECRET, algorithm="HS256")
    assert (await web.get("/api/auth/me", headers=bearer(good))).status_code == 200
    refresh = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="refresh").token
    past = int(utcnow().timestamp()) - 7200
    bad_tokens = {
        "bad signature": jwt.encode(_claims(settings, user), "another-secret-" + "y" * 40, algorithm="HS256"),
        "alg none": _none_token(_claims(settings, user)),
        "other algorithm": jwt.encode(_claims(settings, user), TEST_JWT_SECRET, algorithm="HS384"),
        "expired": jwt.encode(_claims(settings, user, iat=past, exp=past + 60), TEST_JWT_SECRET, algorithm="HS256"),
        "refresh as access": refresh,
        "missing jti": jwt.encode(_claims(settings, user, jti=None), TEST_JWT_SECRET, algorithm="HS256"),
        "missing team": jwt.encode(_claims(settings, user, team_id=None), TEST_JWT_SECRET, algorithm="HS256"),
        "wrong audience": jwt.encode(_claims(settings, user, aud="elsewhere"), TEST_JWT_SECRET, algorithm="HS256"),
        "wrong issuer": jwt.encode(_claims(settings, user, iss="elsewhere"), TEST_JWT_SECRET, algorithm="HS256"),
        "other team": jwt.encode(
            _claims(settings, user, team_id=str(uuid.uuid4())), TEST_JWT_SECRET, algorithm="HS256"
        ),
        "unknown user": jwt.encode(_claims(settings, user, sub=str(uuid.uuid4())), TEST_JWT_SECRET, algorithm="HS256"),
        "garbage": "not.a.token",
    }
    for name, token in bad_tokens.items():
        response = await web.get("/api/auth/me", headers=bearer(token))
        assert response.status_code == 401, name
        assert response.json() == INVALID, name
        assert response.headers["www-authenticate"] == "Bearer", name


async def test_a_token_verified_before_still_expires_on_the_second(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """The verdict is remembered per token (`app.security._verified`), its expiry is not: a token accepted
    while valid is refused from its `exp` second on, as PyJWT refuses it, however often it was used before."""
    user = await create_user(session)
    exp = int(time.time()) + 2
    token = jwt.encode(_claims(settings, user, exp=exp), TEST_JWT_SECRET, algorithm="HS256")
    for _ in range(3):
        assert (await web.get("/api/auth/me", headers=bearer(token))).status_code == 200
    assert security._verified.cache_info().currsize > 0
    await asyncio.sleep(exp - time.time() + 0.05)
    response = await web.get("/api/auth/me", headers=bearer(token))
    assert response.status_code == 401
    assert response.json() == INVALID
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(token, TEST_JWT_SECRET, algorithms=["HS256"], audience=settings.JWT_AUDIENCE)


async def test_a_remembered_token_is_judged_again_under_another_secret_and_its_claims_are_a_copy(
    session: AsyncSession, settings: Settings
) -> None:
    """Every setting the verdict depends on is part of what is remembered: the same token, verified under one
    secret, is refused under another (a rotated JWT_SECRET), issuer, audience or expected type. Each caller
    gets its own claims: changing them changes nothing for the next one. Invalid tokens are not kept."""
    user = await create_user(session)
    token = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="access").token
    claims = security.decode_token(token, settings=settings, expected_type="access")
    claims["sub"] = str(uuid.uuid4())
    assert security.decode_token(token, settings=settings, expected_type="access")["sub"] == str(user.id)
    rotated = settings.model_copy(update={"JWT_SECRET": "another-secret-" + "z" * 40})
    for other, expected in (
        (rotated, "access"),
        (settings.model_copy(update={"JWT_ISSUER": "elsewhere"}), "access"),
        (settings.model_copy(update={"JWT_AUDIENCE": "elsewhere"}), "access"),
        (settings, "refresh"),
    ):
        with pytest.raises(Unauthorized):
            security.decode_token(token, settings=other, expected_type=expected)  # type: ignore[arg-type]
    kept = security._verified.cache_info().currsize
    with pytest.raises(Unauthorized):
        security.decode_token(token + "x", settings=settings, expected_type="access")
    assert security._verified.cache_info().currsize == kept


async def test_access_token_is_refused_as_refresh_token(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    access = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="access").token
    response = await web.post("/api/auth/refresh", json={"refresh_token": access})
    assert response.status_code == 401
    assert response.json() == INVALID


async def test_missing_token_is_401(web: httpx.AsyncClient) -> None:
    response = await web.get("/api/auth/me")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_token_in_query_string_is_ignored(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    token = auth_headers(settings, user)["Authorization"].split()[1]
    for name in ("access_token", "token"):
        assert (await web.get(f"/api/auth/me?{name}={token}")).status_code == 401


async def test_bearer_wins_over_cookie(web: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    cookie_user = await create_user(session, email="cookie@example.com")
    bearer_user = await create_user(session, email="bearer@example.com")
    assert (await login(web, "cookie@example.com")).status_code == 200
    assert (await web.get("/api/auth/me")).json()["id"] == str(cookie_user.id)
    with_bearer = await web.get("/api/auth/me", headers=auth_headers(settings, bearer_user))
    assert with_bearer.json()["id"] == str(bearer_user.id)
    # A bad Bearer token is not rescued by a good cookie.
    assert (await web.get("/api/auth/me", headers=bearer("garbage"))).status_code == 401


# --- refresh ---------------------------------------------------------------------------------


async def test_refresh_with_cookie_rotates(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="r@example.com")
    first = await login(web, "r@example.com")
    old_refresh = first.json()["refresh_token"]
    response = await web.post("/api/auth/refresh")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "bearer"
    # Refreshed by cookie: the rotated refresh token stays in the httpOnly cookie, out of script's reach.
    assert body["refresh_token"] is None
    assert response.headers["cache-control"] == "no-store"
    cookies = set_cookies(response)
    assert cookies["refresh_token"]["value"] not in ("", old_refresh)
    assert cookies["access_token"]["value"] == body["access_token"]
    assert (await web.get("/api/auth/me", headers=bearer(body["access_token"]))).status_code == 200
    rows = list((await session.execute(select(RefreshToken))).scalars())
    assert len(rows) == 2
    assert len({row.family_id for row in rows}) == 1
    assert old_refresh not in {row.token_hash for row in rows}


async def _age_used_tokens(session: AsyncSession, seconds: float) -> None:
    """Move every spent refresh token's `used_at` into the past (beyond or within the grace window)."""
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.used_at.is_not(None))
        .values(used_at=utcnow() - timedelta(seconds=seconds))
    )
    await session.commit()


async def test_refresh_reuse_revokes_the_family(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="reuse@example.com")
    first = (await login(web, "reuse@example.com")).json()
    second = (await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})).json()
    # The stolen, already used token comes back after the grace window.
    await _age_used_tokens(session, 11)
    reuse = await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reuse.status_code == 401
    assert reuse.json() == INVALID
    # Now the legitimate newer token is dead too, and so are the family's access tokens.
    rows = list((await session.execute(select(RefreshToken).execution_options(populate_existing=True))).scalars())
    assert rows
    assert all(row.revoked_at is not None for row in rows)
    assert (await web.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]})).status_code == 401
    assert (await web.get("/api/auth/me", headers=bearer(second["access_token"]))).status_code == 401
    assert (await web.get("/api/auth/me", headers=bearer(first["access_token"]))).status_code == 401
    # A fresh login opens a new family that works.
    again = (await login(web, "reuse@example.com")).json()
    assert (await web.get("/api/auth/me", headers=bearer(again["access_token"]))).status_code == 200


async def _assert_working_session(web: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """The pair works: its access token reads /me and its refresh token rotates once more."""
    assert (await web.get("/api/auth/me", headers=bearer(body["access_token"]))).status_code == 200
    again = await web.post("/api/auth/refresh", json={"refresh_token": body["refresh_token"]})
    assert again.status_code == 200, again.text
    result: dict[str, Any] = again.json()
    return result


async def test_refresh_reuse_within_grace_gives_both_tabs_a_session(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, email="tabs@example.com")
    first = (await login(web, "tabs@example.com")).json()
    tab_a = await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    await _age_used_tokens(session, 5)
    tab_b = await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert tab_a.status_code == 200, tab_a.text
    assert tab_b.status_code == 200, tab_b.text
    a, b = tab_a.json(), tab_b.json()
    # One chain: the late tab gets the refresh token the first was rotated into, and its own access token.
    assert a["refresh_token"] == b["refresh_token"]
    assert a["access_token"] != b["access_token"]
    assert (await web.get("/api/auth/me", headers=bearer(b["access_token"]))).status_code == 200
    await _assert_working_session(web, a)
    rows = list((await session.execute(select(RefreshToken).execution_options(populate_existing=True))).scalars())
    assert len({row.family_id for row in rows}) == 1
    assert all(row.revoked_at is None for row in rows)
    # Logging out of one tab ends the family: the other tab's tokens die with it.
    await web.post("/api/auth/logout", headers=bearer(a["access_token"]))
    assert (await web.get("/api/auth/me", headers=bearer(b["access_token"]))).status_code == 401


async def test_refresh_reuse_within_grace_never_forks_the_chain(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="fork@example.com")
    first = (await login(web, "fork@example.com")).json()
    body = {"refresh_token": first["refresh_token"]}
    answers = [await web.post("/api/auth/refresh", json=body) for _ in range(6)]
    assert {a.status_code for a in answers} == {200}
    # Six presentations of one token inside the window: one successor, no new live chain.
    assert len({a.json()["refresh_token"] for a in answers}) == 1
    assert await count_rows(session, "refresh_tokens") == 2


async def test_refresh_thief_inside_grace_is_caught_at_the_next_rotation(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, email="thief@example.com")
    stolen = (await login(web, "thief@example.com")).json()["refresh_token"]
    victim = (await web.post("/api/auth/refresh", json={"refresh_token": stolen})).json()
    thief = (await web.post("/api/auth/refresh", json={"refresh_token": stolen})).json()
    assert thief["refresh_token"] == victim["refresh_token"]  # shares the victim's chain, cannot fork it
    rotated = await web.post("/api/auth/refresh", json={"refresh_token": victim["refresh_token"]})
    assert rotated.status_code == 200
    await _age_used_tokens(session, 11)
    # The thief's copy of the now spent successor, after the window: a reuse, so the family dies.
    assert (await web.post("/api/auth/refresh", json={"refresh_token": thief["refresh_token"]})).status_code == 401
    newest = rotated.json()
    assert (await web.post("/api/auth/refresh", json={"refresh_token": newest["refresh_token"]})).status_code == 401
    assert (await web.get("/api/auth/me", headers=bearer(newest["access_token"]))).status_code == 401


async def test_family_revocation_racing_a_refresh_revokes_its_successor(
    app: FastAPI, web: httpx.AsyncClient, session: AsyncSession
) -> None:
    """A refresh in flight (its spent row locked, its successor inserted) when the family is revoked."""
    await create_user(session, email="racing@example.com")
    first = (await login(web, "racing@example.com")).json()
    spent_hash = hash_refresh_token(first["refresh_token"])
    family_id = (
        await session.execute(select(RefreshToken.family_id).where(RefreshToken.token_hash == spent_hash))
    ).scalar_one()
    await session.commit()
    state = app_state(app)
    async with state.db.sessionmaker() as refreshing, state.db.sessionmaker() as revoking:
        await refreshing.execute(
            update(RefreshToken).where(RefreshToken.token_hash == spent_hash).values(used_at=utcnow())
        )
        successor = RefreshToken(
            user_id=(await session.execute(select(User.id))).scalar_one(),
            family_id=family_id,
            token_hash="f" * 64,
            expires_at=utcnow() + timedelta(days=1),
        )
        refreshing.add(successor)
        await refreshing.flush()
        revoke = asyncio.create_task(
            auth_service.revoke_family(
                session=revoking, settings=state.settings, revocations=state.revocations, family_id=family_id
            )
        )
        await asyncio.sleep(0.3)
        assert not revoke.done()  # waiting for the refresh's row lock
        await refreshing.commit()
        await asyncio.wait_for(revoke, 5)
    rows = list((await session.execute(select(RefreshToken).execution_options(populate_existing=True))).scalars())
    assert len(rows) == 2
    assert all(row.revoked_at is not None for row in rows)


async def test_refresh_at_the_same_moment_gives_both_callers_a_session(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, email="race@example.com")
    first = (await login(web, "race@example.com")).json()
    body = {"refresh_token": first["refresh_token"]}
    responses = await asyncio.gather(*(web.post("/api/auth/refresh", json=body) for _ in range(2)))
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    for response in responses:
        await _assert_working_session(web, response.json())
    rows = list((await session.execute(select(RefreshToken).execution_options(populate_existing=True))).scalars())
    assert len({row.family_id for row in rows}) == 1
    assert all(row.revoked_at is None for row in rows)


async def test_refresh_reuse_within_grace_on_an_instance_with_another_encryption_key_is_a_plain_401(
    web: httpx.AsyncClient, session: AsyncSession, database_url: str, tmp_path: Path
) -> None:
    """A key change (a rolling restart, one instance on the new ENCRYPTION_KEY): the late tab's presentation
    reaches an instance that cannot read the successor the other wrote. It was a 500; it is a 401 that
    revokes nothing (this is the benign race the window is for), so the first tab keeps its session."""
    await create_user(session, email="rekeyed@example.com")
    first = (await login(web, "rekeyed@example.com")).json()
    tab_a = await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert tab_a.status_code == 200
    other_key = make_settings(
        database_url, tmp_path, RATE_LIMIT_ENABLED=False, ENCRYPTION_KEY=Fernet.generate_key().decode()
    )
    rekeyed = create_app(other_key)
    try:
        async with https_client(rekeyed) as other:
            tab_b = await other.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    finally:
        await shutdown(rekeyed)
    assert (tab_b.status_code, tab_b.json()) == (401, INVALID)
    rows = list((await session.execute(select(RefreshToken).execution_options(populate_existing=True))).scalars())
    assert all(row.revoked_at is None for row in rows)
    await _assert_working_session(web, tab_a.json())


async def test_refresh_reuse_within_grace_on_an_instance_listing_the_old_key_second_gets_the_successor(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings, database_url: str, tmp_path: Path
) -> None:
    """A key rotation's first step (instances restarted with `NEW,OLD` one by one): a successor an instance on
    OLD alone wrote is read by one on `NEW,OLD`, so the late tab joins the chain instead of signing in again."""
    await create_user(session, email="rotating@example.com")
    first = (await login(web, "rotating@example.com")).json()
    tab_a = await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert tab_a.status_code == 200
    both = make_settings(
        database_url,
        tmp_path,
        RATE_LIMIT_ENABLED=False,
        ENCRYPTION_KEY=f"{Fernet.generate_key().decode()},{settings.ENCRYPTION_KEY}",
    )
    rotating = create_app(both)
    try:
        async with https_client(rotating) as other:
            tab_b = await other.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    finally:
        await shutdown(rotating)
    assert tab_b.status_code == 200, tab_b.text
    assert tab_b.json()["refresh_token"] == tab_a.json()["refresh_token"]
    await _assert_working_session(web, tab_b.json())


async def test_refresh_reuse_with_grace_disabled_revokes_the_family(
    database_url: str, tmp_path: Path, session: AsyncSession
) -> None:
    settings = make_settings(database_url, tmp_path, RATE_LIMIT_ENABLED=False, REFRESH_REUSE_GRACE_SECONDS=0)
    application = create_app(settings)
    try:
        async with https_client(application) as web:
            await create_user(session, email="nograce@example.com")
            first = (await login(web, "nograce@example.com")).json()
            second = (await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})).json()
            reuse = await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
            assert reuse.status_code == 401
            assert (await web.get("/api/auth/me", headers=bearer(second["access_token"]))).status_code == 401
    finally:
        await shutdown(application)


async def test_refresh_without_token_is_401(web: httpx.AsyncClient) -> None:
    response = await web.post("/api/auth/refresh")
    assert response.status_code == 401
    assert (await web.post("/api/auth/refresh", json={"refresh_token": "garbage"})).status_code == 401
    assert (await web.post("/api/auth/refresh", json={"refresh_token": "x", "extra": 1})).status_code == 422


async def test_refresh_of_unrecorded_token_is_401(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    forged = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="refresh").token
    assert (await web.post("/api/auth/refresh", json={"refresh_token": forged})).status_code == 401


# --- logout ----------------------------------------------------------------------------------


async def test_logout_revokes_both_tokens_and_clears_cookies(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="out@example.com")
    tokens = (await login(web, "out@example.com")).json()
    response = await web.post("/api/auth/logout")
    assert response.status_code == 204
    assert response.content == b""
    assert "content-type" not in response.headers  # no body, so no type
    cookies = set_cookies(response)
    assert cookies["access_token"]["max-age"] == "0"
    assert cookies["refresh_token"]["max-age"] == "0"
    assert cookies["refresh_token"]["path"] == "/api/auth"
    assert (await web.get("/api/auth/me", headers=bearer(tokens["access_token"]))).status_code == 401
    reuse = await web.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert reuse.status_code == 401
    assert await count_rows(session, "revoked_tokens") >= 1


async def test_logout_with_bearer_revokes_its_jti_until_expiry(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="b@example.com")
    tokens = (await login(web, "b@example.com")).json()
    web.cookies.clear()
    assert (await web.post("/api/auth/logout", headers=bearer(tokens["access_token"]))).status_code == 204
    assert (await web.get("/api/auth/me", headers=bearer(tokens["access_token"]))).status_code == 401
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    row = await session.get(RevokedToken, claims["jti"])
    assert row is not None
    assert abs(row.expires_at.timestamp() - claims["exp"]) <= 1
    # The access token carried its family: the refresh token is revoked too.
    assert (await web.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})).status_code == 401


async def test_logout_without_tokens_is_204(web: httpx.AsyncClient) -> None:
    assert (await web.post("/api/auth/logout")).status_code == 204
    assert (await web.post("/api/auth/logout", headers=bearer("garbage"))).status_code == 204


async def test_logout_revokes_only_that_session(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="two-devices@example.com")
    laptop = (await login(web, "two-devices@example.com")).json()
    phone = (await login(web, "two-devices@example.com")).json()
    web.cookies.clear()
    assert (await web.post("/api/auth/logout", headers=bearer(laptop["access_token"]))).status_code == 204
    assert (await web.get("/api/auth/me", headers=bearer(phone["access_token"]))).status_code == 200
    assert (await web.post("/api/auth/refresh", json={"refresh_token": phone["refresh_token"]})).status_code == 200


# --- me and password -------------------------------------------------------------------------


async def test_update_me_changes_name_and_preferences_only(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="me@example.com")
    await login(web, "me@example.com")
    response = await web.patch("/api/auth/me", json={"full_name": " Grace ", "preferences": {"theme": "dark"}})
    assert response.status_code == 200
    assert response.json()["full_name"] == "Grace"
    assert response.json()["preferences"] == {"theme": "dark"}
    for field, value in (("role", "admin"), ("is_active", True), ("team_id", str(uuid.uuid4())), ("email", "x@y.z")):
        refused = await web.patch("/api/auth/me", json={field: value})
        assert refused.status_code == 422, field
    me = (await web.get("/api/auth/me")).json()
    assert me["role"] == "user"
    assert me["email"] == "me@example.com"
    too_big = await web.patch("/api/auth/me", json={"preferences": {"k": "v" * 20000}})
    assert too_big.status_code == 422


async def test_a_login_whose_password_changed_while_bcrypt_ran_is_refused(
    web: httpx.AsyncClient, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who knows the old password logs in; the owner changes it while that login's bcrypt runs. The
    login issued a session dated after the change, which outlived it (a fresh 7-day refresh family). The
    login reads the user's row again under a lock before issuing anything: 401."""
    await create_user(session, email="victim@example.com")
    owner = (await login(web, "victim@example.com")).json()
    verified, release = asyncio.Event(), asyncio.Event()
    verify = security.verify_password

    async def slow_verify(password: str, password_hash: str) -> bool:
        matched = await verify(password, password_hash)
        verified.set()
        await release.wait()
        return matched

    monkeypatch.setattr(auth_service, "verify_password", slow_verify)
    attempt = asyncio.create_task(login(web, "victim@example.com"))
    async with asyncio.timeout(10):
        await verified.wait()
    changed = await web.post(
        "/api/auth/password",
        json={"current_password": DEFAULT_PASSWORD, "new_password": "brand-new-password"},
        headers=bearer(owner["access_token"]),
    )
    assert changed.status_code == 200, changed.text
    release.set()
    refused = await attempt
    assert (refused.status_code, refused.json()) == (401, {"detail": auth_service.LOGIN_FAILED})
    live = await session.execute(select(RefreshToken.id).where(RefreshToken.revoked_at.is_(None)))
    assert len(live.all()) == 1  # the owner's new session only


async def test_a_refresh_racing_a_password_change_leaves_nothing_usable(
    web: httpx.AsyncClient, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thief's refresh has spent its token and holds the user's row when the owner's password change
    arrives. The change used to take its instant first and then wait for the token's row: the refresh issued
    an access token dated after that instant, which worked for an hour. The change now waits for the user's
    row and takes its instant after, so the refresh's new tokens are refused both."""
    await create_user(session, email="victim@example.com")
    stolen = (await login(web, "victim@example.com")).json()
    owner = (await login(web, "victim@example.com")).json()
    holding, release = asyncio.Event(), asyncio.Event()
    session_user = auth_service._session_user

    async def held(db_session: AsyncSession, claims: dict[str, Any]) -> User:
        user = await session_user(db_session, claims)
        holding.set()
        await release.wait()
        return user

    monkeypatch.setattr(auth_service, "_session_user", held)
    refreshing = asyncio.create_task(web.post("/api/auth/refresh", json={"refresh_token": stolen["refresh_token"]}))
    async with asyncio.timeout(10):
        await holding.wait()
    changing = asyncio.create_task(
        web.post(
            "/api/auth/password",
            json={"current_password": DEFAULT_PASSWORD, "new_password": "brand-new-password"},
            headers=bearer(owner["access_token"]),
        )
    )
    await asyncio.wait({changing}, timeout=0.5)
    assert not changing.done()  # waiting for the user's row
    release.set()
    refreshed = await refreshing
    assert refreshed.status_code == 200, refreshed.text
    assert (await changing).status_code == 200
    monkeypatch.undo()
    thief = refreshed.json()
    assert (await web.get("/api/auth/me", headers=bearer(thief["access_token"]))).status_code == 401
    again = await web.post("/api/auth/refresh", json={"refresh_token": thief["refresh_token"]})
    assert again.status_code == 401


async def test_change_password_revokes_other_sessions(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="pw@example.com")
    other = (await login(web, "pw@example.com")).json()
    mine = (await login(web, "pw@example.com")).json()
    wrong = await web.post(
        "/api/auth/password",
        json={"current_password": "wrong-password", "new_password": "brand-new-password"},
        headers=bearer(mine["access_token"]),
    )
    assert wrong.status_code == 400
    response = await web.post(
        "/api/auth/password",
        json={"current_password": DEFAULT_PASSWORD, "new_password": "brand-new-password"},
        headers=bearer(mine["access_token"]),
    )
    assert response.status_code == 200, response.text
    fresh = response.json()
    assert (await web.get("/api/auth/me", headers=bearer(fresh["access_token"]))).status_code == 200
    assert (await web.get("/api/auth/me", headers=bearer(mine["access_token"]))).status_code == 401
    assert (await web.get("/api/auth/me", headers=bearer(other["access_token"]))).status_code == 401
    assert (await web.post("/api/auth/refresh", json={"refresh_token": other["refresh_token"]})).status_code == 401
    assert (await login(web, "pw@example.com")).status_code == 401
    assert (await login(web, "pw@example.com", "brand-new-password")).status_code == 200
    short = await web.post(
        "/api/auth/password",
        json={"current_password": "brand-new-password", "new_password": "short"},
        headers=bearer(fresh["access_token"]),
    )
    assert short.status_code == 422


async def test_revocation_in_the_same_second_refuses_older_token_only(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    user = await create_user(session)
    before = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="access")
    user.tokens_valid_after = utcnow()
    await session.commit()
    after = create_token(settings=settings, user_id=user.id, team_id=user.team_id, token_type="access")
    assert (await web.get("/api/auth/me", headers=bearer(before.token))).status_code == 401
    assert (await web.get("/api/auth/me", headers=bearer(after.token))).status_code == 200


def test_issued_before_compares_below_one_second() -> None:
    instant = utcnow().replace(microsecond=500_000)
    second = int(instant.timestamp())
    iat_us = second * 1_000_000
    assert issued_before({"iat": second, "iat_us": iat_us + 499_999}, instant)
    assert not issued_before({"iat": second, "iat_us": iat_us + 500_000}, instant)
    # Without the private claim a token counts from the start of its second: refused, never wrongly kept.
    assert issued_before({"iat": second}, instant)
    assert not issued_before({"iat": second}, None)
    assert not issued_before({"iat": second + 1}, instant - timedelta(seconds=0))


# --- Origin check on cookie-authenticated writes ---------------------------------------------


async def test_cookie_write_from_foreign_origin_is_403(web: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, email="o@example.com")
    tokens = (await login(web, "o@example.com")).json()
    evil = {"Origin": "https://evil.example"}
    refused = await web.patch("/api/auth/me", json={"full_name": "pwned"}, headers=evil)
    assert refused.status_code == 403
    assert refused.json() == {"detail": "Origin not allowed"}
    assert (await web.post("/api/auth/refresh", headers=evil)).status_code == 403
    assert (await web.post("/api/auth/logout", headers=evil)).status_code == 403
    # Reads are fine; allowed origins, the server's own origin and no Origin at all are fine.
    assert (await web.get("/api/auth/me", headers=evil)).status_code == 200
    for headers in ({"Origin": "http://spa.test"}, {"Origin": "HTTP://SPA.test"}, {"Origin": "https://test"}, {}):
        response = await web.patch("/api/auth/me", json={"full_name": "ok"}, headers=headers)
        assert response.status_code == 200, headers
    # Bearer authentication is not a cookie: no CSRF risk, no Origin check.
    with_bearer = await web.patch(
        "/api/auth/me", json={"full_name": "bearer"}, headers={**evil, **bearer(tokens["access_token"])}
    )
    assert with_bearer.status_code == 200
    me = (await web.get("/api/auth/me")).json()
    assert me["full_name"] == "bearer"


async def test_cookie_write_from_another_port_of_the_servers_host_is_403(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    """Another port is another origin (another application on the same host): only the host with the server's
    own port passes."""
    await create_user(session, email="o@example.com")
    assert (await login(web, "o@example.com")).status_code == 200
    for origin in ("https://test:8443", "http://test:8080"):
        refused = await web.patch("/api/auth/me", json={"full_name": "pwned"}, headers={"Origin": origin})
        assert (refused.status_code, refused.json()) == (403, {"detail": "Origin not allowed"}), origin
    assert (await web.get("/api/auth/me")).json()["full_name"] != "pwned"


async def test_an_empty_authorization_header_does_not_skip_the_origin_check(
    web: httpx.AsyncClient, session: AsyncSession
) -> None:
    """An empty `Authorization` header is no credential, so the cookie authenticates: the Origin check applies
    (it was skipped because a header was present). Logout is checked whenever it revokes a cookie's session."""
    await create_user(session, email="o@example.com")
    assert (await login(web, "o@example.com")).status_code == 200
    evil = {"Origin": "https://evil.example", "Authorization": ""}
    refused = await web.patch("/api/auth/me", json={"full_name": "pwned"}, headers=evil)
    assert (refused.status_code, refused.json()) == (403, {"detail": "Origin not allowed"})
    assert (await web.post("/api/auth/logout", headers=evil)).status_code == 403
    # Another header (no Bearer token) still leaves the refresh cookie to be revoked: checked too.
    basic = {"Origin": "https://evil.example", "Authorization": "Basic eDp5"}
    assert (await web.post("/api/auth/logout", headers=basic)).status_code == 403
    me = await web.get("/api/auth/me")
    assert me.status_code == 200
    assert me.json()["full_name"] != "pwned"
    assert (await web.post("/api/auth/refresh")).status_code == 200  # the session was never logged out


async def test_cookie_write_with_an_unparsable_origin_is_403(web: httpx.AsyncClient, session: AsyncSession) -> None:
    """An `Origin` that is no URL (an unclosed IPv6 bracket made urlsplit raise) is a foreign origin, not a 500."""
    await create_user(session, email="o@example.com")
    assert (await login(web, "o@example.com")).status_code == 200
    for origin in ("http://[::1", "https://[", "http://[test]"):
        headers = {"Origin": origin}
        refused = await web.patch("/api/auth/me", json={"full_name": "pwned"}, headers=headers)
        assert (refused.status_code, refused.json()) == (403, {"detail": "Origin not allowed"}), origin
        assert (await web.post("/api/auth/refresh", headers=headers)).status_code == 403
        assert (await web.post("/api/auth/logout", headers=headers)).status_code == 403
    assert (await web.get("/api/auth/me")).json()["full_name"] != "pwned"


async def test_bcrypt_runs_off_the_event_loop(database_url: str, tmp_path: Path, session: AsyncSession) -> None:
    """At cost 12 a verification takes ~250 ms; meanwhile the loop keeps ticking every few ms."""
    app = create_app(make_settings(database_url, tmp_path, BCRYPT_ROUNDS=12, RATE_LIMIT_ENABLED=False))
    try:
        password_hash = await hash_password("slow-but-safe", 12)
        await create_user(session, email="slow@example.com", password_hash=password_hash)
        gaps: list[float] = []

        async def ticker(stop: asyncio.Event) -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        async with https_client(app) as c:
            started = time.perf_counter()
            response = await login(c, "slow@example.com", "slow-but-safe")
            elapsed = time.perf_counter() - started
        stop.set()
        await task
        assert response.status_code == 200
        assert elapsed > 0.1  # the real cost-12 work was done...
        assert max(gaps) < 0.1  # ...without stalling the loop
    finally:
        await shutdown(app)


# --- rehash on login --------------------------------------------------------------------------


async def stored_hash(session: AsyncSession, user_id: uuid.UUID) -> str:
    return str((await session.execute(select(User.password_hash).where(User.id == user_id))).scalar_one())


async def log_in(client: httpx.AsyncClient, how: str, email: str, password: str) -> httpx.Response:
    """The JSON login or the OAuth2 form: both go through one authenticate."""
    if how == "login":
        return await login(client, email, password)
    return await client.post("/api/auth/token", data={"username": email, "password": password})


@pytest.mark.parametrize("how", ["login", "token"])
async def test_login_rehashes_a_hash_of_another_cost(
    database_url: str, tmp_path: Path, session: AsyncSession, how: str
) -> None:
    """BCRYPT_ROUNDS raised from 4 to 5: the next login stores a cost-5 hash, which then works and stays."""
    app = create_app(make_settings(database_url, tmp_path, BCRYPT_ROUNDS=5, RATE_LIMIT_ENABLED=False))
    try:
        user = await create_user(session, email="cost@example.com")
        assert (await stored_hash(session, user.id)).startswith("$2b$04$")
        async with https_client(app) as c:
            assert (await log_in(c, how, "cost@example.com", DEFAULT_PASSWORD)).status_code == 200
            rehashed = await stored_hash(session, user.id)
            assert rehashed.startswith("$2b$05$")
            assert await verify_password(DEFAULT_PASSWORD, rehashed)
            assert (await log_in(c, how, "cost@example.com", DEFAULT_PASSWORD)).status_code == 200
        assert await stored_hash(session, user.id) == rehashed
    finally:
        await shutdown(app)


@pytest.mark.parametrize("how", ["login", "token"])
async def test_login_at_the_current_cost_keeps_the_hash(
    web: httpx.AsyncClient, session: AsyncSession, how: str
) -> None:
    user = await create_user(session, email="same@example.com")
    before = await stored_hash(session, user.id)
    assert (await log_in(web, how, "same@example.com", DEFAULT_PASSWORD)).status_code == 200
    assert await stored_hash(session, user.id) == before


@pytest.mark.parametrize("how", ["login", "token"])
async def test_login_with_wrong_password_keeps_a_hash_of_another_cost(
    database_url: str, tmp_path: Path, session: AsyncSession, how: str
) -> None:
    app = create_app(make_settings(database_url, tmp_path, BCRYPT_ROUNDS=5, RATE_LIMIT_ENABLED=False))
    try:
        user = await create_user(session, email="wrong@example.com")
        before = await stored_hash(session, user.id)
        async with https_client(app) as c:
            assert (await log_in(c, how, "wrong@example.com", "not-the-password")).status_code == 401
        assert await stored_hash(session, user.id) == before
    finally:
        await shutdown(app)


@pytest.mark.parametrize("how", ["login", "token"])
async def test_a_failure_on_a_hash_of_a_lower_cost_costs_what_an_unknown_email_costs(
    database_url: str, tmp_path: Path, session: AsyncSession, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """BCRYPT_ROUNDS raised to 8 over cost-4 hashes: a wrong password (or an inactive user) still does the bcrypt
    work of one cost-8 hash, as an unknown email does. It did 1/16 of it (~10 ms against ~250 ms at cost 12),
    which told anyone which emails had an account not logged into since the raise."""
    app = create_app(make_settings(database_url, tmp_path, BCRYPT_ROUNDS=8, RATE_LIMIT_ENABLED=False))
    work: list[int] = []
    real_verify = verify_password

    async def counting_verify(password: str, password_hash: str) -> bool:
        work.append(2 ** (security.hash_cost(password_hash) or 0))
        return await real_verify(password, password_hash)

    monkeypatch.setattr(auth_service, "verify_password", counting_verify)
    try:
        await create_user(session, email="dormant@example.com")
        await create_user(session, email="gone@example.com", is_active=False)
        async with https_client(app) as c:
            spent: dict[str, int] = {}
            for email, password in (
                ("nobody@example.com", "not-the-password"),
                ("dormant@example.com", "not-the-password"),
                ("gone@example.com", DEFAULT_PASSWORD),
            ):
                work.clear()
                assert (await log_in(c, how, email, password)).json() == GENERIC_401
                spent[email] = sum(work)
        assert spent == dict.fromkeys(spent, 2**8)
    finally:
        await shutdown(app)


async def test_rehash_runs_in_the_bcrypt_pool(
    database_url: str, tmp_path: Path, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The extra bcrypt of a rehash never runs on the event loop."""
    from app import security

    threads: list[str] = []
    real = security.hash_password_sync

    def recording(password: str, rounds: int) -> str:
        threads.append(threading.current_thread().name)
        return real(password, rounds)

    monkeypatch.setattr(security, "hash_password_sync", recording)
    app = create_app(make_settings(database_url, tmp_path, BCRYPT_ROUNDS=5, RATE_LIMIT_ENABLED=False))
    try:
        user = await create_user(session, email="pool@example.com")
        async with https_client(app) as c:
            assert (await login(c, "pool@example.com", DEFAULT_PASSWORD)).status_code == 200
        assert (await stored_hash(session, user.id)).startswith("$2b$05$")
        assert len(threads) == 1
        assert threads[0].startswith("bcrypt")
    finally:
        await shutdown(app)


async def test_rehash_never_undoes_a_password_changed_during_the_login(
    database_url: str, tmp_path: Path, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new hash replaces only the hash the login verified: a change committed meanwhile wins."""
    app = create_app(make_settings(database_url, tmp_path, BCRYPT_ROUNDS=5, RATE_LIMIT_ENABLED=False))
    user = await create_user(session, email="race@example.com")
    changed = await hash_password("changed-meanwhile", 4)
    real = hash_password

    async def change_then_hash(password: str, rounds: int) -> str:
        await session.execute(update(User).where(User.id == user.id).values(password_hash=changed))
        await session.commit()
        return await real(password, rounds)

    monkeypatch.setattr(auth_service, "hash_password", change_then_hash)
    try:
        async with https_client(app) as c:
            assert (await login(c, "race@example.com", DEFAULT_PASSWORD)).status_code == 200
        assert await stored_hash(session, user.id) == changed
    finally:
        await shutdown(app)


async def test_bcrypt_threads_run_at_lower_priority_and_never_take_every_core() -> None:
    """A login burst on a busy small machine must leave the event loop's core (and priority) to streams."""
    from app import security as auth

    def probe() -> tuple[str, int]:
        return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    name, nice = await auth._in_bcrypt_thread(probe)
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert name.startswith("bcrypt")
    assert nice == min(19, loop_nice + auth.BCRYPT_NICE)
    assert auth._bcrypt_pool._max_workers == max(1, (os.cpu_count() or 2) - 1)
    assert await verify_password("pw-123456", await hash_password("pw-123456", 4))
    assert not await verify_password("pw-123456", "not a bcrypt hash")


@pytest.mark.parametrize(
    "form",
    [
        {"username": "a\x00@example.com", "password": "x" * 10},
        {"username": "a@example.com", "password": "pass\x00word1"},
        {"username": "a@example.com", "password": "password1", "client_id": "\x00"},
    ],
)
async def test_token_form_with_nul_is_422(web: httpx.AsyncClient, form: dict[str, str]) -> None:
    response = await web.post("/api/auth/token", data=form)
    assert response.status_code == 422
    assert "NUL" in response.json()["detail"][0]["msg"]


async def test_logouts_refreshes_and_deactivations_at_once_never_deadlock(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Each revokes a set of refresh tokens (a family, a user's) while refreshes add successors to them: the
    token rows were locked in different orders and a logout or a refresh deadlocked, a 503 (one to six per
    round). Every writer of a user's tokens now locks the user's row first. Six rounds of three users, each
    with eight refreshes and logouts of one session beside deactivations and role changes."""
    team = await create_team(session)
    admin = await create_user(session, team=team, role="admin", email="admin@example.com")
    users = [await create_user(session, team=team, email=f"u{i}@example.com") for i in range(3)]
    admin_headers = auth_headers(settings, admin)
    failed: list[tuple[str, int]] = []
    for _ in range(6):
        await session.execute(update(User).where(User.id.in_([u.id for u in users])).values(is_active=True))
        await session.commit()
        sessions = [(await login(web, f"u{i}@example.com")).json() for i in range(3)]
        jobs = []
        for tokens in sessions:
            for _ in range(8):
                jobs.append(web.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}))
                jobs.append(
                    web.post(
                        "/api/auth/logout",
                        json={"refresh_token": tokens["refresh_token"]},
                        headers=bearer(tokens["access_token"]),
                    )
                )
        for user in users:
            jobs.append(web.patch(f"/api/users/{user.id}", json={"is_active": False}, headers=admin_headers))
            jobs.append(web.patch(f"/api/users/{user.id}", json={"role": "admin"}, headers=admin_headers))
        answers = await asyncio.gather(*jobs)
        failed += [(a.request.url.path, a.status_code) for a in answers if a.status_code >= 500]
    assert failed == []
