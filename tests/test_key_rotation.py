"""ENCRYPTION_KEY rotation: several keys (the first encrypts, every one decrypts), sends through headers written
under the old key, and `rotate-encryption-key` (app.services.key_rotation) putting every secret under the new one."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import (
    DecryptionError,
    decrypt_headers,
    decrypt_text,
    encrypt_headers,
    encrypt_text,
    key_ring,
    parse_keys,
)
from app.db import utcnow
from app.models import Agent, RefreshToken, User
from app.services import key_rotation
from app.services.api_keys import create_key
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import bearer, login
from tests.conftest import ROOT, TEST_ENCRYPTION_KEY, make_settings, until_a_statement_waits
from tests.factories import DEFAULT_PASSWORD, auth_headers, create_admin, create_agent, create_team, create_user
from tests.live import chat_with_agent, data_events, parse_sse
from tools.fake_n8n import FakeN8n

OLD = TEST_ENCRYPTION_KEY  # what the `settings` fixture (and so every factory row here) writes with
NEW = Fernet.generate_key().decode()
SECRET = "n8n-header-secret-value"


async def rotate_all(session: AsyncSession, value: str, batch_size: int = 2) -> key_rotation.Rotation:
    """What `rotate-encryption-key` does with ENCRYPTION_KEY=`value` (in batches of 2 here: several batches)."""
    return await key_rotation.rotate_secrets(
        session=session, current=parse_keys(value)[0], keys=key_ring(value), batch_size=batch_size
    )


async def stored_headers(session: AsyncSession, agent_id: uuid.UUID) -> str | None:
    query = select(Agent.webhook_headers_encrypted).where(Agent.id == agent_id)
    return (await session.execute(query.execution_options(populate_existing=True))).scalar()


async def spent_token(session: AsyncSession, user: User, successor: str | None) -> RefreshToken:
    """A spent refresh token's row holding `successor` (a Fernet token, or None)."""
    row = RefreshToken(
        user_id=user.id,
        family_id=uuid.uuid4(),
        token_hash=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        expires_at=utcnow() + timedelta(days=7),
        used_at=utcnow(),
        successor_encrypted=successor,
    )
    session.add(row)
    await session.commit()
    return row


# --- sends while both keys are listed ----------------------------------------------------------------


async def test_send_through_headers_written_under_the_old_key_works_with_the_new_key_first(
    session: AsyncSession, settings: Settings, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """The first step of a rotation: an instance restarted with `NEW,OLD` sends with headers an instance on
    OLD alone saved, by the chat API and by /v1 (with NEW alone they are unreadable: `agent_misconfigured`)."""
    setup = await chat_with_agent(
        session, settings, f"{fake.url}/webhook/agent-stream", webhook_headers={"X-N8N-Auth": SECRET}
    )
    setup.agent.slug = "helper"
    await session.commit()
    _row, api_key = await create_key(session=session, settings=settings, user=setup.user, name="k", expires_at=None)
    both = create_app(make_settings(database_url, tmp_path, ENCRYPTION_KEY=f"{NEW},{OLD}"))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=both), base_url="http://t") as client:
            sent = await client.post(
                f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers
            )
            assert data_events(parse_sse(sent.text))[-1].type == "done", sent.text
            assert fake.requests[-1]["headers"]["X-N8N-Auth"] == SECRET
            body = {"model": "helper", "messages": [{"role": "user", "content": "hello"}]}
            completion = await client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}
            )
            assert completion.status_code == 200, completion.text
            assert completion.json()["choices"][0]["message"]["content"] == "Echo: hello"
            assert fake.requests[-1]["headers"]["X-N8N-Auth"] == SECRET
    finally:
        await shutdown(both)
    assert len(fake.requests) == 2


async def test_headers_saved_with_two_keys_need_only_the_first(
    session: AsyncSession, database_url: str, tmp_path: Path
) -> None:
    """What an instance on `NEW,OLD` writes, an instance on NEW alone reads (and one on OLD alone cannot): once
    the rotation ran, OLD can go."""
    both = make_settings(database_url, tmp_path, ENCRYPTION_KEY=f"{NEW},{OLD}")
    application = create_app(both)
    try:
        team = await create_team(session)
        admin = await create_admin(session, team=team)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://t") as client:
            created = await client.post(
                "/api/agents",
                json={
                    "name": "Keyed",
                    "webhook_url": "http://127.0.0.1:5678/webhook/x",
                    "webhook_headers": {"X-A": SECRET},
                },
                headers=auth_headers(both, admin),
            )
        assert created.status_code == 201, created.text
    finally:
        await shutdown(application)
    token = await stored_headers(session, uuid.UUID(created.json()["id"]))
    assert decrypt_headers(token, key_ring(NEW)) == {"X-A": SECRET}
    with pytest.raises(DecryptionError):
        decrypt_headers(token, key_ring(OLD))


# --- rotate-encryption-key ---------------------------------------------------------------------------


async def test_rotation_puts_every_secret_under_the_first_key_so_the_old_can_be_dropped(
    session: AsyncSession, settings: Settings
) -> None:
    """Headers and refresh-token successors under OLD are written again under NEW, in batches; what already is
    under NEW and agents without headers are not written; afterwards NEW alone reads everything, and a second
    run writes nothing."""
    team = await create_team(session)
    user = await create_user(session, team=team)
    old_agents = [
        await create_agent(
            session, team=team, webhook_headers_encrypted=encrypt_headers({"X-N": f"{SECRET}{i}"}, settings.fernet)
        )
        for i in range(5)
    ]
    current = await create_agent(
        session, team=team, webhook_headers_encrypted=encrypt_headers({"X-N": "new"}, key_ring(NEW))
    )
    bare = await create_agent(session, team=team, webhook_headers_encrypted=None)
    successors = [await spent_token(session, user, encrypt_text(f"refresh-{i}", settings.fernet)) for i in range(3)]
    await spent_token(session, user, None)
    current_token = await stored_headers(session, current.id)

    first = await rotate_all(session, f"{NEW},{OLD}")

    assert (first.agents.rotated, first.agents.current, first.agents.unreadable_count) == (5, 1, 0)
    assert (first.refresh_successors.rotated, first.refresh_successors.current) == (3, 0)
    assert first.complete
    new_only = key_ring(NEW)
    for i, agent in enumerate(old_agents):
        assert decrypt_headers(await stored_headers(session, agent.id), new_only) == {"X-N": f"{SECRET}{i}"}
    assert await stored_headers(session, current.id) == current_token
    assert await stored_headers(session, bare.id) is None
    rows = (await session.execute(select(RefreshToken).execution_options(populate_existing=True))).scalars().all()
    by_id = {row.id: row.successor_encrypted for row in rows}
    for i, row in enumerate(successors):
        stored = by_id[row.id]
        assert stored is not None
        assert decrypt_text(stored, new_only) == f"refresh-{i}"

    before = {agent.id: await stored_headers(session, agent.id) for agent in old_agents}
    second = await rotate_all(session, f"{NEW},{OLD}")
    assert (second.agents.rotated, second.agents.current, second.refresh_successors.current) == (0, 6, 3)
    assert {agent.id: await stored_headers(session, agent.id) for agent in old_agents} == before


async def test_unreadable_secrets_are_named_by_ids_and_left_as_they_are(
    session: AsyncSession, settings: Settings
) -> None:
    """Headers under a key no longer listed (or not Fernet at all) are counted and named by agent and team, never
    by content; the rows keep their bytes, and the rotation is not complete (the CLI exits 1)."""
    team = await create_team(session)
    lost = Fernet.generate_key().decode()
    under_lost = await create_agent(
        session, team=team, webhook_headers_encrypted=encrypt_headers({"X": SECRET}, key_ring(lost))
    )
    garbage = await create_agent(session, team=team, webhook_headers_encrypted="not-a-fernet-token")
    fine = await create_agent(
        session, team=team, webhook_headers_encrypted=encrypt_headers({"X": "ok"}, settings.fernet)
    )
    user = await create_user(session, team=team)
    lost_successor = await spent_token(session, user, encrypt_text("refresh", key_ring(lost)))
    lost_token = await stored_headers(session, under_lost.id)

    result = await rotate_all(session, f"{NEW},{OLD}")

    assert (result.agents.rotated, result.agents.unreadable_count) == (1, 2)
    assert sorted(result.agents.unreadable) == sorted(
        [f"agent {under_lost.id} (team {team.id})", f"agent {garbage.id} (team {team.id})"]
    )
    assert result.refresh_successors.unreadable == [
        f"refresh token {lost_successor.id} (user {user.id}, team {team.id})"
    ]
    assert not result.complete
    assert await stored_headers(session, under_lost.id) == lost_token
    assert await stored_headers(session, garbage.id) == "not-a-fernet-token"
    assert decrypt_headers(await stored_headers(session, fine.id), key_ring(NEW)) == {"X": "ok"}


def test_a_rotation_with_a_secret_rewritten_throughout_is_not_complete() -> None:
    """A row the service rewrote at every try (`changed`) was judged under no key: it may still be under an old
    one, so the run is not complete (the CLI exits 1 and never says the other keys may go)."""
    Tally, Rotation = key_rotation.Tally, key_rotation.Rotation
    assert Rotation(agents=Tally(rotated=3, current=2), refresh_successors=Tally(rotated=1)).complete
    assert not Rotation(agents=Tally(rotated=3, changed=1), refresh_successors=Tally()).complete
    assert not Rotation(agents=Tally(), refresh_successors=Tally(changed=1)).complete


async def test_a_secret_saved_after_it_was_read_is_judged_again_never_overwritten(
    session: AsyncSession, settings: Settings
) -> None:
    """The run read a row's old headers; an admin saved new ones (under NEW) before its write. The conditional
    write misses, the row is read again and found current: the admin's headers stay. A row deleted meanwhile
    is skipped."""
    team = await create_team(session)
    read_then = encrypt_headers({"X": "before"}, settings.fernet)
    assert read_then is not None
    agent = await create_agent(session, team=team, webhook_headers_encrypted=read_then)
    saved = encrypt_headers({"X": "saved by an admin"}, key_ring(f"{NEW},{OLD}"))
    await session.execute(update(Agent).where(Agent.id == agent.id).values(webhook_headers_encrypted=saved))
    await session.commit()

    current, ring = parse_keys(f"{NEW},{OLD}")[0], key_ring(f"{NEW},{OLD}")
    outcome = await key_rotation.settle(session, key_rotation.AGENTS, agent.id, read_then, current=current, keys=ring)
    await session.commit()
    assert outcome == "current"
    assert await stored_headers(session, agent.id) == saved

    gone = await key_rotation.settle(session, key_rotation.AGENTS, uuid.uuid4(), read_then, current=current, keys=ring)
    assert gone is None


@pytest.mark.parametrize("revocation", ["reuse", "password"])
async def test_a_revocation_of_tokens_a_rotation_batch_holds_waits_for_it_and_never_deadlocks(
    app: FastAPI, web: httpx.AsyncClient, session: AsyncSession, database_url: str, revocation: str
) -> None:
    """A guard, not a fix: they cannot deadlock, and this fails if that stops being true.

    A rotation batch holds the rows it wrote until it commits; a revocation (a reuse revoking the family, a
    password change revoking the user's tokens; a logout and a deactivation run the same `_revoke_settled`)
    locks the same rows. Both take them in one order, by id: the rotation writes its batch read `ORDER BY id`,
    the revocation locks with `SELECT ... ORDER BY id FOR UPDATE` before its UPDATE. The rotation takes no
    other lock (its UPDATE leaves `user_id`, so not even a key-share lock on the user), and the revocation
    takes the user's row before any token. So whichever reaches the lowest row both want waits for the other
    there holding nothing the other needs: a queue, never a cycle.

    Made to happen in the worst order: a third connection share-locks the family's second successor, so the
    rotation has written (and holds) the first and waits; the revocation then starts and waits for the first;
    the third lets go. Were either side to lock in another order (the revocation by its UPDATE's plan, the
    rotation writing a batch out of id order), each would hold a row the other waits for and PostgreSQL would
    abort one: a failed rotation, or the refresh or password change answered 503 (as reversing either does)."""
    await create_user(session, email="rotating@example.com")
    tokens = (await login(web, "rotating@example.com")).json()
    first = tokens["refresh_token"]
    for _ in range(3):  # four tokens in one family: three spent, each holding its successor under OLD
        refreshed = await web.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert refreshed.status_code == 200, refreshed.text
        tokens = refreshed.json()
    # Spent long ago: presenting the first again is a reuse, not a second tab inside the grace window.
    await session.execute(
        update(RefreshToken).where(RefreshToken.used_at.is_not(None)).values(used_at=utcnow() - timedelta(minutes=5))
    )
    await session.commit()
    query = select(RefreshToken.id).where(RefreshToken.successor_encrypted.is_not(None)).order_by(RefreshToken.id)
    spent = list((await session.execute(query)).scalars())
    assert len(spent) == 3
    family_id = (await session.execute(select(RefreshToken.family_id).distinct())).scalar_one()

    url = database_url.replace("postgresql+asyncpg://", "postgresql://")
    holder, watcher = await asyncpg.connect(url, timeout=5), await asyncpg.connect(url, timeout=5)
    rotation: asyncio.Task[key_rotation.Rotation] | None = None
    revoking: asyncio.Future[httpx.Response] | None = None
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM refresh_tokens WHERE id = $1 FOR SHARE", spent[1])

        async def rotate() -> key_rotation.Rotation:
            async with app_state(app).db.sessionmaker() as own:
                return await rotate_all(own, f"{NEW},{OLD}", batch_size=100)

        rotation = asyncio.create_task(rotate())
        await until_a_statement_waits(watcher, "UPDATE refresh_tokens SET successor_encrypted%")  # holds spent[0]
        if revocation == "reuse":
            request = web.post("/api/auth/refresh", json={"refresh_token": first})
        else:
            body = {"current_password": DEFAULT_PASSWORD, "new_password": "another-password-1"}
            request = web.post("/api/auth/password", json=body, headers=bearer(tokens["access_token"]))
        revoking = asyncio.ensure_future(request)
        await until_a_statement_waits(watcher, "SELECT refresh_tokens.id %FOR UPDATE")  # waits for spent[0]
        await holder.execute("ROLLBACK")
        async with asyncio.timeout(10):
            answer = await revoking
            result = await rotation
    finally:
        for pending in (rotation, revoking):
            if pending is not None and not pending.done():
                pending.cancel()
        await holder.close()
        await watcher.close()

    assert answer.status_code == (401 if revocation == "reuse" else 200), answer.text
    assert result.refresh_successors.rotated == 3
    assert result.complete
    rows = (await session.execute(select(RefreshToken).execution_options(populate_existing=True))).scalars().all()
    family = [row for row in rows if row.family_id == family_id]
    assert len(family) == 4
    assert all(row.revoked_at is not None for row in family)  # the revocation's, kept by the rotation's write
    for row in family:
        if row.id in spent:  # and the rotation's write, kept by the revocation's
            assert row.successor_encrypted is not None
            decrypt_text(row.successor_encrypted, key_ring(NEW))


# --- the command ---------------------------------------------------------------------------------


def _cli(tmp_path: Path, database_url: str, encryption_key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"JWT_SECRET"}}
    env.update({"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": database_url, "ENCRYPTION_KEY": encryption_key})
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "rotate-encryption-key", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_rotate_encryption_key_command_rotates_then_the_old_key_can_go(
    session: AsyncSession, settings: Settings, database_url: str, tmp_path: Path
) -> None:
    """The operator's procedure: with `NEW,OLD` the command rotates and says OLD may go (exit 0); with NEW alone
    a second run finds everything current; no secret is ever printed."""
    team = await create_team(session)
    agents = [
        await create_agent(
            session, team=team, webhook_headers_encrypted=encrypt_headers({"X": SECRET}, settings.fernet)
        )
        for _ in range(3)
    ]
    await spent_token(session, await create_user(session, team=team), encrypt_text("refresh-secret", settings.fernet))

    first = _cli(tmp_path, database_url, f"{NEW},{OLD}", "--batch-size", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.splitlines() == [
        "Stored secrets re-encrypted with key 1 of 2 in ENCRYPTION_KEY (batches of 2):",
        "agents' webhook headers: 3 rotated, 0 already current, 0 unreadable",
        "refresh-token successors: 1 rotated, 0 already current, 0 unreadable",
        "Every stored secret is under key 1: the other keys may be dropped from ENCRYPTION_KEY.",
    ]
    second = _cli(tmp_path, database_url, NEW)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.splitlines()[1:] == [
        "agents' webhook headers: 0 rotated, 3 already current, 0 unreadable",
        "refresh-token successors: 0 rotated, 1 already current, 0 unreadable",
        "Every stored secret is under key 1.",
    ]
    for agent in agents:
        assert decrypt_headers(await stored_headers(session, agent.id), key_ring(NEW)) == {"X": SECRET}
    for result in (first, second):
        output = result.stdout + result.stderr
        assert SECRET not in output
        assert "refresh-secret" not in output
        assert NEW not in output
        assert OLD not in output


async def test_rotate_encryption_key_command_exits_1_naming_unreadable_agents(
    session: AsyncSession, settings: Settings, database_url: str, tmp_path: Path
) -> None:
    """OLD dropped too early: the headers it wrote are unreadable, named by agent and team, left, exit 1."""
    team = await create_team(session)
    agent = await create_agent(
        session, team=team, webhook_headers_encrypted=encrypt_headers({"X": SECRET}, settings.fernet)
    )
    token = await stored_headers(session, agent.id)

    result = _cli(tmp_path, database_url, NEW)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "agents' webhook headers: 0 rotated, 0 already current, 1 unreadable" in result.stdout
    assert f"  agent {agent.id} (team {team.id})" in result.stdout.splitlines()
    assert "other keys may be dropped" not in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert await stored_headers(session, agent.id) == token


def test_rotate_encryption_key_refuses_a_batch_size_out_of_range(tmp_path: Path, database_url: str) -> None:
    result = _cli(tmp_path, database_url, NEW, "--batch-size", "0")
    assert (result.returncode, result.stdout.strip()) == (2, "--batch-size must be 1 to 10000")


def test_rotate_encryption_key_with_a_bad_key_in_the_list_names_its_position(tmp_path: Path, database_url: str) -> None:
    result = _cli(tmp_path, database_url, f"{NEW},not-a-key-SECRET")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "ENCRYPTION_KEY: key 2 of 2 is not a Fernet key" in output
    assert "not-a-key-SECRET" not in output
    assert NEW not in output
