"""The browser client's chat in a real Chromium: login, streaming, stop, reload mid-stream, retry, branches,
feedback, the chat list and the session refresh (the fake n8n echoes each message word by word)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, FilePayload, Locator, Page, Request, Route, expect

from tests.live import LiveServer
from tests.web import PASSWORD, Team, Watched, answer_text, create_team, log_in, send
from tools.fake_n8n import raw_answer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SLOW = "[delay=150] " + " ".join(f"w{i}" for i in range(30))  # an answer of about 4.5 s


@pytest.fixture
def team(web_server: LiveServer, fake_n8n_url: str) -> Team:
    created = create_team(web_server.url)
    created.create_agent(f"{fake_n8n_url}/webhook/agent-stream", description="Echoes you")
    return created


def open_new_chat(watched: Watched, team: Team) -> None:
    """An empty chat with Echo bot, open in the page. Made through the API: the page makes a chat only with its
    first message (test_a_new_chat_is_made_by_its_first_message_not_by_picking_an_agent), and many tests here
    need the chat to exist before that message (its id, a first send made while offline)."""
    [agent] = [a for a in team.get("/api/agents") if a["name"] == "Echo bot"]
    chat = team.create_chat(agent["id"])
    log_in(watched.page, team.email)
    watched.page.locator(f'.chat-list a[href="#/chats/{chat["id"]}"]').click()
    expect(watched.page.get_by_label("Message", exact=True)).to_be_focused()


def start_elsewhere(team: Team, chat_id: str, content: str) -> None:
    """Another tab (or client) starts an answer and goes away; the server keeps generating it."""
    with team.api() as client, client.stream("POST", f"/api/chats/{chat_id}/messages", json={"content": content}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if '"type": "start"' in line:
                break


def test_login_with_a_wrong_password_shows_the_error(web_page: Watched, team: Team) -> None:
    page = web_page.page
    page.goto("/")
    page.get_by_label("Email").fill(team.email)
    page.get_by_label("Password").fill("wrong password!")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("Incorrect email or password")
    expect(page.get_by_role("link", name="+ New chat")).to_have_count(0)


def test_new_chat_from_the_keyboard_puts_the_focus_on_the_first_agent(web_page: Watched, team: Team) -> None:
    """ "+ New chat" showed the agent picker but kept the focus on itself: after it in the page come the search,
    the switch and two stops per chat of the list, so a keyboard user with a page of chats pressed Tab 60 times
    to reach an agent. The first agent now takes the focus."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    for i in range(30):
        team.create_chat(agent_id, title=f"Chat {i:02d}")
    log_in(page, team.email)
    expect(page.locator(".chat-list li")).to_have_count(30)
    page.get_by_role("link", name="+ New chat").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("button", name=re.compile("Echo bot"))).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_label("Message", exact=True)).to_be_focused()
    assert len(team.get("/api/chats")) == 30  # made by its first message only


def test_a_refused_login_pressed_from_the_keyboard_keeps_the_focus_on_its_button(web_page: Watched, team: Team) -> None:
    """The button is disabled while the login runs, which dropped its focus: after "Incorrect email or password"
    a keyboard user's next Tab started from the page's start. The focus now goes back on the button."""
    page = web_page.page
    page.goto("/")
    page.get_by_label("Email").fill(team.email)
    page.get_by_label("Password").fill("wrong password!")
    button = page.get_by_role("button", name="Log in")
    button.focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_have_text("Incorrect email or password")
    expect(button).to_be_enabled()
    expect(button).to_be_focused()
    page.keyboard.press("Shift+Tab")
    expect(page.get_by_label("Password")).to_be_focused()


def test_the_agent_picker_and_an_empty_archive_say_where_you_are(web_page: Watched, team: Team) -> None:
    """The agent picker (#/new) marked no page of the top bar as current (it is the chats'), and the Archived
    switch with nothing archived said "No chats yet." to someone who has chats."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    team.create_chat(agent_id, title="Not archived")
    log_in(page, team.email)
    chats = page.get_by_role("navigation", name="Main").get_by_role("link", name="Chats")
    expect(chats).to_have_attribute("aria-current", "page")
    page.get_by_role("link", name="+ New chat").click()
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    expect(chats).to_have_attribute("aria-current", "page")
    page.get_by_role("checkbox", name="Archived").check()
    expect(page.locator(".chat-list")).to_have_text("No archived chats.")
    page.get_by_role("checkbox", name="Archived").uncheck()
    expect(page.locator(".chat-list")).to_contain_text("Not archived")


def test_a_user_in_two_teams_picks_the_team_by_name(web_page: Watched, web_server: LiveServer) -> None:
    """An email and password valid in two teams could not log in from the page: the 401 listing the teams was
    reduced to its text, and only a team id typed by hand helped. The page now offers the teams by name."""
    page = web_page.page
    ids = {}
    for name in ("Acme", "Beta"):
        body = {"name": name, "admin_email": "ada@example.com", "admin_password": PASSWORD}
        created = httpx.post(f"{web_server.url}/api/teams", json=body)
        assert created.status_code == 201, created.text
        ids[name] = created.json()["team"]["id"]
    page.goto("/")
    page.get_by_label("Email").fill("ada@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("Your email is in several teams: choose one, then log in.")
    team = page.get_by_label("Team")
    expect(team).to_be_focused()
    assert team.locator("option").all_inner_texts() == ["Acme", "Beta"]
    team.select_option(label="Beta")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    me = httpx.get(f"{web_server.url}/api/auth/me", cookies=dict_cookies(page))
    assert me.json()["team_id"] == ids["Beta"]


def test_chat_streams_the_answer_token_by_token(web_page: Watched, team: Team) -> None:
    page = web_page.page
    open_new_chat(web_page, team)
    words = " ".join(f"w{i}" for i in range(12))
    send(page, f"[delay=120] {words}")
    answer = page.locator(".msg.assistant").last
    # Part of the answer is painted while it is still being written...
    expect(answer).to_have_attribute("data-status", "streaming")
    expect(answer.locator(".content")).to_contain_text("w2")
    assert "w11" not in answer_text(page)
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    # ...then the stored message replaces it: complete, same text.
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page) == f"Echo: [delay=120] {words}"
    measured = page.evaluate("performance.getEntriesByName('first-token').map((e) => e.duration)")
    assert len(measured) == 1
    assert 0 < measured[0] < 5000
    chat_id = page.url.rsplit("/", 1)[1]
    stored = team.get(f"/api/chats/{chat_id}")["messages"]
    assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "complete")]
    assert web_page.errors == []
    assert web_page.dialogs == []


def test_stop_ends_the_answer_as_cancelled(web_page: Watched, team: Team) -> None:
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "[delay=200] " + " ".join(f"w{i}" for i in range(60)))
    expect(page.locator(".msg.assistant .content")).to_contain_text("w1")
    page.get_by_role("button", name="Stop").click()
    stopped = page.locator(".msg.assistant[data-status=cancelled]")
    expect(stopped).to_have_count(1)
    expect(stopped.locator(".badge")).to_have_text("Stopped")
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    assert "w59" not in answer_text(page)
    chat_id = page.url.rsplit("/", 1)[1]
    assert team.get(f"/api/chats/{chat_id}")["messages"][-1]["status"] == "cancelled"


def test_stop_pressed_while_the_send_is_on_its_way_still_stops(web_page: Watched, team: Team) -> None:
    """Stop pressed before the server had registered the answer got a 409 and did nothing, Stop staying
    disabled while the answer ran to its end; the stop is now sent again on the answer's `start`."""
    page = web_page.page
    # A slow network: the send reaches the server 1 s after the click.
    page.add_init_script(
        """
        const realFetch = window.fetch;
        window.fetch = (url, init) => /\\/messages$/.test(String(url)) && init?.method === "POST"
          ? new Promise((ok) => setTimeout(ok, 1000)).then(() => realFetch(url, init))
          : realFetch(url, init);
        """
    )
    open_new_chat(web_page, team)
    stops: list[int] = []
    page.on("response", lambda r: stops.append(r.status) if r.url.endswith("/stop") else None)
    send(page, SLOW)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".msg.assistant[data-status=cancelled]")).to_have_count(1)
    assert "w29" not in answer_text(page)
    assert stops == [409, 200]
    chat_id = page.url.rsplit("/", 1)[1]
    assert team.get(f"/api/chats/{chat_id}")["messages"][-1]["status"] == "cancelled"


def test_stop_stays_disabled_while_the_stop_resent_on_start_is_on_its_way(web_page: Watched, team: Team) -> None:
    """The first stop's 409 (sent before the server had the answer) arrived after `start` had sent the stop
    again: Stop was enabled until that second stop ended the answer."""
    page = web_page.page
    # A slow network: the send reaches the server 1 s after the click; the first stop's answer comes back
    # 1.5 s late (after `start`), the second stop reaches the server 1.5 s late.
    page.add_init_script(
        """
        const realFetch = window.fetch;
        const later = (ms) => new Promise((ok) => setTimeout(ok, ms));
        let stops = 0;
        window.stopEnabled = [];
        window.fetch = (url, init) => {
          const send = /\\/messages$/.test(String(url)) && init?.method === "POST";
          if (send) return later(1000).then(() => realFetch(url, init));
          if (!/\\/stop$/.test(String(url))) return realFetch(url, init);
          if (++stops === 1) {
            setInterval(() => {
              const button = document.querySelector("button.stop");
              if (button && !button.hidden && !button.disabled) window.stopEnabled.push(performance.now());
            }, 20);
            return realFetch(url, init).then((response) => later(1500).then(() => response));
          }
          return later(1500).then(() => realFetch(url, init));
        };
        """
    )
    open_new_chat(web_page, team)
    stops: list[int] = []
    page.on("response", lambda r: stops.append(r.status) if r.url.endswith("/stop") else None)
    send(page, SLOW)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".msg.assistant[data-status=cancelled]")).to_have_count(1, timeout=15_000)
    assert stops == [409, 200]
    assert page.evaluate("window.stopEnabled") == []


def test_reload_mid_stream_continues_the_answer(web_page: Watched, team: Team) -> None:
    page = web_page.page
    open_new_chat(web_page, team)
    words = " ".join(f"w{i}" for i in range(25))
    send(page, f"[delay=100] {words}")
    expect(page.locator(".msg.assistant .content")).to_contain_text("w3")
    follows: list[Request] = []

    def record(request: Request) -> None:
        if "/stream?" in request.url:
            follows.append(request)

    page.on("request", record)
    page.reload()
    # The page follows the same generation from the last event it handled, and the answer completes whole.
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1, timeout=15_000)
    assert answer_text(page) == f"Echo: [delay=100] {words}"
    assert len(follows) == 1
    assert "assistant_message_id=" in follows[0].url
    assert int(follows[0].headers["last-event-id"]) > 3
    assert page.evaluate("Object.keys(sessionStorage).filter((k) => k.startsWith('stream:'))") == []


def test_a_dropped_follow_after_reload_is_reconnected(web_page: Watched, team: Team) -> None:
    """A follow that lost its connection used to end there, the answer frozen on "Writing…"; it is now
    followed again from the last event handled, and completes whole."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, SLOW)
    expect(page.locator(".msg.assistant .content")).to_contain_text("w2")
    dropped: list[str] = []

    def drop_once(route: Route) -> None:
        if not dropped:
            dropped.append(route.request.url)
            route.abort("connectionreset")  # one network hiccup
        else:
            route.continue_()

    page.route("**/api/chats/*/stream*", drop_once)
    page.reload()
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1, timeout=15_000)
    assert answer_text(page) == f"Echo: {SLOW}"
    assert len(dropped) == 1


LONG = "[delay=150] " + " ".join(f"w{i}" for i in range(40))  # an answer of about 6 s

# The network drops under the send's stream: `dropNetwork()` errors its body as a lost connection does (the
# page's reader gets a TypeError) and cancels the real one (the server sees the client go). Chromium's offline
# mode fails new requests but leaves a stream already open running, so a test sets both.
CUTTABLE_SEND = """
  const realFetch = window.fetch;
  window.fetch = async (url, init) => {
    const response = await realFetch(url, init);
    if (!/\\/messages$/.test(String(url)) || init?.method !== "POST" || !response.body) return response;
    const reader = response.body.getReader();
    const body = new ReadableStream({
      start(controller) {
        window.dropNetwork = () => {
          reader.cancel();
          controller.error(new TypeError("network error"));
        };
      },
      async pull(controller) {
        try {
          const { value, done } = await reader.read();
          if (done) controller.close();
          else controller.enqueue(value);
        } catch {
          // cut: the controller is already errored
        }
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
"""


def drop_the_network(page: Page) -> None:
    page.context.set_offline(True)
    page.evaluate("window.dropNetwork()")


def follows_of(page: Page) -> list[Request]:
    follows: list[Request] = []
    page.on("request", lambda r: follows.append(r) if "/stream" in r.url else None)
    return follows


def test_stop_works_while_a_dropped_answer_is_followed(web_page: Watched, team: Team) -> None:
    """Stop pressed while the network is down cannot reach the server: it says so and stays usable; pressed
    again once the page follows the answer again, it stops it."""
    page = web_page.page
    page.add_init_script(CUTTABLE_SEND)
    open_new_chat(web_page, team)
    send(page, LONG)
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".content")).to_contain_text("w3")
    drop_the_network(page)
    stop = page.get_by_role("button", name="Stop")
    stop.click()
    expect(page.locator(".toast.error", has_text="The server could not be reached.")).to_be_visible()
    expect(stop).to_be_enabled()
    shown = len(answer_text(page))
    page.context.set_offline(False)
    expect(answer.locator(".content")).not_to_have_text(answer_text(page), timeout=15_000)  # followed again
    assert len(answer_text(page)) > shown
    stop.click()
    expect(page.locator(".msg.assistant[data-status=cancelled]")).to_have_count(1)
    expect(stop).to_be_hidden()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    assert "w39" not in answer_text(page)
    chat_id = page.url.rsplit("/", 1)[1]
    assert team.get(f"/api/chats/{chat_id}")["messages"][-1]["status"] == "cancelled"


def test_an_answer_that_ended_while_the_network_was_down_is_shown_as_stored(web_page: Watched, team: Team) -> None:
    """Back online after the answer ended: there is nothing left to follow, and the stored answer is shown."""
    page = web_page.page
    page.add_init_script(CUTTABLE_SEND)
    open_new_chat(web_page, team)
    send(page, SLOW)
    expect(page.locator(".msg.assistant .content")).to_contain_text("w3")
    drop_the_network(page)
    chat_id = page.url.rsplit("/", 1)[1]
    deadline = time.monotonic() + 15
    while team.get(f"/api/chats/{chat_id}")["messages"][-1]["status"] == "streaming":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    page.context.set_offline(False)
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1, timeout=15_000)
    assert answer_text(page) == f"Echo: {SLOW}"  # nothing lost, nothing twice
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    send(page, "and then")  # the composer is usable
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(2)
    assert answer_text(page) == "Echo: and then"
    assert web_page.errors == []


def test_a_long_network_outage_mid_answer_does_not_give_up_following(web_page: Watched, team: Team) -> None:
    """Five failed follows in a row (about 15 s) ended the answer as "gone", and the chat read again while
    offline failed: the pane said "The server could not be reached." and stayed so once the network was
    back. While the browser knows it is offline, the page now waits for the network instead of counting."""
    page = web_page.page
    page.add_init_script(CUTTABLE_SEND)
    open_new_chat(web_page, team)
    send(page, "[delay=400] " + " ".join(f"w{i}" for i in range(60)))  # about 24 s
    expect(page.locator(".msg.assistant .content")).to_contain_text("w1")
    follows = follows_of(page)
    drop_the_network(page)
    page.wait_for_timeout(17_000)
    expect(page.get_by_role("button", name="Stop")).to_be_enabled()
    page.context.set_offline(False)
    expect(page.locator(".msg.assistant .content")).to_contain_text("w50", timeout=15_000)
    # The same generation, from the last event shown: the text grew without repeating.
    resumed = [r for r in follows if r.headers.get("last-event-id")]
    assert resumed
    assert all("assistant_message_id=" in r.url and int(r.headers["last-event-id"]) > 2 for r in resumed)
    assert answer_text(page).startswith("Echo: [delay=400] w0 w1 w2 ")
    assert answer_text(page).count(" w1 ") == 1
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".msg.assistant[data-status=cancelled]")).to_have_count(1)
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_a_send_refused_with_409_follows_the_answer_running_in_another_tab(web_page: Watched, team: Team) -> None:
    """A send refused because another tab's answer runs in the chat left that answer unseen, shown as
    "Writing…" until a reload; the page now follows it to its end."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "hello")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    chat_id = page.url.rsplit("/", 1)[1]
    start_elsewhere(team, chat_id, SLOW)
    send(page, "me too")  # 409: a generation runs in this chat
    expect(page.get_by_role("alert")).to_contain_text("already running")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(page.locator(".msg.assistant").last.locator(".content")).to_contain_text("w5")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(2, timeout=15_000)
    assert answer_text(page) == f"Echo: {SLOW}"
    expect(page.get_by_label("Message", exact=True)).to_have_value("me too")  # to send again, once it ended


def test_a_send_whose_connection_drops_is_retried_without_a_second_message(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    page = web_page.page
    open_new_chat(web_page, team)
    httpx.delete(f"{fake_n8n_url}/__requests")
    keys: list[str] = []

    def drop_first(route: Route) -> None:
        keys.append(route.request.headers["idempotency-key"])
        if len(keys) == 1:
            route.fetch()  # the server got it and answered in full...
            route.abort("connectionreset")  # ...but the browser lost the answer
        else:
            route.continue_()

    page.route("**/api/chats/*/messages", drop_first)
    send(page, "only once")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page) == "Echo: only once"
    assert len(keys) == 2
    assert keys[0] == keys[1]
    chat_id = page.url.rsplit("/", 1)[1]
    assert len(team.get(f"/api/chats/{chat_id}/messages")) == 2  # one question, one answer
    assert len([r for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]) == 1


def test_a_message_sent_while_offline_is_sent_once_the_network_is_back(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """A send made offline was tried 3 times within about 1 s, then the page followed an answer that never
    started, got a 204 and showed the chat without the question: the message was lost. While the browser is
    offline the send now waits for the network, says so, and is sent once it is back."""
    page = web_page.page
    open_new_chat(web_page, team)
    httpx.delete(f"{fake_n8n_url}/__requests")
    keys: list[str] = []
    page.on("request", lambda r: keys.append(r.headers["idempotency-key"]) if "idempotency-key" in r.headers else None)
    page.context.set_offline(True)
    send(page, "sent when back")
    waiting = page.locator(".msg.assistant .live-status")
    expect(waiting).to_have_text("Waiting for the network: sent as soon as it is back.")
    page.wait_for_timeout(3_000)  # longer than the send's retries took
    expect(waiting).to_be_visible()
    expect(page.locator(".msg.user .content")).to_have_text("sent when back")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    page.context.set_offline(False)
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1, timeout=15_000)
    assert answer_text(page) == "Echo: sent when back"
    expect(page.locator(".msg.user")).to_have_count(1)
    chat_id = page.url.rsplit("/", 1)[1]
    stored = team.get(f"/api/chats/{chat_id}")["messages"]
    assert [m["content"] for m in stored] == ["sent when back", "Echo: sent when back"]
    assert len(set(keys)) == 1
    send(page, "and then")  # the composer is usable
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(2)
    assert web_page.errors == []


WAITING = "Your message was not sent: it was waiting for the network when the chat was left. Send it again."
UNSENT_KEPT = "Object.keys(sessionStorage).filter((k) => k.startsWith('unsent:'))"


def message_keys(page: Page) -> list[str]:
    """The Idempotency-Key of every send the page makes (those failing offline included)."""
    keys: list[str] = []
    page.on("request", lambda r: keys.append(r.headers["idempotency-key"]) if "idempotency-key" in r.headers else None)
    return keys


def test_a_message_waiting_for_the_network_is_given_back_after_a_reload(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """A send waiting for the network lived only in the page: the chat left (here for the agent picker) and the
    page reloaded once the network was back, its text and files were gone. The chat opened again now gives them
    back in the composer, and sent again it carries the same Idempotency-Key."""
    page = web_page.page
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach files").click()
    notes: FilePayload = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello from a file\n"}
    chooser.value.set_files(notes)
    expect(page.locator(".uploads .upload[data-state=done]")).to_have_count(1)
    httpx.delete(f"{fake_n8n_url}/__requests")
    keys = message_keys(page)
    page.context.set_offline(True)
    send(page, "kept for later")
    expect(page.locator(".msg.assistant .live-status")).to_have_text(re.compile("^Waiting for the network"))
    page.evaluate("() => { location.hash = '#/new'; }")
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    page.context.set_offline(False)
    page.reload()
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    assert team.get(f"/api/chats/{chat_id}")["messages"] == []  # nothing went out when the network came back
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat_id}'; }}")
    box = page.get_by_label("Message", exact=True)
    expect(box).to_have_value("kept for later")
    expect(page.locator(".toast.error", has_text=WAITING)).to_be_visible()
    expect(page.locator(".uploads .upload[data-state=done]")).to_have_text(re.compile("notes.txt"))
    expect(page.locator(".msg")).to_have_count(0)
    assert page.evaluate(UNSENT_KEPT) == []  # given back once: now a draft like any other
    box.press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page) == "Echo: kept for later"
    expect(page.locator(".msg.user .files a")).to_have_text("notes.txt")
    expect(page.locator(".uploads .upload")).to_have_count(0)
    assert len(keys) >= 2  # tried offline, then sent again from the box
    assert len(set(keys)) == 1  # with the same key: a send that had reached the server would be replayed
    stored = team.get(f"/api/chats/{chat_id}")["messages"]
    assert [m["content"] for m in stored] == ["kept for later", "Echo: kept for later"]
    assert len([r for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]) == 1
    assert web_page.errors == []


def test_a_message_waiting_for_the_network_comes_back_with_its_chat_and_leaves_with_the_session(
    web_page: Watched, team: Team
) -> None:
    """Another chat opened and this one opened again (no reload): the waiting send's text is back in the box.
    Left waiting again, it is not kept past a logout, for whoever signs in next in the tab."""
    page = web_page.page
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    other = team.create_chat(team.get("/api/agents")[0]["id"], title="Other chat")
    page.context.set_offline(True)
    send(page, "not lost")
    expect(page.locator(".msg.assistant .live-status")).to_be_visible()
    page.evaluate(f"() => {{ location.hash = '#/chats/{other['id']}'; }}")
    expect(page.get_by_role("alert").filter(has_text="The server could not be reached.")).to_have_count(1)
    page.context.set_offline(False)
    page.wait_for_timeout(500)  # the left send would be on its way by now
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat_id}'; }}")
    box = page.get_by_label("Message", exact=True)
    expect(box).to_have_value("not lost")
    expect(page.locator(".toast.error", has_text=WAITING)).to_be_visible()
    expect(page.locator(".msg")).to_have_count(0)
    assert team.get(f"/api/chats/{chat_id}")["messages"] == []
    # Waiting again, then left: kept in the tab until the logout.
    page.context.set_offline(True)
    box.press("Enter")
    expect(page.locator(".msg.assistant .live-status")).to_be_visible()
    page.evaluate("() => { location.hash = '#/new'; }")
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    page.context.set_offline(False)
    assert len(page.evaluate(UNSENT_KEPT)) == 1
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    assert page.evaluate(UNSENT_KEPT) == []
    log_in(page, team.email)
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat_id}'; }}")
    expect(page.locator(".chat-header h1")).to_have_text("New chat")
    expect(page.get_by_label("Message", exact=True)).to_have_value("")
    assert team.get(f"/api/chats/{chat_id}")["messages"] == []


def test_a_chat_and_the_list_read_while_offline_are_read_again_once_the_network_is_back(
    web_page: Watched, team: Team
) -> None:
    """A chat opened while offline said "The server could not be reached." and stayed so once the network was
    back, and a list search made offline kept the list it had: only a reload of the page read them. Both are
    read again when the browser is online again."""
    page = web_page.page
    chat = team.create_chat(team.get("/api/agents")[0]["id"], title="Read later")
    log_in(page, team.email)
    expect(page.locator(".chat-list")).to_contain_text("Read later")
    page.context.set_offline(True)
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat['id']}'; }}")
    expect(page.get_by_role("alert").filter(has_text="The chat could not be read")).to_be_visible()
    page.get_by_placeholder("Search chats").fill("no such chat")
    expect(page.locator(".toast.error", has_text="The server could not be reached.")).to_be_visible()
    expect(page.locator(".chat-list")).to_contain_text("Read later")  # the search could not run
    page.context.set_offline(False)
    expect(page.locator(".chat-header h1")).to_have_text("Read later")
    expect(page.get_by_label("Message", exact=True)).to_be_editable()
    expect(page.locator(".chat-list")).to_have_text("No chat matches.")
    assert web_page.errors == []


def test_a_chat_the_server_did_not_answer_for_is_read_again_on_request(web_page: Watched, team: Team) -> None:
    """The browser online but the server not answering (down, a proxy dropping the connection): no `online`
    event will come, so the pane offers to read the chat again."""
    page = web_page.page
    chat = team.create_chat(team.get("/api/agents")[0]["id"], title="Read on request")
    log_in(page, team.email)
    page.route(f"**/api/chats/{chat['id']}?*", lambda route: route.abort("connectionreset"))
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat['id']}'; }}")
    alert = page.get_by_role("alert").filter(has_text="The chat could not be read")
    expect(alert).to_be_visible()
    page.unroute(f"**/api/chats/{chat['id']}?*")
    alert.get_by_role("button", name="Try again").click()
    expect(page.locator(".chat-header h1")).to_have_text("Read on request")
    expect(page.get_by_role("alert")).to_have_count(0)


def test_a_chat_read_since_its_failed_read_is_followed_once_when_the_network_comes_back(
    web_page: Watched, team: Team
) -> None:
    """A chat whose read got no answer, then opened again and read (its running answer followed): the
    `online` event read it again and followed that answer a second time, drawn twice in the pane."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    chat = team.create_chat(agent_id, title="Running")
    team.create_chat(agent_id, title="Elsewhere")
    log_in(page, team.email)
    page.route(f"**/api/chats/{chat['id']}?*", lambda route: route.abort("connectionreset"))
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat['id']}'; }}")
    expect(page.get_by_role("alert").filter(has_text="The chat could not be read")).to_be_visible()
    page.unroute(f"**/api/chats/{chat['id']}?*")
    page.locator(".chat-link", has_text="Elsewhere").click()
    expect(page.locator(".chat-header h1")).to_have_text("Elsewhere")
    start_elsewhere(team, chat["id"], SLOW)
    follows: list[str] = []
    page.on("request", lambda request: follows.append(request.url) if "/stream" in request.url else None)
    page.locator(".chat-link", has_text="Running").click()
    expect(page.locator(".msg.assistant").last.locator(".content")).to_contain_text("w3")
    page.evaluate("() => window.dispatchEvent(new Event('online'))")  # the network is back (it never left)
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1, timeout=15_000)
    expect(page.locator(".msg.assistant")).to_have_count(1)
    assert answer_text(page) == f"Echo: {SLOW}"
    assert len(follows) == 1, follows
    assert web_page.errors == []


def test_an_edit_waiting_for_the_network_comes_back_in_its_form(web_page: Watched, team: Team) -> None:
    """An edit waiting for the network when its chat was left: opened again, the chat shows the edit form
    holding the edited text, to send as an edit (a new version), not as a new message."""
    page = web_page.page
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    send(page, "hello")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    page.context.set_offline(True)
    page.locator(".msg.user [data-action=edit]").click()
    page.get_by_label("Edited message").fill("hello again")
    page.get_by_label("Edited message").press("Enter")
    expect(page.locator(".msg.assistant .live-status")).to_be_visible()
    page.evaluate("() => { location.hash = '#/new'; }")
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    page.context.set_offline(False)
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat_id}'; }}")
    expect(page.get_by_label("Edited message")).to_have_value("hello again")
    expect(page.locator(".toast.error", has_text=WAITING)).to_be_visible()
    expect(page.get_by_label("Message", exact=True)).to_have_value("")
    page.get_by_label("Edited message").press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete] .content")).to_have_text("Echo: hello again")
    expect(page.locator(".branches").first).to_contain_text("2 / 2")


def test_stop_cancels_a_send_waiting_for_the_network(web_page: Watched, team: Team, fake_n8n_url: str) -> None:
    """Stop pressed while a send waited for the network tried to reach the server (it could not), said so, and the
    send still went out when the network came back. It now cancels the send, which never goes out, and the text
    goes back into the box."""
    page = web_page.page
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    httpx.delete(f"{fake_n8n_url}/__requests")
    keys = message_keys(page)
    page.context.set_offline(True)
    send(page, "changed my mind")
    expect(page.locator(".msg.assistant .live-status")).to_be_visible()
    page.get_by_role("button", name="Stop").click()
    box = page.get_by_label("Message", exact=True)
    expect(box).to_have_value("changed my mind")
    expect(page.locator(".toast", has_text="Stopped: your message was not sent.")).to_be_visible()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    tried = len(keys)
    page.context.set_offline(False)
    page.wait_for_timeout(1_500)  # a send still waiting would have gone out by now
    assert len(keys) == tried
    assert team.get(f"/api/chats/{chat_id}")["messages"] == []
    assert page.evaluate(UNSENT_KEPT) == []
    box.press("Enter")  # sent when the user chooses to
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page) == "Echo: changed my mind"
    stored = team.get(f"/api/chats/{chat_id}")["messages"]
    assert [m["content"] for m in stored] == ["changed my mind", "Echo: changed my mind"]
    assert len([r for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]) == 1
    assert web_page.errors == []


def test_a_send_that_reached_the_server_while_it_could_not_answer_is_not_stored_twice(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """The server got the send, but no HTTP answer came back to it or to its retries (a proxy dropping them):
    the text went nowhere, as above. It now goes back into the message box with an error; sent again, the same
    Idempotency-Key gets the stored answer replayed, and the question is not stored a second time."""
    page = web_page.page
    open_new_chat(web_page, team)
    httpx.delete(f"{fake_n8n_url}/__requests")
    keys: list[str] = []

    def unreachable(route: Route) -> None:
        keys.append(route.request.headers["idempotency-key"])
        if len(keys) == 1:
            route.fetch()  # the server got it and answered in full...
        route.abort("connectionrefused")  # ...but no answer reaches the browser

    page.route("**/api/chats/*/messages", unreachable)
    send(page, "only once")
    not_sent = "Your message was not sent: the server could not be reached."
    expect(page.locator(".toast.error", has_text=not_sent)).to_be_visible()
    box = page.get_by_label("Message", exact=True)
    expect(box).to_have_value("only once")
    expect(page.locator(".msg.streaming")).to_have_count(0)
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    assert len(keys) == 3
    page.unroute("**/api/chats/*/messages")
    box.press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page) == "Echo: only once"
    expect(page.locator(".msg.user")).to_have_count(1)
    chat_id = page.url.rsplit("/", 1)[1]
    assert len(team.get(f"/api/chats/{chat_id}/messages")) == 2  # one question, one answer
    assert len([r for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]) == 1
    expect(box).to_have_value("")
    send(page, "and then")  # a new message: a new key
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(2)
    assert answer_text(page) == "Echo: and then"


def test_an_edit_that_cannot_reach_the_server_stays_in_its_form(web_page: Watched, team: Team) -> None:
    """An edit sent while the server cannot be reached: the chat shows as stored, and the edit form again holds
    the edited text, to send once the server is back."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "hello")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    page.route("**/api/chats/*/messages", lambda route: route.abort("connectionrefused"))
    page.locator(".msg.user [data-action=edit]").click()
    page.get_by_label("Edited message").fill("hello again")
    page.get_by_label("Edited message").press("Enter")
    expect(page.locator(".toast.error", has_text="Your message was not sent")).to_be_visible()
    expect(page.get_by_label("Edited message")).to_have_value("hello again")
    assert answer_text(page) == "Echo: hello"
    page.unroute("**/api/chats/*/messages")
    page.get_by_label("Edited message").press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete] .content")).to_have_text("Echo: hello again")
    expect(page.locator(".branches").first).to_contain_text("2 / 2")


def test_a_send_that_drops_after_its_start_follows_from_the_last_event(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """Once the `start` event came, a lost connection is followed on /stream from the last event handled, not
    sent again: a retried send answers the whole stream again, rebuilt from storage (its text in one event,
    added to the text already shown) once the live events are gone."""
    page = web_page.page
    open_new_chat(web_page, team)
    httpx.delete(f"{fake_n8n_url}/__requests")
    posts: list[str] = []
    follows: list[Request] = []
    page.on("request", lambda r: follows.append(r) if "/stream" in r.url else None)

    def cut_after_three_events(route: Route) -> None:
        posts.append(route.request.url)
        if len(posts) > 1:
            route.continue_()
            return
        response = route.fetch()  # the whole answer, of which the browser gets the first three events only
        events = response.body().split(b"\n\n")
        assert len(events) > 5
        route.fulfill(status=200, headers=response.headers, body=b"\n\n".join(events[:3]) + b"\n\n")

    page.route("**/api/chats/*/messages", cut_after_three_events)
    send(page, "one two three four five six")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page) == "Echo: one two three four five six"
    assert len(posts) == 1
    assert len(follows) == 1
    assert follows[0].headers["last-event-id"] == "3"
    assert "assistant_message_id=" in follows[0].url
    assert len([r for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]) == 1


def guide_example() -> str:
    """The JavaScript of docs/STREAMING_API_GUIDE.md's "Resume after a reload" section, as a reader copies it."""
    guide = (Path(__file__).parents[1] / "docs" / "STREAMING_API_GUIDE.md").read_text()
    section = guide.split("## Resume after a reload", 1)[1]
    return section.split("```js\n", 1)[1].split("```", 1)[0]


def test_the_streaming_guides_example_shows_a_send_cut_after_its_start_once(web_page: Watched, team: Team) -> None:
    """The guide's send() read the retried stream from its start, so the chunks already shown were shown again
    (and, once the live events are gone, the whole text was added to them)."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "hello")  # the chat, made by the page
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    chat_id = page.url.rsplit("/", 1)[1]
    posts: list[str] = []

    def cut_after_four_events(route: Route) -> None:
        posts.append(route.request.url)
        if len(posts) > 1:
            route.continue_()
            return
        response = route.fetch()
        events = response.body().split(b"\n\n")
        route.fulfill(status=200, headers=response.headers, body=b"\n\n".join(events[:4]) + b"\n\n")

    page.route("**/api/chats/*/messages", cut_after_four_events)
    page.evaluate(guide_example())
    result = page.evaluate(
        """(chatId) => new Promise((resolve) => {
            let text = "";
            setTimeout(() => resolve({ text, ended: false }), 15000);
            send(chatId, "one two three four five six", {
              onChunk: (chunk) => { text += chunk; },
              onDone: (message) => resolve({ text, stored: message.content }),
              onError: (error) => resolve({ text, error }),
            });
        })""",
        chat_id,
    )
    assert result == {"text": "Echo: one two three four five six", "stored": "Echo: one two three four five six"}
    assert len(posts) == 1


def a_chat_longer_than_shown(web_page: Watched, team: Team) -> str:
    """A new chat of 52 messages (more than the 50 shown at first), open with its "Show earlier" button; its id."""
    page = web_page.page
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    with team.api() as client:
        for i in range(26):
            assert client.post(f"/api/chats/{chat_id}/messages", json={"content": f"q{i}"}).status_code == 200
    page.reload()
    expect(page.get_by_role("button", name="Show earlier messages")).to_be_visible()
    return chat_id


def test_a_reader_scrolled_up_during_an_answer_stays_where_they_are(web_page: Watched, team: Team) -> None:
    """Every painted token of an answer scrolled the chat to its end, and so did the chat drawn again when the
    answer ended: a reader who scrolled up to read an earlier message was pulled down again and again. The chat
    now follows the answer only while the reader is at its end."""
    page = web_page.page
    page.set_viewport_size({"width": 1000, "height": 500})
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    with team.api() as client:
        for i in range(8):
            assert client.post(f"/api/chats/{chat_id}/messages", json={"content": f"q{i}"}).status_code == 200
    page.reload()
    messages = page.locator(".messages")
    expect(page.locator(".msg")).to_have_count(16)
    send(page, SLOW)
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".content")).to_contain_text("w1")
    assert messages.evaluate("(m) => m.scrollHeight - m.scrollTop - m.clientHeight") < 48  # followed while at the end
    messages.evaluate("(m) => { m.scrollTop = 0 }")  # the reader goes back up
    expect(answer.locator(".content")).to_contain_text("w8")
    assert messages.evaluate("(m) => m.scrollTop") == 0
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(9)
    assert messages.evaluate("(m) => m.scrollTop") == 0


def test_show_earlier_keeps_the_reader_where_they_were(web_page: Watched, team: Team) -> None:
    """ "Show earlier messages" drew the chat again, which scrolls to its end: the earlier messages came in above,
    out of sight, and the reader had to scroll back up past the whole chat to find them. The oldest message shown
    before now stays in view, the earlier ones just above it."""
    page = web_page.page
    a_chat_longer_than_shown(web_page, team)
    oldest = page.locator(".msg.user .content").filter(has_text=re.compile(r"^q1$"))
    expect(page.locator(".msg")).to_have_count(50)
    page.get_by_role("button", name="Show earlier messages").click()
    expect(page.locator(".msg")).to_have_count(52)
    expect(oldest).to_be_in_viewport()
    expect(page.locator(".msg").last).not_to_be_in_viewport()


def test_show_earlier_during_an_answer_keeps_the_live_answer_and_stop(web_page: Watched, team: Team) -> None:
    """Clicking "Show earlier messages" while an answer was written rebuilt the list and the buttons: the answer went on
    in a detached element and Stop was gone. The live answer now stays in the list, still growing, with Stop."""
    page = web_page.page
    chat_id = a_chat_longer_than_shown(web_page, team)
    send(page, SLOW)
    expect(page.locator(".msg.assistant .content").last).to_contain_text("w1")
    page.get_by_role("button", name="Show earlier messages").click()
    expect(page.locator(".msg.user .content").first).to_have_text("q0")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_be_hidden()
    expect(page.locator(".msg.assistant .content").last).to_contain_text("w12")
    expect(page.locator(".msg.streaming")).to_have_count(1)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".msg.assistant[data-status=cancelled]")).to_have_count(1)
    assert len(team.get(f"/api/chats/{chat_id}?last=100")["messages"]) == 54


def test_show_earlier_before_the_answer_started_shows_the_question_once(web_page: Watched, team: Team) -> None:
    """Clicking "Show earlier messages" after the server stored a send but before the page had its `start` event
    drew the new question and the running answer twice (stored, and live) until the answer ended."""
    page = web_page.page
    chat_id = a_chat_longer_than_shown(web_page, team)
    # The answer's events reach the page only once it has ended (about 4.5 s after the send).
    page.route("**/api/chats/*/messages", lambda route: route.fulfill(response=route.fetch()))
    send(page, SLOW)
    for _ in range(100):
        if team.get(f"/api/chats/{chat_id}?last=1")["messages"][-1]["status"] == "streaming":
            break
        page.wait_for_timeout(50)
    page.get_by_role("button", name="Show earlier messages").click()
    expect(page.locator(".msg.user .content").first).to_have_text("q0")
    assert page.locator(".msg.user").count() == 27
    assert page.locator(".msg.assistant").count() == 27
    assert page.locator(".msg.streaming").count() == 1
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(27, timeout=15_000)
    assert page.locator(".msg.user").count() == 27
    assert answer_text(page) == f"Echo: {SLOW}"


def test_show_earlier_offline_while_a_send_waits_for_the_network_leaves_that_send_to_go_on(
    web_page: Watched, team: Team
) -> None:
    """Clicking "Show earlier messages" offline while a send waited for the network could not read the chat; the
    `online` event then read it again and gave that send back as never sent ("waiting for the network when the
    chat was left", its text back in the box) while it was being sent, and its answer ran unseen."""
    page = web_page.page
    chat_id = a_chat_longer_than_shown(web_page, team)
    page.context.set_offline(True)
    send(page, SLOW)
    expect(page.get_by_text("Waiting for the network: sent as soon as it is back.")).to_be_visible()
    page.get_by_role("button", name="Show earlier messages").click()
    expect(page.get_by_role("alert").filter(has_text="The chat could not be read")).to_be_visible()
    # The answer's events reach the page only once it has ended, well after the chat has been read again.
    page.route("**/api/chats/*/messages", lambda route: route.fulfill(response=route.fetch()))
    page.context.set_offline(False)
    expect(page.locator(".msg.user .content").first).to_have_text("q0")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(27, timeout=15_000)
    assert answer_text(page) == f"Echo: {SLOW}"
    expect(page.get_by_label("Message", exact=True)).to_have_value("")
    expect(page.locator(".toast", has_text="was not sent")).to_have_count(0)
    assert len(team.get(f"/api/chats/{chat_id}?last=100")["messages"]) == 54


def editing_the_first_question(web_page: Watched, team: Team) -> Locator:
    """A new chat with one question answered, its Edit form open; the form's text box."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "first question")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    page.locator(".msg.user").first.get_by_role("button", name="Edit").click()
    return page.get_by_label("Edited message")


def test_edit_makes_a_branch_and_the_switcher_moves_between_them(web_page: Watched, team: Team) -> None:
    page = web_page.page
    edited = editing_the_first_question(web_page, team)
    edited.fill("second question")
    edited.press("Enter")
    expect(page.locator(".msg.assistant .content")).to_have_text("Echo: second question")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    user = page.locator(".msg.user")
    expect(user.locator(".branch-pos")).to_have_text("2 / 2")
    user.get_by_role("button", name="Previous version").click()
    expect(user.locator(".content")).to_have_text("first question")
    expect(page.locator(".msg.assistant .content")).to_have_text("Echo: first question")
    expect(user.locator(".branch-pos")).to_have_text("1 / 2")
    # The choice is the chat's: a reload shows the same branch.
    page.reload()
    expect(page.locator(".msg.user .content")).to_have_text("first question")


def test_an_edit_form_opened_before_a_send_cannot_start_a_second_answer(web_page: Watched, team: Team) -> None:
    """An edit form opened before an answer started sent its new version meanwhile (no busy check), cutting
    the running answer from the page. Its Send is now disabled while an answer runs, and Enter does nothing."""
    page = web_page.page
    edited = editing_the_first_question(web_page, team)
    edited.fill("changed my mind")
    send(page, SLOW)
    expect(page.locator(".msg.assistant .content").last).to_contain_text("w1")
    expect(page.locator(".edit-form").get_by_role("button", name="Send")).to_be_disabled()
    edited.press("Enter")
    page.wait_for_timeout(500)
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(page.locator(".msg.assistant[data-status=streaming] .content")).to_contain_text("w5")
    chat_id = page.url.rsplit("/", 1)[1]
    assert [m["content"] for m in team.get(f"/api/chats/{chat_id}")["messages"] if m["role"] == "user"] == [
        "first question",
        SLOW,
    ]


def test_enter_confirming_an_ime_composition_does_not_send_an_edit(web_page: Watched, team: Team) -> None:
    """The Enter that confirms an IME composition (Japanese, Chinese...) sent the edit form half written; it
    is now left to the input method, as in the message box."""
    page = web_page.page
    edited = editing_the_first_question(web_page, team)
    edited.fill("にほんご")
    edited.dispatch_event("keydown", {"key": "Enter", "isComposing": True, "bubbles": True, "cancelable": True})
    page.wait_for_timeout(1000)
    expect(page.locator(".edit-form")).to_be_visible()
    chat_id = page.url.rsplit("/", 1)[1]
    assert len(team.get(f"/api/chats/{chat_id}/messages")) == 2  # nothing was sent


def test_safaris_composition_enter_with_key_code_229_sends_nothing(web_page: Watched, team: Team) -> None:
    """Some Safari versions mark the Enter that confirms an IME composition with keyCode 229, not `isComposing`:
    the message box sent the half-written text, and the edit form its edit. Both now leave it to the input
    method; the same Enter without 229 still sends (the control that the dispatched event reaches the page)."""
    page = web_page.page
    edited = editing_the_first_question(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    safari = {"key": "Enter", "keyCode": 229, "bubbles": True, "cancelable": True}
    edited.fill("にほんご")
    edited.dispatch_event("keydown", safari)
    box = page.get_by_label("Message", exact=True)
    box.fill("かんじ")
    box.dispatch_event("keydown", safari)
    page.wait_for_timeout(1000)
    expect(page.locator(".edit-form")).to_be_visible()
    expect(box).to_have_value("かんじ")
    assert len(team.get(f"/api/chats/{chat_id}/messages")) == 2  # nothing was sent
    box.dispatch_event("keydown", {"key": "Enter", "bubbles": True, "cancelable": True})
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(2)
    assert answer_text(page) == "Echo: かんじ"


def test_regenerate_and_feedback(web_page: Watched, team: Team) -> None:
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "again please")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    page.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".msg.assistant .branch-pos")).to_have_text("2 / 2")
    expect(page.locator(".msg.user")).to_have_count(1)
    # Named by their visible words (they were "Good answer" / "Bad answer" to a screen reader or voice control,
    # which read "Helpful" / "Not helpful" on the screen); pressed from the keyboard, the focus stays on it.
    helpful = page.get_by_role("button", name="Helpful", exact=True)
    helpful.focus()
    page.keyboard.press("Enter")
    expect(helpful).to_have_attribute("aria-pressed", "true")
    expect(helpful).to_be_focused()
    expect(page.get_by_role("button", name="Not helpful", exact=True)).to_have_attribute("aria-pressed", "false")
    chat_id = page.url.rsplit("/", 1)[1]
    answer = team.get(f"/api/chats/{chat_id}")["messages"][-1]
    assert answer["feedback"]["rating"] == 1
    assert len(answer["sibling_ids"]) == 2


def test_a_cancelled_edit_gives_the_focus_back_to_its_edit_button(web_page: Watched, team: Team) -> None:
    """Escape or Cancel in an edit form dropped the focus to the page's start (a keyboard user Tabbed from the top
    bar again); it now goes back to the message's Edit button. A second click on Edit while its form was open
    threw a TypeError (no content left to swap); it now puts the focus in the form."""
    page = web_page.page
    edited = editing_the_first_question(web_page, team)
    edit = page.locator(".msg.user").first.get_by_role("button", name="Edit")
    edited.press("Escape")
    expect(page.locator(".edit-form")).to_have_count(0)
    expect(page.locator(".msg.user .content")).to_have_text("first question")
    expect(edit).to_be_focused()
    page.keyboard.press("Enter")  # the Edit button again, from the keyboard
    expect(edited).to_be_focused()
    page.get_by_role("button", name="Cancel").click()
    expect(edit).to_be_focused()
    edit.dblclick()
    expect(page.locator(".edit-form")).to_have_count(1)
    expect(edited).to_be_focused()
    expect(edited).to_have_value("first question")
    assert web_page.errors == []


def test_regenerate_or_an_edit_sent_from_the_keyboard_leaves_the_focus_in_the_message_box(
    web_page: Watched, team: Team
) -> None:
    """Regenerate and an edit's Send are removed with the messages they replace, which dropped the focus to the
    page's start while the new answer was written (Stop was a long way off). The focus now goes to the message
    box, as after a send from it."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, SLOW)
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    box = page.get_by_label("Message", exact=True)
    page.get_by_role("button", name="Regenerate").focus()
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant[data-status=streaming]")).to_have_count(1)
    expect(box).to_be_focused()
    assert page.locator(".msg.assistant[data-status=streaming]").count() == 1  # at once, not at the answer's end
    page.keyboard.press("Tab")  # past Attach...
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Stop")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant[data-status=cancelled]")).to_have_count(1)
    page.locator(".msg.user").get_by_role("button", name="Edit").click()
    page.get_by_label("Edited message").fill(SLOW + " again")
    page.locator(".edit-form").get_by_role("button", name="Send").focus()
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant[data-status=streaming]")).to_have_count(1)
    expect(box).to_be_focused()
    assert page.locator(".msg.assistant[data-status=streaming]").count() == 1


def test_switching_versions_with_the_keyboard_keeps_the_focus_on_the_switcher(web_page: Watched, team: Team) -> None:
    """Every re-render put the focus in the message box, so a keyboard user lost the version switcher after
    each step; the focus now stays on the switcher (the other arrow once the first version is reached)."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "again please")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    page.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".msg.assistant .branch-pos")).to_have_text("2 / 2")
    page.get_by_role("button", name="Previous version").focus()
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant .branch-pos")).to_have_text("1 / 2")
    expect(page.get_by_role("button", name="Next version")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant .branch-pos")).to_have_text("2 / 2")
    expect(page.get_by_role("button", name="Previous version")).to_be_focused()


def test_the_end_of_an_answer_does_not_steal_the_focus(web_page: Watched, team: Team) -> None:
    """The chat shown again at the end of an answer took the focus from wherever it was (typing in the
    search went into the message box); it now moves to the box only from within the chat pane."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "[delay=100] " + " ".join(f"w{i}" for i in range(10)))
    search = page.get_by_label("Search chats")
    search.click()
    page.keyboard.type("abc")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    page.keyboard.type("def")
    expect(search).to_have_value("abcdef")
    expect(page.get_by_label("Message", exact=True)).to_have_value("")


def test_a_double_click_on_an_agent_starts_one_chat(web_page: Watched, team: Team) -> None:
    page = web_page.page
    log_in(page, team.email)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.get_by_role("button", name=re.compile("Echo bot")).dblclick()
    # The second click opens the same new chat, keeping it; nothing is made before the first message.
    expect(page.get_by_label("Message", exact=True)).to_be_focused()
    page.get_by_label("Message", exact=True).fill("hi")
    page.get_by_label("Message", exact=True).press("Enter")
    page.get_by_label("Message", exact=True).press("Enter")  # while the chat is being made: sends nothing more
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert [p.split("/api/", 1)[1].split("/")[0] for p in posts] == ["chats", "chats"]  # the chat, its message
    assert len(team.get("/api/chats")) == 1
    expect(page.locator(".msg.user")).to_have_count(1)


def test_a_double_click_on_load_more_lists_each_chat_once(web_page: Watched, team: Team) -> None:
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    for i in range(31):  # one more than a page
        team.create_chat(agent_id, title=f"Chat {i:02d}")
    log_in(page, team.email)
    rows = page.locator(".chat-list li")
    expect(rows).to_have_count(30)
    page.get_by_role("button", name="Load more").dblclick()
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()
    expect(rows).to_have_count(31)
    assert sorted(rows.locator(".chat-title").all_inner_texts()) == [f"Chat {i:02d}" for i in range(31)]


def test_a_load_more_that_failed_offline_keeps_the_pages_shown_when_the_network_is_back(
    web_page: Watched, team: Team
) -> None:
    """A "Load more" that got no answer marked the list to be read again on the `online` event, which read it
    from its first page: the pages already loaded went. It keeps them now, and its button, to click again."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    for i in range(61):  # two pages and one more
        team.create_chat(agent_id, title=f"Chat {i:02d}")
    log_in(page, team.email)
    rows = page.locator(".chat-list li")
    expect(rows).to_have_count(30)
    more = page.get_by_role("button", name="Load more")
    more.click()
    expect(rows).to_have_count(60)
    page.context.set_offline(True)
    more.click()
    expect(page.locator(".toast.error", has_text="The server could not be reached.")).to_be_visible()
    page.context.set_offline(False)
    page.wait_for_timeout(1_000)  # a list read again from its first page would have shown by now
    expect(rows).to_have_count(60)
    more.click()
    expect(rows).to_have_count(61)
    expect(more).to_be_hidden()


def test_load_more_from_the_keyboard_goes_on_from_the_first_chat_it_added(web_page: Watched, team: Team) -> None:
    """Load more is disabled while its page loads, which dropped its focus to the page's start: a keyboard user
    pressing it had to Tab through the top bar and the whole list again. The focus now moves to the first chat
    the page added (the button is gone once everything is listed)."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    for i in range(31):  # one more than a page
        team.create_chat(agent_id, title=f"Chat {i:02d}")
    log_in(page, team.email)
    rows = page.locator(".chat-list li")
    expect(rows).to_have_count(30)
    page.get_by_role("button", name="Load more").focus()
    page.keyboard.press("Enter")
    expect(rows).to_have_count(31)
    expect(rows.nth(30).locator(".chat-link")).to_be_focused()
    expect(rows.nth(30)).to_contain_text("Chat 00")  # the oldest


def test_a_rename_gives_the_focus_back_to_the_chats_menu(web_page: Watched, team: Team) -> None:
    """The list drawn again after a rename (saved with Enter, or cancelled with Escape) dropped the focus to the
    page's start; it now goes back to the renamed chat's ⋯, where the rename began."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    team.create_chat(agent_id, title="Old title")
    log_in(page, team.email)
    menu = page.locator(".chat-list").get_by_label("Actions for Old title")
    menu.focus()
    page.keyboard.press("Enter")
    page.locator(".chat-list").get_by_role("button", name="Rename").click()
    title = page.get_by_label("Chat title")
    expect(title).to_be_focused()
    title.press("Escape")
    expect(menu).to_be_focused()
    page.keyboard.press("Enter")
    page.locator(".chat-list").get_by_role("button", name="Rename").click()
    title.fill("New title")
    title.press("Enter")
    renamed = page.locator(".chat-list").get_by_label("Actions for New title")
    expect(renamed).to_be_focused()
    # And an item chosen in the menu (Pin draws the list again) leaves the focus on the chat's ⋯ too.
    page.keyboard.press("Enter")
    page.locator(".chat-list").get_by_role("button", name="Pin").click()
    expect(page.locator(".chat-list .pin")).to_have_count(1)
    expect(renamed).to_be_focused()


def test_a_chat_archived_or_deleted_from_its_menu_leaves_the_focus_on_the_next_chat(
    web_page: Watched, team: Team
) -> None:
    """Archive or Delete chosen in a chat's menu took the chat, its ⋯ with the focus, out of the list: the focus
    fell to the page's start. It now goes to the ⋯ of the chat that took its place (or of the one before it)."""
    page = web_page.page
    web_page.accept_dialogs = True  # the deletion's confirm()
    agent_id = team.get("/api/agents")[0]["id"]
    for title in ("Oldest", "Middle", "Newest"):
        team.create_chat(agent_id, title=title)
    log_in(page, team.email)
    in_list = page.locator(".chat-list")
    expect(in_list.locator("li")).to_have_count(3)
    in_list.get_by_label("Actions for Newest").focus()
    page.keyboard.press("Enter")
    in_list.get_by_role("button", name="Archive").click()
    expect(in_list.locator("li")).to_have_count(2)
    expect(in_list.get_by_label("Actions for Middle")).to_be_focused()
    page.keyboard.press("Enter")
    in_list.get_by_role("button", name="Delete").click()
    expect(in_list.locator("li")).to_have_count(1)
    expect(in_list.get_by_label("Actions for Oldest")).to_be_focused()
    page.keyboard.press("Enter")
    in_list.get_by_role("button", name="Delete").click()
    expect(in_list).to_have_text("No chats yet.")
    assert [c["title"] for c in team.get("/api/chats?archived=true")] == ["Newest"]


def test_escape_or_a_click_elsewhere_closes_a_chats_menu(web_page: Watched, team: Team) -> None:
    """A chat's ⋯ menu stayed open until its ⋯ was pressed again: Escape did nothing and menus opened one after
    another piled up over the list. Escape now closes it (the focus back on its ⋯), and so does a click
    anywhere else."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    team.create_chat(agent_id, title="First")
    team.create_chat(agent_id, title="Second")
    log_in(page, team.email)
    first = page.locator(".chat-list").get_by_label("Actions for First")
    first.click()
    expect(page.locator(".chat-list details.menu[open]")).to_have_count(1)
    page.locator(".chat-list").get_by_role("button", name="Rename").focus()  # inside the menu
    page.keyboard.press("Escape")
    expect(page.locator(".chat-list details.menu[open]")).to_have_count(0)
    expect(first).to_be_focused()
    first.click()
    page.locator(".chat-list").get_by_label("Actions for Second").click()
    expect(page.locator(".chat-list details.menu[open]")).to_have_count(1)
    expect(page.locator(".chat-list details.menu[open]")).to_contain_text("Rename")
    page.get_by_label("Search chats").click()
    expect(page.locator(".chat-list details.menu[open]")).to_have_count(0)


def test_a_page_from_the_top_bar_keeps_the_keyboards_place(web_page: Watched, team: Team) -> None:
    """Every page of the top bar is drawn anew, the link that was pressed with it: the focus fell to the page's
    start and the next Tab went to the brand link again. It now goes to the main area, so Tab goes on in the
    page."""
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("link", name="Shared", exact=True).focus()
    page.keyboard.press("Enter")
    expect(page.get_by_text("Nothing is shared in your team yet.")).to_be_visible()
    expect(page.locator("main")).to_be_focused()
    page.get_by_role("link", name="Chats", exact=True).focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    expect(page.locator("main")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="+ New chat")).to_be_focused()


def test_chat_list_search_pin_rename_archive_delete_and_load_more(web_page: Watched, team: Team) -> None:
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    chats = [team.create_chat(agent_id, title=f"Chat {i:02d}") for i in range(32)]  # more than one page (30)
    team.create_chat(agent_id, title="Quarterly numbers")
    with team.api() as client:  # the oldest chat, pinned: the API lists by activity, the list shows it first
        assert client.put(f"/api/chats/{chats[0]['id']}", json={"pinned": True}).status_code == 200
    log_in(page, team.email)
    rows = page.locator(".chat-list li")
    expect(rows).to_have_count(31)  # the pinned one, then a page of the others
    expect(rows.first).to_contain_text("Chat 00")
    expect(rows.nth(1)).to_contain_text("Quarterly numbers")
    page.get_by_role("button", name="Load more").click()
    expect(rows).to_have_count(33)
    expect(page.locator(".chat-list li", has_text="Chat 00")).to_have_count(1)
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()

    page.get_by_label("Search chats").fill("quarterly")
    expect(rows).to_have_count(1)
    row = rows.first
    row.get_by_label("Actions for Quarterly numbers").click()
    row.get_by_role("button", name="Pin").click()
    expect(rows.first.locator(".pin")).to_be_visible()

    rows.first.get_by_label("Actions for Quarterly numbers").click()
    rows.first.get_by_role("button", name="Rename").click()
    title = page.get_by_label("Chat title")
    title.fill("Q3 numbers")
    title.press("Enter")
    page.get_by_label("Search chats").fill("Q3")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Q3 numbers")

    rows.first.get_by_label("Actions for Q3 numbers").click()
    rows.first.get_by_role("button", name="Archive").click()
    expect(page.locator(".chat-list")).to_contain_text("No chat matches.")
    page.get_by_label("Archived").check()
    expect(rows).to_have_count(1)

    web_page.accept_dialogs = True
    rows.first.get_by_label("Actions for Q3 numbers").click()
    rows.first.get_by_role("button", name="Delete").click()
    expect(page.locator(".chat-list")).to_contain_text("No chat matches.")
    assert web_page.dialogs == ['confirm: Delete "Q3 numbers" and all its messages?']
    with team.api() as client:
        assert client.get("/api/chats", params={"q": "Q3", "archived": True}).json() == []


def test_a_stale_search_answer_does_not_overwrite_a_newer_one(web_page: Watched, team: Team) -> None:
    """A search whose answer came late replaced the list of a newer search; only the latest search's answer
    is now shown."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    team.create_chat(agent_id, title="Alpha one")
    team.create_chat(agent_id, title="Alpha two")
    # The first search's answers are slow (a loaded server); the second's are fast.
    page.add_init_script(
        """
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          const p = realFetch(url, init);
          const slow = /[?&]q=Alpha&/.test(String(url));
          return slow ? p.then((r) => new Promise((ok) => setTimeout(() => ok(r), 1500))) : p;
        };
        """
    )
    log_in(page, team.email)
    search = page.get_by_label("Search chats")
    search.fill("Alpha")
    page.wait_for_timeout(400)  # past the 250 ms debounce: the slow search is on its way
    search.fill("Alpha two")
    rows = page.locator(".chat-list li")
    expect(rows).to_have_count(1)
    page.wait_for_timeout(3500)  # the slow answers are in (two requests of 1.5 s)
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Alpha two")


def test_a_draft_stays_with_its_chat(web_page: Watched, team: Team) -> None:
    """Text typed in one chat's message box showed up in the next chat opened, ready to be sent to another
    agent; the box of another chat now starts empty, and a draft stays while its own chat is shown again."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    a = team.create_chat(agent_id, title="Chat A")
    b = team.create_chat(agent_id, title="Chat B")
    log_in(page, team.email)
    page.goto(f"/#/chats/{a['id']}")
    page.get_by_label("Message", exact=True).fill("private note for A")
    page.goto(f"/#/chats/{b['id']}")
    expect(page.locator(".chat-heading h1")).to_have_text("Chat B")
    expect(page.get_by_label("Message", exact=True)).to_have_value("")
    send(page, "hello B")
    page.get_by_label("Message", exact=True).fill("next question for B")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)  # the chat is shown again
    expect(page.get_by_label("Message", exact=True)).to_have_value("next question for B")


def test_opening_a_missing_chat_shows_it_without_an_error(web_page: Watched, team: Team) -> None:
    """Opening a chat that does not exist threw a TypeError (or followed the previous chat's answer) after
    showing "does not exist"; nothing is followed now when the chat could not be read."""
    page = web_page.page
    log_in(page, team.email)
    page.goto("/#/chats/00000000-0000-4000-8000-000000000000")
    expect(page.get_by_role("alert")).to_have_text("This chat does not exist.")
    page.wait_for_timeout(500)
    assert web_page.errors == []


def test_a_missing_chat_opened_during_an_answer_does_not_follow_it(web_page: Watched, team: Team) -> None:
    """Moving from a chat writing its answer to a missing chat followed the first chat's answer into the
    missing one's pane; the missing chat now shows only that it does not exist."""
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, SLOW)
    expect(page.locator(".msg.assistant .content")).to_contain_text("w1")
    page.reload()  # the chat, read again, ends with the answer being written
    expect(page.locator(".msg.assistant .content")).to_contain_text("w3")
    follows: list[str] = []
    page.on("request", lambda r: follows.append(r.url) if "/stream" in r.url else None)
    page.goto("/#/chats/00000000-0000-4000-8000-000000000000")
    expect(page.get_by_role("alert")).to_have_text("This chat does not exist.")
    page.wait_for_timeout(500)
    expect(page.locator(".msg")).to_have_count(0)
    assert follows == []
    assert web_page.errors == []


def test_an_expired_access_cookie_is_refreshed_silently(web_page: Watched, team: Team) -> None:
    page = web_page.page
    log_in(page, team.email)
    page.context.clear_cookies(name="access_token")
    # Waited for as such: a listener's record of the response could arrive after the page had drawn the chats.
    with page.expect_response(lambda r: r.url.endswith("/api/auth/refresh")) as refreshed:
        page.reload()
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    assert refreshed.value.status == 200
    assert "access_token" in {c["name"] for c in page.context.cookies()}


def test_logout_and_team_sign_up(web_page: Watched, web_server: LiveServer) -> None:
    page = web_page.page
    page.goto("/#/signup")
    page.get_by_label("Team name").fill("Zeta")
    page.get_by_label("Your name").fill("Zoe")
    page.get_by_label("Email").fill("zoe@example.com")
    page.get_by_label("Password (8 characters or more)").fill("a long password")
    page.get_by_role("button", name="Create team").click()
    expect(page.locator(".who")).to_have_text("Zoe")
    expect(page.get_by_role("link", name="Agents")).to_be_visible()  # the team's first user is its admin
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    assert httpx.get(f"{web_server.url}/api/auth/me", cookies=dict_cookies(page)).status_code == 401


def test_a_page_chosen_while_the_first_route_reads_the_user_stays(web_page: Watched) -> None:
    """The first route waits for /api/auth/me; a visitor who went to the sign-up page meanwhile was sent to
    the login page when that request's 401 came back (the refresh refused, then the route's own redirect)."""
    page = web_page.page
    # Which of the page's requests were answered (the page's own handling of each answer follows at once).
    page.add_init_script(
        """
        window.answered = [];
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          const response = realFetch(url, init);
          response.then(() => window.answered.push(String(url)), () => {});
          return response;
        };
        """
    )
    held: list[Route] = []
    page.route("**/api/auth/me", lambda route: held.append(route))
    with page.expect_request("**/api/auth/me"):
        page.goto("/")
    page.evaluate("() => { location.hash = '#/signup'; }")
    expect(page.get_by_role("button", name="Create team")).to_be_visible()
    held[0].continue_()
    page.wait_for_function("() => window.answered.includes('/api/auth/refresh')")  # the 401's refresh, refused
    assert page.evaluate("() => location.hash") == "#/signup"
    expect(page.get_by_role("button", name="Create team")).to_be_visible()
    expect(page.get_by_role("button", name="Log in")).to_have_count(0)


def test_logging_out_mid_answer_leaves_no_answer_text_in_the_tab(web_page: Watched, team: Team) -> None:
    """The text of an answer being written is kept in sessionStorage (to resume it after a reload); logging
    out left it there, readable by whoever uses the tab next. Events still buffered in the stream when the
    page left the answer wrote it back after the logout had removed it: here the send's body holds back what
    arrives once `holding` is set and hands it over when the page aborts the request, as a buffer would."""
    page = web_page.page
    page.add_init_script(
        """
        window.holding = false;
        window.held = [];
        const realFetch = window.fetch;
        window.fetch = async (url, init) => {
          const response = await realFetch(url, init);
          if (!/\\/messages$/.test(String(url)) || init?.method !== "POST") return response;
          const reader = response.body.getReader();
          const body = new ReadableStream({
            start(controller) {
              init.signal.addEventListener("abort", () => {
                for (const chunk of window.held) controller.enqueue(chunk);
                controller.close();
              });
              (async () => {
                for (;;) {
                  const { value, done } = await reader.read().catch(() => ({ done: true }));
                  if (done || init.signal.aborted) return;
                  if (window.holding) window.held.push(value);
                  else controller.enqueue(value);
                }
              })();
            },
          });
          return new Response(body, { status: response.status, headers: response.headers });
        };
        """
    )
    open_new_chat(web_page, team)
    words = " ".join(f"w{i}" for i in range(20))
    send(page, f"[delay=100] {words}")
    expect(page.locator(".msg.assistant .content")).to_contain_text("w3")
    stored = "Object.keys(sessionStorage).filter((k) => k.startsWith('stream:'))"
    assert len(page.evaluate(stored)) == 1
    page.evaluate("window.holding = true")
    page.wait_for_function("() => window.held.length > 0")
    page.get_by_role("button", name="Log out").click()
    # The held events reach the page right after the logout's clean-up, before the login page is drawn.
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    assert page.evaluate(stored) == []
    wait_until_stored(team)  # the server goes on with the answer: let it end before the tables are emptied


def test_signing_in_over_a_session_mid_answer_leaves_no_answer_text_in_the_tab(web_page: Watched, team: Team) -> None:
    """The login page opened without logging out, mid-answer: the next user signed in with the previous one's
    answer text still in sessionStorage."""
    with team.api() as client:
        added = client.post("/api/users", json={"email": "bob@example.com", "password": PASSWORD})
        assert added.status_code == 201, added.text
    page = web_page.page
    open_new_chat(web_page, team)
    send(page, "[delay=100] " + " ".join(f"w{i}" for i in range(20)))
    expect(page.locator(".msg.assistant .content")).to_contain_text("w3")
    stored = "Object.keys(sessionStorage).filter((k) => k.startsWith('stream:'))"
    assert len(page.evaluate(stored)) == 1
    page.evaluate("() => { location.hash = '#/login'; }")
    page.get_by_label("Email").fill("bob@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".who")).to_have_text("bob@example.com")
    assert page.evaluate(stored) == []
    wait_until_stored(team)  # the server goes on with the answer: let it end before the tables are emptied


def test_a_session_ended_elsewhere_shows_the_login_form_without_the_401s_toast(web_page: Watched, team: Team) -> None:
    """A session ended elsewhere (a logout in another tab, cookies gone): the next send's 401, its refresh refused,
    showed the login form as it should, and then the send's error on it, "Not authenticated", in a toast that
    stayed 8 s over the form (the toasts had just been cleared with the session). Nothing shows now."""
    page = web_page.page
    open_new_chat(web_page, team)
    page.context.clear_cookies()  # as another tab's logout leaves this one
    send(page, "anyone?")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.wait_for_timeout(1_000)  # the send's error comes after the login form
    assert page.locator(".toast").all_inner_texts() == []  # now, not after waiting (a toast goes after 8 s)
    # A message of the next session shows as ever.
    fill_login(page, team.email)
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    page.context.set_offline(True)
    page.get_by_label("Search chats").fill("x")
    expect(page.locator(".toast.error", has_text="The server could not be reached.")).to_be_visible()
    page.context.set_offline(False)
    assert web_page.errors == []


def test_a_failed_logout_is_not_reported_as_done(web_page: Watched, team: Team) -> None:
    """A logout that never reached the server showed the login page while the session stayed valid (a reload
    showed the chats again); the page now says the logout failed and stays, and Log out can be tried again.
    That message goes when the logout is done."""
    page = web_page.page
    log_in(page, team.email)
    page.route("**/api/auth/logout", lambda route: route.abort("connectionreset"))
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("alert")).to_have_text("You are still logged in: the server could not be reached.")
    expect(page.locator("#toasts .toast")).to_have_count(1)
    expect(page.get_by_role("link", name="+ New chat")).to_be_visible()
    page.unroute("**/api/auth/logout")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    # The signed-out user's messages go with the session (an error stayed 8 s over the login form); counted
    # at once, as the toast's own 8 s timer would pass a check that waits.
    assert page.locator("#toasts .toast").count() == 0
    page.goto("/#/chats")
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    expect(page.get_by_role("link", name="+ New chat")).to_have_count(0)


def fill_login(page: Page, email: str) -> None:
    """The login form already shown (the address kept), as a user fills it."""
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def test_a_tab_left_by_an_ended_session_opens_the_next_users_chat_list(web_page: Watched, team: Team) -> None:
    """A tab kept (or restored) after Ada's session ended without a logout opens her chat's address without a
    session: the login form, and whoever logged in next was taken to that address, a 404 for Bob. The page kept
    for after the login is now only for the user the tab was signed in as."""
    with team.api() as client:
        added = client.post("/api/users", json={"email": "bob@example.com", "password": PASSWORD})
        assert added.status_code == 201, added.text
    chat = team.create_chat(team.get("/api/agents")[0]["id"], title="Ada's plan")
    page = web_page.page
    log_in(page, team.email)
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat['id']}'; }}")
    expect(page.locator(".chat-header h1")).to_have_text("Ada's plan")
    page.context.clear_cookies()  # the session is over (expired); the tab stays, with its sessionStorage
    page.reload()
    expect(page).to_have_url(re.compile(r"#/login$"))
    fill_login(page, "bob@example.com")
    expect(page.locator(".who")).to_have_text("bob@example.com")
    expect(page).to_have_url(re.compile(r"#/chats$"))
    expect(page.get_by_text("This chat does not exist.")).to_have_count(0)
    assert web_page.errors == []


def test_the_same_user_returns_to_the_page_their_session_ended_on(web_page: Watched, team: Team) -> None:
    """Ada's own page is kept for her: after her session ended and the tab was reloaded, and after it expired
    under the page (the next request refused): she logs in and is back there. Not after a logout."""
    agent_id = team.get("/api/agents")[0]["id"]
    first = team.create_chat(agent_id, title="First plan")
    second = team.create_chat(agent_id, title="Second plan")
    page = web_page.page
    log_in(page, team.email)
    page.evaluate(f"() => {{ location.hash = '#/chats/{first['id']}'; }}")
    expect(page.locator(".chat-header h1")).to_have_text("First plan")
    page.context.clear_cookies()
    page.reload()
    expect(page).to_have_url(re.compile(r"#/login$"))
    fill_login(page, team.email)
    expect(page).to_have_url(re.compile(f"#/chats/{first['id']}$"))
    expect(page.locator(".chat-header h1")).to_have_text("First plan")
    page.context.clear_cookies()  # expires under the page: the next chat opened is refused
    page.evaluate(f"() => {{ location.hash = '#/chats/{second['id']}'; }}")
    expect(page).to_have_url(re.compile(r"#/login$"))
    fill_login(page, team.email)
    expect(page).to_have_url(re.compile(f"#/chats/{second['id']}$"))
    expect(page.locator(".chat-header h1")).to_have_text("Second plan")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    fill_login(page, team.email)
    expect(page.locator(".who")).to_be_visible()
    expect(page).to_have_url(re.compile(r"#/chats$"))
    assert web_page.errors == []


def wait_until_stored(team: Team) -> None:
    """Every answer of the team's admin has ended (none is still `streaming`)."""
    deadline = time.monotonic() + 15
    chats = [c["id"] for c in team.get("/api/chats")]
    while any(m["status"] == "streaming" for c in chats for m in team.get(f"/api/chats/{c}")["messages"]):
        assert time.monotonic() < deadline, "the answer did not end"
        time.sleep(0.1)


def dict_cookies(page: Page) -> dict[str, str]:
    return {c["name"]: c["value"] for c in page.context.cookies() if "name" in c and "value" in c}


def test_status_and_tool_steps_show_live_and_stay_with_the_answer(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    page = web_page.page
    # A workflow that reports progress by callback (docs/CALLBACKS.md), slowly enough to see it live.
    team.create_agent(
        f"{fake_n8n_url}/webhook/agent-stream?scenario=callbacks&interval_ms=150",
        name="Steps bot",
        response_mode="callback",
    )
    log_in(page, team.email)
    page.get_by_role("button", name=re.compile("Steps bot")).click()
    send(page, "find the invoices of may")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".steps")).to_contain_text("search")
    expect(answer).to_have_attribute("data-status", "streaming")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(answer.locator(".content")).to_have_text("Echo: find the invoices of may")
    expect(answer.locator(".steps")).to_contain_text("Searching the knowledge base")
    answer.get_by_text("search", exact=True).click()  # the tool step opens on its input and output
    expect(answer.locator(".steps pre").first).to_contain_text("find the invoices of may")
    kept = json.loads(page.evaluate("JSON.stringify(sessionStorage)"))
    assert set(kept) == {"tab-user"}  # the answer's state is gone; who the tab was signed in as stays


def test_the_main_path_works_with_the_keyboard_alone(web_page: Watched, team: Team) -> None:
    page = web_page.page
    page.goto("/")
    expect(page.get_by_label("Email")).to_be_focused()  # autofocus
    page.keyboard.type(team.email)
    page.keyboard.press("Tab")
    page.keyboard.type(team.password)
    page.keyboard.press("Enter")
    page.get_by_role("link", name="+ New chat").wait_for()
    for _ in range(30):  # Tab through the page until the agent's card has the focus
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('agent-card')"):
            break
    page.keyboard.press("Enter")
    expect(page.get_by_label("Message", exact=True)).to_be_focused()
    page.keyboard.type("typed only")
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete] .content")).to_have_text("Echo: typed only")


def test_a_refused_send_is_reported_and_the_chat_stays_usable(web_page: Watched, team: Team) -> None:
    page = web_page.page
    open_new_chat(web_page, team)
    agent_id = team.get("/api/agents")[0]["id"]
    with team.api() as client:
        assert client.delete(f"/api/agents/{agent_id}").status_code == 204  # deactivated meanwhile
    send(page, "anyone there?")
    expect(page.get_by_role("alert")).to_be_visible()
    expect(page.locator(".msg.streaming")).to_have_count(0)
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    chat_id = page.url.rsplit("/", 1)[1]
    assert team.get(f"/api/chats/{chat_id}")["messages"] == []  # refused before anything was stored


def test_an_answer_refused_with_retry_after_says_when_to_try_again(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """n8n (or a proxy) refused with 429 or 503 and a Retry-After: the error event's `retry_after` was not shown,
    so the user read "HTTP 429" and nothing about when to send again. Now the toast and the answer's error line
    say it the way people do; a chat drawn again later says what is left, or nothing once the wait is over
    (no timer ticks)."""
    team.create_agent(f"{fake_n8n_url}/webhook/x?scenario=status&status=429&retry_after=90", name="Busy bot")
    team.create_agent(f"{fake_n8n_url}/webhook/x?scenario=status&status=503&retry_after=30", name="Down bot")
    page = web_page.page
    log_in(page, team.email)
    failed = page.locator(".msg.assistant[data-status=error] .error")
    chats = {}
    for name, wait in (("Busy bot", "2 min"), ("Down bot", "30 s")):
        page.get_by_role("link", name="+ New chat").click()
        page.get_by_role("button", name=re.compile(name)).click()
        send(page, "hello")
        expect(failed).to_have_text(
            re.compile(rf"^The agent answered with an error \(HTTP \d+\)\. Try again in {wait}\.$")
        )
        expect(page.locator(".toast.error", has_text=f"Try again in {wait}.")).to_be_visible()
        chats[name] = page.url.rsplit("/", 1)[1]
    # 31 s later (the page's clock moved on): the 90 s wait has about a minute left, the 30 s one is over.
    page.evaluate("const now = Date.now(); Date.now = () => now + 31_000")
    page.locator(f".chat-list li[data-id='{chats['Busy bot']}'] .chat-link").click()
    expect(failed).to_have_text(
        re.compile(r"^The agent answered with an error \(HTTP 429\)\. Try again in [45]\d s\.$")
    )
    page.locator(f".chat-list li[data-id='{chats['Down bot']}'] .chat-link").click()
    expect(failed).to_have_text("The agent answered with an error (HTTP 503)")
    assert web_page.errors == []


def test_a_long_unbroken_word_keeps_the_chat_within_a_phones_width(web_page: Watched, team: Team) -> None:
    """A first message of one long word becomes the chat's title: the header's title did not wrap or shorten,
    so on a phone the page scrolled sideways and the chat's ⋯ menu was pushed off the screen. The title is now
    cut with an ellipsis (whole in its tooltip); the messages wrap as before."""
    page = web_page.page
    open_new_chat(web_page, team)
    page.set_viewport_size({"width": 400, "height": 800})  # a phone: the chat alone
    word = "a" * 400
    send(page, word)
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(page.locator(".pane .chat-header h1")).to_have_attribute("title", re.compile("^a{50}"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    menu = page.locator(".pane .chat-header").get_by_label(re.compile("^Actions for "))
    box = menu.bounding_box()
    assert box is not None
    assert box["x"] + box["width"] <= 400
    menu.click()
    expect(page.locator(".pane .chat-header").get_by_role("button", name="Export as JSON")).to_be_in_viewport()
    assert web_page.errors == []


def test_a_toast_does_not_block_the_chat_menu_under_it(web_page: Watched, team: Team, fake_n8n_url: str) -> None:
    """A failed answer's toast sits over the chat header's ⋯ for 8 s and took its clicks: the menu could not be
    opened until the toast went. Clicks now go through the toasts."""
    team.create_agent(f"{fake_n8n_url}/webhook/x?scenario=status&status=500", name="Broken bot")
    page = web_page.page
    log_in(page, team.email)
    page.get_by_role("button", name=re.compile("Broken bot")).click()
    send(page, "hello")
    toast = page.locator(".toast.error")
    expect(toast).to_be_visible()
    menu = page.locator(".pane .chat-header summary")
    toast_box, menu_box = toast.bounding_box(), menu.bounding_box()
    assert toast_box is not None
    assert menu_box is not None
    # The layout this is about: the toast covers the ⋯ (else the test would prove nothing).
    assert toast_box["x"] <= menu_box["x"] + menu_box["width"] / 2 <= toast_box["x"] + toast_box["width"]
    assert toast_box["y"] <= menu_box["y"] + menu_box["height"] / 2 <= toast_box["y"] + toast_box["height"]
    menu.click(timeout=3_000)
    expect(page.locator(".pane .chat-header").get_by_role("button", name="Export as JSON")).to_be_visible()
    expect(toast).to_be_visible()  # it was still there


def test_a_long_agent_name_takes_one_line_in_the_chats_header_on_a_phone(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """The chat's title was cut with an ellipsis on a phone, but its agent's name under it wrapped: a long name
    (up to 100 characters) took three lines of the header above the messages. It is cut too, whole in its
    tooltip."""
    name = "A very long agent name that goes on and on and on without any end in sight really, truly"
    team.create_agent(f"{fake_n8n_url}/webhook/agent-stream", name=name)
    page = web_page.page
    page.set_viewport_size({"width": 380, "height": 800})
    log_in(page, team.email)
    page.get_by_role("link", name="+ New chat").click()
    page.get_by_role("button", name=re.compile("^A very long agent")).click()
    label = page.locator(".pane .chat-heading .muted")
    expect(label).to_contain_text("A very long agent")
    title_box, label_box = page.locator(".pane .chat-header h1").bounding_box(), label.bounding_box()
    assert title_box is not None
    assert label_box is not None
    assert label_box["height"] < 1.5 * title_box["height"]  # one line
    expect(label).to_have_attribute("title", name)
    assert page.evaluate("document.documentElement.scrollWidth") <= 380


def test_a_wide_table_in_an_answer_scrolls_within_it_on_a_phone(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """A Markdown table in an answer was squeezed into a phone's width by cutting its words anywhere ("more" in
    three lines: m / or / e). It now keeps its words whole and scrolls sideways inside the message; the page
    itself does not."""
    header = "| " + " | ".join(f"column {i}" for i in range(6)) + " |"
    rows = "\n".join(["|" + "---|" * 6, "| " + " | ".join(["more"] * 6) + " |"])
    answer = json.dumps({"output": f"A table:\n\n{header}\n{rows}\n\nThe end."}).encode()
    team.create_agent(raw_answer(fake_n8n_url, answer), name="Table bot")
    page = web_page.page
    page.set_viewport_size({"width": 380, "height": 800})
    log_in(page, team.email)
    page.get_by_role("link", name="+ New chat").click()  # a phone shows the list alone first
    page.get_by_role("button", name=re.compile("Table bot")).click()
    send(page, "a table please")
    table = page.locator(".msg.assistant[data-status=complete] table")
    expect(table).to_be_visible()
    lines = table.locator("td").first.evaluate(
        "(cell) => { const r = document.createRange(); r.selectNodeContents(cell); return r.getClientRects().length }"
    )
    assert lines == 1  # "more" on one line
    assert table.evaluate("(t) => t.scrollWidth > t.clientWidth")  # wider than the message: it scrolls
    assert page.evaluate("document.documentElement.scrollWidth") <= 380
    expect(page.locator(".msg.assistant .content")).to_contain_text("The end.")


DRAFTS_KEPT = "Object.keys(sessionStorage).filter((k) => k.startsWith('draft:'))"


def test_a_draft_comes_back_after_a_reload_and_goes_once_sent(web_page: Watched, team: Team) -> None:
    """What was typed in the message box and not sent was lost on a reload (or a crashed tab restored): it is
    kept per chat in the tab's sessionStorage and back in the box; sent (the server has it), it goes, and a box
    emptied by hand keeps nothing either."""
    page = web_page.page
    open_new_chat(web_page, team)
    box = page.get_by_label("Message", exact=True)
    box.press_sequentially("half a thought")
    page.reload()
    expect(box).to_have_value("half a thought")
    expect(box).to_be_focused()
    box.press("End")
    box.press_sequentially(", finished")
    box.press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page) == "Echo: half a thought, finished"
    assert page.evaluate(DRAFTS_KEPT) == []
    page.reload()
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(box).to_have_value("")
    box.fill("second thoughts")
    assert len(page.evaluate(DRAFTS_KEPT)) == 1
    box.fill("")
    assert page.evaluate(DRAFTS_KEPT) == []
    page.reload()
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(box).to_have_value("")
    assert web_page.errors == []


def test_each_chat_keeps_its_own_draft(web_page: Watched, team: Team) -> None:
    """Another chat opened and this one opened again: the text typed here was gone. Each chat now gets back its
    own draft, and a draft never shows in another chat, neither after switching nor after a reload."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    a = team.create_chat(agent_id, title="Chat A")
    b = team.create_chat(agent_id, title="Chat B")
    log_in(page, team.email)
    box = page.get_by_label("Message", exact=True)
    heading = page.locator(".chat-heading h1")

    def show(chat: dict[str, str]) -> None:
        page.evaluate(f"() => {{ location.hash = '#/chats/{chat['id']}'; }}")
        expect(heading).to_have_text(chat["title"])

    show(a)
    box.press_sequentially("only for A")
    show(b)
    expect(box).to_have_value("")
    box.fill("only for B")
    show(a)
    expect(box).to_have_value("only for A")
    page.evaluate("() => { location.hash = '#/new'; }")
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    show(b)
    expect(box).to_have_value("only for B")
    page.reload()
    expect(heading).to_have_text("Chat B")
    expect(box).to_have_value("only for B")
    show(a)
    expect(box).to_have_value("only for A")
    assert web_page.errors == []


def test_a_draft_is_only_for_the_user_who_wrote_it(web_page: Watched, team: Team) -> None:
    """A logout removes the drafts from the tab, so whoever signs in next in it sees none; and a draft found
    in the tab for another user (written before their session ended) is not shown, and goes."""
    with team.api() as client:
        added = client.post("/api/users", json={"email": "bob@example.com", "password": PASSWORD})
        assert added.status_code == 201, added.text
    bob_id = added.json()["id"]
    agent_id = team.get("/api/agents")[0]["id"]
    chat = team.create_chat(agent_id, title="Ada's plan")
    page = web_page.page
    log_in(page, team.email)
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat['id']}'; }}")
    box = page.get_by_label("Message", exact=True)
    box.press_sequentially("my secret plan")
    assert len(page.evaluate(DRAFTS_KEPT)) == 1
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    assert page.evaluate(DRAFTS_KEPT) == []
    fill_login(page, "bob@example.com")
    expect(page.locator(".who")).to_have_text("bob@example.com")
    page.get_by_role("button", name=re.compile("Echo bot")).click()
    expect(box).to_be_focused()
    expect(box).to_have_value("")
    assert "my secret plan" not in page.content()
    # Bob's new chat (not made until its first message: its draft is kept under its agent's id), with a draft
    # left in the tab by someone else (Ada's id on it): not shown, and removed.
    bobs = "new-" + page.url.rsplit("/new/", 1)[1]
    ada_id = team.get("/api/auth/me")["id"]
    page.evaluate(
        "([key, user]) => sessionStorage.setItem(key, JSON.stringify({ user, text: 'not yours' }))",
        [f"draft:{bobs}", ada_id],
    )
    page.reload()
    expect(page.locator(".chat-heading h1")).to_have_text("New chat")
    expect(box).to_have_value("")
    assert page.evaluate(DRAFTS_KEPT) == []
    # Bob's own draft is his.
    box.press_sequentially("bob's words")
    assert page.evaluate(f"() => JSON.parse(sessionStorage.getItem('draft:{bobs}')).user") == bob_id
    page.reload()
    expect(box).to_have_value("bob's words")
    page.evaluate("() => { location.hash = '#/login'; }")  # over Bob's session, without a logout
    fill_login(page, team.email)
    expect(page.locator(".who")).to_have_text("Ada Admin")
    assert page.evaluate(DRAFTS_KEPT) == []
    assert web_page.errors == []


def test_a_waiting_send_given_back_and_the_draft_typed_after_it_show_once(web_page: Watched, team: Team) -> None:
    """The waiting send's give-back puts its text in the box; the draft kept while it waited is that same text
    (kept until the server has it), so it is not given twice, and a draft typed after it stays, below it.
    Given back, it is the chat's draft: a reload keeps it; sent, it goes."""
    page = web_page.page
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    box = page.get_by_label("Message", exact=True)
    page.context.set_offline(True)
    send(page, "sent offline")
    expect(page.locator(".msg.assistant .live-status")).to_have_text(re.compile("^Waiting for the network"))
    page.evaluate("() => { location.hash = '#/new'; }")
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    page.context.set_offline(False)
    page.reload()
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat_id}'; }}")
    expect(box).to_have_value("sent offline")
    expect(page.locator(".toast.error", has_text=WAITING)).to_be_visible()
    # Waiting again, with a new draft typed under it, then left.
    page.context.set_offline(True)
    box.press("Enter")
    expect(page.locator(".msg.assistant .live-status")).to_be_visible()
    box.press_sequentially("typed meanwhile")
    page.evaluate("() => { location.hash = '#/new'; }")
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    page.context.set_offline(False)
    page.evaluate(f"() => {{ location.hash = '#/chats/{chat_id}'; }}")
    expect(box).to_have_value("sent offline\ntyped meanwhile")
    page.reload()
    expect(box).to_have_value("sent offline\ntyped meanwhile")
    assert page.evaluate(UNSENT_KEPT) == []
    box.press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    stored = team.get(f"/api/chats/{chat_id}")["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["sent offline\ntyped meanwhile"]
    page.reload()
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    expect(box).to_have_value("")
    assert page.evaluate(DRAFTS_KEPT) == []
    assert web_page.errors == []


def test_a_draft_whose_send_was_on_its_way_at_a_reload_keeps_its_key(web_page: Watched, team: Team) -> None:
    """Reloaded before the server answered the send: the text is still the chat's draft (the server may not
    have it), back in the box, and sent again it carries the same Idempotency-Key, so a send that did reach
    the server would be answered from what it stored, not stored twice."""
    page = web_page.page
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    keys = message_keys(page)
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)  # never answered

    page.route("**/api/chats/*/messages", hold)
    send(page, "on its way")
    key_kept = f"() => !!JSON.parse(sessionStorage.getItem('draft:{chat_id}') || '{{}}').key"
    page.wait_for_function(key_kept)  # stream() ran: the draft has the send's key
    page.reload()  # the route still holds the send: it never reaches the server before the page is gone
    box = page.get_by_label("Message", exact=True)
    expect(box).to_have_value("on its way")
    page.unroute("**/api/chats/*/messages")
    box.press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert len(keys) == 2
    assert len(set(keys)) == 1
    assert [m["content"] for m in team.get(f"/api/chats/{chat_id}")["messages"]] == ["on its way", "Echo: on its way"]
    expect(box).to_have_value("")
    assert page.evaluate(DRAFTS_KEPT) == []
    assert web_page.errors == []


def test_a_full_session_storage_loses_the_draft_not_the_message(web_page: Watched, team: Team) -> None:
    """The tab's sessionStorage full (its quota): the draft cannot be kept, but typing and sending work as
    before, without an error in the page, and no older draft is given back in its place; nor can the answer's
    position be kept, and the answer streams as usual."""
    page = web_page.page
    open_new_chat(web_page, team)
    box = page.get_by_label("Message", exact=True)
    box.fill("an older draft")
    page.evaluate(
        """() => {
          const chunk = "x".repeat(256 * 1024);
          for (let i = 0; ; i++) {
            try { sessionStorage.setItem(`filler:${i}`, chunk); } catch { break; }
          }
          for (let i = 0; ; i++) {
            try { sessionStorage.setItem(`small:${i}`, "x".repeat(64)); } catch { break; }
          }
        }"""
    )
    box.fill("a longer text than the storage has room for " + "y" * 1000)
    assert page.evaluate(DRAFTS_KEPT) == []
    follows = follows_of(page)
    sends: list[Request] = []
    page.on("request", lambda r: sends.append(r) if r.method == "POST" and r.url.endswith("/messages") else None)
    box.press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page).startswith("Echo: a longer text")
    assert web_page.errors == []
    # The answer streamed on its send: an event's position that could not be kept was taken for a network
    # failure, and the page sent again and followed instead.
    assert (len(sends), follows) == (1, [])


def test_a_send_given_back_keeps_its_key_in_the_draft_across_a_reload(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """A send the server got but never answered is given back into the box; reloaded before it is sent again,
    the draft still carries its Idempotency-Key, so sending it is answered from what the server stored."""
    page = web_page.page
    open_new_chat(web_page, team)
    chat_id = page.url.rsplit("/", 1)[1]
    httpx.delete(f"{fake_n8n_url}/__requests")
    keys: list[str] = []

    def unreachable(route: Route) -> None:
        keys.append(route.request.headers["idempotency-key"])
        if len(keys) == 1:
            route.fetch()  # the server got it and answered in full...
        route.abort("connectionrefused")  # ...but no answer reaches the browser

    page.route("**/api/chats/*/messages", unreachable)
    send(page, "only once")
    expect(page.locator(".toast.error", has_text="Your message was not sent")).to_be_visible()
    page.unroute("**/api/chats/*/messages")
    page.reload()
    box = page.get_by_label("Message", exact=True)
    expect(box).to_have_value("only once")
    keys_after = message_keys(page)
    box.press("Enter")
    expect(box).to_have_value("")
    page.wait_for_function("() => !document.querySelector('.msg.streaming')")
    assert keys_after == [keys[0]]
    assert len(team.get(f"/api/chats/{chat_id}/messages")) == 2  # one question, one answer
    assert len([r for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]) == 1
    page.reload()
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(box).to_have_value("")
    assert page.evaluate(DRAFTS_KEPT) == []
    assert web_page.errors == []


def test_enter_while_another_tabs_answer_is_followed_says_why_and_keeps_the_text(web_page: Watched, team: Team) -> None:
    """A tab following an answer another tab started did nothing on Enter: no send, no word, the text left in the
    box with no reason given. It now says an answer is still being written (politely: a status), keeps the text,
    and sends nothing; the same as Enter while this tab's own answer runs."""
    page = web_page.page
    notice = "An answer is still being written in this chat: send your message when it ends, or press Stop."
    open_new_chat(web_page, team)
    send(page, "[delay=100] " + " ".join(f"w{i}" for i in range(20)))
    expect(page.locator(".msg.assistant .content")).to_contain_text("w1")
    send(page, "next")  # this tab's own answer runs
    expect(page.locator(".toast[role=status]")).to_have_text(notice)
    expect(page.get_by_label("Message", exact=True)).to_have_value("next")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    page.get_by_label("Message", exact=True).fill("")
    chat_id = page.url.rsplit("/", 1)[1]
    start_elsewhere(team, chat_id, SLOW)
    page.reload()  # this tab now follows the other tab's answer
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    send(page, "me too")
    expect(page.locator(".toast[role=status]", has_text="still being written")).to_have_text(notice)
    expect(page.get_by_label("Message", exact=True)).to_have_value("me too")
    assert posts == []
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(2, timeout=15_000)
    expect(page.get_by_label("Message", exact=True)).to_have_value("me too")


def test_each_messages_buttons_say_which_message_they_act_on(web_page: Watched, team: Team) -> None:
    """Edit, Regenerate, Helpful and Not helpful had the same name on every message: moving between buttons, a
    screen reader could not tell which message one acted on. Named by their words still, they are now described
    by the message's first words."""
    page = web_page.page
    open_new_chat(web_page, team)
    for text in ("first question", "second question"):
        send(page, text)
        expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1 if text.startswith("f") else 2)
    edits = page.get_by_role("button", name="Edit", exact=True)
    expect(edits).to_have_count(2)
    expect(edits.nth(0)).to_have_accessible_description("Your message: first question")
    expect(edits.nth(1)).to_have_accessible_description("Your message: second question")
    for name in ("Regenerate", "Helpful", "Not helpful"):
        buttons = page.get_by_role("button", name=name, exact=True)
        expect(buttons.nth(0)).to_have_accessible_description("The answer: Echo: first question")
        expect(buttons.nth(1)).to_have_accessible_description("The answer: Echo: second question")


def test_the_tabs_title_names_the_open_chat_and_long_titles_have_a_tooltip(web_page: Watched, team: Team) -> None:
    """The browser's tab said "n8n Chat" whatever was open, and a chat title cut with an ellipsis in the list had
    no tooltip to read it whole. The tab now names the open chat (an admin page: its name), and the list's titles
    carry the whole title."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    long_title = "A very long chat title about the quarterly planning of the support team's rota " * 2
    team.create_chat(agent_id, title=long_title.strip())
    team.create_chat(agent_id, title="Quarterly plan")
    log_in(page, team.email)
    expect(page).to_have_title("Chats \N{EN DASH} n8n Chat")
    cut = page.locator(".chat-list .chat-title", has_text="A very long")
    expect(cut).to_have_attribute("title", long_title.strip())
    assert cut.evaluate("(el) => el.scrollWidth > el.clientWidth")  # shown cut, whole in the tooltip
    page.get_by_role("link", name="Quarterly plan", exact=True).click()
    expect(page).to_have_title("Quarterly plan \N{EN DASH} n8n Chat")
    page.get_by_role("link", name=re.compile("A very long")).click()
    expect(page).to_have_title(f"{long_title.strip()} \N{EN DASH} n8n Chat")
    page.get_by_role("link", name="Usage").click()
    expect(page).to_have_title("Usage \N{EN DASH} n8n Chat")


CODE = "print('" + "x" * 150 + "')"


def test_code_blocks_scroll_and_copy_and_quotes_are_styled(web_page: Watched, team: Team, fake_n8n_url: str) -> None:
    """A code block in an answer wrapped its lines (a long line of code read as several), had no Copy button, and
    a quote looked like any paragraph. Code now keeps its lines and scrolls sideways, with a Copy button that
    says "Copied" and is not part of the message's copied text; a quote has a bar and muted text, in both
    themes."""
    output = f"Here:\n\n```python\n{CODE}\n```\n\n> a quoted line\n\nThe end."
    team.create_agent(raw_answer(fake_n8n_url, json.dumps({"output": output}).encode()), name="Code bot")
    page = web_page.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.set_viewport_size({"width": 380, "height": 800})
    log_in(page, team.email)
    page.get_by_role("link", name="+ New chat").click()
    page.get_by_role("button", name=re.compile("Code bot")).click()
    send(page, "code please")
    content = page.locator(".msg.assistant[data-status=complete] .content")
    pre = content.locator("pre")
    expect(pre).to_be_visible()
    assert pre.evaluate("(p) => getComputedStyle(p).whiteSpace") == "pre"
    assert pre.evaluate("(p) => p.scrollWidth > p.clientWidth")  # one long line, scrolled sideways
    assert page.evaluate("document.documentElement.scrollWidth") <= 380

    copy = content.get_by_role("button", name="Copy code")
    expect(copy).to_have_text("")  # its word "Copy" is drawn by CSS: no text of the message
    assert copy.evaluate("(b) => getComputedStyle(b, '::before').content") == '"Copy"'
    assert "Copy" not in content.inner_text()
    selected = content.evaluate("(c) => { getSelection().selectAllChildren(c); return getSelection().toString() }")
    assert CODE in selected
    assert "Copy" not in selected
    copy.click()
    expect(page.locator(".toast[role=status]")).to_have_text("Copied.")
    expect(content.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("() => navigator.clipboard.readText()").strip() == CODE
    assert web_page.errors == []
    assert not [line for line in web_page.console if "Content Security Policy" in line]

    quote = content.locator("blockquote")
    style = "(q) => { const s = getComputedStyle(q); return [s.borderLeftStyle, s.borderLeftWidth, s.color] }"
    assert quote.evaluate(style) == ["solid", "4px", "rgb(93, 102, 117)"]  # --muted, light
    page.emulate_media(color_scheme="dark")
    assert quote.evaluate(style) == ["solid", "4px", "rgb(154, 163, 178)"]  # --muted, dark


@pytest.mark.usefixtures("web_page")  # the tables emptied after
def test_on_a_touch_screen_enter_adds_a_line_and_send_sends(
    browser: Browser, web_server: LiveServer, team: Team
) -> None:
    """A phone's keyboard has no Shift+Enter: Enter sent the message, so it could hold one line only. On a touch
    screen (a coarse pointer) Enter now adds a line and the Send button sends; a desktop is unchanged (the other
    tests send with Enter)."""
    context = browser.new_context(base_url=web_server.url, has_touch=True)
    try:
        page = context.new_page()
        log_in(page, team.email)
        page.get_by_role("link", name="+ New chat").click()
        page.get_by_role("button", name=re.compile("Echo bot")).click()
        box = page.get_by_label("Message", exact=True)
        box.fill("line one")
        box.press("Enter")
        box.press_sequentially("line two")
        expect(box).to_have_value("line one\nline two")
        expect(page.locator(".msg.user")).to_have_count(0)
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".msg.user .content")).to_have_text("line one\nline two")
        expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
        # An edit's box alike: Enter adds a line, its Send sends.
        page.get_by_role("button", name="Edit", exact=True).click()
        edited = page.get_by_label("Edited message")
        edited.press("Control+End")
        edited.press("Enter")
        edited.press_sequentially("line three")
        expect(edited).to_have_value("line one\nline two\nline three")
        page.locator(".edit-form").get_by_role("button", name="Send").click()
        expect(page.locator(".msg.user .content")).to_have_text("line one\nline two\nline three")
        expect(page.locator(".msg.user .branch-pos")).to_have_text("2 / 2")
    finally:
        context.close()


def test_a_page_that_cannot_be_shown_names_itself_in_the_tab(web_page: Watched, team: Team) -> None:
    """A chat that 404s (a deleted chat's bookmark, another user's link, a mistyped address) left the tab named
    "n8n Chat", as if nothing were open; so did a share that is gone. The tab now says what happened."""
    page = web_page.page
    log_in(page, team.email)
    page.goto("/#/chats/00000000-0000-0000-0000-000000000000")
    expect(page.get_by_role("alert")).to_have_text("This chat does not exist.")
    expect(page).to_have_title("Chat not found \N{EN DASH} n8n Chat")
    page.goto("/#/chats/not-a-chat-id")
    expect(page.get_by_role("alert")).to_have_text("This chat does not exist.")
    expect(page).to_have_title("Chat not found \N{EN DASH} n8n Chat")
    page.goto("/#/shares/00000000-0000-0000-0000-000000000000")
    expect(page.get_by_role("alert")).to_have_text("This shared chat does not exist or is no longer shared.")
    expect(page).to_have_title("Shared chat not found \N{EN DASH} n8n Chat")
    assert web_page.errors == []


def test_a_new_chat_is_made_by_its_first_message_not_by_picking_an_agent(web_page: Watched, team: Team) -> None:
    """Picking an agent created the chat on the server at once: every agent picked and left without a message
    left an empty "New chat" in the list. The chat now exists from its first message on: until then the page
    shows it under #/new/<agent id> (a reload keeps it and its draft), and nothing is stored."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    log_in(page, team.email)
    for _ in range(3):  # picked, and left for another page without a word
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Chats").click()
        page.get_by_role("link", name="+ New chat").click()
        page.get_by_role("button", name=re.compile("Echo bot")).click()
        expect(page).to_have_url(re.compile(f"#/new/{agent_id}$"))
        expect(page.get_by_label("Message", exact=True)).to_be_focused()
        expect(page).to_have_title("New chat \N{EN DASH} n8n Chat")
        expect(page.locator(".chat-header h1")).to_have_text("New chat")
        expect(page.locator(".chat-header .agent-name")).to_have_text("Echo bot")
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Shared").click()
        expect(page.get_by_role("heading", name="Shared with team")).to_be_visible()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Chats").click()
    expect(page.locator(".chat-list")).to_have_text("No chats yet.")
    assert team.get("/api/chats") == []
    # The address is the unsaved chat's: reloaded, it shows again, with what was typed.
    page.get_by_role("link", name="+ New chat").click()
    page.get_by_role("button", name=re.compile("Echo bot")).click()
    page.get_by_label("Message", exact=True).fill("hello there")
    page.reload()
    expect(page.get_by_label("Message", exact=True)).to_have_value("hello there")
    assert team.get("/api/chats") == []
    # The first message makes the chat: its address replaces the unsaved one's, and it shows in the list.
    page.get_by_label("Message", exact=True).press("Enter")
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1)
    assert answer_text(page) == "Echo: hello there"
    [chat] = team.get("/api/chats")
    expect(page).to_have_url(re.compile(f"#/chats/{chat['id']}$"))
    expect(page.locator(f'.chat-list li[data-id="{chat["id"]}"] .chat-link')).to_have_attribute("aria-current", "page")
    expect(page.get_by_label("Message", exact=True)).to_have_value("")
    messages = team.get(f"/api/chats/{chat['id']}")["messages"]
    assert [m["content"] for m in messages] == ["hello there", "Echo: hello there"]
    # Back goes to the agent picker, before the unsaved chat (now this one): not to a second unsaved chat.
    page.go_back()
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    assert len(team.get("/api/chats")) == 1
    page.reload()
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    expect(page.locator(".chat-list li")).to_have_count(1)
    # An agent that does not exist (or is no longer active): said so, in the page and the tab.
    page.goto("/#/new/00000000-0000-0000-0000-000000000000")
    expect(page.get_by_role("alert")).to_have_text("This agent does not exist or is not active: pick another one.")
    expect(page).to_have_title("Agent not found \N{EN DASH} n8n Chat")
    assert web_page.errors == []


def test_a_new_chats_first_message_sent_offline_waits_for_the_network(
    web_page: Watched, team: Team, fake_n8n_url: str
) -> None:
    """The first message of a chat not made yet, sent offline, said "The server could not be reached." and
    stayed in the box, where a send in a made chat waits for the network. It now waits the same way: shown
    sent, "Waiting for the network", Stop; once the network is back the chat is made once and the message
    sent once. Left meanwhile (a reload), it is given back as a waiting send is."""
    page = web_page.page
    agent_id = team.get("/api/agents")[0]["id"]
    log_in(page, team.email)
    page.goto(f"/#/new/{agent_id}")
    box = page.get_by_label("Message", exact=True)
    expect(box).to_be_focused()
    httpx.delete(f"{fake_n8n_url}/__requests")
    creations: list[str] = []

    def made(request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/api/chats"):
            creations.append(request.url)

    page.on("request", made)
    page.context.set_offline(True)
    box.fill("first words")
    box.press("Enter")
    waiting = page.locator(".msg.assistant .live-status")
    expect(waiting).to_have_text("Waiting for the network: sent as soon as it is back.")
    expect(page.locator(".msg.user .content")).to_have_text("first words")
    expect(box).to_have_value("")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    box.press("Enter")  # nothing more is sent
    page.wait_for_timeout(1_000)
    page.context.set_offline(False)
    expect(page.locator(".msg.assistant[data-status=complete]")).to_have_count(1, timeout=15_000)
    assert answer_text(page) == "Echo: first words"
    expect(page.locator(".msg.user")).to_have_count(1)
    [chat] = team.get("/api/chats")
    expect(page).to_have_url(re.compile(f"#/chats/{chat['id']}$"))
    stored = team.get(f"/api/chats/{chat['id']}")["messages"]
    assert [m["content"] for m in stored] == ["first words", "Echo: first words"]
    assert len([r for r in httpx.get(f"{fake_n8n_url}/__requests").json() if r["method"] == "POST"]) == 1
    expect(box).to_have_value("")
    # Left while it waits (the agent picker): given back in the box when opened again, nothing made or sent.
    page.goto(f"/#/new/{agent_id}")
    expect(box).to_be_focused()
    page.context.set_offline(True)
    box.fill("second chat")
    box.press("Enter")
    expect(waiting).to_be_visible()
    page.evaluate("() => { location.hash = '#/new'; }")
    expect(page.get_by_role("heading", name="Start a chat")).to_be_visible()
    page.context.set_offline(False)
    page.wait_for_timeout(500)  # the left send would be on its way by now
    page.evaluate(f"() => {{ location.hash = '#/new/{agent_id}'; }}")
    expect(page.locator(".toast.error", has_text=WAITING)).to_be_visible()
    expect(box).to_have_value("second chat")
    page.context.set_offline(True)
    box.press("Enter")
    expect(waiting).to_be_visible()
    page.get_by_role("button", name="Stop").click()
    expect(box).to_have_value("second chat")
    expect(page.locator(".msg")).to_have_count(0)
    page.context.set_offline(False)
    page.wait_for_timeout(500)
    assert len(team.get("/api/chats")) == 1
    assert len(creations) >= 2  # tried offline, then made once the network was back
    assert web_page.errors == []
