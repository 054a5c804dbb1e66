"""The stream against a live uvicorn: pings, disconnects, checkpoints, shutdown, kill + restart, two workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

from app.config import Settings
from app.db import utcnow
from app.models import ErrorLog, Worker
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import ROOT, TEST_ENCRYPTION_KEY, TEST_JWT_SECRET, make_settings
from tests.factories import branch_of
from tests.live import (
    ChatSetup,
    LiveServer,
    chat_with_agent,
    data_events,
    free_port,
    live_server,
    parse_sse,
    streamed_text,
)
from tools.fake_n8n import FakeN8n, ndjson, raw_answer

pytestmark = pytest.mark.slow
FAST = {
    "N8N_READ_TIMEOUT": 0.5,
    "N8N_FIRST_BYTE_TIMEOUT": 0.5,
    "STREAM_PING_INTERVAL": 0.2,
    "WORKER_HEARTBEAT_INTERVAL": 0.2,
    "SHUTDOWN_GRACE_SECONDS": 0.3,
}


def fast_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(database_url, tmp_path, **{**FAST, **overrides})


async def assistant_of(app: FastAPI, chat_id: uuid.UUID) -> dict[str, Any]:
    async with app_state(app).db.sessionmaker() as s:
        return (await branch_of(s, chat_id))[-1]


async def settled(app: FastAPI, chat_id: uuid.UUID, within: float = 5) -> dict[str, Any]:
    """The assistant message once it is no longer streaming."""
    async with asyncio.timeout(within):
        while True:
            message = await assistant_of(app, chat_id)
            if message["status"] != "streaming":
                return message
            await asyncio.sleep(0.05)


async def first_checkpoint(app: FastAPI, chat_id: uuid.UUID, within: float = 10) -> dict[str, Any]:
    """The assistant message as first stored with some text while it still streams (polled, not slept for,
    so a busy machine only makes the wait longer)."""
    async with asyncio.timeout(within):
        while True:
            async with app_state(app).db.sessionmaker() as s:
                branch = await branch_of(s, chat_id)
            if (
                branch
                and branch[-1]["role"] == "assistant"
                and (branch[-1]["content"] or branch[-1]["status"] != "streaming")
            ):
                return branch[-1]
            await asyncio.sleep(0.02)


async def error_codes(app: FastAPI) -> list[str]:
    async with app_state(app).db.sessionmaker() as s:
        return list((await s.execute(select(ErrorLog.code))).scalars())


def checked_out(app: FastAPI) -> int:
    """Connections the app's pool has lent out (a QueuePool: these tests run on PostgreSQL)."""
    return cast(QueuePool, app_state(app).db.engine.pool).checkedout()


async def idle(server: LiveServer, within: float = 5) -> None:
    """No generation running and no database connection checked out on the live server."""
    async with asyncio.timeout(within):
        while True:
            if not server.running_generations() and not checked_out(server.app):
                return
            await asyncio.sleep(0.02)


async def read_events(server: LiveServer, setup: ChatSetup, content: str = "hello there", **kw: Any) -> str:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        url = f"/api/chats/{setup.chat.id}/messages"
        response = await client.post(url, json={"content": content}, headers=setup.headers, **kw)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-cache, no-transform"
        assert response.headers["x-accel-buffering"] == "no"
        return response.text


async def read_then_leave(server: LiveServer, setup: ChatSetup, *, until: str, content: str = "hello there") -> str:
    """Read until the streamed text has `until` (or a terminal event arrived), then drop the connection."""
    seen = ""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        url = f"/api/chats/{setup.chat.id}/messages"
        async with client.stream("POST", url, json={"content": content}, headers=setup.headers) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_text():
                seen += chunk
                events = data_events(parse_sse(seen.rsplit("\n\n", 1)[0]))
                if until in streamed_text(events) or events[-1].type in ("done", "error"):
                    break
    return seen


async def test_live_pings_while_waiting(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = fast_settings(database_url, tmp_path, N8N_READ_TIMEOUT=2, N8N_FIRST_BYTE_TIMEOUT=2)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=300")
        text = await read_events(server, setup)
        await idle(server)
    blocks = parse_sse(text)
    first_message = next(i for i, b in enumerate(blocks) if b.type == "message")
    assert any(b.comment == "ping" and b.id is None for b in blocks[:first_message])
    assert ": ping\n\n" in text
    events = data_events(blocks)
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert events[-1].type == "done"


#: Answer text with every character a line reader may break a line at: CR, LF and CRLF (SSE's own line ends),
#: and NEL, U+2028, U+2029, which JSON leaves as they are but Python's `str.splitlines` also splits at (httpx's
#: `aiter_lines`, and the SSE clients built on it); a BOM, which must not start the stream either.
BREAKING = ["a\rb", "c\nd", "e\r\nf", "g\x85h", "i\u2028j", "k\u2029l", '\u2028data: {"type": "done"}\u2028', "\ufeffm"]


async def test_live_line_breaks_in_the_text_never_split_an_event(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """A Python client reading the stream line by line (httpx's `aiter_lines`) gets one `id:` and one `data:`
    line per event, each data line one JSON object: a chunk holding a line separator neither cuts its event
    in two (a JSON error) nor starts a forged one; the text read is the text stored."""
    lines = [ndjson({"type": "begin", "metadata": {}})]
    lines += [ndjson({"type": "item", "content": text, "metadata": {}}) for text in BREAKING]
    lines.append(ndjson({"type": "end", "metadata": {}}))
    settings = fast_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, raw_answer(fake.url, b"".join(lines)))
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            url = f"/api/chats/{setup.chat.id}/messages"
            async with client.stream("POST", url, json={"content": "hi"}, headers=setup.headers) as response:
                assert response.status_code == 200
                read = [line async for line in response.aiter_lines()]
        stored = await settled(app, setup.chat.id)
        await idle(server)
    blocks: list[list[str]] = [[]]
    for line in read:
        if line:
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    events = [block for block in blocks if block and not block[0].startswith(":")]
    assert read[0] == "id: 1"  # no BOM before the first field
    assert [[line.split(":", 1)[0] for line in block] for block in events] == [["id", "data"]] * len(events)
    decoded = [json.loads(block[1].removeprefix("data: ")) for block in events]
    assert [block[0] for block in events] == [f"id: {n}" for n in range(1, len(events) + 1)]
    text = "".join(event["data"]["content"] for event in decoded if event["type"] == "message")
    assert text == stored["content"] == "".join(BREAKING)
    assert [event["type"] for event in decoded][-1] == "done"


OUTCOMES = [
    ("slow&delay_ms=80", "complete", None, "Echo: hello there and more words"),
    ("stall&hang=5&after=3", "error", "upstream_timeout", "Echo: hello there"),
    ("hang_headers&hang=5", "error", "upstream_timeout", ""),
    ("reset&after=3", "error", "upstream_disconnected", "Echo: hello there"),
    ("malformed&after=3", "error", "bad_upstream_response", "Echo: hello there"),
    ("oversized&after=3&size=300000", "error", "bad_upstream_response", "Echo: hello there"),
    ("in_band_error&after=3", "error", "upstream_error", "Echo: hello there"),
]


@pytest.mark.parametrize("leave", [False, True], ids=["client-stays", "client-leaves"])
@pytest.mark.parametrize(
    ("scenario", "status", "code", "content"), OUTCOMES, ids=[o[0].split("&")[0] for o in OUTCOMES]
)
async def test_live_fault_outcome(
    app: FastAPI,
    session: AsyncSession,
    database_url: str,
    tmp_path: Path,
    fake: FakeN8n,
    scenario: str,
    status: str,
    code: str | None,
    content: str,
    leave: bool,
) -> None:
    settings = fast_settings(database_url, tmp_path, N8N_MAX_LINE_BYTES=100_000)
    text_in = "hello there and more words"
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario={scenario}")
        if leave:
            seen = await read_then_leave(server, setup, until="Echo:", content=text_in)
        else:
            seen = await read_events(server, setup, content=text_in)
        message = await settled(app, setup.chat.id)
        await idle(server)
        codes = await error_codes(app)
    assert (message["status"], message["content"]) == (status, content)
    assert codes == ([] if code is None else [code])
    if code is not None:
        assert message["error"]["code"] == code
    if not leave:
        events = data_events(parse_sse(seen))
        terminal = [e for e in events if e.type in ("done", "error")]
        assert len(terminal) == 1
        assert terminal[0] is events[-1]
        assert terminal[0].type == ("done" if code is None else "error")


async def test_live_no_database_connection_held_while_waiting(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    # Heartbeat and checkpoints slowed down: they use a connection for a moment, the waiting stream must not.
    settings = fast_settings(
        database_url, tmp_path, N8N_READ_TIMEOUT=3, WORKER_HEARTBEAT_INTERVAL=60, STREAM_CHECKPOINT_INTERVAL=60
    )
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=stall&hang=1.5")
        task = asyncio.create_task(read_events(server, setup))
        async with asyncio.timeout(5):
            while True:
                if server.running_generations():
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        assert server.running_generations() == 1
        assert checked_out(server.app) == 0
        text = await task
        await idle(server)
    assert data_events(parse_sse(text))[-1].type == "done"


async def test_live_checkpoints_partial_text(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = fast_settings(database_url, tmp_path, STREAM_CHECKPOINT_INTERVAL=0.2)
    words = " ".join(f"w{i}" for i in range(30))
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=100")
        task = asyncio.create_task(read_events(server, setup, content=words))
        partial = await first_checkpoint(app, setup.chat.id)
        text = await task
        final = await settled(app, setup.chat.id)
        await idle(server)
    assert partial["status"] == "streaming"
    assert partial["content"]  # stored while streaming: a checkpoint, not the final write
    assert final["content"].startswith(partial["content"])
    assert len(partial["content"]) < len(final["content"])
    assert final["content"] == "Echo: " + words
    assert final["status"] == "complete"
    assert data_events(parse_sse(text))[-1].type == "done"


async def test_live_shutdown_interrupts_after_grace(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = fast_settings(database_url, tmp_path, N8N_READ_TIMEOUT=30, SHUTDOWN_GRACE_SECONDS=0.3)
    server = LiveServer(settings, graceful_timeout=1)
    await server.start()
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=stall&hang=30&after=2")
    await read_then_leave(server, setup, until="Echo: hello")
    await server.stop()
    message = await assistant_of(app, setup.chat.id)
    assert message["status"] == "interrupted"
    assert message["content"] == "Echo: hello"
    assert message["error"]["code"] == "interrupted"
    assert await error_codes(app) == ["interrupted"]
    async with app_state(app).db.sessionmaker() as s:
        assert (await s.execute(select(Worker))).scalars().all() == []


async def test_live_shutdown_lets_short_generation_finish(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = fast_settings(database_url, tmp_path, SHUTDOWN_GRACE_SECONDS=5)
    server = LiveServer(settings, graceful_timeout=1)
    await server.start()
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=150")
    await read_then_leave(server, setup, until="Echo:", content="a b c d e")
    await server.stop()
    message = await assistant_of(app, setup.chat.id)
    assert (message["status"], message["content"]) == ("complete", "Echo: a b c d e")


def _subprocess_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    env.update(
        APP_ENV="test",
        DATABASE_URL=settings.DATABASE_URL,
        DATA_DIR=str(settings.DATA_DIR),
        JWT_SECRET=TEST_JWT_SECRET,
        ENCRYPTION_KEY=TEST_ENCRYPTION_KEY,
        WEBHOOK_ALLOW_PRIVATE_NETWORKS="true",
        WORKER_HEARTBEAT_INTERVAL="0.2",
        STREAM_CHECKPOINT_INTERVAL="0.1",
        LOG_LEVEL="WARNING",
    )
    return env


async def test_kill_mid_stream_then_restart_marks_interrupted(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = fast_settings(database_url, tmp_path)
    process, port = await _start_subprocess(settings)
    try:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=150")
        url = f"http://127.0.0.1:{port}/api/chats/{setup.chat.id}/messages"
        seen = ""
        async with httpx.AsyncClient(timeout=10) as client:
            body = {"content": "one two three four five six seven eight"}
            async with client.stream("POST", url, json=body, headers=setup.headers) as response:
                async for chunk in response.aiter_text():
                    seen += chunk
                    if " three" in streamed_text(data_events(parse_sse(seen.rsplit("\n\n", 1)[0]))):
                        process.send_signal(signal.SIGKILL)
                        break
        async with asyncio.timeout(10):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    left = await assistant_of(app, setup.chat.id)
    assert left["status"] == "streaming"

    await asyncio.sleep(0.7)  # > 3 heartbeats of 0.2 s: the killed worker is now stale
    restarted = create_app(settings)
    try:
        await app_state(restarted).generations.startup()
        message = await assistant_of(restarted, setup.chat.id)
        await app_state(restarted).generations.shutdown()
    finally:
        await shutdown(restarted)
    assert message["status"] == "interrupted"
    assert message["error"]["code"] == "interrupted"
    assert message["content"].startswith("Echo: one")
    assert "Echo: one two three four five six seven eight".startswith(message["content"])
    assert await error_codes(app) == ["interrupted"]


async def test_starting_worker_leaves_live_workers_streams_alone(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    # A 0.5 s heartbeat (1.5 s staleness window): a loaded machine can delay a beat by a few hundred ms,
    # which must not make the live worker look dead; the stream outlasts the window, and so does the wait.
    settings = fast_settings(
        database_url, tmp_path, WORKER_HEARTBEAT_INTERVAL=0.5, N8N_READ_TIMEOUT=5, N8N_FIRST_BYTE_TIMEOUT=5
    )
    async with live_server(settings) as first:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=500")
        task = asyncio.create_task(read_events(first, setup, content="a b c d e f"))
        await asyncio.sleep(2.0)  # several heartbeats, longer than the 3 x 0.5 s staleness window
        second = create_app(settings)
        try:
            await app_state(second).generations.startup()
            during = await assistant_of(second, setup.chat.id)
            await app_state(second).generations.shutdown()
        finally:
            await shutdown(second)
        text = await task
        final = await settled(app, setup.chat.id)
        await idle(first)
    assert during["status"] == "streaming"
    assert final["status"] == "complete"
    assert await error_codes(app) == []
    assert final["content"] == "Echo: a b c d e f"
    assert data_events(parse_sse(text))[-1].type == "done"


async def test_startup_marks_streams_of_missing_workers_interrupted(
    app: FastAPI, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    orphan = {
        "id": str(uuid.uuid4()),
        "role": "assistant",
        "content": "half",
        "status": "streaming",
        "created_at": "2026-01-01T00:00:01Z",
        "_worker": str(uuid.uuid4()),
    }
    done = {
        "id": str(uuid.uuid4()),
        "role": "assistant",
        "content": "ok",
        "status": "complete",
        "created_at": "2026-01-01T00:00:00Z",
    }
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream", messages=[done, orphan])
    await app_state(app).generations.startup()
    await app_state(app).generations.shutdown()
    async with app_state(app).db.sessionmaker() as s:
        messages = await branch_of(s, setup.chat.id)
    assert messages[0] == done
    assert messages[1]["status"] == "interrupted"
    assert messages[1]["content"] == "half"
    assert await error_codes(app) == ["interrupted"]


async def test_startup_survives_unmigrated_database_and_retries(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    settings = make_settings(url, tmp_path, WORKER_HEARTBEAT_INTERVAL=0.05)
    application = create_app(settings)
    try:
        await app_state(application).generations.startup()
        assert app_state(application).generations.recovered is False
        from tests.conftest import run_migrations

        await asyncio.to_thread(run_migrations, url)
        async with asyncio.timeout(5):
            while True:
                if app_state(application).generations.recovered:
                    break
                await asyncio.sleep(0.02)
        async with app_state(application).db.sessionmaker() as s:
            workers = (await s.execute(select(Worker.id))).scalars().all()
        assert workers == [app_state(application).generations.worker_id]
    finally:
        await app_state(application).generations.shutdown()
        await shutdown(application)


async def test_running_worker_recovers_streams_of_a_worker_that_died_later(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    # Stale after 3 beats (0.6 s): long enough that the fresh dead-worker row still looks alive on a busy
    # machine when the first check runs (0.05 s made this test flaky), short enough to settle quickly.
    settings = make_settings(database_url, tmp_path, WORKER_HEARTBEAT_INTERVAL=0.2)
    dead = uuid.uuid4()
    async with app_state(app).db.sessionmaker() as s:
        s.add(Worker(id=dead))
        await s.commit()
    orphan = {
        "id": str(uuid.uuid4()),
        "role": "assistant",
        "content": "half",
        "status": "streaming",
        "created_at": "2026-01-01T00:00:00Z",
        "_worker": str(dead),
    }
    setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream", messages=[orphan])
    running = create_app(settings)
    try:
        await app_state(running).generations.startup()
        assert (await assistant_of(app, setup.chat.id))["status"] == "streaming"  # the dead worker looks alive
        message = await settled(app, setup.chat.id, within=5)
    finally:
        await app_state(running).generations.shutdown()
        await shutdown(running)
    assert message["status"] == "interrupted"
    assert message["content"] == "half"


async def test_live_shutdown_with_client_connected_interrupts(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = fast_settings(database_url, tmp_path, N8N_READ_TIMEOUT=30, SHUTDOWN_GRACE_SECONDS=0.2)
    server = LiveServer(settings, graceful_timeout=1)
    await server.start()
    try:
        url = f"{fake.url}/webhook/agent-stream?scenario=stall&hang=30&after=2"
        setup = await chat_with_agent(session, settings, url)
        reader = asyncio.create_task(read_events(server, setup))
        async with asyncio.timeout(5):
            while True:
                if any(f.get("path") == "/webhook/agent-stream" for f in fake.requests):
                    break
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    finally:
        await server.stop()
    outcome = (await asyncio.gather(reader, return_exceptions=True))[0]
    message = await assistant_of(app, setup.chat.id)
    assert message["status"] == "interrupted"
    assert message["content"] == "Echo: hello"
    assert await error_codes(app) == ["interrupted"]
    # The connection was closed under the client: no `done` reached it.
    assert isinstance(outcome, BaseException) or '"type": "done"' not in outcome


async def _start_subprocess(settings: Settings, *extra: str, **env: str) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "main:create_app", "--port", str(port), "--no-access-log"]
    process = await asyncio.create_subprocess_exec(*command, *extra, cwd=ROOT, env={**_subprocess_env(settings), **env})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        async with asyncio.timeout(20):
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        return process, port
                except httpx.TransportError:
                    await asyncio.sleep(0.05)


async def test_sigterm_with_client_connected_sends_terminal_event(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """uvicorn waits for open streams before the app shutdown runs; the grace starts at the signal instead,
    so a connected client still gets its one terminal event before the connection ends."""
    settings = fast_settings(database_url, tmp_path)
    process, port = await _start_subprocess(settings, "--timeout-graceful-shutdown", "10", SHUTDOWN_GRACE_SECONDS="0.5")
    try:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?scenario=slow&delay_ms=300")
        url = f"http://127.0.0.1:{port}/api/chats/{setup.chat.id}/messages"
        seen = ""
        signalled = False
        async with asyncio.timeout(15), httpx.AsyncClient(timeout=10) as client:
            body = {"content": " ".join(f"w{i}" for i in range(40))}
            async with client.stream("POST", url, json=body, headers=setup.headers) as response:
                async for chunk in response.aiter_text():
                    seen += chunk
                    if not signalled and "Echo:" in seen:
                        process.send_signal(signal.SIGTERM)
                        signalled = True
        async with asyncio.timeout(15):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    events = data_events(parse_sse(seen))
    terminal = [e for e in events if e.type in ("done", "error")]
    assert len(terminal) == 1
    assert terminal[0].data is not None
    assert terminal[0].data["data"]["code"] == "interrupted"
    message = await assistant_of(app, setup.chat.id)
    assert message["status"] == "interrupted"
    assert message["content"] == streamed_text(events)
    assert message["content"].startswith("Echo: w0")


async def test_own_orphaned_streaming_message_is_recovered(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """A `streaming` message of this very worker that it no longer runs (its final write failed) would
    block the chat with 409 forever; recovery marks it once older than the stale window."""
    settings = fast_settings(database_url, tmp_path)
    running = create_app(settings)
    worker = app_state(running).generations.worker_id
    old = (utcnow() - timedelta(seconds=5)).isoformat()
    orphan = {
        "id": str(uuid.uuid4()),
        "role": "assistant",
        "content": "half",
        "status": "streaming",
        "created_at": old,
        "_worker": str(worker),
    }
    fresh = {
        "id": str(uuid.uuid4()),
        "role": "assistant",
        "content": "",
        "status": "streaming",
        "created_at": utcnow().isoformat(),
        "_worker": str(worker),
    }
    first = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream", messages=[orphan])
    second = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream", messages=[fresh])
    try:
        await app_state(running).generations.startup()
        recovered = await assistant_of(app, first.chat.id)
        just_started = await assistant_of(app, second.chat.id)
    finally:
        await app_state(running).generations.shutdown()
        await shutdown(running)
    assert (recovered["status"], recovered["content"]) == ("interrupted", "half")
    assert just_started["status"] == "streaming"
