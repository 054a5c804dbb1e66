"""Benchmark the usage reports (GET /api/usage, /api/usage/me) on a ledger of a million rows in PostgreSQL.

Creates a throwaway database, migrates it to just before the usage roll-up (revision 0011), loads `--rows`
ledger rows through COPY (spread evenly over `--teams` teams of 20 users and 10 agents each, over the last
`--days` days, with realistic outcomes, timings and, for a third of the rows, token counts), migrates to
the head (0011 back-fills the roll-up from the ledger), runs VACUUM ANALYZE as autovacuum would, then calls
the real application (httpx ASGITransport, no network) for the default 30-day period and prints
p50/p99 latencies, then times one rebuild of the roll-up (`app.cli rebuild-usage`). The database is dropped
at the end, also on failure.

    .venv/bin/python -m bench.bench_usage                       # 1,000,000 rows, 10 teams, 90 days
    .venv/bin/python -m bench.bench_usage --rows 5000 --runs 5  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from alembic import command
from cryptography.fernet import Fernet

from app.config import load_settings
from app.migrations import alembic_config
from app.security import create_token, hash_password_sync
from app.services import usage as usage_service
from app.state import app_state
from bench.bench_chats import measure
from main import create_app, shutdown

USERS_PER_TEAM = 20
AGENTS_PER_TEAM = 10
OUTCOMES = ["complete"] * 90 + ["error"] * 6 + ["cancelled"] * 3 + ["interrupted"]
BATCH = 50_000
#: The migration that creates and back-fills the roll-up the reports read.
ROLLUP_REVISION = "0011"


async def seed(url: str, *, rows: int, teams: int, days: int) -> tuple[uuid.UUID, uuid.UUID]:
    """The teams, users, agents and ledger rows; returns the first team and its admin (the caller)."""
    rng = random.Random(16)
    now = datetime.now(UTC)
    conn = await asyncpg.connect(url)
    try:
        password = hash_password_sync("bench-password", 4)
        people: list[tuple[uuid.UUID, list[uuid.UUID], list[uuid.UUID]]] = []
        for t in range(teams):
            team_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO teams (id, name, slug, settings, created_at, updated_at)"
                " VALUES ($1, $2, $3, '{}', $4, $4)",
                team_id,
                f"Team {t}",
                f"team-{t}",
                now,
            )
            users = [uuid.uuid4() for _ in range(USERS_PER_TEAM)]
            await conn.executemany(
                "INSERT INTO users (id, team_id, email, password_hash, role, is_active, preferences, created_at,"
                " updated_at) VALUES ($1, $2, $3, $4, $5, true, '{}', $6, $6)",
                [
                    (u, team_id, f"u{i}@t{t}.example.com", password, "admin" if i == 0 else "user", now)
                    for i, u in enumerate(users)
                ],
            )
            agents = [uuid.uuid4() for _ in range(AGENTS_PER_TEAM)]
            await conn.executemany(
                "INSERT INTO agents (id, team_id, name, slug, webhook_url, config, avatar_version, is_active,"
                " created_at, updated_at) VALUES ($1, $2, $3, $4, 'http://n8n/webhook/x', '{}', 0, true, $5, $5)",
                [(a, team_id, f"Agent {i}", f"agent-{i}", now) for i, a in enumerate(agents)],
            )
            people.append((team_id, users, agents))
        columns = [
            "id",
            "team_id",
            "user_id",
            "agent_id",
            "chat_id",
            "outcome",
            "error_code",
            "chars_in",
            "chars_out",
            "tokens_in",
            "tokens_out",
            "ttfc_ms",
            "duration_ms",
            "created_at",
        ]
        batch: list[tuple[Any, ...]] = []
        span = days * 86_400
        for i in range(rows):
            team_id, users, agents = people[i % teams]
            outcome = rng.choice(OUTCOMES)
            tokens = rng.random() < 0.33
            ttfc = None if outcome == "error" and rng.random() < 0.5 else rng.randint(150, 3000)
            batch.append(
                (
                    uuid.uuid4(),
                    team_id,
                    rng.choice(users),
                    rng.choice(agents),
                    uuid.uuid4(),
                    outcome,
                    "upstream_error" if outcome == "error" else None,
                    rng.randint(5, 2000),
                    rng.randint(0, 6000),
                    rng.randint(20, 4000) if tokens else None,
                    rng.randint(5, 1500) if tokens else None,
                    ttfc,
                    (ttfc or 0) + rng.randint(10, 60_000),
                    now - timedelta(seconds=rng.randint(0, span)),
                )
            )
            if len(batch) == BATCH:
                await conn.copy_records_to_table("usage_records", records=batch, columns=columns)
                batch.clear()
        if batch:
            await conn.copy_records_to_table("usage_records", records=batch, columns=columns)
        await conn.execute("VACUUM ANALYZE usage_records")
    finally:
        await conn.close()
    return people[0][0], people[0][1][0]


def _getter(client: httpx.AsyncClient, path: str) -> Callable[[], Awaitable[httpx.Response]]:
    async def get() -> httpx.Response:
        return await client.get(path)

    return get


async def run(args: argparse.Namespace) -> dict[str, Any]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    base = args.admin_url.rsplit("/", 1)[0]
    plain_url = f"{base}/{name}"
    app_url = plain_url.replace("postgresql://", "postgresql+asyncpg://")
    admin = await asyncpg.connect(args.admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    results: dict[str, Any] = {"rows": args.rows, "teams": args.teams, "days": args.days, "queries": []}
    try:
        # The ledger is loaded without the roll-up (revision 0011), then 0011 fills the roll-up from it, as it
        # would on an existing database: the reports read exactly what the migration's back-fill computed.
        config = alembic_config(app_url)
        await asyncio.to_thread(command.upgrade, config, "head")
        await asyncio.to_thread(command.downgrade, config, f"{ROLLUP_REVISION}-1")
        started = time.perf_counter()
        team_id, user_id = await seed(plain_url, rows=args.rows, teams=args.teams, days=args.days)
        print(f"seeded {args.rows} ledger rows in {time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
        await asyncio.to_thread(command.upgrade, config, "head")
        conn = await asyncpg.connect(plain_url)
        await conn.execute("VACUUM ANALYZE usage_rollups")
        # Write the load's dirty pages out now, not while the first report is being measured.
        await conn.execute("CHECKPOINT")
        rollup_rows = await conn.fetchval("SELECT count(*) FROM usage_rollups")
        rollup_size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('usage_rollups'))")
        print(
            f"migrated to head (the roll-up back-filled) in {time.perf_counter() - started:.1f} s: {rollup_rows} "
            f"roll-up rows, {rollup_size} with its index",
            flush=True,
        )
        results["rollup_rows"] = rollup_rows
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('usage_records'))")
        in_period = await conn.fetchval(
            "SELECT count(*) FROM usage_records WHERE team_id = $1 AND created_at >= now() - interval '30 days'",
            team_id,
        )
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
        print(
            f"ledger with indexes {size} (PostgreSQL {version}); the team's last 30 days: {in_period} rows",
            flush=True,
        )
        results["team_rows_30_days"] = in_period
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
            try:
                transport = httpx.ASGITransport(app=app)
                headers = {"Authorization": f"Bearer {token}"}
                async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as c:
                    for label, path in (
                        ("team, 30 days, by day", "/api/usage"),
                        ("team, 30 days, by agent", "/api/usage?group_by=agent"),
                        ("team, 30 days, by user", "/api/usage?group_by=user"),
                        ("me, 30 days, by day", "/api/usage/me"),
                        ("me, 30 days, by agent", "/api/usage/me?group_by=agent"),
                    ):
                        results["queries"].append(await measure(label, args.runs, _getter(c, path)))
                # `app.cli rebuild-usage`: how long the final writes of a running service would wait for it.
                started = time.perf_counter()
                async with app_state(app).db.sessionmaker() as session:
                    results["rebuild_rows"] = await usage_service.rebuild_rollups(session=session)
                results["rebuild_s"] = round(time.perf_counter() - started, 2)
                print(f"rebuild-usage: {results['rebuild_rows']} roll-up rows in {results['rebuild_s']} s", flush=True)
            finally:
                await shutdown(app)
        results["load_average"] = [round(x, 2) for x in os.getloadavg()]
        print(f"load average at the end (1, 5, 15 min): {results['load_average']} on {os.cpu_count()} CPUs", flush=True)
    finally:
        admin = await asyncpg.connect(args.admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--admin-url", default=os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1/postgres")
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--teams", type=int, default=10)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--runs", type=int, default=50)
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
