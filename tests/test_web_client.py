"""Serving the browser client: `/` and `/web/...` with their CSP, gzip and revalidation, outside the OpenAPI
document, switched off by WEB_CLIENT_ENABLED; the vendored modules are the pinned ones; cookie writes from
another origin are still refused."""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from app.middleware import API_CSP, DOCS_CSP, WEB_CSP
from app.webclient import WEB_DIR
from tests.authhelpers import login
from tests.factories import DEFAULT_PASSWORD, create_user

VENDOR = WEB_DIR / "vendor"


async def test_root_serves_the_client_with_its_csp(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == WEB_CSP
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-frame-options"] == "DENY"
    assert '<script type="module" src="/web/js/main.js"></script>' in response.text
    # No inline code or style: every script has a src, no style attribute, no <style> element.
    assert re.findall(r"<script(?![^>]*\ssrc=)", response.text) == []
    assert " style=" not in response.text
    assert "<style" not in response.text
    assert (await client.head("/")).status_code == 200


def test_the_csp_allows_nothing_inline_and_nothing_foreign() -> None:
    directives = dict(part.strip().split(" ", 1) for part in WEB_CSP.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["object-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in WEB_CSP


async def test_static_files_are_gzipped_and_revalidated(client: httpx.AsyncClient) -> None:
    response = await client.get("/web/vendor/purify.es.mjs", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["content-security-policy"] == WEB_CSP
    assert response.headers["cache-control"] == "no-cache"
    assert response.content == (VENDOR / "purify.es.mjs").read_bytes()  # httpx decoded it
    etag = response.headers["etag"]
    again = await client.get("/web/vendor/purify.es.mjs", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert (await client.get("/web/app.css")).headers["content-type"].startswith("text/css")


async def test_unknown_and_escaping_static_paths_are_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/web/nothing.js")).status_code == 404
    assert (await client.get("/web/../main.py")).status_code == 404
    assert (await client.get("/web/%2e%2e/webclient.py")).status_code == 404


async def test_api_and_docs_keep_their_own_csp(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).headers["content-security-policy"] == API_CSP
    assert (await client.get("/docs")).headers["content-security-policy"] == DOCS_CSP


async def test_the_client_is_not_in_the_openapi_document(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/web")]


@pytest.mark.settings(WEB_CLIENT_ENABLED=False)
async def test_the_setting_turns_the_client_off(client: httpx.AsyncClient) -> None:
    assert (await client.get("/")).status_code == 404
    assert (await client.get("/web/js/main.js")).status_code == 404
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/docs")).status_code == 200


def test_vendored_modules_are_the_pinned_ones_with_their_licenses() -> None:
    listed = re.findall(r"^\| (\S+)@(\S+) \| (\S+) \| ([0-9a-f]{64}) \|$", (VENDOR / "README.md").read_text(), re.M)
    assert {name for name, _, _, _ in listed} == {"marked", "dompurify"}
    for package, _version, file, digest in listed:
        assert hashlib.sha256((VENDOR / file).read_bytes()).hexdigest() == digest
        assert (VENDOR / f"{package}.LICENSE").read_text().strip()
    makefile = (WEB_DIR.parents[1] / "tools" / "vendor_web.sh").read_text()
    for package, version, _, _ in listed:
        assert f'"{package}@{version} ' in makefile


def _first_load(module: Path, seen: set[Path]) -> set[Path]:
    """`module` and every module it imports statically, as the browser fetches them on a first visit (an
    `import()` inside a function, e.g. the admin pages, loads on first use only)."""
    seen.add(module)
    for target in re.findall(r'^import [^;]*?from "(\.{1,2}/[^"]+)";', module.read_text(), re.MULTILINE):
        imported = (module.parent / target).resolve()
        if imported not in seen:
            _first_load(imported, seen)
    return seen


def test_the_page_weight_stays_small() -> None:
    """What a first visit transfers (gzip), the figure docs/PERFORMANCE.md reports: the page, its style sheet and
    the modules main.js imports, at most 80 KB; every client file, those loaded on first use included, 100 KB."""
    modules = _first_load((WEB_DIR / "js" / "main.js").resolve(), set())
    assert {module.name for module in modules} >= {"main.js", "chat.js", "purify.es.mjs", "marked.esm.js"}
    assert not {module.name for module in modules} & {"admin.js", "shares.js", "keys.js", "forms.js"}  # on first use

    def gzipped(files: Iterable[Path]) -> int:
        return sum(len(gzip.compress(f.read_bytes())) for f in files)

    assert gzipped([WEB_DIR / "index.html", WEB_DIR / "app.css", *modules]) < 80_000
    every = [WEB_DIR / "index.html", WEB_DIR / "app.css", *WEB_DIR.glob("js/**/*.js"), *VENDOR.glob("*.*js")]
    assert gzipped(every) < 100_000


async def test_cookie_writes_from_another_origin_are_refused(web: httpx.AsyncClient, session: AsyncSession) -> None:
    user = await create_user(session)
    assert (await login(web, user.email, DEFAULT_PASSWORD)).status_code == 200
    foreign = await web.post("/api/api-keys", json={"name": "k"}, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert foreign.json() == {"detail": "Origin not allowed"}
    same = await web.post("/api/api-keys", json={"name": "k"}, headers={"Origin": "https://test"})
    assert same.status_code == 201
