"""Per-client-IP rate limits on the auth endpoints, one limiter per application instance.

Built on `limits` (the engine slowapi wraps), through its asyncio API: a moving window in Redis when
`REDIS_URL` is set, so every worker shares the counters, else in process memory. While a configured Redis
is unreachable, each process counts on its own (logged once per outage): a limit per process instead of a
shared one, never a refusal for want of Redis. slowapi's decorators
keep one module-global Limiter (counters would leak between application instances) and call the
synchronous storage (blocking Redis I/O); a per-app object (the app's `AppState.limiter`) used from a
dependency has neither problem.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from app import metrics
from app.config import Settings
from app.errors import RateLimited
from app.state import app_state

logger = logging.getLogger(__name__)

LimitName = Literal["login", "register", "team_signup", "invite_preview", "agent_test", "api_key"]


#: IPv6 prefixes whose last 32 bits are an IPv4 client (NAT64's well-known /96, and the deprecated
#: IPv4-compatible form): each such client counts as that IPv4 address, not as the prefix's /64. NAT64's
#: local-use block (64:ff9b:1::/48) is left out: its prefixes may be /48 to /96, each placing the IPv4
#: elsewhere (RFC 6052), so its addresses count by /64 like any other.
_EMBEDS_IPV4 = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "::/96"))


def client_key(host: str) -> str:
    """Whom a limit counts: an IPv4 address, or an IPv6 address's /64 (one host normally holds a whole /64,
    so counting single addresses gave it 2^64 budgets). An IPv6 address that carries an IPv4 client (mapped,
    6to4, Teredo, NAT64, IPv4-compatible) counts as that IPv4 address: its /64 is shared by many clients
    (NAT64, Teredo), or one client holds many /64s (6to4). Loopback and unspecified stay themselves."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if not isinstance(address, ipaddress.IPv6Address):
        return host
    if address.is_loopback or address.is_unspecified:
        return str(address)
    embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
    if embedded is None and any(address in network for network in _EMBEDS_IPV4):
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is not None:
        return str(embedded)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class RateLimiter:
    """The limits of one application instance (`AppState.limiter`)."""

    def __init__(self, settings: Settings, redis: Redis | None) -> None:
        self.enabled = settings.RATE_LIMIT_ENABLED
        self.items: dict[LimitName, RateLimitItem] = {
            "login": parse(settings.RATE_LIMIT_LOGIN),
            "register": parse(settings.RATE_LIMIT_REGISTER),
            "team_signup": parse(settings.RATE_LIMIT_TEAM_SIGNUP),
            # Its own counter at the register rate: a sign-up page previews, then registers.
            "invite_preview": parse(settings.RATE_LIMIT_REGISTER),
            # Keyed by the admin, not the address: each test makes an outbound request to n8n.
            "agent_test": parse(settings.RATE_LIMIT_AGENT_TEST),
            # Failed API-key attempts per address, at the login rate (app.auth counts only failures).
            "api_key": parse(settings.RATE_LIMIT_LOGIN),
        }
        #: In process memory: the only counters without Redis, the fallback while Redis is unreachable.
        self.local = MovingWindowRateLimiter(MemoryStorage())
        self.shared: MovingWindowRateLimiter | None = None
        if redis is not None and settings.REDIS_URL:
            # Shares the application's connection pool, which `shutdown()` closes.
            options: dict[str, Any] = {"connection_pool": redis.connection_pool}
            storage = RedisStorage(
                "async+" + settings.REDIS_URL, implementation="redispy", key_prefix="ratelimit", **options
            )
            self.shared = MovingWindowRateLimiter(storage)
        self.degraded = False

    def _key(self, request: Request, key: str | None) -> str:
        # The address app.middleware decided from TRUSTED_PROXIES (app.proxies), the one the access log shows.
        if key is not None:
            return key
        return client_key((request.client.host if request.client else "") or "unknown")

    async def _shared_or_local(self, call: Callable[[MovingWindowRateLimiter], Awaitable[bool]]) -> tuple[bool, Any]:
        """Run `call` on the Redis counters, or in process memory when there are none or Redis is down."""
        if self.shared is not None:
            try:
                allowed = await call(self.shared)
                if self.degraded:
                    logger.warning("rate limits: redis reachable again, counting in redis")
                    self.degraded = False
                return allowed, self.shared
            except Exception as exc:
                if not self.degraded:
                    logger.warning("rate limits: redis unreachable, counting per process (%s)", type(exc).__name__)
                    self.degraded = True
        return await call(self.local), self.local

    async def _refuse(self, name: LimitName, item: RateLimitItem, strategy: Any, key: str) -> None:
        metrics.refused(name)
        try:
            stats = await strategy.get_window_stats(item, name, key)
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        except Exception:  # Redis went away between the two calls: the window's length is a safe answer
            retry_after = item.get_expiry()
        raise RateLimited("Too many requests; retry in a moment", headers={"Retry-After": str(retry_after)})

    async def hit(self, name: LimitName, request: Request, *, key: str | None = None) -> None:
        """Count one request against `name`, per client address unless a `key` (e.g. a user id) is given;
        over the limit raises 429 with Retry-After."""
        if not self.enabled:
            return
        item, client = self.items[name], self._key(request, key)
        allowed, strategy = await self._shared_or_local(lambda limiter: limiter.hit(item, name, client))
        if not allowed:
            await self._refuse(name, item, strategy, client)

    async def check(self, name: LimitName, request: Request, *, key: str | None = None) -> None:
        """Raise 429 when `name` is used up for this client, without counting: for limits that count only
        failures (API keys), checked before the attempt so a refused client learns nothing from it."""
        if not self.enabled:
            return
        item, client = self.items[name], self._key(request, key)
        allowed, strategy = await self._shared_or_local(lambda limiter: limiter.test(item, name, client))
        if not allowed:
            await self._refuse(name, item, strategy, client)


async def get_limiter(request: Request) -> RateLimiter:
    return app_state(request.app).limiter


LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]


def rate_limit(name: LimitName) -> Callable[[Request, RateLimiter], Awaitable[None]]:
    """A dependency counting the request against the app's limiter."""

    async def dependency(request: Request, limiter: LimiterDep) -> None:
        await limiter.hit(name, request)

    return dependency
