"""Agent answers are untrusted: in a real Chromium, markup in an answer renders inert (no dialog, no script,
no javascript: link, no raw HTML element), live and after a reload; the page's CSP stops inline code and styles."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.live import LiveServer
from tests.web import Team, Watched, create_team, log_in, send

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

#: Echoed back word by word by the fake n8n, so each is exactly what the "agent" answers. No spaces inside
#: a payload (the echo splits on whitespace).
PAYLOADS = [
    "<img/src=x/onerror=alert(1)>",
    "<img src=x onerror='window.__xss=1'>",
    "<script>alert(2)</script>",
    "<svg/onload=alert(3)>",
    "<iframe/src=javascript:alert(4)>",
    "[click](javascript:alert(5))",
    "<a/href=javascript:alert(6)>raw</a>",
    "![pic](x'onerror='alert(7))",
    "![pixel](https://tracker.example/p.gif)",
    "<b/onmouseover=alert(8)>bold</b>",
    "<style>body{display:none}</style>",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCg5KTwvc2NyaXB0Pg==)",
]


@pytest.fixture
def team(web_server: LiveServer, fake_n8n_url: str) -> Team:
    created = create_team(web_server.url)
    created.create_agent(f"{fake_n8n_url}/webhook/agent-stream")
    return created


def assert_inert(page: Page, watched: Watched) -> None:
    content = page.locator(".msg.assistant .content").last
    # No element an answer could run code or load anything with...
    # (a Markdown image becomes a link to it: nothing is fetched)
    dangerous = "script, img, svg, iframe, object, embed, style, form, input, [onerror], [onload], [onmouseover]"
    assert content.locator(dangerous).count() == 0
    hrefs = content.locator("a").evaluate_all("(links) => links.map((a) => a.getAttribute('href'))")
    assert all(not (h or "").lower().startswith(("javascript:", "data:", "vbscript:")) for h in hrefs), hrefs
    # ...the markup is shown as text instead...
    assert "<img/src=x/onerror=alert(1)>" in content.inner_text()
    assert "<script>alert(2)</script>" in content.inner_text()
    # ...and nothing ran.
    assert page.evaluate("window.__xss") is None
    assert watched.dialogs == []
    assert watched.errors == []


def test_markup_in_an_answer_renders_inert_live_and_after_reload(web_page: Watched, team: Team) -> None:
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("button", name=re.compile("Echo bot")).click()
    send(page, " ".join(PAYLOADS))
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert_inert(page, web_page)
    page.reload()  # the stored answer goes through the same renderer
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert_inert(page, web_page)
    # The user's own words are plain text too.
    assert page.locator(".msg.user .content").first.locator("img, script, svg").count() == 0


def test_markdown_still_renders_and_links_open_safely(web_page: Watched, team: Team) -> None:
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("button", name=re.compile("Echo bot")).click()
    send(page, "**bold** `code` [docs](https://example.com/docs)")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    content = page.locator(".msg.assistant .content")
    expect(content.locator("strong")).to_have_text("bold")
    expect(content.locator("code")).to_have_text("code")
    link = content.get_by_role("link", name="docs")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(link).to_have_attribute("target", "_blank")


def test_the_page_csp_refuses_inline_script_handlers_and_styles(web_page: Watched) -> None:
    page = web_page.page
    response = page.goto("/")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp
    assert "'unsafe-eval'" not in csp
    assert "script-src 'self'" in csp
    # Enforced by the browser: injected inline code and inline styles do not apply, and each is reported.
    page.evaluate(
        """() => { window.__violations = [];
        document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.effectiveDirective));
        const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; document.body.append(s);
        const d = document.createElement('div'); d.id = 'styled'; d.setAttribute('style', 'color: rgb(255, 0, 0)');
        d.innerHTML = '<img src="/web/app.css" onerror="window.__handler = 1">'; document.body.append(d); }"""
    )
    expect(page.locator("#styled img")).to_have_count(1)
    page.wait_for_function("window.__violations.length >= 3")
    assert page.evaluate("window.__inline") is None
    assert page.evaluate("window.__handler") is None
    assert page.evaluate("getComputedStyle(document.getElementById('styled')).color") != "rgb(255, 0, 0)"
    assert set(page.evaluate("window.__violations")) >= {"script-src-elem", "script-src-attr", "style-src-attr"}
