"""Agent avatars: judge the upload by its content, refuse bombs and polyglots, re-encode, store in the database.

The image is decoded and re-encoded from its pixels only, so no metadata (EXIF, GPS, ICC, text chunks) and no
appended payload survives. GIFs keep their first frame only (a static GIF): animation would multiply the
decoding cost by the frame count for an avatar nobody needs animated.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from PIL import ExifTags, Image, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.errors import NotFound, PayloadTooLarge, UnsupportedMediaType
from app.models import Agent, User
from app.services.agents import AGENT_NOT_FOUND, get_team_agent
from app.uploads import read_upload

logger = logging.getLogger(__name__)

AVATAR_NOT_FOUND = "Avatar not found"
UNSUPPORTED = "Unsupported image: send a PNG, JPEG, WebP or GIF file"
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
#: Markup that makes a file a polyglot a browser could render as HTML/SVG/XML; no real image needs it.
MARKUP_RE = re.compile(rb"<(?:script|html|body|iframe|svg[\s>/]|\?xml|!doctype)", re.IGNORECASE)
PNG_END = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class StoredAvatar:
    data: bytes
    content_type: str


def process_avatar(raw: bytes, settings: Settings) -> StoredAvatar:
    """Validate and re-encode one upload (CPU-bound: run it in a thread). Raises 413 or 415."""
    if len(raw) > settings.AVATAR_MAX_BYTES:
        raise PayloadTooLarge(f"Avatar is larger than {settings.AVATAR_MAX_BYTES} bytes")
    if MARKUP_RE.search(raw):
        raise UnsupportedMediaType(UNSUPPORTED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw), formats=list(FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow's own limit, hit by headers declaring far more pixels than ours: too large, not wrong.
            raise _too_many_pixels(settings) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            # Pillow's plugins also refuse malformed headers with ValueError ("Too much memory used in text
            # chunks"), SyntaxError or EOFError; each means the bytes are not an image we take.
            raise UnsupportedMediaType(UNSUPPORTED) from None
        with image:
            fmt = image.format or ""
            if fmt not in FORMATS:
                raise UnsupportedMediaType(UNSUPPORTED)
            # Checked on the header, before a single pixel is decoded.
            if image.width * image.height > settings.AVATAR_MAX_PIXELS:
                raise _too_many_pixels(settings)
            if fmt == "PNG" and raw.rstrip(b"\x00")[-len(PNG_END) :] != PNG_END:
                # Bytes after the final IEND chunk: a PNG with something else appended.
                raise UnsupportedMediaType(UNSUPPORTED)
            try:
                image.seek(0)
                image.load()
                data = _reencode(image, fmt, settings.AVATAR_MAX_SIDE)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise _too_many_pixels(settings) from None
            except (OSError, ValueError, SyntaxError):
                raise UnsupportedMediaType(UNSUPPORTED) from None
    return StoredAvatar(data=data, content_type=FORMATS[fmt])


def _too_many_pixels(settings: Settings) -> PayloadTooLarge:
    return PayloadTooLarge(f"Avatar has more than {settings.AVATAR_MAX_PIXELS} pixels")


#: EXIF orientation -> the turn that shows the pixels upright (as Pillow's ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image) -> Image.Image:
    """The JPEG turned as its EXIF orientation says. Not ImageOps.exif_transpose: it writes the EXIF back into
    the result, and Pillow's writer raises TypeError or struct.error on malformed tags (which were a 500), for
    metadata the re-encoding drops anyway."""
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    turn = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image if turn is None else image.transpose(turn)


def _reencode(image: Image.Image, fmt: str, max_side: int) -> bytes:
    if fmt == "JPEG":
        image = _upright(image)
    if fmt == "GIF":
        frame = image.convert("RGBA")
    elif image.mode in ("1", "L", "LA", "RGB", "RGBA"):
        frame = image.copy()
    elif image.mode == "P":
        frame = image.convert("RGBA")
    else:
        frame = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    frame.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    # A fresh image from raw pixels carries no `info` (EXIF, ICC, text chunks, comments).
    clean = Image.frombytes(frame.mode, frame.size, frame.tobytes())
    out = io.BytesIO()
    if fmt == "PNG":
        clean.save(out, "PNG", optimize=True)
    elif fmt == "JPEG":
        clean.convert("RGB").save(out, "JPEG", quality=85, optimize=True)
    elif fmt == "WEBP":
        clean.save(out, "WEBP", quality=85)
    else:
        _save_gif(clean, out)
    return out.getvalue()


def _save_gif(frame: Image.Image, out: io.BytesIO) -> None:
    """One static frame; fully transparent pixels stay transparent through the palette."""
    if frame.mode != "RGBA":
        frame.convert("RGB").quantize(colors=256).save(out, "GIF")
        return
    alpha = frame.getchannel("A")
    paletted = frame.convert("RGB").quantize(colors=255)
    transparent = alpha.point(lambda a: 255 if a < 128 else 0)
    paletted.paste(255, mask=transparent)
    paletted.save(out, "GIF", transparency=255)


async def set_avatar(
    *,
    session: AsyncSession,
    settings: Settings,
    user: User,
    agent_id: uuid.UUID,
    chunks: AsyncIterator[bytes],
    content_type: str | None,
) -> Agent:
    """Read the multipart body's `file` part as a chat file's is (app.uploads: 415 not multipart, 413 past
    AVATAR_MAX_BYTES while it arrives, 422 malformed or no or two `file` parts), store it as the new avatar and
    bump `avatar_version`, so `avatar_url` (and every cache key) changes. The version is bumped under the row's
    lock: two uploads at once both wrote version + 1, and the first image, already handed out under that
    version as immutable for a year, stayed in every cache that had it."""
    await get_team_agent(session=session, user=user, agent_id=agent_id)  # a foreign id is a 404 before the body
    await session.commit()  # no connection held while the body arrives and the image is processed
    # An empty file is the judge's 415, as any other non-image.
    upload = await read_upload(chunks, content_type, settings.AVATAR_MAX_BYTES, allow_empty=True)
    stored = await anyio.to_thread.run_sync(process_avatar, bytes(upload.data), settings)
    agent = await get_team_agent(session=session, user=user, agent_id=agent_id, for_update=True)
    agent.avatar = stored.data
    agent.avatar_content_type = stored.content_type
    agent.avatar_version = agent.avatar_version + 1
    await session.commit()
    logger.info("agent %s avatar set (%s, %d bytes)", agent.id, stored.content_type, len(stored.data))
    return agent


async def remove_avatar(*, session: AsyncSession, user: User, agent_id: uuid.UUID) -> Agent:
    """Drop the avatar (idempotent); the version still grows so no cache keeps showing the old one."""
    agent = await get_team_agent(session=session, user=user, agent_id=agent_id, for_update=True)
    if agent.avatar_content_type is not None:
        agent.avatar = None
        agent.avatar_content_type = None
        agent.avatar_version = agent.avatar_version + 1
        await session.commit()
        logger.info("agent %s avatar removed", agent.id)
    return agent


@dataclass(frozen=True)
class AvatarFile:
    data: bytes | None
    content_type: str
    version: int
    etag: str


def avatar_etag(agent_id: uuid.UUID, version: int) -> str:
    return '"' + hashlib.sha256(f"{agent_id}:{version}".encode()).hexdigest()[:32] + '"'


async def read_avatar(
    *, session: AsyncSession, user: User, agent_id: uuid.UUID, if_none_match: str | None
) -> AvatarFile:
    """The avatar of a team agent; `data` is None when the client's ETag still matches (the bytes are not read)."""
    query = select(Agent.avatar_content_type, Agent.avatar_version).where(
        Agent.id == agent_id, Agent.team_id == user.team_id
    )
    row = (await session.execute(query)).one_or_none()
    if row is None:
        raise NotFound(AGENT_NOT_FOUND)
    content_type, version = row
    if content_type is None:
        raise NotFound(AVATAR_NOT_FOUND)
    etag = avatar_etag(agent_id, version)
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        return AvatarFile(data=None, content_type=content_type, version=version, etag=etag)
    # The bytes with their own version and type: an upload between the two reads must not send its image
    # under the previous version's ETag.
    current = select(Agent.avatar, Agent.avatar_content_type, Agent.avatar_version).where(Agent.id == agent_id)
    data, content_type, version = (await session.execute(current)).one()
    if data is None or content_type is None:
        raise NotFound(AVATAR_NOT_FOUND)
    return AvatarFile(data=data, content_type=content_type, version=version, etag=avatar_etag(agent_id, version))
