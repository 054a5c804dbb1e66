"""Helpers for live tests: uvicorn on a free port (in a thread, or a real `app.cli serve` / `uvicorn` process),
the SSE wire parser, rows for a chat with an agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import encrypt_headers
from app.models import Agent, Chat, Team, User
from app.serve import SERVER_OPTIONS, http_protocol
from app.state import app_state
from main import create_app
from tests.conftest import ROOT
from tests.factories import auth_headers, create_agent, create_chat, create_user


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SSE:
    """One parsed SSE block: `id`, the decoded `data` JSON, or a comment."""

    id: str | None
    data: dict[str, Any] | None
    comment: str | None = None

    @property
    def type(self) -> str | None:
        return None if self.data is None else str(self.data["type"])


def parse_sse(text: str) -> list[SSE]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event_id, data, comment = None, [], None
        for line in block.split("\n"):
            if line.startswith(":"):
                comment = line[1:].strip()
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        events.append(SSE(event_id, json.loads("\n".join(data)) if data else None, comment))
    return events


def data_events(events: list[SSE]) -> list[SSE]:
    return [e for e in events if e.data is not None]


def streamed_text(events: list[SSE]) -> str:
    return "".join(e.data["data"]["content"] for e in events if e.data is not None and e.type == "message")


@dataclass
class ChatSetup:
    user: User
    agent: Agent
    chat: Chat
    headers: dict[str, str]


async def chat_with_agent(
    session: AsyncSession, settings: Settings, url: str, *, webhook_headers: dict[str, str] | None = None, **chat: Any
) -> ChatSetup:
    user = await create_user(session)
    encrypted = encrypt_headers(webhook_headers or {}, settings.fernet)
    team = await session.get(Team, user.team_id)
    assert team is not None
    agent = await create_agent(session, team=team, webhook_url=url, webhook_headers_encrypted=encrypted)
    created = await create_chat(session, user=user, agent=agent, **chat)
    return ChatSetup(user, agent, created, auth_headers(settings, user))


class LiveServer:
    """`create_app(settings)` served by uvicorn in a background thread with its own event loop."""

    def __init__(self, settings: Settings, *, graceful_timeout: int | None = None, port: int | None = None) -> None:
        self.settings = settings
        #: Given when the settings must name the address beforehand (PUBLIC_BASE_URL).
        self.port = port if port is not None else free_port()
        self.app = create_app(settings)
        # The production server options (no proxy-header rewriting, no uvicorn access line).
        config = uvicorn.Config(
            app=self.app,
            host="127.0.0.1",
            port=self.port,
            lifespan="on",
            log_level="warning",
            timeout_graceful_shutdown=graceful_timeout,
            http=http_protocol(settings),  # STREAM_WRITE_TIMEOUT, as the factory gets it (app.write_stall)
            **SERVER_OPTIONS,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.01)
        raise RuntimeError("uvicorn did not start in time")

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def running_generations(self) -> int:
        return len(app_state(self.app).generations.running)


@asynccontextmanager
async def live_server(settings: Settings, **kwargs: Any) -> AsyncIterator[LiveServer]:
    server = LiveServer(settings, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def server_process(command: list[str], env: dict[str, str], log: Path) -> AsyncIterator[str]:
    """A real server process, as an operator starts it: `command` without `--port` (added here).

    Yields the base url once /health answers. stdout and stderr go to `log`. At the end SIGTERM (uvicorn's
    supervisor stops its workers), then SIGKILL for the process group if it has not stopped in time.
    """
    port = free_port()
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, "--port", str(port), cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_until_healthy(url, process, log)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


async def _wait_until_healthy(url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        for _ in range(600):
            if process.returncode is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{tail(log)}")
            with suppress(httpx.TransportError):
                if (await client.get("/health")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"server did not answer in time:\n{tail(log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


class EventReader:
    """One SSE response read in the background: `events` grows block by block; `leave()` drops the connection."""

    def __init__(self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> None:
        self.status_code: int | None = None
        self.events: list[SSE] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(client, method, url, kwargs))

    async def _read(self, client: httpx.AsyncClient, method: str, url: str, kwargs: dict[str, Any]) -> None:
        buffer = ""
        try:
            async with client.stream(method, url, **kwargs) as response:
                self.status_code = response.status_code
                self._changed.set()
                async for text in response.aiter_text():
                    buffer += text
                    if "\n\n" in buffer:
                        complete, buffer = buffer.rsplit("\n\n", 1)
                        self.events.extend(parse_sse(complete))
                        self._changed.set()
        finally:
            self._changed.set()

    @property
    def data(self) -> list[SSE]:
        return data_events(self.events)

    async def wait_for(self, check: Any, within: float = 10) -> None:
        """Until `check(self)` is true (or the response ended: then `check` must hold anyway)."""
        async with asyncio.timeout(within):
            while not check(self):
                if self._task.done():
                    self._task.result()
                    assert check(self), "the stream ended first"
                    return
                self._changed.clear()
                await self._changed.wait()

    async def finish(self, within: float = 10) -> list[SSE]:
        """Every data event, once the server ended the response."""
        async with asyncio.timeout(within):
            await self._task
        return self.data

    async def leave(self) -> None:
        """Drop the connection (a reload); a connection the server already lost ends the same way."""
        self._task.cancel()
        with suppress(asyncio.CancelledError, httpx.TransportError):
            await self._task


class RedisProcess:
    """A `redis-server` of the test's own on a free port (no persistence), to stop and start mid-test."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", str(self.directory)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(10):
            while True:
                with suppress(OSError):
                    _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    await writer.wait_closed()
                    return
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        self.process = None


@asynccontextmanager
async def silent_port() -> AsyncIterator[int]:
    """A local port that accepts connections and never says a word (a TLS handshake there never completes)."""
    silent = asyncio.Event()

    async def accept_and_say_nothing(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await silent.wait()
        writer.close()

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        silent.set()
        server.close()
        await server.wait_closed()


class FreezingProxy:
    """A TCP proxy to `port` whose connections can be frozen: `freeze()` makes every open connection drop what
    either side sends, without closing it, as a NAT or a load balancer that forgot the connection does (or a
    failover that drops packets). Connections opened afterwards pass as before. `close()` ends every connection
    and refuses new ones (Redis unreachable from this side only) until `start()` opens the same port again.
    With `delay`, whatever either side sends reaches the other that much later (a slow network)."""

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.port = port
        self.delay = delay
        self.listening = 0  # the proxy's own port, once started (kept across `close` and `start`)
        self.frozen: set[int] = set()
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.listening)
        self.listening = int(self.server.sockets[0].getsockname()[1])

    @property
    def redis_url(self) -> str:
        assert self.listening
        return f"redis://127.0.0.1:{self.listening}/0"

    def freeze(self) -> None:
        self.frozen.update(range(self.connections))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            self.writers = []
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [client_w, server_w]

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with suppress(ConnectionError):
                while data := await reader.read(65536):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    if number not in self.frozen:
                        writer.write(data)
                        await writer.drain()

        try:
            await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
        finally:
            for writer in (client_w, server_w):
                writer.close()


async def cut_off_request(app: Any, path: str, headers: dict[str, str], head: bytes) -> list[dict[str, Any]]:
    """A POST whose client disconnects after the body's first chunk (raw ASGI: no HTTP client can do it on
    purpose); the ASGI messages the application sent back."""
    incoming: list[dict[str, Any]] = [
        {"type": "http.request", "body": head, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send_message(message: dict[str, Any]) -> None:
        sent.append(dict(message))

    await app(http_scope("POST", path, headers), receive, send_message)
    return sent


def bodyless_request(gone: asyncio.Event | None = None) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI `receive` for a request without a body (a GET): the empty body, then nothing until `gone` is set
    (never, without one: a client that stays to the end), then the client's disconnect."""
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    return receive


def http_scope(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """The ASGI scope of a request to `path` (its query string after `?`) from a local client, as uvicorn
    builds it: for tests and benchmarks that drive the app by hand (a client that leaves, a body read piece by
    piece), which no HTTP test client can do."""
    base, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": base,
        "raw_path": base.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }


async def fill_pool(client: Redis) -> None:
    """Open every connection of the client's pool, one at a time, as a busy instance's pool would be: 100
    connections opened in the same instant (each a connect and three commands: the library's name and version,
    the db) by a loaded machine's one event loop passed their 2 s connect deadline, and the test measured that
    instead of what it meant to (a pool share, commands waiting for a connection)."""
    pool = client.connection_pool
    held = [await pool.get_connection() for _ in range(pool.max_connections)]  # type: ignore[no-untyped-call]
    for connection in held:
        await pool.release(connection)
