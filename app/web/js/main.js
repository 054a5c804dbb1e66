// The client's entry: who is signed in, the hash router, and the page frame (top bar, main area, toasts).
import { ApiError, api, whenSignedOut } from "./api.js";
import { fill, h, notify, pageTitle, toastsWhen } from "./dom.js";
import { saved } from "./stream.js";
import { renderAuth } from "./views/auth.js";
import { ChatsView } from "./views/chat.js";

const app = document.getElementById("app");
const session = { user: null };
let chats = null; // the chat list and chat pane, kept while moving between chats
let routes = 0; // the latest route(): an earlier one still waiting (for /api/auth/me...) draws nothing
const AUTH_PAGES = ["login", "signup", "join"];
// The page opened without a session (a teammate's share link, a bookmarked chat, a tab restored after the session
// expired), or the one a session expired under: shown once signed in, instead of the chat list, but only to the
// user this tab was last signed in as (`tabUser`), or in a tab that never had one. A logout does not keep the page,
// and someone else signing in (a restored tab of the previous user's) gets their chat list, not a 404 for a chat of
// the previous user's.
let afterSignIn = null;
// Who this tab was last signed in as (their id, per tab like the tab's own history): kept past the session's end,
// to tell whether the page to show after the login is theirs.
const tabUser = {
  read: () => sessionStorage.getItem("tab-user"),
  write: (id) => sessionStorage.setItem("tab-user", id),
};
const currentPath = () => location.hash.replace(/^#/, "") || "/chats";
const currentSection = () => location.hash.replace(/^#\/?/, "").split("/")[0];
// The top bar's link of the page shown: the agent picker (#/new) and the bare address are the chats too.
const navCurrent = (href) => {
  const hash = !location.hash || location.hash.startsWith("#/new") ? "#/chats" : location.hash;
  return hash.startsWith(href);
};

/** Show `path`; `replace`: in place of the current history entry (Back does not return to it). */
export function navigate(path, { replace = false } = {}) {
  if (location.hash === `#${path}`) route();
  else if (replace) location.replace(`#${path}`);
  else location.hash = path;
}

/** Who is signed in; `again`: the user is known, and only the server's 401 (no session left) forgets them, not a
 * failure to reach it (a dropped connection, a restart), which is no sign-out. */
async function loadUser({ again = false } = {}) {
  try {
    session.user = await api("/api/auth/me");
    tabUser.write(session.user.id);
  } catch (err) {
    if (!again || (err instanceof ApiError && err.status === 401)) session.user = null;
  }
}

// The login, sign-up or join page is replaced in the history: Back does not show a form for a session that
// exists, and an invitation's token (#/join/<token>, still valid while it has uses left) leaves the tab's history.
export async function signedIn() {
  // Signed in over another session (the login page opened without logging out): what the tab kept of that
  // user's answers goes, as a logout would remove it.
  saved.clearAll();
  const previous = tabUser.read();
  await loadUser();
  const theirs = !previous || previous === session.user?.id;
  const next = (theirs && afterSignIn) || "/chats";
  afterSignIn = null;
  navigate(next, { replace: true });
}

// Only the server's 204 (or a 401: no session left) ends the session: after any other answer the cookies
// may still be valid, so the page says so and stays.
async function logout() {
  try {
    await api("/api/auth/logout", { method: "POST" });
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) {
      notify(`You are still logged in: ${err instanceof ApiError ? err.message : "the server could not be reached."}`, "error");
      return;
    }
  }
  signedOut({ logout: true });
}

/** The chats are left for good (another page, the session over): the answer followed and the attachments'
 * uploads stop with them, rather than going on for a page that no longer shows them. */
function leaveChats() {
  chats?.close();
  chats = null;
}

/** The session is over (`logout`: the user ended it): leave the chats and forget what this tab kept of them. A
 * user already on the login, sign-up or join page stays there (a 401 of a request sent before they went there is
 * no reason to move). */
function signedOut({ logout = false } = {}) {
  // The page being opened (its first request, for /api/auth/me, ends here, and the login page it moves to
  // supersedes that route()), or the one the session expired under, is the one to show after the login, to the
  // same user (signedIn); not after a logout.
  afterSignIn = !logout && !AUTH_PAGES.includes(currentSection()) ? currentPath() : null;
  leaveChats();
  session.user = null;
  saved.clearAll();
  document.getElementById("toasts")?.replaceChildren(); // the signed-out user's messages go with the session
  if (!AUTH_PAGES.includes(currentSection())) navigate("/login");
}

function frame() {
  const user = session.user;
  const admin = user.role === "admin";
  const link = (path, text) =>
    h("a", { href: `#${path}`, "aria-current": navCurrent(`#${path}`) ? "page" : null }, text);
  const main = h("main", { id: "main", tabindex: "-1" });
  fill(
    app,
    h(
      "header",
      { class: "topbar" },
      h("a", { class: "brand", href: "#/chats" }, "n8n Chat"),
      h(
        "nav",
        { "aria-label": "Main" },
        link("/chats", "Chats"),
        link("/shares", "Shared"),
        link("/keys", "API keys"),
        admin && [
          link("/admin/agents", "Agents"),
          link("/admin/users", "Users"),
          link("/admin/usage", "Usage"),
          link("/admin/errors", "Errors"),
        ],
      ),
      h("span", { class: "who" }, user.full_name || user.email),
      h("button", { type: "button", class: "ghost", onclick: logout }, "Log out"),
    ),
    main,
  );
  // On a phone the links scroll sideways in their bar (app.css): the page shown is brought into it.
  app.querySelector(".topbar nav [aria-current=page]")?.scrollIntoView({ block: "nearest", inline: "nearest" });
  return main;
}

// Each await is followed by a check that no later route() started meanwhile (the user went elsewhere while
// /api/auth/me or a page's module loaded): the latest one draws the page, an earlier one neither draws nor
// redirects over it.
async function route() {
  const seq = ++routes;
  // A dialog (the share link) sits on <body> and belongs to the page it was opened on: it goes with it (a
  // session ending under it, Back), never staying over the next page or the login form.
  for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
  const current = () => seq === routes;
  const path = currentPath();
  const [, section, ...rest] = path.split("/");
  if (AUTH_PAGES.includes(section)) {
    leaveChats();
    pageTitle({ login: "Log in", signup: "Create a team", join: "Join a team" }[section]);
    fill(app, renderAuth(section, rest.join("/"), { signedIn }));
    app.querySelector("[autofocus]")?.focus(); // `autofocus` alone is not honoured for inserted elements
    return;
  }
  if (!session.user) await loadUser();
  if (!current()) return;
  if (!session.user) {
    afterSignIn = path;
    navigate("/login");
    return;
  }
  if (section === "admin" && session.user.role === "admin") {
    // Read again: another admin (or this one, on the Users page) may have changed the role since; a demoted
    // admin gets the member's top bar and chats, not admin pages whose every call is refused.
    await loadUser({ again: true });
    if (!current()) return;
    leaveChats(); // the frame is drawn again, with the top bar of the role read
    if (session.user?.role !== "admin") {
      navigate(session.user ? "/chats" : "/login");
      return;
    }
    // Loaded on first use: members who are not admins never download the admin pages.
    const { renderAdmin } = await import("./views/admin.js");
    if (!current()) return;
    renderAdmin(frame(), rest[0] || "agents", { user: session.user, navigate });
    keepFocus();
    return;
  }
  if (section === "shares") {
    leaveChats();
    // Loaded on first use, like the admin pages.
    const { renderShares } = await import("./views/shares.js");
    if (!current()) return;
    await renderShares(frame(), rest[0] || null, { user: session.user, navigate });
    if (current()) keepFocus();
    return;
  }
  if (section === "keys") {
    leaveChats();
    const { renderKeys } = await import("./views/keys.js"); // on first use, like the shared chats
    if (!current()) return;
    await renderKeys(frame(), { user: session.user });
    if (current()) keepFocus();
    return;
  }
  if (chats && document.body.contains(chats.root)) markCurrent();
  else {
    leaveChats();
    chats = new ChatsView(frame(), { user: session.user, navigate });
  }
  // #/new: the agent picker; #/new/<agent id>: a new chat with that agent, made on the server by its first message.
  await chats.open(section === "chats" ? rest[0] || null : null, section === "new", section === "new" ? rest[0] || null : null);
  if (current()) keepFocus();
}

/** A page drawn anew (the top bar's link that was pressed went with the old one) leaves the focus nowhere: it goes
 * to the page's main area, so the next Tab continues in the page, not from the top of the document again. */
function keepFocus() {
  if (!document.activeElement || document.activeElement === document.body) document.getElementById("main")?.focus({ preventScroll: true });
}

function markCurrent() {
  for (const a of app.querySelectorAll(".topbar nav a"))
    a.setAttribute("aria-current", navCurrent(a.getAttribute("href")) ? "page" : "false");
}

whenSignedOut(signedOut);
toastsWhen(() => session.user !== null);
window.addEventListener("hashchange", route);
document.body.append(h("div", { id: "toasts", class: "toasts" }));
route();
