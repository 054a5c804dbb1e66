"""The API keys page in a real Chromium: a key created there works on /v1, is shown once (never in the address,
the tab's storage, the list, or the page once left), and revoked there stops working; an admin lists the team's
keys with their owners, a member has no such switch; refusals show as the other forms show them."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from tests.live import LiveServer
from tests.web import PASSWORD, Team, Watched, create_team, log_in

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
def team(web_server: LiveServer, fake_n8n_url: str) -> Team:
    team = create_team(web_server.url)
    team.create_agent(f"{fake_n8n_url}/webhook/agent-stream", name="Support", slug="support-bot")
    return team


def add_member(team: Team, email: str = "bob@example.com") -> dict[str, str]:
    """A member, and the bearer headers of their session (keys are made by a signed-in user, not by a key)."""
    with team.api() as client:
        added = client.post("/api/users", json={"email": email, "password": PASSWORD, "full_name": "Bob"})
        assert added.status_code == 201, added.text
    with httpx.Client(base_url=team.base_url, timeout=10) as client:
        login = client.post("/api/auth/login", json={"email": email, "password": PASSWORD})
        assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


def models_status(base_url: str, key: str) -> int:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        return client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def open_keys(page: Page) -> None:
    link = page.get_by_role("navigation", name="Main").get_by_role("link", name="API keys")
    link.click()
    expect(page.get_by_role("heading", name="API keys", exact=True)).to_be_visible()
    expect(link).to_have_attribute("aria-current", "page")


def create_key(page: Page, name: str, expires: str | None = None) -> str:
    """Fill the form and create; the new key, read from the field that shows it once."""
    page.get_by_label("Name", exact=True).fill(name)
    if expires:
        page.get_by_label("Expires on (optional)").fill(expires)
    page.get_by_role("button", name="Create key").click()
    shown = page.get_by_label(f"New API key {name}")
    expect(shown).to_be_focused()
    return shown.input_value()


def on_the_page(page: Page) -> str:
    """The page's markup and every field's value (a value set from a script is no attribute: not in the markup)."""
    values = page.evaluate("() => [...document.querySelectorAll('input, textarea')].map((e) => e.value).join(' ')")
    return page.content() + str(values)


def kept_by_the_tab(page: Page) -> str:
    """The address and everything the tab's storage holds, as one text to search."""
    script = "() => location.href + JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})"
    return str(page.evaluate(script))


def test_a_key_is_shown_once_works_on_v1_and_stops_when_revoked(
    web_page: Watched, team: Team, web_server: LiveServer
) -> None:
    page = web_page.page
    log_in(page, team.email)
    open_keys(page)
    expect(page).to_have_title("API keys \N{EN DASH} n8n Chat")
    expect(page.get_by_text("You have no API key yet.")).to_be_visible()
    # How to use it: the SDK's base URL on this origin, and the agents' slugs as models.
    how = page.get_by_role("region", name="How to use a key")
    expect(how).to_contain_text(f"{web_server.url}/v1")
    expect(how.locator("code", has_text="support-bot")).to_have_count(1)

    key = create_key(page, "laptop scripts")
    assert key.startswith("n8nr_")
    expect(page.get_by_role("region", name="New key: laptop scripts")).to_contain_text(
        "Copy it now: you will not see it again."
    )
    expect(page.locator(".toast", has_text="created")).not_to_contain_text(key)
    # It works, as its user with a member's rights, on the OpenAI-compatible API.
    with httpx.Client(base_url=web_server.url, timeout=10) as client:
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert models.status_code == 200, models.text
    assert [m["id"] for m in models.json()["data"]] == ["support-bot"]

    # The list shows its name and prefix, never the key; the tab keeps it nowhere.
    row = page.get_by_role("table", name="Your API keys").locator("tr", has_text="laptop scripts")
    expect(row).to_contain_text(key[:13] + "…")
    assert key not in row.inner_text()
    expect(row.locator("td").nth(3)).to_have_text("never")  # last used: the list was read before the call above
    assert key not in kept_by_the_tab(page)

    # Left and come back (Back), then reloaded: the key is gone from the page.
    page.get_by_role("link", name="Chats", exact=True).click()
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    assert key not in on_the_page(page)
    page.go_back()
    expect(page.get_by_role("table", name="Your API keys")).to_contain_text("laptop scripts")
    assert key not in on_the_page(page)
    page.reload()
    expect(page.get_by_role("table", name="Your API keys")).to_contain_text("laptop scripts")
    assert key not in on_the_page(page) + kept_by_the_tab(page)
    expect(row.locator("td").nth(3)).not_to_have_text("never")  # read again: its use on /v1 shows

    # Revoked after a confirmation: the key is refused, the row goes, the focus stays in the page.
    web_page.accept_dialogs = True
    page.get_by_role("button", name=re.compile(r"^Revoke laptop scripts \(n8nr_")).click()
    expect(page.get_by_text("You have no API key yet.")).to_be_visible()
    asked = f"confirm: Revoke the key “laptop scripts” ({key[:13]}…)? Whatever uses it is refused from now on."
    assert web_page.dialogs == [asked]
    expect(page.get_by_label("Name", exact=True)).to_be_focused()
    assert models_status(web_server.url, key) == 401
    assert web_page.errors == []


def test_the_key_goes_with_the_page_done_or_hidden_and_revoking_it_removes_it(
    web_page: Watched, team: Team, web_server: LiveServer
) -> None:
    """ "Done" hides the key; a page put away (pagehide: the back-forward cache would show it again on Back) forgets
    it; a key revoked while shown leaves the page; declining the confirmation revokes nothing."""
    page = web_page.page
    log_in(page, team.email)
    open_keys(page)
    first = create_key(page, "one")
    page.get_by_role("button", name="Done: hide the key").click()
    assert first not in on_the_page(page)
    expect(page.get_by_label("Name", exact=True)).to_be_focused()

    second = create_key(page, "two")
    page.evaluate("() => window.dispatchEvent(new PageTransitionEvent('pagehide', {persisted: true}))")
    assert second not in on_the_page(page)

    third = create_key(page, "three")
    revoke_three = page.get_by_role("button", name=re.compile(r"^Revoke three "))
    revoke_three.click()  # dismissed: nothing revoked
    assert models_status(web_server.url, third) == 200
    assert third in on_the_page(page)
    web_page.accept_dialogs = True
    revoke_three.click()
    expect(page.get_by_role("table", name="Your API keys").locator("tbody tr")).to_have_count(2)
    assert third not in on_the_page(page)
    # The focus goes to the Revoke of the key that took its place (newest first: "two", then "one").
    expect(page.get_by_role("button", name=re.compile(r"^Revoke two "))).to_be_focused()
    assert [models_status(web_server.url, k) for k in (first, second, third)] == [200, 200, 401]


def test_an_expiry_date_is_the_end_of_that_day(web_page: Watched, team: Team) -> None:
    page = web_page.page
    log_in(page, team.email)
    open_keys(page)
    day = (datetime.now() + timedelta(days=10)).date()
    create_key(page, "expiring", expires=day.isoformat())
    stored = team.get("/api/api-keys")[0]
    end = page.evaluate(f"() => new Date({day.year}, {day.month - 1}, {day.day}, 23, 59, 59).toISOString()")
    assert datetime.fromisoformat(stored["expires_at"]) == datetime.fromisoformat(end)
    expect(page.locator("tr", has_text="expiring").locator("td").nth(2)).not_to_have_text("never")


def test_refusals_show_under_the_field_and_create_nothing(web_page: Watched, team: Team) -> None:
    """A blank name is the form's own message; a past date is the API's 422 under its field; a 429 says when to try
    again; an expired session shows the login, then this page again, with no key made."""
    page = web_page.page
    log_in(page, team.email)
    open_keys(page)
    name = page.get_by_label("Name", exact=True)
    expires = page.get_by_label("Expires on (optional)")

    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_text("Name is required")).to_be_visible()
    expect(name).to_be_focused()
    expect(name).to_have_attribute("aria-invalid", "true")

    # A date typed in part is no date to the browser (an empty value): refused, not sent as a key that never expires.
    name.fill("half a date")
    expires.click()
    page.keyboard.type("06")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_text("Enter the whole date, or none for a key that does not expire")).to_be_visible()
    expect(expires).to_be_focused()
    assert team.get("/api/api-keys") == []

    name.fill("from the past")
    expires.fill("2020-01-01")
    with page.expect_response(re.compile(r"/api/api-keys$")) as refused:
        page.get_by_role("button", name="Create key").click()
    assert refused.value.status == 422
    (entry,) = refused.value.json()["detail"]
    note = page.locator(".field", has=expires).locator(".field-error")
    expect(note).to_have_text(entry["msg"].removeprefix("Value error, "))
    expect(expires).to_be_focused()
    expect(name).not_to_have_attribute("aria-invalid", "true")
    # The field's hint stays its description, with the reason.
    described = expires.get_attribute("aria-describedby") or ""
    assert len(described.split()) == 2

    def busy(route: Route) -> None:
        route.fulfill(
            status=429,
            headers={"Retry-After": "30"},
            content_type="application/json",
            body='{"detail": "Too many requests; retry in a moment"}',
        )

    page.route(re.compile(r"/api/api-keys$"), busy)
    expires.fill("")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("alert").filter(has_text="Too many requests")).to_have_text(
        "Too many requests; retry in a moment. Try again in 30 s."
    )
    page.unroute(re.compile(r"/api/api-keys$"))
    assert team.get("/api/api-keys") == []

    # The session ends under the page: the login, then this page again (nothing was made, nothing is shown).
    page.context.clear_cookies()
    page.get_by_role("button", name="Create key").click()
    expect(page).to_have_url(re.compile(r"#/login$"))
    page.get_by_label("Email").fill(team.email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_text("You have no API key yet.")).to_be_visible()
    assert team.get("/api/api-keys") == []
    assert web_page.errors == []


def test_an_admin_lists_the_teams_keys_and_a_member_has_no_switch(
    web_page: Watched, team: Team, web_server: LiveServer
) -> None:
    bob = add_member(team)
    with httpx.Client(base_url=web_server.url, headers=bob, timeout=10) as client:
        made = client.post("/api/api-keys", json={"name": "bob's robot"})
        assert made.status_code == 201, made.text
    bobs_key = made.json()["key"]

    page = web_page.page
    log_in(page, team.email)
    open_keys(page)
    create_key(page, "ada's laptop")
    mine = page.get_by_role("table", name="Your API keys")
    expect(mine).to_contain_text("ada's laptop")
    expect(mine).not_to_contain_text("bob's robot")
    page.get_by_label("Show the whole team's keys, with their owners").check()
    everyone = page.get_by_role("table", name="The team's API keys")
    expect(everyone.locator("tr", has_text="bob's robot")).to_contain_text("bob@example.com")
    expect(everyone.locator("tr", has_text="ada's laptop")).to_contain_text(f"{team.email} (you)")
    assert bobs_key not in on_the_page(page)
    # An admin revokes a member's key from there (named in the confirmation).
    web_page.accept_dialogs = True
    everyone.get_by_role("button", name=re.compile(r"^Revoke bob's robot ")).click()
    expect(everyone.locator("tr", has_text="bob's robot")).to_have_count(0)
    assert "of bob@example.com?" in web_page.dialogs[-1]
    assert models_status(web_server.url, bobs_key) == 401

    # Bob, a member: his own keys, no switch and no owners.
    page.get_by_role("button", name="Log out").click()
    log_in(page, "bob@example.com")
    open_keys(page)
    create_key(page, "bob's second")
    expect(page.get_by_role("table", name="Your API keys").locator("tbody tr")).to_have_count(1)
    expect(page.get_by_label(re.compile("whole team's keys"))).to_have_count(0)
    expect(page.get_by_role("columnheader", name="Owner")).to_have_count(0)
    assert web_page.errors == []


def test_an_admin_demoted_under_the_page_gets_the_refusal_and_their_own_keys(web_page: Watched, team: Team) -> None:
    """The switch is drawn for the role the page was opened with; demoted since, the team's list is refused (403):
    the page says so, drops the switch and lists the user's own keys rather than an error in their place."""
    with team.api() as client:
        added = client.post("/api/users", json={"email": "eve@example.com", "password": PASSWORD, "role": "admin"})
        assert added.status_code == 201, added.text
    page = web_page.page
    log_in(page, team.email)
    open_keys(page)
    create_key(page, "ada's laptop")
    ada = next(u for u in team.get("/api/users") if u["email"] == team.email)
    with team.api() as client:
        assert client.patch(f"/api/users/{ada['id']}", json={"role": "user"}).status_code == 200
    switch = page.get_by_label("Show the whole team's keys, with their owners")
    switch.check()
    expect(page.locator(".toast.error")).to_have_text("Admin role required")
    expect(switch).to_be_hidden()
    expect(page.get_by_role("table", name="Your API keys")).to_contain_text("ada's laptop")
    assert web_page.errors == []


def test_copy_key_puts_it_on_the_clipboard_or_selects_it(web_page: Watched, team: Team) -> None:
    page = web_page.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    log_in(page, team.email)
    open_keys(page)
    key = create_key(page, "copied")
    page.get_by_role("button", name="Copy key").click()
    expect(page.get_by_role("status").filter(has_text="Key copied.")).to_be_visible()
    assert page.evaluate("() => navigator.clipboard.readText()") == key

    # No clipboard API (plain http on another host): the key is selected for Ctrl+C, and the page says so.
    page.add_init_script("Object.defineProperty(Navigator.prototype, 'clipboard', { get: () => undefined })")
    page.reload()
    key = create_key(page, "selected")
    page.get_by_role("button", name="Create key").focus()  # the field loses its selection
    page.get_by_role("button", name="Copy key").click()
    expect(page.get_by_role("status").filter(has_text="Selected: press Ctrl+C")).to_be_visible()
    shown = page.get_by_label("New API key selected")
    expect(shown).to_be_focused()
    assert shown.evaluate("(el) => el.value.slice(el.selectionStart, el.selectionEnd)") == key
    assert web_page.errors == []
