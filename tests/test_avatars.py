"""Avatars: size cap while the body arrives, type by content, bombs and polyglots refused, re-encoding, serving."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import struct
import warnings
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from PIL import Image, PngImagePlugin
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Agent, Team, User
from main import create_app, shutdown
from tests.conftest import _plain_url, make_settings, until_a_statement_waits
from tests.factories import auth_headers, create_admin, create_agent, create_team, create_user

MB = 1024 * 1024


def png_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", **save: Any) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "red" if mode != "1" else 1).save(out, "PNG", **save)
    return out.getvalue()


def noise_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def image_bytes(fmt: str, size: tuple[int, int] = (64, 48), **save: Any) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "blue").save(out, fmt, **save)
    return out.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("P", (40, 40), i) for i in (1, 2, 3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="9"/></svg>'
HTML = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"


@dataclass
class World:
    team: Team
    admin: User
    member: User
    foreigner: User
    agent: Agent
    settings: Settings

    def h(self, user: User) -> dict[str, str]:
        return auth_headers(self.settings, user)


@pytest.fixture
async def world(session: AsyncSession, settings: Settings) -> World:
    team = await create_team(session)
    return World(
        team=team,
        admin=await create_admin(session, team=team),
        member=await create_user(session, team=team),
        foreigner=await create_admin(session),
        agent=await create_agent(session, team=team),
        settings=settings,
    )


async def upload(
    client: httpx.AsyncClient, world: World, data: bytes, filename: str = "a.png", ctype: str = "image/png"
) -> httpx.Response:
    return await client.post(
        f"/api/agents/{world.agent.id}/avatar", files={"file": (filename, data, ctype)}, headers=world.h(world.admin)
    )


async def stored(session: AsyncSession, agent: Agent) -> tuple[bytes | None, str | None, int]:
    row = (
        await session.execute(
            select(Agent.avatar, Agent.avatar_content_type, Agent.avatar_version).where(Agent.id == agent.id)
        )
    ).one()
    return row[0], row[1], row[2]


# --- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "ctype"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")]
)
async def test_upload_avatar_accepts_each_format(
    client: httpx.AsyncClient, world: World, session: AsyncSession, fmt: str, ctype: str
) -> None:
    response = await upload(client, world, image_bytes(fmt), filename="x.bin", ctype="application/octet-stream")
    assert response.status_code == 200
    assert response.json()["avatar_url"] == f"/api/agents/{world.agent.id}/avatar?v=1"
    data, content_type, version = await stored(session, world.agent)
    assert content_type == ctype
    assert version == 1
    assert data is not None
    assert Image.open(io.BytesIO(data)).format == fmt


async def test_png_renamed_gif_is_stored_as_png(client: httpx.AsyncClient, world: World) -> None:
    response = await upload(client, world, png_bytes(), filename="cat.gif", ctype="image/gif")
    assert response.status_code == 200
    served = await client.get(response.json()["avatar_url"], headers=world.h(world.member))
    assert served.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(served.content)).format == "PNG"


async def test_avatar_is_resized_to_max_side(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    response = await upload(client, world, image_bytes("JPEG", (1600, 900)), filename="big.jpg", ctype="image/jpeg")
    assert response.status_code == 200
    data, _, _ = await stored(session, world.agent)
    assert data is not None
    assert Image.open(io.BytesIO(data)).size == (512, 288)


async def test_avatar_metadata_is_stripped(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCameraMaker"  # Make
    exif[0x8825] = {2: (48.0, 51.0, 0.0)}  # GPS latitude
    jpeg = image_bytes("JPEG", exif=exif.tobytes())
    assert b"SecretCameraMaker" in jpeg
    assert (await upload(client, world, jpeg, ctype="image/jpeg")).status_code == 200
    data, _, _ = await stored(session, world.agent)
    assert data is not None
    assert b"SecretCameraMaker" not in data
    assert not Image.open(io.BytesIO(data)).getexif()

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "private-note")
    png = png_bytes(pnginfo=info)
    assert (await upload(client, world, png)).status_code == 200
    data, _, _ = await stored(session, world.agent)
    assert data is not None
    assert b"private-note" not in data
    assert "Comment" not in Image.open(io.BytesIO(data)).info


def jpeg_turned(broken: bool = False) -> bytes:
    """A 64x48 JPEG whose EXIF says "rotate 90 degrees clockwise to show" (Orientation 6), with a GPS directory;
    `broken`: that directory claims 7 entries where it holds 2, so Pillow reads tags of impossible types."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Cam"
    exif[0x8825] = {1: "N", 2: (1.0, 2.0, 3.0)}
    jpeg = bytearray(image_bytes("JPEG", exif=exif.tobytes()))
    gps_count = jpeg.index(b"Exif\x00\x00") + 6 + 0x32  # the GPS directory's entry count (after the TIFF header)
    assert jpeg[gps_count : gps_count + 2] == b"\x00\x02"
    if broken:
        jpeg[gps_count + 1] = 7
    return bytes(jpeg)


@pytest.mark.parametrize("broken", [False, True], ids=["exif", "malformed-exif"])
async def test_jpeg_orientation_is_applied_even_with_malformed_exif(
    client: httpx.AsyncClient, world: World, session: AsyncSession, broken: bool
) -> None:
    """Pillow's exif_transpose writes the EXIF back into the turned image, and its writer raised TypeError or
    struct.error on tags a camera or an editor got wrong (a 500); the orientation is all we need of it."""
    response = await upload(client, world, jpeg_turned(broken), filename="a.jpg", ctype="image/jpeg")
    assert response.status_code == 200, response.text
    data, _, _ = await stored(session, world.agent)
    assert data is not None
    stored_image = Image.open(io.BytesIO(data))
    assert stored_image.size == (48, 64)
    assert not stored_image.getexif()


async def test_animated_gif_keeps_its_first_frame(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    response = await upload(client, world, animated_gif(), filename="a.gif", ctype="image/gif")
    assert response.status_code == 200
    data, content_type, _ = await stored(session, world.agent)
    assert data is not None
    assert content_type == "image/gif"
    image = Image.open(io.BytesIO(data))
    assert image.format == "GIF"
    assert getattr(image, "n_frames", 1) == 1


# --- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (SVG, "logo.png"),
        (HTML, "page.png"),
        (b"GIF89a" + HTML, "poly.gif"),
        (png_bytes() + HTML, "poly.png"),
        (image_bytes("JPEG") + b"<script>alert(1)</script>", "poly.jpg"),
        (png_bytes()[:60], "truncated.png"),
        (image_bytes("BMP"), "bitmap.png"),
        (image_bytes("TIFF"), "photo.png"),
        (b"", "empty.png"),
        (b"%PDF-1.4 hello", "doc.png"),
    ],
)
async def test_upload_avatar_refuses_non_images_with_415(
    client: httpx.AsyncClient, world: World, session: AsyncSession, data: bytes, filename: str
) -> None:
    response = await upload(client, world, data, filename=filename)
    assert response.status_code == 415
    assert "PNG, JPEG, WebP or GIF" in response.json()["detail"]
    assert await stored(session, world.agent) == (None, None, 0)


def png_with(chunks: list[tuple[bytes, bytes]], size: tuple[int, int] = (4, 4)) -> bytes:
    """A small PNG with these (type, data) chunks put right after its header chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = png_bytes(size)
    return png[:33] + b"".join(chunk(kind, data) for kind, data in chunks) + png[33:]


@pytest.mark.parametrize(
    "data",
    [
        # 80 compressed text chunks of 1 MiB each once inflated (85 kB): Pillow's ValueError "Too much memory
        # used in text chunks", which was a 500.
        png_with([(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"A" * (1 << 20), 9)) for i in range(80)]),
        png_bytes()[:20],  # a header chunk cut short
    ],
    ids=["text-chunks", "truncated-header"],
)
async def test_images_pillow_cannot_open_are_415(
    client: httpx.AsyncClient, world: World, session: AsyncSession, data: bytes
) -> None:
    response = await upload(client, world, data)
    assert response.status_code == 415
    assert await stored(session, world.agent) == (None, None, 0)


async def test_decompression_bomb_is_refused(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    bomb = png_bytes((8000, 8000), mode="1")  # 64 million pixels in a few kilobytes
    assert len(bomb) < 100_000
    response = await upload(client, world, bomb)
    assert response.status_code == 413
    assert "pixels" in response.json()["detail"]
    assert await stored(session, world.agent) == (None, None, 0)


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (no pixel data behind it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def declared_gif(width: int, height: int) -> bytes:
    """A tiny GIF whose logical screen claims `width` x `height` pixels."""
    image = b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"  # one 1x1 frame, then the trailer
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + image


@pytest.mark.parametrize(
    "data",
    [
        declared_png(100_000, 100_000),  # past twice Pillow's limit: DecompressionBombError on open
        declared_png(10_000, 10_000),  # past Pillow's limit: DecompressionBombWarning on open
        declared_png(7_000, 7_000),  # under Pillow's limit, over AVATAR_MAX_PIXELS (40 million)
        declared_gif(65_535, 65_535),
    ],
    ids=["png-100000x100000", "png-10000x10000", "png-7000x7000", "gif-65535x65535"],
)
async def test_avatar_declaring_huge_dimensions_is_413(
    client: httpx.AsyncClient, world: World, session: AsyncSession, data: bytes
) -> None:
    assert len(data) < 100
    response = await upload(client, world, data)
    assert response.status_code == 413, response.text
    assert "pixels" in response.json()["detail"]
    assert await stored(session, world.agent) == (None, None, 0)


async def test_upload_avatar_by_member_is_403(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    response = await client.post(
        f"/api/agents/{world.agent.id}/avatar", files={"file": ("a.png", png_bytes())}, headers=world.h(world.member)
    )
    assert response.status_code == 403
    assert await stored(session, world.agent) == (None, None, 0)


async def test_upload_avatar_to_other_team_agent_is_404(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    response = await client.post(
        f"/api/agents/{world.agent.id}/avatar",
        files={"file": ("a.png", png_bytes())},
        headers=world.h(world.foreigner),
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "Agent not found"}
    assert await stored(session, world.agent) == (None, None, 0)


async def test_upload_avatar_without_file_field_is_422(client: httpx.AsyncClient, world: World) -> None:
    response = await client.post(
        f"/api/agents/{world.agent.id}/avatar", files={"image": ("a.png", png_bytes())}, headers=world.h(world.admin)
    )
    assert response.status_code == 422


def raw_multipart(part_headers: bytes, data: bytes, *, closed: bool = True) -> bytes:
    body = b"--XyZ\r\n" + part_headers + b"\r\n\r\n" + data
    return body + b"\r\n--XyZ--\r\n" if closed else body


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        # Cut short before its closing boundary: Starlette's parser left the file part's spooled temporary file
        # unclosed (a ResourceWarning) and the answer said the field was missing.
        (
            raw_multipart(b'Content-Disposition: form-data; name="file"; filename="a.png"', png_bytes(), closed=False),
            "The multipart body could not be read",
        ),
        # No `filename` (or only RFC 5987's `filename*`): the part is a file all the same. It was a 422
        # saying "Expected UploadFile, received: <class 'str'>".
        (
            raw_multipart(b'Content-Disposition: form-data; name="file"', b"GIF89a"),
            "Unsupported image: send a PNG, JPEG, WebP or GIF file",
        ),
        (
            raw_multipart(b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''%E2%82%AC.gif", b"GIF89a"),
            "Unsupported image: send a PNG, JPEG, WebP or GIF file",
        ),
        # Two `file` parts: one of them was stored, silently.
        (
            raw_multipart(b'Content-Disposition: form-data; name="file"; filename="a.png"', png_bytes())[:-9]
            + raw_multipart(b'Content-Disposition: form-data; name="file"; filename="b.png"', png_bytes()),
            "Send one file per request",
        ),
    ],
    ids=["truncated", "no-filename", "rfc5987-filename", "two-files"],
)
async def test_upload_avatar_reads_odd_multipart_bodies_as_file_uploads_do(
    client: httpx.AsyncClient, world: World, session: AsyncSession, body: bytes, detail: str
) -> None:
    """The avatar's body is read as a chat file's is (app.uploads): one `file` part, a clear 4xx for anything
    else, and nothing left open."""
    headers = {**world.h(world.admin), "Content-Type": "multipart/form-data; boundary=XyZ"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        response = await client.post(f"/api/agents/{world.agent.id}/avatar", content=body, headers=headers)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert response.status_code in (415, 422), response.text
    assert detail in response.text
    assert "<class" not in response.text
    assert await stored(session, world.agent) == (None, None, 0)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("application/json", b'{"file": "x"}'), ("application/x-www-form-urlencoded", b"file=x"), ("text/plain", b"x")],
)
async def test_upload_avatar_that_is_not_multipart_is_415(
    client: httpx.AsyncClient, world: World, content_type: str, body: bytes
) -> None:
    """As a chat file upload: 415 naming what to send (it was a 422 "Field required", or "Expected UploadFile")."""
    response = await client.post(
        f"/api/agents/{world.agent.id}/avatar",
        content=body,
        headers={**world.h(world.admin), "Content-Type": content_type},
    )
    assert response.status_code == 415
    assert response.json() == {"detail": "Send the file as multipart/form-data with a field named `file`"}


async def test_upload_avatar_of_a_foreign_agent_is_404_before_the_body_is_read(app: Any, world: World) -> None:
    counting = CountingApp(app)
    produced = [0]
    headers = {**world.h(world.foreigner), "Content-Type": "multipart/form-data; boundary=XyZ"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=counting), base_url="http://test") as c:
        response = await c.post(
            f"/api/agents/{world.agent.id}/avatar", content=multipart_stream(MB, produced), headers=headers
        )
    assert response.status_code == 404
    assert counting.received == 0


# --- size cap while the body arrives ------------------------------------------------------------


class CountingApp:
    """Counts the request-body bytes the application actually pulled from the server."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def multipart_stream(total: int, produced: list[int]) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        yield b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n" + png_bytes()
        chunk = b"\0" * 65536
        for _ in range(total // len(chunk)):
            produced[0] += len(chunk)
            yield chunk
        yield b"\r\n--XyZ--\r\n"

    return gen()


@pytest.mark.parametrize("content_length", [None, "1000"])
async def test_oversized_avatar_is_413_after_reading_at_most_the_cap(
    app: Any, world: World, session: AsyncSession, content_length: str | None
) -> None:
    counting = CountingApp(app)
    produced = [0]
    headers = {**world.h(world.admin), "Content-Type": "multipart/form-data; boundary=XyZ"}
    if content_length:
        headers["Content-Length"] = content_length  # a lie: 50 MB follow
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=counting), base_url="http://test") as c:
        response = await c.post(
            f"/api/agents/{world.agent.id}/avatar", content=multipart_stream(50 * MB, produced), headers=headers
        )
    assert response.status_code == 413
    cap = world.settings.AVATAR_MAX_BYTES + 64 * 1024
    assert counting.received <= cap + 65536 + 1024
    assert produced[0] < 3 * MB
    assert await stored(session, world.agent) == (None, None, 0)


async def test_declared_oversized_avatar_is_413_before_reading(app: Any, world: World) -> None:
    counting = CountingApp(app)
    produced = [0]
    headers = {
        **world.h(world.admin),
        "Content-Type": "multipart/form-data; boundary=XyZ",
        "Content-Length": str(50 * MB),
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=counting), base_url="http://test") as c:
        response = await c.post(
            f"/api/agents/{world.agent.id}/avatar", content=multipart_stream(50 * MB, produced), headers=headers
        )
    assert response.status_code == 413
    assert counting.received == 0


async def test_file_part_over_avatar_cap_is_413(database_url: str, tmp_path: Path, world: World) -> None:
    small = make_settings(database_url, tmp_path, AVATAR_MAX_BYTES=4096)
    app = create_app(small)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            image = noise_png(64)
            assert 4096 < len(image) < 64 * 1024
            response = await c.post(
                f"/api/agents/{world.agent.id}/avatar",
                files={"file": ("n.png", image, "image/png")},
                headers=auth_headers(small, world.admin),
            )
            assert response.status_code == 413
            assert "larger than 4096 bytes" in response.json()["detail"]
            ok = await c.post(
                f"/api/agents/{world.agent.id}/avatar",
                files={"file": ("n.png", png_bytes(), "image/png")},
                headers=auth_headers(small, world.admin),
            )
            assert ok.status_code == 200
    finally:
        await shutdown(app)


# --- serving ----------------------------------------------------------------------------------


async def test_read_avatar_serves_real_type_with_validators(client: httpx.AsyncClient, world: World) -> None:
    url = (await upload(client, world, image_bytes("WEBP"), filename="a.png")).json()["avatar_url"]
    response = await client.get(url, headers=world.h(world.member))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "immutable" in response.headers["cache-control"]
    etag = response.headers["etag"]
    assert etag.startswith('"')
    again = await client.get(url, headers={**world.h(world.member), "If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    no_version = await client.get(f"/api/agents/{world.agent.id}/avatar", headers=world.h(world.member))
    assert no_version.headers["cache-control"] == "private, no-cache"
    assert no_version.content == response.content


async def test_avatar_url_and_etag_change_with_the_avatar(client: httpx.AsyncClient, world: World) -> None:
    first = await upload(client, world, png_bytes())
    old_etag = (await client.get(first.json()["avatar_url"], headers=world.h(world.admin))).headers["etag"]
    second = await upload(client, world, image_bytes("JPEG"), ctype="image/jpeg")
    assert second.json()["avatar_url"] != first.json()["avatar_url"]
    assert second.json()["avatar_url"].endswith("?v=2")
    fresh = await client.get(second.json()["avatar_url"], headers={**world.h(world.admin), "If-None-Match": old_etag})
    assert fresh.status_code == 200
    assert fresh.headers["content-type"] == "image/jpeg"
    listed = await client.get("/api/agents", headers=world.h(world.member))
    assert listed.json()[0]["avatar_url"] == second.json()["avatar_url"]


async def test_two_uploads_at_once_get_two_versions(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    """Another admin's upload is committing (it holds the agent's row) when this one is stored. Both computed
    version + 1 from what they read, so both images went out as `?v=1`, which browsers keep for a year: the
    first image stayed wherever it was seen. The version is now bumped under the row's lock."""
    other = await asyncpg.connect(_plain_url(world.settings.DATABASE_URL), timeout=5)
    try:
        async with other.transaction():  # the other upload, as set_avatar writes it
            await other.execute(
                "UPDATE agents SET avatar = $1, avatar_content_type = 'image/png', avatar_version = 1 WHERE id = $2",
                png_bytes((8, 8)),
                world.agent.id,
            )
            uploading = asyncio.create_task(upload(client, world, image_bytes("JPEG"), ctype="image/jpeg"))
            await until_a_statement_waits(other, "%agents%")
        uploaded = await uploading
    finally:
        await other.close()
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["avatar_url"].endswith("?v=2")
    _data, content_type, version = await stored(session, world.agent)
    assert (content_type, version) == ("image/jpeg", 2)


async def test_read_avatar_when_none_is_404(client: httpx.AsyncClient, world: World) -> None:
    response = await client.get(f"/api/agents/{world.agent.id}/avatar", headers=world.h(world.member))
    assert response.status_code == 404
    assert response.json() == {"detail": "Avatar not found"}


async def test_read_avatar_of_other_team_is_404(client: httpx.AsyncClient, world: World) -> None:
    await upload(client, world, png_bytes())
    response = await client.get(f"/api/agents/{world.agent.id}/avatar", headers=world.h(world.foreigner))
    assert response.status_code == 404
    assert response.json() == {"detail": "Agent not found"}


async def test_read_avatar_without_token_is_401(client: httpx.AsyncClient, world: World) -> None:
    await upload(client, world, png_bytes())
    response = await client.get(f"/api/agents/{world.agent.id}/avatar")
    assert response.status_code == 401


async def test_foreign_team_agent_avatar_is_hidden(
    client: httpx.AsyncClient, world: World, session: AsyncSession
) -> None:
    other = await create_agent(session, team=await create_team(session))
    response = await client.get(f"/api/agents/{other.id}/avatar", headers=world.h(world.admin))
    assert response.status_code == 404
    assert response.json() == {"detail": "Agent not found"}


async def test_delete_avatar_clears_it(client: httpx.AsyncClient, world: World, session: AsyncSession) -> None:
    url = (await upload(client, world, png_bytes())).json()["avatar_url"]
    response = await client.delete(f"/api/agents/{world.agent.id}/avatar", headers=world.h(world.admin))
    assert response.status_code == 204
    assert await stored(session, world.agent) == (None, None, 2)
    agent = await client.get(f"/api/agents/{world.agent.id}", headers=world.h(world.member))
    assert agent.json()["avatar_url"] is None
    gone = await client.get(url, headers=world.h(world.member))
    assert gone.status_code == 404
    again = await client.delete(f"/api/agents/{world.agent.id}/avatar", headers=world.h(world.admin))
    assert again.status_code == 204
    assert await stored(session, world.agent) == (None, None, 2)


@pytest.mark.parametrize("who", ["member", "foreigner"])
async def test_delete_avatar_by_member_or_other_team_is_refused(
    client: httpx.AsyncClient, world: World, session: AsyncSession, who: str
) -> None:
    await upload(client, world, png_bytes())
    response = await client.delete(f"/api/agents/{world.agent.id}/avatar", headers=world.h(getattr(world, who)))
    assert response.status_code == (403 if who == "member" else 404)
    _, content_type, version = await stored(session, world.agent)
    assert (content_type, version) == ("image/png", 1)


async def test_openapi_documents_the_multipart_file_field(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    upload_op = schema["paths"]["/api/agents/{agent_id}/avatar"]["post"]
    content = upload_op["requestBody"]["content"]
    assert "multipart/form-data" in content
    assert {"413", "415"} <= set(upload_op["responses"])
    download = schema["paths"]["/api/agents/{agent_id}/avatar"]["get"]
    assert "image/png" in download["responses"]["200"]["content"]
