"""Prometheus metrics of the relay: the process's metric objects, the observations, and the scrape text.

With several uvicorn workers the client's multiprocess mode is used: `app.cli serve` points
PROMETHEUS_MULTIPROC_DIR at an emptied directory before the workers start, every worker writes its values
there, and whichever worker answers a scrape reads them all (docs/OPERATIONS.md). The environment variable
must be set before this module is imported, which is why the serve command, not the app, sets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Seconds; TTFC spans a fast cache hit to a slow tool-using agent, durations up to the 15-minute cap.
TTFC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 900)

#: The registry the metrics below live in (not the client's global one, which holds process collectors
#: that the multiprocess mode cannot merge).
REGISTRY = CollectorRegistry(auto_describe=True)

OPEN_STREAMS = Gauge(
    "relay_open_streams",
    "Generations streaming from n8n right now",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
GENERATIONS = Counter(
    "relay_generations",
    "Generations ended, by outcome (complete, error, cancelled, interrupted) and agent id",
    ["outcome", "agent"],
    registry=REGISTRY,
)
TTFC = Histogram(
    "relay_time_to_first_chunk_seconds",
    "Seconds from calling n8n to the first text chunk",
    registry=REGISTRY,
    buckets=TTFC_BUCKETS,
)
DURATION = Histogram(
    "relay_generation_duration_seconds",
    "Seconds from calling n8n to the end of the answer",
    registry=REGISTRY,
    buckets=DURATION_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "relay_upstream_errors", "Generations that failed, by error code", ["code"], registry=REGISTRY
)
DB_POOL_IN_USE = Gauge(
    "relay_db_pool_in_use",
    "Database connections checked out of the pool (sum over workers; refreshed on each generation and scrape)",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
RATE_LIMITED = Counter(
    "relay_rate_limit_refusals",
    "Requests refused with 429, by limit (login, register, team_signup, invite_preview, agent_test, api_key, quota)",
    ["limit"],
    registry=REGISTRY,
)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def prepare_multiprocess_dir(path: Path) -> None:
    """Before the workers start: an empty directory for their values (stale files would add old counts)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)


def worker_exited() -> None:
    """At a worker's shutdown: its live gauges (open streams, pool in use) stop counting."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


#: A live gauge's file in the multiprocess directory, named after the process that writes it.
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def forget_dead_workers(directory: str) -> None:
    """The live gauges of workers that died without their shutdown (SIGKILL, the OOM killer, uvicorn killing one
    that stopped answering) stop counting: `worker_exited` never ran for them, and their open streams and pool
    connections would be added to every scrape for as long as the server runs. Their counters and histograms
    stay: what they counted happened."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    pids = {int(m.group(1)) for name in names if (m := _LIVE_GAUGE_FILE.fullmatch(name))}
    for pid in pids - {os.getpid()}:
        if not _alive(pid):
            with contextlib.suppress(FileNotFoundError):  # another worker's scrape removed it first
                multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def generation_started(task: asyncio.Task[Any]) -> None:
    """One more open stream until `task` ends, however it ends."""
    OPEN_STREAMS.inc()
    task.add_done_callback(lambda _t: OPEN_STREAMS.dec())


def generation_finished(
    *, outcome: str, agent_id: object, error_code: str | None, metadata: dict[str, Any], pool_in_use: int | None
) -> None:
    """A generation's final write happened: its outcome, timings and error code."""
    GENERATIONS.labels(outcome=outcome, agent=str(agent_id)).inc()
    if error_code is not None and outcome != "cancelled":
        UPSTREAM_ERRORS.labels(code=error_code).inc()
    ttfc, duration = metadata.get("ttfc_ms"), metadata.get("duration_ms")
    if isinstance(ttfc, int | float):
        TTFC.observe(ttfc / 1000)
    if isinstance(duration, int | float):
        DURATION.observe(duration / 1000)
    if pool_in_use is not None:
        DB_POOL_IN_USE.set(pool_in_use)


def refused(limit: str) -> None:
    RATE_LIMITED.labels(limit=limit).inc()


def scrape(pool_in_use: int | None) -> bytes:
    """The Prometheus text of every worker (multiprocess mode) or of this process."""
    if pool_in_use is not None:
        DB_POOL_IN_USE.set(pool_in_use)
    if multiprocess_enabled():
        forget_dead_workers(os.environ[MULTIPROC_ENV])
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
