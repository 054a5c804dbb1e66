"""GET /metrics: off by default, bearer-protected, the relay's series, and one view over two workers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path
from typing import get_args

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics
from app.config import Settings
from app.ratelimit import LimitName
from app.state import app_state
from tests.conftest import ROOT
from tests.factories import auth_headers, create_admin
from tests.live import EventReader, chat_with_agent, server_process
from tests.test_serve import attempt, server_env
from tests.test_stop_resume import has_text
from tools.fake_n8n import FakeN8n

TOKEN = "metrics-token-0123456789"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
SERIES = {
    "relay_open_streams",
    "relay_generations",
    "relay_time_to_first_chunk_seconds",
    "relay_generation_duration_seconds",
    "relay_upstream_errors",
    "relay_db_pool_in_use",
    "relay_rate_limit_refusals",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed by the Prometheus client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_are_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.settings(METRICS_ENABLED=True)
async def test_metrics_expose_the_relay_series_and_count_a_generation(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    before = (await client.get("/metrics")).text
    assert {f.name for f in text_string_to_metric_families(before)} >= SERIES
    setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")
    failing = await chat_with_agent(session, settings, fake.url + "/webhook/does-not-exist")
    for chat in (setup, failing):
        await client.post(f"/api/chats/{chat.chat.id}/messages", json={"content": "hello"}, headers=chat.headers)
    registry = app_state(app).generations
    async with asyncio.timeout(5):
        while registry.running:  # noqa: ASYNC110  # the tasks end just after their terminal event
            await asyncio.sleep(0.01)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    agent = str(setup.agent.id)
    assert value(after, "relay_generations_total", outcome="complete", agent=agent) == 1
    assert value(after, "relay_generations_total", outcome="error", agent=str(failing.agent.id)) == 1
    grew = value(after, "relay_upstream_errors_total", code="upstream_error") - value(
        before, "relay_upstream_errors_total", code="upstream_error"
    )
    assert grew == 1
    observed = value(after, "relay_time_to_first_chunk_seconds_count") - value(
        before, "relay_time_to_first_chunk_seconds_count"
    )
    assert observed == 1  # the failed answer had no first chunk
    assert (
        value(after, "relay_generation_duration_seconds_count")
        - value(before, "relay_generation_duration_seconds_count")
        == 2
    )
    assert value(after, "relay_open_streams") == 0
    assert value(after, "relay_db_pool_in_use") >= 0


@pytest.mark.settings(METRICS_ENABLED=True, METRICS_TOKEN=TOKEN)
async def test_metrics_token_is_required_when_set(client: httpx.AsyncClient) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        response = await client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in response.text
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert TOKEN not in response.text


@pytest.mark.settings(METRICS_ENABLED=True, RATE_LIMIT_AGENT_TEST="1/minute")
async def test_rate_limit_refusals_are_counted(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    before = value((await client.get("/metrics")).text, "relay_rate_limit_refusals_total", limit="agent_test")
    admin = await create_admin(session)
    body = {"name": "P", "webhook_url": "http://127.0.0.1:9/webhook/x"}
    codes = [
        (await client.post("/api/agents/test", json=body, headers=auth_headers(settings, admin))).status_code
        for _ in range(3)
    ]
    assert codes == [200, 429, 429]
    after = value((await client.get("/metrics")).text, "relay_rate_limit_refusals_total", limit="agent_test")
    assert after - before == 2


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_two_workers_answer_with_the_sum_of_both(database_url: str, tmp_path: Path) -> None:
    """Without Redis each worker keeps its own login budget (1/minute): the second 401 shows both workers
    served. Every scrape, whichever worker answers it, shows the refusals of both."""
    log = tmp_path / "server.log"
    env = {**server_env(database_url, tmp_path, METRICS_ENABLED="true"), "RATE_LIMIT_LOGIN": "1/minute"}
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--workers", "2"]
    async with server_process(command, env, log) as url:
        codes: list[int] = []
        while codes.count(401) < 2 and len(codes) < 60:  # until both workers have served (one 401 each)
            codes.append(await attempt(url))
        assert codes.count(401) == 2, codes
        for _ in range(4):
            codes.append(await attempt(url))
        refused = codes.count(429)
        assert refused == len(codes) - 2
        seen = []
        for _ in range(6):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:  # a new connection each time
                response = await client.get("/metrics")
            assert response.status_code == 200
            seen.append(value(response.text, "relay_rate_limit_refusals_total", limit="login"))
        assert seen == [refused] * 6
        assert (tmp_path / "data" / "metrics" / url.rsplit(":", 1)[1]).is_dir()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_two_servers_sharing_a_data_dir_keep_their_own_metrics(database_url: str, tmp_path: Path) -> None:
    """Two `serve --workers 2` on one host with one DATA_DIR (a new release started on another port beside the
    old one, from the same checkout): the second emptied the first's multiprocess directory and then wrote its
    own files there, so the first's scrapes lost its counts and reported the second's instead."""
    env = {**server_env(database_url, tmp_path, METRICS_ENABLED="true"), "RATE_LIMIT_LOGIN": "1/minute"}
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--workers", "2"]

    async def refusals(url: str) -> float:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return value((await client.get("/metrics")).text, "relay_rate_limit_refusals_total", limit="login")

    async with server_process(command, env, tmp_path / "a.log") as first:
        codes = [await attempt(first) for _ in range(8)]
        refused = codes.count(429)
        assert refused >= 4
        async with server_process(command, env, tmp_path / "b.log") as second:
            for _ in range(4):  # whichever worker answers
                assert await refusals(first) == refused
                assert await refusals(second) == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_server_started_on_a_port_in_use_leaves_the_running_servers_metrics_alone(
    database_url: str, tmp_path: Path
) -> None:
    """A second `serve --workers 2` started by mistake on the port of a running one, with the same DATA_DIR,
    emptied that server's multiprocess directory (its own, by port) and only then failed to bind: the running
    server's scrapes lost every count. It now stops first, saying the port is in use."""
    env = {**server_env(database_url, tmp_path, METRICS_ENABLED="true"), "RATE_LIMIT_LOGIN": "1/minute"}
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--workers", "2"]
    async with server_process(command, env, tmp_path / "a.log") as first:
        codes = [await attempt(first) for _ in range(8)]
        refused = codes.count(429)
        assert refused >= 4
        port = first.rsplit(":", 1)[1]
        second = await asyncio.create_subprocess_exec(
            *command, "--port", port, cwd=ROOT, env=env, stdout=PIPE, stderr=STDOUT
        )
        output, _ = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 1
        assert f"127.0.0.1:{port} is in use" in output.decode()
        for _ in range(4):  # whichever worker answers
            async with httpx.AsyncClient(base_url=first, timeout=10) as client:
                scraped = (await client.get("/metrics")).text
            assert value(scraped, "relay_rate_limit_refusals_total", limit="login") == refused


def worker_pids(directory: Path) -> set[int]:
    """The workers that wrote live gauges in the multiprocess directory (`gauge_livesum_<pid>.db`)."""
    return {int(f.stem.rsplit("_", 1)[1]) for f in directory.glob("gauge_livesum_*.db")}


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_killed_worker_leaves_no_open_stream_behind(
    database_url: str, tmp_path: Path, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """A worker killed mid-answer (the OOM killer, or uvicorn killing one that stopped answering its health
    check) never runs its shutdown, so nothing removed its live gauges: uvicorn started a replacement, and every
    scrape went on counting the dead worker's open stream and pool connections, for as long as the server ran."""
    log = tmp_path / "server.log"
    env = server_env(database_url, tmp_path, METRICS_ENABLED="true", WEBHOOK_ALLOW_PRIVATE_NETWORKS="true")
    paced = f"{fake.url}/webhook/agent-stream?scenario=paced&chunks=2000&interval_ms=20"
    setup = await chat_with_agent(session, settings, paced)
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--workers", "2"]
    async with server_process(command, env, log) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        directory = tmp_path / "data" / "metrics" / url.rsplit(":", 1)[1]
        reader = EventReader(
            client, "POST", f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers
        )
        await reader.wait_for(has_text)
        assert value((await client.get("/metrics")).text, "relay_open_streams") == 1
        killed = worker_pids(directory)
        assert len(killed) == 2
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        await reader.leave()
        async with asyncio.timeout(60):  # until uvicorn has replaced both
            while len(worker_pids(directory) - killed) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        for _ in range(4):
            async with httpx.AsyncClient(base_url=url, timeout=10) as scraper:  # either worker
                response = await scraper.get("/metrics")
            assert response.status_code == 200
            assert value(response.text, "relay_open_streams") == 0
            assert value(response.text, "relay_db_pool_in_use") <= 2  # the scraping worker's own, at most


def test_every_refusal_label_is_documented() -> None:
    """`api_key` (failed API-key attempts over their budget) was counted but named neither in the series'
    help nor in docs/OPERATIONS.md, so an operator's alert or panel listing the documented limits missed it."""
    labels = [*get_args(LimitName), "quota"]
    row = next(line for line in OPERATIONS.read_text().splitlines() if "`relay_rate_limit_refusals_total`" in line)
    for label in labels:
        assert f"`{label}`" in row, label
        assert label in metrics.RATE_LIMITED._documentation, label
