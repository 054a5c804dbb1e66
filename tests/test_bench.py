"""The benchmark's own parsers and contract checks (no benchmarking here: bench/ is run by `make bench`),
and tiny runs of bench/bench_history.py, bench/bench_usage.py and bench/bench_finish.py so they cannot rot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import bench_finish, bench_history, bench_usage
from bench.loadgen import ContractChecker, Event, NDJSONParser, SSEParser, StreamResult, percentile, summarize
from bench.report import write
from bench.run import admin
from tests.conftest import ADMIN_URL, _plain_url


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


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_bench_finish_runs_at_tiny_sizes() -> None:
    """A throwaway database, a few final writes of each kind timed, and one round trip each (autocommit)."""
    args = argparse.Namespace(admin_url=_plain_url(ADMIN_URL), calls=6, warmup=4, trips=3, session="autocommit")
    results = await bench_finish.run(args)
    assert [(r["kind"], r["calls"]) for r in results["rounds"]] == [("complete", 6), ("error", 6)]
    assert all(r["cpu_us"] > 0 and r["wall_p50_us"] > 0 for r in results["rounds"])
    assert results["round_trips"] == {"complete": 1.0, "error": 1.0}
