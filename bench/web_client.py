"""The browser client seen from Chromium: `screenshots` (docs/screenshots/*.png) and `measure` (page weight and
time to the first streamed token, docs/PERFORMANCE.md), against a throwaway server (SQLite) and the fake n8n.

    python -m bench.web_client screenshots     # make screenshots
    python -m bench.web_client measure --runs 30
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw
from playwright.sync_api import Browser, FilePayload, Page, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
EMAIL, PASSWORD = "ada@example.com", "correct horse battery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{process.args!r} did not start") from None
            time.sleep(0.1)


@contextmanager
def stack() -> Iterator[tuple[str, str]]:
    """(server url, fake n8n url): `app.cli init` + `serve` on a temporary SQLite database, and the fake n8n."""
    port, fake_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {
            **os.environ,
            "DATA_DIR": data,
            "COOKIE_SECURE": "false",
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
            "RATE_LIMIT_ENABLED": "false",
            "FIRST_TEAM_NAME": "Acme",
            "FIRST_ADMIN_EMAIL": EMAIL,
            "FIRST_ADMIN_PASSWORD": PASSWORD,
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "LOG_LEVEL": "WARNING",
        }
        python = sys.executable
        subprocess.run([python, "-m", "app.cli", "init"], cwd=ROOT, env=env, check=True, capture_output=True)
        quiet = subprocess.DEVNULL
        serve = [python, "-m", "app.cli", "serve", "--port", str(port)]
        server = subprocess.Popen(serve, env=env, cwd=ROOT, stdout=quiet, stderr=quiet)
        fake_n8n = [python, "-m", "tools.fake_n8n", "--port", str(fake_port), "--speed", "0", "--linger", "0.1"]
        fake = subprocess.Popen(fake_n8n, cwd=ROOT, stdout=quiet, stderr=quiet)
        try:
            wait_for_port(port, server)
            wait_for_port(fake_port, fake)
            yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{fake_port}"
        finally:
            for process in (server, fake):
                process.terminate()
                process.wait(15)


def avatar_png(color: tuple[int, int, int], letter_box: tuple[int, int, int, int]) -> bytes:
    image = Image.new("RGB", (128, 128), color)
    ImageDraw.Draw(image).ellipse(letter_box, fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@contextmanager
def api(url: str) -> Iterator[httpx.Client]:
    """A client logged in as the admin (Bearer)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        token = client.post("/api/auth/login", json={"email": EMAIL, "password": PASSWORD}).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def agent(client: httpx.Client, name: str, url: str, description: str, color: tuple[int, int, int]) -> dict[str, Any]:
    created = client.post("/api/agents", json={"name": name, "webhook_url": url, "description": description})
    created.raise_for_status()
    body = created.json()
    files = {"file": ("avatar.png", avatar_png(color, (40, 40, 88, 88)), "image/png")}
    client.post(f"/api/agents/{body['id']}/avatar", files=files).raise_for_status()
    return dict(body)


def log_in(page: Page) -> None:
    page.goto("/")
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("link", name="+ New chat").wait_for()


def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def complete(page: Page) -> None:
    """Until the answer just sent is stored (the page shows the stored chat again)."""
    page.wait_for_selector(".msg.streaming", state="detached")
    page.locator(".msg.assistant").last.and_(page.locator("[data-status=complete]")).wait_for()


MARKDOWN_QUESTION = (
    "Summarise: **three** steps, then `make run`\n\n1. clone\n2. configure\n3. serve\n\n```bash\nmake run\n```"
)


def attach(page: Page, *files: tuple[str, str, bytes]) -> None:
    payloads: list[FilePayload] = [{"name": name, "mimeType": kind, "buffer": data} for name, kind, data in files]
    page.get_by_label("Files to attach").set_input_files(payloads)


def attachments_and_sharing(page: Page) -> None:
    """A question with a file sent, two more pending (one refused), then the chat shared and its shared view."""
    attach(page, ("q3-figures.csv", "text/csv", b"quarter,revenue\nQ2,1.8\nQ3,2.1\n"))
    page.locator(".upload[data-state=done]").wait_for()
    send(page, "What stands out in these figures?")
    complete(page)
    attach(page, ("notes.txt", "text/plain", b"to check\n"), ("slides.html", "text/html", b"<html></html>"))
    page.locator(".upload[data-state=error]").wait_for()
    page.locator(".upload[data-state=done]").wait_for()
    page.screenshot(path=SHOTS / "attachments.png")
    page.locator(".chat-header summary").click()
    page.get_by_role("button", name="Share with team").click()
    page.get_by_label("Link to the shared chat").wait_for()
    page.screenshot(path=SHOTS / "share-dialog.png")
    page.get_by_role("link", name="Open").click()
    page.get_by_role("button", name="Fork into my chats").wait_for()
    page.screenshot(path=SHOTS / "shared-chat.png")


def screenshots(browser: Browser, url: str, fake: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with api(url) as client:
        agent(client, "Support bot", f"{fake}/webhook/agent-stream", "Answers product questions", (36, 86, 214))
        agent(client, "Research", f"{fake}/webhook/agent-json", "Long-form answers from the wiki", (23, 128, 61))
        for title in ("Quarterly numbers", "Onboarding checklist", "API rate limits"):
            chat = client.post(
                "/api/chats", json={"agent_id": client.get("/api/agents").json()[0]["id"], "title": title}
            )
            chat.raise_for_status()
    for scheme, size, suffix in (
        ("light", {"width": 1280, "height": 800}, ""),
        ("dark", {"width": 390, "height": 844}, "-phone-dark"),
    ):
        context = browser.new_context(base_url=url, viewport=size, color_scheme=scheme, device_scale_factor=1)  # type: ignore[arg-type]
        page = context.new_page()
        page.goto("/")
        page.get_by_label("Email").fill(EMAIL)
        page.screenshot(path=SHOTS / f"login{suffix}.png")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("link", name="+ New chat").wait_for()
        if not suffix:
            page.screenshot(path=SHOTS / "agent-picker.png")
        page.get_by_role("link", name="+ New chat").click()
        page.get_by_role("button", name="Support bot").click()
        send(page, MARKDOWN_QUESTION)
        complete(page)
        words = " ".join("streaming answer arrives word by word as n8n writes it".split() * 3)
        send(page, f"[delay=250] {words}")
        page.locator(".msg.assistant[data-status=streaming] .content").filter(has_text="word by").wait_for()
        page.screenshot(path=SHOTS / f"chat-streaming{suffix}.png")
        complete(page)
        if not suffix:
            page.locator(".msg.user").last.get_by_role("button", name="Edit").click()
            edited = page.get_by_label("Edited message")
            edited.fill("Give me the short version, please")
            edited.press("Enter")
            page.locator(".msg.user").last.locator(".branch-pos").filter(has_text="2 / 2").wait_for()
            complete(page)
            page.get_by_role("button", name="Helpful", exact=True).last.click()
            page.screenshot(path=SHOTS / "branches.png")
            attachments_and_sharing(page)
            page.get_by_role("link", name="Agents").click()
            page.locator("tr", has_text="Research").get_by_role("button", name="Edit").click()
            page.get_by_label("Webhook URL (n8n production URL)").fill(f"{fake}/webhook-test/research")
            page.get_by_role("button", name="Save").click()
            page.locator("tr", has_text="Research").get_by_role("button", name="Edit").click()
            page.get_by_role("button", name="Test connection").click()
            page.locator(".test-result .hint").wait_for()
            page.set_viewport_size({"width": 1280, "height": 1250})
            page.screenshot(path=SHOTS / "admin-agents.png")
        context.close()
    print(f"screenshots in {SHOTS}")


def measure(browser: Browser, url: str, fake: str, runs: int) -> None:
    with api(url) as client:
        bot = agent(client, "Support bot", f"{fake}/webhook/agent-stream", "Echo", (36, 86, 214))
    # 1. Page weight: everything the login page loads on a first visit (no cache), as Chromium counts it.
    context = browser.new_context(base_url=url)
    page = context.new_page()
    page.goto("/")
    page.get_by_label("Email").wait_for()
    page.wait_for_load_state("networkidle")
    entries = page.evaluate(
        """() => [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
        .map((e) => ({name: e.name, type: e.initiatorType, transfer: e.transferSize, body: e.encodedBodySize,
                      decoded: e.decodedBodySize}))"""
    )
    kinds: dict[str, list[int]] = {}
    for entry in entries:
        path = entry["name"].removeprefix(url)
        kind = (
            "html"
            if entry["type"] == "navigation"
            else "css"
            if path.endswith(".css")
            else "js"
            if "/web/" in path
            else "api"
        )
        totals = kinds.setdefault(kind, [0, 0, 0, 0])
        totals[0] += 1
        totals[1] += entry["transfer"]
        totals[2] += entry["body"]
        totals[3] += entry["decoded"]
    print("first load (gzip on the wire): kind  files  transferred(with headers)  body  uncompressed")
    for kind, (count, transfer, body, decoded) in sorted(kinds.items()):
        print(f"  {kind:5} {count:3}  {transfer / 1024:7.1f} KiB  {body / 1024:7.1f} KiB  {decoded / 1024:7.1f} KiB")
    js_css = [sum(kinds.get(k, [0, 0, 0, 0])[i] for k in ("js", "css")) for i in (1, 2, 3)]
    print(
        f"  JS+CSS: {js_css[0] / 1024:.1f} KiB transferred, {js_css[1] / 1024:.1f} KiB gzip bodies, "
        f"{js_css[2] / 1024:.1f} KiB uncompressed"
    )
    context.close()

    # 2. Time to the first streamed token: Enter -> the first token painted (the client's `first-token` measure).
    context = browser.new_context(base_url=url)
    page = context.new_page()
    log_in(page)
    page.get_by_role("link", name="+ New chat").click()
    page.get_by_role("button", name="Support bot").click()
    browser_ms: list[float] = []
    for i in range(runs + 2):
        page.evaluate("performance.clearMarks(); performance.clearMeasures()")
        send(page, f"run {i} hello there")
        complete(page)
        measured = page.evaluate("performance.getEntriesByName('first-token').map((e) => e.duration)")
        if i >= 2:  # the first two warm up connections and module parsing
            browser_ms.append(measured[0])
    context.close()

    # 3. The API's own time to first chunk for the same agent, from a plain HTTP client.
    api_ms: list[float] = []
    with api(url) as client:
        chat = client.post("/api/chats", json={"agent_id": bot["id"]}).json()
        for i in range(runs + 2):
            started = time.perf_counter()
            first = None
            with client.stream(
                "POST", f"/api/chats/{chat['id']}/messages", json={"content": f"run {i} hello there"}
            ) as response:
                for line in response.iter_lines():
                    if first is None and '"type": "message"' in line.replace('"type":"message"', '"type": "message"'):
                        first = (time.perf_counter() - started) * 1000
            if i >= 2 and first is not None:
                api_ms.append(first)
        usage = client.get("/api/usage", params={"group_by": "agent"}).json()

    def summary(values: list[float]) -> str:
        values = sorted(values)
        p90 = values[int(len(values) * 0.9) - 1]
        low, high = values[0], values[-1]
        return (
            f"p50 {statistics.median(values):.1f} ms, p90 {p90:.1f} ms, min {low:.1f}, max {high:.1f} (n={len(values)})"
        )

    print(f"browser, Enter -> first token painted: {summary(browser_ms)}")
    print(f"API client, POST -> first message event: {summary(api_ms)}")
    print(f"server-side TTFC p50 (GET /api/usage, n8n's first chunk): {usage[0]['ttfc_ms_p50']} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("what", choices=["screenshots", "measure"])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with stack() as (url, fake), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            if args.what == "screenshots":
                screenshots(browser, url, fake)
            else:
                measure(browser, url, fake, args.runs)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
