"""Helpers for the browser tests: a live server and a fake n8n for a whole module, Chromium through Playwright,
and a team with an agent made through the public API (tests/test_web_*.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Playwright, expect, sync_playwright

from app.config import Settings
from tests.conftest import ROOT, clear_tables, make_settings
from tests.live import LiveServer, free_port

#: Debian's chromium: Playwright drives it through `executable_path` (no browser download; `make chromium`).
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PASSWORD = "correct horse battery"
# A loaded 2-core machine can be slow to paint; the per-test time limit still bounds every test.
expect.set_options(timeout=10_000)


def web_settings(database_url: str, data_dir: Path, port: int, **overrides: Any) -> Settings:
    """Plain-http cookies (the page is served over http://127.0.0.1), no login rate limit, and callbacks
    (n8n's progress steps) to this server's address."""
    values: dict[str, Any] = {
        "COOKIE_SECURE": False,
        "RATE_LIMIT_ENABLED": False,
        "CORS_ORIGINS": [],
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
    }
    values.update(overrides)
    return make_settings(database_url, data_dir, **values)


@contextmanager
def serving(settings: Settings, port: int) -> Iterator[LiveServer]:
    """The app on uvicorn in its thread (tests/live.py), started and stopped from synchronous code."""
    server = LiveServer(settings, port=port)
    server.thread.start()
    deadline = time.monotonic() + 10
    while not server.server.started:
        if not server.thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.server.should_exit = True
        server.thread.join(30)
        assert not server.thread.is_alive(), "uvicorn did not stop"


def truncate(database_url: str) -> None:
    """Empty the tables; in a thread of its own, since Playwright's sync API runs an event loop in this one."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, clear_tables(database_url)).result(30)


@contextmanager
def fake_n8n_process() -> Iterator[str]:
    """`python -m tools.fake_n8n` on a free port (its own process: Playwright's sync API owns this thread)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.fake_n8n", "--port", str(port), "--speed", "0", "--linger", "0.1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the fake n8n did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def chromium() -> Iterator[Browser]:
    playwright: Playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watched:
    """A page and what it showed that a test must not see: dialogs (alert...), uncaught errors, CSP reports."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    #: A test that expects a confirm() (deleting a chat) accepts it; otherwise every dialog is dismissed.
    accept_dialogs: bool = False

    def on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if self.accept_dialogs:
            dialog.accept()
        else:
            dialog.dismiss()

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console.append(message.text)


def watch(page: Page) -> Watched:
    watched = Watched(page)
    page.on("dialog", watched.on_dialog)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    page.on("console", watched.on_console)
    return watched


@dataclass
class Team:
    """A team made through the API: its admin (email, password, bearer headers) and its id."""

    base_url: str
    team_id: str
    email: str
    headers: dict[str, str]
    password: str = PASSWORD

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=10)

    def create_agent(self, webhook_url: str, name: str = "Echo bot", **extra: Any) -> dict[str, Any]:
        with self.api() as client:
            response = client.post("/api/agents", json={"name": name, "webhook_url": webhook_url, **extra})
            assert response.status_code == 201, response.text
            return dict(response.json())

    def create_chat(self, agent_id: str, title: str | None = None) -> dict[str, Any]:
        with self.api() as client:
            response = client.post("/api/chats", json={"agent_id": agent_id, "title": title})
            assert response.status_code == 201, response.text
            return dict(response.json())

    def get(self, path: str) -> Any:
        with self.api() as client:
            response = client.get(path)
            assert response.status_code == 200, response.text
            return response.json()


def create_team(base_url: str, name: str = "Acme", email: str = "ada@example.com") -> Team:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        created = client.post(
            "/api/teams",
            json={"name": name, "admin_email": email, "admin_password": PASSWORD, "admin_full_name": "Ada Admin"},
        )
        assert created.status_code == 201, created.text
        team_id = created.json()["team"]["id"]
        login = client.post("/api/auth/login", json={"email": email, "password": PASSWORD})
        assert login.status_code == 200, login.text
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    return Team(base_url, team_id, email, headers)


def log_in(page: Page, email: str, password: str = PASSWORD) -> None:
    """The login form, as a user fills it; done when the chat screen shows."""
    page.goto("/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("link", name="+ New chat").wait_for()


def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def answer_text(page: Page, index: int = -1) -> str:
    return page.locator(".msg.assistant .content").nth(index).inner_text()
