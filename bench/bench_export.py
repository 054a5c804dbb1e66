"""Memory and time of one chat's export (`GET /api/chats/{id}/export`, JSON and Markdown) vs the chat's length.

`python -m bench.bench_export` (about a minute on 2 cores). In-process, against PostgreSQL (its own throwaway
database, migrated, dropped at the end, even on failure): one chat of `--messages` messages of `--chars`
characters each (one branch, so the Markdown holds them all; 35 of every 4,000 characters are `é`), written by
PostgreSQL itself. For each format, after one warm-up export of a two-message chat: the export served as a
server serves it (raw ASGI: each piece of the body handed on and dropped; an HTTP test client would keep the
whole body), its wall time (best of `--runs`, without tracemalloc) and its peak of Python allocations (one
more run, under tracemalloc, which slows it). Run it in a tree before and after a change to compare: it uses
nothing but the route.

    .venv/bin/python -m bench.bench_export
    .venv/bin/python -m bench.bench_export --messages 200 --runs 1   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.fernet import Fernet
from fastapi import FastAPI

from app.config import load_settings
from app.migrations import alembic_config
from main import create_app, shutdown

ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

FILL = (
    "INSERT INTO messages (id, chat_id, parent_id, role, content, status, created_at, updated_at)"
    " SELECT md5($1::uuid::text || i)::uuid, $1::uuid, CASE WHEN i > 0 THEN md5($1::uuid::text || (i - 1))::uuid END,"
    " CASE WHEN i % 2 = 0 THEN 'user' ELSE 'assistant' END,"
    " left(repeat(md5(i::text) || ' é ', $3::integer / 35 + 1), $3::integer), 'complete',"
    " now() - interval '1 day' + i * interval '1 millisecond', now()"
    " FROM generate_series(0, $2::integer - 1) AS i"
)
BRANCH = (
    "UPDATE chats SET current_message_id = md5($1::uuid::text || ($2::integer - 1))::uuid, message_count = $2"
    " WHERE id = $1::uuid"
)


async def served(app: FastAPI, path: str, headers: dict[str, str]) -> tuple[int, int]:
    """The status and the body's size of a GET served through the app, each body piece dropped."""
    from tests.live import bodyless_request, http_scope

    scope = http_scope("GET", path, headers)
    receive = bodyless_request()
    status, size = 0, 0

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            size += len(message.get("body", b""))

    await app(scope, receive, send)
    return status, size


async def chat_of(app: FastAPI, settings: Any, count: int, chars: int) -> tuple[uuid.UUID, dict[str, str]]:
    """A user with a chat of `count` messages, and the user's auth headers."""
    from app.state import app_state
    from tests.factories import auth_headers, create_agent, create_chat, create_team, create_user

    async with app_state(app).db.sessionmaker() as session:
        team = await create_team(session)
        user = await create_user(session, team=team)
        agent = await create_agent(session, team=team)
        chat = await create_chat(session, user=user, agent=agent, title="Long")
        headers = auth_headers(settings, user)
    conn = await asyncpg.connect(settings.DATABASE_URL.replace("+asyncpg", ""))
    try:
        await conn.execute(FILL, chat.id, count, chars)
        await conn.execute(BRANCH, chat.id, count)
        await conn.execute("ANALYZE messages")
    finally:
        await conn.close()
    return chat.id, headers


async def measure(url: str, count: int, chars: int, runs: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as data:
        settings = load_settings(
            _env_file=None,
            APP_ENV="test",
            DATABASE_URL=url,
            DATA_DIR=Path(data),
            JWT_SECRET="bench-" + "x" * 40,
            ENCRYPTION_KEY=Fernet.generate_key().decode(),
            REDIS_URL=None,
            LOG_LEVEL="WARNING",
        )
        app = create_app(settings)
        try:
            chat_id, headers = await chat_of(app, settings, count, chars)
            small_id, small_headers = await chat_of(app, settings, 2, 10)
            results = []
            for fmt in ("json", "markdown"):
                path = f"/api/chats/{chat_id}/export?format={fmt}"
                await served(app, f"/api/chats/{small_id}/export?format={fmt}", small_headers)
                times = []
                for _ in range(runs):
                    gc.collect()
                    started = time.perf_counter()
                    status, size = await served(app, path, headers)
                    times.append(time.perf_counter() - started)
                    assert status == 200, status
                gc.collect()
                tracemalloc.start()
                try:
                    await served(app, path, headers)
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                results.append({"format": fmt, "bytes": size, "seconds": min(times), "peak": peak})
            return results
        finally:
            await shutdown(app)


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--chars", type=int, default=4_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    name = f"bench_export_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        url = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"
        from alembic import command

        command.upgrade(alembic_config(url), "head")
        results = asyncio.run(measure(url, args.messages, args.chars, args.runs))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text_mb = args.messages * (args.chars + args.chars // 35) / 1e6
    python = sys.version.split()[0]
    print(f"{args.messages} messages of {args.chars} characters ({text_mb:.1f} MB of text), tree {head}, {python}")
    print(f"| format | body (MB) | time (s, best of {args.runs}) | peak Python allocations (MB) |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['format']} | {r['bytes'] / 1e6:.1f} | {r['seconds']:.2f} | {r['peak'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
