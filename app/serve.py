"""Serving the app with uvicorn so that TRUSTED_PROXIES alone decides the client address, and a client that
stops reading is cut off after STREAM_WRITE_TIMEOUT (app.write_stall).

uvicorn believes X-Forwarded-For from 127.0.0.1 by default (`--proxy-headers`, FORWARDED_ALLOW_IPS) and
rewrites the client address before the app sees it: a client on the same host could then rotate the
header and never meet a rate limit. Every way of starting the service goes through here instead:
`python -m app.cli serve` (Makefile, README), the tests' live servers (`SERVER_OPTIONS`, `http_protocol`),
and a plain `uvicorn --factory main:create_app`, whose proxy handling and HTTP protocol `create_app` adjusts
(`release_uvicorn_proxy_headers`, `limit_uvicorn_write_stalls`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Final

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS, Config
from uvicorn.importer import import_from_string

from app import metrics
from app.config import Settings
from app.logs import setup_logging
from app.write_stall import with_write_stall_limit

logger = logging.getLogger("app")

ROOT = Path(__file__).resolve().parent.parent
FACTORY = "main:create_app"
#: Forced on every server we build: no proxy-header rewriting, no uvicorn access line (the app writes one).
SERVER_OPTIONS: Final[dict[str, Any]] = {"proxy_headers": False, "forwarded_allow_ips": "", "access_log": False}


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Run the factory under uvicorn, `workers` processes sharing one socket (limits shared through Redis)."""
    setup_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    if workers > 1 and not settings.REDIS_URL:
        logger.warning("%d workers without REDIS_URL: each worker counts rate limits on its own", workers)
    if settings.METRICS_ENABLED and workers > 1 and not os.environ.get(metrics.MULTIPROC_ENV):
        # Before the workers start (they inherit it): one directory their metric values are merged from, of this
        # server's own (by its port): another server started beside it with the same DATA_DIR would empty it.
        # A server already on this port owns that directory: this one would fail to bind after emptying it.
        if port_taken(host, port):
            logger.error("%s:%d is in use by another server: not started", host, port)
            raise SystemExit(1)
        metrics.prepare_multiprocess_dir(settings.DATA_DIR / "metrics" / str(port))
    uvicorn.run(
        FACTORY,
        factory=True,
        app_dir=str(ROOT),
        host=host,
        port=port,
        workers=workers,
        # Longer than the app's own grace, so running answers get their final event and write.
        timeout_graceful_shutdown=math.ceil(settings.SHUTDOWN_GRACE_SECONDS) + 5,
        log_level=settings.LOG_LEVEL.lower(),
        log_config=None,  # ours (setup_logging), in this process and in every worker through the factory
        **SERVER_OPTIONS,
    )


def port_taken(host: str, port: int) -> bool:
    """Whether binding `host:port` fails as uvicorn's bind would (SO_REUSEADDR, as uvicorn sets it): a server
    listens there already. An unresolvable host is left to uvicorn to report."""
    if port == 0:
        return False
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError:
        return False
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return True
    return False


def release_uvicorn_proxy_headers() -> bool:
    """Called by `create_app`: when uvicorn is loading it as a factory, turn uvicorn's proxy headers off.

    uvicorn wraps the factory's app in its ProxyHeadersMiddleware after calling the factory, if
    `config.proxy_headers` is still set: clearing it here makes a plain `uvicorn --factory main:create_app`
    (with or without --workers) as safe as `app.cli serve`. An app instance handed to uvicorn or gunicorn
    by other means is not reached: run those with --no-proxy-headers / --forwarded-allow-ips ''.
    """
    config = _config_being_loaded()
    if config is not None and config.proxy_headers:
        config.proxy_headers = False
        logger.info("uvicorn's proxy headers are off: TRUSTED_PROXIES alone decides the client address")
        return True
    return False


def limit_uvicorn_write_stalls(settings: Settings) -> bool:
    """Called by `create_app`: when uvicorn is loading it as a factory (`app.cli serve`, a plain `uvicorn
    --factory`, each worker of `--workers N`), its connections get the STREAM_WRITE_TIMEOUT limit.

    uvicorn has resolved its HTTP protocol class before it calls the factory, and builds every connection's
    protocol from `config.http_protocol_class`: the limited class replaces it there. An app instance handed to a
    server by other means is not reached (the tests' live servers pass `http_protocol(settings)` themselves).
    """
    config = _config_being_loaded()
    if config is None or settings.STREAM_WRITE_TIMEOUT <= 0:
        return False
    config.http_protocol_class = with_write_stall_limit(config.http_protocol_class, settings.STREAM_WRITE_TIMEOUT)
    return True


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's default HTTP protocol class with the STREAM_WRITE_TIMEOUT limit, for `uvicorn.Config(http=...)`
    around an app instance (the factory gets it from `limit_uvicorn_write_stalls`)."""
    protocol: type[asyncio.Protocol] = import_from_string(HTTP_PROTOCOLS["auto"])
    return with_write_stall_limit(protocol, settings.STREAM_WRITE_TIMEOUT)


def _config_being_loaded() -> Config | None:
    """The uvicorn Config whose `load` is calling the factory up the stack (None when not called so)."""
    frame = sys._getframe(1)
    for _ in range(12):
        if frame.f_code is Config.load.__code__:
            config = frame.f_locals.get("self")
            return config if isinstance(config, Config) else None
        if frame.f_back is None:
            return None
        frame = frame.f_back
    return None
