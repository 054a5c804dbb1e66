"""Benchmark the final write of an answer (app.services.messages.finish_message) in-process on PostgreSQL.

Creates a throwaway database (migrated to the head, dropped at the end, also on failure), one team, user and
agent, and one chat per call. Each round first starts `--calls` generations (start_message, not measured: one
streaming answer per chat), then finishes them one after the other as app/generations.py `_finish` does
(finish_message on the app's Database), and reports per final write: this process's CPU
(time.process_time: the service's side, SQLAlchemy and asyncpg included), the wall time (p50/p99), and the
PostgreSQL backends' CPU over the whole round (utime + stime from /proc: same host only). Rounds: answers that
complete (the ledger row and roll-up), and answers that fail (plus their error_logs row). A last short pass
sends a few final writes of each kind through a counting proxy to PostgreSQL: round trips per final write
(the frontend's Sync and Query messages: one per statement, BEGIN or COMMIT).

    .venv/bin/python -m bench.bench_finish                        # 300 calls per round
    .venv/bin/python -m bench.bench_finish --calls 20             # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from cryptography.fernet import Fernet

from app.config import Settings, load_settings
from app.db import Database
from app.migrations import alembic_config
from app.models import Agent, Chat, Team, User
from app.security import Caller
from app.services.messages import NewGeneration, finish_message, start_message

#: What the measured final writes send: an answer of ~2 KB with the metadata a stream gathers.
CONTENT = "word " * 400
METADATA = {"ttfc_ms": 412.3, "duration_ms": 5210.8, "tokens_in": 120, "tokens_out": 480, "chunks": 50}
FAILURE = {"message": "n8n answered 502", "code": "upstream_error"}
#: Frontend messages that end a round trip: Sync (extended protocol) and Query (simple protocol).
ROUND_TRIP_ENDS = (b"S", b"Q")
_STARTUP_CODES_BEFORE_STARTUP = (80877103, 80877104, 80877102)  # SSLRequest, GSSENCRequest, CancelRequest


class CountingProxy:
    """A TCP proxy to PostgreSQL that counts the frontend's Sync and Query messages (round trips)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.round_trips = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        tasks = [
            asyncio.create_task(self._frontend(client_r, server_w)),
            asyncio.create_task(self._replies(server_r, client_w)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.close()

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """PostgreSQL's side, relayed as it comes (a subclass may drop some: tests/test_fast_start.py)."""
        await _pipe(reader, writer)

    async def _frontend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = False
        try:
            while True:
                if not started:  # untyped: length, then a code (SSLRequest first, then the StartupMessage)
                    head = await reader.readexactly(8)
                    length, code = int.from_bytes(head[:4]), int.from_bytes(head[4:])
                    writer.write(head + await reader.readexactly(length - 8))
                    started = code not in _STARTUP_CODES_BEFORE_STARTUP
                else:
                    head = await reader.readexactly(5)
                    if head[:1] in ROUND_TRIP_ENDS:
                        self.round_trips += 1
                    body = await reader.readexactly(int.from_bytes(head[1:]) - 4)
                    if not self._passes(head, body):
                        return  # the proxy then closes both sides
                    writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def _passes(self, head: bytes, body: bytes) -> bool:  # noqa: ARG002
        """Whether one typed frontend message goes on (a subclass may cut there: tests/test_fast_start.py)."""
        return True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        return


def backends_cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds (clock ticks)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def seed(db: Database, chats: int) -> tuple[Caller, list[uuid.UUID]]:
    """One team, user and agent, and `chats` chats of theirs."""
    async with db.sessionmaker() as s:
        team = Team(name="Bench", slug=f"bench-{uuid.uuid4().hex[:8]}")
        s.add(team)
        await s.flush()
        user = User(team_id=team.id, email="bench@example.com", password_hash="x", role="admin", is_active=True)
        agent = Agent(team_id=team.id, name="Agent", slug="agent", webhook_url="http://127.0.0.1:9/x", config={})
        s.add_all([user, agent])
        await s.flush()
        rows = [
            Chat(team_id=team.id, user_id=user.id, agent_id=agent.id, title="c", message_count=0) for _ in range(chats)
        ]
        s.add_all(rows)
        await s.commit()
        return Caller(id=user.id, team_id=team.id), [c.id for c in rows]


async def start_all(db: Database, settings: Settings, caller: Caller, chat_ids: list[uuid.UUID]) -> list[NewGeneration]:
    started = []
    for chat_id in chat_ids:
        async with db.autocommit() as s:
            started.append(
                await start_message(
                    session=s,
                    settings=settings,
                    user=caller,
                    chat_id=chat_id,
                    content="question?",
                    worker_id=uuid.uuid4(),
                )
            )
    return started


async def finish(db: Database, new: NewGeneration, *, failed: bool) -> None:
    """One final write, as app/generations.py `_finish` makes it."""
    await finish_message(
        db=db,
        new=new,
        content=CONTENT,
        status="error" if failed else "complete",
        error=FAILURE if failed else None,
        metadata=METADATA,
        failure_detail={"upstream_status": 502} if failed else None,
        upstream_status=502 if failed else None,
    )


async def measure_round(
    db: Database, settings: Settings, caller: Caller, chat_ids: list[uuid.UUID], *, failed: bool
) -> dict[str, Any]:
    news = await start_all(db, settings, caller, chat_ids)
    admin = await asyncpg.connect(settings.DATABASE_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        query = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        pids = [r["pid"] for r in await admin.fetch(query)]
        walls = []
        backend_before = backends_cpu_s(pids)
        cpu_before = time.process_time()
        for new in news:
            started = time.perf_counter()
            await finish(db, new, failed=failed)
            walls.append(time.perf_counter() - started)
        cpu = time.process_time() - cpu_before
        backend = backends_cpu_s(pids) - backend_before
        opened = {r["pid"] for r in await admin.fetch(query)} - set(pids)
    finally:
        await admin.close()
    if opened:
        raise RuntimeError(f"the pool opened connections while measuring: {sorted(opened)}")
    n = len(news)
    walls.sort()
    return {
        "kind": "error" if failed else "complete",
        "calls": n,
        "cpu_us": round(cpu / n * 1e6),
        "postgres_cpu_us": round(backend / n * 1e6),
        "wall_p50_us": round(statistics.median(walls) * 1e6),
        "wall_p99_us": round(walls[min(n - 1, int(n * 0.99))] * 1e6),
    }


async def count_round_trips(settings: Settings, calls: int) -> dict[str, float]:
    """Final writes through CountingProxy: round trips per call, of each kind."""
    url = settings.DATABASE_URL
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    proxy = CountingProxy(host, int(port or 5432))
    proxy_port = await proxy.start()
    proxied = settings.model_copy(update={"DATABASE_URL": url.replace(f"@{host_port}/", f"@127.0.0.1:{proxy_port}/")})
    db = Database(proxied)
    out: dict[str, float] = {}
    try:
        caller, chat_ids = await seed(db, 2 * calls)
        for failed, ids in ((False, chat_ids[:calls]), (True, chat_ids[calls:])):
            news = await start_all(db, proxied, caller, ids)
            await finish(db, news[0], failed=failed)  # statements prepared on this connection
            before = proxy.round_trips
            for new in news[1:]:
                await finish(db, new, failed=failed)
            out["error" if failed else "complete"] = (proxy.round_trips - before) / (len(news) - 1)
    finally:
        await db.dispose()
        await proxy.close()
    return out


@asynccontextmanager
async def throwaway_database(admin_url: str) -> AsyncIterator[str]:
    """A fresh database migrated to the head (its SQLAlchemy URL), dropped at the end."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = f"{admin_url.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+asyncpg://")
    try:
        await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
        yield url
    finally:
        admin = await asyncpg.connect(admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"rounds": []}
    async with throwaway_database(args.admin_url) as url:
        with tempfile.TemporaryDirectory() as data_dir:
            settings = load_settings(
                _env_file=None,
                APP_ENV="test",
                DATABASE_URL=url,
                DATA_DIR=Path(data_dir),
                JWT_SECRET="bench-" + "x" * 40,
                ENCRYPTION_KEY=Fernet.generate_key().decode(),
                LOG_LEVEL="WARNING",
                REDIS_URL=None,
            )
            db = Database(settings)
            try:
                caller, chat_ids = await seed(db, args.warmup + 2 * args.calls)
                warm, rest = chat_ids[: args.warmup], chat_ids[args.warmup :]
                for failed in (False, True):  # compiled, prepared and cached on the pool's connection
                    half = warm[: len(warm) // 2] if failed else warm[len(warm) // 2 :]
                    await measure_round(db, settings, caller, half, failed=failed)
                for failed, ids in ((False, rest[: args.calls]), (True, rest[args.calls :])):
                    row = await measure_round(db, settings, caller, ids, failed=failed)
                    results["rounds"].append(row)
                    print(
                        f"{row['kind']:>8}: {row['calls']} final writes, {row['cpu_us']} µs CPU here and "
                        f"{row['postgres_cpu_us']} µs in PostgreSQL per call, wall p50 {row['wall_p50_us']} µs, "
                        f"p99 {row['wall_p99_us']} µs",
                        flush=True,
                    )
            finally:
                await db.dispose()
            results["round_trips"] = await count_round_trips(settings, args.trips)
            print(f"round trips per final write: {results['round_trips']}", flush=True)
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the end (1, 5, 15 min): {results['load_average']} on {os.cpu_count()} CPUs", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--admin-url", default=os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1/postgres")
    )
    parser.add_argument("--calls", type=int, default=300, help="final writes per round (complete, error)")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--trips", type=int, default=6, help="final writes of each kind through the counting proxy")
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
