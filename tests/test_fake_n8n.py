"""The fake n8n reproduces every capture (status, headers, body, per-line chunks, gzip, linger) and its faults."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tools.fake_n8n import CAPTURES_DIR, FakeN8n, RecordingsMissing, load_captures, paced_text

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = load_captures()


@pytest.fixture
async def fake() -> AsyncIterator[FakeN8n]:
    server = FakeN8n(speed=0, linger=0.3)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def read_until_last_chunk(reader: asyncio.StreamReader, end: bytes = b"\r\n0\r\n\r\n") -> bytes:
    """Raw bytes up to the terminating chunk; a closed socket (read returns b"") fails instead of spinning."""
    raw = b""
    while not raw.endswith(end):
        data = await asyncio.wait_for(reader.read(65536), 5)
        if not data:
            pytest.fail(f"connection closed before the terminating chunk; got {raw[-200:]!r}")
        raw += data
    return raw


async def test_read_until_last_chunk_fails_on_a_closed_socket() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    reader.feed_eof()
    with pytest.raises(pytest.fail.Exception, match="closed before the terminating chunk"):
        await asyncio.wait_for(read_until_last_chunk(reader), 2)


def test_recordings_live_in_the_repository() -> None:
    assert CAPTURES_DIR == ROOT / "recordings" / "n8n"
    assert (CAPTURES_DIR / "README.md").is_file()


def test_load_captures_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(RecordingsMissing, match="not found"):
        load_captures(tmp_path / "nope")
    with pytest.raises(RecordingsMissing, match="not found"):
        FakeN8n(captures_dir=tmp_path / "nope")


def test_load_captures_refuses_a_folder_without_recordings(tmp_path: Path) -> None:
    with pytest.raises(RecordingsMissing, match="no n8n recordings"):
        load_captures(tmp_path)
    (tmp_path / "notes.txt").write_text("not an HTTP answer\n")
    timings = "aiohttp_client_gzip_stream.txt"  # a real recording, but of a client's reads, not an HTTP answer
    (tmp_path / timings).write_bytes((CAPTURES_DIR / timings).read_bytes())
    with pytest.raises(RecordingsMissing, match="no n8n recordings"):
        FakeN8n(captures_dir=tmp_path)


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_cli_refuses_to_start_without_recordings(tmp_path: Path, folder: str) -> None:
    recordings = tmp_path / folder
    if folder == "empty":
        recordings.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tools.fake_n8n", "--port", "0", "--recordings", str(recordings)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "fake n8n refuses to start" in result.stderr
    assert str(recordings) in result.stderr
    assert "listening" not in result.stdout


def test_load_captures_finds_every_http_answer() -> None:
    answers = {p.name.split(".")[0] for p in CAPTURES_DIR.glob("*.txt") if p.read_bytes().startswith(b"HTTP/")}
    assert set(CAPTURES) == answers
    assert len(CAPTURES) >= 25
    assert CAPTURES["stream_ok"].chunked
    assert len(CAPTURES["stream_ok"].pieces) == 5
    assert CAPTURES["stream_slow"].delays[1] == pytest.approx(0.4033, abs=0.01)


@pytest.mark.parametrize("name", sorted(CAPTURES))
async def test_replay_capture_is_faithful(fake: FakeN8n, http: aiohttp.ClientSession, name: str) -> None:
    capture = CAPTURES[name]
    headers = {"X-Fake-Scenario": name, "Accept-Encoding": "identity"}
    async with http.post(fake.url + "/webhook/does-not-exist", json={"chatInput": "x"}, headers=headers) as resp:
        chunks = [data async for data, _end in resp.content.iter_chunks()]
        body = b"".join(chunks)
        assert resp.status == capture.status
        expected_type = dict((k.lower(), v) for k, v in capture.headers).get("content-type")
        assert resp.headers.get("Content-Type") == expected_type
        assert body == capture.body
        if capture.chunked:
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            assert chunks == capture.pieces
        elif capture.status != 204:
            assert resp.headers.get("Content-Length") == str(len(capture.body))


async def test_replay_gzip_when_asked_is_flushed_per_line(fake: FakeN8n) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    request = (
        "POST /webhook/agent-stream?scenario=stream_ok HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip, deflate\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    writer.write(request.encode())
    raw = await read_until_last_chunk(reader)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    pieces = []
    pos = 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            break
        pieces.append(body[end + 2 : end + 2 + size])
        pos = end + 4 + size
    assert len(pieces) >= 6
    assert gzip.decompress(b"".join(pieces)) == CAPTURES["stream_ok"].body


async def test_replay_gzip_is_decoded_by_aiohttp(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    async with http.post(fake.url + "/webhook/agent-stream?scenario=stream_ok", json={}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == CAPTURES["stream_ok"].body


async def test_replay_keeps_socket_open_after_last_chunk(fake: FakeN8n) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    writer.write(
        b"POST /webhook/agent-stream?scenario=stream_ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    await read_until_last_chunk(reader)
    done = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    lingered = time.monotonic() - done
    writer.close()
    await writer.wait_closed()
    assert lingered >= 0.25


async def test_default_scenario_by_path(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    async with http.post(fake.url + "/webhook/agent-stream", json={"chatInput": "hello  there"}) as resp:
        lines = [json.loads(line) for line in (await resp.read()).splitlines()]
    assert [line["type"] for line in lines] == ["begin", "item", "item", "item", "end"]
    assert "".join(line.get("content") or "" for line in lines) == "Echo: hello there"
    async with http.post(fake.url + "/webhook/agent-stream", json={"chatInput": "__llm_error__"}) as resp:
        assert await resp.read() == CAPTURES["stream_llm_error"].body
    async with http.post(fake.url + "/webhook/agent-json", json={"chatInput": "a b"}) as resp:
        assert await resp.json() == {"output": "Echo: a b"}
    async with http.post(fake.url + "/webhook/nope", json={}) as resp:
        assert resp.status == 404
        assert "POST nope" in (await resp.json())["message"]
    async with http.get(fake.url + "/webhook/agent-stream") as resp:
        assert resp.status == 404
        assert await resp.read() == CAPTURES["wrong_method_get"].body
    async with http.post(fake.url + "/webhook-test/agent-stream", json={}) as resp:
        assert await resp.read() == CAPTURES["test_url_not_listening"].body
    async with http.post(fake.url + "/webhook/agent-stream", data=b'{"messages": [oops') as resp:
        assert resp.status == 422


async def test_requests_are_recorded(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    payload = {"chatInput": "hi", "sessionId": "s1"}
    async with http.post(fake.url + "/webhook/agent-json?x=1", json=payload, headers={"X-Key": "k"}) as resp:
        await resp.read()
    async with http.get(fake.url + "/__requests") as resp:
        recorded = await resp.json()
    assert recorded == fake.requests
    assert recorded[0]["json"] == payload
    assert recorded[0]["headers"]["X-Key"] == "k"
    assert ["X-Key", "k"] in recorded[0]["header_lines"]
    assert recorded[0]["query"] == {"x": "1"}
    async with http.delete(fake.url + "/__requests") as resp:
        assert resp.status == 204
    assert fake.requests == []


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("json_text", {"text": "Echo: a b"}),
        ("json_message", {"message": "Echo: a b"}),
        ("json_array", [{"output": "Echo: a b"}]),
    ],
)
async def test_json_variants(fake: FakeN8n, http: aiohttp.ClientSession, scenario: str, expected: object) -> None:
    async with http.post(f"{fake.url}/webhook/agent-json?scenario={scenario}", json={"chatInput": "a b"}) as resp:
        assert await resp.json() == expected


async def test_fault_reset_breaks_the_body(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    async with http.post(fake.url + "/webhook/agent-stream?scenario=reset", json={"chatInput": "a b c"}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_fault_hang_headers_sends_nothing(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await http.post(fake.url + "/webhook/agent-stream?scenario=hang_headers&hang=5", json={})


async def test_fault_fragmented_splits_lines_and_characters(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    url = fake.url + "/webhook/agent-stream?scenario=fragmented"
    async with http.post(url, json={"chatInput": "héllo wörld"}, headers={"Accept-Encoding": "identity"}) as resp:
        chunks = [data async for data, _end in resp.content.iter_chunks()]
    assert all(len(c) <= 7 for c in chunks)
    body = b"".join(chunks)
    assert b"\r\n" in body
    split_characters = 0
    for chunk in chunks:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            split_characters += 1
    assert split_characters > 0
    assert "héllo" in body.decode("utf-8")


async def test_fault_paced_counts_chunks(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    url = fake.url + "/webhook/agent-stream?scenario=paced&chunks=20&interval_ms=1"
    async with http.post(url, json={}) as resp:
        lines = (await resp.read()).splitlines()
    assert len(lines) == 22


async def test_fault_paced_pads_tokens_to_size(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    url = fake.url + "/webhook/agent-stream?scenario=paced&chunks=3&interval_ms=0&size=6"
    async with http.post(url, json={}) as resp:
        items = [json.loads(line) for line in (await resp.read()).splitlines()][1:-1]
    assert [item["content"] for item in items] == [" t0...", " t1...", " t2..."]
    assert "".join(item["content"] for item in items) == paced_text(3, 6)


async def test_unknown_scenario_is_400(fake: FakeN8n, http: aiohttp.ClientSession) -> None:
    async with http.post(fake.url + "/webhook/agent-stream?scenario=nope", json={}) as resp:
        assert resp.status == 400
