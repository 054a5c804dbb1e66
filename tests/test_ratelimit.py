"""Rate limits per client IP (memory, shared Redis, per process while Redis is down), trusted proxies, revocations."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.proxies import client_address, parse_networks
from app.ratelimit import client_key
from app.services.revocation import DatabaseRevocationStore
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import bearer, login
from tests.conftest import count_rows, make_settings
from tests.factories import create_team, create_user

AppFactory = Callable[..., FastAPI]


@pytest.fixture
async def make_app(database_url: str, tmp_path: Path) -> AsyncIterator[AppFactory]:
    """Build apps with rate limits on (the defaults); each is shut down after the test."""
    apps: list[FastAPI] = []

    def factory(**overrides: Any) -> FastAPI:
        app = create_app(make_settings(database_url, tmp_path, **overrides))
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await shutdown(app)


def client_for(app: FastAPI, ip: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="https://test")


async def test_sixth_login_in_a_minute_is_429_other_ip_is_fine(make_app: AppFactory, session: AsyncSession) -> None:
    await create_user(session, email="rl@example.com")
    app = make_app()
    async with client_for(app, "1.2.3.4") as attacker, client_for(app, "5.6.7.8") as other:
        refused = [await login(attacker, "rl@example.com", "wrong-password") for _ in range(5)]
        assert [r.status_code for r in refused] == [401] * 5
        limited = await login(attacker, "rl@example.com")
        assert limited.status_code == 429
        # Auth answers are never cached, the refusals included.
        assert {(r.headers["cache-control"], r.headers["pragma"]) for r in [*refused, limited]} == {
            ("no-store", "no-cache")
        }
        assert limited.json()["detail"].startswith("Too many requests")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        # The token endpoint shares the login budget of that IP.
        form = {"username": "rl@example.com", "password": "whatever-pw"}
        assert (await attacker.post("/api/auth/token", data=form)).status_code == 429
        assert (await login(other, "rl@example.com")).status_code == 200


async def test_an_ipv6_client_counts_as_its_slash_64(make_app: AppFactory, session: AsyncSession) -> None:
    """One host holds a whole /64: counting single addresses gave it a fresh budget per address."""
    await create_user(session, email="v6@example.com")
    app = make_app()
    codes = []
    for i in range(7):
        async with client_for(app, f"2001:db8:1:2::{i + 1:x}") as client:
            codes.append((await login(client, "v6@example.com", "wrong-password")).status_code)
    assert codes == [401] * 5 + [429] * 2
    async with client_for(app, "2001:db8:1:3::1") as neighbour:  # the next /64 is someone else
        assert (await login(neighbour, "v6@example.com")).status_code == 200


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("64:ff9b::203.0.113.7", "203.0.113.7"),  # NAT64: each IPv4 client, not one shared /64
        ("64:ff9b::198.51.100.9", "198.51.100.9"),
        ("64:ff9b:1:c633:64:700::", "64:ff9b:1:c633::/64"),  # local-use NAT64 (RFC 8215): where the IPv4 sits
        ("64:ff9b:1:cb00:71:900::", "64:ff9b:1:cb00::/64"),  # depends on its prefix length: by /64
        ("2002:cb00:7107:1::1", "203.0.113.7"),  # 6to4: the IPv4 host, not one of its 65,536 /64s
        ("2002:cb00:7107:2::1", "203.0.113.7"),
        ("2001:0:4136:e378:8000:63bf:34ff:fff8", "203.0.0.7"),  # Teredo: its (obfuscated) IPv4 client
        ("::203.0.113.7", "203.0.113.7"),  # IPv4-compatible (deprecated)
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unknown", "unknown"),
    ],
)
def test_client_key(host: str, key: str) -> None:
    assert client_key(host) == key


async def test_login_limit_is_shared_by_two_instances_through_redis(
    make_app: AppFactory, session: AsyncSession, redis_url: str
) -> None:
    await create_user(session, email="shared@example.com")
    first, second = make_app(REDIS_URL=redis_url), make_app(REDIS_URL=redis_url)
    async with client_for(first, "9.9.9.9") as a, client_for(second, "9.9.9.9") as b:
        for client in (a, b, a, b, a):
            assert (await login(client, "shared@example.com", "wrong-password")).status_code == 401
        assert (await login(b, "shared@example.com")).status_code == 429
        assert (await login(a, "shared@example.com")).status_code == 429
    # Without Redis each process counts alone: a fresh instance still answers.
    async with client_for(make_app(), "9.9.9.9") as alone:
        assert (await login(alone, "shared@example.com")).status_code == 200


async def test_spoofed_forwarded_for_from_untrusted_peer_changes_nothing(
    make_app: AppFactory, session: AsyncSession
) -> None:
    await create_user(session, email="spoof@example.com")
    app = make_app(TRUSTED_PROXIES=["10.0.0.0/8"])
    async with client_for(app, "203.0.113.7") as client:
        for i in range(5):
            headers = {"X-Forwarded-For": f"198.51.100.{i}"}
            assert (await login(client, "spoof@example.com", "wrong-pw", headers=headers)).status_code == 401
        spoofed = await login(client, "spoof@example.com", headers={"X-Forwarded-For": "198.51.100.99"})
        assert spoofed.status_code == 429


async def test_forwarded_for_from_trusted_proxy_separates_clients(make_app: AppFactory, session: AsyncSession) -> None:
    await create_user(session, email="proxied@example.com")
    app = make_app(TRUSTED_PROXIES=["10.0.0.0/8"])
    async with client_for(app, "10.1.2.3") as proxy:
        for _ in range(5):
            headers = {"X-Forwarded-For": "198.51.100.1"}
            assert (await login(proxy, "proxied@example.com", "wrong-pw", headers=headers)).status_code == 401
        assert (
            await login(proxy, "proxied@example.com", headers={"X-Forwarded-For": "198.51.100.1"})
        ).status_code == 429
        # Another client behind the same proxy has its own budget, even if it prepends a fake hop.
        other = await login(proxy, "proxied@example.com", headers={"X-Forwarded-For": "198.51.100.1, 198.51.100.2"})
        assert other.status_code == 200


async def test_a_trusted_proxy_seen_as_an_ipv4_mapped_address_is_trusted(
    make_app: AppFactory, session: AsyncSession
) -> None:
    """A server on a dual-stack socket (`--host ::`, with `--workers`) sees an IPv4 proxy as `::ffff:10.1.2.3`: it
    is the proxy listed as `10.0.0.0/8` all the same. It was not trusted, so every client behind it shared the
    proxy's one login budget (5 a minute for everyone)."""
    await create_user(session, email="mapped@example.com")
    app = make_app(TRUSTED_PROXIES=["10.0.0.0/8"])
    async with client_for(app, "::ffff:10.1.2.3") as proxy:
        for _ in range(5):
            headers = {"X-Forwarded-For": "198.51.100.1"}
            assert (await login(proxy, "mapped@example.com", "wrong-pw", headers=headers)).status_code == 401
        again = await login(proxy, "mapped@example.com", headers={"X-Forwarded-For": "198.51.100.1"})
        assert again.status_code == 429
        other = await login(proxy, "mapped@example.com", headers={"X-Forwarded-For": "198.51.100.2"})
        assert other.status_code == 200


async def test_register_and_team_signup_have_their_own_limits(make_app: AppFactory, session: AsyncSession) -> None:
    team = await create_team(session, settings={"open_registration": True})
    app = make_app(RATE_LIMIT_REGISTER="2/minute", RATE_LIMIT_TEAM_SIGNUP="1/minute")
    async with client_for(app, "1.1.1.1") as client:
        codes = []
        for i in range(3):
            body = {"team_id": str(team.id), "email": f"r{i}@example.com", "password": "long-enough"}
            codes.append((await client.post("/api/auth/register", json=body)).status_code)
        assert codes == [201, 201, 429]
        signup = {"name": "T", "admin_email": "a@example.com", "admin_password": "long-enough"}
        assert (await client.post("/api/teams", json=signup)).status_code == 201
        assert (await client.post("/api/teams", json=signup)).status_code == 429
        # Logging in is a separate budget.
        assert (await login(client, "r0@example.com", "long-enough")).status_code == 200


async def test_rate_limit_can_be_turned_off(make_app: AppFactory, session: AsyncSession) -> None:
    await create_user(session, email="off@example.com")
    app = make_app(RATE_LIMIT_ENABLED=False)
    async with client_for(app, "2.2.2.2") as client:
        codes = {(await login(client, "off@example.com", "wrong-pw")).status_code for _ in range(8)}
    assert codes == {401}


def test_client_address_walks_forwarded_for_from_the_right() -> None:
    trusted = parse_networks(["10.0.0.0/8", "192.0.2.1"])
    assert client_address("203.0.113.5", ["1.1.1.1"], trusted) == "203.0.113.5"
    assert client_address("10.0.0.1", [], trusted) == "10.0.0.1"
    assert client_address("10.0.0.1", ["1.1.1.1"], trusted) == "1.1.1.1"
    assert client_address("10.0.0.1", ["6.6.6.6, 1.1.1.1, 192.0.2.1"], trusted) == "1.1.1.1"
    assert client_address("10.0.0.1", ["6.6.6.6", "1.1.1.1"], trusted) == "1.1.1.1"
    assert client_address("10.0.0.1", ["garbage"], trusted) == "10.0.0.1"
    assert client_address("10.0.0.1", ["10.0.0.2"], trusted) == "10.0.0.2"
    assert client_address("1.1.1.1", ["2.2.2.2"], []) == "1.1.1.1"


def test_client_address_is_one_canonical_spelling_without_scope_ids() -> None:
    trusted = parse_networks(["127.0.0.1"])
    # A client behind the proxy cannot mint keys (or log text) from spellings of one address or scope ids.
    assert client_address("127.0.0.1", ["2001:db8:0:0::1"], trusted) == "2001:db8::1"
    assert client_address("127.0.0.1", ["2001:DB8::1"], trusted) == "2001:db8::1"
    assert client_address("127.0.0.1", ["fe80::1%eth0 forged"], trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", ["fe80::1%x"], trusted) == "127.0.0.1"


def test_client_address_reads_ipv4_mapped_addresses_as_ipv4() -> None:
    """`::ffff:a.b.c.d` is the IPv4 address a.b.c.d (a dual-stack socket's peer, a hop a proxy wrote so): a listed
    proxy is trusted in either spelling, whichever of the two the list uses, and a client is named in one."""
    trusted = parse_networks(["10.0.0.0/8"])
    assert client_address("::ffff:10.0.0.1", ["203.0.113.5"], trusted) == "203.0.113.5"
    assert client_address("10.0.0.1", ["203.0.113.5, ::ffff:10.0.0.2"], trusted) == "203.0.113.5"
    assert client_address("10.0.0.1", ["::ffff:203.0.113.5"], trusted) == "203.0.113.5"
    assert client_address("::ffff:10.0.0.1", ["203.0.113.5"], parse_networks(["::ffff:10.0.0.0/104"])) == "203.0.113.5"
    assert client_address("::ffff:203.0.113.9", ["6.6.6.6"], trusted) == "::ffff:203.0.113.9"  # not a proxy


def test_client_address_drops_a_port_a_proxy_wrote() -> None:
    """Gateways that append `ip:port` (Azure Application Gateway) separate their clients too: such a hop was
    unparsable, so every client behind the proxy counted as the proxy and shared one login budget."""
    trusted = parse_networks(["10.0.0.0/8"])
    assert client_address("10.0.0.1", ["203.0.113.5:41234"], trusted) == "203.0.113.5"
    assert client_address("10.0.0.1", ["198.51.100.9, 203.0.113.5:443"], trusted) == "203.0.113.5"
    assert client_address("10.0.0.1", ["[2001:DB8::1]:443"], trusted) == "2001:db8::1"
    assert client_address("10.0.0.1", ["6.6.6.6, 10.0.0.2:80"], trusted) == "6.6.6.6"  # a trusted hop, skipped
    for garbage in ("203.0.113.5:", "203.0.113.5:123456", "[fe80::1%eth0]:443", "[2001:db8::1]", "host:80"):
        assert client_address("10.0.0.1", [garbage], trusted) == "10.0.0.1", garbage


def test_an_unreadable_hop_is_never_skipped_as_a_trusted_proxy() -> None:
    """The walk from the right stops at the first hop that is not a listed proxy; a hop that is no address
    (`unknown`, a scope id) is not one: the peer is the client then, never a hop further left, which the client
    itself may have written (one key per request, the login limit gone)."""
    trusted = parse_networks(["10.0.0.0/8"])
    for unreadable in ("unknown", "fe80::1%eth0", "host:80"):
        assert client_address("10.0.0.1", [f"6.6.6.6, {unreadable}"], trusted) == "10.0.0.1", unreadable
        assert client_address("10.0.0.1", ["6.6.6.6", unreadable, "10.0.0.2"], trusted) == "10.0.0.1", unreadable


async def test_limiter_and_access_log_see_the_address_decided_once(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The middleware writes the decided address into the scope: the handler, the limiter and the log
    agree, and a trusted proxy's own address never becomes anyone's key."""
    app = make_app(TRUSTED_PROXIES=["10.0.0.0/8"])
    seen: list[str] = []

    async def whoami(request: Request) -> dict[str, str]:
        seen.append(request.client.host if request.client else "")
        return {}

    app.add_api_route("/test/whoami", whoami, methods=["GET"])
    caplog.set_level(logging.INFO, logger="app.access")
    async with client_for(app, "10.1.2.3") as proxy:
        await proxy.get("/test/whoami", headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.7, 10.9.9.9"})
        await proxy.get("/test/whoami")
    assert seen == ["198.51.100.7", "10.1.2.3"]
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert lines[0].startswith("198.51.100.7 GET /test/whoami 200 ")
    assert lines[1].startswith("10.1.2.3 GET /test/whoami 200 ")


# --- revocations: durable in the database, with or without Redis ----------------------------


async def test_logout_revocation_is_seen_by_another_instance_and_stored_in_the_database(
    make_app: AppFactory, session: AsyncSession, redis_url: str
) -> None:
    await create_user(session, email="redis@example.com")
    first = make_app(REDIS_URL=redis_url, RATE_LIMIT_ENABLED=False)
    second = make_app(REDIS_URL=redis_url, RATE_LIMIT_ENABLED=False)
    async with client_for(first, "3.3.3.3") as a, client_for(second, "3.3.3.3") as b:
        tokens = (await login(a, "redis@example.com")).json()
        a.cookies.clear()
        assert (await b.get("/api/auth/me", headers=bearer(tokens["access_token"]))).status_code == 200
        assert (await a.post("/api/auth/logout", headers=bearer(tokens["access_token"]))).status_code == 204
        assert (await b.get("/api/auth/me", headers=bearer(tokens["access_token"]))).status_code == 401
        reuse = await b.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert reuse.status_code == 401
    # Durable: the access token's id and its family are rows, not Redis keys that an outage would lose.
    assert await count_rows(session, "revoked_tokens") == 2
    client = aioredis.from_url(redis_url)
    try:
        jti = jwt.decode(tokens["access_token"], options={"verify_signature": False})["jti"]
        assert await client.exists(f"revoked:{jti}") == 0
    finally:
        await client.aclose()


async def test_rate_limits_count_per_process_while_redis_is_unreachable(
    make_app: AppFactory, session: AsyncSession, caplog: pytest.LogCaptureFixture
) -> None:
    await create_user(session, email="down@example.com")
    app = make_app(REDIS_URL="redis://127.0.0.1:1/0")
    with caplog.at_level(logging.WARNING, logger="app.ratelimit"):
        async with client_for(app, "4.4.4.4") as client, client_for(app, "4.4.4.5") as other:
            codes = [(await login(client, "down@example.com", "wrong-password")).status_code for _ in range(5)]
            limited = await login(client, "down@example.com")
            assert (await login(other, "down@example.com")).status_code == 200
    assert codes == [401] * 5
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.ratelimit"]
    assert len(warnings) == 1
    assert "redis unreachable, counting per process" in warnings[0]


async def test_database_revocation_store(app: FastAPI, session: AsyncSession) -> None:
    store = app_state(app).revocations
    assert isinstance(store, DatabaseRevocationStore)
    now = utcnow()
    await store.revoke("expired-already", now - timedelta(seconds=1))
    await store.revoke("live", now + timedelta(minutes=5))
    await store.revoke("live", now + timedelta(minutes=5))  # idempotent
    assert await store.is_revoked("live")
    assert not await store.is_revoked("expired-already")
    assert not await store.is_any_revoked([])
    assert await store.is_any_revoked(["other", "live"])
    assert await count_rows(session, "revoked_tokens") == 1
