"""STREAM_WRITE_TIMEOUT (app.write_stall) against a live uvicorn: a client that stops reading mid-stream has its
connection reset after the limit, the answer is still stored whole and can be followed, and a slow client that
keeps reading is never cut off."""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select as sql_select
from sqlalchemy.ext.asyncio import AsyncSession
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from app.config import ConfigError, Settings
from app.models import Chat
from app.serve import http_protocol
from app.write_stall import WriteStallLimit, with_write_stall_limit
from tests.conftest import make_settings
from tests.live import (
    ChatSetup,
    LiveServer,
    chat_with_agent,
    data_events,
    live_server,
    parse_sse,
    server_process,
    streamed_text,
)
from tests.test_serve import SERVE, server_env
from tests.test_stream_live import settled
from tools.fake_n8n import FakeN8n, paced_text

pytestmark = pytest.mark.slow

LIMIT = 1.0  # STREAM_WRITE_TIMEOUT in these tests
MARGIN = 2.0  # the reset comes within LIMIT + MARGIN of the stall (a timer: the margin is for a busy machine)
#: 6 MB of answer text, more than the server's kernel send buffer (up to tcp_wmem's 4 MiB) and uvicorn's 64 KiB
#: hold: a client that reads nothing stalls the stream midway.
CHUNKS, SIZE = 1500, 4000
LONG = f"scenario=paced&chunks={CHUNKS}&size={SIZE}&interval_ms=1"
#: The slow reader's: 2.5 MB of text, 5 MB on the wire (`done` repeats the message), read at most 128 KiB per
#: SLOW_LIMIT / 4 s (512 KiB/s): four reads per limit, so a busy machine may delay one without a reset.
SLOW_LIMIT = 1.0
SLOW_CHUNKS = 625
SLOW_READ = f"scenario=paced&chunks={SLOW_CHUNKS}&size={SIZE}&interval_ms=1"
SEND = "send"
WIDGET = "widget"


def stall_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(database_url, tmp_path, STREAM_WRITE_TIMEOUT=LIMIT, **overrides)


def request_of(route: str, setup: ChatSetup) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Path, headers and body of a streamed send: the chat's SSE, or the n8n widget's NDJSON."""
    if route == SEND:
        return f"/api/chats/{setup.chat.id}/messages", setup.headers, {"content": "hello there"}
    body = {"action": "sendMessage", "sessionId": "stall-session", "chatInput": "hello there"}
    return f"/api/agents/{setup.agent.id}/n8n-chat", {**setup.headers, "Accept": "text/plain"}, body


def raw_request(
    port: int, path: str, headers: dict[str, str], body: dict[str, Any], *, rcvbuf: int, connection: str = "close"
) -> socket.socket:
    """A POST on a plain socket with a receive buffer of `rcvbuf` bytes (set before connecting: it bounds the
    window the client offers); the caller decides whether anything is ever read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Connection: {connection}", "Content-Type: application/json"]
    head += [f"Content-Length: {len(payload)}", *(f"{name}: {value}" for name, value in headers.items())]
    sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    return sock


def reset_seen(sock: socket.socket) -> bool:
    """Whether the server reset the connection, seen without reading a byte (a close would need the client
    to read everything up to the FIN first)."""
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))


def paused_connections(server: LiveServer) -> int:
    """uvicorn's connections whose transport has paused writing (their client is not keeping up)."""
    flows: list[Any] = [getattr(c, "flow", None) for c in server.server.server_state.connections]
    return sum(1 for flow in flows if flow is not None and flow.write_paused)


async def until(check: Callable[[], bool], within: float, interval: float = 0.01) -> float:
    """Polls `check` until true (TimeoutError after `within` s); the loop time it became true."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        while True:
            if check():
                return loop.time()
            await asyncio.sleep(interval)


async def chat_of(session: AsyncSession, route: str, setup: ChatSetup) -> uuid.UUID:
    if route == SEND:
        return setup.chat.id
    chats = await session.execute(sql_select(Chat.id).where(Chat.user_id == setup.user.id, Chat.id != setup.chat.id))
    return chats.scalar_one()


@pytest.mark.parametrize("route", [SEND, WIDGET])
async def test_a_client_that_stops_reading_is_reset_and_the_answer_is_stored_whole(
    route: str, app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = stall_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        path, headers, body = request_of(route, setup)
        sock = raw_request(server.port, path, headers, body, rcvbuf=4096)
        try:
            paused_at = await until(lambda: paused_connections(server) > 0, within=30)
            # Reset by the server within the limit: uvicorn has let the connection go, and the client sees the reset.
            reset_at = await until(lambda: not server.server.server_state.connections, within=LIMIT + MARGIN)
            await until(lambda: reset_seen(sock), within=1)
        finally:
            sock.close()
        assert reset_at - paused_at >= LIMIT - 0.05  # not before the limit (polling may see the pause late)
        chat_id = await chat_of(session, route, setup)
        message = await settled(app, chat_id, within=30)
        assert message["status"] == "complete"
        assert message["content"] == paced_text(CHUNKS, SIZE)
        # Another client follows the whole answer, from its first event to `done`.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            response = await client.get(f"/api/chats/{chat_id}/stream", headers={**setup.headers, "Last-Event-ID": "0"})
        events = data_events(parse_sse(response.text))
        assert events[-1].type == "done"
        assert streamed_text(events) == paced_text(CHUNKS, SIZE)


async def test_app_cli_serve_resets_a_stalled_client(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """The production server (`app.cli serve` loads the factory): `create_app` gives uvicorn the limit."""
    settings = make_settings(database_url, tmp_path)
    env = server_env(database_url, tmp_path, STREAM_WRITE_TIMEOUT=str(LIMIT), WEBHOOK_ALLOW_PRIVATE_NETWORKS="true")
    log = tmp_path / "server.log"
    async with server_process(SERVE, env, log) as url:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        path, headers, body = request_of(SEND, setup)
        sock = raw_request(int(url.rsplit(":", 1)[1]), path, headers, body, rcvbuf=4096)
        try:
            # The answer takes a few seconds to fill the buffers; then the reset comes within the limit.
            await until(lambda: reset_seen(sock), within=30)
        finally:
            sock.close()
        message = await settled(app, setup.chat.id, within=30)
    assert message["status"] == "complete"
    assert message["content"] == paced_text(CHUNKS, SIZE)
    assert "write stall: the client took nothing for 1 s" in log.read_text()


async def test_a_slow_client_that_keeps_reading_is_not_cut_off(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """A client reading a little every SLOW_LIMIT / 4 s, slower than the answer comes: the server's buffers
    fill and its writes stay paused for longer than the limit at a time (the kernel wakes a writer only once a third
    of its send buffer is free), yet the client takes bytes all along, and the answer arrives whole."""
    settings = make_settings(database_url, tmp_path, STREAM_WRITE_TIMEOUT=SLOW_LIMIT)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{SLOW_READ}")
        path, headers, body = request_of(SEND, setup)
        spans = PausedSpans(server)
        sock = raw_request(server.port, path, headers, body, rcvbuf=65536)
        sock.setblocking(False)
        received = bytearray()
        try:
            while True:
                await asyncio.sleep(SLOW_LIMIT / 4)
                try:
                    data = sock.recv(128 * 1024)
                except BlockingIOError:
                    continue
                if not data:
                    break
                received += data
        finally:
            sock.close()
            await spans.stop()
    head, _, chunked = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    events = data_events(parse_sse(dechunked(chunked).decode()))
    assert events[-1].type == "done"
    assert streamed_text(events) == paced_text(SLOW_CHUNKS, SIZE)
    # The case the limit must tell apart: paused for longer than the limit, the client reading meanwhile.
    assert spans.longest > SLOW_LIMIT


async def test_a_client_that_caught_up_keeps_its_connection(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """A client that let the stream pause (reading nothing for a moment), then read it all, is keeping up:
    its connection is not reset afterwards, neither while the answer goes on nor idle on keep-alive for a
    few limits before its next request (the pause's timer ends with the pause)."""
    settings = stall_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        path, headers, body = request_of(SEND, setup)
        sock = raw_request(server.port, path, headers, body, rcvbuf=4096, connection="keep-alive")
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await until(lambda: paused_connections(server) > 0, within=30)
            received = bytearray()
            async with asyncio.timeout(30):
                while not received.endswith(b"\r\n0\r\n\r\n"):
                    data = await loop.sock_recv(sock, 1 << 20)
                    assert data, "connection closed before the answer's end"
                    received += data
            head, _, chunked = bytes(received).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert data_events(parse_sse(dechunked(chunked).decode()))[-1].type == "done"
            await asyncio.sleep(3 * LIMIT)  # idle, well within uvicorn's keep-alive (5 s)
            assert not reset_seen(sock)
            await loop.sock_sendall(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(10):
                answer = await loop.sock_recv(sock, 65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        finally:
            sock.close()


async def test_a_client_that_leaves_while_paused_is_no_write_stall(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its connection while the stream is paused has left, not stalled: the pause's
    timer ends with the connection, and no `write stall` line (nor reset) follows a limit later."""
    caplog.set_level(logging.INFO, logger="app")
    settings = stall_settings(database_url, tmp_path)
    async with live_server(settings) as server:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream?{LONG}")
        path, headers, body = request_of(SEND, setup)
        sock = raw_request(server.port, path, headers, body, rcvbuf=4096)
        try:
            await until(lambda: paused_connections(server) > 0, within=30)
        finally:
            sock.close()  # unread bytes: the close is a reset, and uvicorn loses the connection at once
        await until(lambda: not server.server.server_state.connections, within=LIMIT / 2)
        await asyncio.sleep(3 * LIMIT)
    assert not [r for r in caplog.records if r.getMessage().startswith("write stall")]


class PausedSpans:
    """Samples the live server's connections every 10 ms: the longest span any of them stayed paused."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.longest = 0.0
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        since: float | None = None
        while True:
            now = loop.time()
            if paused_connections(self.server):
                since = now if since is None else since
                self.longest = max(self.longest, now - since)
            else:
                since = None
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task


def dechunked(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content."""
    content, pos = bytearray(), 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            return bytes(content)
        content += body[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def test_the_limit_is_a_setting_0_turns_it_off(database_url: str, tmp_path: Path) -> None:
    base = import_from_string(HTTP_PROTOCOLS["auto"])
    limited = http_protocol(make_settings(database_url, tmp_path, STREAM_WRITE_TIMEOUT=30))
    assert issubclass(limited, WriteStallLimit)
    assert issubclass(limited, base)
    assert limited.write_timeout == 30
    assert with_write_stall_limit(limited, 5).write_timeout == 5  # type: ignore[attr-defined]
    assert http_protocol(make_settings(database_url, tmp_path, STREAM_WRITE_TIMEOUT=0)) is base
    assert Settings.model_fields["STREAM_WRITE_TIMEOUT"].default == 60
    with pytest.raises(ConfigError, match="STREAM_WRITE_TIMEOUT"):
        make_settings(database_url, tmp_path, STREAM_WRITE_TIMEOUT=-1)
