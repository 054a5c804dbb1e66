"""Progress callbacks: the fake n8n posts to the signed `metadata.callback_url` of a live server.

Steps become SSE events and `metadata.steps`, text appends in order, the first terminal wins, callback mode
outlives a cut webhook, every signature attack and bad body is refused without changing anything, and a
callback reaching another instance is relayed to the generation's owner.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import callbacks, eventlog
from app.config import Settings
from app.db import Database
from app.errors import ServiceUnavailable
from app.eventlog import RELAY_WAIT
from app.generations import GenerationRegistry
from app.models import UsageRecord
from app.services.api_keys import create_key
from app.upstream import StreamStats
from tests.conftest import ROOT
from tests.factories import create_agent, create_team, create_user
from tests.live import (
    SSE,
    ChatSetup,
    EventReader,
    LiveServer,
    chat_with_agent,
    data_events,
    fill_pool,
    free_port,
    parse_sse,
    silent_port,
    streamed_text,
)
from tests.test_stop_resume import live_settings
from tests.test_stream_live import _subprocess_env, assistant_of, settled
from tools.fake_n8n import FakeN8n, raw_answer

pytestmark = pytest.mark.slow
WORDS = "alpha beta gamma delta"
ECHO = "Echo: " + WORDS


@asynccontextmanager
async def served(database_url: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[LiveServer]:
    """A live server whose PUBLIC_BASE_URL is its own address, so the fake n8n can post back to it."""
    port = free_port()
    settings = live_settings(database_url, tmp_path, PUBLIC_BASE_URL=f"http://127.0.0.1:{port}", **overrides)
    server = LiveServer(settings, port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def agent_chat(session: AsyncSession, settings: Settings, fake: FakeN8n, query: str, mode: str) -> ChatSetup:
    """A chat whose agent runs the fake's `callbacks` scenario with `query`, in response mode `mode`."""
    url = f"{fake.url}/webhook/agent-stream?scenario=callbacks&{query}"
    setup = await chat_with_agent(session, settings, url)
    setup.agent.response_mode = mode
    await session.commit()
    return setup


def send(client: httpx.AsyncClient, setup: ChatSetup, content: str = WORDS) -> EventReader:
    return EventReader(
        client, "POST", f"/api/chats/{setup.chat.id}/messages", json={"content": content}, headers=setup.headers
    )


def kinds(events: list[SSE]) -> list[str | None]:
    return [e.type for e in events]


def sent_callback_url(fake: FakeN8n) -> str:
    return str(fake.requests[-1]["json"]["metadata"]["callback_url"])


async def callback_url_once_sent(fake: FakeN8n) -> str:
    """The callback URL n8n got, once it got the request (a send's first events come before it)."""
    for _ in range(250):
        if fake.requests:
            break
        await asyncio.sleep(0.02)
    return sent_callback_url(fake)


async def test_callback_mode_relays_steps_text_and_usage_and_stores_them(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    async with served(database_url, tmp_path) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        setup = await agent_chat(session, server.settings, fake, "answer=ack", "callback")
        events = await send(client, setup).finish()
        stored = await assistant_of(app, setup.chat.id)
        # Replayed after the end: 404, and nothing changes.
        replayed = await client.post(sent_callback_url(fake), json={"type": "message", "content": "x"})
    assert replayed.status_code == 404
    assert (await assistant_of(app, setup.chat.id)) == stored
    start = events[0].data["data"]  # type: ignore[index]
    url = sent_callback_url(fake)
    generation = start["assistant_message_id"]
    assert url.startswith(f"{server.url}/api/callbacks/{generation}/")
    assert kinds(events) == ["start", "status", "status", "tool"] + ["message"] * len(ECHO.split()) + ["done"]
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert events[2].data["data"] == {"description": "Searching the knowledge base", "done": False}  # type: ignore[index]
    assert events[3].data["data"] == {"name": "search", "input": {"query": WORDS}, "output": {"hits": 3}}  # type: ignore[index]
    assert streamed_text(events) == ECHO  # the webhook's own answer ("Workflow was started") is not the reply
    assert stored["status"] == "complete"
    assert stored["content"] == ECHO
    done = events[-1].data["data"]["message"]  # type: ignore[index]
    assert (done["id"], done["content"], done["metadata"]) == (stored["id"], ECHO, stored["metadata"])
    assert stored["metadata"]["steps"] == [
        {"type": "status", "description": "Searching the knowledge base"},
        {"type": "tool", "name": "search", "input": {"query": WORDS}, "output": {"hits": 3}},
    ]
    assert stored["metadata"]["response_mode"] == "callback"
    assert {c["status"] for c in fake.callbacks} == {202}
    usage = (await session.execute(select(UsageRecord).where(UsageRecord.chat_id == setup.chat.id))).scalar_one()
    assert (usage.tokens_in, usage.tokens_out) == (12, 7)


async def test_usage_callbacks_that_sum_past_what_the_ledger_holds_are_held_there(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """Each usage callback may report up to 10^9 tokens, and they add up: past the ledger's 32-bit column the
    final write failed, the answer was lost and the chat stayed busy (409). The sum is held at the most the
    column stores."""
    async with served(database_url, tmp_path) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        setup = await agent_chat(session, server.settings, fake, "answer=ack&tokens=1000000000&usages=3", "callback")
        events = await send(client, setup).finish()
        stored = await assistant_of(app, setup.chat.id)
        usage = (await session.execute(select(UsageRecord).where(UsageRecord.chat_id == setup.chat.id))).scalars()
        counted = [(u.tokens_in, u.tokens_out) for u in usage]
        again = await send(client, setup).finish()  # the chat is free again
    assert {c["status"] for c in fake.callbacks} == {202}
    assert kinds(events)[-1] == "done"
    assert (stored["status"], stored["content"]) == ("complete", ECHO)
    assert (stored["metadata"]["tokens_in"], stored["metadata"]["tokens_out"]) == (2**31 - 1, 21)
    assert counted == [(2**31 - 1, 21)]
    assert kinds(again)[-1] == "done"


async def test_callback_mode_outlives_a_cut_webhook(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """The webhook's connection is dropped (a proxy's time limit); the callbacks come later and still stream."""
    async with served(database_url, tmp_path) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        setup = await agent_chat(session, server.settings, fake, "answer=cut&hang=0.05&start_ms=600", "callback")
        events = await send(client, setup).finish()
    assert events[-1].type == "done"
    assert streamed_text(events) == ECHO
    stored = await settled(app, setup.chat.id)
    assert (stored["status"], stored["content"]) == ("complete", ECHO)


async def test_the_first_terminal_wins_and_later_callbacks_are_refused(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    async with served(database_url, tmp_path) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        setup = await agent_chat(
            session, server.settings, fake, "answer=ack&end=both&extra=1&interval_ms=0", "callback"
        )
        events = await send(client, setup).finish()
        async with asyncio.timeout(5):
            await fake.callbacks_posted()
    assert events[-1].type == "done"
    assert [c["status"] for c in fake.callbacks[-3:]] == [202, 404, 404]  # done, then error and late text
    stored = await assistant_of(app, setup.chat.id)
    assert (stored["status"], stored["content"]) == ("complete", ECHO)


async def test_an_error_callback_ends_the_generation_with_its_message(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    async with served(database_url, tmp_path) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        setup = await agent_chat(session, server.settings, fake, "answer=ack&end=error&text=0", "callback")
        events = await send(client, setup).finish()
    assert events[-1].data["data"] == {"message": "The workflow failed in node Search", "code": "upstream_error"}  # type: ignore[index]
    stored = await assistant_of(app, setup.chat.id)
    assert stored["status"] == "error"
    assert len(stored["metadata"]["steps"]) == 2


async def test_a_done_callback_ends_a_stream_mode_generation_whose_webhook_still_runs(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """Stream mode: the webhook's text streams, callbacks add steps, and their `done` ends it (the webhook,
    stalled, would otherwise have failed on the read timeout)."""
    async with served(database_url, tmp_path) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        setup = await agent_chat(session, server.settings, fake, "answer=stall&hang=30&text=0&start_ms=300", "stream")
        events = await send(client, setup).finish()
    assert "tool" in kinds(events)
    assert events[-1].type == "done"
    stored = await assistant_of(app, setup.chat.id)
    assert (stored["status"], stored["content"]) == ("complete", "Echo: alpha")  # the stall's two tokens
    assert [s["type"] for s in stored["metadata"]["steps"]] == ["status", "tool"]


async def test_callback_mode_ends_after_its_silence_timeout(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    async with served(database_url, tmp_path, CALLBACK_SILENCE_TIMEOUT=0.6) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            setup = await agent_chat(session, server.settings, fake, "answer=ack&end=none&text=0", "callback")
            events = await send(client, setup).finish()
    assert kinds(events)[-2:] == ["tool", "error"]
    assert events[-1].data["data"]["code"] == "upstream_timeout"  # type: ignore[index]
    assert (await assistant_of(app, setup.chat.id))["status"] == "error"


async def test_callback_mode_fails_at_once_when_the_workflow_did_not_run_and_waits_after_an_empty_answer(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """A 404 (workflow not active) ends the generation at once; an empty 200 is no reply yet, so the
    generation waits for callbacks (here, none: the silence timeout ends it)."""
    async with served(database_url, tmp_path, CALLBACK_SILENCE_TIMEOUT=1.0) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            outcomes = []
            for scenario in ("notfound_post", "empty"):
                setup = await chat_with_agent(
                    session, server.settings, f"{fake.url}/webhook/agent-stream?scenario={scenario}"
                )
                setup.agent.response_mode = "callback"
                await session.commit()
                started = asyncio.get_running_loop().time()
                events = await send(client, setup).finish()
                outcomes.append((events[-1].data["data"]["code"], asyncio.get_running_loop().time() - started))  # type: ignore[index]
    (missing, missing_s), (empty, empty_s) = outcomes
    assert missing == "upstream_error"
    assert missing_s < 1.0
    assert empty == "upstream_timeout"
    assert empty_s >= 1.0
    assert (await assistant_of(app, setup.chat.id))["status"] == "error"


@pytest.mark.parametrize(
    ("connect_timeout", "first_byte_timeout", "total_timeout"),
    [(0.5, 20.0, 900.0), (20.0, 0.8, 900.0), (20.0, 6.5, 900.0), (20.0, 20.0, 0.8)],
    ids=[
        "connect-deadline-first",
        "first-byte-deadline-first",
        "first-byte-deadline-over-ceil-threshold",
        "total-deadline-first",
    ],
)
async def test_callback_mode_fails_at_once_when_n8n_could_not_be_connected_to(
    app: FastAPI,
    session: AsyncSession,
    database_url: str,
    tmp_path: Path,
    connect_timeout: float,
    first_byte_timeout: float,
    total_timeout: float,
) -> None:
    """A connection to n8n never made within N8N_CONNECT_TIMEOUT (TCP and TLS) sent no request: the workflow
    did not run and will post nothing. Callback mode counted it as a cut webhook (a proxy giving up after the
    workflow started) and waited for callbacks until the silence timeout (10 minutes by default).

    The same when N8N_FIRST_BYTE_TIMEOUT (or N8N_TOTAL_TIMEOUT) is the shorter one: its end while still
    connecting was reported as n8n's silence (or the whole answer's time), and callback mode waited for the
    silence timeout too; the connect deadline is now cut to end first, including past aiohttp's rounding of
    deadlines over 5 s up to a whole second."""
    overrides = {
        "N8N_CONNECT_TIMEOUT": connect_timeout,
        "N8N_FIRST_BYTE_TIMEOUT": first_byte_timeout,
        "N8N_TOTAL_TIMEOUT": total_timeout,
        "CALLBACK_SILENCE_TIMEOUT": 30.0,
    }
    async with served(database_url, tmp_path, **overrides) as server, silent_port() as port:
        async with httpx.AsyncClient(base_url=server.url, timeout=40) as client:
            setup = await chat_with_agent(session, server.settings, f"https://127.0.0.1:{port}/webhook/x")
            setup.agent.response_mode = "callback"
            await session.commit()
            started = asyncio.get_running_loop().time()
            events = await send(client, setup).finish(within=40)
            elapsed = asyncio.get_running_loop().time() - started
    assert events[-1].type == "error"
    error = events[-1].data["data"]  # type: ignore[index]
    assert error["code"] == "upstream_timeout"
    assert error["message"] == "The agent could not be reached in time"
    shortest = min(connect_timeout, first_byte_timeout, total_timeout)
    assert elapsed < shortest + 3
    assert (await assistant_of(app, setup.chat.id))["status"] == "error"


class AnswersOnceThenUnreachable:
    """A port whose first connection is answered with HTTP 500, after which `go_away` fills its listen backlog
    and nothing is ever accepted again: the kernel drops later SYNs, so a connect there never completes (a host
    that went away), over plain HTTP."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.fillers: list[socket.socket] = []
        self.answered = asyncio.get_running_loop().create_task(self._answer_once())

    async def _answer_once(self) -> None:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self.listener)
        with conn:
            received = b""
            while b"\r\n\r\n" not in received:
                received += await loop.sock_recv(conn, 65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += await loop.sock_recv(conn, 65536)
            await loop.sock_sendall(
                conn, b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )

    def go_away(self) -> None:
        for _ in range(2):  # the first fills the accept queue (backlog 0 holds one); the second stays unanswered
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        self.answered.cancel()
        for sock in (*self.fillers, self.listener):
            sock.close()


@pytest.mark.parametrize(
    ("first_byte_timeout", "total_timeout"), [(0.8, 900.0), (20.0, 0.8)], ids=["first-byte", "total"]
)
async def test_callback_mode_fails_at_once_when_the_first_byte_deadline_ends_during_a_warm_up(
    app: FastAPI,
    session: AsyncSession,
    database_url: str,
    tmp_path: Path,
    first_byte_timeout: float,
    total_timeout: float,
) -> None:
    """The second send in a chat whose n8n answered before opens its connection while its statement runs
    (a warm-up) and waits for it within the first byte's deadline. When that deadline (shorter than the connect
    one) ended during the wait, no request had left, yet it was reported as n8n's silence, and callback mode
    waited for callbacks (here the 30 s silence timeout) from a workflow that never ran; the same for the whole
    answer's deadline (reported as the total timeout)."""
    overrides = {
        "N8N_CONNECT_TIMEOUT": 20.0,
        "N8N_FIRST_BYTE_TIMEOUT": first_byte_timeout,
        "N8N_TOTAL_TIMEOUT": total_timeout,
        "CALLBACK_SILENCE_TIMEOUT": 30.0,
    }
    host = AnswersOnceThenUnreachable()
    try:
        async with served(database_url, tmp_path, **overrides) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=40) as client:
                setup = await chat_with_agent(session, server.settings, f"http://127.0.0.1:{host.port}/webhook/x")
                setup.agent.response_mode = "callback"
                await session.commit()
                first = await send(client, setup).finish(within=10)
                assert first[-1].data["data"]["code"] == "upstream_error"  # type: ignore[index]
                await host.answered
                host.go_away()
                started = asyncio.get_running_loop().time()
                events = await send(client, setup).finish(within=10)
                elapsed = asyncio.get_running_loop().time() - started
    finally:
        host.close()
    error = events[-1].data["data"]  # type: ignore[index]
    assert (events[-1].type, error["code"]) == ("error", "upstream_timeout")
    assert error["message"] == "The agent could not be reached in time"
    assert elapsed < 3
    assert (await assistant_of(app, setup.chat.id))["status"] == "error"


@pytest.mark.parametrize("max_steps", [1, 2])
async def test_steps_are_bounded_in_count_and_size(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, max_steps: int
) -> None:
    """Steps past CALLBACK_MAX_STEPS are only counted: neither stored nor sent (the event log stays bounded)."""
    async with served(database_url, tmp_path, CALLBACK_MAX_STEPS=max_steps, CALLBACK_STEP_MAX_CHARS=100) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            setup = await agent_chat(session, server.settings, fake, "answer=ack", "callback")
            events = await send(client, setup, "long " * 60).finish()
    metadata = (await assistant_of(app, setup.chat.id))["metadata"]
    assert events[-1].type == "done"
    assert metadata["steps"][0] == {"type": "status", "description": "Searching the knowledge base"}
    assert len(metadata["steps"]) == max_steps
    tools = [e.data for e in events if e.type == "tool"]
    if max_steps == 1:
        assert tools == []
        assert metadata["steps_dropped"] == 1
        return
    (tool,) = tools
    assert tool is not None
    shortened = tool["data"]["input"]
    assert isinstance(shortened, str)
    assert len(shortened) == 101
    assert shortened.endswith("…")
    assert metadata["steps"][1]["input"] == shortened
    assert "steps_dropped" not in metadata


async def test_text_by_callback_is_bounded_by_the_answer_cap(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """As a streamed answer is: past N8N_MAX_RESPONSE_BYTES the answer fails, keeping the text before it."""
    async with served(database_url, tmp_path, N8N_MAX_RESPONSE_BYTES=1024) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            setup = await agent_chat(session, server.settings, fake, "answer=ack&interval_ms=1", "callback")
            events = await send(client, setup, ("x" * 40 + " ") * 30).finish()
    stored = await assistant_of(app, setup.chat.id)
    assert events[-1].type == "error"
    assert events[-1].data["data"]["code"] == "bad_upstream_response"  # type: ignore[index]
    assert stored["status"] == "error"
    assert 900 < len(stored["content"].encode()) <= 1024
    assert streamed_text(events) == stored["content"]


@pytest.mark.parametrize(
    ("mode", "query"),
    [("callback", "answer=ack&text=0"), ("stream", "answer=cut&hang=30&text=0")],
    ids=["callback mode", "stream mode, webhook silent"],
)
async def test_a_done_callback_with_no_text_at_all_ends_the_answer_as_empty(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, mode: str, query: str
) -> None:
    """`done` before any text, by callback or from the webhook: it was stored as an empty `complete` answer,
    where an empty streamed answer ends with `empty_response`. It ends so now, steps and usage kept."""
    async with (
        served(database_url, tmp_path, N8N_FIRST_BYTE_TIMEOUT=30) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        setup = await agent_chat(session, server.settings, fake, query, mode)
        events = await send(client, setup).finish()
        stored = await assistant_of(app, setup.chat.id)
        again = await send(client, setup).finish()  # the chat is free again
    error = {"message": "The agent returned an empty answer", "code": "empty_response"}
    assert kinds(events)[-2:] == ["tool", "error"]
    assert events[-1].data["data"] == error  # type: ignore[index]
    assert (stored["status"], stored["content"], stored["error"]) == ("error", "", error)
    assert [step["type"] for step in stored["metadata"]["steps"]] == ["status", "tool"]
    assert (stored["metadata"]["tokens_in"], stored["metadata"]["tokens_out"]) == (12, 7)
    assert kinds(again)[-1] == "error"


@pytest.mark.parametrize("first", ["callbacks", "webhook"])
async def test_one_answers_text_is_bounded_by_the_cap_whichever_path_it_came_through(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, first: str
) -> None:
    """Stream mode: the webhook's answer and the `message` callbacks each stayed under N8N_MAX_RESPONSE_BYTES,
    so one answer could hold twice the cap. Their text counts together now: the piece that would pass the cap,
    from either path, ends the answer with `bad_upstream_response`, keeping the text before it."""
    cap = 2600
    text = ("x" * 750 + " ") * 2  # 1,507 bytes of echo from each path; the webhook's whole body < cap
    query = {
        # All the callbacks' text first (no `done`), then the webhook's pieces, 0.4 s apart, pass the cap.
        "callbacks": "answer=stream&delay_ms=400&end=none&interval_ms=1",
        # The webhook's text first (it then stalls), then the callbacks' pass the cap.
        "webhook": "answer=stall&after=3&hang=30&start_ms=800&end=none&interval_ms=1",
    }[first]
    async with served(database_url, tmp_path, N8N_MAX_RESPONSE_BYTES=cap, N8N_FIRST_BYTE_TIMEOUT=30) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            setup = await agent_chat(session, server.settings, fake, query, "stream")
            events = await send(client, setup, text).finish()
    stored = await assistant_of(app, setup.chat.id)
    assert events[-1].data["data"] == {  # type: ignore[index]
        "message": "The agent's answer exceeded the answer size limit",
        "code": "bad_upstream_response",
    }
    assert stored["status"] == "error"
    word = " " + "x" * 750
    assert stored["content"] == "Echo:" + word + word + "Echo:" + word  # the next piece would pass the cap
    assert streamed_text(events) == stored["content"]


async def test_signature_attacks_and_bad_bodies_are_refused_and_change_nothing(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """While a generation waits for callbacks (the fake posts its first only after 3 s)."""
    async with served(database_url, tmp_path, CALLBACK_MAX_BODY_BYTES=1024) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            setup = await agent_chat(session, server.settings, fake, "answer=ack&start_ms=3000", "callback")
            reader = send(client, setup)
            await reader.wait_for(lambda r: len(r.data) >= 2)
            url = (await callback_url_once_sent(fake)).removeprefix(server.url)
            prefix, generation, signature = url.rsplit("/", 2)
            other = callbacks.signature(server.settings, str(uuid.uuid4()))
            flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
            good = {"type": "status", "description": "forged"}
            attacks = {
                "forged": f"{prefix}/{generation}/{'x' * len(signature)}",
                "altered": f"{prefix}/{generation}/{flipped}",
                "other generation's": f"{prefix}/{generation}/{other}",
                "truncated": f"{prefix}/{generation}/{signature[:-1]}",
                "not an id": f"{prefix}/{generation.upper()}/{signature}",
                "no signature": f"{prefix}/{generation}",
            }
            answers = {name: (await client.post(path, json=good)).status_code for name, path in attacks.items()}
            bodies: list[Any] = [
                {"type": "unknown"},
                {"type": "status"},
                {"type": "status", "description": "x", "extra": 1},
                {"type": "tool", "input": {}},
                {"type": "usage", "input_tokens": -1, "output_tokens": 1},
                {"type": "usage", "input_tokens": 1.5, "output_tokens": 1},
                {"type": "message", "content": ""},
                {"type": "message", "content": "nul\u0000"},
                {"type": "error"},
                ["not", "an", "object"],
            ]
            invalid = [(await client.post(url, json=body)).status_code for body in bodies]
            not_json = await client.post(url, content=b"{", headers={"Content-Type": "application/json"})
            too_large = await client.post(url, json={"type": "message", "content": "x" * 2000})
            await asyncio.sleep(0.2)
            seen = list(reader.data)
            accepted = await client.post(url, json={"type": "status", "description": "real"})
            await reader.wait_for(lambda r: len(r.data) > len(seen))
            events = await reader.finish()
    assert answers == dict.fromkeys(attacks, 404)
    assert set(invalid) == {422}
    assert not_json.status_code in (400, 422)
    assert too_large.status_code == 413
    assert kinds(seen) == ["start", "status"]  # nothing above reached the stream
    assert accepted.status_code == 202
    assert accepted.json() == {"accepted": True}
    assert events[2].data["data"]["description"] == "real"  # type: ignore[index]
    assert events[-1].type == "done"
    stored = await assistant_of(app, setup.chat.id)
    assert "forged" not in str(stored["metadata"]["steps"])


async def test_a_stop_ends_a_callback_mode_generation_and_its_url(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    async with served(database_url, tmp_path) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        setup = await agent_chat(session, server.settings, fake, "answer=ack&start_ms=2000", "callback")
        reader = send(client, setup)
        await reader.wait_for(lambda r: len(r.data) >= 2)
        url = await callback_url_once_sent(fake)
        step = await client.post(url, json={"type": "tool", "name": "lookup"})
        stopped = await client.post(f"/api/chats/{setup.chat.id}/stop", headers=setup.headers)
        events = await reader.finish()
        after = await client.post(url, json={"type": "message", "content": "too late"})
    assert step.status_code == 202
    assert stopped.status_code == 200
    assert stopped.json()["status"] == "cancelled"
    assert stopped.json()["metadata"]["steps"] == [{"type": "tool", "name": "lookup"}]
    assert kinds(events)[-2:] == ["tool", "done"]
    assert after.status_code == 404
    assert (await assistant_of(app, setup.chat.id))["content"] == ""


async def test_without_public_base_url_there_is_no_callback_url(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    settings = live_settings(database_url, tmp_path)
    server = LiveServer(settings)
    await server.start()
    try:
        setup = await chat_with_agent(session, settings, f"{fake.url}/webhook/agent-stream")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            events = await send(client, setup).finish()
    finally:
        await server.stop()
    assert events[-1].type == "done"
    assert "callback_url" not in fake.requests[-1]["json"]["metadata"]


async def test_a_callback_mode_agent_on_a_server_without_public_base_url_fails_without_calling_n8n(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n
) -> None:
    """An agent saved in callback mode while PUBLIC_BASE_URL was set, answered by a server without it (the
    setting removed, or one instance of several without it): its workflow could never post the answer. It ran
    as a stream agent instead, and the webhook's immediate acknowledgement was stored as the complete answer."""
    assert settings.PUBLIC_BASE_URL is None
    setup = await chat_with_agent(session, settings, raw_answer(fake.url, b'{"message": "Workflow was started"}'))
    setup.agent.response_mode = "callback"
    await session.commit()
    response = await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": WORDS}, headers=setup.headers)
    events = data_events(parse_sse(response.text))
    assert events[-1].type == "error"
    assert events[-1].data["data"]["code"] == "agent_misconfigured"  # type: ignore[index]
    assert fake.requests == []
    stored = await assistant_of(app, setup.chat.id)
    assert (stored["status"], stored["content"]) == ("error", "")


# --- several instances ------------------------------------------------------------------------------


@asynccontextmanager
async def instance(settings: Settings, port: int, **env: str) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """`uvicorn main:create_app` as its own process on `port`, sharing the database and Redis: its URL, and
    the process."""
    command = ["-m", "uvicorn", "--factory", "main:create_app", "--port", str(port), "--no-access-log"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *command, cwd=ROOT, env={**_subprocess_env(settings), **env}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client, asyncio.timeout(20):
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        yield url, process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)  # a test may have paused it
        process.terminate()
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def test_a_callback_reaching_another_instance_is_relayed_to_the_owner(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, redis_url: str
) -> None:
    """A runs the generation but tells n8n B's address (a load balancer would pick either): every callback
    lands on B, which relays it through Redis; A streams and stores it."""
    settings = live_settings(database_url, tmp_path)
    port_a, port_b = free_port(), free_port()
    common = {"REDIS_URL": redis_url, "STREAM_PING_INTERVAL": "0.2"}
    async with (
        instance(settings, port_b, **common, PUBLIC_BASE_URL=f"http://127.0.0.1:{port_b}") as (url_b, _b),
        instance(settings, port_a, **common, PUBLIC_BASE_URL=url_b) as (url_a, _a),
    ):
        setup = await agent_chat(session, settings, fake, "answer=cut&hang=0.05", "callback")
        async with httpx.AsyncClient(base_url=url_a, timeout=10) as a:
            events = await send(a, setup).finish(within=15)
    assert sent_callback_url(fake).startswith(f"{url_b}/api/callbacks/")
    assert {c["status"] for c in fake.callbacks} == {202}
    assert "tool" in kinds(events)
    assert events[-1].type == "done"
    assert streamed_text(events) == ECHO
    stored = await assistant_of(app, setup.chat.id)
    assert (stored["status"], stored["content"]) == ("complete", ECHO)
    assert len(stored["metadata"]["steps"]) == 2


async def test_a_completions_callbacks_reaching_another_instance_are_relayed_to_it(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, redis_url: str
) -> None:
    """A `/v1` completion has no stored row that says where it runs: while it takes callbacks a Redis key
    says it runs somewhere, so B relays what it receives to A, which answers; afterwards B's answer is 404."""
    settings = live_settings(database_url, tmp_path)
    port_a, port_b = free_port(), free_port()
    common = {"REDIS_URL": redis_url, "STREAM_PING_INTERVAL": "0.2"}
    team = await create_team(session)
    user = await create_user(session, team=team)
    url = f"{fake.url}/webhook/agent-stream?scenario=callbacks&answer=cut&hang=0.05"
    await create_agent(session, team=team, slug="slow", webhook_url=url, response_mode="callback")
    _row, key = await create_key(session=session, settings=settings, user=user, name="k", expires_at=None)
    async with (
        instance(settings, port_b, **common, PUBLIC_BASE_URL=f"http://127.0.0.1:{port_b}") as (url_b, _b),
        instance(settings, port_a, **common, PUBLIC_BASE_URL=url_b) as (url_a, _a),
    ):
        client = openai.AsyncOpenAI(base_url=f"{url_a}/v1", api_key=key, max_retries=0, timeout=20)
        answer = await client.chat.completions.create(model="slow", messages=[{"role": "user", "content": WORDS}])
        await client.close()
        async with httpx.AsyncClient(timeout=10) as http:
            late = await http.post(sent_callback_url(fake), json={"type": "done"})
    assert sent_callback_url(fake).startswith(f"{url_b}/api/callbacks/")
    assert {c["status"] for c in fake.callbacks} == {202}
    assert answer.choices[0].message.content == ECHO
    assert late.status_code == 404


class _SilentStreamer:
    """An n8n that never answers (the completion waits for callbacks)."""

    async def run(self, **_kw: Any) -> None:
        await asyncio.sleep(3600)


async def test_a_completion_cancelled_while_redis_answers_leaves_no_inbox_behind(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that leaves (or the shutdown) while the completion tells Redis it takes callbacks: its inbox
    was left registered for good, holding its payload, and callbacks to its URL were still accepted."""
    db = Database(settings)
    registry = GenerationRegistry(settings=settings, db=db, streamer=_SilentStreamer(), redis=Redis.from_url(redis_url))  # type: ignore[arg-type]
    assert registry.shared is not None
    answering = asyncio.Event()

    async def slow_mark(_callback_id: str, _seconds: float) -> bool:  # Redis slow to answer (a failover)
        answering.set()
        await asyncio.sleep(3600)
        return True

    monkeypatch.setattr(registry.shared, "mark_callback_target", slow_mark)
    callback_id = str(uuid.uuid4())
    task = asyncio.create_task(
        registry.call_completion(
            callback_id,
            callback_mode=True,
            url="http://127.0.0.1:9/webhook/x",
            headers={},
            payload={},
            on_chunks=lambda _chunks: None,
            stats=StreamStats(),
        )
    )
    try:
        await answering.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert callback_id not in registry.completion_inboxes
        assert not registry.deliver(callback_id, {"type": "message", "content": "late"})
    finally:
        await registry.shared.redis.aclose()
        await db.engine.dispose()


async def test_a_callback_to_relay_while_redis_is_down_is_a_503(settings: Settings) -> None:
    """Neither a running chat answer nor a completion elsewhere can be reached without Redis: 503, which n8n's
    Retry On Fail retries (a completion's was a 404, final)."""
    db = Database(settings)
    down = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    registry = GenerationRegistry(settings=settings, db=db, streamer=_SilentStreamer(), redis=down)  # type: ignore[arg-type]
    try:
        with pytest.raises(ServiceUnavailable):
            await registry.callback(str(uuid.uuid4()), {"type": "message", "content": "hi"})
    finally:
        await down.aclose()
        await db.engine.dispose()


def test_the_documented_example_workflow_posts_to_the_callback_url() -> None:
    """docs/n8n-callback-workflow.json: a Webhook answering at once, then HTTP Request nodes in one chain
    posting to `metadata.callback_url`, ending with `done`."""
    workflow = json.loads((ROOT / "docs" / "n8n-callback-workflow.json").read_text())
    nodes = {node["name"]: node for node in workflow["nodes"]}
    assert nodes["Webhook"]["parameters"]["responseMode"] == "onReceived"
    posts = [n for n in workflow["nodes"] if n["type"] == "n8n-nodes-base.httpRequest"]
    assert posts
    for node in posts:
        assert node["parameters"]["method"] == "POST"
        assert "metadata.callback_url" in node["parameters"]["url"]
    chain, name = [], "Webhook"
    while name in workflow["connections"]:
        name = workflow["connections"][name]["main"][0][0]["node"]
        chain.append(name)
    assert len(chain) == len(nodes) - 1
    assert 'type: "done"' in nodes[chain[-1]]["parameters"]["jsonBody"]


async def test_a_callback_body_with_an_unknown_type_is_a_422_that_does_not_quote_it(client: httpx.AsyncClient) -> None:
    """The body is judged before the signature, by anyone: its 422 names the expected types, not the one sent
    (pydantic's own message for a discriminated union quotes the tag it found)."""
    url = f"/api/callbacks/{uuid.uuid4()}/{'x' * 43}"
    answer = await client.post(url, json={"type": "hunter2-SECRET", "description": "x"})
    assert answer.status_code == 422
    assert "hunter2" not in answer.text
    (error,) = answer.json()["detail"]
    assert error["type"] == "union_tag_invalid"
    assert "'status'" in error["msg"]  # the expected tags are the schema's


@pytest.mark.parametrize("paused", [1.0, RELAY_WAIT + 1.0], ids=["briefly", "past the relay's wait"])
async def test_a_relayed_callback_is_answered_once_its_owner_applied_it(
    app: FastAPI, session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n, redis_url: str, paused: float
) -> None:
    """n8n posts one callback after the other, each once the previous one was answered, and a load balancer
    may send them to different instances: a `message` relayed by B, then `done` straight to A, the owner. B
    answered 202 as soon as Redis took the message, before A applied it (here A is paused meanwhile), so the
    `done` could be applied first and the answer end without that text; and a message A's subscription missed
    was lost unseen. B answers once A applied it now; when A does not within RELAY_WAIT, a 503 (n8n's Retry On
    Fail sends it again), and A, resumed, does not apply it late: the retry's text is there once."""
    settings = live_settings(database_url, tmp_path)
    port_a, port_b = free_port(), free_port()
    # Heartbeats far apart: paused for seconds, A is not taken for dead (its answer marked interrupted).
    common = {"REDIS_URL": redis_url, "STREAM_PING_INTERVAL": "0.2", "WORKER_HEARTBEAT_INTERVAL": "5"}
    async with (
        instance(settings, port_b, **common, PUBLIC_BASE_URL=f"http://127.0.0.1:{port_b}") as (url_b, _b),
        instance(settings, port_a, **common, PUBLIC_BASE_URL=f"http://127.0.0.1:{port_a}") as (url_a, process_a),
    ):
        setup = await chat_with_agent(session, settings, raw_answer(fake.url, b'{"message": "Workflow was started"}'))
        setup.agent.response_mode = "callback"
        await session.commit()
        loop = asyncio.get_running_loop()
        message = {"type": "message", "content": "text"}
        async with httpx.AsyncClient(base_url=url_a, timeout=10) as a, httpx.AsyncClient(timeout=10) as http:
            reader = send(a, setup)
            await reader.wait_for(lambda r: len(r.data) >= 2)
            path = (await callback_url_once_sent(fake)).removeprefix(url_a)
            process_a.send_signal(signal.SIGSTOP)
            try:
                relayed = asyncio.create_task(http.post(url_b + path, json=message))
                await asyncio.sleep(min(paused, 1.0))
                answered_early = relayed.done()
                await asyncio.sleep(paused - min(paused, 1.0))
            finally:
                resumed_at = loop.time()
                process_a.send_signal(signal.SIGCONT)
            answer = await relayed
            answered_at = loop.time()
            retried = None
            if answer.status_code == 503:
                await asyncio.sleep(0.5)  # A, resumed, has read the relayed message by now
                retried = (await http.post(url_b + path, json=message)).status_code
            done = await http.post(url_a + path, json={"type": "done"})
            events = await reader.finish()
    assert not answered_early
    if paused < RELAY_WAIT:
        assert (answer.status_code, answered_at > resumed_at, retried) == (202, True, None)
    else:
        assert (answer.status_code, answer.headers.get("Retry-After"), retried) == (503, "5", 202)
    assert done.status_code == 202
    assert (events[-1].type, streamed_text(events)) == ("done", "text")
    stored = await assistant_of(app, setup.chat.id)
    assert (stored["status"], stored["content"]) == ("complete", "text")


async def test_callbacks_waiting_for_their_owner_leave_the_instances_redis_connections_to_the_rest(
    settings: Settings, redis_url: str
) -> None:
    """A relayed callback waits for its owner's reply on one of the Redis client's connections (100, shared
    with the rate limits, the event logs, stops and follows). When no owner answers (it died with its answers
    still running, and their workflows keep posting), 100 callbacks waiting took every one, and all other
    Redis work of this instance failed at once ("Too many connections"), its rate limits falling back to
    per-process counts. Only a quarter of them wait now; past that a callback is a 503 at once."""
    client = eventlog.connect(settings.model_copy(update={"REDIS_URL": redis_url}))
    assert client is not None
    db = Database(settings)
    registry = GenerationRegistry(settings=settings, db=db, streamer=_SilentStreamer(), redis=client)  # type: ignore[arg-type]
    assert registry.shared is not None
    ids = [str(uuid.uuid4()) for _ in range(100)]
    for callback_id in ids:  # `/v1` completions said to run elsewhere, on an instance that is gone
        assert await registry.shared.mark_callback_target(callback_id, 60)
    await fill_pool(client)
    relays = [asyncio.create_task(registry.callback(i, {"type": "message", "content": "x"})) for i in ids]
    try:
        refused, _waiting = await asyncio.wait(relays, timeout=RELAY_WAIT / 2)  # before any wait ends
        assert await client.ping()  # this instance's other Redis work goes on
        assert len(refused) >= 50  # at once, not waiting
        outcomes = await asyncio.gather(*relays, return_exceptions=True)
        assert all(isinstance(outcome, ServiceUnavailable) for outcome in outcomes)
    finally:
        for relay in relays:
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await client.aclose()
        await db.engine.dispose()
