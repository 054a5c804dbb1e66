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
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from cryptography.fernet import Fernet

from bench import loadgen
from bench.affinity import Pinning, plan
from bench.loadgen import Kind, Live, Request
from bench.procs import Proc, client_ports, cpu_seconds, free_port, machine, rss_kb, tree, wait_http

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
    #: The login phase's third run (the service again after the burst, to average out drift).
    login_after: bool = True
    #: Streams each server runs, unmeasured, right before each of its measured ttfc levels (0: none).
    level_warm_up: int = 10
    #: The multi phase's configurations: (name, uvicorn workers, instances).
    multi_configs: tuple[tuple[str, int, int], ...] = (("1 worker", 1, 1), ("2 workers", 2, 1), ("2 instances", 1, 2))


FULL = Profile("full", ((1, 10), (100, 3), (1000, 2)), 20, 8.0, (1000, 5000), 100, 100, 6.0, 15.0, 2)
#: Smaller than at first (3 rounds at one stream, 500 held open, 2 s runs and base): that one took 120 s on the
#: AMD machine of 2026-12-07, at the edge of its 2-minute budget. Without the 2-worker configuration of the
#: multi phase (the full profile has it): 115-120 s with it later that day, most of it process start-up,
#: which smaller runs did not shorten.
QUICK = Profile(
    "quick",
    ((1, 2), (100, 2), (300, 1)),
    20,
    1.5,
    (400,),
    100,
    100,
    1.0,
    1.0,
    1,
    login_after=False,
    level_warm_up=0,
    multi_configs=(("1 worker", 1, 1), ("2 instances", 1, 2)),
)


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
    rows = await admin(PG_COUNT, dbname, [])
    return int(rows[0]["busy"]), int(rows[0]["total"])


#: $2: client ports to leave out (the --before service's pool, idle while this tree's service is measured).
PG_COUNT = (
    "SELECT count(*) AS total, count(*) FILTER (WHERE state IS DISTINCT FROM 'idle') AS busy "
    "FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' "
    "AND application_name <> 'bench-seed' AND coalesce(client_port, -1) <> ALL($2::int[])"
)
PG_PORT = urlsplit(ADMIN_URL).port or 5432


class PgSampler:
    """Counts the bench database's connections in pg_stat_activity every 20 ms while running, leaving out
    those of the processes `exclude` (their ports are read once, at the start)."""

    def __init__(self, dbname: str, exclude: list[int] | None = None) -> None:
        self.dbname = dbname
        self.exclude = exclude or []
        self.max_total = 0
        self.max_busy = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None
        self._ports: list[int] = []

    async def __aenter__(self) -> PgSampler:
        self._ports = client_ports(self.exclude, PG_PORT)
        self._conn = await asyncpg.connect(ADMIN_URL, timeout=5)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            row = await self._conn.fetchrow(PG_COUNT, self.dbname, self._ports)
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
    #: Further instances behind the same target (two instances: request i goes to instance i % 2).
    others: list[Proc] = field(default_factory=list)

    def pids(self) -> list[int]:
        procs = ([self.proc] if self.proc is not None else []) + self.others
        return [pid for proc in procs for pid in tree(proc.pid)]


Role = Literal["server", "other"]


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
    #: Set while the single-worker phases run pinned; None before, after and without pinning.
    pinning: Pinning | None = None

    def start(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str] | None = None,
        *,
        role: Role = "other",
        cwd: Path | None = None,
    ) -> Proc:
        """Start a child; while pinned, a server under test goes to the server's CPU, anything else to the other."""
        proc = Proc(name, cmd, {**self.env, **(env or {})}, self.log_dir, cwd)
        self.procs.append(proc)
        self.pin(proc, role)
        return proc

    def pin(self, proc: Proc, role: Role) -> None:
        """(Re)pin `proc` and its descendants to its role's CPU; a no-op when not pinned."""
        if self.pinning is None:
            return
        if role == "server":
            self.pinning.pin_server(proc.pid)
        else:
            self.pinning.pin_other(proc.pid)

    def stop(self, *procs: Proc) -> None:
        """Stop these children, all shutting down at once."""
        for proc in procs:
            proc.terminate()
        for proc in procs:
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


def service_target(urls: list[str], token: str, name: str = "service") -> Target:
    """The service at one or more base URLs: request i goes to `urls[i % len(urls)]`."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "text/event-stream"}
    body = json.dumps({"content": "Hello, benchmark"}).encode()

    def make(_params: dict[str, str], chats: list[uuid.UUID]) -> loadgen.RequestFactory:
        return lambda i, _r: Request(f"{urls[i % len(urls)]}/api/chats/{chats[i]}/messages", body, headers)

    return Target(name, "service", make)


def bare_target(urls: list[str]) -> Target:
    """The bare relay at one or more base URLs: request i goes to `urls[i % len(urls)]`."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    body = json.dumps({"content": "Hello, benchmark"}).encode()

    def make(params: dict[str, str], _chats: list[uuid.UUID]) -> loadgen.RequestFactory:
        requests = [Request(f"{url}/relay?{qs(params)}", body, headers) for url in urls]
        return lambda i, _r: requests[i % len(requests)]

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
    summary["chars_per_s"] = round(summary["chars"] / wall, 1) if wall > 0 else None
    if pids:
        summary["server_cpu_s"] = round(cpu, 3)
        summary["cpu_us_per_chunk"] = round(cpu / summary["chunks"] * 1e6, 1) if summary["chunks"] else None
        summary["cpu_ms_per_stream"] = round(cpu / summary["complete"] * 1e3, 3) if summary["complete"] else None
    log(
        f"  {target.name:16} users={users:<5} streams={summary['streams']:<5} ok={summary['complete']:<5} "
        f"failed={summary['failed']} truncated={summary['truncated']} ttfc p50/p99="
        f"{summary['ttfc_p50_ms']}/{summary['ttfc_p99_ms']} ms  chunks/s={summary['chunks_per_s']}"
        f"  text/s={summary['chars_per_s']}"
        + (f"  cpu/chunk={summary.get('cpu_us_per_chunk')} us" if pids else "")
        + (f"  cpu/stream={summary.get('cpu_ms_per_stream')} ms" if pids else "")
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
    bench: Bench,
    name: str,
    workers: int = 1,
    redis: bool = False,
    port: int = 0,
    source: Path | None = None,
) -> tuple[Proc, int]:
    """The service on `port` (a free one when 0); `source`: another source tree's (--before), same everything else."""
    port = port or free_port()
    env = {"REDIS_URL": REDIS_URL} if redis else {}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    proc = bench.start(name, uvicorn_cmd("main:create_app", port, workers), env, role="server", cwd=source)
    await wait_http(f"http://127.0.0.1:{port}/health", proc, limit_s=60)
    bench.pin(proc, "server")  # again: uvicorn's worker processes exist now
    return proc, port


async def start_bare(bench: Bench, port: int = 0, workers: int = 1) -> tuple[Proc, int]:
    port = port or free_port()
    proc = bench.start(
        "bare_relay" if workers == 1 else f"bare_relay_w{workers}",
        uvicorn_cmd("bench.bare_relay:create_app", port, workers),
        {"BARE_UPSTREAM": bench.fake_url},
        role="server",
    )
    await wait_http(f"http://127.0.0.1:{port}/", proc)
    bench.pin(proc, "server")
    return proc, port


def alembic_heads(source: Path) -> set[str]:
    """The head revision(s) of a source tree's migrations/versions (read, never run)."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory(str(source / "migrations")).get_heads())


def check_before(source: Path) -> Path:
    """The --before tree, resolved; ValueError (a clear message) when it cannot share this tree's database."""
    source = source.resolve()
    if not (source / "main.py").is_file() or not (source / "migrations" / "versions").is_dir():
        raise ValueError(f"--before {source}: not a source tree of this service (no main.py or migrations/versions)")
    theirs, ours = alembic_heads(source), alembic_heads(ROOT)
    if theirs != ours:
        raise ValueError(
            f"--before {source}: its alembic head {sorted(theirs)} differs from this tree's {sorted(ours)}; "
            "both run on one database migrated by this tree, so export a commit with the same migrations"
        )
    found = subprocess.run(
        [sys.executable, "-c", "import app, main; print(app.__file__)"],
        cwd=source,
        env={**os.environ, "PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if found.returncode != 0 or not Path(found.stdout.strip()).resolve().is_relative_to(source):
        raise ValueError(f"--before {source}: `import app` does not load it from there:\n{found.stdout}{found.stderr}")
    return source


PHASES = ("ttfc", "throughput", "hold", "login", "multi")


def start_pinning(bench: Bench, *, unpinned: bool = False) -> dict[str, Any]:
    """Pin the load generator and PostgreSQL (children get pinned as they start); what was done, for the report."""
    if unpinned:
        return {"pinned": False, "why": "--unpinned"}
    cpus = plan(frozenset(os.sched_getaffinity(0)))
    if cpus is None:
        return {"pinned": False, "why": f"fewer than 2 CPUs available ({sorted(os.sched_getaffinity(0))})"}
    pinning = Pinning(*cpus)
    bench.pinning = pinning
    pinning.pin_self_and_postgres()
    return {
        "pinned": True,
        "method": "os.sched_setaffinity (every thread)",
        "server_cpus": sorted(pinning.server),
        "other_cpus": sorted(pinning.others),
        "postgres_processes": pinning.postgres,
        "phases": "warm-up, ttfc, throughput, hold, login (multi: unpinned)",
    }


def stop_pinning(bench: Bench) -> None:
    """Put every affinity back (idempotent): before the unpinned multi phase and in the `finally`."""
    if bench.pinning is not None:
        bench.pinning.restore()
        bench.pinning = None


async def benchmark(
    profile: Profile,
    phases: tuple[str, ...] = PHASES,
    profile_dir: Path | None = None,
    before: Path | None = None,
    *,
    unpinned: bool = False,
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
    if before is not None:
        report["before_source"] = str(before)
    try:
        report["pinning"] = start_pinning(bench, unpinned=unpinned)
        log(f"pinning: {report['pinning']}")
        await admin(f'CREATE DATABASE "{dbname}"')
        await asyncio.to_thread(migrate, _db_url(dbname, "postgresql+asyncpg"))

        _, seeded = await bench.start_fake_and_seed(tmp)

        starting = [start_bare(bench), start_service(bench, "service")]
        if before is not None:
            starting.append(start_service(bench, "before", source=before))
        (bare_proc, bare_port), (service_proc, service_port), *older = await asyncio.gather(*starting)

        direct = direct_target(bench.fake_url)
        bare = bare_target([f"http://127.0.0.1:{bare_port}"])
        bare.proc = bare_proc
        service = service_target([f"http://127.0.0.1:{service_port}"], seeded.token)
        service.proc = service_proc
        targets = [direct, bare, service]
        old: Target | None = None
        if older:
            old_proc, old_port = older[0]
            old = service_target([f"http://127.0.0.1:{old_port}"], seeded.token, name="before")
            old.proc = old_proc
            targets.append(old)

        async def clear_fake() -> None:
            async with aiohttp.ClientSession(trust_env=False) as s, s.delete(f"{bench.fake_url}/__requests"):
                pass

        def key(target: Target) -> str:
            return "before" if target is old else target.kind

        only = set(phases)
        log("warm-up")
        warm_rounds = 1 if profile is QUICK else 2
        await warm_up(bench, targets, 20, warm_rounds)

        bench.phase = "ttfc"
        log("time to first chunk, paced 50 chunks x 20 ms")
        ttfc: dict[str, Any] = {}
        pg: dict[str, Any] = {}
        top_level = max(users for users, _rounds in profile.ttfc_levels)
        for users, rounds in profile.ttfc_levels if "ttfc" in only else ():
            level: dict[str, Any] = {}
            for target in targets:
                # Unmeasured streams first (full profile; the quick one has no time for them): a server that sat
                # idle while the others ran pays for it in its first streams (docs/PERFORMANCE.md).
                if profile.level_warm_up and target.proc is not None:
                    warm = min(users, profile.level_warm_up)
                    await run_closed(bench, target, PACED, users=warm, rounds=1, seconds=30)
                await clear_fake()
                if target.kind == "service" and users == top_level:
                    # The pool's use, counted at the top level only (the report shows that one), and for both
                    # services alike: the sampler's query every 20 ms loads PostgreSQL's core, which showed in
                    # the p99 of whichever service ran with it.
                    other = old if target is service else service
                    async with PgSampler(dbname, other.pids() if other is not None else None) as sampler:
                        level[key(target)] = await run_closed(
                            bench, target, PACED, users=users, rounds=rounds, seconds=90
                        )
                    if target is service:
                        pg[str(users)] = {
                            "max_connections": sampler.max_total,
                            "max_busy": sampler.max_busy,
                            "samples": sampler.samples,
                            "streams": level[key(target)]["streams"],
                            "complete": level[key(target)]["complete"],
                        }
                else:
                    level[key(target)] = await run_closed(bench, target, PACED, users=users, rounds=rounds, seconds=90)
            ttfc[str(users)] = level
        report["ttfc"] = ttfc
        report["db_connections"] = pg

        log(f"unpaced throughput, {profile.throughput_users} streams of 2000 chunks, {profile.throughput_seconds} s")
        throughput: dict[str, Any] = {}
        bench.phase = "unpaced"
        for target in targets if "throughput" in only else ():
            await clear_fake()
            throughput[key(target)] = await run_closed(
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
        if old is not None and old.proc is not None:
            bench.stop(old.proc)  # the hold, login and multi phases measure this tree only

        log("streams held open")
        hold: dict[str, Any] = {}
        for streams in profile.hold_levels if "hold" in only else ():
            hold[str(streams)] = {}
            # Fresh processes, so the figure is not hidden in memory a previous phase already grew into.
            bench.stop(bare_proc, service_proc)
            (bare_proc, _), (service_proc, _) = await asyncio.gather(
                start_bare(bench, bare_port), start_service(bench, "service", port=service_port)
            )
            bare.proc, service.proc = bare_proc, service_proc
            await warm_up(bench, [bare, service], 20, warm_rounds)
            for target in (bare, service):
                await clear_fake()
                hold[str(streams)][target.kind] = await run_hold(bench, target, streams)
        report["hold"] = hold

        bench.phase = "login"
        if "login" in only:
            report["login_burst"] = await login_phase(bench, service, bare, service_port)

        bench.stop(service_proc, bare_proc)
        stop_pinning(bench)
        if "multi" in only:
            report["multi"] = await multi_phase(bench, direct)
    finally:
        stop_pinning(bench)
        bench.stop(*reversed(bench.procs))
        if bench.seed is not None:
            await bench.seed.conn.close()
        try:
            await admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        except (OSError, asyncpg.PostgresError) as exc:
            log(f"could not drop {dbname}: {exc}")
    report["duration_s"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    return report


async def warm_up(bench: Bench, targets: list[Target], users: int, rounds: int) -> None:
    """Paced streams to wake fresh servers up (imports, pools), figures thrown away; at the same time, except
    that the service-kind targets go one after another (they share the seed's database connection)."""
    services = [t for t in targets if t.kind == "service"]
    together = [t for t in targets if t.kind != "service"] + services[:1]
    runs = (run_closed(bench, t, PACED, users=users, rounds=rounds, seconds=20, stagger=0.2) for t in together)
    await asyncio.gather(*runs)
    for target in services[1:]:
        await run_closed(bench, target, PACED, users=users, rounds=rounds, seconds=20, stagger=0.2)


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
    again = (
        await run_closed(bench, service, LOGIN_PACED, users=users, rounds=1, seconds=30, stagger=2.0)
        if profile.login_after
        else None
    )
    bare_base = await run_closed(bench, bare, LOGIN_PACED, users=users, rounds=1, seconds=30, stagger=2.0)
    log(f"  logins: {burst.get('logins')}")
    result = {"baseline": baseline, "burst": burst, "bare_baseline": bare_base}
    return result if again is None else {**result, "baseline_after": again}


async def _keep(procs: list[Proc], starting: Awaitable[tuple[Proc, int]]) -> tuple[Proc, int]:
    """Await a server's start and remember its process (to stop it with its configuration)."""
    proc, port = await starting
    procs.append(proc)
    return proc, port


#: The multi phase's configurations: (name, uvicorn workers per process, processes).
async def multi_phase(bench: Bench, direct: Target) -> dict[str, Any]:
    """Unpinned, REDIS_URL set (event log, stop and follow across processes): each configuration of the
    service beside the bare relay run the same way; added TTFC against the fake read directly in this phase."""
    assert bench.seed is not None
    profile = bench.profile
    names = ", ".join(name for name, _workers, _instances in profile.multi_configs)
    log(f"multi (unpinned, REDIS_URL set): {names}; each beside the bare relay")
    bench.phase = "multi"
    users = profile.multi_ttfc_users
    multi: dict[str, Any] = {
        "direct": await run_closed(bench, direct, PACED, users=users, rounds=profile.multi_rounds, seconds=30)
    }
    for name, workers, instances in profile.multi_configs:
        bench.phase = f"multi-{name.replace(' ', '')}"
        config: dict[str, Any] = {"workers": workers, "instances": instances, "users": users}
        procs: list[Proc] = []
        try:
            # All of a configuration's processes start at once (start-up is most of this phase's time);
            # the idle ones wait while the others are measured.
            labels = [f"service_w{workers}" + (f"_i{n + 1}" if instances > 1 else "") for n in range(instances)]
            started = await asyncio.gather(
                *(_keep(procs, start_bare(bench, workers=workers)) for _ in range(instances)),
                *(_keep(procs, start_service(bench, label, workers=workers, redis=True)) for label in labels),
            )
            bares, services = started[:instances], started[instances:]
            bare = bare_target([f"http://127.0.0.1:{port}" for _, port in bares])
            service = service_target([f"http://127.0.0.1:{port}" for _, port in services], bench.seed.token)
            for target, group in ((bare, bares), (service, services)):
                target.proc, target.others = group[0][0], [proc for proc, _ in group[1:]]
            await warm_up(bench, [bare, service], 20 if profile is not QUICK else 10, 1)
            for target in (bare, service):
                config[target.kind] = {
                    "ttfc": await run_closed(
                        bench, target, PACED, users=users, rounds=profile.multi_rounds, seconds=30
                    ),
                    "throughput": await run_closed(
                        bench,
                        target,
                        UNPACED,
                        users=profile.throughput_users * max(workers, instances),
                        rounds=40,
                        seconds=profile.multi_seconds,
                        stagger=0.1,
                        fresh_chats=True,
                    ),
                    "processes": len(target.pids()),
                }
                per_chunk(bench, config[target.kind]["throughput"])
        finally:
            bench.stop(*procs)
        multi[name] = config
    return multi


async def _cancellable(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """SIGTERM (e.g. from `timeout`) cancels the run, so its `finally` still kills children, puts the CPU
    affinities back and drops the DB."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the streaming relay against a bare relay.")
    parser.add_argument("--quick", action="store_true", help="the < 2 minute variant (make bench-quick)")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {PHASES}")
    parser.add_argument("--profile", action="store_true", help="py-spy record the service during its runs")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="PATH",
        help="also run the service from this source tree (e.g. a `git archive` export of an older commit) "
        "in the ttfc and throughput phases, right after this tree's; same migrations required",
    )
    parser.add_argument(
        "--unpinned",
        action="store_true",
        help="pin nothing (every process shares every core), e.g. to see the login burst as on a busy machine",
    )
    args = parser.parse_args(argv)
    from bench.report import render, write

    before = None
    if args.before is not None:
        try:
            before = check_before(args.before)
        except ValueError as exc:
            parser.error(str(exc))
    profile = QUICK if args.quick else FULL
    phases = tuple(p for p in args.only.split(",") if p in PHASES)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report = asyncio.run(
        _cancellable(
            benchmark(
                profile, phases, RESULTS / f"profile-{stamp}" if args.profile else None, before, unpinned=args.unpinned
            )
        )
    )
    table = render(report)
    print(table, flush=True)
    paths = write(report, table, RESULTS)
    print(f"results: {', '.join(str(p.relative_to(ROOT)) for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
