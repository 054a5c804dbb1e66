"""The benchmark's table: metric | service | bare relay | ratio | target | result, as text and markdown.

With `--before`, two more columns: the service from the other source tree, and its ratio to the bare relay.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple


class Row(NamedTuple):
    metric: str
    service: str
    bare: str
    ratio: str
    target: str
    result: str
    before: str = ""
    before_ratio: str = ""


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


def _compare(
    metric: str,
    service: float | None,
    bare: float | None,
    before: float | None = None,
    *,
    digits: int = 1,
    target: str = "",
    ok: Callable[[float], bool] | None = None,
) -> Row:
    """One figure of the service, the bare relay and (with --before) the other tree, each as a ratio to bare.

    `ok(ratio)` judges the service's ratio when there is a target; a missing figure is a FAIL, a bare figure
    ≤ 0 (noise: the bare relay's p99 below the fake's own) leaves nothing to judge."""
    ratio = _ratio(service, bare)
    if ok is None:
        verdict = ""
    elif ratio is None and service is not None and bare is not None and bare <= 0:
        verdict = "n/a (bare ≤ 0)"  # the bare relay added nothing measurable: no ratio to judge
    else:
        verdict = _verdict(ratio is not None and ok(ratio))
    return Row(
        metric,
        _f(service, digits),
        _f(bare, digits),
        _f(ratio, 2),
        target,
        verdict,
        "" if before is None else _f(before, digits),
        "" if before is None else _f(_ratio(before, bare), 2),
    )


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda ratio: ratio <= limit


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda ratio: ratio >= limit


#: The levels whose added TTFC has a target (the issue: 1 and 100 streams), and CPU per stream's level.
TTFC_TARGET_LEVELS = ("1", "100")
CPU_TARGET_LEVEL = "100"


def _outcomes(run: dict[str, Any]) -> str:
    return f"{run.get('complete')} / {run.get('failed')} / {run.get('truncated')}"


def rows(report: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    ttfc = report.get("ttfc", {})
    for level, runs in ttfc.items():
        direct, bare, service = runs.get("direct", {}), runs.get("bare", {}), runs.get("service", {})
        old = runs.get("before", {})
        for q in ("p50", "p99"):
            key = f"ttfc_{q}_ms"
            out.append(
                _compare(
                    f"TTFC {q} raw @{level} (ms; fake direct {_f(direct.get(key))})",
                    service.get(key),
                    bare.get(key),
                    old.get(key),
                )
            )
        for q in ("p50", "p99"):
            key = f"ttfc_{q}_ms"
            targeted = level in TTFC_TARGET_LEVELS
            out.append(
                _compare(
                    f"added TTFC {q} @{level} (ms)",
                    _sub(service.get(key), direct.get(key)),
                    _sub(bare.get(key), direct.get(key)),
                    _sub(old.get(key), direct.get(key)),
                    target="≤ 1.5x bare" if targeted else "",
                    ok=_at_most(1.5) if targeted else None,
                )
            )
        out.append(
            Row(
                f"time to the response head p50 / p99 @{level} (ms)",
                f"{_f(service.get('head_p50_ms'))} / {_f(service.get('head_p99_ms'))}",
                f"{_f(bare.get('head_p50_ms'))} / {_f(bare.get('head_p99_ms'))}",
                "",
                "",
                "",
                f"{_f(old.get('head_p50_ms'))} / {_f(old.get('head_p99_ms'))}" if old else "",
            )
        )
        targeted = level == CPU_TARGET_LEVEL
        out.append(
            _compare(
                f"server CPU per stream, paced @{level} (ms; 50 chunks)",
                service.get("cpu_ms_per_stream"),
                bare.get("cpu_ms_per_stream"),
                old.get("cpu_ms_per_stream"),
                digits=2,
                target="≤ 1.5x bare" if targeted else "",
                ok=_at_most(1.5) if targeted else None,
            )
        )
        fails = service.get("failed", 0) + service.get("truncated", 0)
        out.append(
            Row(
                f"streams @{level}: complete / failed / truncated",
                _outcomes(service),
                _outcomes(bare),
                "",
                "no errors",
                _verdict(fails == 0),
                _outcomes(old) if old else "",
            )
        )
    tp = report.get("throughput", {})
    if tp:
        s, b, d, o = tp.get("service", {}), tp.get("bare", {}), tp.get("direct", {}), tp.get("before", {})
        out.append(
            _compare(
                f"unpaced answer text/s, one worker (characters; fake direct {_f(d.get('chars_per_s'), 0)})",
                s.get("chars_per_s"),
                b.get("chars_per_s"),
                o.get("chars_per_s"),
                digits=0,
                target="≥ 0.70x bare",
                ok=_at_least(0.7),
            )
        )
        out.append(
            _compare(
                f"unpaced chunks/s, one worker (fake direct {_f(d.get('chunks_per_s'), 0)})",
                s.get("chunks_per_s"),
                b.get("chunks_per_s"),
                o.get("chunks_per_s"),
                digits=0,
            )
        )
        out.append(
            _compare(
                "server CPU per chunk, unpaced (µs)",
                s.get("cpu_us_per_chunk"),
                b.get("cpu_us_per_chunk"),
                o.get("cpu_us_per_chunk"),
            )
        )
        out.append(
            Row(
                "unpaced streams: complete / failed / truncated",
                _outcomes(s),
                _outcomes(b),
                "",
                "",
                "",
                _outcomes(o) if o else "",
            )
        )
    if "100" in ttfc:
        s, b, o = ttfc["100"].get("service", {}), ttfc["100"].get("bare", {}), ttfc["100"].get("before", {})
        out.append(
            _compare(
                "server CPU per chunk, paced @100 incl. stream set-up (µs)",
                s.get("cpu_us_per_chunk"),
                b.get("cpu_us_per_chunk"),
                o.get("cpu_us_per_chunk"),
            )
        )
    for level, runs in report.get("hold", {}).items():
        s, b = runs.get("service", {}), runs.get("bare", {})
        out.append(
            Row(
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
                Row(
                    f"DB connections busy / open while {level} streams wait",
                    f"{s['db_busy_all_open']} / {s['db_open_all_open']}",
                    "0 (no database)",
                    "",
                    "none held by a waiting stream",
                    _verdict(s["db_busy_all_open"] == 0),
                )
            )
        out.append(
            Row(
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
            Row(
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
            Row(
                f"chunk-gap p99 (paced 20 ms), no logins (ms; before {_f(base.get('gap_p99_ms'))}, "
                f"after {_f(after.get('gap_p99_ms'))})"
                if "baseline_after" in lb
                else "chunk-gap p99 (paced 20 ms), no logins (ms; the run before the burst)",
                _f(reference),
                _f(bare.get("gap_p99_ms")),
                _f(_ratio(base.get("gap_p99_ms"), bare.get("gap_p99_ms")), 2),
                "",
                "",
            )
        )
        logins = burst.get("logins", {})
        out.append(
            Row(
                f"chunk-gap p99 during a login burst (ms; logins {logins})",
                _f(burst.get("gap_p99_ms")),
                "",
                "",
                "",
                "",
            )
        )
        out.append(
            Row(
                "chunk-gap p99 raise by the login burst (ms)",
                _f(raise_),
                "",
                "",
                "≤ 5 ms",
                _verdict(raise_ is not None and raise_ <= 5),
            )
        )
    return out


MultiRow = tuple[str, str, str, str, str]


def multi_rows(report: dict[str, Any]) -> list[MultiRow]:
    """configuration | metric | service | bare relay | ratio, for the unpinned multi-process phase."""
    multi = report.get("multi", {})
    if not multi:
        return []
    direct = multi.get("direct", {})
    out: list[MultiRow] = []

    def get(run: dict[str, Any], phase: str, key: str) -> float | None:
        value = run.get(phase, {}).get(key)
        return value if isinstance(value, (int, float)) else None

    def line(config: str, metric: str, s: float | None, b: float | None, digits: int = 1) -> MultiRow:
        return (config, metric, _f(s, digits), _f(b, digits), _f(_ratio(s, b), 2))

    for config, runs in multi.items():
        if config == "direct":
            continue
        s, b = runs.get("service", {}), runs.get("bare", {})
        for q in ("p50", "p99"):
            key = f"ttfc_{q}_ms"
            out.append(
                line(
                    config,
                    f"added TTFC {q} @{runs.get('users', 100)} (ms; fake direct {_f(direct.get(key))})",
                    _sub(get(s, "ttfc", key), direct.get(key)),
                    _sub(get(b, "ttfc", key), direct.get(key)),
                )
            )
        out.append(
            line(
                config,
                "unpaced answer text/s (characters)",
                get(s, "throughput", "chars_per_s"),
                get(b, "throughput", "chars_per_s"),
                0,
            )
        )
        out.append(
            line(
                config,
                "server CPU per stream, paced (ms)",
                get(s, "ttfc", "cpu_ms_per_stream"),
                get(b, "ttfc", "cpu_ms_per_stream"),
                2,
            )
        )
        out.append(
            line(
                config,
                "server CPU per chunk, unpaced (µs)",
                get(s, "throughput", "cpu_us_per_chunk"),
                get(b, "throughput", "cpu_us_per_chunk"),
            )
        )
        for label, phase in (("paced", "ttfc"), ("unpaced", "throughput")):
            out.append(
                (
                    config,
                    f"streams {label}: complete / failed / truncated",
                    _outcomes(s.get(phase, {})),
                    _outcomes(b.get(phase, {})),
                    "",
                )
            )
    return out


def pinning_line(report: dict[str, Any]) -> str:
    """Which CPUs ran what, named in the table's header."""
    pin = report.get("pinning")
    if not pin:
        return "Pinning: none recorded."
    if not pin.get("pinned"):
        return f"Pinning: none ({pin.get('why')}); every figure includes the load generator's and PostgreSQL's CPU."
    return (
        f"Pinning ({pin.get('method')}): the server under test on CPU {_cpus(pin.get('server_cpus'))}; the load "
        f"generator, the fake n8n and PostgreSQL ({pin.get('postgres_processes')} processes, new backends "
        f"inherit) on CPU {_cpus(pin.get('other_cpus'))}; phases: {pin.get('phases')}."
    )


def _cpus(cpus: Any) -> str:
    return ",".join(str(c) for c in cpus) if isinstance(cpus, list) else str(cpus)


def render(report: dict[str, Any]) -> str:
    """The markdown table (it reads fine as text too) with the machine, date and pinning above it."""
    m = report.get("machine", {})
    table = rows(report)
    before = bool(report.get("before_source"))
    lines = [
        f"Streaming relay benchmark ({report.get('profile')}), {report.get('date')}, "
        f"{m.get('nproc')} cores ({m.get('cpu')}), {m.get('ram_gb')} GB RAM, kernel {m.get('kernel')}, "
        f"Python {report.get('python')}, fd limit {report.get('fd_limit')}, took {report.get('duration_s')} s",
        "",
        pinning_line(report),
    ]
    if before:
        lines.append(f"before = the service from {report.get('before_source', '?')}, same run, same database.")
    lines.append("")
    if before:
        lines += [
            "| metric | service | before | bare relay | ratio | before ratio | target | result |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        cells: list[tuple[str, ...]] = [
            (r.metric, r.service, r.before, r.bare, r.ratio, r.before_ratio, r.target, r.result) for r in table
        ]
    else:
        lines += ["| metric | service | bare relay | ratio | target | result |", "|---|---:|---:|---:|---|---|"]
        cells = [tuple(r[:6]) for r in table]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    multi = multi_rows(report)
    if multi:
        lines += [
            "",
            "Several workers and instances (unpinned, REDIS_URL set: event log, stop and follow across "
            "processes; 2 instances = two uvicorn processes on one PostgreSQL and Redis, request i to "
            "instance i % 2; each beside the bare relay run the same way):",
            "",
            "| configuration | metric | service | bare relay | ratio |",
            "|---|---|---:|---:|---:|",
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
