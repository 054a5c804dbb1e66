"""Per-client-IP rate limits on the auth endpoints, one limiter per application instance.

Built on `limits` (the engine slowapi wraps), through its asyncio API: a moving window in Redis when
`REDIS_URL` is set, so every worker shares the counters, else in process memory. slowapi's decorators
keep one module-global Limiter (counters would leak between application instances) and call the
synchronous storage (blocking Redis I/O); a per-app object on `app.state.limiter` used from a
dependency has neither problem.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Literal

from fastapi import Request
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from app.config import Settings
from app.errors import RateLimited

LimitName = Literal["login", "register", "team_signup", "invite_preview"]
Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address


def parse_networks(entries: list[str]) -> list[Network]:
    return [ip_network(entry, strict=False) for entry in entries]


def client_ip(request: Request, trusted: list[Network]) -> str:
    """The socket peer, or, when that peer is a trusted proxy, the nearest untrusted X-Forwarded-For hop.

    Walking the header from the right skips only addresses we trust; anything a client wrote further
    left is never believed, so a spoofed header from an untrusted peer changes nothing.
    """
    peer = request.client.host if request.client else ""
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in request.headers.getlist("x-forwarded-for") for hop in value.split(",")]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop if _parse_ip(hop) is not None else peer
    return hops[0] if hops else peer


def _parse_ip(value: str) -> Address | None:
    try:
        return ip_address(value)
    except ValueError:
        return None


def _is_trusted(value: str, trusted: list[Network]) -> bool:
    address = _parse_ip(value)
    return address is not None and any(address in network for network in trusted)


class RateLimiter:
    """The limits of one application instance (`app.state.limiter`)."""

    def __init__(self, settings: Settings, redis: Redis | None) -> None:
        self.enabled = settings.RATE_LIMIT_ENABLED
        self.trusted = parse_networks(settings.TRUSTED_PROXIES)
        self.items: dict[LimitName, RateLimitItem] = {
            "login": parse(settings.RATE_LIMIT_LOGIN),
            "register": parse(settings.RATE_LIMIT_REGISTER),
            "team_signup": parse(settings.RATE_LIMIT_TEAM_SIGNUP),
            # Its own counter at the register rate: a sign-up page previews, then registers.
            "invite_preview": parse(settings.RATE_LIMIT_REGISTER),
        }
        storage: RedisStorage | MemoryStorage
        if redis is not None and settings.REDIS_URL:
            # Shares the application's connection pool, which `shutdown()` closes.
            options: dict[str, Any] = {"connection_pool": redis.connection_pool}
            storage = RedisStorage(
                "async+" + settings.REDIS_URL, implementation="redispy", key_prefix="ratelimit", **options
            )
        else:
            storage = MemoryStorage()
        self.strategy = MovingWindowRateLimiter(storage)

    async def hit(self, name: LimitName, request: Request) -> None:
        """Count one request of this client against `name`; over the limit raises 429 with Retry-After."""
        if not self.enabled:
            return
        item = self.items[name]
        key = client_ip(request, self.trusted) or "unknown"
        if await self.strategy.hit(item, name, key):
            return
        stats = await self.strategy.get_window_stats(item, name, key)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited("Too many requests; retry in a moment", headers={"Retry-After": str(retry_after)})


def rate_limit(name: LimitName) -> Callable[[Request], Awaitable[None]]:
    """A dependency counting the request against the app's limiter."""

    async def dependency(request: Request) -> None:
        limiter: RateLimiter = request.app.state.limiter
        await limiter.hit(name, request)

    return dependency
