"""Send cost vs chat length: what a chat's stored history costs a send, an open and a list (messages table).

`python -m bench.bench_history` (what `make bench-history` runs; 2.5-3.5 minutes on 2 cores). On one uvicorn worker
against PostgreSQL (its own throwaway database, dropped at the end, even on failure), with bench/run.py's fake
n8n answering at once (`scenario=paced&chunks=5&interval_ms=0`), for chats pre-filled in SQL with 0, 500,
2,000 and 5,000 messages of 500 characters it measures:

- **send**: `POST /api/chats/{id}/messages`, sequential, each on a fresh chat of exactly that length; added
  time to first chunk = service TTFC - the fake n8n's own TTFC, per percentile (p50, p99, nearest rank), the
  fake read directly with a body like the service's (the same history: the last 49 messages at most, by
  `N8N_HISTORY_MAX_MESSAGES`), one direct request before each service send; also the time to the response
  head and to `done` (which comes after the final write). 100 sends (+ 2 warm-up) per length; each
  length's chats are built (chats, then their messages as one branch), then analyzed (`ANALYZE`, as
  autovacuum would), then a `CHECKPOINT` flushes them, then the sends run;
- **open**: `GET /api/chats/{id}` on one chat of that length, and `GET /api/chats/{id}?last=50` (what a
  client opening a long chat asks for);
- **list**: `GET /api/chats` (page 1, limit 50) for a user with `--list-chats` chats of `--list-messages`
  messages (default 10,000 x 100) and for a user with one chat of `--list-long` messages (default 5,000).

Prints a Markdown table and writes `history-<date>.json`, `.md` and `latest-history.md` to bench/results/.

    .venv/bin/python -m bench.bench_history
    .venv/bin/python -m bench.bench_history --lengths 0,20 --sends 3 --list-chats 20 --list-long 20   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench import loadgen
from bench.loadgen import Kind, Live, Request, StreamResult, percentile
from bench.procs import machine
from bench.report import write
from bench.run import (
    QUICK,
    RESULTS,
    Bench,
    _cancellable,
    _db_url,
    admin,
    base_env,
    log,
    migrate,
    qs,
    set_upstream,
    start_service,
)

#: The fake n8n answers at once: begin, 5 items, end, no sleep between lines.
IMMEDIATE = {"scenario": "paced", "chunks": "5", "interval_ms": "0"}
CONTENT = "Hello, benchmark: one more question about the history of this chat."


@dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = (0, 500, 2000, 5000)
    sends: int = 100
    warmup: int = 2
    opens: int = 100
    chars: int = 500
    list_chats: int = 10_000
    list_messages: int = 100
    list_long: int = 5000
    list_runs: int = 100


# --- seeding, in SQL --------------------------------------------------------------------------------------

#: 1,000 texts of exactly `chars` characters: words drawn from 2,000 pseudo-words (2-9 letters), skewed so
#: a few are frequent like in prose. pglz stores such a history at ~1.8x (English prose: ~2x); the 45 words
#: of bench_chats would compress ~4x and make detoasting look cheaper than it is.
TEXTS_SQL = """
CREATE TEMP TABLE bench_texts AS
WITH v AS (
  SELECT array_agg(translate(left(md5(k::text), 2 + k % 8), '0123456789', 'etaoinshrd') ORDER BY k) AS w
  FROM generate_series(1, 2000) k
)
SELECT i, rpad(left(string_agg(v.w[1 + floor(2000 * power(random(), 3))::int], ' '), $1::int), $1::int, '.') AS t
FROM v, generate_series(0, 999) i, generate_series(1, ($1::int / 3) + 10) k
GROUP BY i
"""


#: The messages of the chats `$1` (in that order: `n` = 1, 2, ...): `$2` each, one branch (each the parent of
#: the next), alternating roles, complete. Every message is unique (its id, its text starts with its chat and
#: position, its time), as in real chats. Ids are derived from the chat and the position, so the parent and
#: the chat's current message can be named without reading anything back.
MESSAGES_SQL = (
    "INSERT INTO messages (id, chat_id, parent_id, role, content, status, created_at, updated_at) "
    "SELECT md5(c.id::text || '.' || g)::uuid, c.id, "
    "CASE WHEN g = 0 THEN NULL ELSE md5(c.id::text || '.' || (g - 1))::uuid END, "
    "CASE WHEN g % 2 = 0 THEN 'user' ELSE 'assistant' END, left(c.n || '.' || g || ' ' || t.t, $3), 'complete', "
    "now() - make_interval(secs => $2 - g + c.n * 0.001), now() - make_interval(secs => $2 - g + c.n * 0.001) "
    "FROM unnest($1::uuid[]) WITH ORDINALITY AS c(id, n) CROSS JOIN generate_series(0, $2 - 1) g "
    "JOIN bench_texts t ON t.i = (g * 7919 + c.n * 31) % 1000"
)


async def insert_chats(
    conn: asyncpg.Connection,
    *,
    team_id: uuid.UUID,
    user_id: uuid.UUID,
    agent_id: uuid.UUID,
    count: int,
    length: int,
    chars: int,
) -> list[uuid.UUID]:
    """`count` chats of `length` messages of `chars` characters (two INSERT ... SELECT), newest first."""
    sql = (
        "INSERT INTO chats (id, team_id, user_id, agent_id, title, archived, pinned, current_message_id,"
        " message_count, last_message_at, created_at, updated_at) "
        "SELECT x.id, $1, $2, $3, 'bench chat ' || x.c, false, false, "
        "CASE WHEN $5 > 0 THEN md5(x.id::text || '.' || ($5 - 1))::uuid END, $5, "
        "now() - make_interval(secs => x.c), now() - make_interval(secs => $4 + x.c), "
        "now() - make_interval(secs => x.c) "
        "FROM (SELECT gen_random_uuid() AS id, c FROM generate_series(1, $4) c) x ORDER BY c RETURNING id"
    )
    async with conn.transaction():
        rows = await conn.fetch(sql, team_id, user_id, agent_id, count, length)
        ids = [row["id"] for row in rows]
        if length:
            await conn.execute(MESSAGES_SQL, ids, length, chars)
    return ids


async def checkpoint(conn: asyncpg.Connection) -> None:
    """Flush the build's dirty pages now, so the sends do not pay for writing them (needs pg_checkpoint)."""
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.PostgresError as exc:
        log(f"  CHECKPOINT refused ({exc}); the sends may pay for the build's writes")


async def add_user(conn: asyncpg.Connection, team_id: uuid.UUID, email: str) -> uuid.UUID:
    user_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO users (id, team_id, email, password_hash, full_name, role, is_active, preferences, created_at,"
        " updated_at) VALUES ($1, $2, $3, 'not-a-hash: never logs in', 'Bench', 'user', true, '{}', now(), now())",
        user_id,
        team_id,
        email,
    )
    return user_id


# --- measuring --------------------------------------------------------------------------------------------


def n8n_body(length: int, chars: int, chat_id: uuid.UUID) -> bytes:
    """What the service POSTs to n8n for a chat of `length` messages (history capped at 49 + the new one)."""
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * chars} for i in range(min(length, 49))]
    history.append({"role": "user", "content": CONTENT})
    ids = {"chat_id": str(chat_id), "agent_id": str(chat_id), "user_id": str(chat_id), "team_id": str(chat_id)}
    return json.dumps(
        {
            "messages": history,
            "system_prompt": "",
            "config": {},
            "chatInput": CONTENT,
            "sessionId": str(chat_id),
            "metadata": {**ids, "message_id": str(chat_id)},
        }
    ).encode()


def ms(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value * 1000, 2)


async def timed_gets(session: aiohttp.ClientSession, url: str, headers: dict[str, str], runs: int) -> dict[str, Any]:
    """One warm-up GET, then `runs` sequential GETs; p50/p99 (ms), the body size and X-Total-Count."""
    timings: list[float] = []
    size, total = 0, None
    for attempt in range(runs + 1):
        t0 = time.perf_counter()
        async with session.get(url, headers=headers) as response:
            body = await response.read()
            elapsed = time.perf_counter() - t0
            if response.status != 200:
                raise RuntimeError(f"GET {url}: HTTP {response.status} {body[:200]!r}")
            size, total = len(body), response.headers.get("X-Total-Count")
        if attempt:
            timings.append(elapsed)
    return {"runs": runs, "p50_ms": ms(timings, 50), "p99_ms": ms(timings, 99), "bytes": size, "total": total}


def stream_summary(results: list[StreamResult]) -> dict[str, Any]:
    summary = loadgen.summarize(results)
    done = [r.duration for r in results if r.outcome == "complete"]
    summary.update(done_p50_ms=ms(done, 50), done_p99_ms=ms(done, 99))
    return summary


async def measure_length(bench: Bench, config: Config, length: int, service_url: str, token: str) -> dict[str, Any]:
    assert bench.seed is not None
    s = bench.seed
    t0 = time.perf_counter()
    chats = await insert_chats(
        s.conn,
        team_id=s.team_id,
        user_id=s.user_id,
        agent_id=s.agent_id,
        count=config.warmup + config.sends + 1,
        length=length,
        chars=config.chars,
    )
    built = time.perf_counter() - t0
    # Statistics as autovacuum would have them on a live database: without them the planner sees tables of
    # zero rows and may pick any index for the chat lookup (a team-wide scan instead of the primary key).
    await s.conn.execute("ANALYZE chats")
    await s.conn.execute("ANALYZE messages")
    await checkpoint(s.conn)
    open_chat, send_chats = chats[0], chats[1:]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "text/event-stream"}
    body = json.dumps({"content": CONTENT}).encode()
    direct_body = n8n_body(length, config.chars, open_chat)
    direct = Request(
        f"{bench.fake_url}/webhook/agent-stream?{qs(IMMEDIATE)}", direct_body, {"Content-Type": "application/json"}
    )
    live = Live()
    service_results: list[StreamResult] = []
    direct_results: list[StreamResult] = []
    async with loadgen.client_session() as session:
        for index, chat_id in enumerate(send_chats):
            # Interleaved, so drift of the host over the run touches both sides alike.
            one_direct = await loadgen.one_stream(session, direct, "direct", stream_timeout=30, live=live)
            kind: Kind = "service"
            request = Request(f"{service_url}/api/chats/{chat_id}/messages", body, headers)
            one = await loadgen.one_stream(session, request, kind, stream_timeout=30, live=live)
            if index >= config.warmup:
                direct_results.append(one_direct)
                service_results.append(one)
        auth = {"Authorization": f"Bearer {token}"}
        opened = await timed_gets(session, f"{service_url}/api/chats/{open_chat}", auth, config.opens)
        # What a client opening a long chat asks for: the newest 50 messages of the branch.
        opened_last = await timed_gets(session, f"{service_url}/api/chats/{open_chat}?last=50", auth, config.opens)
    service = stream_summary(service_results)
    fake = stream_summary(direct_results)
    added = {
        q: None
        if service[f"ttfc_{q}_ms"] is None or fake[f"ttfc_{q}_ms"] is None
        else round(service[f"ttfc_{q}_ms"] - fake[f"ttfc_{q}_ms"], 2)
        for q in ("p50", "p99")
    }
    toast = await s.conn.fetchval(
        "SELECT coalesce(sum(pg_column_size(m.*)), 0) FROM messages m WHERE chat_id = $1", open_chat
    )
    log(
        f"  {length:>5} messages: built {built:.1f} s, sends ok {service['complete']}/{service['streams']}, "
        f"added TTFC p50/p99 {added['p50']}/{added['p99']} ms (fake {fake['ttfc_p50_ms']}/{fake['ttfc_p99_ms']}), "
        f"done p50 {service['done_p50_ms']} ms, open p50/p99 {opened['p50_ms']}/{opened['p99_ms']} ms, "
        f"?last=50 p50/p99 {opened_last['p50_ms']}/{opened_last['p99_ms']} ms"
        + (f"  {service['reasons']}" if service["reasons"] else "")
    )
    return {
        "messages": length,
        "build_s": round(built, 2),
        "stored_bytes": toast,
        "service": service,
        "direct": fake,
        "added_ttfc_p50_ms": added["p50"],
        "added_ttfc_p99_ms": added["p99"],
        "open": opened,
        "open_last": opened_last,
        # Every measured send in order (ms): service TTFC and the fake's own just before it.
        "ttfc_ms": [None if r.ttfc is None else round(r.ttfc * 1000, 2) for r in service_results],
        "direct_ttfc_ms": [None if r.ttfc is None else round(r.ttfc * 1000, 2) for r in direct_results],
    }


async def measure_lists(bench: Bench, config: Config, service_url: str, settings: Any) -> dict[str, Any]:
    from app.security import create_token

    assert bench.seed is not None
    s = bench.seed
    out: dict[str, Any] = {}
    cases = (
        ("many", "bench-many@example.com", config.list_chats, config.list_messages),
        ("long", "bench-long@example.com", 1, config.list_long),
    )
    async with loadgen.client_session() as session:
        for key, email, count, length in cases:
            user_id = await add_user(s.conn, s.team_id, email)
            t0 = time.perf_counter()
            await insert_chats(
                s.conn,
                team_id=s.team_id,
                user_id=user_id,
                agent_id=s.agent_id,
                count=count,
                length=length,
                chars=config.chars,
            )
            await s.conn.execute("ANALYZE chats")
            await s.conn.execute("ANALYZE messages")
            built = time.perf_counter() - t0
            token = create_token(settings=settings, user_id=user_id, team_id=s.team_id, token_type="access").token
            result = await timed_gets(
                session, f"{service_url}/api/chats", {"Authorization": f"Bearer {token}"}, config.list_runs
            )
            result.update(chats=count, messages=length, build_s=round(built, 1))
            out[key] = result
            log(
                f"  list {count} x {length}: built {built:.1f} s, p50/p99 {result['p50_ms']}/{result['p99_ms']} ms, "
                f"total {result['total']}"
            )
    return out


# --- the run ------------------------------------------------------------------------------------------------


async def benchmark(config: Config, results: Path = RESULTS) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="bench-history-"))
    dbname = f"bench_{uuid.uuid4().hex[:10]}"
    # Bench wants a streaming Profile; nothing here reads it.
    bench = Bench(QUICK, results / f"logs-history-{stamp}", base_env(tmp, dbname), dbname)
    report: dict[str, Any] = {
        "profile": "history",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "python": sys.version.split()[0],
        "config": asdict(config),
    }
    try:
        await admin(f'CREATE DATABASE "{dbname}"')
        await asyncio.to_thread(migrate, _db_url(dbname, "postgresql+asyncpg"))

        # The admin's password is never used here: a cheap hash instead of the configured cost.
        settings, seeded = await bench.start_fake_and_seed(tmp, bcrypt_rounds=4)
        await set_upstream(seeded, bench.fake_url, IMMEDIATE)
        await seeded.conn.execute(TEXTS_SQL, config.chars)
        report["postgres"] = await seeded.conn.fetchval("SHOW server_version")

        service_proc, service_port = await start_service(bench, "service")
        service_url = f"http://127.0.0.1:{service_port}"
        report["workers"] = 1

        log(f"sends, one at a time, fake n8n answering at once ({qs(IMMEDIATE)})")
        lengths: dict[str, Any] = {}
        for length in config.lengths:
            lengths[str(length)] = await measure_length(bench, config, length, service_url, seeded.token)
        report["lengths"] = lengths

        log("chat list")
        report["list"] = await measure_lists(bench, config, service_url, settings)
        bench.stop(service_proc)
    finally:
        for proc in list(reversed(bench.procs)):
            proc.stop()
        if bench.seed is not None:
            await bench.seed.conn.close()
        try:
            await admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        except (OSError, asyncpg.PostgresError) as exc:
            log(f"could not drop {dbname}: {exc}")
    report["database"] = dbname
    report["duration_s"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    return report


# --- the table ------------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def ratio(report: dict[str, Any], key: str = "added_ttfc_p50_ms") -> float | None:
    """The figure at the longest chat over the figure at the shortest (e.g. send at 5,000 / send at 0)."""
    lengths = report.get("lengths", {})
    if len(lengths) < 2:
        return None
    low, high = lengths[min(lengths, key=int)].get(key), lengths[max(lengths, key=int)].get(key)
    return None if low is None or high is None or low <= 0 else high / low


def render(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    config = report.get("config", {})
    lines = [
        f"Send cost vs chat length (messages table), {report.get('date')}, {m.get('nproc')} cores "
        f"({m.get('cpu')}), PostgreSQL {report.get('postgres')}, Python {report.get('python')}, one worker, "
        f"messages of {config.get('chars')} characters, took {report.get('duration_s')} s",
        "",
        "| messages in the chat | stored (pglz) | sends ok | added TTFC p50 | added TTFC p99 | response head p50 "
        "| request to `done` p50 | `GET /api/chats/{id}` p50 | p99 | body | `?last=50` p50 | p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length, row in report.get("lengths", {}).items():
        svc, opened = row["service"], row["open"]
        lines.append(
            f"| {int(length):,} | {_f(row['stored_bytes'] / 1024, 0)} kB | {svc['complete']}/{svc['streams']} "
            f"| {_f(row['added_ttfc_p50_ms'])} ms | {_f(row['added_ttfc_p99_ms'])} ms | {_f(svc['head_p50_ms'])} ms "
            f"| {_f(svc['done_p50_ms'])} ms | {_f(opened['p50_ms'])} ms | {_f(opened['p99_ms'])} ms "
            f"| {_f(opened['bytes'] / 1024, 0)} kB "
            f"| {_f(row.get('open_last', {}).get('p50_ms'))} ms | {_f(row.get('open_last', {}).get('p99_ms'))} ms |"
        )
    lines += ["", "| `GET /api/chats` (page 1, limit 50) | runs | p50 | p99 | built in |", "|---|---:|---:|---:|---:|"]
    for row in report.get("list", {}).values():
        lines.append(
            f"| {row['chats']:,} chat{'s' if row['chats'] != 1 else ''} x {row['messages']:,} messages (one user) "
            f"| {row['runs']} "
            f"| {_f(row['p50_ms'])} ms | {_f(row['p99_ms'])} ms | {_f(row['build_s'])} s |"
        )
    lengths = report.get("lengths", {})
    if len(lengths) >= 2:
        low, high = min(lengths, key=int), max(lengths, key=int)
        r50, r99 = ratio(report), ratio(report, "added_ttfc_p99_ms")
        lines += [
            "",
            f"Send at {int(high):,} / send at {int(low):,} (added TTFC): p50 {_f(r50, 2)}x, p99 {_f(r99, 2)}x "
            f"({_f(lengths[high]['added_ttfc_p50_ms'])} / {_f(lengths[low]['added_ttfc_p50_ms'])} ms p50).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Config()
    parser.add_argument("--lengths", default=",".join(map(str, default.lengths)), help="messages per chat")
    parser.add_argument("--sends", type=int, default=default.sends, help="measured sends per length")
    parser.add_argument("--opens", type=int, default=default.opens, help="measured opens per length")
    parser.add_argument("--chars", type=int, default=default.chars, help="characters per stored message")
    parser.add_argument("--list-chats", type=int, default=default.list_chats)
    parser.add_argument("--list-messages", type=int, default=default.list_messages)
    parser.add_argument("--list-long", type=int, default=default.list_long, help="messages of the one-chat user")
    parser.add_argument("--list-runs", type=int, default=default.list_runs)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the result files go")
    args = parser.parse_args(argv)
    config = Config(
        lengths=tuple(int(x) for x in args.lengths.split(",") if x.strip()),
        sends=args.sends,
        opens=args.opens,
        chars=args.chars,
        list_chats=args.list_chats,
        list_messages=args.list_messages,
        list_long=args.list_long,
        list_runs=args.list_runs,
    )
    report = asyncio.run(_cancellable(benchmark(config, args.results)))
    table = render(report)
    print(table, flush=True)
    paths = write(report, table, args.results)
    print(f"results: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
