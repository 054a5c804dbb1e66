"""Swagger UI and ReDoc work without internet: every asset comes from the service itself. The manual (README and
docs/) names only settings and routes that exist, and its links reach their pages and headings."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.middleware import DOCS_CSP
from main import create_app
from tests.conftest import ROOT, make_settings

#: Every URL a docs page makes the browser fetch: src/href attributes, the OpenAPI and redirect URLs.
ASSET_RE = re.compile(r"""(?:src|href|spec-url)="([^"]+)"|url: '([^']+)'|oauth2RedirectUrl: [^']*'([^']+)'""")
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",), ".png": ("image/png",)}


def page_urls(html: str) -> list[str]:
    return [next(group for group in match.groups() if group) for match in ASSET_RE.finditer(html)]


@pytest.mark.parametrize(("page", "expected"), [("/docs", 5), ("/redoc", 3)])
async def test_docs_page_loads_only_same_origin_assets(client: httpx.AsyncClient, page: str, expected: int) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "://" not in response.text  # no CDN, no Google Fonts, no external favicon
    urls = page_urls(response.text)
    assert len(urls) == expected
    for url in urls:
        assert re.match(r"/[^/]", url), url  # a path on this origin, not //host
        answer = await client.get(url)
        assert answer.status_code == 200, url
        suffix = url[url.rfind(".") :]
        if suffix in CONTENT_TYPES:
            assert answer.headers["content-type"].split(";")[0] in CONTENT_TYPES[suffix], url
            assert len(answer.content) > 1000, url
        elif url == "/openapi.json":
            assert answer.json()["info"]["title"] == "n8n Chat Relay"
        else:
            assert answer.headers["content-type"].startswith("text/html"), url


async def test_swagger_ui_keeps_authorization_and_the_oauth2_redirect(client: httpx.AsyncClient) -> None:
    html = (await client.get("/docs")).text
    assert '"persistAuthorization": true' in html
    assert "oauth2RedirectUrl: window.location.origin + '/docs/oauth2-redirect'" in html
    redirect = await client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200
    assert "swaggerUIRedirectOauth2" in redirect.text


async def test_docs_routes_are_not_in_the_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if path.startswith(("/docs", "/redoc"))]


async def test_docs_csp_names_no_other_host(client: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert (await client.get(page)).headers["content-security-policy"] == DOCS_CSP
    assert "http" not in DOCS_CSP
    assert "script-src 'self' 'unsafe-inline';" in DOCS_CSP


async def test_missing_docs_asset_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs/assets/nope.js")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    traversal = await client.get("/docs/assets/..%2F__init__.py")
    assert traversal.status_code == 404


# --- the manual's names: settings, routes, links ------------------------------------------------------

#: The manual: the README and every page of docs/.
MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: A name in the style of a setting (`N8N_READ_TIMEOUT`), not part of a longer word, path or `$VARIABLE`.
SETTING_LIKE = re.compile(r"(?<![\w$./-])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
#: Names of that style the manual may use that are no setting and defined nowhere here: uvicorn's, Linux's, the
#: socket option the write-stall limit sets, typing's.
OTHER_PROGRAMS = {"FORWARDED_ALLOW_IPS", "SCHED_IDLE", "SO_LINGER", "TYPE_CHECKING"}
#: `GET /api/...`, `GET/POST /api/chats`, `POST /api/agents/{agent id}/n8n-chat`: a route with its method(s).
ROUTE = re.compile(
    r"\b((?:GET|POST|PUT|PATCH|DELETE|HEAD)(?:/(?:GET|POST|PUT|PATCH|DELETE|HEAD))*) "
    r"(/(?:api|v1|health|ready|metrics)(?:[\w.…-]|/|\{[^}\n]*\}|<[^>\n]*>)*)"
)
#: A path in backticks under /api or /v1 without a method (`/api/agents/<agent id>/n8n-chat`).
BARE_PATH = re.compile(r"`(/(?:api|v1)(?:/[^`\s?]*)?)")


def backticked(text: str) -> list[str]:
    """The inline code spans of a Markdown text (fenced blocks excluded: they hold shell and JSON)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def defined_names() -> set[str]:
    """Every setting, and every upper-case name the code defines or reads from the environment."""
    sources = [path for part in ("app", "tools", "bench", "tests") for path in (ROOT / part).rglob("*.py")]
    code = "\n".join(path.read_text() for path in sources)
    constants = re.findall(r"^\s*([A-Z][A-Z0-9_]+)\s*(?::[^=\n]+)?=", code, re.M)  # NAME = ... / NAME: T = ...
    quoted = re.findall(r"""["']([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)["']""", code)  # an environment variable's name
    make = re.findall(r"^([A-Z][A-Z0-9_]+)\s*[?:]?=", (ROOT / "Makefile").read_text(), re.M)
    return set(Settings.model_fields) | set(constants) | set(quoted) | set(make) | OTHER_PROGRAMS


def test_every_setting_the_manual_names_exists() -> None:
    """A renamed or misspelt setting in the manual (`N8N_TIMEOUT` for `N8N_READ_TIMEOUT`) is set by readers and
    silently ignored by the service (unknown environment variables are no error)."""
    known = defined_names()
    unknown = {
        f"{path.name}: {name}"
        for path in MANUAL
        for span in backticked(path.read_text())
        for name in SETTING_LIKE.findall(span)
        if name not in known
    }
    assert not unknown, sorted(unknown)


def test_env_example_sets_only_settings() -> None:
    """The other direction of tests/test_config.py's check: a line of .env.example naming no setting (a stale name)
    would be copied into .env and do nothing."""
    text = (ROOT / ".env.example").read_text()
    named = re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, re.M)
    assert named
    assert not sorted(set(named) - set(Settings.model_fields))


def _segments(path: str) -> list[str]:
    """A path's segments, every `{id}`, `{agent id}` or `<agent id>` placeholder the same."""
    path = re.sub(r"\{[^}]*\}|<[^>]*>", "{}", path)
    return [segment for segment in path.strip("/").split("/") if segment]


def _starts(documented: list[str], route: list[str], *, whole: bool) -> bool:
    if len(documented) > len(route) or (whole and len(documented) != len(route)):
        return False
    return all(d == r or (d == "{}" and r.startswith("{")) for d, r in zip(documented, route, strict=False))


def schema_routes(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """(method, segments) of every operation of the OpenAPI document: an app that never touches a database."""
    app = create_app(make_settings("postgresql+asyncpg://postgres@127.0.0.1:5432/unused", tmp_path))
    return [(method.upper(), _segments(path)) for path, ops in app.openapi()["paths"].items() for method in ops]


def test_every_route_the_manual_names_exists(tmp_path: Path) -> None:
    """`METHOD /path` in the manual is an operation of the service with that method; `…` ends a path's prefix
    (`/api/chats/{id}/files…`); a path in backticks without a method is (the start of) a route's path."""
    routes = schema_routes(tmp_path)
    missing: set[str] = set()
    for path in MANUAL:
        text = path.read_text()
        for methods, route in ROUTE.findall(text):
            prefix = route.endswith("…")
            segments = _segments(route.rstrip("…").split("?")[0])
            for method in methods.split("/"):
                if not any(m == method and _starts(segments, r, whole=not prefix) for m, r in routes):
                    missing.add(f"{path.name}: {method} {route}")
        for span in backticked(text):
            match = BARE_PATH.match(f"`{span}")
            if match and not any(_starts(_segments(match[1].rstrip("…*")), r, whole=False) for _, r in routes):
                missing.add(f"{path.name}: {span}")
    assert not missing, sorted(missing)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as `-`, `-1` on repeats."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        anchors.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def test_the_manuals_links_reach_a_file_and_heading() -> None:
    broken: list[str] = []
    for page in MANUAL:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked.read_text()):
                broken.append(f"{page.name}: {target}")
    assert not broken


def test_readme_starts_with_make_run_and_make_test() -> None:
    first_block = (ROOT / "README.md").read_text().split("```", 2)[1]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "run"], ["make", "test"]]
