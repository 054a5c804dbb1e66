"""Benchmark request routing: the CPU FastAPI spends finding a request's route in this app, per request.

FastAPI (0.137 and later) keeps each included router as one entry and, for a request, checks every route of
each router it passes until one matches, so a route's cost depends on where its router is included (main.py
`STREAMING_ROUTERS` come first). Builds the app without a database (routing needs none), warms each path once
(the first request of a router in a process builds its routes), then matches each path `--rounds` times as
Starlette's router does and prints microseconds per match. In-process, no server, no network.

    .venv/bin/python -m bench.bench_routing                  # 20,000 matches per path
    .venv/bin/python -m bench.bench_routing --rounds 100     # smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from starlette.routing import Match
from starlette.types import Scope

from app.config import load_settings
from main import create_app

CHAT = uuid.UUID(int=1)
#: What a stream's requests use first, then a few others for scale, and a path no route has (a 404).
PATHS = (
    ("POST", f"/api/chats/{CHAT}/messages"),
    ("GET", f"/api/chats/{CHAT}/stream"),
    ("POST", f"/api/callbacks/{CHAT}/signature"),
    ("POST", "/v1/chat/completions"),
    ("POST", f"/api/agents/{CHAT}/n8n-chat"),
    ("POST", "/api/auth/login"),
    ("GET", "/api/usage"),
    ("GET", "/no/such/path"),
)


def _scope(app: Any, method: str, path: str) -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": [],
        "query_string": b"",
        "app": app,
    }


def run(rounds: int) -> list[tuple[str, float]]:
    """Microseconds per match for each of PATHS."""
    with tempfile.TemporaryDirectory() as data_dir:
        settings = load_settings(
            _env_file=None,
            DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:5432/unused",  # never connected to
            DATA_DIR=Path(data_dir),
            JWT_SECRET="x" * 64,
        )
        app = create_app(settings)
        routes = app.router.routes
        results = []
        for method, path in PATHS:
            scope = _scope(app, method, path)
            for route in routes:  # the first match of a router builds its routes: not measured
                route.matches(scope)
            started = time.perf_counter()
            for _ in range(rounds):
                for route in routes:
                    if route.matches(scope)[0] == Match.FULL:
                        break
            results.append((f"{method} {path}", (time.perf_counter() - started) / rounds * 1e6))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args()
    for name, micros in run(args.rounds):
        print(f"{micros:8.1f} us  {name}")


if __name__ == "__main__":
    main()
