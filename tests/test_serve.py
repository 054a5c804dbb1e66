"""Real server processes: TRUSTED_PROXIES alone decides the client address, one access line, no secrets."""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from tests.authhelpers import login
from tests.conftest import TEST_ENCRYPTION_KEY, TEST_JWT_SECRET, make_settings
from tests.live import live_server, server_process

pytestmark = pytest.mark.slow

UVICORN = [sys.executable, "-m", "uvicorn", "--factory", "main:create_app", "--host", "127.0.0.1"]
SERVE = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
LIMIT = 3  # logins per minute in these tests


def server_env(database_url: str, tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The caller's environment without any setting, plus the test ones. FORWARDED_ALLOW_IPS is dropped
    so uvicorn runs with its default (trust 127.0.0.1), the case these tests are about."""
    env = {name: value for name, value in os.environ.items() if name not in Settings.model_fields}
    env.pop("FORWARDED_ALLOW_IPS", None)
    env.update(
        APP_ENV="test",
        DATABASE_URL=database_url,
        DATA_DIR=str(tmp_path / "data"),
        JWT_SECRET=TEST_JWT_SECRET,
        ENCRYPTION_KEY=TEST_ENCRYPTION_KEY,
        BCRYPT_ROUNDS="4",
        RATE_LIMIT_LOGIN=f"{LIMIT}/minute",
        LOG_LEVEL="INFO",
        **overrides,
    )
    return env


async def attempt(url: str, forwarded_for: str | None = None) -> int:
    """One login on a fresh connection (so `--workers 2` spreads them), tagged with its own request id."""
    headers = {"X-Request-ID": f"rl-{uuid.uuid4().hex}"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return (await login(client, "nobody@example.com", "wrong-password", headers=headers)).status_code


def access_lines(log: Path, request_id: str) -> list[str]:
    """Every line logged for `request_id` that is an access line: ours (`app.access`) or uvicorn's own."""
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if request_id in line and ("app.access" in line or "HTTP/1.1" in line)]


async def test_plain_uvicorn_factory_with_workers_ignores_forwarded_for_from_localhost(
    database_url: str, tmp_path: Path, redis_url: str
) -> None:
    """The README's production command: uvicorn would believe X-Forwarded-For from 127.0.0.1."""
    log = tmp_path / "server.log"
    env = server_env(database_url, tmp_path, REDIS_URL=redis_url)
    async with server_process([*UVICORN, "--no-access-log", "--workers", "2"], env, log) as url:
        codes = [await attempt(url, f"198.51.100.{i}") for i in range(LIMIT + 1)]
    assert codes == [401] * LIMIT + [429]
    assert re.search(r"app\.access: 127\.0\.0\.1 POST /api/auth/login 429", log.read_text())
    assert "198.51.100." not in log.read_text()


async def test_serve_behind_trusted_proxy_keys_on_the_rightmost_untrusted_hop(
    database_url: str, tmp_path: Path, redis_url: str
) -> None:
    log = tmp_path / "server.log"
    env = server_env(database_url, tmp_path, REDIS_URL=redis_url, TRUSTED_PROXIES="127.0.0.1")
    async with server_process([*SERVE, "--workers", "2"], env, log) as url:
        first = [await attempt(url, "198.51.100.1") for _ in range(LIMIT)]
        # A hop the client prepended itself is never reached: still 198.51.100.1's budget.
        spoofed = await attempt(url, "203.0.113.9, 198.51.100.1")
        other = await attempt(url, "198.51.100.2")
        direct = await attempt(url)
    assert first == [401] * LIMIT
    assert spoofed == 429
    assert other == 401
    assert direct == 401
    text = log.read_text()
    # The log names the client the limiter counted, not the proxy.
    assert re.search(r"app\.access: 198\.51\.100\.1 POST /api/auth/login 429", text)
    assert re.search(r"app\.access: 198\.51\.100\.2 POST /api/auth/login 401", text)
    assert "203.0.113.9" not in text


async def test_serve_on_a_dual_stack_socket_trusts_an_ipv4_proxy_it_sees_as_ipv4_mapped(
    database_url: str, tmp_path: Path, redis_url: str
) -> None:
    """`--host ::` with `--workers`: uvicorn binds one dual-stack socket, on which a proxy connecting over IPv4
    from 127.0.0.1 is the peer `::ffff:127.0.0.1`. It is the proxy TRUSTED_PROXIES lists all the same: each
    client behind it has its own budget (they shared the proxy's one before)."""
    log = tmp_path / "server.log"
    env = server_env(database_url, tmp_path, REDIS_URL=redis_url, TRUSTED_PROXIES="127.0.0.1")
    dual_stack = [sys.executable, "-m", "app.cli", "serve", "--host", "::", "--workers", "2"]
    async with server_process(dual_stack, env, log) as url:  # reached at 127.0.0.1, over IPv4
        first = [await attempt(url, "198.51.100.1") for _ in range(LIMIT + 1)]
        other = await attempt(url, "198.51.100.2")
    assert first == [401] * LIMIT + [429]
    assert other == 401
    text = log.read_text()
    assert re.search(r"app\.access: 198\.51\.100\.1 POST /api/auth/login 429", text)
    assert re.search(r"app\.access: 198\.51\.100\.2 POST /api/auth/login 401", text)


async def test_live_test_server_ignores_forwarded_for_from_localhost(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path, RATE_LIMIT_LOGIN=f"{LIMIT}/minute")
    async with live_server(settings) as server:
        codes = [await attempt(server.url, f"198.51.100.{i}") for i in range(LIMIT + 1)]
    assert codes == [401] * LIMIT + [429]


SECRET_REQUESTS = {
    # path and query -> what the log shows instead
    "/health?access_token=SECRET-A1&page=2": "/health?access_token=***&page=2",
    "/api/auth/me?Refresh_Token=SECRET-A2&X-Amz-Signature=SECRET-A3&password=SECRET-A4": (
        "/api/auth/me?Refresh_Token=***&X-Amz-Signature=***&password=***"
    ),
    "/api/invites/SECRET-B1": "/api/invites/***",
    "/api/invites/SECRET-B2/more?code=SECRET-B3": "/api/invites/***?code=***",
}


@pytest.mark.parametrize(
    "command",
    [pytest.param(UVICORN, id="uvicorn-default-access-log"), pytest.param(SERVE, id="app-cli-serve")],
)
async def test_one_access_line_per_request_and_no_secret_in_it(
    command: list[str], database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    ids = {}
    async with server_process(command, server_env(database_url, tmp_path), log) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for target in SECRET_REQUESTS:
                ids[target] = f"log-{uuid.uuid4().hex}"
                await client.get(target, headers={"X-Request-ID": ids[target]})
    text = log.read_text()
    assert "SECRET-" not in text
    for target, shown in SECRET_REQUESTS.items():
        lines = access_lines(log, ids[target])
        assert len(lines) == 1, lines
        assert f" GET {shown} " in lines[0]


GC_PROBE = """
import asyncio, gc, json
from main import create_app

async def main():
    app = create_app()
    async with app.router.lifespan_context(app):
        print(json.dumps({"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}))

asyncio.run(main())
"""


@pytest.mark.parametrize("app_env", ["development", "production", "test"])
def test_a_server_process_freezes_what_startup_built_and_collects_less_often(tmp_path: Path, app_env: str) -> None:
    """`main.tune_gc` at startup (docs/PERFORMANCE.md): the startup objects frozen out of every collection and
    the youngest generation collected every 2,000 allocations; not in the test suite's own process."""
    import json
    import subprocess

    env = server_env(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", tmp_path)
    env["APP_ENV"] = app_env
    done = subprocess.run(
        [sys.executable, "-c", GC_PROBE], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    if app_env == "test":
        assert state == {"frozen": 0, "threshold": [700, 10, 10]}
    else:
        assert state["frozen"] > 50_000
        assert state["threshold"] == [2_000, 10, 10]
