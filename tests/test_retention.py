"""The retention sweep (app.services.retention) beyond the error log (tests/test_error_logs.py): refresh tokens a
day past their expiry, quota counters of days before yesterday, invites some days after they ended, uploads never
sent and file contents nothing uses go; what still serves stays, and a send racing the sweep never ends up
pointing at a deleted file."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.errors import RateLimited
from app.models import Chat, File, FileBlob, Invite, Message, RefreshToken, Share, ShareFile, UsageDaily, User, Worker
from app.security import Caller, hash_refresh_token
from app.services import retention
from app.services import usage as usage_service
from app.services.files import FILE_IDS_INVALID
from app.services.invites import hash_invite_token, new_token
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import bearer, login
from tests.conftest import _plain_url, count_rows, make_settings, run_migrations, until_a_statement_waits
from tests.factories import auth_headers, create_admin, create_agent, create_chat, create_team, create_user
from tests.live import ChatSetup, chat_with_agent
from tools.fake_n8n import FakeN8n


def expired_token(user: User, *, ago: timedelta, used: bool = False, revoked: bool = False) -> RefreshToken:
    expires_at = utcnow() - ago
    return RefreshToken(
        user_id=user.id,
        family_id=uuid.uuid4(),
        token_hash=uuid.uuid4().hex * 2,
        expires_at=expires_at,
        used_at=expires_at - timedelta(days=1) if used else None,
        revoked_at=expires_at - timedelta(days=1) if revoked else None,
    )


async def token_rows(session: AsyncSession) -> list[RefreshToken]:
    query = select(RefreshToken).order_by(RefreshToken.expires_at).execution_options(populate_existing=True)
    return list((await session.execute(query)).scalars())


async def test_refresh_tokens_go_a_day_after_their_expiry(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Every sign-in and every refresh (hourly, per open tab) added a row that was never deleted. A row a day
    past its expiry now goes; live rows stay, and a spent live token's reuse still ends its family."""
    user = await create_user(session, email="tokens@example.com")
    first = (await login(web, "tokens@example.com")).json()
    second = (await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})).json()
    session.add_all(
        [
            expired_token(user, ago=timedelta(days=30), used=True),
            expired_token(user, ago=timedelta(days=2), revoked=True),
            expired_token(user, ago=timedelta(hours=12)),
        ]
    )
    await session.commit()
    assert (await retention.sweep(session=session, settings=settings)).refresh_tokens == 2
    rows = await token_rows(session)
    assert len(rows) == 3
    assert rows[0].expires_at < utcnow() - timedelta(hours=11)  # expired within the day: kept
    assert all(row.expires_at > utcnow() for row in rows[1:])
    # The live chain works on; the spent live token still counts as a reuse (after the grace window).
    await session.execute(
        update(RefreshToken).where(RefreshToken.used_at.is_not(None)).values(used_at=utcnow() - timedelta(seconds=11))
    )
    await session.commit()
    assert (await web.get("/api/auth/me", headers=bearer(second["access_token"]))).status_code == 200
    assert (await web.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})).status_code == 401
    assert (await web.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]})).status_code == 401


async def used(session: AsyncSession, token: str, ago: timedelta) -> None:
    """Date the spending of this refresh token `ago`."""
    where = RefreshToken.token_hash == hash_refresh_token(token)
    await session.execute(update(RefreshToken).where(where).values(used_at=utcnow() - ago))
    await session.commit()


async def test_a_spent_tokens_successor_is_cleared_a_minute_after_its_reuse_window(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """A spent refresh token kept the token it was rotated into (live, encrypted with ENCRYPTION_KEY) until its
    row went, a day past its expiry: that key and a copy of the database gave live refresh tokens for days. It
    serves only a second tab within REFRESH_REUSE_GRACE_SECONDS (10) of the use: the sweep now clears it a
    minute after that window. One spent more recently keeps it and still serves; both chains go on, and
    presenting the cleared one again is the reuse it always was."""
    await create_user(session, email="idle@example.com")
    await create_user(session, email="busy@example.com")
    idle = (await login(web, "idle@example.com")).json()
    idle_next = (await web.post("/api/auth/refresh", json={"refresh_token": idle["refresh_token"]})).json()
    busy = (await login(web, "busy@example.com")).json()
    busy_next = (await web.post("/api/auth/refresh", json={"refresh_token": busy["refresh_token"]})).json()
    await used(session, idle["refresh_token"], timedelta(seconds=10 + 61))  # past the window and the minute
    await used(session, busy["refresh_token"], timedelta(seconds=10 + 50))  # within the minute

    assert await retention.sweep(session=session, settings=settings) == retention.Swept(refresh_successors=1)
    successors = {row.token_hash: row.successor_encrypted for row in await token_rows(session)}
    assert successors[hash_refresh_token(idle["refresh_token"])] is None
    assert successors[hash_refresh_token(busy["refresh_token"])] is not None
    assert await retention.sweep(session=session, settings=settings) == retention.Swept()
    assert await count_rows(session, "refresh_tokens") == 4  # the rows stay, for reuse detection
    # The kept successor still serves a second tab within the window.
    await used(session, busy["refresh_token"], timedelta(seconds=5))
    tab = await web.post("/api/auth/refresh", json={"refresh_token": busy["refresh_token"]})
    assert tab.status_code == 200
    assert tab.json()["refresh_token"] == busy_next["refresh_token"]
    # Both chains go on; the cleared token presented again is a reuse: its family is revoked.
    for pair in (idle_next, busy_next):
        assert (await web.post("/api/auth/refresh", json={"refresh_token": pair["refresh_token"]})).status_code == 200
    assert (await web.post("/api/auth/refresh", json={"refresh_token": idle["refresh_token"]})).status_code == 401
    revoked = {row.token_hash: row.revoked_at is not None for row in await token_rows(session)}
    assert revoked[hash_refresh_token(idle_next["refresh_token"])]
    assert not revoked[hash_refresh_token(busy_next["refresh_token"])]


async def test_quota_counters_of_days_before_yesterday_go(session: AsyncSession, settings: Settings) -> None:
    """`usage_daily` kept a row per member and day for ever; only today's is read (the day's first send starts
    from the ledger) and yesterday's may be given back just after midnight. Older ones now go."""
    team = await create_team(session, settings={"quota": {"messages_per_user_per_day": 3}})
    user, other = await create_user(session, team=team), await create_user(session, team=team)
    today = utcnow().date()
    session.add_all(
        UsageDaily(user_id=who.id, day=today - timedelta(days=age), generations=1)
        for who in (user, other)
        for age in (400, 40, 2, 1, 0)
    )
    await session.commit()
    assert (await retention.sweep(session=session, settings=settings)).usage_daily == 6
    left = (await session.execute(select(UsageDaily.user_id, UsageDaily.day).order_by(UsageDaily.day))).all()
    assert sorted(day for _, day in left) == [today - timedelta(days=1)] * 2 + [today] * 2
    # Today's count goes on where it was: two more, then the quota.
    caller = Caller(id=user.id, team_id=team.id)
    await usage_service.claim_generation(session=session, user=caller)
    await usage_service.claim_generation(session=session, user=caller)
    with pytest.raises(RateLimited):
        await usage_service.claim_generation(session=session, user=caller)


async def test_retention_on_sqlite(tmp_path: Path) -> None:
    """The embedded database runs the same batched deletes (a two-column key picked by a row value), unsent
    uploads and unused contents (the same statements, which lock nothing there) and ended invites included,
    and clears spent refresh tokens' successors."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'retention.db'}"
    await asyncio.to_thread(run_migrations, url)
    lite = create_app(make_settings(url, tmp_path))
    try:
        async with app_state(lite).db.sessionmaker() as s:
            team = await create_team(s)
            user = await create_user(s, team=team)
            chat = await create_chat(s, user=user, agent=await create_agent(s, team=team))
            today = utcnow().date()
            s.add_all([expired_token(user, ago=timedelta(days=3)), expired_token(user, ago=timedelta(hours=1))])
            spent = expired_token(user, ago=-timedelta(days=5))  # expires in 5 days, spent an hour ago
            spent.used_at, spent.successor_encrypted = utcnow() - timedelta(hours=1), "a successor"
            s.add(spent)
            s.add_all(UsageDaily(user_id=user.id, day=today - timedelta(days=age), generations=1) for age in (5, 1))
            s.add_all([invite_row(team.id, revoked_at=utcnow() - timedelta(days=31)), invite_row(team.id)])
            s.add_all(blob(content, ago=timedelta(days=2)) for content in (b"unsent", b"sent", b"unused"))
            await s.flush()
            s.add_all(
                File(
                    chat_id=chat.id,
                    team_id=team.id,
                    user_id=user.id,
                    message_id=message_id,
                    filename="f.txt",
                    content_type="text/plain",
                    size=4,
                    sha256=sha(content),
                    created_at=utcnow() - timedelta(days=2),
                )
                for content, message_id in ((b"unsent", None), (b"sent", uuid.uuid4()))
            )
            await s.commit()
            registry = app_state(lite).generations
            await registry.startup()
            assert registry.recovered
            assert registry.sweeping is not None
            await registry.sweeping  # on its own task (a slow sweep holds up nothing)
            assert [row.successor_encrypted for row in await token_rows(s)] == [None, None]
            assert list((await s.execute(select(UsageDaily.day))).scalars()) == [today - timedelta(days=1)]
            assert list((await s.execute(select(Invite.revoked_at))).scalars()) == [None]
            assert [sent is not None for sent in (await s.execute(select(File.message_id))).scalars()] == [True]
            assert await hashes_left(s) == {sha(b"sent")}
    finally:
        await shutdown(lite)


@pytest.mark.settings(WORKER_HEARTBEAT_INTERVAL=0.2)
async def test_a_slow_sweep_holds_up_neither_start_up_nor_the_heartbeat(
    app: FastAPI, session: AsyncSession, settings: Settings
) -> None:
    """The sweep ran inside the heartbeat's loop (and the start-up's recovery): while a batch waited on the
    database (here a table lock, as a migration's CREATE INDEX takes), the worker stopped beating, and past
    STALE_HEARTBEATS intervals another worker's recovery marked its live answers interrupted. It now runs on a
    task of its own: start-up and heartbeats go on, the sweep finishes once the table is free, and a shutdown
    does not wait for it."""
    user = await create_user(session)
    session.add(UsageDaily(user_id=user.id, day=utcnow().date() - timedelta(days=5), generations=1))
    await session.commit()
    registry = app_state(app).generations

    async def beat_of_worker() -> Any:
        session.expire_all()
        return await session.scalar(select(Worker.heartbeat_at).where(Worker.id == registry.worker_id))

    holder = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE usage_daily IN ACCESS EXCLUSIVE MODE")
            async with asyncio.timeout(5):  # held here until the lock went
                await registry.startup()
            assert registry.recovered
            await until_a_statement_waits(holder, "SELECT usage_daily.%")  # picking a batch
            first = await beat_of_worker()
            await asyncio.sleep(1.0)  # five heartbeats (a recovery among them), while the sweep still waits
            assert await beat_of_worker() > first
            assert registry.sweeping is not None
            assert not registry.sweeping.done()
            # One sweep at a time: the recovery meanwhile started no second one (each would hold a connection).
            await holder.execute("SELECT pg_stat_clear_snapshot()")
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'SELECT usage_daily.%'"
            )
            assert waiting == 1
            await session.rollback()
        async with asyncio.timeout(10):
            await registry.sweeping
        assert list((await session.execute(select(UsageDaily.day))).scalars()) == []
        await session.rollback()

        async with holder.transaction():
            await holder.execute("LOCK TABLE error_logs IN ACCESS EXCLUSIVE MODE")
            await until_a_statement_waits(holder, "SELECT error_logs.%")  # the next sweep, three beats on
            async with asyncio.timeout(5):
                await registry.shutdown()  # cancels it: the worker is unregistered in time
            assert registry.sweeping is None
    finally:
        await holder.close()


async def test_a_failed_sweep_is_logged_and_the_next_recovery_sweeps_again(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep that fails (the database is down) logs `retention sweep postponed` (OPERATIONS.md) and ends its
    task quietly (no "exception was never retrieved"); the next recovery starts another."""
    registry = app_state(app).generations
    sweeps = 0

    async def failing(**_kwargs: Any) -> retention.Swept:
        nonlocal sweeps
        sweeps += 1
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(retention, "sweep", failing)
    await registry.startup()
    assert registry.sweeping is not None
    first = registry.sweeping
    await first
    assert first.exception() is None
    assert "retention sweep postponed (ConnectionRefusedError)" in caplog.text
    await registry._register_and_recover()  # the periodic recovery, as every 3rd heartbeat runs it
    assert registry.sweeping is not first
    await registry.sweeping
    assert sweeps == 2


# --- unsent uploads and unused file contents ---------------------------------------------------------


def blob(content: bytes, *, ago: timedelta) -> FileBlob:
    return FileBlob(sha256=sha(content), size=len(content), data=content, created_at=utcnow() - ago)


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


async def upload(client: httpx.AsyncClient, setup: ChatSetup, content: bytes) -> str:
    part = ("note.txt", content, "text/plain")
    response = await client.post(f"/api/chats/{setup.chat.id}/files", files={"file": part}, headers=setup.headers)
    assert response.status_code == 201, response.text
    file_id: str = response.json()["id"]
    return file_id


async def send(client: httpx.AsyncClient, setup: ChatSetup, file_ids: list[str]) -> httpx.Response:
    body = {"content": "See the file", "file_ids": file_ids}
    return await client.post(f"/api/chats/{setup.chat.id}/messages", json=body, headers=setup.headers)


async def age(session: AsyncSession, file_ids: list[str], ago: timedelta) -> None:
    """Date these uploads (and their bytes, written with them) `ago`."""
    ids = [uuid.UUID(i) for i in file_ids]
    hashes = select(File.sha256).where(File.id.in_(ids)).scalar_subquery()
    await session.execute(update(File).where(File.id.in_(ids)).values(created_at=utcnow() - ago))
    await session.execute(update(FileBlob).where(FileBlob.sha256.in_(hashes)).values(created_at=utcnow() - ago))
    await session.commit()


async def file_ids_left(session: AsyncSession) -> set[str]:
    return {str(i) for i in (await session.execute(select(File.id))).scalars()}


async def hashes_left(session: AsyncSession) -> set[str]:
    return set((await session.execute(select(FileBlob.sha256))).scalars())


@pytest.fixture
async def setup(session: AsyncSession, settings: Settings, fake: FakeN8n) -> ChatSetup:
    return await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")


async def test_unsent_uploads_go_after_the_retention_with_their_bytes(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup
) -> None:
    """Uploads never sent stayed for ever with their bytes: a user could store 20 files per chat, in as many chats
    as they like, and the unsent cap kept a chat past it refusing uploads for good. An upload still unsent
    UPLOAD_RETENTION_HOURS (24) after it was made now goes, and its bytes with it unless a file still uses them;
    sent files, younger uploads and shared bytes stay."""
    sent = await upload(client, setup, b"sent and shared bytes")
    assert (await send(client, setup, [sent])).status_code == 200
    lonely = await upload(client, setup, b"never sent")
    sharing = await upload(client, setup, b"sent and shared bytes")  # the sent file's bytes, unsent again
    young = await upload(client, setup, b"uploaded an hour ago")
    await age(session, [sent, lonely, sharing], timedelta(hours=25))
    await age(session, [young], timedelta(hours=23))

    swept = await retention.sweep(session=session, settings=settings)
    assert (swept.unsent_files, swept.file_blobs) == (2, 1)
    assert await file_ids_left(session) == {sent, young}
    assert await hashes_left(session) == {sha(b"sent and shared bytes"), sha(b"uploaded an hour ago")}
    # Gone for the API too: no download, and a send naming it is refused and stores nothing.
    assert (await client.get(f"/api/chats/{setup.chat.id}/files/{lonely}", headers=setup.headers)).status_code == 404
    refused = await send(client, setup, [lonely])
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["msg"] == FILE_IDS_INVALID
    assert (await client.get(f"/api/chats/{setup.chat.id}/files/{sent}", headers=setup.headers)).status_code == 200
    assert (await retention.sweep(session=session, settings=settings)) == retention.Swept()


async def test_an_old_sent_file_and_its_bytes_stay_while_an_old_unsent_one_goes(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup
) -> None:
    """Only uploads no message carries are swept: a file attached to a message as old as an unsent upload
    (bytes of its own, shared with no other file) stays with its bytes and still downloads, while the unsent
    one goes with its bytes. (A sweep dropping the `message_id IS NULL` condition was caught only on SQLite.)"""
    sent = await upload(client, setup, b"sent long ago")
    assert (await send(client, setup, [sent])).status_code == 200
    unsent = await upload(client, setup, b"never sent either")
    await age(session, [sent, unsent], timedelta(days=30))

    swept = await retention.sweep(session=session, settings=settings)
    assert (swept.unsent_files, swept.file_blobs) == (1, 1)
    assert await file_ids_left(session) == {sent}
    assert await hashes_left(session) == {sha(b"sent long ago")}
    download = await client.get(f"/api/chats/{setup.chat.id}/files/{sent}", headers=setup.headers)
    assert download.status_code == 200
    assert download.content == b"sent long ago"


@pytest.mark.settings(UPLOAD_RETENTION_HOURS=0)
async def test_no_upload_retention_keeps_unsent_uploads(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup
) -> None:
    kept = await upload(client, setup, b"kept for ever")
    await age(session, [kept], timedelta(days=400))
    assert (await retention.sweep(session=session, settings=settings)) == retention.Swept()
    assert await file_ids_left(session) == {kept}
    assert await hashes_left(session) == {sha(b"kept for ever")}


async def test_a_backlog_of_unsent_uploads_goes_in_batches_over_sweeps(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    setup: ChatSetup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep deletes unsent uploads SWEEP_BATCH at a time, batch after batch while they fill one, at most
    SWEEP_MAX_BATCHES (here 2 of 2): a backlog (the first sweep after an upgrade) goes over a few sweeps."""
    monkeypatch.setattr(retention, "SWEEP_BATCH", 2)
    monkeypatch.setattr(retention, "SWEEP_MAX_BATCHES", 2)
    backlog = [await upload(client, setup, f"never sent {i}".encode()) for i in range(5)]
    await age(session, backlog, timedelta(hours=25))
    assert (await retention.sweep(session=session, settings=settings)).unsent_files == 4
    assert (await retention.sweep(session=session, settings=settings)).unsent_files == 1
    assert await file_ids_left(session) == set()


async def test_unsent_uploads_bytes_go_with_them_whatever_share_of_the_contents_a_sweep_examines(
    client: httpx.AsyncClient,
    session: AsyncSession,
    settings: Settings,
    setup: ChatSetup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bytes of the unsent uploads a batch deleted are collected right after it, not left to the sweep's
    bounded examination of unused contents, which on a big table reaches them only some sweeps later (here it
    examines nothing: one window, starting past every key)."""
    monkeypatch.setattr(retention, "SWEEP_MAX_BATCHES", 1)
    unsent = [await upload(client, setup, f"never sent {i}".encode()) for i in range(3)]
    await age(session, unsent, timedelta(hours=25))
    monkeypatch.setattr(secrets, "token_hex", lambda _n: "f" * 64)
    swept = await retention.sweep(session=session, settings=settings)
    assert (swept.unsent_files, swept.file_blobs) == (3, 3)
    assert await hashes_left(session) == set()


async def test_a_send_attaching_an_upload_the_sweep_is_deleting_is_refused_whole(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup
) -> None:
    """The race, in its one order that needs a guard: the sweep has deleted the upload (its row locked, not yet
    committed) when a send marks it as sent. The send's UPDATE waits for the row, finds it gone, and the send is
    refused with 422, storing nothing: no message names a deleted file. (A trigger holds the sweep's
    transaction open at the deletion until the send waits.)"""
    doomed = await upload(client, setup, b"deleted while being sent")
    await age(session, [doomed], timedelta(hours=25))
    holder = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    await holder.execute(
        "CREATE FUNCTION retention_test_pause() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN OLD; END $$;"
        " CREATE TRIGGER retention_test_pause AFTER DELETE ON files FOR EACH ROW"
        " EXECUTE FUNCTION retention_test_pause()"
    )
    try:
        await holder.execute("SELECT pg_advisory_lock(4242)")
        async with app_state(app).db.sessionmaker() as sweeper:
            sweeping = asyncio.ensure_future(retention.sweep(session=sweeper, settings=settings))
            await until_a_statement_waits(holder, "DELETE FROM files%")  # the row deleted and locked
            sending = asyncio.ensure_future(send(client, setup, [doomed]))
            await until_a_statement_waits(holder, "UPDATE files%")  # the send waits for that row
            await holder.execute("SELECT pg_advisory_unlock(4242)")
            async with asyncio.timeout(10):
                swept, refused = await sweeping, await sending
        assert swept.unsent_files == 1
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"][0]["msg"] == FILE_IDS_INVALID
        chat_id = setup.chat.id
        session.expire_all()
        assert await file_ids_left(session) == set()
        assert list(await session.execute(select(Message.id).where(Message.chat_id == chat_id))) == []
        assert await session.scalar(select(Chat.message_count).where(Chat.id == chat_id)) == 0
    finally:
        await session.rollback()  # the DDL waits for every transaction that read `files`
        await holder.execute("DROP TRIGGER retention_test_pause ON files; DROP FUNCTION retention_test_pause()")
        await holder.close()


async def test_an_upload_a_send_is_attaching_is_left_to_the_send(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup
) -> None:
    """The other order: a send has marked the upload as sent but not committed yet. The sweep does not wait for
    it (the row is locked: skipped) and does not take it; once the send commits the file is sent and stays."""
    attaching = await upload(client, setup, b"being sent")
    other = await upload(client, setup, b"left unsent")
    await age(session, [attaching, other], timedelta(hours=25))
    holder = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        async with holder.transaction():
            # What files.attach runs inside the send's transaction.
            marked = await holder.execute(
                "UPDATE files SET message_id = $1 WHERE id = $2 AND message_id IS NULL",
                uuid.uuid4(),
                uuid.UUID(attaching),
            )
            assert marked == "UPDATE 1"
            async with asyncio.timeout(5):
                swept = await retention.sweep(session=session, settings=settings)
            assert swept.unsent_files == 1
            assert await file_ids_left(session) == {attaching}
            await session.rollback()
        async with asyncio.timeout(5):
            assert (await retention.sweep(session=session, settings=settings)).unsent_files == 0
        row = (await session.execute(select(File).where(File.id == uuid.UUID(attaching)))).scalar_one()
        assert row.message_id is not None
        assert await hashes_left(session) == {sha(b"being sent")}
    finally:
        await holder.close()


async def test_unused_file_contents_older_than_the_margin_go(session: AsyncSession, settings: Settings) -> None:
    """Bytes no file and no share copy names (a crash between a deletion's commit and its collection, data of
    older versions) stayed for ever. They now go once older than UNUSED_BLOB_MARGIN, all of them in one sweep
    while the table is small (the scan starts at a random key and wraps round); bytes a file or a share's copy
    names stay, and so do bytes written within the margin."""
    team = await create_team(session)
    user = await create_user(session, team=team)
    chat = await create_chat(session, user=user, agent=await create_agent(session, team=team))
    unused = [blob(f"unused {i}".encode(), ago=timedelta(hours=2)) for i in range(12)]
    fresh = blob(b"written a minute ago", ago=timedelta(minutes=1))
    filed = blob(b"a file's", ago=timedelta(days=90))
    shared = blob(b"a share's copy's", ago=timedelta(days=90))
    session.add_all([*unused, fresh, filed, shared])
    await session.flush()
    share = Share(team_id=user.team_id, messages=[], message_count=0)
    session.add(share)
    await session.flush()
    session.add(
        File(
            chat_id=chat.id,
            team_id=user.team_id,
            user_id=user.id,
            message_id=uuid.uuid4(),
            filename="a.txt",
            content_type="text/plain",
            size=filed.size,
            sha256=filed.sha256,
        )
    )
    session.add(ShareFile(share_id=share.id, filename="b.txt", content_type="text/plain", size=1, sha256=shared.sha256))
    await session.commit()

    assert (await retention.sweep(session=session, settings=settings)).file_blobs == 12
    assert await hashes_left(session) == {fresh.sha256, filed.sha256, shared.sha256}


async def test_a_sweep_examines_a_bounded_share_of_the_contents(
    session: AsyncSession, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding unused bytes means looking for their files: a sweep examines at most SWEEP_MAX_BATCHES windows of
    SWEEP_BATCH contents (here 2 of 3), never the whole table, so it stays cheap however many files there are.
    Starting at a random key, successive sweeps cover every content."""
    monkeypatch.setattr(retention, "SWEEP_BATCH", 3)
    monkeypatch.setattr(retention, "SWEEP_MAX_BATCHES", 2)
    session.add_all(blob(f"unused {i}".encode(), ago=timedelta(hours=2)) for i in range(20))
    await session.commit()
    sweeps = []
    async with asyncio.timeout(20):
        while await hashes_left(session):
            sweeps.append((await retention.sweep(session=session, settings=settings)).file_blobs)
    assert max(sweeps) <= 6
    assert sum(sweeps) == 20


async def test_a_sweep_without_the_unused_content_pass_still_takes_the_bytes_of_the_uploads_it_deletes(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup
) -> None:
    """`unused_blobs=False` (most of a worker's sweeps) skips the examination of contents nothing names: an old
    unused content stays for a later sweep, while the unsent uploads the sweep deletes still take their bytes."""
    unsent = await upload(client, setup, b"never sent")
    await age(session, [unsent], timedelta(hours=25))
    session.add(blob(b"left over by a crash", ago=timedelta(hours=2)))
    await session.commit()

    swept = await retention.sweep(session=session, settings=settings, unused_blobs=False)
    assert (swept.unsent_files, swept.file_blobs) == (1, 1)
    assert await hashes_left(session) == {sha(b"left over by a crash")}
    assert (await retention.sweep(session=session, settings=settings)).file_blobs == 1
    assert await hashes_left(session) == set()


async def test_a_worker_looks_for_unused_contents_on_its_first_sweep_and_one_sweep_in_ten_after(
    app: FastAPI, session: AsyncSession
) -> None:
    """The examination of contents nothing names (a backstop: deletions collect their own bytes) ran on every
    sweep of every worker, up to 10,000 contents every 30 s, mostly finding nothing. A worker now runs it on its
    first sweep and then on every UNUSED_BLOBS_EVERY-th (10) only."""
    registry = app_state(app).generations
    found = []
    for _ in range(2 * retention.UNUSED_BLOBS_EVERY + 1):
        if not await hashes_left(session):
            session.add(blob(b"left over by a crash", ago=timedelta(hours=2)))
        await session.commit()
        await registry.sweep_retention()
        found.append(not await hashes_left(session))
        await session.rollback()
    assert [i for i, gone in enumerate(found) if gone] == [0, 10, 20]


async def test_bytes_named_again_while_a_batch_deletes_them_stay_and_the_rest_still_go(
    session: AsyncSession,
    settings: Settings,
    setup: ChatSetup,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file or share copy naming unused bytes may commit after the batch's DELETE read the table and before it
    removes them: the foreign key, which reads the latest rows, then fails the whole batch. The batch's bytes then
    go one by one (as a deletion's own collection does), the one named again stays, and the sweep goes on. (The
    sweep is made blind to references here, so that its DELETE meets the foreign key every time.)"""
    named = await upload(client, setup, b"named by a file")
    await age(session, [named], timedelta(hours=2))
    session.add(blob(b"really unused", ago=timedelta(hours=2)))
    await session.commit()

    def blind(window: ColumnElement[bool], cutoff: Any) -> ColumnElement[bool]:
        return and_(window, FileBlob.created_at < cutoff)

    monkeypatch.setattr(retention, "_unused_blob", blind)
    assert (await retention.sweep(session=session, settings=settings)).file_blobs == 1
    assert await hashes_left(session) == {sha(b"named by a file")}


async def test_an_upload_of_old_unused_bytes_makes_them_young_again(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup
) -> None:
    """An upload whose bytes are stored already (unused, say) claims that row. It also dates it now, so a sweep
    whose statement began before the upload committed, and reads the row again when it locks it, finds it
    inside the margin and leaves it instead of failing its batch on the new file's reference."""
    session.add(blob(b"old unused bytes", ago=timedelta(days=3)))
    await session.commit()
    await upload(client, setup, b"old unused bytes")
    session.expire_all()
    stamp = await session.scalar(select(FileBlob.created_at).where(FileBlob.sha256 == sha(b"old unused bytes")))
    assert stamp is not None
    assert stamp > utcnow() - timedelta(minutes=1)


# --- invites -------------------------------------------------------------------------------------


def invite_row(team_id: uuid.UUID, **fields: Any) -> Invite:
    values: dict[str, Any] = {"expires_at": utcnow() + timedelta(days=7), "max_uses": 1, "uses": 0, **fields}
    return Invite(team_id=team_id, token_hash=hash_invite_token(new_token()), role="user", **values)


@pytest.mark.settings(RATE_LIMIT_ENABLED=False)
async def test_invites_go_some_days_after_they_ended(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Expired, revoked and used-up invites stayed in the admin's list for ever. INVITE_RETENTION_DAYS (30)
    after they ended they now go; until then the list shows them with their status, as before."""
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    now = utcnow()
    long_ago, lately = now - timedelta(days=31), now - timedelta(days=29)
    rows = {
        "expired long ago": invite_row(team.id, expires_at=long_ago),
        "expired lately": invite_row(team.id, expires_at=lately),
        "revoked long ago": invite_row(team.id, revoked_at=long_ago),
        "revoked lately": invite_row(team.id, revoked_at=lately),
        "used up long ago": invite_row(team.id, uses=1, used_up_at=long_ago),
        "used up lately": invite_row(team.id, uses=1, used_up_at=lately),
        # Used up before `used_up_at` existed: dated by its expiry.
        "used up, undated, expired long ago": invite_row(team.id, uses=1, expires_at=long_ago),
        "used up, undated, live": invite_row(team.id, uses=1),
        "active": invite_row(team.id, max_uses=5, uses=4),
    }
    session.add_all(rows.values())
    await session.commit()
    ids = {name: str(row.id) for name, row in rows.items()}

    assert (await retention.sweep(session=session, settings=settings)).invites == 4
    listed = await web.get("/api/teams/current/invites", headers=auth_headers(settings, admin))
    assert listed.status_code == 200
    statuses = {i["id"]: i["status"] for i in listed.json()}
    assert statuses == {
        ids["expired lately"]: "expired",
        ids["revoked lately"]: "revoked",
        ids["used up lately"]: "used_up",
        ids["used up, undated, live"]: "used_up",
        ids["active"]: "active",
    }


@pytest.mark.settings(RATE_LIMIT_ENABLED=False)
async def test_the_last_use_of_an_invite_dates_its_end(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """Registering with an invite's last allowed use records when (`used_up_at`, not shown by the API): the
    sweep counts the retention from there, not from the expiry weeks later."""
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    created = await web.post(
        "/api/teams/current/invites", json={"max_uses": 2, "expires_in_days": 30}, headers=auth_headers(settings, admin)
    )
    token, invite_id = created.json()["token"], uuid.UUID(created.json()["id"])
    headers = auth_headers(settings, admin)

    async def used_up_at() -> Any:
        session.expire_all()
        return await session.scalar(select(Invite.used_up_at).where(Invite.id == invite_id))

    for n, email in enumerate(["first@example.com", "second@example.com"]):
        body = {"invite_token": token, "email": email, "password": "long-enough-pw"}
        assert (await web.post("/api/auth/register", json=body)).status_code == 201
        if n == 0:
            assert await used_up_at() is None
    stamp = await used_up_at()
    assert stamp is not None
    assert stamp > utcnow() - timedelta(minutes=1)
    assert "used_up_at" not in (await web.get("/api/teams/current/invites", headers=headers)).json()[0]
    await session.execute(update(Invite).where(Invite.id == invite_id).values(used_up_at=utcnow() - timedelta(days=31)))
    await session.commit()
    assert (await retention.sweep(session=session, settings=settings)).invites == 1


@pytest.mark.settings(INVITE_RETENTION_DAYS=0)
async def test_no_invite_retention_keeps_ended_invites(session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session)
    long_ago = utcnow() - timedelta(days=4000)
    session.add_all(
        [
            invite_row(team.id, expires_at=long_ago),
            invite_row(team.id, revoked_at=long_ago, uses=1, used_up_at=long_ago),
        ]
    )
    await session.commit()
    assert (await retention.sweep(session=session, settings=settings)).invites == 0


async def test_revoking_an_invite_the_sweep_is_deleting_is_a_404(
    web: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    """An admin revoking an ended invite just as the sweep deletes it: the revocation read the row, then its
    UPDATE found it gone, and the ORM's "0 rows matched" was a 500. The revocation now locks the row it reads:
    it waits for the sweep's transaction and answers the 404 of an invite that does not exist."""
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    ended = invite_row(team.id, expires_at=utcnow() - timedelta(days=31))
    session.add(ended)
    await session.commit()
    invite_id, headers = ended.id, auth_headers(settings, admin)
    holder = await asyncpg.connect(_plain_url(settings.DATABASE_URL), timeout=5)
    try:
        async with holder.transaction():  # the sweep's batch, deleting the invite
            assert await holder.execute("DELETE FROM invites WHERE id = $1", invite_id) == "DELETE 1"
            revoking = asyncio.ensure_future(web.delete(f"/api/teams/current/invites/{invite_id}", headers=headers))
            await until_a_statement_waits(holder, "%invites%")
        async with asyncio.timeout(10):
            revoked = await revoking
        assert revoked.status_code == 404, revoked.text
    finally:
        await holder.close()
