"""n8n's Chat Trigger protocol as its chat widget (@n8n/chat) reads it: a generation's events as the trigger's
NDJSON lines, its last-node `{output}` body, and stored messages as the LangChain-serialized history.

Byte shapes follow the recordings (recordings/n8n/chat_*): compact JSON, n8n's key order, one object per
line ending in `\\n`, `Content-Type: application/json; charset=utf-8` for every answer, NDJSON included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from app.sse import SSE_HEADERS, TERMINAL, Generation, event_of, line_safe

#: What a Chat Trigger answers with, streamed or not.
CONTENT_TYPE = "application/json; charset=utf-8"
#: The streamed answer's headers are the SSE streams' (app.sse.SSE_HEADERS), not n8n's bare `no-cache`: its
#: `application/json` is what every compressing proxy gzips by default (Node's `compression`, nginx's
#: `gzip_types`), which would hold the lines back until its buffer fills; `no-transform` leaves it alone.
STREAM_HEADERS = SSE_HEADERS
#: `Accept` media types that ask for the streamed answer: the widget sends `text/plain` when its
#: `enableStreaming` option is on (and nothing particular otherwise); `application/x-ndjson` says it plainly.
STREAM_MEDIA_TYPES = frozenset({"text/plain", "application/x-ndjson"})
UPSTREAM_FAILED = "The agent could not answer"
#: The streamed answer's keep-alive while nothing else goes out: an empty line, which the widget's reader skips.
KEEPALIVE = b"\n"


def wants_stream(accept: str | None) -> bool:
    """Whether the request asks for NDJSON: its `Accept` names one of STREAM_MEDIA_TYPES, other than with
    `q=0` (RFC 9110: "not acceptable")."""
    if not accept:
        return False
    return any(
        media.strip().lower() in STREAM_MEDIA_TYPES and not _refused(params)
        for media, _, params in (part.partition(";") for part in accept.split(","))
    )


def _refused(params: str) -> bool:
    """Whether a media range's parameters hold `q=0` (0, 0.0, 0.000); an unreadable weight counts as 1."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip()) == 0
            except ValueError:
                return False
    return False


def dumps(value: Any) -> bytes:
    """JSON as n8n writes it (JSON.stringify): compact, UTF-8, keys in the order given; NEL, U+2028 and U+2029
    escaped (JSON.stringify leaves them raw, and a Python reader's `splitlines` would cut the line there)."""
    return line_safe(json.dumps(value, ensure_ascii=False, separators=(",", ":"))).encode()


def _line(kind: str, data: Any, node_id: str, node_name: str) -> bytes | None:
    """One stream event as the trigger's line: `start` begins, each `message` is an item, `done` ends, and an
    `error` is the trigger's in-band error (no `end` follows, as in chat_stream_llm_error.txt)."""
    if kind == "error":
        meta = {"nodeId": node_id, "nodeName": node_name, "runIndex": 0, "itemIndex": 0}
        return dumps({"type": "error", "content": data.get("message") or UPSTREAM_FAILED, "metadata": meta}) + b"\n"
    line: dict[str, Any]
    if kind == "start":
        line = {"type": "begin"}
    elif kind == "message":
        line = {"type": "item", "content": data["content"]}
    elif kind == "done":
        line = {"type": "end"}
    else:  # status and tool steps have no place in the trigger's protocol
        return None
    line["metadata"] = {
        "nodeId": node_id,
        "nodeName": node_name,
        "itemIndex": 0,
        "runIndex": 0,
        "timestamp": int(time.time() * 1000),
    }
    return dumps(line) + b"\n"


async def ndjson(generation: Generation, node_name: str, ping_interval: float) -> AsyncIterator[bytes]:
    """The generation's events from the first, live, as NDJSON up to its terminal event (lines available
    together go out in one write). `nodeId` is the assistant message's id, so each answer is its own bubble.

    After `ping_interval` seconds without a write (an agent thinking, a callback-mode workflow between two
    callbacks) an empty line goes out (KEEPALIVE), so a proxy's idle timeout does not cut the answer. n8n sends
    none, but the widget skips blank lines before parsing (@n8n/chat's `createLineParser`: `if (line.trim())`),
    as NDJSON allows readers to. Timer as in Generation.sse: one per quiet interval, not one per wait.
    """
    loop = asyncio.get_running_loop()
    node_id = generation.new.assistant_id
    frames = generation.frames
    index = 0
    timer: asyncio.TimerHandle | None = None

    def wake() -> None:
        nonlocal timer
        timer = None
        generation.wake()

    ping_at = loop.time() + ping_interval
    try:
        while True:
            available = len(frames)
            if index < available:
                lines = [_line(*event_of(encoded), node_id, node_name) for encoded in frames[index:available]]
                index = available
                out = b"".join(line for line in lines if line is not None)
                if out:
                    yield out
                    ping_at = loop.time() + ping_interval
                continue  # new events may have arrived while the write was awaited
            if generation.terminal is not None:
                return
            # (A ping 1 ms early counts: a timer may fire within the loop's clock resolution of its deadline.)
            if loop.time() + 0.001 >= ping_at:
                yield KEEPALIVE
                ping_at = loop.time() + ping_interval
                continue
            if timer is None:
                timer = loop.call_at(ping_at, wake)
            await generation.next_change()
    finally:
        if timer is not None:
            timer.cancel()


async def last_node_answer(generation: Generation) -> tuple[int, bytes, dict[str, str]]:
    """The last-node answer once the generation ended (status, body, headers): 200 `{"output": text}`, or for a
    failure n8n's own error body `{"message": ...}` with 502 (504 for a timeout; n8n itself says 500). When n8n
    refused with 429 or 503 and a usable Retry-After, that status with that `Retry-After`: nothing ran, and the
    page may send again once the wait is over."""
    await generation.ended()
    kind, data = event_of(generation.frames[-1])
    if kind == "done":
        return 200, dumps({"output": data["message"]["content"]}), {}
    if kind not in TERMINAL:
        return 502, dumps({"message": UPSTREAM_FAILED}), {}
    body = dumps({"message": data["message"]})
    if generation.refused_with is not None and data.get("retry_after") is not None:
        return generation.refused_with, body, {"Retry-After": str(data["retry_after"])}
    return (504 if data.get("code") == "upstream_timeout" else 502), body, {}


def _langchain(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "user":
        kwargs: dict[str, Any] = {"content": message["content"], "additional_kwargs": {}, "response_metadata": {}}
        return {"lc": 1, "type": "constructor", "id": ["langchain_core", "messages", "HumanMessage"], "kwargs": kwargs}
    kwargs = {
        "content": message["content"],
        "tool_calls": [],
        "invalid_tool_calls": [],
        "additional_kwargs": {},
        "response_metadata": {},
    }
    return {"lc": 1, "type": "constructor", "id": ["langchain_core", "messages", "AIMessage"], "kwargs": kwargs}


def history(messages: list[dict[str, Any]]) -> bytes:
    """`{"data": [...]}` as loadPreviousSession answers: the branch's questions, and its answers that have
    text and are not still streaming (a failed answer's partial text included)."""
    shown = [
        m
        for m in messages
        if m["role"] == "user" or (m["role"] == "assistant" and m["status"] != "streaming" and m["content"])
    ]
    return dumps({"data": [_langchain(m) for m in shown]})
