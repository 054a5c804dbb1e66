"""Benchmark the chat list (page 1, deep page, search) and open-chat endpoints on a seeded PostgreSQL.

Creates a throwaway database, migrates it, bulk-loads one team with N chats of M messages each through
COPY, then calls the real application (httpx ASGITransport, so no network) and prints p50/p99 latencies.
The database is dropped at the end, also on failure.

    .venv/bin/python -m bench.bench_chats                      # 10,000 chats x 100 messages
    .venv/bin/python -m bench.bench_chats --trgm               # the same with the pg_trgm search indexes
    .venv/bin/python -m bench.bench_chats --chats 500 --messages 20 --runs 20   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
from alembic import command
from cryptography.fernet import Fernet

from app.config import load_settings
from app.migrations import alembic_config
from app.security import create_token, hash_password_sync
from main import create_app, shutdown

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "agent workflow answer budget customer report invoice meeting summary deadline question model token "
    "server webhook team project release ticket support shipping order refund contract review draft plan "
    "quarter revenue forecast risk issue feature design query database latency cache stream message"
).split()
#: Planted in the body of one message of every 100th chat, never in a title.
RARE_WORD = "zanzibar"
#: The indexes docs/PERFORMANCE.md recommends for `q` (not in the migrations: they need the pg_trgm extension).
TRGM_DDL = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX ix_chats_title_trgm ON chats USING gin (title gin_trgm_ops)",
    "CREATE INDEX ix_messages_content_trgm ON messages USING gin (content gin_trgm_ops)",
]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


MESSAGE_COLUMNS = ["id", "chat_id", "parent_id", "role", "content", "status", "created_at", "updated_at"]


def chat_messages(
    rng: random.Random, chat_id: uuid.UUID, count: int, start: datetime, plant: bool
) -> tuple[list[tuple[object, ...]], uuid.UUID | None]:
    """One chat's messages as rows of one branch (each the parent of the next), and the last one's id."""
    rows: list[tuple[object, ...]] = []
    parent: uuid.UUID | None = None
    for i in range(count):
        content = sentence(rng, rng.randint(8, 30))
        if plant and i == count // 2:
            content += f" The {RARE_WORD} shipment is late."
        message_id = uuid.uuid4()
        at = start + timedelta(seconds=i)
        rows.append((message_id, chat_id, parent, "user" if i % 2 == 0 else "assistant", content, "complete", at, at))
        parent = message_id
    return rows, parent


async def seed(url: str, *, chats: int, messages: int) -> tuple[uuid.UUID, uuid.UUID, list[uuid.UUID]]:
    """One team, one admin owning every chat (the worst case for one user's list), one agent."""
    rng = random.Random(42)
    conn = await asyncpg.connect(url)
    try:
        team_id, user_id, agent_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        now = datetime.now(UTC)
        await conn.execute(
            "INSERT INTO teams (id, name, slug, settings, created_at, updated_at)"
            " VALUES ($1, 'Bench', $2, '{}', $3, $3)",
            team_id,
            f"bench-{team_id.hex[:8]}",
            now,
        )
        await conn.execute(
            "INSERT INTO users (id, team_id, email, password_hash, role, is_active, preferences, created_at,"
            " updated_at) VALUES ($1, $2, 'bench@example.com', $3, 'admin', true, '{}', $4, $4)",
            user_id,
            team_id,
            hash_password_sync("bench-password", 4),
            now,
        )
        await conn.execute(
            "INSERT INTO agents (id, team_id, name, slug, webhook_url, config, avatar_version, is_active, created_at,"
            " updated_at) VALUES ($1, $2, 'Bench agent', 'bench-agent', 'http://127.0.0.1:5678/webhook/x', '{}', 0,"
            " true, $3, $3)",
            agent_id,
            team_id,
            now,
        )
        ids: list[uuid.UUID] = []
        batch: list[tuple[object, ...]] = []
        message_batch: list[tuple[object, ...]] = []
        columns = [
            "id",
            "team_id",
            "user_id",
            "agent_id",
            "title",
            "archived",
            "pinned",
            "current_message_id",
            "message_count",
            "last_message_at",
            "created_at",
            "updated_at",
        ]
        for n in range(chats):
            chat_id = uuid.uuid4()
            ids.append(chat_id)
            started = now - timedelta(minutes=chats - n)
            last = started + timedelta(seconds=messages)
            rows, leaf = chat_messages(rng, chat_id, messages, started, plant=n % 100 == 7)
            message_batch.extend(rows)
            batch.append(
                (
                    chat_id,
                    team_id,
                    user_id,
                    agent_id,
                    sentence(rng, 5)[:60],
                    n % 10 == 0,
                    n % 500 == 0,
                    leaf,
                    messages,
                    last,
                    started,
                    last,
                )
            )
            if len(batch) == 500:
                await conn.copy_records_to_table("chats", records=batch, columns=columns)
                await conn.copy_records_to_table("messages", records=message_batch, columns=MESSAGE_COLUMNS)
                batch, message_batch = [], []
        if batch:
            await conn.copy_records_to_table("chats", records=batch, columns=columns)
            await conn.copy_records_to_table("messages", records=message_batch, columns=MESSAGE_COLUMNS)
        await conn.execute("ANALYZE")
        return team_id, user_id, ids
    finally:
        await conn.close()


async def measure(name: str, runs: int, call: Callable[[], Awaitable[httpx.Response]]) -> dict[str, object]:
    await call()  # warm-up (connection pool, statement cache)
    timings = []
    last: httpx.Response | None = None
    for _ in range(runs):
        started = time.perf_counter()
        last = await call()
        timings.append((time.perf_counter() - started) * 1000)
        assert last.status_code == 200, (name, last.status_code, last.text[:200])
    timings.sort()
    p99 = timings[min(len(timings) - 1, round(0.99 * (len(timings) - 1)))]
    result = {
        "name": name,
        "runs": runs,
        "p50_ms": round(statistics.median(timings), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(timings[-1], 1),
        "total": last.headers.get("x-total-count") if last is not None else None,
        "bytes": len(last.content) if last is not None else 0,
    }
    print(
        f"{name:<34} runs={runs:<4} p50={result['p50_ms']:>8} ms  p99={result['p99_ms']:>8} ms  "
        f"total={result['total']}  body={result['bytes']} B",
        flush=True,
    )
    return result


async def run(args: argparse.Namespace) -> None:
    admin_url = args.admin_url
    name = f"bench_{uuid.uuid4().hex[:10]}"
    base = admin_url.rsplit("/", 1)[0]
    plain_url = f"{base}/{name}"
    app_url = plain_url.replace("postgresql://", "postgresql+asyncpg://")
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        await asyncio.to_thread(command.upgrade, alembic_config(app_url), "head")

        started = time.perf_counter()
        team_id, user_id, ids = await seed(plain_url, chats=args.chats, messages=args.messages)
        seeded = time.perf_counter() - started
        conn = await asyncpg.connect(plain_url)
        if args.trgm:
            started = time.perf_counter()
            for ddl in TRGM_DDL:
                await conn.execute(ddl)
            await conn.execute("ANALYZE chats")
            print(f"pg_trgm indexes built in {time.perf_counter() - started:.1f} s", flush=True)
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('chats'))")
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
        print(
            f"seeded {args.chats} chats x {args.messages} messages in {seeded:.1f} s "
            f"(chats table {size}, PostgreSQL {version})",
            flush=True,
        )

        with tempfile.TemporaryDirectory() as data_dir:
            settings = load_settings(
                _env_file=None,
                APP_ENV="test",
                DATABASE_URL=app_url,
                DATA_DIR=Path(data_dir),
                JWT_SECRET="bench-" + "x" * 40,
                ENCRYPTION_KEY=Fernet.generate_key().decode(),
                LOG_LEVEL="WARNING",
                REDIS_URL=None,
            )
            app = create_app(settings)
            token = create_token(settings=settings, user_id=user_id, team_id=team_id, token_type="access").token
            headers = {"Authorization": f"Bearer {token}"}
            rng = random.Random(7)
            try:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as c:
                    runs, slow_runs = args.runs, max(5, args.runs // 10)
                    await measure("list page 1 (limit 50)", runs, lambda: c.get("/api/chats"))
                    await measure("list deep page (offset 8000)", runs, lambda: c.get("/api/chats?offset=8000"))
                    await measure("list archived", runs, lambda: c.get("/api/chats?archived=true"))
                    await measure("open chat (100 messages)", runs, lambda: c.get(f"/api/chats/{rng.choice(ids)}"))
                    await measure("search title word (q=report)", slow_runs, lambda: c.get("/api/chats?q=report"))
                    await measure(
                        f"search rare body word (q={RARE_WORD})", slow_runs, lambda: c.get(f"/api/chats?q={RARE_WORD}")
                    )
                    await measure("search no match (q=qwxz)", slow_runs, lambda: c.get("/api/chats?q=qwxz"))
            finally:
                await shutdown(app)
    finally:
        if args.keep:
            print(f"kept database {name}", flush=True)
        else:
            admin = await asyncpg.connect(admin_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--admin-url", default=os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    parser.add_argument("--chats", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--runs", type=int, default=200, help="calls per non-search endpoint (search: a tenth)")
    parser.add_argument("--trgm", action="store_true", help="add the recommended pg_trgm indexes before measuring")
    parser.add_argument("--keep", action="store_true", help="keep the database for manual EXPLAIN (drop it yourself)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
