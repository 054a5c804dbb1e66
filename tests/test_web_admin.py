"""The admin pages in a real Chromium: an agent made and tested (the connection test's hint), its secret
headers never shown again, its avatar; an invitation link that signs a colleague up; usage and the error log."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Route, expect

from app.services.connection_test import HINT_AUTH_WRONG, HINT_CALLBACK, HINT_NOT_STARTED, HINT_TEST_URL
from tests.live import LiveServer
from tests.web import PASSWORD, Team, Watched, create_team, log_in, send, watch
from tools.fake_n8n import raw_answer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]
SECRET = "fake-header-secret"
#: n8n's 500 when the Webhook node refuses its own settings (its WebhookHelpers' text).
NOT_STARTED = b'{"code":0,"message":"Workflow Webhook Error: Workflow could not be started!"}'


@pytest.fixture
def team(web_server: LiveServer) -> Team:
    return create_team(web_server.url)


def png(path: Path) -> Path:
    """A valid 2x2 PNG (the server judges uploads by their content)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def test_create_an_agent_with_the_connection_test_hint_secret_headers_and_avatar(
    web_page: Watched, team: Team, fake_n8n_url: str, tmp_path: Path
) -> None:
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Agents").click()
    page.get_by_role("button", name="+ New agent").click()
    page.get_by_label("Name", exact=True).fill("Support")
    url = page.get_by_label("Webhook URL (n8n production URL)")
    # The editor's test URL: the probe says what to change.
    url.fill(f"{fake_n8n_url}/webhook-test/support")
    page.get_by_role("button", name="Test connection").click()
    expect(page.locator(".test-result.bad .hint")).to_have_text(HINT_TEST_URL)
    # A webhook with header auth and no header: the hint names the credential.
    url.fill(f"{fake_n8n_url}/webhook/agent-header-auth")
    page.get_by_role("button", name="Test connection").click()
    expect(page.locator(".test-result.bad .hint")).to_have_text(HINT_AUTH_WRONG)
    page.get_by_label(re.compile("^Secret headers")).fill(f"X-N8N-Auth: {SECRET}")
    page.get_by_role("button", name="Test connection").click()
    expect(page.locator(".test-result.ok")).to_contain_text("format ndjson")
    page.get_by_role("button", name="Save").click()
    row = page.locator("tr", has_text="Support")
    expect(row).to_contain_text("x-n8n-auth", ignore_case=True)

    # Editing: the header's name is shown, never its value; the stored agent is tested with its secret.
    row.get_by_role("button", name="Edit").click()
    expect(page.get_by_label(re.compile("^Secret headers"))).to_have_value("")
    expect(page.locator(".agent-form")).to_contain_text("stored: x-n8n-auth", ignore_case=True)
    assert SECRET not in page.content()
    page.get_by_role("button", name="Test connection").click()
    expect(page.locator(".test-result.ok")).to_contain_text("Echo: ping")

    # A refused file does not stay chosen (picked again, it would be sent again): the input is empty.
    picker = page.get_by_label("Avatar (PNG, JPEG, WebP or GIF)")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with page.expect_response(re.compile(r"/avatar$")) as refused:
        picker.set_input_files(text)
    assert refused.value.status == 415
    expect(page.locator(".toast.error")).to_be_visible()
    expect(picker).to_have_value("")
    expect(page.locator(".avatar-preview .initials")).to_be_visible()
    picker.set_input_files(png(tmp_path / "avatar.png"))
    expect(page.locator(".toast", has_text="Avatar saved")).to_be_visible()
    avatar = page.locator("tr", has_text="Support").locator("img.avatar")
    expect(avatar).to_have_attribute("src", re.compile(r"^/api/agents/[0-9a-f-]+/avatar\?v="))
    page.wait_for_function("(img) => img.complete && img.naturalWidth === 2", arg=avatar.element_handle())
    agent = team.get("/api/agents")[0]
    assert agent["avatar_url"] is not None

    # A member sees the agent with its avatar in the picker and can chat with it.
    page.get_by_role("link", name="Chats").click()
    page.get_by_role("link", name="+ New chat").click()
    expect(page.get_by_role("button", name=re.compile("Support")).locator("img.avatar")).to_be_visible()
    page.get_by_role("button", name=re.compile("Support")).click()
    send(page, "authenticated hello")
    expect(page.locator(".msg.assistant[data-status=complete] .content")).to_have_text("Echo: authenticated hello")


def test_the_agent_forms_refusals_name_the_field_and_keep_what_was_typed(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """Save and Test connection show the reason for each refused name or webhook URL under that field, once (not
    'webhook_url: webhook_url contains ...'), and keep what was typed; a blank name or URL is the form's own
    'Name is required' (it was left out of the body, so the API said 'name: Field required'). Chromium's own check
    of the URL field (a zone id is no URL to it) must not stand in with a bare 'Please enter a URL.' that names
    no reason. The connection test's hints show as they come."""
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Agents").click()
    page.get_by_role("button", name="+ New agent").click()
    name = page.get_by_label("Name", exact=True)
    url = page.get_by_label("Webhook URL (n8n production URL)")
    error = page.locator(".agent-form p.error:not(.field-error)")
    good = f"{fake_n8n_url}/webhook/agent-stream"
    invisible = "webhook_url contains whitespace, control or invisible characters"
    cases: list[tuple[str, str, Locator, str | re.Pattern[str]]] = [
        ("   ", good, name, "Name is required"),
        ("Bot", "  ", url, "Webhook URL is required"),
        ("Bot", f"{fake_n8n_url}/webhook/agent\u200b-stream", url, invisible),
        ("Bot", f"{good}\u202e", url, invisible),
        ("Bot", "http://[fe80::1%25eth0]/webhook/x", url, re.compile("^webhook_url has an IPv6 zone id")),
        ("Bot", "http://[2606:4700::1%25eth0]/webhook/x", url, re.compile("^webhook_url has an IPv6 zone id")),
        ("Bot", "http://n8n..example.com/webhook/x", url, "webhook_url has an invalid host"),
    ]
    for typed_name, typed_url, control, reason in cases:
        for button in ("Save", "Test connection"):
            page.get_by_role("button", name="Cancel").click()  # a fresh form: no earlier message left on it
            page.get_by_role("button", name="+ New agent").click()
            name.fill(typed_name)
            url.fill(typed_url)
            page.get_by_role("button", name=button).click()
            note = page.locator(".field", has=control).locator(".field-error")
            expect(note, f"{button} with {typed_name!r}, {typed_url!r}").to_have_text(reason)
            expect(page.locator(".agent-form .field-error")).to_have_count(1)  # the other field is not marked
            expect(control).to_have_attribute("aria-invalid", "true")
            expect(control).to_be_focused()
            expect(error).to_be_hidden()  # said once, under its field
            expect(page.locator(".test-slot")).to_have_text("")  # no spinner left
            expect(name).to_have_value(typed_name)
            expect(url).to_have_value(typed_url)
    assert [agent["name"] for agent in team.get("/api/agents?include_inactive=true")] == []

    name.fill("Later")
    for typed_url, mode, hint in [
        (good, "callback", HINT_CALLBACK),
        (f"{fake_n8n_url}/webhook-test/x", "stream", HINT_TEST_URL),
        (raw_answer(fake_n8n_url, NOT_STARTED, status=500), "stream", HINT_NOT_STARTED),
    ]:
        url.fill(typed_url)
        page.get_by_label("Response mode").select_option(mode)
        page.get_by_role("button", name="Test connection").click()
        expect(page.locator(".test-result .hint")).to_have_text(hint)
        expect(error).to_be_hidden()

    # An edit that blanks the name: it was left out of the PUT, which kept the stored name and said "Saved".
    url.fill(good)
    page.get_by_label("Response mode").select_option("stream")
    page.get_by_role("button", name="Save").click()
    page.locator("tr", has_text="Later").get_by_role("button", name="Edit").click()
    name.fill(" ")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".field", has=name).locator(".field-error")).to_have_text("Name is required")
    assert [agent["name"] for agent in team.get("/api/agents")] == ["Later"]
    name.fill("Later still")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".agent-form")).to_have_count(0)
    assert [agent["name"] for agent in team.get("/api/agents")] == ["Later still"]
    assert web_page.dialogs == []
    assert web_page.errors == []


def test_an_invitation_link_signs_a_colleague_up(
    web_page: Watched, team: Team, browser: Browser, web_server: LiveServer
) -> None:
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Users").click()
    page.get_by_label("Email (optional)").fill("bob@example.com")
    page.get_by_role("button", name="Create invitation").click()
    link = page.get_by_label("Invitation link").input_value()
    assert re.fullmatch(rf"{re.escape(web_server.url)}/#/join/[\w-]{{20,}}", link)
    invitations = page.get_by_role("table", name="Invitations")
    expect(invitations.locator("tr", has_text="bob@example.com")).to_contain_text("active")

    colleague = browser.new_context()
    try:
        other = watch(colleague.new_page())
        other.page.goto(link)
        expect(other.page.get_by_text("You are invited to Acme as user.")).to_be_visible()
        # The first field has the focus, as on the login and sign-up pages (it had none: Tab began at the top).
        expect(other.page.get_by_label("Your name")).to_be_focused()
        expect(other.page.get_by_label("Email")).to_have_value("bob@example.com")
        other.page.get_by_label("Your name").fill("Bob")
        other.page.get_by_label("Password (8 characters or more)").fill(PASSWORD)
        other.page.get_by_role("button", name="Join").click()
        expect(other.page.locator(".who")).to_have_text("Bob")
        expect(other.page.get_by_role("link", name="Agents")).to_have_count(0)  # a user, not an admin
        # The link is used up: opening it again says so.
        other.page.goto(link)
        expect(other.page.get_by_text("This invitation is unknown, used up, expired or revoked.")).to_be_visible()
    finally:
        colleague.close()

    page.reload()
    expect(invitations.locator("tr", has_text="bob@example.com")).to_contain_text("used_up")
    web_page.accept_dialogs = True  # "Make bob@example.com an admin?"
    role = page.get_by_label("Role of bob@example.com")
    role.select_option("admin")
    expect(page.locator(".toast", has_text="Updated bob@example.com")).to_be_visible()
    assert {u["email"]: u["role"] for u in team.get("/api/users")}["bob@example.com"] == "admin"


def test_revoking_the_invitation_whose_link_is_shown_removes_the_link(web_page: Watched, team: Team) -> None:
    """The one-time link stayed on the page after its invitation was revoked, as if it could still be sent."""
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Users").click()
    invitations = page.get_by_role("table", name="Invitations")
    link = page.get_by_label("Invitation link")
    for email in ("old@example.com", "new@example.com"):
        page.get_by_label("Email (optional)").fill(email)
        page.get_by_role("button", name="Create invitation").click()
        expect(invitations.locator("tr", has_text=email)).to_contain_text("active")
    shown = link.input_value()
    # Another invitation revoked: the link shown is still valid and stays.
    invitations.locator("tr", has_text="old@example.com").get_by_role("button", name="Revoke").click()
    expect(invitations.locator("tr", has_text="old@example.com")).to_contain_text("revoked")
    expect(link).to_have_value(shown)
    invitations.locator("tr", has_text="new@example.com").get_by_role("button", name="Revoke").click()
    expect(invitations.locator("tr", has_text="new@example.com")).to_contain_text("revoked")
    expect(link).to_have_count(0)
    assert web_page.errors == []


def test_usage_and_the_error_log_show_what_happened(web_page: Watched, team: Team, fake_n8n_url: str) -> None:
    page = web_page.page
    team.create_agent(f"{fake_n8n_url}/webhook/agent-stream", name="Echo bot")
    team.create_agent(f"{fake_n8n_url}/webhook/error-stream", name="Broken bot")
    log_in(page, team.email)
    for name, text in (("Echo bot", "hello"), ("Broken bot", "hello")):
        page.get_by_role("link", name="+ New chat").click()
        page.get_by_role("button", name=re.compile(name)).click()
        send(page, text)
        expect(page.locator(".msg.assistant:not([data-status=streaming])")).to_have_count(1)
    failed = page.locator(".msg.assistant[data-status=error]")
    expect(failed.locator(".badge")).to_have_text("Failed")
    expect(failed.locator(".error")).not_to_be_empty()

    page.get_by_role("link", name="Errors").click()
    expect(page.locator("tbody tr")).to_have_count(1)
    code = team.get("/api/error-logs")[0]["code"]
    expect(page.locator("tbody tr code").first).to_have_text(code)

    page.get_by_role("link", name="Usage").click()
    page.get_by_label("By").select_option("agent")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("tbody tr")).to_have_count(2)
    echo = page.locator("tbody tr", has_text="Echo bot")
    expect(echo.locator("td").nth(1)).to_have_text("1")  # completed
    broken = page.locator("tbody tr", has_text="Broken bot")
    expect(broken.locator("td").nth(2)).to_have_text("1")  # errors

    # A refused range: the API's reason, which names its field itself, is not prefixed with it again ("from:").
    page.get_by_label("From").fill("2030-01-02")
    page.get_by_label("To").fill("2030-01-01")
    page.get_by_role("button", name="Show").click()
    # Shown under the form, and the previous period's table goes: left in place, it read as the refused range's.
    expect(page.locator(".admin [role=alert]")).to_have_text("`from` must not be after `to`")
    expect(page.locator("tbody tr")).to_have_count(0)
    expect(page).to_have_title("Usage \N{EN DASH} n8n Chat")
    page.get_by_label("From").fill("2030-01-01")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_text("No usage in this period.")).to_be_visible()
    expect(page.locator(".admin [role=alert]")).to_be_hidden()


def test_a_double_click_creates_one_agent_one_invitation_and_one_user(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    page = web_page.page
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url.split("/api/", 1)[1]) if r.method == "POST" else None)
    log_in(page, team.email)
    page.get_by_role("link", name="Agents").click()
    page.get_by_role("button", name="+ New agent").click()
    page.get_by_label("Name", exact=True).fill("Support")
    page.get_by_label("Webhook URL (n8n production URL)").fill(f"{fake_n8n_url}/webhook/agent-stream")
    page.get_by_role("button", name="Save").dblclick()
    # The list shows the saved agent after the answer: a second click's request was sent before it.
    expect(page.locator("tr", has_text="Support")).to_have_count(1)
    assert posts.count("agents") == 1
    assert [a["slug"] for a in team.get("/api/agents")] == ["support"]  # no "support-2"

    page.get_by_role("link", name="Users").click()
    page.get_by_role("button", name="Create invitation").dblclick()
    expect(page.get_by_role("table", name="Invitations").locator("tbody tr")).to_have_count(1)
    assert posts.count("teams/current/invites") == 1
    assert len(team.get("/api/teams/current/invites")) == 1

    page.get_by_text("Add a user directly").click()
    page.get_by_label("Email", exact=True).fill("carl@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Add user").dblclick()
    expect(page.get_by_role("table", name="Users").locator("tr", has_text="carl@example.com")).to_have_count(1)
    assert posts.count("users") == 1  # a second one would be refused with 409: email taken
    assert web_page.errors == []


def test_the_admin_tables_name_their_buttons_and_keep_the_keyboards_place(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """Each agent's button was "Edit" to a screen reader (a list of "Edit, Edit, Edit") and each invitation's
    "Revoke"; they now name their agent or invitation. A closed agent form (saved or cancelled) and a user's role
    or activation changed (the table drawn again) dropped the focus to the page's start: it now goes back to the
    agent's Edit, "+ New agent", or the control just changed."""
    team.create_agent(f"{fake_n8n_url}/webhook/agent-stream", name="Echo bot")
    with team.api() as client:
        added = client.post("/api/users", json={"email": "bob@example.com", "password": PASSWORD})
        assert added.status_code == 201, added.text
        invited = client.post("/api/teams/current/invites", json={"email": "carl@example.com"})
        assert invited.status_code == 201, invited.text
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Agents").click()
    edit = page.get_by_role("button", name="Edit Echo bot", exact=True)
    edit.click()
    expect(page.get_by_label("Name", exact=True)).to_be_focused()
    page.get_by_role("button", name="Cancel").click()
    expect(edit).to_be_focused()
    page.keyboard.press("Enter")
    page.get_by_label("Description").fill("Echoes")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("tr", has_text="Echo bot")).to_be_visible()
    expect(page.locator(".agent-form")).to_have_count(0)
    expect(edit).to_be_focused()
    new_agent = page.get_by_role("button", name="+ New agent")
    new_agent.click()
    page.get_by_role("button", name="Cancel").click()
    expect(new_agent).to_be_focused()

    page.get_by_role("link", name="Users").click()
    revoke = re.compile("^Revoke the invitation for carl@example.com, user")
    expect(page.get_by_role("button", name=revoke)).to_be_visible()
    users = page.get_by_role("table", name="Users")
    # Each change draws the table again: the old one is marked, to know when it is gone.
    active = page.get_by_label("bob@example.com active")
    users.evaluate("(table) => table.dataset.old = 'yes'")
    active.focus()
    page.keyboard.press("Space")
    expect(page.locator("table[data-old]")).to_have_count(0)
    expect(active).not_to_be_checked()
    expect(active).to_be_focused()
    role = page.get_by_label("Role of bob@example.com")
    users.evaluate("(table) => table.dataset.old = 'yes'")
    web_page.accept_dialogs = True  # "Make bob@example.com an admin?"
    role.focus()
    role.select_option("admin")
    expect(page.locator("table[data-old]")).to_have_count(0)
    expect(role).to_have_value("admin")
    expect(role).to_be_focused()
    assert web_page.errors == []


def test_load_more_errors_from_the_keyboard_goes_on_from_the_first_row_it_added(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """The error log's Load more is disabled while its page loads, which dropped its focus to the page's start;
    the focus now moves to the first row the page added."""
    agent = team.create_agent(f"{fake_n8n_url}/webhook/x?scenario=status&status=500", name="Broken bot")
    chat = team.create_chat(agent["id"])
    with team.api() as client:
        for i in range(51):  # one more than a page
            assert client.post(f"/api/chats/{chat['id']}/messages", json={"content": f"q{i}"}).status_code == 200
    assert len(team.get("/api/error-logs?limit=100")) == 51
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Errors").click()
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(50)
    page.get_by_role("button", name="Load more").focus()
    page.keyboard.press("Enter")
    expect(rows).to_have_count(51)
    expect(rows.nth(50)).to_be_focused()
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()


def test_an_arrow_key_on_a_users_role_changes_nothing_without_confirmation(web_page: Watched, team: Team) -> None:
    """An arrow key on the focused role list changes its value and fires `change` at once (Chromium on Linux and
    Windows): a keyboard user looking at the choices made a colleague an admin (PATCH sent, "Updated"), or
    demoted themselves out of the admin pages. A role change is now confirmed first; declined, nothing is sent
    and the list shows the role as it is."""
    with team.api() as client:
        added = client.post("/api/users", json={"email": "bob@example.com", "password": PASSWORD})
        assert added.status_code == 201, added.text
    page = web_page.page
    patches: list[str] = []
    page.on("request", lambda r: patches.append(r.url) if r.method == "PATCH" else None)
    log_in(page, team.email)
    page.get_by_role("link", name="Users").click()
    role = page.get_by_label("Role of bob@example.com")
    role.focus()
    page.keyboard.press("ArrowDown")
    expect(role).to_have_value("user")
    assert web_page.dialogs == ["confirm: Make bob@example.com an admin?"]
    page.wait_for_timeout(500)
    assert patches == []
    assert {u["email"]: u["role"] for u in team.get("/api/users")}["bob@example.com"] == "user"
    web_page.accept_dialogs = True
    page.keyboard.press("ArrowDown")
    expect(page.locator(".toast", has_text="Updated bob@example.com")).to_be_visible()
    assert {u["email"]: u["role"] for u in team.get("/api/users")}["bob@example.com"] == "admin"


def test_an_admin_who_loses_the_role_leaves_the_admin_pages(web_page: Watched, team: Team) -> None:
    page = web_page.page
    with team.api() as client:
        added = client.post("/api/users", json={"email": "eve@example.com", "password": PASSWORD, "role": "admin"})
        assert added.status_code == 201, added.text
    log_in(page, team.email)
    page.get_by_role("link", name="Users").click()
    # Demoting oneself (another admin remains): the top bar and the page become a member's.
    web_page.accept_dialogs = True  # "Make yourself a user?..."
    page.get_by_label("Role of ada@example.com").select_option("user")
    expect(page).to_have_url(re.compile(r"#/chats$"))
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    expect(page.get_by_role("link", name="Agents")).to_have_count(0)
    expect(page.get_by_role("link", name="Users")).to_have_count(0)
    assert web_page.errors == []  # the users list read again by a member: 403, uncaught

    # Promoted again, then demoted by the other admin while the page is open: an admin link no longer opens
    # admin pages whose every call is refused.
    with httpx.Client(base_url=team.base_url, timeout=10) as eve:
        token = eve.post("/api/auth/login", json={"email": "eve@example.com", "password": PASSWORD}).json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        ada = next(u for u in eve.get("/api/users", headers=headers).json() if u["email"] == team.email)
        assert eve.patch(f"/api/users/{ada['id']}", json={"role": "admin"}, headers=headers).status_code == 200
        page.reload()
        expect(page.get_by_role("link", name="Agents")).to_be_visible()
        assert eve.patch(f"/api/users/{ada['id']}", json={"role": "user"}, headers=headers).status_code == 200
    page.get_by_role("link", name="Agents").click()
    expect(page).to_have_url(re.compile(r"#/chats$"))
    expect(page.get_by_role("link", name="Agents")).to_have_count(0)
    expect(page.locator(".toast.error")).to_have_count(0)
    assert web_page.errors == []


def test_removing_an_admin_shows_their_invitations_revoked(web_page: Watched, team: Team) -> None:
    """Demoting or deactivating an admin revokes the invitations they made, but the page read only the users
    again: those invitations still showed `active`, with a Revoke button, until the page was reloaded."""
    page = web_page.page
    with team.api() as client:
        for email in ("eve@example.com", "mallory@example.com"):
            added = client.post("/api/users", json={"email": email, "password": PASSWORD, "role": "admin"})
            assert added.status_code == 201, added.text
    with httpx.Client(base_url=team.base_url, timeout=10) as other:
        pairs = (("eve@example.com", "from-eve@example.com"), ("mallory@example.com", "from-mal@example.com"))
        for admin, invited in pairs:
            token = other.post("/api/auth/login", json={"email": admin, "password": PASSWORD}).json()["access_token"]
            made = other.post(
                "/api/teams/current/invites", json={"email": invited}, headers={"Authorization": f"Bearer {token}"}
            )
            assert made.status_code == 201, made.text
    log_in(page, team.email)
    page.get_by_role("link", name="Users").click()
    invitations = page.get_by_role("table", name="Invitations")
    for invited in ("from-eve@example.com", "from-mal@example.com"):
        expect(invitations.locator("tr", has_text=invited)).to_contain_text("active")
    web_page.accept_dialogs = True  # "Make eve@example.com a user?..."
    page.get_by_label("Role of eve@example.com").select_option("user")
    expect(invitations.locator("tr", has_text="from-eve@example.com")).to_contain_text("revoked")
    expect(invitations.locator("tr", has_text="from-eve@example.com").get_by_role("button")).to_have_count(0)
    page.get_by_label("mallory@example.com active").uncheck()
    expect(invitations.locator("tr", has_text="from-mal@example.com")).to_contain_text("revoked")
    expect(page.locator(".toast.error")).to_have_count(0)
    assert web_page.errors == []


def test_copy_puts_the_invitation_link_on_the_clipboard_or_selects_it(web_page: Watched, team: Team) -> None:
    page = web_page.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    log_in(page, team.email)
    page.get_by_role("link", name="Users").click()
    page.get_by_role("button", name="Create invitation").click()
    link = page.get_by_label("Invitation link").input_value()
    page.evaluate("() => navigator.clipboard.writeText('')")
    page.get_by_role("button", name="Copy", exact=True).click()
    expect(page.get_by_role("status").filter(has_text=re.compile("copied", re.IGNORECASE))).to_be_visible()
    assert page.evaluate("() => navigator.clipboard.readText()") == link

    # Plain http on another host is no secure context: no clipboard API. Copy selects the link for Ctrl+C
    # and says so (it did nothing at all).
    page.add_init_script("Object.defineProperty(Navigator.prototype, 'clipboard', { get: () => undefined })")
    page.reload()
    page.get_by_role("button", name="Create invitation").click()
    field = page.get_by_label("Invitation link")
    link = field.input_value()
    page.get_by_role("button", name="Create invitation").focus()  # the field loses its selection
    page.get_by_role("button", name="Copy", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="Selected: press Ctrl+C")).to_be_visible()
    expect(field).to_be_focused()
    assert field.evaluate("(el) => el.value.slice(el.selectionStart, el.selectionEnd)") == link
    assert web_page.errors == []


def test_joining_leaves_the_invitation_token_out_of_the_tabs_history(web_page: Watched, team: Team) -> None:
    with team.api() as client:
        created = client.post("/api/teams/current/invites", json={"max_uses": 5})  # still valid after one use
        assert created.status_code == 201, created.text
    token = created.json()["token"]
    page = web_page.page
    page.goto(f"/#/join/{token}")
    expect(page.get_by_text("You are invited to Acme as user.")).to_be_visible()
    page.get_by_label("Email").fill("bob@example.com")
    page.get_by_label("Password (8 characters or more)").fill(PASSWORD)
    page.get_by_role("button", name="Join").click()
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    assert token not in page.url
    # Back does not return to the join page (a sign-up form for a signed-in user, the token in the address).
    page.go_back()
    assert token not in page.url
    expect(page.get_by_role("button", name="Join")).to_have_count(0)


def test_an_admin_page_opened_while_the_server_is_unreachable_keeps_the_session(web_page: Watched, team: Team) -> None:
    """Each admin page reads the user again (a demoted admin leaves them): a read that failed for want of the
    server (a dropped connection, a restart) counted as signed out and showed the login page, though the session
    was valid and a reload showed the chats again. Only the server's word on the role changes the page."""
    page = web_page.page
    log_in(page, team.email)
    expect(page.get_by_role("link", name="Agents")).to_be_visible()
    page.route("**/api/auth/me", lambda route: route.abort(), times=1)
    page.get_by_role("link", name="Users").click()
    expect(page.get_by_role("heading", name="Users")).to_be_visible()
    expect(page.get_by_role("button", name="Log in")).to_have_count(0)
    expect(page.get_by_role("link", name="Agents")).to_be_visible()


def test_the_chats_chosen_while_an_admin_page_reads_the_user_stay(web_page: Watched, team: Team) -> None:
    """An admin page reads the user again before it draws; a user who went back to the chats meanwhile keeps
    them when that answer comes (the later route draws, the earlier one neither draws nor leaves the chats).
    The answer's end is marked one task after the page read it, once the route waiting for it has gone on."""
    page = web_page.page
    page.add_init_script(
        """
        window.meRead = 0;
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          const response = realFetch(url, init);
          if (String(url) === "/api/auth/me")
            response.then((answer) => {
              const json = answer.json.bind(answer);
              answer.json = () => json().finally(() => setTimeout(() => { window.meRead += 1; }));
            }, () => {});
          return response;
        };
        """
    )
    log_in(page, team.email)
    page.get_by_role("link", name="Users").click()  # the admin pages' module is loaded: it would draw at once
    expect(page.get_by_role("heading", name="Users")).to_be_visible()
    page.get_by_role("link", name="Chats").click()
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    read = page.evaluate("() => window.meRead")
    held: list[Route] = []
    page.route("**/api/auth/me", lambda route: held.append(route))
    with page.expect_request("**/api/auth/me"):
        page.get_by_role("link", name="Agents").click()
    page.get_by_role("link", name="Chats").click()
    held[0].continue_()
    page.wait_for_function(f"() => window.meRead > {read}")
    expect(page).to_have_url(re.compile(r"#/chats$"))
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    expect(page.get_by_role("heading", name="Agents")).to_have_count(0)
    assert web_page.errors == []


def test_the_admin_top_bar_fits_one_line_on_a_phone(web_page: Watched, team: Team) -> None:
    """On a phone (390 x 844) an admin's top bar (brand, six links, Log out) wrapped onto three lines, taking a
    fifth of the screen on every page. It now stays one line: the links scroll sideways inside their bar, the
    page itself never scrolls sideways, and every link stays reachable (the keyboard's focus scrolls it in)."""
    page = web_page.page
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, team.email)
    page.get_by_role("link", name="Errors").click()
    expect(page.get_by_role("heading", name="Error log")).to_be_visible()
    bar = page.locator(".topbar")
    heights = [
        page.locator(selector).evaluate("(el) => el.getBoundingClientRect().height")
        for selector in (".topbar .brand", ".topbar nav a >> nth=0", ".topbar button")
    ]
    box = bar.bounding_box()
    assert box is not None
    # One line: the bar is no taller than its tallest item plus its padding.
    assert box["height"] <= max(heights) + 24, (box, heights)
    assert box["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    logout = page.get_by_role("button", name="Log out").bounding_box()
    assert logout is not None
    assert logout["x"] + logout["width"] <= 390
    assert logout["y"] < box["y"] + box["height"]
    # The current page's link is in view, and every link can be reached and pressed.
    current = page.locator(".topbar nav a[aria-current=page]")
    expect(current).to_have_text("Errors")
    expect(current).to_be_in_viewport(ratio=0.9)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Chats").click()
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Usage").click()
    expect(page.get_by_role("heading", name="Usage")).to_be_visible()
    expect(page.locator(".topbar nav a[aria-current=page]")).to_be_in_viewport(ratio=0.9)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert web_page.errors == []


def test_the_error_log_names_agent_user_and_links_only_the_admins_own_chats(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """The error log's Chat column was an id cut to 8 characters (the whole id only in a mouse tooltip), with
    no word of whose chat or which agent. It now names the agent and the user, links the admin's own chat (the
    only ones an admin can open), and gives another user's chat id whole, with a Copy button."""
    agent = team.create_agent(f"{fake_n8n_url}/webhook/x?scenario=status&status=500", name="Broken bot")
    mine = team.create_chat(agent["id"], title="My failing chat")
    with team.api() as client:
        added = client.post("/api/users", json={"email": "bob@example.com", "password": PASSWORD, "full_name": "Bob"})
        assert added.status_code == 201, added.text
        assert client.post(f"/api/chats/{mine['id']}/messages", json={"content": "mine"}).status_code == 200
    with httpx.Client(base_url=team.base_url, timeout=10) as bob:
        login = bob.post("/api/auth/login", json={"email": "bob@example.com", "password": PASSWORD})
        assert login.status_code == 200, login.text
        bob.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
        theirs = bob.post("/api/chats", json={"agent_id": agent["id"]}).json()
        assert bob.post(f"/api/chats/{theirs['id']}/messages", json={"content": "theirs"}).status_code == 200
    page = web_page.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    log_in(page, team.email)
    page.get_by_role("link", name="Errors").click()
    headers = page.locator("thead th")
    expect(headers).to_have_text(["When", "Code", "Message", "HTTP", "Agent", "User", "Chat"])
    bob_row = page.locator("tbody tr", has_text="Bob")
    expect(bob_row.locator("td").nth(4)).to_have_text("Broken bot")
    # Another user's chat: no link (the admin would get a 404), the whole id, copied by its button.
    expect(bob_row.get_by_role("link")).to_have_count(0)
    expect(bob_row.locator("td").nth(6).locator("code")).to_have_text(theirs["id"])
    bob_row.get_by_role("button", name=f"Copy id of chat {theirs['id'][:8]}").click()
    expect(page.get_by_role("status").filter(has_text="Chat id copied.")).to_be_visible()
    assert page.evaluate("() => navigator.clipboard.readText()") == theirs["id"]
    # The admin's own chat: named "You", linked, and the link opens it.
    my_row = page.locator("tbody tr", has_text="You")
    expect(my_row.locator("td").nth(4)).to_have_text("Broken bot")
    link = my_row.get_by_role("link", name="Open the chat")
    expect(link).to_have_attribute("href", f"#/chats/{mine['id']}")
    link.click()
    expect(page.locator(".chat-header h1")).to_have_text("My failing chat")
    # Without the clipboard API (plain http on another host): the whole id is selected, for Ctrl+C.
    page.add_init_script("Object.defineProperty(Navigator.prototype, 'clipboard', { get: () => undefined })")
    page.goto("/#/admin/errors")
    page.reload()
    page.locator("tbody tr", has_text="Bob").get_by_role("button", name=re.compile("^Copy id")).click()
    expect(page.get_by_role("status").filter(has_text="Selected: press Ctrl+C")).to_be_visible()
    assert page.evaluate("() => getSelection().toString()") == theirs["id"]
    assert web_page.errors == []
