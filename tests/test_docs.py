"""Swagger UI and ReDoc work without internet: every asset comes from the service itself."""

from __future__ import annotations

import re

import httpx
import pytest

from app.middleware import DOCS_CSP

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
