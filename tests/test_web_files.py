"""The browser client's attachments, sharing, export and import in a real Chromium: attach, remove and send files
(the fake n8n receives them), refusals shown and nothing sent, share read and forked by another member, exports
downloaded, an import round trip and its refusals; untrusted names and answers render inert."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import APIResponse, Browser, FilePayload, Locator, Page, Route, expect

from tests.live import LiveServer, free_port
from tests.web import PASSWORD, Team, Watched, create_team, log_in, send, serving, watch, web_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

FILE_MAX = 4096
IMPORT_MAX = 16_384
XSS_NAME = "<img src=x onerror=alert(1)>.txt"
XSS_TEXT = "<img src=x onerror=alert(2)> <script>alert(3)</script> [click](javascript:alert(4))"


@pytest.fixture(scope="module")
def web_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """This module's server has small caps, so the 413s, the 409 and the 422 are quick to reach from the page."""
    port = free_port()
    settings = web_settings(
        database_url,
        tmp_path_factory.mktemp("web-files"),
        port,
        FILE_MAX_BYTES=FILE_MAX,
        FILES_PER_MESSAGE_MAX=2,
        FILES_UNSENT_PER_CHAT_MAX=3,
        IMPORT_MAX_BODY_BYTES=IMPORT_MAX,
    )
    with serving(settings, port) as server:
        yield server


@pytest.fixture
def team(web_server: LiveServer, fake_n8n_url: str) -> Team:
    created = create_team(web_server.url)
    # base64: the fake n8n's recorded request holds the file's bytes, so a test can compare them.
    created.create_agent(f"{fake_n8n_url}/webhook/agent-stream", slug="echo-bot", file_delivery="base64")
    return created


def received(fake_n8n_url: str) -> list[dict[str, Any]]:
    return [r["json"] for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]


def open_new_chat(page: Page, team: Team) -> str:
    """An empty chat with Echo bot, made through the API (the page makes one only with its first message or
    file), open in the page; its id."""
    [agent] = [a for a in team.get("/api/agents") if a["name"] == "Echo bot"]
    chat_id = str(team.create_chat(agent["id"])["id"])
    log_in(page, team.email)
    page.locator(f'.chat-list a[href="#/chats/{chat_id}"]').click()
    expect(page.get_by_label("Message", exact=True)).to_be_focused()
    return chat_id


def attach(page: Page, *files: tuple[str, str, bytes]) -> None:
    """Through the attach button and the browser's file chooser, as a user picks files."""
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach files").click()
    payloads: list[FilePayload] = [{"name": n, "mimeType": t, "buffer": b} for n, t, b in files]
    chooser.value.set_files(payloads)


def menu_item(page: Page, item: str) -> None:
    """An item of the open chat's menu, in its header."""
    page.locator(".chat-header").get_by_label(re.compile("^Actions for ")).click()
    page.locator(".chat-header").get_by_role("button", name=item).click()


def api_detail(team: Team, chat_id: str, name: str, content_type: str, data: bytes) -> str:
    """What the API itself answers for the same upload, so the page is checked against the real text."""
    with team.api() as client:
        response = client.post(f"/api/chats/{chat_id}/files", files={"file": (name, data, content_type)})
    assert response.status_code >= 400
    return str(response.json()["detail"])


def add_member(team: Team, email: str = "bob@example.com") -> None:
    with team.api() as client:
        response = client.post("/api/users", json={"email": email, "password": PASSWORD, "full_name": "Bob"})
        assert response.status_code == 201, response.text


def test_attach_remove_and_send_a_text_file(web_page: Watched, team: Team, fake_n8n_url: str) -> None:
    page = web_page.page
    chat_id = open_new_chat(page, team)
    httpx.delete(f"{fake_n8n_url}/__requests")
    attach(page, ("notes.txt", "text/plain", b"hello from a file\n"), ("drop-me.csv", "text/csv", b"a,b\n1,2\n"))
    uploads = page.locator(".uploads .upload")
    expect(uploads.and_(page.locator("[data-state=done]"))).to_have_count(2)
    with page.expect_response(lambda r: r.request.method == "DELETE" and "/files/" in r.url) as deleted:
        page.get_by_role("button", name="Remove drop-me.csv").click()
    assert deleted.value.status == 204  # the unsent upload is gone from the server too
    expect(uploads).to_have_count(1)
    send(page, "read this")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(uploads).to_have_count(0)
    link = page.locator(".msg.user .files a")
    expect(link).to_have_text("notes.txt")
    # n8n received the one file, with its bytes (base64 delivery)
    [body] = received(fake_n8n_url)
    [sent] = body["files"]
    assert (sent["filename"], sent["mimeType"], sent["size"]) == ("notes.txt", "text/plain", 18)
    assert base64.b64decode(sent["data"]) == b"hello from a file\n"
    stored = team.get(f"/api/chats/{chat_id}")["messages"][0]["files"]
    assert [f["filename"] for f in stored] == ["notes.txt"]
    # The link downloads the file (an attachment: the page never displays it).
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == "notes.txt"
    assert Path(download.value.path()).read_bytes() == b"hello from a file\n"
    # An edit keeps the question's file in the new version.
    page.locator(".msg.user").get_by_role("button", name="Edit").click()
    edited = page.get_by_label("Edited message")
    edited.fill("read this again")
    edited.press("Enter")
    expect(page.locator(".msg.user .branch-pos")).to_have_text("2 / 2")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".msg.user .files a")).to_have_text("notes.txt")
    [question, _] = team.get(f"/api/chats/{chat_id}")["messages"]
    assert question["content"] == "read this again"
    assert [f["filename"] for f in question["files"]] == ["notes.txt"]
    assert [b["files"][0]["filename"] for b in received(fake_n8n_url)] == ["notes.txt", "notes.txt"]
    assert web_page.errors == []


def test_files_dropped_or_pasted_are_attached_and_stay_with_their_chat(web_page: Watched, team: Team) -> None:
    page = web_page.page
    open_new_chat(page, team)
    make = """([name, text]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([text], name, { type: "text/plain" }));
        return transfer;
    }"""
    dropped = page.evaluate_handle(make, ["dropped.txt", "dropped\n"])
    page.locator("form.composer").dispatch_event("drop", {"dataTransfer": dropped})
    # A paste as the browser sends it: a ClipboardEvent whose clipboardData holds the file.
    page.get_by_label("Message", exact=True).evaluate(
        """(box) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File(["pasted\\n"], "pasted.txt", { type: "text/plain" }));
            const init = { clipboardData: transfer, bubbles: true, cancelable: true };
            box.dispatchEvent(new ClipboardEvent("paste", init));
        }"""
    )
    done = page.locator(".uploads .upload[data-state=done] .file-name")
    expect(done).to_have_text(["dropped.txt", "pasted.txt"])
    expect(page.get_by_label("Message", exact=True)).to_have_value("")  # the paste attached, it typed nothing
    # Pending files stay with their chat while moving to another screen and back.
    page.get_by_role("link", name="+ New chat").click()
    expect(page.locator(".uploads")).to_have_count(0)
    page.locator(".chat-list .chat-link").first.click()
    expect(done).to_have_text(["dropped.txt", "pasted.txt"])
    send(page, "two files")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".msg.user .files a")).to_have_text(["dropped.txt", "pasted.txt"])


def test_leaving_the_chats_stops_the_uploads_under_way_and_waiting(web_page: Watched, team: Team) -> None:
    """Uploads went on after the page left the chats: a file still waiting was sent once the one before it
    ended, after going to the Shared page as after a logout (refused with 401 then, or sent with the cookies
    of whoever signed in next in the tab). Each upload is counted as the page sends it; an upload's end is
    marked one task after its events, once the page's handling of it (starting the next) has run."""
    page = web_page.page
    page.add_init_script(
        """
        window.uploads = { sent: 0, ended: 0, refreshed: 0 };
        const realSend = XMLHttpRequest.prototype.send;
        XMLHttpRequest.prototype.send = function (body) {
          window.uploads.sent += 1;
          this.addEventListener("loadend", () => setTimeout(() => { window.uploads.ended += 1; }));
          return realSend.call(this, body);
        };
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          const response = realFetch(url, init);
          const mark = () => setTimeout(() => { window.uploads.refreshed += 1; });
          if (String(url) === "/api/auth/refresh") response.then(mark, mark);
          return response;
        };
        """
    )
    chat_id = open_new_chat(page, team)
    held: list[Route] = []
    page.route("**/api/chats/*/files", lambda route: held.append(route))
    record = {"id": "00000000-0000-0000-0000-000000000000", "filename": "first.txt", "size": 6}

    def upload_held(count: int) -> Route:
        """The `count`th upload, once the route holding it has it (Playwright hands it over on its own time)."""
        page.wait_for_function(f"() => window.uploads.sent === {count}")
        while len(held) < count:
            page.wait_for_timeout(10)
        return held[count - 1]

    def leave_mid_upload(leave: Callable[[], None], uploads: int) -> None:
        attach(page, ("first.txt", "text/plain", b"first\n"), ("second.txt", "text/plain", b"second\n"))
        expect(page.locator(".uploads .upload[data-state=waiting]")).to_have_count(1)
        upload = upload_held(uploads)
        leave()
        # The held upload is answered (the page has aborted it: nothing arrives), and the page handles its end.
        upload.fulfill(status=201, json=record)
        page.wait_for_function(f"() => window.uploads.ended === {uploads}")
        assert page.evaluate("() => window.uploads.sent") == uploads  # the waiting file was never sent

    leave_mid_upload(lambda: page.get_by_role("link", name="Shared with team").click(), 1)
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat_id}'; }}")
    expect(page.get_by_label("Message", exact=True)).to_be_visible()
    expect(page.locator(".uploads .upload")).to_have_count(0)  # the files left behind went with the chats

    # An upload refused with 401 waits for the session's refresh, then is sent again: not once it was cancelled.
    refreshed = page.evaluate("() => window.uploads.refreshed")  # the one before logging in
    refreshes: list[Route] = []
    page.route("**/api/auth/refresh", lambda route: refreshes.append(route))
    attach(page, ("third.txt", "text/plain", b"third\n"))
    with page.expect_request("**/api/auth/refresh"):
        upload_held(2).fulfill(status=401, json={"detail": "Not authenticated"})
    page.get_by_role("link", name="Shared with team").click()
    refreshes[0].continue_()
    page.wait_for_function(f"() => window.uploads.refreshed > {refreshed}")
    assert page.evaluate("() => window.uploads.sent") == 2
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat_id}'; }}")
    expect(page.get_by_label("Message", exact=True)).to_be_visible()

    def log_out() -> None:
        page.get_by_role("button", name="Log out").click()
        expect(page.get_by_role("button", name="Log in")).to_be_visible()

    leave_mid_upload(log_out, 3)
    assert len(held) == 3
    assert web_page.errors == []


def test_refused_files_show_the_api_text_and_are_not_sent(web_page: Watched, team: Team, fake_n8n_url: str) -> None:
    page = web_page.page
    chat_id = open_new_chat(page, team)
    httpx.delete(f"{fake_n8n_url}/__requests")
    html = b"<html><body><script>alert(1)</script></body></html>"
    big = b"x" * (FILE_MAX + 1)
    attach(page, ("page.html", "text/html", html), ("big.txt", "text/plain", big), ("empty.txt", "text/plain", b""))
    refused = page.locator(".uploads .upload[data-state=error]")
    expect(refused).to_have_count(3)
    expect(refused.nth(0).get_by_role("alert")).to_have_text(api_detail(team, chat_id, "page.html", "text/html", html))
    expect(refused.nth(1).get_by_role("alert")).to_have_text(api_detail(team, chat_id, "big.txt", "text/plain", big))
    # A 422 names the field it is about, as every other 422 the page shows does.
    with team.api() as client:
        response = client.post(f"/api/chats/{chat_id}/files", files={"file": ("empty.txt", b"", "text/plain")})
    [empty] = response.json()["detail"]
    expect(refused.nth(2).get_by_role("alert")).to_have_text(f"{empty['loc'][-1]}: {empty['msg']}")
    assert "415" not in refused.nth(0).inner_text()  # the API's words, not a status line
    send(page, "no files please")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".uploads .upload")).to_have_count(0)
    assert [body.get("files") for body in received(fake_n8n_url)] == [None]
    assert team.get(f"/api/chats/{chat_id}")["messages"][0]["files"] == []


#: A valid 1x1 PNG (the server verifies images with Pillow).
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def test_a_refused_file_name_says_to_rename_it_and_the_draft_stays(web_page: Watched, team: Team) -> None:
    """A file name's extension that names another type than the content, or an HTML/SVG/XML/JavaScript/CSS one
    (also behind trailing dots and spaces or an invisible character), is refused with a reason naming the
    extension and what to do, not "does not match its declared type": a user picking a file declared
    nothing (the browser declares the type its name says). The typed message stays in the box."""
    page = web_page.page
    open_new_chat(page, team)
    box = page.get_by_label("Message", exact=True)
    box.fill("my draft")
    # The types Chromium declares for such names (from the extension; none for one it does not know).
    files = [
        ("notes.html", "text/html", b"hello", ".html"),
        ("logo.svg", "image/svg+xml", b"hello", ".svg"),
        ("app.js", "text/javascript", b"hello", ".js"),
        ("page.html .", "application/octet-stream", b"hello", ".html"),
        ("page.htm\u200bl", "application/octet-stream", b"hello", ".html"),
        ("report.pdf", "application/pdf", b"hello", ".pdf"),
        ("photo.txt", "text/plain", PNG_1X1, ".txt"),
        ("photo.jpg", "image/jpeg", PNG_1X1, ".jpg"),
    ]
    attach(page, *[(name, kind, data) for name, kind, data, _ in files])
    refused = page.locator(".uploads .upload[data-state=error]")
    expect(refused).to_have_count(len(files))
    for index, (name, _, _, extension) in enumerate(files):
        alert = refused.nth(index).get_by_role("alert")
        expect(alert).to_contain_text(f"name's extension {extension} ")
        expect(alert).to_contain_text("rename the file")
        expect(refused.nth(index).locator(".file-name")).to_have_text(name)
    expect(box).to_have_value("my draft")
    assert web_page.errors == []


def test_too_many_files_show_the_409_and_the_422_and_the_files_stay_pending(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    page = web_page.page
    chat_id = open_new_chat(page, team)
    httpx.delete(f"{fake_n8n_url}/__requests")
    attach(page, *[(f"f{i}.txt", "text/plain", f"file {i}\n".encode()) for i in range(4)])
    expect(page.locator(".uploads .upload[data-state=done]")).to_have_count(3)
    over = page.locator(".uploads .upload[data-state=error]")
    expect(over.locator(".file-name")).to_have_text("f3.txt")
    expect(over.get_by_role("alert")).to_have_text(api_detail(team, chat_id, "f4.txt", "text/plain", b"x\n"))
    send(page, "three at once")  # more than a message may carry: refused, nothing stored or sent
    expect(page.get_by_role("alert").filter(has_text="file_ids: A message carries at most 2 files")).to_be_visible()
    expect(page.locator(".uploads .upload[data-state=done]")).to_have_count(3)
    expect(page.get_by_label("Message", exact=True)).to_have_value("three at once")  # back in the box
    assert team.get(f"/api/chats/{chat_id}")["messages"] == []
    assert received(fake_n8n_url) == []
    page.get_by_role("button", name="Remove f2.txt").click()
    send(page, "two then")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".msg.user .files a")).to_have_text(["f0.txt", "f1.txt"])
    expect(page.locator(".uploads .upload")).to_have_count(0)


def test_share_then_another_member_reads_it_inert_and_forks_it(
    web_page: Watched, team: Team, browser: Browser, web_server: LiveServer
) -> None:
    page = web_page.page
    chat_id = open_new_chat(page, team)
    attach(page, (XSS_NAME, "text/plain", b"payload\n"))
    expect(page.locator(".uploads .upload[data-state=done]")).to_have_count(1)
    send(page, XSS_TEXT)
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".msg.user .files a")).to_have_text(XSS_NAME)
    menu_item(page, "Share with team")
    link = page.get_by_label("Link to the shared chat").input_value()
    share_id = team.get("/api/shares")[0]["id"]
    assert link == f"{web_server.url}/#/shares/{share_id}"
    page.get_by_role("button", name="Close").click()

    add_member(team)
    context = browser.new_context(base_url=web_server.url)
    try:
        member = watch(context.new_page())
        log_in(member.page, "bob@example.com")
        member.page.get_by_role("link", name="Shared", exact=True).click()
        member.page.locator(".share-list a").first.click()
        view = member.page.locator(".shares")
        expect(view.locator(".msg.assistant .content")).to_contain_text("Echo:")
        expect(view.locator(".msg.user .content")).to_have_text(XSS_TEXT)  # plain text, as typed
        # The name as text, linking to the share's own copy of the file: it downloads the sent bytes.
        shared_file = view.locator(".msg.user .files a")
        expect(shared_file).to_have_text(XSS_NAME)
        with member.page.expect_download() as got:
            shared_file.click()
        assert Path(got.value.path()).read_bytes() == b"payload\n"
        assert view.locator("img, script, iframe, svg, [onerror]").count() == 0
        assert view.locator("a[href^='javascript:']").count() == 0
        expect(view.get_by_role("button", name="Regenerate")).to_have_count(0)  # read-only
        expect(view.get_by_role("button", name="Delete share")).to_be_hidden()  # not the sharer's
        view.get_by_role("button", name="Fork into my chats").click()
        expect(member.page).to_have_url(re.compile(r"#/chats/[0-9a-f-]{36}$"))
        expect(member.page.locator(".msg.user .content")).to_have_text(XSS_TEXT)
        fork_id = member.page.url.rsplit("/", 1)[1]
        assert fork_id != chat_id
        # The owner stops sharing: the member's link is dead.
        menu_item(page, "Stop sharing")
        expect(page.get_by_role("status").filter(has_text="No longer shared")).to_be_visible()
        member.page.goto(f"/#/shares/{share_id}")
        expect(member.page.get_by_role("alert")).to_have_text("This shared chat does not exist or is no longer shared.")
        assert member.dialogs == []
        assert member.errors == []
    finally:
        context.close()
    assert web_page.dialogs == []
    assert web_page.errors == []


def test_a_chats_menu_offers_only_the_sharing_action_that_applies(web_page: Watched, team: Team) -> None:
    """The menu always offered both "Share with team" and "Stop sharing"; on a chat not shared, the second only
    said "This chat is not shared". Now the team's shares tell which applies, in the chat's header and in the
    list, and the page's own share and unshare keep it up to date."""
    agent_id = team.get("/api/agents")[0]["id"]
    shared = team.create_chat(agent_id, title="Shared before")
    with team.api() as client:
        assert client.post(f"/api/chats/{shared['id']}/share").status_code == 201
    page = web_page.page
    chat_id = open_new_chat(page, team)
    header = page.locator(".chat-header")

    def expect_offered(where: Locator, actions: list[str]) -> None:
        """The menu's sharing actions, opened and closed again. Retried: the menu fills its items on its `toggle`
        event, a task after the click, and until then shows what it offered when last opened."""
        where.get_by_label(re.compile("^Actions for ")).click()
        sharing = where.locator(".menu-items button").filter(has_text=re.compile("shar", re.IGNORECASE))
        # Until the team's shares are read (a request of its own, late on a loaded machine) both actions show.
        expect(sharing).to_have_text(actions, timeout=10_000)
        where.get_by_label(re.compile("^Actions for ")).click()  # closed again

    expect(page.locator(".chat-list li[data-id]")).to_have_count(2)
    expect_offered(header, ["Share with team"])
    expect_offered(page.locator(f".chat-list li[data-id='{shared['id']}']"), ["Update share", "Stop sharing"])
    menu_item(page, "Share with team")
    page.get_by_role("button", name="Close").click()
    expect_offered(header, ["Update share", "Stop sharing"])
    expect_offered(page.locator(f".chat-list li[data-id='{chat_id}']"), ["Update share", "Stop sharing"])
    menu_item(page, "Stop sharing")
    expect(page.get_by_role("status").filter(has_text="No longer shared")).to_be_visible()
    expect_offered(header, ["Share with team"])
    assert [share["chat_id"] for share in team.get("/api/shares")] == [shared["id"]]
    assert web_page.errors == []


def test_a_deactivated_agents_chats_and_shares_show_its_name(web_page: Watched, team: Team, fake_n8n_url: str) -> None:
    """Members list only active agents, so a share (and a chat) whose agent was deactivated showed "Agent" (the
    chat "Agent no longer active") with "?" initials. The agent is read by id, as the API allows for old chats:
    its name, marked deactivated, and its avatar."""
    agent = team.create_agent(f"{fake_n8n_url}/webhook/agent-stream", name="Old bot")
    chat = team.create_chat(agent["id"], title="Before the change")
    with team.api() as client:
        share_id = client.post(f"/api/chats/{chat['id']}/share").json()["id"]
        assert client.put(f"/api/agents/{agent['id']}", json={"is_active": False}).status_code == 200
    page = web_page.page
    log_in(page, team.email)
    expect(page.locator(f".chat-list li[data-id='{chat['id']}'] .initials")).to_have_text("OB")
    page.get_by_role("link", name="Shared", exact=True).click()
    row = page.locator(".share-list li", has_text="Before the change")
    expect(row).to_contain_text("Old bot (deactivated)")
    expect(row.locator(".initials")).to_have_text("OB")
    row.get_by_role("link").click()
    expect(page).to_have_url(re.compile(f"#/shares/{share_id}$"))
    expect(page.locator(".shares .chat-header .muted")).to_contain_text("Old bot (deactivated) · shared")
    expect(page.locator(".shares .chat-header .initials")).to_have_text("OB")
    page.goto(f"/#/chats/{chat['id']}")
    expect(page.locator(".pane .chat-header .muted")).to_have_text("Old bot (deactivated)")
    expect(page.locator(".pane .chat-header .initials")).to_have_text("OB")
    assert web_page.errors == []


def test_fork_of_a_share_whose_agent_is_inactive_is_disabled_with_the_reason(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """ "Fork into my chats" on a share whose agent was deactivated stayed enabled, and each click got the API's
    409 in a toast that faded, the button enabled again. It is now disabled with the reason beside it; an agent
    deactivated after the share was opened gets the same from the API's refusal."""
    old = team.create_agent(f"{fake_n8n_url}/webhook/agent-stream", name="Old bot")
    later = team.create_agent(f"{fake_n8n_url}/webhook/agent-stream", name="Later bot")
    with team.api() as client:
        share_ids = [
            client.post(f"/api/chats/{team.create_chat(agent['id'])['id']}/share").json()["id"]
            for agent in (old, later)
        ]
        assert client.put(f"/api/agents/{old['id']}", json={"is_active": False}).status_code == 200
    page = web_page.page
    forks: list[int] = []
    page.on("response", lambda r: forks.append(r.status) if r.url.endswith("/fork") else None)
    log_in(page, team.email)
    page.goto(f"/#/shares/{share_ids[0]}")
    fork = page.get_by_role("button", name="Fork into my chats")
    expect(fork).to_be_disabled()
    expect(page.locator(".fork-why")).to_have_text(
        "Fork is unavailable: Old bot was deactivated, and a fork continues with it. An admin can reactivate it."
    )
    expect(fork).to_have_accessible_description(re.compile("Old bot was deactivated"))
    # The other share's agent is deactivated once its share is open: the API's refusal, and Fork stays disabled.
    page.goto(f"/#/shares/{share_ids[1]}")
    expect(page.locator(".shares .chat-header h1")).to_be_visible()
    expect(page.locator(".fork-why")).to_be_hidden()
    with team.api() as client:
        assert client.put(f"/api/agents/{later['id']}", json={"is_active": False}).status_code == 200
    fork.click()
    expect(page.locator(".fork-why")).to_contain_text("Fork is unavailable: Agent is inactive")
    expect(fork).to_be_disabled()
    assert forks == [409]
    assert len(team.get("/api/chats")) == 2  # no fork was made
    assert web_page.errors == []


def test_a_share_link_opened_signed_out_shows_the_share_once_logged_in(web_page: Watched, team: Team) -> None:
    """A teammate's share link is opened in a browser without a session: the login form, then the shared chat.
    Logging in went to the chat list instead, so the link was lost and the reader had to look for the share."""
    agent = team.get("/api/agents")[0]
    chat = team.create_chat(agent["id"], title="Quarterly plan")
    with team.api() as client:
        share_id = client.post(f"/api/chats/{chat['id']}/share").json()["id"]
    add_member(team)
    page = web_page.page
    page.goto(f"/#/shares/{share_id}")
    expect(page).to_have_url(re.compile(r"#/login$"))
    page.get_by_label("Email").fill("bob@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(f"#/shares/{share_id}$"))
    expect(page.locator(".shares h1")).to_have_text("Quarterly plan")
    # Only the page asked for while signed out: after a logout, logging in again shows the chats.
    page.get_by_role("button", name="Log out").click()
    page.get_by_label("Email").fill("bob@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"#/chats$"))
    assert web_page.dialogs == []
    assert web_page.errors == []


def test_the_share_dialog_goes_with_the_page_it_was_opened_on(web_page: Watched, team: Team) -> None:
    """The dialog sits on <body>, outside the page's frame: a session that ended under it (the next request a
    401) showed the previous user's share link over the login page, and Back kept it over another page."""
    page = web_page.page
    open_new_chat(page, team)
    send(page, "to share")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    menu_item(page, "Share with team")
    expect(page.get_by_label("Link to the shared chat")).to_be_visible()
    page.context.clear_cookies()  # the session ends; the page learns it from its next request
    page.evaluate("location.hash = '#/shares'")
    expect(page).to_have_url(re.compile(r"#/login$"))
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    expect(page.locator("dialog")).to_have_count(0)
    assert web_page.errors == []


def test_a_share_answered_after_a_logout_shows_no_link_over_the_login_form(web_page: Watched, team: Team) -> None:
    """The share dialog opened when the share's request came back, whatever page was shown by then: a logout
    while it was on its way (a slow network) showed the previous user's share link over the login form."""
    page = web_page.page
    open_new_chat(page, team)
    send(page, "to share")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    held: list[tuple[Route, APIResponse]] = []  # the share made at once, its answer handed over later
    page.route("**/api/chats/*/share", lambda route: held.append((route, route.fetch())))
    with page.expect_request("**/api/chats/*/share"):
        menu_item(page, "Share with team")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    route, response = held[0]
    assert response.status == 201
    route.fulfill(response=response)
    page.wait_for_timeout(300)  # the page has handled the answer
    expect(page.locator("dialog")).to_have_count(0)
    expect(page.get_by_label("Link to the shared chat")).to_have_count(0)
    assert web_page.errors == []


def test_an_imported_chats_files_show_as_names_without_links(web_page: Watched, team: Team) -> None:
    """An import carries files as metadata only (their id is null): the page names them and links nothing."""
    page = web_page.page
    chat_id = open_new_chat(page, team)
    attach(page, ("notes.txt", "text/plain", b"some notes\n"))
    expect(page.locator(".uploads .upload[data-state=done]")).to_have_count(1)
    send(page, "with a file")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    with team.api() as client:
        exported = client.get(f"/api/chats/{chat_id}/export", params={"format": "json"}).content
        imported = client.post("/api/chats/import", content=exported, headers={"content-type": "application/json"})
    assert imported.status_code == 201, imported.text
    page.goto(f"/#/chats/{imported.json()[0]['id']}")
    files = page.locator(".msg.user .files")
    expect(files.locator(".file-name")).to_have_text("notes.txt")
    expect(files).to_contain_text("not stored here")
    expect(files.locator("a")).to_have_count(0)
    assert web_page.errors == []


def test_export_markdown_json_and_all_then_import_round_trip(web_page: Watched, team: Team, tmp_path: Path) -> None:
    page = web_page.page
    chat_id = open_new_chat(page, team)
    send(page, "remember *this*")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)

    with page.expect_download() as markdown:
        menu_item(page, "Export as Markdown")
    assert markdown.value.suggested_filename == f"chat-{chat_id}.md"
    with team.api() as client:
        expected = client.get(f"/api/chats/{chat_id}/export", params={"format": "markdown"}).text
    # The file is the API's export byte for byte, but for the line with the time it was made.
    not_exported = re.compile(r"^Exported: .*$", re.M)
    saved = Path(markdown.value.path()).read_text()
    assert not_exported.sub("", saved) == not_exported.sub("", expected)
    assert "## Assistant\n\n_" in saved
    assert "Echo: remember *this*" in saved

    with page.expect_download() as exported:
        menu_item(page, "Export as JSON")
    assert exported.value.suggested_filename == f"chat-{chat_id}.json"
    document = json.loads(Path(exported.value.path()).read_text())
    assert [m["content"] for m in document["messages"]] == ["remember *this*", "Echo: remember *this*"]

    with page.expect_download() as everything:
        page.get_by_role("button", name="Export all").click()
    assert everything.value.suggested_filename.endswith(".jsonl")
    lines = Path(everything.value.path()).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [chat_id]

    # Import what was exported: a new chat with the same messages opens.
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Import…").click()
    chooser.value.set_files(exported.value.path())
    expect(page.get_by_role("status").filter(has_text="Imported 1 chat.")).to_be_visible()
    expect(page).not_to_have_url(re.compile(chat_id))
    expect(page.locator(".msg.assistant .content")).to_have_text("Echo: remember this")  # Markdown: *this* → em
    assert len(team.get("/api/chats")) == 2

    # Refusals: an agent slug the team lacks (422, named), a file over the import cap (413); nothing stored.
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**document, "agent": {"slug": "nobody", "name": "Nobody"}}))
    too_big = tmp_path / "big.jsonl"
    too_big.write_text((json.dumps(document) + "\n") * (IMPORT_MAX // len(json.dumps(document)) + 1))
    for path, message in [
        (unknown, "Chat 1: no agent with slug 'nobody' in your team"),
        (too_big, "Request body too large"),
    ]:
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Import…").click()
        chooser.value.set_files(str(path))
        expect(page.get_by_role("alert").filter(has_text=message)).to_be_visible()
    assert len(team.get("/api/chats")) == 2
    assert web_page.errors == []


def test_a_double_click_on_load_more_lists_each_share_once(web_page: Watched, team: Team) -> None:
    agent_id = team.get("/api/agents")[0]["id"]
    with team.api() as client:
        for i in range(31):  # one more than a page
            chat = client.post("/api/chats", json={"agent_id": agent_id, "title": f"Chat {i:02}"}).json()
            assert client.post(f"/api/chats/{chat['id']}/share").status_code == 201
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Shared", exact=True).click()
    shares = page.locator(".share-list li")
    expect(shares).to_have_count(30)
    page.get_by_role("button", name="Load more").dblclick()
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()
    expect(shares).to_have_count(31)
    titles = shares.locator(".chat-title").all_inner_texts()
    assert sorted(titles) == [f"Chat {i:02}" for i in range(31)]


def test_load_more_shares_from_the_keyboard_goes_on_from_the_first_share_it_added(
    web_page: Watched, team: Team
) -> None:
    """The shared chats' Load more is disabled while its page loads, which dropped its focus to the page's start;
    the focus now moves to the first share the page added."""
    agent_id = team.get("/api/agents")[0]["id"]
    with team.api() as client:
        for i in range(31):  # one more than a page
            chat = client.post("/api/chats", json={"agent_id": agent_id, "title": f"Chat {i:02}"}).json()
            assert client.post(f"/api/chats/{chat['id']}/share").status_code == 201
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Shared", exact=True).click()
    shares = page.locator(".share-list li")
    expect(shares).to_have_count(30)
    page.get_by_role("button", name="Load more").focus()
    page.keyboard.press("Enter")
    expect(shares).to_have_count(31)
    expect(shares.nth(30).locator("a")).to_be_focused()


def test_removing_a_pending_file_keeps_the_keyboard_in_the_files(web_page: Watched, team: Team) -> None:
    """The pending files were drawn anew on every change, so a file's Remove pressed from the keyboard dropped the
    focus to the page's start. It now goes to the next file's Remove, then (the last one gone) to the message box."""
    page = web_page.page
    open_new_chat(page, team)
    attach(page, ("one.txt", "text/plain", b"1"), ("two.txt", "text/plain", b"2"))
    uploads = page.locator(".uploads .upload")
    expect(uploads.and_(page.locator("[data-state=done]"))).to_have_count(2)
    page.get_by_role("button", name="Remove one.txt").focus()
    page.keyboard.press("Enter")
    expect(uploads).to_have_count(1)
    expect(page.get_by_role("button", name="Remove two.txt")).to_be_focused()
    page.keyboard.press("Enter")
    expect(uploads).to_have_count(0)
    expect(page.get_by_label("Message", exact=True)).to_be_focused()


def test_a_refused_file_is_announced_once(web_page: Watched, team: Team) -> None:
    """A refusal shows on its file with `role="alert"`, which a screen reader announces when it is added: the list
    was drawn anew on every change of any file (each upload's start, progress and end), adding the same alert
    again each time, so it was announced again and again. A file's element now stays while its state does."""
    page = web_page.page
    open_new_chat(page, team)
    page.evaluate(
        """() => {
        window.alertsAdded = 0;
        const alerts = (node) => node.matches('[role=alert]') + node.querySelectorAll('[role=alert]').length;
        new MutationObserver((changes) => {
          for (const change of changes)
            for (const node of change.addedNodes) if (node.nodeType === 1) window.alertsAdded += alerts(node);
        }).observe(document.querySelector('.uploads'), { childList: true, subtree: true });
        }"""
    )
    # Uploaded one at a time: the refused page first, then two files whose uploads change the list after it.
    attach(
        page,
        ("page.html", "text/html", b"<p>hi</p>"),
        ("one.txt", "text/plain", b"1"),
        ("two.txt", "text/plain", b"2"),
    )
    uploads = page.locator(".uploads .upload")
    expect(uploads.and_(page.locator("[data-state=done]"))).to_have_count(2)
    expect(uploads.and_(page.locator("[data-state=error]")).get_by_role("alert")).to_be_visible()
    assert page.evaluate("window.alertsAdded") == 1


def test_a_file_attached_to_a_new_chat_makes_the_chat(web_page: Watched, team: Team) -> None:
    """A new chat is made on the server by its first message (picking an agent stores nothing); a file attached
    before that message needs the chat (the server keeps files in one), so the first file makes it, and the
    address, list and upload are that chat's from then on."""
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("button", name=re.compile("Echo bot")).click()
    expect(page).to_have_url(re.compile("#/new/"))
    page.get_by_label("Message", exact=True).fill("read this")
    assert team.get("/api/chats") == []
    attach(page, ("notes.txt", "text/plain", b"hello from a file\n"))
    expect(page.locator(".uploads .upload[data-state=done]")).to_have_count(1)
    [chat] = team.get("/api/chats")
    expect(page).to_have_url(re.compile(f"#/chats/{chat['id']}$"))
    expect(page.locator(f'.chat-list li[data-id="{chat["id"]}"]')).to_have_count(1)
    expect(page.get_by_label("Message", exact=True)).to_have_value("read this")  # what was typed stays
    page.get_by_label("Message", exact=True).press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".msg.user .files a")).to_have_text("notes.txt")
    [question, _] = team.get(f"/api/chats/{chat['id']}")["messages"]
    assert [f["filename"] for f in question["files"]] == ["notes.txt"]
    assert len(team.get("/api/chats")) == 1
    assert web_page.errors == []


FILES_KEPT = "() => Object.keys(sessionStorage).filter((key) => key.startsWith('files:'))"


def test_pending_files_survive_a_reload_with_the_draft_and_go_with_the_session(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """The draft came back after a reload but the files attached to it did not, though they were still on the
    server (unsent, counted against the chat's cap): the message went without them unless attached again. The
    uploaded pending files are now kept in the tab with the draft and are pending again after a reload (or the
    Shared page and back), for the same user; a logout forgets them."""
    page = web_page.page
    chat_id = open_new_chat(page, team)
    httpx.delete(f"{fake_n8n_url}/__requests")
    attach(page, ("notes.txt", "text/plain", b"hello from a file\n"), ("more.txt", "text/plain", b"more\n"))
    done = page.locator(".uploads .upload[data-state=done] .file-name")
    expect(done).to_have_text(["notes.txt", "more.txt"])
    page.get_by_label("Message", exact=True).press_sequentially("read these")
    page.reload()
    expect(page.get_by_label("Message", exact=True)).to_have_value("read these")
    expect(done).to_have_text(["notes.txt", "more.txt"])
    # Removed after the reload: removed on the server too, and no longer kept.
    with page.expect_response(lambda r: r.request.method == "DELETE" and "/files/" in r.url) as deleted:
        page.get_by_role("button", name="Remove more.txt").click()
    assert deleted.value.status == 204
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Shared").click()
    expect(page.get_by_role("heading", name="Shared with team")).to_be_visible()
    page.go_back()
    expect(done).to_have_text(["notes.txt"])
    send(page, "read these")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".msg.user .files a")).to_have_text("notes.txt")
    [body] = [r["json"] for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]
    assert [f["filename"] for f in body["files"]] == ["notes.txt"]
    # Sent: nothing pending is kept, a reload shows none.
    assert page.evaluate(FILES_KEPT) == []
    page.reload()
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator(".uploads .upload")).to_have_count(0)
    # A logout forgets the pending files, as it forgets the drafts.
    attach(page, ("later.txt", "text/plain", b"later\n"))
    expect(done).to_have_text(["later.txt"])
    assert page.evaluate(FILES_KEPT) == [f"files:{chat_id}"]
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    assert page.evaluate(FILES_KEPT) == []
    # Files kept in the tab for another user (before their session ended) are not shown, and go.
    log_in(page, team.email)
    page.evaluate(
        "([key, file]) => sessionStorage.setItem(key, JSON.stringify({ user: 'someone else', files: [file] }))",
        [f"files:{chat_id}", {"id": "00000000-0000-0000-0000-000000000000", "filename": "theirs.txt", "size": 6}],
    )
    page.locator(f'.chat-list a[href="#/chats/{chat_id}"]').click()
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator(".uploads .upload")).to_have_count(0)
    assert page.evaluate(FILES_KEPT) == []
    assert web_page.errors == []


def test_a_file_attached_to_a_new_chat_goes_to_that_chat_when_another_is_opened_meanwhile(
    web_page: Watched, team: Team
) -> None:
    """The first file of a new chat waits for the chat to be made; another chat opened meanwhile must not take the
    upload (the file would then be stored in that chat, and the new chat's send refused)."""
    page = web_page.page
    [agent] = team.get("/api/agents")
    other = team.create_chat(agent["id"], title="Other")
    log_in(page, team.email)
    page.get_by_role("link", name="+ New chat").click()
    page.get_by_role("button", name=re.compile("Echo bot")).click()
    held: list[Route] = []
    page.route(
        re.compile(r"/api/chats$"),
        lambda route: held.append(route) if route.request.method == "POST" else route.continue_(),
    )
    attach(page, ("notes.txt", "text/plain", b"hello from a file\n"))
    expect(page.locator(".uploads .upload")).to_have_count(1)
    page.get_by_role("link", name="Other").click()
    expect(page.locator(".chat-header h1")).to_have_text("Other")
    while not held:
        page.wait_for_timeout(50)
    held[0].continue_()
    expect(page.locator(".chat-list li")).to_have_count(2)
    expect(page).to_have_url(re.compile(f"#/chats/{other['id']}$"))
    expect(page.locator(".uploads .upload")).to_have_count(0)
    [made] = [c for c in team.get("/api/chats") if c["id"] != other["id"]]
    page.locator(f'.chat-list a[href="#/chats/{made["id"]}"]').click()
    expect(page.locator(".uploads .upload[data-state=done] .file-name")).to_have_text("notes.txt")
    send(page, "read this")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".msg.user .files a")).to_have_text("notes.txt")
    assert web_page.errors == []
