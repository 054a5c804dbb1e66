"""What an uploaded file is, judged by its bytes only: the allowlisted type, or a refusal (no FastAPI here).

The rule (docs/FILES.md, "Types"):
1. A binary type is recognised by its signature at offset 0 (PNG, JPEG, GIF, WebP, `%PDF-`) and its structure
   (Pillow parses and verifies the image's chunks; a PDF must end with `%%EOF`).
2. Anything else is text: valid UTF-8 without NUL bytes. Its type is the declared one when that is one of the
   text types (`text/plain`, `text/markdown`, `text/csv`, `application/json`), `text/plain` when nothing,
   `application/octet-stream` or another harmless `text/*` (`text/x-log`) was declared; JSON must parse.
3. The declared type must agree: an image or PDF declared as another type, text declared as an image, a PDF
   or any other non-text type, and the active text types (HTML, XML, JavaScript, CSS) are refused. So must the
   file name's extension when it names a type (EXTENSION_TYPES): a download is saved under that name.
4. No polyglots: markup a browser would render (`<html`, `<script`, `<svg`, `<iframe`, `<!doctype`, `<?xml`,
   `<object`, `<embed`, `<body`) anywhere in the file, and in a PDF its active parts (`/JavaScript`, `/JS`,
   `/Launch`), refuse it whatever the type.
Everything refused is a 415; the type stored is the one judged here, never the client's.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
import urllib.parse
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from app.errors import UnsupportedMediaType

TEXT_TYPES = ("text/plain", "text/markdown", "text/csv", "application/json")
#: What clients commonly declare for the same thing.
ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "text/x-markdown": "text/markdown",
    "text/md": "text/markdown",
    "application/csv": "text/csv",
    "text/json": "application/json",
}
#: Declared types that say nothing about the content.
GENERIC = ("", "application/octet-stream")
#: Text types a browser renders or runs: never stored, not even as plain text. JavaScript by every name a
#: browser runs as JavaScript (WHATWG MIME Sniffing, "JavaScript MIME type"; the `application/` ones are
#: refused as non-text types anyway).
ACTIVE_TEXT_TYPES = (
    "text/html",
    "text/xml",
    "text/xml-external-parsed-entity",
    "text/xsl",
    "text/css",
    "text/ecmascript",
    "text/javascript",
    "text/javascript1.0",
    "text/javascript1.1",
    "text/javascript1.2",
    "text/javascript1.3",
    "text/javascript1.4",
    "text/javascript1.5",
    "text/jscript",
    "text/livescript",
    "text/x-ecmascript",
    "text/x-javascript",
)
_PILLOW_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
#: What the extensions of PROGRAM_EXTENSIONS name: no media type, a program (never stored under such a name).
PROGRAM = "program"
#: Extensions a double-click runs as a program, or hands to one that runs it, which text (valid UTF-8 without
#: NUL) can be: Windows' batch, PowerShell, Windows Script Host and registry files, shortcuts (`.url`, `.scf`,
#: `.lnk`), ClickOnce and shell links, printable x86 code (`.com`, `.exe`...), Excel's web queries and SYLK;
#: macOS Finder's `.command` and `.tool` (run in Terminal); a Linux desktop's `.desktop` launcher. Scripts a
#: double-click only opens in an editor (`.sh`, `.py`) are not listed.
PROGRAM_EXTENSIONS = (
    *("bat", "cmd", "btm", "com", "exe", "scr", "pif", "cpl", "dll", "msi", "msp", "msc", "gadget", "jar"),
    *("ps1", "psm1", "psd1", "ps1xml", "psc1", "ps2", "ps2xml", "psc2"),
    *("vb", "vbs", "vbe", "jse", "ws", "wsf", "wsc", "wsh", "sct"),
    *("reg", "inf", "url", "scf", "lnk", "application", "appref-ms", "settingcontent-ms", "library-ms"),
    *("search-ms", "searchconnector-ms", "iqy", "slk"),
    *("command", "tool", "desktop"),
)
#: What a file name's extension says the file is: the allowed types, and the types a browser, a PDF reader or
#: Windows opens as a page, an image with scripts or a program when the download is opened under that name.
#: The name is kept and a download is saved under it, so it may only narrow the type: an extension listed
#: here must agree with the content. Any other extension (`.py`, `.log`, none) says nothing.
EXTENSION_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "jpe": "image/jpeg",
    "jfif": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "pdf": "application/pdf",
    "txt": "text/plain",
    "text": "text/plain",
    "md": "text/markdown",
    "markdown": "text/markdown",
    "csv": "text/csv",
    "json": "application/json",
    **dict.fromkeys(("html", "htm", "xhtml", "xht", "shtml", "mht", "mhtml", "hta"), "text/html"),
    **dict.fromkeys(("svg", "svgz"), "image/svg+xml"),
    **dict.fromkeys(("xml", "xsl", "xslt"), "text/xml"),
    **dict.fromkeys(("js", "mjs"), "text/javascript"),
    "css": "text/css",
    **dict.fromkeys(PROGRAM_EXTENSIONS, PROGRAM),
}
MARKUP_RE = re.compile(
    rb"<(?:script|html|body|iframe|object|embed|svg|\?xml|!doctype)[\s>/]|<(?:svg|html|script)$", re.IGNORECASE
)
PDF_ACTIVE_RE = re.compile(rb"/(?:JavaScript|JS|Launch)(?![A-Za-z0-9])")
#: A PDF name may spell any byte as `#xx` (`/JavaScr#69pt` is `/JavaScript`): names are decoded before matching.
_PDF_NAME_ESCAPE = re.compile(rb"#([0-9A-Fa-f]{2})")
PDF_EOF_WINDOW = 1024
FILENAME_MAX = 255
#: Control characters (C0, DEL and C1: U+0085 breaks a line, U+009B starts a terminal escape), quotes and
#: slashes; and the bidirectional controls (U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069: Unicode's
#: Bidi_Control) that display `invoice\u202efdp.exe` to colleagues as `invoiceexe.pdf`.
#: What a name may end with that a browser or Windows drops when it saves the file.
_NAME_END = re.compile(r"[\s.]+$")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\"\\/\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

UNSUPPORTED = "Unsupported file type: send an image (PNG, JPEG, GIF, WebP), a PDF, or UTF-8 text"
MISMATCH = "The file's content does not match its declared type"
POLYGLOT = "The file holds markup or active content a browser or reader could run"
BAD_JSON = "The file is declared as JSON but does not parse"
NOT_ALLOWED = "This file type is not accepted here"
#: The name's refusals say so: a browser declares the type the name says, so "declared type" named nothing the
#: user chose. `{extension}` is one of EXTENSION_TYPES' keys, never other text from the name.
NAME_REFUSED = (
    "The file name's extension .{extension} is not accepted (it opens as a page, a script or a program): "
    "rename the file"
)
NAME_MISMATCH = "The file name's extension .{extension} does not match the file's content: rename the file"
#: What the refused extensions say: a page, an image with scripts, a stylesheet, a script or a program.
ACTIVE_NAMED_TYPES = ("text/html", "image/svg+xml", "text/xml", "text/javascript", "text/css", PROGRAM)


@dataclass(frozen=True, slots=True)
class Judged:
    content_type: str


def _signature(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    return None


def normalized(declared: str | None) -> str:
    """The declared media type without parameters, lower-cased, common aliases resolved."""
    value = (declared or "").split(";", 1)[0].strip().lower()
    return ALIASES.get(value, value)


def _check_image(data: bytes, expected: str) -> None:
    with warnings.catch_warnings():
        # The header's dimensions are not decoded here (no pixel is), so a large image is not a bomb for us.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=list(_PILLOW_FORMATS)) as image:
                if _PILLOW_FORMATS.get(image.format or "") != expected:
                    raise UnsupportedMediaType(UNSUPPORTED)
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise UnsupportedMediaType(UNSUPPORTED) from None


def _check_pdf(data: bytes) -> None:
    if b"%%EOF" not in data[-PDF_EOF_WINDOW:]:
        raise UnsupportedMediaType(UNSUPPORTED)
    decoded = _PDF_NAME_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    if PDF_ACTIVE_RE.search(decoded):
        raise UnsupportedMediaType(POLYGLOT)


def _text_type(data: bytes, declared: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedMediaType(UNSUPPORTED) from None
    if "\x00" in text:
        raise UnsupportedMediaType(UNSUPPORTED)
    if declared in GENERIC or (declared.startswith("text/") and declared not in ACTIVE_TEXT_TYPES + TEXT_TYPES):
        return "text/plain"
    if declared not in TEXT_TYPES:
        raise UnsupportedMediaType(MISMATCH)
    if declared == "application/json":
        try:
            json.loads(text.removeprefix("\ufeff"))  # a byte order mark may be ignored (RFC 8259, 8.1)
        except (ValueError, RecursionError):
            raise UnsupportedMediaType(BAD_JSON) from None
    return declared


def _extension(filename: str) -> str:
    """The name's extension, lower-cased ('' when there is none). Read as a browser saving the download, or
    Windows, would: without invisible characters (U+200B, U+FEFF, U+180E...) and the dots and spaces it ends
    with, which they drop (`page.html .` is kept, and saved as `page.html`)."""
    visible = "".join(ch for ch in filename if unicodedata.category(ch) != "Cf")
    _, dot, extension = _NAME_END.sub("", visible).rpartition(".")
    return extension.lower() if dot else ""


def _check_name(filename: str, detected: str | None) -> None:
    """Refuse a name whose extension is an active type's or another type's than the content's (text suits any
    text extension). Checked before the declared type, which a browser takes from this same name."""
    extension = _extension(filename)
    named = EXTENSION_TYPES.get(extension)
    if named is None:
        return
    if named in ACTIVE_NAMED_TYPES:
        raise UnsupportedMediaType(NAME_REFUSED.format(extension=extension))
    if named != detected and not (detected is None and named in TEXT_TYPES):
        raise UnsupportedMediaType(NAME_MISMATCH.format(extension=extension))


def judge(data: bytes, declared: str | None, allowed: list[str], filename: str = "") -> Judged:
    """The file's type by content (the module's rule); raises UnsupportedMediaType (415). CPU-bound. `filename`
    is the name kept (cleaned): its extension may only narrow the type, like the declared type."""
    claimed = normalized(declared)
    if MARKUP_RE.search(data):
        raise UnsupportedMediaType(POLYGLOT)
    detected = _signature(data)
    _check_name(filename, detected)
    if detected is None:
        content_type = _text_type(data, claimed)
    else:
        if claimed not in GENERIC and claimed != detected:
            raise UnsupportedMediaType(MISMATCH)
        if detected == "application/pdf":
            _check_pdf(data)
        else:
            _check_image(data, detected)
        content_type = detected
    if content_type not in allowed:
        raise UnsupportedMediaType(NOT_ALLOWED)
    return Judged(content_type=content_type)


def clean_filename(raw: str | None) -> str:
    """A name safe to store and show: the last path segment, no control characters (bidirectional ones
    included), quotes or slashes, NFC, at most 255 characters; `file` when nothing is left."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name)
    name = "".join(ch for ch in name if not 0xD800 <= ord(ch) <= 0xDFFF).strip().strip(".")
    return name[:FILENAME_MAX] or "file"


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the exact name as RFC 6266 / RFC 5987 `filename*`."""
    fallback = filename.encode("ascii", "replace").decode().replace("?", "_").replace("%", "_")
    quoted = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quoted}"
