"""Reading one uploaded file from a multipart/form-data body as it arrives, with its size capped on the way.

Starlette's form parser would spool the whole body (to memory, then a temporary file) before the endpoint
sees any of it; this reads the ASGI byte stream through python-multipart's streaming parser instead, keeps
only the `file` part, and stops with a 413 the moment that part passes the cap. (The middleware also caps
the whole body: a Content-Length over it is refused before a byte is read, a chunked body as it is counted.)
No FastAPI here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import PayloadTooLarge, RateLimited, Unprocessable, UnsupportedMediaType

FIELD = "file"
#: Bytes of all other parts together (ignored fields), so they cannot be used to make us buffer.
OTHER_PARTS_MAX = 16 * 1024
NOT_MULTIPART = "Send the file as multipart/form-data with a field named `file`"
NO_FILE = "The form has no field `file`"
ONE_FILE = "Send one file per request"
EMPTY = "The file is empty"
MALFORMED = "The multipart body could not be read"
UPLOAD_INTERRUPTED = "The upload was interrupted"


TOO_MANY_UPLOADS = "Too many uploads at once; wait for one to finish"
#: The 429's `Retry-After` (seconds): an upload in flight usually ends within that.
TOO_MANY_UPLOADS_RETRY_SECONDS = "1"


class UploadSlots:
    """Uploads running per user in this process: each holds up to FILE_MAX_BYTES in memory while it is read
    and judged, so one user cannot make the process hold many at once. Per process, not shared: with N
    processes a user runs at most N times the setting."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._running: dict[object, int] = {}

    def take(self, user_id: object) -> None:
        """Claim a slot (429 with `Retry-After` when the user has none left); give it back with `give_back`."""
        running = self._running.get(user_id, 0)
        if running >= self.per_user:
            raise RateLimited(TOO_MANY_UPLOADS, headers={"Retry-After": TOO_MANY_UPLOADS_RETRY_SECONDS})
        self._running[user_id] = running + 1

    def give_back(self, user_id: object) -> None:
        running = self._running.get(user_id, 0) - 1
        if running > 0:
            self._running[user_id] = running
        else:
            self._running.pop(user_id, None)


@dataclass(slots=True)
class Upload:
    """The `file` part: its bytes, the filename and type the client declared (both only hints)."""

    filename: str | None = None
    declared_type: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Reader:
    """python-multipart callbacks collecting the `file` part, refusing a second one and an oversized one."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.upload: Upload | None = None
        self._headers: dict[bytes, bytes] = {}
        self._name = b""
        self._value = b""
        self._in_file = False
        self._other = 0
        #: Set by the closing boundary: python-multipart's `finalize()` checks nothing, so a body cut short
        #: would otherwise pass as a complete (truncated) file.
        self.ended = False

    def on_part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name = self._value = b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if params.get(b"name") != FIELD.encode():
            return
        if self.upload is not None:
            raise Unprocessable(ONE_FILE, loc=("body", FIELD))
        raw_name = params.get(b"filename")
        declared = self._headers.get(b"content-type")
        self.upload = Upload(
            filename=None if raw_name is None else raw_name.decode("utf-8", "replace"),
            declared_type=None if declared is None else declared.decode("latin-1"),
        )
        self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file and self.upload is not None:
            self.upload.data += data[start:end]
            if len(self.upload.data) > self.max_bytes:
                raise PayloadTooLarge(f"The file is larger than {self.max_bytes} bytes")
        else:
            self._other += end - start
            if self._other > OTHER_PARTS_MAX:
                raise PayloadTooLarge("The form's other fields are too large")

    def on_part_end(self) -> None:
        self._in_file = False

    def on_end(self) -> None:
        self.ended = True


async def read_upload(
    chunks: AsyncIterator[bytes], content_type: str | None, max_bytes: int, *, allow_empty: bool = False
) -> Upload:
    """The `file` part of a multipart body read from `chunks`; 415 (not multipart), 413 (over `max_bytes`,
    raised while reading), 422 (no file, two files, a malformed body, an empty file unless `allow_empty`: the
    avatar's judge refuses it with its own 415)."""
    kind, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaType(NOT_MULTIPART)
    reader = _Reader(max_bytes)
    callbacks = {
        name: getattr(reader, name)
        for name in (
            "on_part_begin",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
            "on_end",
        )
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        async for chunk in chunks:
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except (MultipartParseError, ValueError):
        raise Unprocessable(MALFORMED, loc=("body", FIELD)) from None
    if not reader.ended:
        raise Unprocessable(MALFORMED, loc=("body", FIELD))
    if reader.upload is None:
        raise Unprocessable(NO_FILE, loc=("body", FIELD))
    if not reader.upload.data and not allow_empty:
        raise Unprocessable(EMPTY, loc=("body", FIELD))
    return reader.upload
