"""The benchmark's own parsers and contract checks (no benchmarking here: bench/ is run by `make bench`),
and tiny runs of bench/bench_history.py, bench/bench_usage.py and bench/bench_finish.py so they cannot rot."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from starlette.routing import Match

from bench import bench_finish, bench_history, bench_routing, bench_usage
from bench.affinity import Pinning, get_affinity, plan
from bench.loadgen import ContractChecker, Event, NDJSONParser, SSEParser, StreamResult, percentile, summarize
from bench.procs import CLK_TCK, client_ports, cpu_seconds, tree
from bench.report import render, rows, write
from bench.run import ROOT, admin, bare_target, check_before, service_target
from main import create_app
from tests.conftest import ADMIN_URL, _plain_url, make_settings


def frame(event_id: int, kind: str, data: object) -> bytes:
    return f"data: {json.dumps({'type': kind, 'data': data})}\nid: {event_id}\n\n".encode()


def test_sse_parser_reassembles_events_cut_anywhere() -> None:
    wire = frame(1, "start", {}) + b": ping\n\n" + frame(2, "message", {"content": "h\u00e9"}) + frame(3, "done", {})
    for size in (1, 2, 3, 7, len(wire)):
        parser = SSEParser()
        events: list[Event] = []
        for pos in range(0, len(wire), size):
            events += parser.feed(wire[pos : pos + size])
        assert [(e.id, e.type, e.comment) for e in events] == [
            ("1", "start", None),
            (None, None, "ping"),
            ("2", "message", None),
            ("3", "done", None),
        ]
        assert events[2].data["data"]["content"] == "h\u00e9"
        assert not parser.pending


def test_sse_parser_accepts_crlf_split_between_reads() -> None:
    parser = SSEParser()
    events = parser.feed(b'id: 1\r\ndata: {"type": "message", "data": {"content": "a"}}\r')
    assert events == []
    events = parser.feed(b"\n\r\n")
    assert [(e.id, e.type) for e in events] == [("1", "message")]


def test_sse_parser_joins_multiline_data_and_flags_invalid_json() -> None:
    parser = SSEParser()
    events = parser.feed(b'data: {"type":\ndata: "done"}\nid: 9\n\ndata: not json\n\n')
    assert events[0].type == "done"
    assert events[0].id == "9"
    assert events[1].type == "invalid"


def test_sse_parser_reports_an_unfinished_block_as_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"type": "message"') == []
    assert parser.pending


def test_ndjson_parser_keeps_a_partial_line_for_the_next_read() -> None:
    parser = NDJSONParser()
    assert parser.feed(b'{"type":"begin"}\n{"type":"it') == [{"type": "begin"}]
    assert parser.feed(b'em","content":"x"}\n[1]\n') == [{"type": "item", "content": "x"}, {"type": "invalid"}]


def _check(kind: str, events: list[tuple[str, str, object]]) -> ContractChecker:
    checker = ContractChecker(kind)  # type: ignore[arg-type]
    for event_id, type_, data in events:
        checker.event(Event(event_id, {"type": type_, "data": data}))
    return checker


def test_contract_accepts_the_service_stream() -> None:
    checker = _check(
        "service",
        [("1", "start", {}), ("2", "status", {}), ("3", "message", {"content": "a"}), ("4", "done", {})],
    )
    assert checker.violation is None
    assert checker.terminal == "done"


def test_contract_rejects_a_missing_start_a_gap_in_ids_and_events_after_the_end() -> None:
    assert _check("service", [("1", "message", {"content": "a"})]).violation == "first event is 'message', not 'start'"
    gap = _check("bare", [("1", "message", {"content": "a"}), ("3", "message", {"content": "b"})])
    assert gap.violation == "event id '3' after 1"
    late = _check("bare", [("1", "done", {}), ("2", "message", {"content": "a"})])
    assert late.violation == "event after the terminal event"
    assert _check("bare", [("1", "message", {"content": 5})]).violation == "message event without text content"


def test_contract_keeps_the_error_code() -> None:
    checker = _check("service", [("1", "start", {}), ("2", "error", {"code": "upstream_timeout", "message": "x"})])
    assert checker.terminal == "error"
    assert checker.error_code == "upstream_timeout"


def test_summary_counts_outcomes_and_percentiles() -> None:
    results = [
        StreamResult(outcome="complete", ttfc=0.010, chunks=3, gaps=[0.02, 0.0]),
        StreamResult(outcome="complete", ttfc=0.030, chunks=1),
        StreamResult(outcome="failed", reason="HTTP 409"),
        StreamResult(outcome="truncated", reason="timeout", ttfc=0.020, chunks=1),
    ]
    summary = summarize(results)
    assert (summary["complete"], summary["failed"], summary["truncated"]) == (2, 1, 1)
    assert summary["reasons"] == {"HTTP 409": 1, "timeout": 1}
    assert summary["chunks"] == 5
    assert summary["ttfc_p50_ms"] == 20.0
    assert summary["ttfc_p99_ms"] == 30.0
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


@pytest.mark.slow
@pytest.mark.timeout(45)
async def test_bench_history_runs_at_tiny_sizes(tmp_path: Path) -> None:
    """Live uvicorn + fake n8n + a throwaway database: every send completes, the table and files are written."""
    config = bench_history.Config(
        lengths=(0, 20),
        sends=3,
        warmup=1,
        opens=3,
        chars=100,
        list_chats=20,
        list_messages=5,
        list_long=20,
        list_runs=3,
    )
    report = await bench_history.benchmark(config, tmp_path)
    assert set(report["lengths"]) == {"0", "20"}
    for length, row in report["lengths"].items():
        assert row["service"]["complete"] == row["service"]["streams"] == 3, row["service"]["reasons"]
        assert row["direct"]["complete"] == 3
        assert row["added_ttfc_p50_ms"] is not None
        assert row["open"]["runs"] == row["open_last"]["runs"] == 3
        assert len(row["ttfc_ms"]) == 3
        # The open chat has exactly `length` messages of `chars` characters (JSON body: at least that much).
        assert row["open"]["bytes"] >= int(length) * 100
    assert report["list"]["many"]["total"] == "20"
    assert report["list"]["long"]["total"] == "1"
    dropped = await admin("SELECT 1 FROM pg_database WHERE datname = $1", report["database"])
    assert dropped == []
    table = bench_history.render(report)
    assert "| 20 | " in table
    assert "20 chats x 5 messages" in table
    assert "Send at 20 / send at 0" in table
    paths = write(report, table, tmp_path)
    assert (tmp_path / "latest-history.md").read_text() == table
    assert json.loads(paths[0].read_text())["lengths"]["20"]["messages"] == 20


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_bench_usage_runs_at_tiny_sizes() -> None:
    """A throwaway database, a few hundred ledger rows, every report answered 200 and timed."""
    args = argparse.Namespace(admin_url=_plain_url(ADMIN_URL), rows=400, teams=2, days=40, runs=2)
    results = await bench_usage.run(args)
    assert [q["name"] for q in results["queries"]][:3] == [
        "team, 30 days, by day",
        "team, 30 days, by agent",
        "team, 30 days, by user",
    ]
    assert all(q["runs"] == 2 and q["p50_ms"] > 0 for q in results["queries"])
    assert 0 < results["team_rows_30_days"] <= 200
    assert results["rollup_rows"] > 0  # the reports read the roll-up the migration back-filled
    assert results["rebuild_rows"] == results["rollup_rows"]  # and rebuilt it, timed
    assert results["rebuild_s"] >= 0


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_bench_finish_runs_at_tiny_sizes() -> None:
    """A throwaway database, a few final writes of each kind timed, and one round trip each (autocommit)."""
    args = argparse.Namespace(admin_url=_plain_url(ADMIN_URL), calls=6, warmup=4, trips=3)
    results = await bench_finish.run(args)
    assert [(r["kind"], r["calls"]) for r in results["rounds"]] == [("complete", 6), ("error", 6)]
    assert all(r["cpu_us"] > 0 and r["wall_p50_us"] > 0 for r in results["rounds"])
    assert results["round_trips"] == {"complete": 1.0, "error": 1.0}


def test_bench_routing_matches_every_path_it_names(tmp_path: Path) -> None:
    """Each path of the routing benchmark reaches a route (a 404 only for the one meant to), so its figures are
    those of the routes named."""
    app = create_app(make_settings("postgresql+asyncpg://postgres@127.0.0.1:5432/unused", tmp_path))
    for method, path in bench_routing.PATHS:
        scope = bench_routing._scope(app, method, path)
        matched = [route for route in app.router.routes if route.matches(scope)[0] == Match.FULL]
        assert bool(matched) == (path != "/no/such/path"), (method, path)
    results = bench_routing.run(rounds=5)
    assert [name for name, _ in results] == [f"{method} {path}" for method, path in bench_routing.PATHS]
    assert all(micros > 0 for _, micros in results)


# --- pinning, CPU, the --before check, the new report rows -------------------------------------------


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A shell with a sleeping child of its own (a process tree like uvicorn's), killed at the end."""
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        yield proc
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(5)


def test_plan_puts_the_server_on_the_first_cpu_and_the_rest_on_the_second() -> None:
    assert plan(frozenset({0})) is None
    assert plan(frozenset({3, 1, 2})) == (frozenset({1}), frozenset({2}))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs 2 CPUs")
def test_pinning_a_child_tree_and_restoring_it(child: subprocess.Popen[bytes]) -> None:
    cpus = plan(frozenset(os.sched_getaffinity(0)))
    assert cpus is not None
    pids = tree(child.pid)
    assert len(pids) == 2
    before = {pid: get_affinity(pid) for pid in pids}
    pinning = Pinning(*cpus)
    pinning.pin_server(child.pid)
    assert {pid: get_affinity(pid) for pid in pids} == dict.fromkeys(pids, cpus[0])
    pinning.pin_other(child.pid)  # re-pinning keeps the first recorded original
    assert get_affinity(pids[1]) == cpus[1]
    pinning.restore()
    assert {pid: get_affinity(pid) for pid in pids} == before
    assert not pinning.active
    assert pinning.original == {}


def test_cpu_seconds_is_finer_than_a_clock_tick() -> None:
    """A child that burns 0.13 s of CPU: counted in nanoseconds, not in whole 10 ms ticks."""
    code = "import time\nwhile time.process_time() < 0.13: pass\nprint('done', flush=True)\ntime.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"done\n"
        used = cpu_seconds([proc.pid])
        assert 0.13 <= used < 0.5
        assert used * CLK_TCK != int(used * CLK_TCK)  # not whole ticks
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_client_ports_finds_this_process_connection_to_postgresql() -> None:
    conn = await asyncpg.connect(_plain_url(ADMIN_URL), timeout=5)
    try:
        port = await conn.fetchval("SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        server_port = await conn.fetchval("SELECT inet_server_port()")
        assert port in client_ports([os.getpid()], server_port)
        assert port not in client_ports([os.getpid()], server_port + 1)
    finally:
        await conn.close()


def test_targets_send_request_i_to_instance_i_mod_2() -> None:
    bare = bare_target(["http://a", "http://b"]).make({"x": "1"}, [])
    assert [bare(i, 0).url for i in range(3)] == ["http://a/relay?x=1", "http://b/relay?x=1", "http://a/relay?x=1"]
    chats: list[Any] = ["c0", "c1", "c2"]
    service = service_target(["http://a", "http://b"], "t").make({}, chats)
    assert [service(i, 0).url for i in range(3)] == [
        "http://a/api/chats/c0/messages",
        "http://b/api/chats/c1/messages",
        "http://a/api/chats/c2/messages",
    ]


def _tree_with_versions(tmp_path: Path, drop_last: bool) -> Path:
    tree_ = tmp_path / "old"
    (tree_ / "migrations").mkdir(parents=True)
    (tree_ / "main.py").write_text("")
    versions = sorted((ROOT / "migrations" / "versions").glob("*.py"))
    (tree_ / "migrations" / "versions").mkdir()
    for path in versions[:-1] if drop_last else versions:
        shutil.copy(path, tree_ / "migrations" / "versions" / path.name)
    return tree_


def test_before_is_refused_when_its_alembic_head_differs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="alembic head"):
        check_before(_tree_with_versions(tmp_path, drop_last=True))
    with pytest.raises(ValueError, match="not a source tree"):
        check_before(tmp_path)


@pytest.mark.timeout(60)
def test_before_accepts_a_tree_with_the_same_head_that_imports_from_itself(tmp_path: Path) -> None:
    assert check_before(ROOT) == ROOT
    # Same head, but `import app` cannot come from there (no app/ in it): refused, not silently this tree.
    with pytest.raises(ValueError, match="does not load it from there"):
        check_before(_tree_with_versions(tmp_path, drop_last=False))


def _run(ttfc: float, head: float = 1.0, cpu: float | None = None, chars: float | None = None) -> dict[str, Any]:
    return {
        "ttfc_p50_ms": ttfc,
        "ttfc_p99_ms": ttfc + 10,
        "head_p50_ms": head,
        "head_p99_ms": head,
        "cpu_ms_per_stream": cpu,
        "chars_per_s": chars,
        "chunks_per_s": chars,
        "cpu_us_per_chunk": 10.0,
        "complete": 3,
        "failed": 0,
        "truncated": 0,
        "streams": 3,
    }


REPORT: dict[str, Any] = {
    "profile": "quick",
    "pinning": {
        "pinned": True,
        "method": "os.sched_setaffinity (every thread)",
        "server_cpus": [0],
        "other_cpus": [1],
        "postgres_processes": 6,
        "phases": "ttfc",
    },
    "ttfc": {
        "1": {"direct": _run(40), "bare": _run(42, cpu=5.0), "service": _run(43, cpu=7.0)},
        "100": {"direct": _run(40), "bare": _run(44, cpu=4.0), "service": _run(50, cpu=8.0)},
    },
    "throughput": {"direct": _run(1, chars=1000.0), "bare": _run(1, chars=500.0), "service": _run(1, chars=400.0)},
    "multi": {
        "direct": _run(40),
        "2 instances": {"users": 100, "bare": {"ttfc": _run(41, cpu=4.0)}, "service": {"ttfc": _run(45, cpu=9.0)}},
    },
}


def _row(report: dict[str, Any], start: str) -> tuple[str, ...]:
    return next(tuple(r) for r in rows(report) if r.metric.startswith(start))


def test_report_judges_added_ttfc_at_1_and_100_cpu_per_stream_and_text_per_second() -> None:
    assert _row(REPORT, "added TTFC p50 @1 ")[1:6] == ("3.0", "2.0", "1.50", "≤ 1.5x bare", "PASS")
    assert _row(REPORT, "added TTFC p50 @100 ")[1:6] == ("10.0", "4.0", "2.50", "≤ 1.5x bare", "FAIL")
    assert _row(REPORT, "server CPU per stream, paced @100")[1:6] == ("8.00", "4.00", "2.00", "≤ 1.5x bare", "FAIL")
    assert _row(REPORT, "server CPU per stream, paced @1 ")[4:6] == ("", "")  # a figure, no target at 1
    assert _row(REPORT, "unpaced answer text/s")[1:6] == ("400", "500", "0.80", "≥ 0.70x bare", "PASS")


def test_report_leaves_a_target_unjudged_when_the_bare_relay_added_nothing() -> None:
    report = json.loads(json.dumps(REPORT))
    report["ttfc"]["1"]["bare"]["ttfc_p50_ms"] = 39.0
    assert _row(report, "added TTFC p50 @1 ")[3:6] == ("—", "≤ 1.5x bare", "n/a (bare ≤ 0)")
    del report["ttfc"]["100"]["service"]["cpu_ms_per_stream"]
    assert _row(report, "server CPU per stream, paced @100")[5] == "FAIL"  # a missing figure never passes


def test_report_without_before_keeps_six_columns_and_names_the_pinning() -> None:
    table = render(REPORT)
    assert "| metric | service | bare relay | ratio | target | result |" in table
    assert "before" not in table.split("| metric |")[1].split("\n")[0]
    assert "the server under test on CPU 0" in table
    assert "PostgreSQL (6 processes" in table
    assert "| 2 instances | added TTFC p50 @100 (ms; fake direct 40.0) | 5.0 | 1.0 | 5.00 |" in table
    assert "| 2 instances | server CPU per stream, paced (ms) | 9.00 | 4.00 | 2.25 |" in table
    unpinned = render({**REPORT, "pinning": {"pinned": False, "why": "fewer than 2 CPUs available ([0])"}})
    assert "Pinning: none (fewer than 2 CPUs available ([0]))" in unpinned


def test_report_with_before_adds_its_column_and_ratio() -> None:
    report = json.loads(json.dumps(REPORT))
    report["before_source"] = "/tmp/old"
    report["ttfc"]["100"]["before"] = _run(60, cpu=12.0)
    report["throughput"]["before"] = _run(1, chars=250.0)
    table = render(report)
    assert "| metric | service | before | bare relay | ratio | before ratio | target | result |" in table
    assert "| added TTFC p50 @100 (ms) | 10.0 | 20.0 | 4.0 | 2.50 | 5.00 | ≤ 1.5x bare | FAIL |" in table
    assert "| server CPU per stream, paced @100 (ms; 50 chunks) | 8.00 | 12.00 | 4.00 | 2.00 | 3.00 |" in table
    assert "| 400 | 250 | 500 | 0.80 | 0.50 | ≥ 0.70x bare | PASS |" in table
    assert "before = the service from /tmp/old" in table
