"""A fake n8n: a real aiohttp server that replays the captured n8n answers and injects faults on demand.

Run it with `make fake-n8n` or `python -m tools.fake_n8n --port 5678`. Every request is answered according
to a *scenario*, chosen per request by the `X-Fake-Scenario` header or the `?scenario=` query parameter, else
by the path:

| path | default scenario |
|---|---|
| `POST /webhook/agent-stream` | `echo`: NDJSON like `stream_ok` echoing `chatInput` (`__llm_error__` fails in-band, |
|   | `[delay=N]` paces tokens N ms apart) |
| `POST /webhook/agent-stream-off` | capture `stream_agent_streaming_off` (200, empty body) |
| `POST /webhook/agent-json`, `/webhook/agent-json-respond` | `echo_json`: `{"output": "Echo: ..."}` |
|   | (`__llm_error__` gives the error capture) |
| `POST /webhook/error-stream` / `/webhook/error-json` | captures `stream_code_error` / `json_code_error` |
| `POST /webhook/agent-header-auth` | `header_auth`: Header Auth (`X-N8N-Auth: fake-header-secret`), then `echo` |
| `POST /webhook/agent-basic-auth` | `basic_auth`: Basic Auth (`n8n` / `fake-basic-secret`), then `echo` |
| `POST /webhook/agent-get-only` | `wrong_method_post`: a webhook registered for GET only |
| `POST /webhook/<id>/chat` | the Chat Trigger captures (`sendMessage` echoes, `loadPreviousSession`) |
| `POST /webhook-test/...` | capture `test_url_not_listening` |
| `GET /webhook/...` | capture `wrong_method_get` |
| anything else | capture `notfound_post` (404 "not registered") |

Scenarios: the stem of any recording in recordings/n8n (`stream_ok`, `json_ok`, `notfound_post`, ...)
replays it faithfully (status, headers, body, one HTTP chunk per line with the recorded pacing scaled by
`speed`, gzip per line when the request accepts it, and the keep-alive linger after the last chunk); and the
synthetic ones in `SCENARIOS` below. Query parameters tune them: `delay_ms` (per token), `chunks` and
`interval_ms` (paced), `size` (oversized line, paced tokens), `after` (tokens before a fault), `hang` (seconds),
`status`.
`callbacks` posts to the request's `metadata.callback_url` like an HTTP Request node; `FakeN8n.callbacks`
records each post and the status it got.

`fetch_files` downloads every `files[].url` of the JSON body like an HTTP Request node would (`FakeN8n.fetched`).
A multipart request (an agent's `file_delivery: "multipart"`) is read as n8n's Chat Trigger reads it: `form`
holds its text fields (and `chatInput` drives the scenario), `parts` every part (file bytes in `data`).

`GET /__requests` lists what was received (method, path, query, headers, json body, and `client_closed`:
whether the client closed the connection before the answer ended); `DELETE /__requests`
forgets it. Tests running the server in-process read `FakeN8n.requests` directly.

Without its recordings the fake is useless (every capture scenario would answer 400), so it refuses to
start, and `load_captures` raises, when the folder is missing or holds none.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import BasicAuth, web

#: Shipped with the repository (recordings/n8n/README.md), so a plain clone can run the fake.
CAPTURES_DIR = Path(__file__).resolve().parents[1] / "recordings" / "n8n"
#: The streamed answer of a request, so a client disconnect can be answered quietly.
RESPONSE_KEY = web.RequestKey("fake_response", web.StreamResponse)
NODE_ID = "f2152913-e824-5ebc-90ca-6750e2bdc080"
#: The credentials of the auth scenarios: a Header Auth credential and a Basic Auth credential.
HEADER_AUTH = ("X-N8N-Auth", "fake-header-secret")
BASIC_AUTH = ("n8n", "fake-basic-secret")
#: Headers aiohttp writes itself; replaying them verbatim would duplicate or contradict its framing.
HOP_HEADERS = {"transfer-encoding", "content-length", "date", "connection", "keep-alive", "content-encoding"}
SCENARIOS = {
    "echo": "n8n NDJSON echoing chatInput word by word (begin, items, end)",
    "echo_json": '{"output": "Echo: ..."} with Content-Length',
    "json_text": '{"text": "Echo: ..."}',
    "json_message": '{"message": "Echo: ..."}',
    "json_content": '{"content": "Echo: ..."}',
    "json_array": '[{"output": "Echo: ..."}]',
    "set_cookie": '{"output": "Echo: ..."} with `Set-Cookie: cookie` (default n8n-session=fake-cookie), as a Respond '
    "to Webhook node (or a proxy in front of n8n) may set",
    "plain": "text/plain body 'Echo: ...'",
    "charset": "'Echo: ...' encoded in and declared as `charset` (default latin-1); text/plain, or `type=json`",
    "sse_openai": "text/event-stream, OpenAI chat.completion.chunk deltas, then data: [DONE]",
    "sse_n8n": 'text/event-stream whose data lines are n8n objects ({"type":"item",...})',
    "multi_block": "two begin..end blocks (runIndex 0 and 1) and an item with content null",
    "fragmented": "the echo NDJSON with CRLF, re-cut into 7-byte chunks (lines and UTF-8 characters split)",
    "batched": "the whole echo NDJSON in one chunk (many lines per read)",
    "empty": "200 with an empty chunked body",
    "hang_headers": "never sends headers (hang seconds, default 3600)",
    "stall": "sends `after` tokens (default 2), then nothing for `hang` seconds",
    "reset": "sends `after` tokens (default 2), then aborts the TCP connection mid-body",
    "malformed": "sends `after` tokens (default 2), then a line that is not JSON, then end",
    "oversized": "sends `after` tokens (default 2), then one line of `size` bytes (default 2 MiB)",
    "slow": "echo with `delay_ms` (default 200) between tokens",
    "paced": "`chunks` tokens (default 100) every `interval_ms` (default 10), for benchmarks; `size` pads each "
    "token to that many characters (`paced_text` is the answer)",
    "status": 'answers HTTP `status` (default 500) with {"message": "Error in workflow"} (`hang`: that many '
    "seconds after the headers; `retry_after`: a Retry-After header with that value, as n8n's or a proxy's "
    "rate limiting sends it)",
    "in_band_error": 'begin, `after` tokens (default 2), then {"type":"error"}',
    "nul": "items and an in-band error containing U+0000 and a lone surrogate escape",
    "header_auth": "n8n's Header Auth: 403 `Authorization data is wrong!` unless HEADER_AUTH is sent, then echo",
    "basic_auth": "n8n's Basic Auth: 401 `Authorization is required!` without credentials, 403 when wrong, then echo",
    "wrong_method_post": "404 of a webhook registered for GET only (wrong_method_get with the methods swapped)",
    "html": "a proxy's HTML error page with status 200 (text/html)",
    "echo_usage": "echo, with `usage` {input_tokens, output_tokens} in the `end` item's metadata",
    "json_usage": '{"output": "Echo: ...", "usage": {"prompt_tokens", "completion_tokens"}}',
    "echo_header": "n8n NDJSON echoing the request's `header` (default X-N8N-Auth), `size` characters (default 10) "
    "per item; `cut` stops the answer after that many characters of the value",
    "callbacks": "POSTs progress callbacks to metadata.callback_url (see `_s_callbacks`); `answer` says what the "
    "webhook itself does",
    "raw": "answers `body` (zlib-compressed, then base64url: `raw_answer` builds the URL) byte for byte as `type` "
    "(default application/json), one HTTP chunk per line, with HTTP `status` (default 200)",
}


def raw_answer(
    base_url: str, body: bytes, content_type: str = "application/json; charset=utf-8", status: int = 200
) -> str:
    """The URL of a webhook of the fake at `base_url` answering `body` byte for byte (the `raw` scenario)."""
    encoded = base64.urlsafe_b64encode(zlib.compress(body)).decode().rstrip("=")  # short even for big bodies
    query = urlencode({"scenario": "raw", "body": encoded, "type": content_type, "status": status})
    return f"{base_url}/webhook/raw?{query}"


class RecordingsMissing(RuntimeError):
    """The recordings folder is missing or holds no HTTP answer: a fake serving nothing would hide it."""


@dataclass
class Capture:
    """One recorded answer: status line, headers, body pieces (one per HTTP chunk) and their delays."""

    name: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    chunked: bool
    pieces: list[bytes]
    delays: list[float] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


def _split_head(raw: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, code, reason = ([*lines[0].split(" ", 2), ""])[:3]
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line)]
    return int(code), reason, headers, body


def _dechunk(body: bytes) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(body):
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            break
        pieces.append(body[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2
    return pieces


def _read_delays(path: Path) -> list[float]:
    """Seconds between the headers and each following read in a `.reads.txt` file."""
    stamps = [float(m.group(1)) for m in re.finditer(r"^\+\s+([\d.]+)ms\s+\d+B", path.read_text(), re.M)]
    return [(b - a) / 1000 for a, b in itertools.pairwise(stamps)]


def load_captures(directory: Path = CAPTURES_DIR) -> dict[str, Capture]:
    """Every HTTP answer in the recordings folder, keyed by file stem (`stream_ok`, `json_ok`, ...).

    Raises RecordingsMissing rather than returning nothing, so no caller can run on zero recordings.
    """
    if not directory.is_dir():
        raise RecordingsMissing(f"n8n recordings folder not found: {directory}")
    captures: dict[str, Capture] = {}
    stems = {p.name.split(".")[0] for p in directory.glob("*.txt")}
    for stem in sorted(stems):
        wire, plain = directory / f"{stem}.wire.txt", directory / f"{stem}.txt"
        source = wire if wire.exists() else plain
        if not source.exists() or not source.read_bytes().startswith(b"HTTP/"):
            continue
        status, reason, headers, body = _split_head(source.read_bytes())
        chunked = any(k.lower() == "transfer-encoding" and "chunked" in v for k, v in headers)
        if chunked and source is wire:
            pieces = _dechunk(body)
        elif chunked:
            pieces = [line for line in body.splitlines(keepends=True) if line]
        else:
            pieces = [body] if body else []
        reads = directory / f"{stem}.reads.txt"
        delays = _read_delays(reads) if reads.exists() else [0.05] * (len(pieces) + 1)
        captures[stem] = Capture(stem, status, reason, headers, chunked, pieces, delays)
    if not captures:
        raise RecordingsMissing(f"no n8n recordings (*.txt starting with HTTP/) in {directory}")
    return captures


def _meta(run: int = 0, *, timestamp: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"nodeId": NODE_ID, "nodeName": "AI Agent", "itemIndex": 0, "runIndex": run}
    if timestamp:
        meta["timestamp"] = int(time.time() * 1000)
    else:
        meta = {"nodeId": NODE_ID, "nodeName": "AI Agent", "runIndex": run, "itemIndex": 0}
    return meta


def ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def paced_tokens(count: int, size: int = 0) -> list[str]:
    """The `paced` scenario's tokens: ` t0`, ` t1`..., each padded with dots to `size` characters."""
    return [f" t{i}".ljust(size, ".") for i in range(count)]


def paced_text(count: int, size: int = 0) -> str:
    """The whole answer of `scenario=paced&chunks=count&size=size`."""
    return "".join(paced_tokens(count, size))


def echo_tokens(text: str) -> list[str]:
    """`"Echo: " + text` word by word, each token with its leading space, like the captured model."""
    words = text.split()
    return ["Echo:"] + [" " + w for w in words]


#: Node's `server.keepAliveTimeout` default, which n8n keeps: an idle keep-alive connection is closed after it.
NODE_KEEPALIVE_SECONDS = 5.0


class FakeN8n:
    """The server; `requests` records every request received, in order."""

    def __init__(self, *, captures_dir: Path = CAPTURES_DIR, speed: float = 1.0, linger: float = 5.0) -> None:
        self.captures = load_captures(captures_dir)
        self.speed = speed
        self.linger = linger
        self.requests: list[dict[str, Any]] = []
        #: Every callback the `callbacks` scenario posted: `{"body", "status"}` (status None: not delivered).
        self.callbacks: list[dict[str, Any]] = []
        #: Every file URL the `fetch_files` scenario downloaded: `{"url", "status", "headers", "sha256"}`.
        self.fetched: list[dict[str, Any]] = []
        self._posting: set[asyncio.Task[None]] = set()
        self.app = web.Application()
        self.app.router.add_get("/__requests", self._list_requests)
        self.app.router.add_delete("/__requests", self._clear_requests)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start listening (port 0 = a free one); return the base URL."""
        # Idle keep-alive connections close after Node's default 5 s, as n8n's do, whatever the linger: the relay
        # drops its idle ones after 4 s (app.upstream), so it never sends on a socket the server is closing. A
        # shorter server timeout here made sends race the close and fail as `upstream_disconnected`.
        self._runner = web.AppRunner(self.app, keepalive_timeout=NODE_KEEPALIVE_SECONDS, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        for task in list(self._posting):
            task.cancel()
        await asyncio.gather(*self._posting, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def callbacks_posted(self) -> None:
        """Until every callback scenario started so far has posted its whole script."""
        await asyncio.gather(*self._posting, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- recording ----------------------------------------------------------------------------
    async def _list_requests(self, _request: web.Request) -> web.Response:
        # File bytes stay out of the JSON listing (their size and sha256 are there).
        listed = [
            {**r, "parts": [{k: v for k, v in p.items() if k != "data"} for p in r.get("parts", [])]}
            for r in self.requests
        ]
        return web.json_response(listed)

    async def _clear_requests(self, _request: web.Request) -> web.Response:
        self.requests.clear()
        return web.Response(status=204)

    # --- dispatch -----------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body: Any
        form: dict[str, str] | None = None
        parts: list[dict[str, Any]] = []
        if request.content_type == "multipart/form-data":
            # As n8n's Chat Trigger reads its widget's uploads: text fields, and file parts as binaries.
            form, parts = await self._read_form(request)
            body, valid = dict(form), True
        else:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
                valid = True
            except ValueError:
                body, valid = raw.decode("utf-8", "replace"), False
        index = len(self.requests)
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                # Every header line as sent, repeated names included (the dict above keeps one of each).
                "header_lines": [[name, value] for name, value in request.headers.items()],
                "json": None if form is not None else body,
                "form": form,
                "parts": parts,
                "client_closed": False,
            }
        )
        scenario = request.headers.get("X-Fake-Scenario") or request.query.get("scenario") or ""
        chat_input = body.get("chatInput", "") if isinstance(body, dict) else ""
        if not scenario:
            scenario = self._default_scenario(request, body, valid, chat_input)
        try:
            if scenario in self.captures:
                return await self._replay(request, self.captures[scenario])
            handler = getattr(self, f"_s_{scenario}", None)
            if handler is None:
                return web.json_response({"message": f"fake n8n: unknown scenario {scenario!r}"}, status=400)
            response: web.StreamResponse = await handler(request, chat_input if isinstance(chat_input, str) else "")
            return response
        except ConnectionResetError:
            # The client went away mid-answer (that is what several tests do, and what a stop must cause):
            # recorded on the request, so a test can tell that the service closed its request to n8n.
            self.requests[index]["client_closed"] = True
            started: web.StreamResponse | None = request.get(RESPONSE_KEY)
            return started if started is not None else web.Response(status=499)

    @staticmethod
    async def _read_form(request: web.Request) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """A multipart body: its text fields (`form`), and every part in order (`parts`: name, filename,
        content type, size, sha256, and the bytes as `data`)."""
        form: dict[str, str] = {}
        parts: list[dict[str, Any]] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            data = await part.read()
            parts.append(
                {
                    "name": part.name,
                    "filename": part.filename,
                    "content_type": part.headers.get("Content-Type"),
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "data": bytes(data),
                }
            )
            if part.filename is None and part.name is not None:
                form[part.name] = data.decode("utf-8", "replace")
        return form, parts

    def _default_scenario(self, request: web.Request, body: Any, valid: bool, chat_input: Any) -> str:
        path = request.path
        if path.startswith("/webhook-test/"):
            return "test_url_not_listening"
        if request.method != "POST":
            return "wrong_method_get"
        if not valid:
            return "stream_invalid_json_body"
        llm_error = chat_input == "__llm_error__"
        if path.endswith("/chat"):
            action = body.get("action") if isinstance(body, dict) else None
            streaming = "0f0669d7" not in path
            if action == "loadPreviousSession":
                return "chat_stream_load" if streaming else "chat_lastnode_load"
            if isinstance(body, dict) and not body.get("sessionId"):
                return "chat_stream_no_session"
            if llm_error:
                return "chat_stream_llm_error" if streaming else "chat_lastnode_llm_error"
            return "echo" if streaming else "echo_json"
        routes = {
            "/webhook/agent-stream": "stream_llm_error" if llm_error else "echo",
            "/webhook/agent-stream-off": "stream_agent_streaming_off",
            "/webhook/agent-json": "json_llm_error" if llm_error else "echo_json",
            "/webhook/agent-json-respond": "json_respond_node_llm_error" if llm_error else "echo_json",
            "/webhook/error-stream": "stream_code_error",
            "/webhook/error-json": "json_code_error",
            "/webhook/agent-header-auth": "header_auth",
            "/webhook/agent-basic-auth": "basic_auth",
            "/webhook/agent-get-only": "wrong_method_post",
        }
        return routes.get(path, "notfound_post")

    # --- capture replay -----------------------------------------------------------------------
    async def _replay(self, request: web.Request, capture: Capture) -> web.StreamResponse:
        speed = float(request.query.get("speed", self.speed))
        headers = [(k, v) for k, v in capture.headers if k.lower() not in HOP_HEADERS]
        if not capture.chunked:
            body = capture.body
            if capture.name == "notfound_post" and request.path != "/webhook/does-not-exist":
                name = request.path.removeprefix("/webhook/")
                body = body.replace(b"POST does-not-exist", f"{request.method} {name}".encode())
            response = web.Response(status=capture.status, reason=capture.reason, body=body)
            response.headers.popall("Content-Type", None)
            for key, value in headers:
                response.headers.add(key, value)
            return response
        delays = [d / speed if speed > 0 else 0.0 for d in capture.delays]
        return await self._stream(request, capture.status, headers, capture.pieces, delays, reason=capture.reason)

    async def _stream(
        self,
        request: web.Request,
        status: int,
        headers: list[tuple[str, str]],
        pieces: list[bytes],
        delays: list[float] | float,
        *,
        reason: str | None = None,
    ) -> web.StreamResponse:
        """Send `pieces` as separate HTTP chunks (gzip per piece when the client accepts it)."""
        response = web.StreamResponse(status=status, reason=reason)
        for key, value in headers:
            response.headers.add(key, value)
        gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        compressor = zlib.compressobj(wbits=31) if gzip else None
        if compressor is not None:
            response.headers["Content-Encoding"] = "gzip"
        response.enable_chunked_encoding()
        request[RESPONSE_KEY] = response
        await response.prepare(request)
        if compressor is not None:
            await response.write(compressor.compress(b"") + compressor.flush(zlib.Z_SYNC_FLUSH))
        for index, piece in enumerate(pieces):
            delay = delays if isinstance(delays, float) else (delays[index] if index < len(delays) else 0.0)
            if delay > 0:
                await asyncio.sleep(delay)
            data = piece if compressor is None else compressor.compress(piece) + compressor.flush(zlib.Z_SYNC_FLUSH)
            if data:
                await response.write(data)
        if compressor is not None:
            await response.write(compressor.flush(zlib.Z_FINISH))
        await response.write_eof()
        await self._linger(request)
        return response

    async def _linger(self, request: web.Request) -> None:
        """n8n keeps the socket open ~5 s after the terminating chunk, even when asked to close."""
        if request.headers.get("Connection", "").lower() == "close":
            await asyncio.sleep(float(request.query.get("linger", self.linger)))

    # --- synthetic scenarios ------------------------------------------------------------------
    @staticmethod
    def _n8n_headers() -> list[tuple[str, str]]:
        return [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("Vary", "Accept-Encoding"),
        ]

    @staticmethod
    def _q(request: web.Request, name: str, default: float) -> float:
        try:
            return float(request.query.get(name, default))
        except ValueError:
            return default

    def _echo_lines(self, text: str) -> list[bytes]:
        lines = [ndjson({"type": "begin", "metadata": _meta()})]
        lines += [ndjson({"type": "item", "content": t, "metadata": _meta()}) for t in echo_tokens(text)]
        lines.append(ndjson({"type": "end", "metadata": _meta()}))
        return lines

    async def _s_echo(self, request: web.Request, text: str) -> web.StreamResponse:
        match = re.search(r"\[delay=(\d+)\]", text)
        delay = self._q(request, "delay_ms", float(match.group(1)) if match else 5.0) / 1000
        return await self._stream(request, 200, self._n8n_headers(), self._echo_lines(text), delay)

    async def _s_slow(self, request: web.Request, text: str) -> web.StreamResponse:
        delay = self._q(request, "delay_ms", 200) / 1000
        return await self._stream(request, 200, self._n8n_headers(), self._echo_lines(text), delay)

    async def _s_paced(self, request: web.Request, _text: str) -> web.StreamResponse:
        count = int(self._q(request, "chunks", 100))
        delay = self._q(request, "interval_ms", 10) / 1000
        size = int(self._q(request, "size", 0))
        lines = [ndjson({"type": "begin", "metadata": _meta()})]
        lines += [ndjson({"type": "item", "content": t, "metadata": _meta()}) for t in paced_tokens(count, size)]
        lines.append(ndjson({"type": "end", "metadata": _meta()}))
        return await self._stream(request, 200, self._n8n_headers(), lines, delay)

    async def _s_multi_block(self, request: web.Request, text: str) -> web.StreamResponse:
        lines = [ndjson({"type": "begin", "metadata": _meta(0)})]
        lines += [ndjson({"type": "item", "content": t, "metadata": _meta(0)}) for t in echo_tokens(text)]
        lines.append(ndjson({"type": "end", "metadata": _meta(0)}))
        lines.append(ndjson({"type": "begin", "metadata": _meta(1)}))
        lines.append(ndjson({"type": "item", "content": None, "metadata": _meta(1)}))
        lines.append(ndjson({"type": "item", "content": " (again)", "metadata": _meta(1)}))
        lines.append(ndjson({"type": "end", "metadata": _meta(1)}))
        return await self._stream(request, 200, self._n8n_headers(), lines, 0.002)

    async def _s_fragmented(self, request: web.Request, text: str) -> web.StreamResponse:
        body = b"".join(line.replace(b"\n", b"\r\n") for line in self._echo_lines(text))
        cuts = set(range(0, len(body), 7)) | {i + 1 for i, byte in enumerate(body) if byte >= 0xC0}
        bounds = [*sorted(cuts), len(body)]
        pieces = [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        return await self._stream(request, 200, self._n8n_headers(), pieces, 0.001)

    async def _s_batched(self, request: web.Request, text: str) -> web.StreamResponse:
        return await self._stream(request, 200, self._n8n_headers(), [b"".join(self._echo_lines(text))], 0.0)

    async def _s_html(self, _request: web.Request, _text: str) -> web.StreamResponse:
        page = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in</body></html>"
        return self._json(page, "text/html; charset=utf-8")

    async def _s_echo_usage(self, request: web.Request, text: str) -> web.StreamResponse:
        lines = self._echo_lines(text)
        usage = {"input_tokens": len(text.split()) + 10, "output_tokens": len(echo_tokens(text))}
        lines[-1] = ndjson({"type": "end", "metadata": {**_meta(), "usage": usage}})
        return await self._stream(request, 200, self._n8n_headers(), lines, 0.001)

    async def _s_json_usage(self, _request: web.Request, text: str) -> web.StreamResponse:
        usage = {"prompt_tokens": len(text.split()) + 10, "completion_tokens": len(echo_tokens(text))}
        return self._json({"output": "".join(echo_tokens(text)), "usage": usage})

    @staticmethod
    def _auth_refusal(status: int) -> web.Response:
        """How n8n's Webhook node refuses (WebhookAuthorizationError): the status, only `WWW-Authenticate`,
        and its message as a plain body without a Content-Type."""
        message = "Authorization is required!" if status == 401 else "Authorization data is wrong!"
        response = web.Response(status=status, body=message.encode())
        response.headers["WWW-Authenticate"] = 'Basic realm="Webhook"'
        return response

    async def _s_header_auth(self, request: web.Request, text: str) -> web.StreamResponse:
        # Header Auth answers 403 whether the header is missing or wrong (n8n's validateWebhookAuthentication).
        if request.headers.get(HEADER_AUTH[0]) != HEADER_AUTH[1]:
            return self._auth_refusal(403)
        return await self._s_echo(request, text)

    async def _s_basic_auth(self, request: web.Request, text: str) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        if not header:
            return self._auth_refusal(401)
        try:
            sent = BasicAuth.decode(header)
        except ValueError:
            return self._auth_refusal(403)
        if (sent.login, sent.password) != BASIC_AUTH:
            return self._auth_refusal(403)
        return await self._s_echo(request, text)

    async def _s_echo_header(self, request: web.Request, _text: str) -> web.StreamResponse:
        """A workflow that echoes a request header (what the connection test's masking must catch): streamed in
        pieces of `size`, cut after `cut` characters, or with `as=object` as a JSON answer whose `output` is an
        object (shown as its JSON, the value escaped)."""
        name = request.query.get("header", HEADER_AUTH[0])
        value = request.headers.get(name, "")
        if "cut" in request.query:
            value = value[: int(self._q(request, "cut", len(value)))]
        if request.query.get("as") == "object":  # n8n's Respond node with an object as `output`
            return self._json({"output": {"you_sent": value}})
        text = f"Your {name} header: {value}"
        size = max(1, int(self._q(request, "size", 10)))
        lines = [ndjson({"type": "begin", "metadata": _meta()})]
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        lines += [ndjson({"type": "item", "content": piece, "metadata": _meta()}) for piece in pieces]
        lines.append(ndjson({"type": "end", "metadata": _meta()}))
        return await self._stream(request, 200, self._n8n_headers(), lines, 0.0)

    async def _s_wrong_method_post(self, _request: web.Request, _text: str) -> web.StreamResponse:
        capture = self.captures["wrong_method_get"]
        body = capture.body.replace(b"for GET requests", b"for POST requests")
        body = body.replace(b"a POST request", b"a GET request")
        response = web.Response(status=capture.status, reason=capture.reason, body=body)
        response.headers["Content-Type"] = "application/json; charset=utf-8"
        return response

    async def _s_empty(self, request: web.Request, _text: str) -> web.StreamResponse:
        return await self._stream(request, 200, self._n8n_headers(), [], 0.0)

    def _json(self, payload: Any, content_type: str = "application/json; charset=utf-8") -> web.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _s_echo_json(self, _request: web.Request, text: str) -> web.StreamResponse:
        return self._json({"output": "".join(echo_tokens(text))})

    async def _s_json_text(self, _request: web.Request, text: str) -> web.StreamResponse:
        return self._json({"text": "".join(echo_tokens(text))})

    async def _s_json_message(self, _request: web.Request, text: str) -> web.StreamResponse:
        return self._json({"message": "".join(echo_tokens(text))})

    async def _s_json_content(self, _request: web.Request, text: str) -> web.StreamResponse:
        return self._json({"content": "".join(echo_tokens(text))})

    async def _s_json_array(self, _request: web.Request, text: str) -> web.StreamResponse:
        return self._json([{"output": "".join(echo_tokens(text))}])

    async def _s_set_cookie(self, request: web.Request, text: str) -> web.StreamResponse:
        response = self._json({"output": "".join(echo_tokens(text))})
        response.headers["Set-Cookie"] = request.query.get("cookie", "n8n-session=fake-cookie")
        return response

    async def _s_raw(self, request: web.Request, _text: str) -> web.StreamResponse:
        encoded = request.query.get("body", "")
        body = zlib.decompress(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        headers = [("Content-Type", request.query.get("type", "application/json; charset=utf-8"))]
        status = int(request.query.get("status", "200"))
        return await self._stream(request, status, headers, body.splitlines(keepends=True), 0.0)

    async def _s_plain(self, _request: web.Request, text: str) -> web.StreamResponse:
        return self._json("".join(echo_tokens(text)).encode(), "text/plain; charset=utf-8")

    async def _s_charset(self, request: web.Request, text: str) -> web.StreamResponse:
        charset = request.query.get("charset", "latin-1")
        answer = "".join(echo_tokens(text))
        if request.query.get("type") == "json":
            body, media = json.dumps({"output": answer}, ensure_ascii=False), "application/json"
        else:
            body, media = answer, "text/plain"
        try:
            encoded = body.encode(charset)
        except LookupError:  # an unknown name is declared as is, over UTF-8 bytes
            encoded = body.encode()
        return self._json(encoded, f"{media}; charset={charset}")

    async def _s_status(self, request: web.Request, _text: str) -> web.StreamResponse:
        status = int(self._q(request, "status", 500))
        retry_after = request.query.get("retry_after")
        if "hang" in request.query:  # the status line and headers at once, the body `hang` seconds later
            headers = [("Content-Type", "application/json; charset=utf-8")]
            if retry_after is not None:
                headers.append(("Retry-After", retry_after))
            body = [b'{"message": "Error in workflow"}']
            return await self._stream(request, status, headers, body, self._q(request, "hang", 3.0))
        response = self._json({"message": "Error in workflow"})
        response.set_status(status)
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after
        return response

    async def _s_sse_openai(self, request: web.Request, text: str) -> web.StreamResponse:
        pieces = [b": proxy keep-alive\n\n"]
        for token in echo_tokens(text):
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": token}}]}
            pieces.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        pieces.append(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
        pieces.append(b"data: [DONE]\n\n")
        return await self._stream(request, 200, [("Content-Type", "text/event-stream")], pieces, 0.002)

    async def _s_sse_n8n(self, request: web.Request, text: str) -> web.StreamResponse:
        pieces = [b"event: message\ndata: " + line.rstrip(b"\n") + b"\n\n" for line in self._echo_lines(text)]
        return await self._stream(request, 200, [("Content-Type", "text/event-stream")], pieces, 0.002)

    async def _s_hang_headers(self, request: web.Request, _text: str) -> web.StreamResponse:
        await asyncio.sleep(self._q(request, "hang", 3600))
        return self._json({"output": "too late"})

    async def _start_tokens(self, request: web.Request, text: str) -> web.StreamResponse:
        """Headers, begin and the first `after` echo tokens: the common prefix of the mid-stream faults."""
        response = web.StreamResponse(status=200)
        for key, value in self._n8n_headers():
            response.headers.add(key, value)
        response.enable_chunked_encoding()
        request[RESPONSE_KEY] = response
        await response.prepare(request)
        await response.write(ndjson({"type": "begin", "metadata": _meta()}))
        tokens = echo_tokens(text)
        for token in tokens[: int(self._q(request, "after", 2))]:
            await response.write(ndjson({"type": "item", "content": token, "metadata": _meta()}))
        return response

    async def _s_stall(self, request: web.Request, text: str) -> web.StreamResponse:
        response = await self._start_tokens(request, text)
        await asyncio.sleep(self._q(request, "hang", 3600))
        await response.write_eof()
        return response

    async def _s_reset(self, request: web.Request, text: str) -> web.StreamResponse:
        response = await self._start_tokens(request, text)
        await asyncio.sleep(0.02)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _s_malformed(self, request: web.Request, text: str) -> web.StreamResponse:
        response = await self._start_tokens(request, text)
        await response.write(b'{"type":"item","content": oops\n')
        await response.write(ndjson({"type": "end", "metadata": _meta()}))
        await response.write_eof()
        return response

    async def _s_oversized(self, request: web.Request, text: str) -> web.StreamResponse:
        response = await self._start_tokens(request, text)
        size = int(self._q(request, "size", 2 * 1024 * 1024))
        filler = b"x" * 65536
        await response.write(b'{"type":"item","content":"')
        written = 0
        while written < size:
            await response.write(filler)
            written += len(filler)
        await response.write(b'"}\n')
        await response.write(ndjson({"type": "end", "metadata": _meta()}))
        await response.write_eof()
        return response

    async def _s_nul(self, request: web.Request, _text: str) -> web.StreamResponse:
        lines = [
            ndjson({"type": "begin", "metadata": _meta()}),
            ndjson({"type": "item", "content": "a\x00b", "metadata": _meta()}),
            b'{"type":"item","content":" \\ud800 lone surrogate"}\n',
            ndjson({"type": "error", "content": "bad\x00", "metadata": _meta(timestamp=False)}),
        ]
        return await self._stream(request, 200, self._n8n_headers(), lines, 0.0)

    async def _s_in_band_error(self, request: web.Request, text: str) -> web.StreamResponse:
        response = await self._start_tokens(request, text)
        error = {"type": "error", "content": "Fake upstream failure", "metadata": _meta(timestamp=False)}
        await response.write(ndjson(error))
        await response.write_eof()
        return response

    # --- files -------------------------------------------------------------------------------------
    async def _s_fetch_files(self, request: web.Request, text: str) -> web.StreamResponse:
        """Like a workflow's HTTP Request node on `{{$json.files[i].url}}`: downloads every file URL of the JSON
        body (recorded in `FakeN8n.fetched`: url, status, headers, sha256), then echoes the message."""
        body = await request.json()
        async with aiohttp.ClientSession() as session:
            for entry in body.get("files") or []:
                record: dict[str, Any] = {"url": entry.get("url"), "status": None}
                self.fetched.append(record)
                async with session.get(entry["url"]) as response:
                    data = await response.read()
                    record.update(
                        status=response.status, headers=dict(response.headers), sha256=hashlib.sha256(data).hexdigest()
                    )
        return await self._s_echo(request, text)

    # --- progress callbacks ----------------------------------------------------------------------
    def _callback_script(self, request: web.Request, text: str) -> list[dict[str, Any]]:
        """The callbacks to post: a status, a tool step, usage, the echo text word by word, then the end.

        `end`: `done` (default), `error`, `both` (done, then error: the first must win) or `none`; `extra=1`
        posts one more `message` after the end (it must be refused); `text=0` posts no text; `tokens=N` reports N
        input tokens (default 12), `usages=K` reports them K times (default once).
        """
        usage = {"type": "usage", "input_tokens": int(request.query.get("tokens", "12")), "output_tokens": 7}
        script: list[dict[str, Any]] = [
            {"type": "status", "description": "Searching the knowledge base"},
            {"type": "tool", "name": "search", "input": {"query": text}, "output": {"hits": 3}},
            *[usage] * int(request.query.get("usages", "1")),
        ]
        if request.query.get("text", "1") != "0":
            script += [{"type": "message", "content": token} for token in echo_tokens(text)]
        end = request.query.get("end", "done")
        if end in ("done", "both"):
            script.append({"type": "done"})
        if end in ("error", "both"):
            script.append({"type": "error", "message": "The workflow failed in node Search"})
        if request.query.get("extra") == "1":
            script.append({"type": "message", "content": " (late)"})
        return script

    async def _post_callbacks(self, url: str, script: list[dict[str, Any]], start: float, interval: float) -> None:
        await asyncio.sleep(start)
        async with aiohttp.ClientSession() as session:
            for body in script:
                record: dict[str, Any] = {"body": body, "status": None}
                self.callbacks.append(record)
                try:
                    async with session.post(url, json=body) as response:
                        record["status"] = response.status
                        await response.read()
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(interval)

    async def _s_callbacks(self, request: web.Request, text: str) -> web.StreamResponse:
        """Posts `_callback_script` to `metadata.callback_url` in the background, `start_ms` after the request
        and `interval_ms` apart (default 20), while the webhook answers as `answer` says: `ack` (default: at
        once, `{"message": "Workflow was started"}`, like "Respond: Immediately"), `cut` (the connection is
        dropped after `hang` seconds, default 0.1, as a proxy's time limit does), `stream` (the echo NDJSON,
        slowly: `delay_ms`, default 200) or `stall` (two tokens, then nothing for `hang` seconds). Without a
        callback URL (the connection test's probe) it posts nothing and answers all the same, as n8n does: its
        Webhook node answers before the HTTP Request nodes run, and those then fail in n8n."""
        body = await request.json()
        url = (body.get("metadata") or {}).get("callback_url")
        if isinstance(url, str):
            script = self._callback_script(request, text)
            start, interval = self._q(request, "start_ms", 0) / 1000, self._q(request, "interval_ms", 20) / 1000
            task = asyncio.create_task(self._post_callbacks(url, script, start, interval))
            self._posting.add(task)
            task.add_done_callback(self._posting.discard)
        answer = request.query.get("answer", "ack")
        if answer == "cut":
            await asyncio.sleep(self._q(request, "hang", 0.1))
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=499)
        if answer == "stream":
            delay = self._q(request, "delay_ms", 200) / 1000
            return await self._stream(request, 200, self._n8n_headers(), self._echo_lines(text), delay)
        if answer == "stall":
            return await self._s_stall(request, text)
        return self._json({"message": "Workflow was started"})


async def _serve(fake: FakeN8n, host: str, port: int) -> None:
    url = await fake.start(host, port)
    print(f"fake n8n listening on {url} ({len(fake.captures)} captures)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5678)
    parser.add_argument(
        "--speed", type=float, default=1.0, help="replay captures this many times faster (0 = no delay)"
    )
    parser.add_argument("--linger", type=float, default=5.0, help="seconds the socket stays open after a stream")
    parser.add_argument("--recordings", type=Path, default=CAPTURES_DIR, help="folder of the n8n recordings")
    args = parser.parse_args(argv)
    try:
        fake = FakeN8n(captures_dir=args.recordings, speed=args.speed, linger=args.linger)
    except RecordingsMissing as exc:
        sys.exit(f"fake n8n refuses to start: {exc}")
    try:
        asyncio.run(_serve(fake, args.host, args.port))
    except KeyboardInterrupt:
        return


if __name__ == "__main__":
    main()
