"""GET /health and GET /ready."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from sqlalchemy import event, text

from app.db import Database
from app.state import app_state
from main import create_app, shutdown
from tests.conftest import make_settings
from tests.live import silent_port


async def _get(settings, path: str, method: str = "GET") -> httpx.Response:
    app = create_app(settings)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, path)
    finally:
        await shutdown(app)


async def test_health_is_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_when_database_migrated(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_ready_is_503_when_database_down(tmp_path: Path) -> None:
    settings = make_settings("postgresql+asyncpg://postgres@127.0.0.1:1/nothing", tmp_path, DB_CONNECT_TIMEOUT=1.0)
    response = await _get(settings, "/ready")
    assert response.status_code == 503
    assert response.json() == {"detail": "database unreachable"}
    assert "127.0.0.1" not in response.text


async def test_ready_is_503_when_database_not_migrated(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", tmp_path)
    response = await _get(settings, "/ready")
    assert response.status_code == 503
    assert "not migrated" in response.json()["detail"]
    assert (await _get(settings, "/ready", "HEAD")).status_code == 503


async def test_monitors_may_probe_with_head(client: httpx.AsyncClient) -> None:
    """A monitor set to HEAD got 405 from both probes."""
    for path in ("/health", "/ready"):
        response = await client.head(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "application/json"
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths["/health"]) == set(paths["/ready"]) == {"get"}


async def test_ready_is_degraded_but_200_while_redis_is_unreachable(
    database_url: str, tmp_path: Path, redis_url: str
) -> None:
    good = await _get(make_settings(database_url, tmp_path, REDIS_URL=redis_url), "/ready")
    assert (good.status_code, good.json()) == (200, {"status": "ready"})
    bad = await _get(make_settings(database_url, tmp_path, REDIS_URL="redis://127.0.0.1:1/0"), "/ready")
    assert (bad.status_code, bad.json()) == (200, {"status": "degraded"})


async def test_ready_answers_degraded_at_once_while_redis_hangs(database_url: str, tmp_path: Path) -> None:
    """A Redis that takes connections and answers nothing (hung, or a failover dropping packets) made every /ready
    wait its 3 s check: a probe with a shorter timeout (Kubernetes' default is 1 s) failed on every instance at
    once, though a degraded instance serves everything."""
    async with silent_port() as port:
        settings = make_settings(database_url, tmp_path, REDIS_URL=f"redis://127.0.0.1:{port}/0")
        started = time.perf_counter()
        response = await _get(settings, "/ready")
        elapsed = time.perf_counter() - started
    assert (response.status_code, response.json()) == (200, {"status": "degraded"})
    assert elapsed < 0.9


@asynccontextmanager
async def busy_instance(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Database, httpx.AsyncClient]]:
    """An app whose pool's only connection is checked out (busy), its database and a client."""
    app = create_app(make_settings(database_url, tmp_path, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0))
    db = app_state(app).db
    try:
        async with db.engine.connect() as held:
            await held.execute(text("SELECT 1"))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                yield db, client
    finally:
        await shutdown(app)


async def test_ready_while_every_pooled_connection_is_busy(database_url: str, tmp_path: Path) -> None:
    """A busy instance is not a broken one: with every pooled connection checked out, /ready waited its 3 s
    for one and answered 503 "database unreachable", so a load balancer took the instance out when it was
    merely busy (and, with one instance, the whole service). It now asks the database on a connection of
    its own."""
    async with busy_instance(database_url, tmp_path) as (_db, client):
        started = time.monotonic()
        response = await client.get("/ready")
        elapsed = time.monotonic() - started
    assert (response.status_code, response.json()) == (200, {"status": "ready"})
    assert elapsed < 2.0


async def test_ready_on_a_busy_instance_opens_one_connection_of_its_own_at_a_time(
    database_url: str, tmp_path: Path
) -> None:
    """/ready is public and not rate limited: with every pooled connection in use, each probe opened a connection
    of its own, all at once, so a burst of probes (a few monitors, or anyone) opened as many PostgreSQL
    connections as requests, past the pool's bound, towards the server's max_connections that every instance
    shares. The probes of a busy instance take turns on one extra connection."""
    async with busy_instance(database_url, tmp_path) as (db, client):
        assert (await client.get("/ready")).status_code == 200  # the probe's own engine exists now
        probe = db._probe_engine
        assert probe is not None
        open_now, most = 0, 0

        def checkout(*_args: object) -> None:
            nonlocal open_now, most
            open_now += 1
            most = max(most, open_now)

        def checkin(*_args: object) -> None:
            nonlocal open_now
            open_now -= 1

        event.listen(probe.sync_engine, "checkout", checkout)
        event.listen(probe.sync_engine, "checkin", checkin)
        answers = await asyncio.gather(*(client.get("/ready") for _ in range(20)))
    assert [(r.status_code, r.json()) for r in answers] == [(200, {"status": "ready"})] * 20
    assert most == 1
