"""The streaming benchmark: the service and the bare relay side by side over the same fake n8n.

`python -m bench.run [--quick]` (what `make bench` / `make bench-quick` run). It creates a throwaway
PostgreSQL database, migrates and seeds it, starts the fake n8n, the bare relay and the service as
subprocesses on 127.0.0.1 (each in its own process group, always killed), drives them with
bench/loadgen.py from this process, prints the table and writes it to bench/results/.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from cryptography.fernet import Fernet

from bench import loadgen
from bench.loadgen import Kind, Live, Request
from bench.procs import Proc, cpu_seconds, free_port, machine, rss_kb, tree, wait_http

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
PASSWORD = "bench-password-1"
PACED = {"scenario": "paced", "chunks": "50", "interval_ms": "20"}
#: Unpaced: the fake writes 2,000 lines as fast as it can (no sleep between them).
UNPACED = {"scenario": "paced", "chunks": "2000", "interval_ms": "0"}
LOGIN_PACED = {"scenario": "paced", "chunks": "100", "interval_ms": "20"}


@dataclass(frozen=True)
class Profile:
    """How big each phase is. `full` must finish in < 10 min on 2 cores, `quick` in < 2 min."""

    name: str
    ttfc_levels: tuple[tuple[int, int], ...]  # (concurrent streams, rounds per virtual user)
    throughput_users: int
    throughput_seconds: float
    hold_levels: tuple[int, ...]
    login_users: int
    multi_ttfc_users: int
    multi_seconds: float
    hold_base_s: float  # a held stream stalls hold_base_s + N/80 s (time for the server to open all N)
    multi_rounds: int


FULL = Profile("full", ((1, 10), (100, 3), (1000, 2)), 20, 8.0, (1000, 5000), 100, 100, 6.0, 15.0, 2)
QUICK = Profile("quick", ((1, 3), (100, 2), (300, 1)), 20, 3.0, (500,), 100, 100, 3.0, 6.0, 1)


def qs(params: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in params.items())


# --- database ------------------------------------------------------------------------------------


def _db_url(name: str, driver: str = "postgresql") -> str:
    base = ADMIN_URL.rpartition("/")[0].replace("postgresql://", f"{driver}://")
    return f"{base}/{name}"


async def admin(sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def migrate(url: str) -> None:
    from alembic import command

    from app.migrations import alembic_config

    command.upgrade(alembic_config(url), "head")


@dataclass
class Seed:
    team_id: uuid.UUID
    user_id: uuid.UUID
    agent_id: uuid.UUID
    email: str
    token: str
    conn: asyncpg.Connection


async def seed(dbname: str, settings: Any, fake_url: str) -> Seed:
    """One team, one admin (bcrypt at the configured cost, for real logins), one agent on the fake n8n."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from app.models import Agent, Team, User
    from app.security import create_token, hash_password_sync

    engine = create_async_engine(_db_url(dbname, "postgresql+asyncpg"))
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            team = Team(id=uuid.uuid4(), name="Bench", slug="bench")
            user = User(
                id=uuid.uuid4(),
                team_id=team.id,
                email="bench-admin@example.com",
                password_hash=hash_password_sync(PASSWORD, settings.BCRYPT_ROUNDS),
                full_name="Bench Admin",
                role="admin",
            )
            agent = Agent(
                id=uuid.uuid4(),
                team_id=team.id,
                name="Bench agent",
                slug="bench-agent",
                webhook_url=f"{fake_url}/webhook/agent-stream?{qs(PACED)}",
                system_prompt="",
            )
            session.add(team)
            await session.flush()
            session.add_all([user, agent])
            await session.commit()
            ids = (team.id, user.id, agent.id)
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(_db_url(dbname), timeout=5, server_settings={"application_name": "bench-seed"})
    token = create_token(settings=settings, user_id=ids[1], team_id=ids[0], token_type="access").token
    return Seed(ids[0], ids[1], ids[2], "bench-admin@example.com", token, conn)


async def new_chats(seed_: Seed, count: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    now = dt.datetime.now(dt.UTC)
    await seed_.conn.copy_records_to_table(
        "chats",
        records=[(i, seed_.team_id, seed_.user_id, seed_.agent_id, "bench", False, False, 0, now, now) for i in ids],
        columns=[
            "id",
            "team_id",
            "user_id",
            "agent_id",
            "title",
            "archived",
            "pinned",
            "message_count",
            "created_at",
            "updated_at",
        ],
    )
    return ids


async def set_upstream(seed_: Seed, fake_url: str, params: dict[str, str]) -> None:
    await seed_.conn.execute(
        "UPDATE agents SET webhook_url = $1 WHERE id = $2",
        f"{fake_url}/webhook/agent-stream?{qs(params)}",
        seed_.agent_id,
    )


async def db_in_use(dbname: str) -> tuple[int, int]:
    """(connections not idle, connections open) of the bench database right now."""
    rows = await admin(PG_COUNT, dbname)
    return int(rows[0]["busy"]), int(rows[0]["total"])


PG_COUNT = (
    "SELECT count(*) AS total, count(*) FILTER (WHERE state IS DISTINCT FROM 'idle') AS busy "
    "FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' "
    "AND application_name <> 'bench-seed'"
)


class PgSampler:
    """Counts the bench database's connections in pg_stat_activity every 20 ms while running."""

    def __init__(self, dbname: str) -> None:
        self.dbname = dbname
        self.max_total = 0
        self.max_busy = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PgSampler:
        self._conn = await asyncpg.connect(ADMIN_URL, timeout=5)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            row = await self._conn.fetchrow(PG_COUNT, self.dbname)
            assert row is not None
            self.max_total = max(self.max_total, int(row["total"]))
            self.max_busy = max(self.max_busy, int(row["busy"]))
            self.samples += 1
            await asyncio.sleep(0.02)

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._conn.close()


# --- the processes ---------------------------------------------------------------------------------


@dataclass
class Target:
    """One thing the load generator reads: its kind, how to build request i, and the pid to measure."""

    name: str
    kind: Kind
    make: Callable[[dict[str, str], list[uuid.UUID]], loadgen.RequestFactory]
    proc: Proc | None = None

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc is not None else []


@dataclass
class Bench:
    profile: Profile
    log_dir: Path
    env: dict[str, str]
    dbname: str = ""
    fake_url: str = ""
    seed: Seed | None = None
    procs: list[Proc] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    profile_dir: Path | None = None
    phase: str = ""
    chars_per_chunk: float | None = None

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, cmd, {**self.env, **(env or {})}, self.log_dir)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    async def chats(self, count: int) -> list[uuid.UUID]:
        assert self.seed is not None
        return await new_chats(self.seed, count)

    async def start_fake_and_seed(self, tmp: Path, *, bcrypt_rounds: int | None = None) -> tuple[Any, Seed]:
        """Start the fake n8n, then seed `self.dbname` (team, admin, agent on it); the settings and the seed."""
        fake_port = free_port()
        fake = self.start("fake_n8n", [sys.executable, "-m", "tools.fake_n8n", "--port", str(fake_port)])
        self.fake_url = f"http://127.0.0.1:{fake_port}"
        await wait_http(f"{self.fake_url}/__requests", fake)

        from app.config import load_settings  # lazily, like every app import of the benchmark

        settings = load_settings(
            DATABASE_URL=self.env["DATABASE_URL"],
            JWT_SECRET=self.env["JWT_SECRET"],
            ENCRYPTION_KEY=self.env["ENCRYPTION_KEY"],
            DATA_DIR=tmp,
        )
        if bcrypt_rounds is not None:
            settings = settings.model_copy(update={"BCRYPT_ROUNDS": bcrypt_rounds})
        self.seed = await seed(self.dbname, settings, self.fake_url)
        return settings, self.seed


def uvicorn_cmd(factory: str, port: int, workers: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--no-access-log", "--log-level", "warning", "--backlog", "4096", "--timeout-graceful-shutdown", "10"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    return cmd


def service_target(url: str, token: str) -> Target:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "text/event-stream"}
    body = json.dumps({"content": "Hello, benchmark"}).encode()

    def make(_params: dict[str, str], chats: list[uuid.UUID]) -> loadgen.RequestFactory:
        return lambda i, _r: Request(f"{url}/api/chats/{chats[i]}/messages", body, headers)

    return Target("service", "service", make)


def bare_target(url: str) -> Target:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    body = json.dumps({"content": "Hello, benchmark"}).encode()

    def make(params: dict[str, str], _chats: list[uuid.UUID]) -> loadgen.RequestFactory:
        request = Request(f"{url}/relay?{qs(params)}", body, headers)
        return lambda _i, _r: request

    return Target("bare relay", "bare", make)


def direct_target(fake_url: str) -> Target:
    headers = {"Content-Type": "application/json"}
    body = json.dumps({"chatInput": "Hello, benchmark", "sessionId": "bench"}).encode()

    def make(params: dict[str, str], _chats: list[uuid.UUID]) -> loadgen.RequestFactory:
        request = Request(f"{fake_url}/webhook/agent-stream?{qs(params)}", body, headers)
        return lambda _i, _r: request

    return Target("fake n8n direct", "direct", make)


# --- phases ----------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


async def run_closed(
    bench: Bench,
    target: Target,
    params: dict[str, str],
    *,
    users: int,
    rounds: int,
    seconds: float,
    stagger: float = 1.0,
    side: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    fresh_chats: bool = False,
) -> dict[str, Any]:
    """One closed-loop run against one target, with the server's CPU measured over it."""
    if target.kind == "service":
        assert bench.seed is not None
        await set_upstream(bench.seed, bench.fake_url, params)
    if fresh_chats and target.kind == "service":
        # A new chat per stream: the n8n payload carries no history (like the bare relay's), and the final
        # write does not rewrite an ever longer JSONB array, so the figure is the relay's, not PostgreSQL's.
        chats = await bench.chats(users * rounds)
        per_chat = target.make(params, chats)
        make: loadgen.RequestFactory = lambda i, r: per_chat(i * rounds + r, 0)  # noqa: E731
    else:
        chats = await bench.chats(users) if target.kind == "service" else []
        make = target.make(params, chats)
    pids = target.pids()
    spy = start_py_spy(bench, target, users) if bench.profile_dir is not None and target.kind == "service" else None
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    loop = asyncio.get_running_loop()
    async with loadgen.client_session() as session:
        work = loadgen.closed_loop(
            session,
            make,
            target.kind,
            users=users,
            rounds=rounds,
            stream_timeout=60.0,
            deadline=loop.time() + seconds,
            stagger=stagger,
        )
        extra: dict[str, Any] = {}
        if side is not None:
            results, extra = await asyncio.gather(work, side())
        else:
            results = await work
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - cpu0
    if spy is not None:
        stop_py_spy(spy)
    summary = loadgen.summarize(results)
    summary.update(extra)
    summary["wall_s"] = round(wall, 2)
    summary["chunks_per_s"] = round(summary["chunks"] / wall, 1) if wall > 0 else None
    if pids:
        summary["server_cpu_s"] = round(cpu, 3)
        summary["cpu_us_per_chunk"] = round(cpu / summary["chunks"] * 1e6, 1) if summary["chunks"] else None
    log(
        f"  {target.name:16} users={users:<5} streams={summary['streams']:<5} ok={summary['complete']:<5} "
        f"failed={summary['failed']} truncated={summary['truncated']} ttfc p50/p99="
        f"{summary['ttfc_p50_ms']}/{summary['ttfc_p99_ms']} ms  chunks/s={summary['chunks_per_s']}"
        + (f"  cpu/chunk={summary.get('cpu_us_per_chunk')} us" if pids else "")
        + (f"  {summary['reasons']}" if summary["reasons"] else "")
    )
    return summary


def start_py_spy(bench: Bench, target: Target, users: int) -> subprocess.Popen[bytes]:
    """`py-spy record` of the service's processes while the run lasts (bench --profile; py-spy optional)."""
    assert bench.profile_dir is not None
    assert target.proc is not None
    bench.profile_dir.mkdir(parents=True, exist_ok=True)
    out = bench.profile_dir / f"{bench.phase}-{users}.txt"
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    cmd = [spy, "record", "--pid", str(target.proc.pid), "--rate", "250", "--format", "raw", "--output", str(out)]
    cmd += ["--nonblocking", "--subprocesses"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(20)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(5)


def per_chunk(bench: Bench, summary: dict[str, Any]) -> None:
    """Express an unpaced run in upstream chunks (text received ÷ the upstream's characters per chunk)."""
    if bench.chars_per_chunk is None or not summary.get("chars"):
        return
    chunks = summary["chars"] / bench.chars_per_chunk
    summary["events_per_s"] = summary["chunks_per_s"]
    summary["chunks_per_s"] = round(chunks / summary["wall_s"], 1)
    if summary.get("server_cpu_s") is not None:
        summary["cpu_us_per_chunk"] = round(summary["server_cpu_s"] / chunks * 1e6, 1)


async def run_hold(bench: Bench, target: Target, streams: int) -> dict[str, Any]:
    """Hold `streams` open at once (one chunk each, then the fake stalls), sample RSS, let them finish."""
    hang = round(bench.profile.hold_base_s + streams / 80, 1)
    params = {"scenario": "stall", "after": "1", "hang": str(hang)}
    if target.kind == "service":
        assert bench.seed is not None
        await set_upstream(bench.seed, bench.fake_url, params)
    chats = await bench.chats(streams) if target.kind == "service" else []
    make = target.make(params, chats)
    pids = target.pids()
    await asyncio.sleep(1.0)
    rss_before = rss_kb(pids)
    live = Live()
    peak: dict[str, int] = {"rss": rss_before, "open": 0}

    async def sample() -> None:
        while True:
            rss = rss_kb(pids)
            peak["rss"] = max(peak["rss"], rss)
            peak["open"] = max(peak["open"], live.open_with_chunk)
            if live.open_with_chunk >= streams and "rss_all_open" not in peak:
                await asyncio.sleep(0.5)  # let buffers settle, then take the figure with all open
                peak["rss_all_open"] = rss_kb(pids)
                if target.kind == "service":
                    busy, total = await db_in_use(bench.dbname)
                    peak["db_busy_all_open"], peak["db_open_all_open"] = busy, total
            await asyncio.sleep(0.1)

    t0 = time.perf_counter()
    sampler = asyncio.create_task(sample())
    try:
        async with loadgen.client_session() as session:
            results = await loadgen.hold_open(
                session, make, target.kind, streams=streams, max_opening=200, stream_timeout=hang + 60, live=live
            )
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    summary = loadgen.summarize(results)
    all_open = peak.get("rss_all_open")
    figure = all_open if all_open is not None else peak["rss"]
    summary.update(
        {
            "hang_s": hang,
            "wall_s": round(time.perf_counter() - t0, 1),
            "max_open_at_once": peak["open"],
            "all_open_at_once": all_open is not None,
            "rss_before_kb": rss_before,
            "rss_open_kb": figure,
            "kb_per_stream": round((figure - rss_before) / streams, 1),
            "db_busy_all_open": peak.get("db_busy_all_open"),
            "db_open_all_open": peak.get("db_open_all_open"),
        }
    )
    log(
        f"  {target.name:16} hold={streams:<5} ok={summary['complete']} failed={summary['failed']} "
        f"truncated={summary['truncated']} open at once={peak['open']} rss {rss_before} -> {figure} kB "
        f"= {summary['kb_per_stream']} kB/stream"
    )
    return summary


async def login_burst(bench: Bench, port: int, seconds: float) -> dict[str, Any]:
    """Logins from one client as fast as every 50 ms for `seconds`: the limiter lets RATE_LIMIT_LOGIN through."""
    assert bench.seed is not None
    body = json.dumps({"email": bench.seed.email, "password": PASSWORD}).encode()
    counts: dict[str, int] = {}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(trust_env=False) as session:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with session.post(
                f"http://127.0.0.1:{port}/api/auth/login", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
                counts[str(response.status)] = counts.get(str(response.status), 0) + 1
                if response.status == 200:
                    latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
    return {"logins": counts, "login_ms": [round(x * 1000, 1) for x in latencies]}


# --- the benchmark ---------------------------------------------------------------------------------


def base_env(tmp: Path, dbname: str) -> dict[str, str]:
    from app.config import Settings

    # Nothing of the caller's app configuration leaks in: every setting the service reads is set here.
    env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "APP_ENV": "development",
            "DATA_DIR": str(tmp),
            "DATABASE_URL": _db_url(dbname, "postgresql+asyncpg"),
            "DB_POOL_SIZE": "10",
            "DB_MAX_OVERFLOW": "0",
            "JWT_SECRET": "bench-jwt-secret-" + "b" * 40,
            "ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "LOG_LEVEL": "WARNING",
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
            "COOKIE_SECURE": "false",
        }
    )
    return env


async def start_service(
    bench: Bench, name: str, workers: int = 1, redis: bool = False, port: int = 0
) -> tuple[Proc, int]:
    port = port or free_port()
    env = {"REDIS_URL": REDIS_URL} if redis else {}
    proc = bench.start(name, uvicorn_cmd("main:create_app", port, workers), env)
    await wait_http(f"http://127.0.0.1:{port}/health", proc, limit_s=60)
    return proc, port


async def start_bare(bench: Bench, port: int) -> Proc:
    proc = bench.start(
        "bare_relay", uvicorn_cmd("bench.bare_relay:create_app", port), {"BARE_UPSTREAM": bench.fake_url}
    )
    await wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc


PHASES = ("ttfc", "throughput", "hold", "login", "multi")


async def benchmark(
    profile: Profile, phases: tuple[str, ...] = PHASES, profile_dir: Path | None = None
) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    log_dir = RESULTS / f"logs-{stamp}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    dbname = f"bench_{uuid.uuid4().hex[:10]}"
    bench = Bench(profile, log_dir, base_env(tmp, dbname), dbname, profile_dir=profile_dir)
    report: dict[str, Any] = {
        "profile": profile.name,
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "python": sys.version.split()[0],
    }
    try:
        await admin(f'CREATE DATABASE "{dbname}"')
        await asyncio.to_thread(migrate, _db_url(dbname, "postgresql+asyncpg"))

        _, seeded = await bench.start_fake_and_seed(tmp)

        bare_port = free_port()
        bare_proc = await start_bare(bench, bare_port)
        service_proc, service_port = await start_service(bench, "service")

        direct = direct_target(bench.fake_url)
        bare = bare_target(f"http://127.0.0.1:{bare_port}")
        bare.proc = bare_proc
        service = service_target(f"http://127.0.0.1:{service_port}", seeded.token)
        service.proc = service_proc
        trio = (direct, bare, service)

        async def clear_fake() -> None:
            async with aiohttp.ClientSession(trust_env=False) as s, s.delete(f"{bench.fake_url}/__requests"):
                pass

        only = set(phases)
        log("warm-up")
        warm_rounds = 1 if profile is QUICK else 2
        for target in trio:
            await run_closed(bench, target, PACED, users=20, rounds=warm_rounds, seconds=20, stagger=0.2)

        bench.phase = "ttfc"
        log("time to first chunk, paced 50 chunks x 20 ms")
        ttfc: dict[str, Any] = {}
        pg: dict[str, Any] = {}
        for users, rounds in profile.ttfc_levels if "ttfc" in only else ():
            level: dict[str, Any] = {}
            for target in trio:
                await clear_fake()
                if target is service:
                    async with PgSampler(dbname) as sampler:
                        level[target.kind] = await run_closed(
                            bench, target, PACED, users=users, rounds=rounds, seconds=90
                        )
                    pg[str(users)] = {
                        "max_connections": sampler.max_total,
                        "max_busy": sampler.max_busy,
                        "samples": sampler.samples,
                        "streams": level[target.kind]["streams"],
                        "complete": level[target.kind]["complete"],
                    }
                else:
                    level[target.kind] = await run_closed(bench, target, PACED, users=users, rounds=rounds, seconds=90)
            ttfc[str(users)] = level
        report["ttfc"] = ttfc
        report["db_connections"] = pg

        log(f"unpaced throughput, {profile.throughput_users} streams of 2000 chunks, {profile.throughput_seconds} s")
        throughput: dict[str, Any] = {}
        bench.phase = "unpaced"
        for target in trio if "throughput" in only else ():
            await clear_fake()
            throughput[target.kind] = await run_closed(
                bench,
                target,
                UNPACED,
                users=profile.throughput_users,
                rounds=60,
                seconds=profile.throughput_seconds,
                stagger=0.1,
                fresh_chats=True,
            )
        # Upstream chunks relayed, from the text received: the service merges chunks that piled up into one
        # event, the bare relay never does, so events are not comparable but the text is.
        direct_tp = throughput.get("direct", {})
        if direct_tp.get("chunks") and direct_tp.get("chars"):
            bench.chars_per_chunk = direct_tp["chars"] / direct_tp["chunks"]
        for summary in throughput.values():
            per_chunk(bench, summary)
        report["throughput"] = throughput

        log("streams held open")
        hold: dict[str, Any] = {}
        for streams in profile.hold_levels if "hold" in only else ():
            hold[str(streams)] = {}
            # Fresh processes, so the figure is not hidden in memory a previous phase already grew into.
            bench.stop(bare_proc)
            bench.stop(service_proc)
            bare.proc = bare_proc = await start_bare(bench, bare_port)
            service.proc, _ = await start_service(bench, "service", port=service_port)
            service_proc = service.proc
            for target in (bare, service):
                await clear_fake()
                await run_closed(bench, target, PACED, users=20, rounds=2, seconds=20, stagger=0.2)
                hold[str(streams)][target.kind] = await run_hold(bench, target, streams)
        report["hold"] = hold

        bench.phase = "login"
        if "login" in only:
            report["login_burst"] = await login_phase(bench, service, bare, service_port)

        bench.stop(service_proc)
        if "multi" in only:
            report["multi_worker"] = await multi_phase(bench)
    finally:
        for proc in list(reversed(bench.procs)):
            proc.stop()
        if bench.seed is not None:
            await bench.seed.conn.close()
        try:
            await admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        except (OSError, asyncpg.PostgresError) as exc:
            log(f"could not drop {dbname}: {exc}")
    report["duration_s"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    return report


async def login_phase(bench: Bench, service: Target, bare: Target, service_port: int) -> dict[str, Any]:
    log("chunk gaps while logins run at the rate limit (paced 100 chunks x 20 ms)")
    profile = bench.profile
    users = profile.login_users
    # Arrivals spread over one stream's length (2 s), so the service is in a steady state, not a burst.
    baseline = await run_closed(bench, service, LOGIN_PACED, users=users, rounds=1, seconds=30, stagger=2.0)
    burst = await run_closed(
        bench,
        service,
        LOGIN_PACED,
        users=users,
        rounds=1,
        seconds=30,
        stagger=2.0,
        side=lambda: login_burst(bench, service_port, 2.5),
    )
    again = await run_closed(bench, service, LOGIN_PACED, users=users, rounds=1, seconds=30, stagger=2.0)
    bare_base = await run_closed(bench, bare, LOGIN_PACED, users=users, rounds=1, seconds=30, stagger=2.0)
    log(f"  logins: {burst.get('logins')}")
    return {"baseline": baseline, "burst": burst, "baseline_after": again, "bare_baseline": bare_base}


async def multi_phase(bench: Bench) -> dict[str, Any]:
    log("multi-worker (REDIS_URL set): 1 and 2 workers")
    assert bench.seed is not None
    profile = bench.profile
    multi: dict[str, Any] = {}
    for workers in (1, 2):
        bench.phase = f"multi{workers}"
        proc, port = await start_service(bench, f"service_w{workers}", workers=workers, redis=True)
        try:
            target = service_target(f"http://127.0.0.1:{port}", bench.seed.token)
            target.proc = proc
            if profile is not QUICK:
                await run_closed(bench, target, PACED, users=20, rounds=1, seconds=10, stagger=0.2)
            multi[str(workers)] = {
                "ttfc": await run_closed(
                    bench, target, PACED, users=profile.multi_ttfc_users, rounds=profile.multi_rounds, seconds=30
                ),
                "throughput": await run_closed(
                    bench,
                    target,
                    UNPACED,
                    users=profile.throughput_users * workers,
                    rounds=40,
                    seconds=profile.multi_seconds,
                    stagger=0.1,
                    fresh_chats=True,
                ),
                "processes": len(target.pids()),
            }
            per_chunk(bench, multi[str(workers)]["throughput"])
        finally:
            bench.stop(proc)
    return multi


async def _cancellable(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """SIGTERM (e.g. from `timeout`) cancels the run, so its `finally` still kills children and drops the DB."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the streaming relay against a bare relay.")
    parser.add_argument("--quick", action="store_true", help="the < 2 minute variant (make bench-quick)")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {PHASES}")
    parser.add_argument("--profile", action="store_true", help="py-spy record the service during its runs")
    args = parser.parse_args(argv)
    from bench.report import render, write

    profile = QUICK if args.quick else FULL
    phases = tuple(p for p in args.only.split(",") if p in PHASES)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report = asyncio.run(
        _cancellable(benchmark(profile, phases, RESULTS / f"profile-{stamp}" if args.profile else None))
    )
    table = render(report)
    print(table, flush=True)
    paths = write(report, table, RESULTS)
    print(f"results: {', '.join(str(p.relative_to(ROOT)) for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
