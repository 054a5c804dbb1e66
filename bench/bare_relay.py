"""The reference relay: the thinnest aiohttp → Starlette passthrough of the same fake n8n upstream.

`POST /relay?<query>` reads the request body, POSTs it to `$BARE_UPSTREAM/webhook/agent-stream?<query>`
through one shared aiohttp ClientSession (no connection cap), splits the NDJSON answer into lines, and for
each `item` line yields one SSE event framed exactly like the service's `message` events
(`id: N\\ndata: {"type": "message", "data": {"content": ...}}\\n\\n`), then one `done` event. It does what
every relay must do per chunk (read, split, decode JSON, encode JSON, write), and nothing else: no auth, no
database, no settings, no middleware, no SSRF policy, no timeouts, no pings, no storing of the answer, no
error handling beyond closing the stream. Run under the same uvicorn (one worker, uvloop, httptools) as
the service: `BARE_UPSTREAM=http://127.0.0.1:5678 uvicorn --factory bench.bare_relay:create_app`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route


def sse(event_id: int, kind: str, data: object) -> bytes:
    payload = json.dumps({"type": kind, "data": data}, ensure_ascii=False)
    return f"id: {event_id}\ndata: {payload}\n\n".encode()


def create_app() -> Starlette:
    upstream = os.environ.get("BARE_UPSTREAM", "http://127.0.0.1:5678").rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        state["session"] = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False
        )
        try:
            yield
        finally:
            await state["session"].close()

    async def relay(request: Request) -> StreamingResponse:
        body = await request.body()
        url = f"{upstream}/webhook/agent-stream?{request.url.query}"

        async def events() -> AsyncIterator[bytes]:
            event_id = 0
            buffer = b""
            async with state["session"].post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                async for data in resp.content.iter_any():
                    buffer += data
                    end = buffer.rfind(b"\n")
                    if end < 0:
                        continue
                    lines, buffer = buffer[:end], buffer[end + 1 :]
                    for line in lines.split(b"\n"):
                        if not line.strip():
                            continue
                        obj = json.loads(line)
                        if obj.get("type") == "item" and isinstance(obj.get("content"), str):
                            event_id += 1
                            yield sse(event_id, "message", {"content": obj["content"]})
            event_id += 1
            yield sse(event_id, "done", {})

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return Starlette(routes=[Route("/relay", relay, methods=["POST"])], lifespan=lifespan)
