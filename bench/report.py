"""The benchmark's table: metric | service | bare relay | ratio | target | result, as text and markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str, str, str]


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(service: float | None, bare: float | None) -> float | None:
    if service is None or bare is None or bare <= 0:
        return None
    return service / bare


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "FAIL")


def rows(report: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    ttfc = report.get("ttfc", {})
    for level, runs in ttfc.items():
        direct, bare, service = runs.get("direct", {}), runs.get("bare", {}), runs.get("service", {})
        for q in ("p50", "p99"):
            key = f"ttfc_{q}_ms"
            out.append(
                (
                    f"TTFC {q} raw @{level} (ms; fake direct {_f(direct.get(key))})",
                    _f(service.get(key)),
                    _f(bare.get(key)),
                    _f(_ratio(service.get(key), bare.get(key)), 2),
                    "",
                    "",
                )
            )
        for q in ("p50", "p99"):
            key = f"ttfc_{q}_ms"
            s_add, b_add = _sub(service.get(key), direct.get(key)), _sub(bare.get(key), direct.get(key))
            ratio = _ratio(s_add, b_add)
            target = "≤ 1.5x bare" if level == "100" else ""
            ok = None if not target else (ratio is not None and ratio <= 1.5)
            out.append((f"added TTFC {q} @{level} (ms)", _f(s_add), _f(b_add), _f(ratio, 2), target, _verdict(ok)))
        out.append(
            (
                f"time to the response head p50 / p99 @{level} (ms)",
                f"{_f(service.get('head_p50_ms'))} / {_f(service.get('head_p99_ms'))}",
                f"{_f(bare.get('head_p50_ms'))} / {_f(bare.get('head_p99_ms'))}",
                "",
                "",
                "",
            )
        )
        fails = service.get("failed", 0) + service.get("truncated", 0)
        out.append(
            (
                f"streams @{level}: complete / failed / truncated",
                f"{service.get('complete')} / {service.get('failed')} / {service.get('truncated')}",
                f"{bare.get('complete')} / {bare.get('failed')} / {bare.get('truncated')}",
                "",
                "no errors",
                _verdict(fails == 0),
            )
        )
    tp = report.get("throughput", {})
    if tp:
        s, b, d = tp.get("service", {}), tp.get("bare", {}), tp.get("direct", {})
        ratio = _ratio(s.get("chunks_per_s"), b.get("chunks_per_s"))
        out.append(
            (
                f"unpaced chunks/s, one worker (fake direct {_f(d.get('chunks_per_s'), 0)})",
                _f(s.get("chunks_per_s"), 0),
                _f(b.get("chunks_per_s"), 0),
                _f(ratio, 2),
                "≥ 0.70x bare",
                _verdict(ratio is not None and ratio >= 0.7),
            )
        )
        out.append(
            (
                "server CPU per chunk, unpaced (µs)",
                _f(s.get("cpu_us_per_chunk")),
                _f(b.get("cpu_us_per_chunk")),
                _f(_ratio(s.get("cpu_us_per_chunk"), b.get("cpu_us_per_chunk")), 2),
                "",
                "",
            )
        )
    if "100" in ttfc:
        s, b = ttfc["100"].get("service", {}), ttfc["100"].get("bare", {})
        out.append(
            (
                "server CPU per chunk, paced @100 incl. stream set-up (µs)",
                _f(s.get("cpu_us_per_chunk")),
                _f(b.get("cpu_us_per_chunk")),
                _f(_ratio(s.get("cpu_us_per_chunk"), b.get("cpu_us_per_chunk")), 2),
                "",
                "",
            )
        )
    for level, runs in report.get("hold", {}).items():
        s, b = runs.get("service", {}), runs.get("bare", {})
        out.append(
            (
                f"RSS per open stream @{level} held open (kB)",
                _f(s.get("kb_per_stream")),
                _f(b.get("kb_per_stream")),
                _f(_ratio(s.get("kb_per_stream"), b.get("kb_per_stream")), 2),
                "≤ 60 kB",
                _verdict(s.get("kb_per_stream") is not None and s["kb_per_stream"] <= 60),
            )
        )
        ok = s.get("complete") == s.get("streams") and bool(s.get("all_open_at_once"))
        if s.get("db_busy_all_open") is not None:
            out.append(
                (
                    f"DB connections busy / open while {level} streams wait",
                    f"{s['db_busy_all_open']} / {s['db_open_all_open']}",
                    "0 (no database)",
                    "",
                    "none held by a waiting stream",
                    _verdict(s["db_busy_all_open"] == 0),
                )
            )
        out.append(
            (
                f"{level} held open: complete / failed / truncated (all open at once?)",
                f"{s.get('complete')} / {s.get('failed')} / {s.get('truncated')} ({s.get('max_open_at_once')})",
                f"{b.get('complete')} / {b.get('failed')} / {b.get('truncated')} ({b.get('max_open_at_once')})",
                "",
                f"{level} without errors",
                _verdict(ok),
            )
        )
    pg = report.get("db_connections", {})
    if pg:
        level = max(pg, key=int)
        p = pg[level]
        ok = p["complete"] == p["streams"] and p["max_connections"] <= 10
        out.append(
            (
                f"DB connections during {level} streams: max open / max busy (pool 10, overflow 0)",
                f"{p['max_connections']} / {p['max_busy']}",
                "0 (no database)",
                "",
                f"pool of 10 suffices, {p['complete']}/{p['streams']} complete",
                _verdict(ok),
            )
        )
    lb = report.get("login_burst")
    if lb:
        base, burst, bare = lb["baseline"], lb["burst"], lb["bare_baseline"]
        after = lb.get("baseline_after", base)
        # The reference is the mean of the runs just before and just after the burst (drift cancels out).
        both = [x for x in (base.get("gap_p99_ms"), after.get("gap_p99_ms")) if x is not None]
        reference = sum(both) / len(both) if both else None
        raise_ = _sub(burst.get("gap_p99_ms"), reference)
        out.append(
            (
                f"chunk-gap p99 (paced 20 ms), no logins (ms; before {_f(base.get('gap_p99_ms'))}, "
                f"after {_f(after.get('gap_p99_ms'))})",
                _f(reference),
                _f(bare.get("gap_p99_ms")),
                _f(_ratio(base.get("gap_p99_ms"), bare.get("gap_p99_ms")), 2),
                "",
                "",
            )
        )
        logins = burst.get("logins", {})
        out.append(
            (
                f"chunk-gap p99 during a login burst (ms; logins {logins})",
                _f(burst.get("gap_p99_ms")),
                "",
                "",
                "",
                "",
            )
        )
        out.append(
            (
                "chunk-gap p99 raise by the login burst (ms)",
                _f(raise_),
                "",
                "",
                "≤ 5 ms",
                _verdict(raise_ is not None and raise_ <= 5),
            )
        )
    return out


def multi_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    multi = report.get("multi_worker", {})
    if not multi:
        return []
    direct = report.get("ttfc", {}).get("100", {}).get("direct", {})
    out = []
    one, two = multi.get("1", {}), multi.get("2", {})

    def get(run: dict[str, Any], phase: str, key: str) -> float | None:
        value = run.get(phase, {}).get(key)
        return value if isinstance(value, (int, float)) else None

    for q in ("p50", "p99"):
        key = f"ttfc_{q}_ms"
        out.append(
            (
                f"added TTFC {q} @100 (ms)",
                _f(_sub(get(one, "ttfc", key), direct.get(key))),
                _f(_sub(get(two, "ttfc", key), direct.get(key))),
            )
        )
    out.append(
        (
            "unpaced chunks/s (all workers)",
            _f(get(one, "throughput", "chunks_per_s"), 0),
            _f(get(two, "throughput", "chunks_per_s"), 0),
        )
    )
    out.append(
        (
            "server CPU per chunk, unpaced (µs)",
            _f(get(one, "throughput", "cpu_us_per_chunk")),
            _f(get(two, "throughput", "cpu_us_per_chunk")),
        )
    )
    for label, phase in (
        ("streams complete / total (TTFC run)", "ttfc"),
        ("streams complete / total (unpaced)", "throughput"),
    ):
        out.append(
            (
                label,
                f"{one.get(phase, {}).get('complete')} / {one.get(phase, {}).get('streams')}",
                f"{two.get(phase, {}).get('complete')} / {two.get(phase, {}).get('streams')}",
            )
        )
    return out


def render(report: dict[str, Any]) -> str:
    """The markdown table (it reads fine as text too) with the machine and date above it."""
    m = report.get("machine", {})
    lines = [
        f"Streaming relay benchmark ({report.get('profile')}), {report.get('date')}, "
        f"{m.get('nproc')} cores ({m.get('cpu')}), {m.get('ram_gb')} GB RAM, kernel {m.get('kernel')}, "
        f"Python {report.get('python')}, fd limit {report.get('fd_limit')}, took {report.get('duration_s')} s",
        "",
        "| metric | service | bare relay | ratio | target | result |",
        "|---|---:|---:|---:|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(report)]
    multi = multi_rows(report)
    if multi:
        lines += [
            "",
            "Multi-worker (REDIS_URL set, uvicorn --workers N):",
            "",
            "| metric | 1 worker | 2 workers |",
            "|---|---:|---:|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in multi]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], table: str, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = str(report.get("date", "")).replace(":", "").replace("-", "").replace("+0000", "Z")
    name = f"{report.get('profile')}-{stamp}"
    paths = [directory / f"{name}.json", directory / f"{name}.md", directory / f"latest-{report.get('profile')}.md"]
    paths[0].write_text(json.dumps(report, indent=2, default=str))
    paths[1].write_text(table)
    paths[2].write_text(table)
    return paths
