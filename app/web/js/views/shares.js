// Chats shared with the team (docs/SHARING.md): the list (`#/shares`) and one shared chat, read-only
// (`#/shares/<id>`), rendered with the same safe Markdown as a chat, with Fork (a new chat of mine) and, for its
// sharer or an admin, Delete; the share dialog, stop sharing, export and import. Loaded on first use, like the
// admin pages.
import { ApiError, api, download, page } from "../api.js";
import { copy, fill, h, notify, pageTitle, when } from "../dom.js";
import { agentById, agentLabel, avatar, messageItem } from "./messages.js";

const PAGE = 30;
const errorText = (err) => (err instanceof ApiError ? err.message : "The server could not be reached.");

// The chat screen's rarely used actions (ChatsView.later): here, loaded on first use, not with every page.

/** Share (or share again: the same link shows the new snapshot) and show the link in a dialog. */
export async function share(view, chat) {
  try {
    const shared = await api(`/api/chats/${chat.id}/share`, { method: "POST" });
    view.sharedIds?.add(chat.id);
    // The page moved on while the share was made (a logout: the login form): its link is not shown there.
    if (document.body.contains(view.root)) showShareLink(chat, shared);
  } catch (err) {
    notify(errorText(err), "error");
  }
}

/** Stop sharing `chat` (a link already gone, unshared elsewhere, is no longer shared either). */
export async function unshare(view, chat) {
  try {
    await api(`/api/chats/${chat.id}/share`, { method: "DELETE" });
    view.sharedIds?.delete(chat.id);
    notify("No longer shared: the link now answers “not found”.");
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) view.sharedIds?.delete(chat.id); // unshared elsewhere
    notify(errorText(err), "error");
  }
}

export async function exportChat(view, chat, format) {
  try {
    await download(`/api/chats/${chat.id}/export?format=${format}`, `chat-${chat.id}.${format === "json" ? "json" : "md"}`);
  } catch (err) {
    notify(errorText(err), "error");
  }
}

export async function exportAll() {
  try {
    await download("/api/chats/export", "chats.jsonl");
  } catch (err) {
    notify(errorText(err), "error");
  }
}

/** What an import sends: JSON Lines (the "export all" file) or one JSON chat, told by the file's name. */
const importType = (file) => (/\.(jsonl|ndjson)$/i.test(file.name) ? "application/x-ndjson" : "application/json");

/** Import an export (one chat, or JSON Lines): all or nothing; the server's refusal names the problem. */
export async function importChats(view, file) {
  try {
    const imported = await api("/api/chats/import", { method: "POST", payload: file, headers: { "Content-Type": importType(file) } });
    notify(imported.length === 1 ? "Imported 1 chat." : `Imported ${imported.length} chats.`);
    await view.loadChats();
    if (imported.length) view.navigate(`/chats/${imported[0].id}`);
  } catch (err) {
    notify(`Nothing was imported: ${errorText(err)}`, "error");
  }
}

/** The link of a chat just shared (or shared again: the same link shows the new snapshot), in a dialog. */
export function showShareLink(chat, share) {
  const link = `${location.origin}${location.pathname}#/shares/${share.id}`;
  const field = h("input", { readonly: true, value: link, "aria-label": "Link to the shared chat" });
  const dialog = h(
    "dialog",
    { class: "share-dialog", "aria-labelledby": "share-title" },
    h("h2", { id: "share-title" }, "Shared with your team"),
    h("p", { class: "muted" }, `Every member of your team can read this snapshot of "${chat.title || "New chat"}" (${share.message_count} messages) and fork it. Messages you write later appear once you share again.`),
    field,
    h(
      "div",
      { class: "row" },
      h("button", { type: "button", onclick: () => copy(link, field) }, "Copy link"),
      h("a", { class: "button secondary", href: `#/shares/${share.id}` }, "Open"),
      h("button", { type: "button", class: "ghost", onclick: () => dialog.close() }, "Close"),
    ),
  );
  dialog.addEventListener("close", () => dialog.remove());
  dialog.addEventListener("click", (event) => event.target instanceof HTMLAnchorElement && dialog.close());
  document.body.append(dialog);
  dialog.showModal();
  field.select();
}

export async function renderShares(main, shareId, { user, navigate }) {
  const root = h("div", { class: "shares" });
  main.append(root);
  const agents = new Map();
  try {
    for (const agent of await api("/api/agents")) agents.set(agent.id, agent);
  } catch {
    // names and avatars are a nicety: initials stand in
  }
  const reads = new Map(); // deactivated agents, read once each (agentById)
  const agentOf = (id) => agentById(id, agents, reads);
  const context = { root, agentOf, user, navigate };
  if (shareId) await showShare(context, shareId);
  else await showList(context);
}

async function showList({ root, agentOf }) {
  const list = h("ul", { class: "share-list", "aria-label": "Shared chats" });
  const more = h("button", { type: "button", class: "ghost more", hidden: true }, "Load more");
  let shown = 0;
  // Disabled while a page loads: a second click would ask for the same offset and list that page twice.
  const load = async () => {
    // Disabling the button drops its focus: a keyboard user goes on from the first share the page adds instead.
    const focusAdded = document.activeElement === more;
    more.disabled = true;
    try {
      const { items, total } = await page("/api/shares", { limit: PAGE, offset: shown });
      if (!items.length && !shown) list.append(h("li", { class: "muted" }, "Nothing is shared in your team yet. Share a chat from its ⋯ menu."));
      // A deactivated agent is not in the members' list: read by id, so its avatar and name show.
      const pageAgents = await Promise.all(items.map((share) => agentOf(share.agent_id)));
      for (const [index, share] of items.entries()) {
        const agent = pageAgents[index];
        const row = list.appendChild(
          h(
            "li",
            {},
            h(
              "a",
              { href: `#/shares/${share.id}`, class: "chat-link" },
              avatar(agent),
              h("span", { class: "chat-title", title: share.title || "New chat" }, share.title || "New chat"),
              h("span", { class: "muted" }, ` ${agentLabel(agent)} · ${share.message_count} messages · ${when(share.updated_at)}`),
            ),
          ),
        );
        if (focusAdded && index === 0) row.querySelector("a").focus();
      }
      shown += items.length;
      more.hidden = shown >= total;
    } catch (err) {
      notify(errorText(err), "error");
    } finally {
      more.disabled = false;
      // Nothing added (the page could not be read): back on the button, to press again.
      if (focusAdded && document.activeElement === document.body && !more.hidden) more.focus();
    }
  };
  more.addEventListener("click", load);
  pageTitle("Shared with team");
  fill(root, h("h1", {}, "Shared with team"), list, more);
  await load();
}

async function showShare({ root, agentOf, user, navigate }, shareId) {
  let share;
  try {
    share = await api(`/api/shares/${encodeURIComponent(shareId)}`);
  } catch (err) {
    const missing = err.status === 404 || err.status === 422;
    pageTitle(missing ? "Shared chat not found" : "Shared chat unavailable");
    fill(
      root,
      h("p", { class: "error center", role: "alert" }, missing ? "This shared chat does not exist or is no longer shared." : errorText(err)),
      h("p", { class: "center" }, h("a", { href: "#/shares" }, "All shared chats")),
    );
    return;
  }
  const agent = await agentOf(share.agent_id);
  // A fork continues with the share's agent, which the API requires active (409 otherwise): Fork is disabled
  // with the reason beside it, rather than offered only to be refused. An agent deactivated after the page
  // read it gets the same treatment from the API's refusal.
  const forkWhy = h("p", { id: "fork-why", class: "muted fork-why", role: "status", hidden: true });
  const fork = h("button", { type: "button", "aria-describedby": "fork-why" }, "Fork into my chats");
  const noFork = (reason) => {
    fork.disabled = true;
    forkWhy.textContent = reason;
    forkWhy.hidden = false;
  };
  if (!share.agent_id) noFork("Fork is unavailable: this chat's agent was removed, and a fork needs an agent to continue with.");
  else if (agent?.is_active === false)
    noFork(`Fork is unavailable: ${agent.name} was deactivated, and a fork continues with it. An admin can reactivate it.`);
  fork.addEventListener("click", async () => {
    fork.disabled = true;
    try {
      const chat = await api(`/api/shares/${share.id}/fork`, { method: "POST" });
      navigate(`/chats/${chat.id}`);
    } catch (err) {
      notify(errorText(err), "error");
      // 409: the agent is inactive or gone, which a retry does not change.
      if (err instanceof ApiError && err.status === 409) noFork(`Fork is unavailable: ${err.message}`);
      else fork.disabled = false;
    }
  });
  const mine = share.user_id === user.id || user.role === "admin";
  const remove = h("button", { type: "button", class: "secondary", hidden: !mine }, "Delete share");
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete the share of "${share.title || "New chat"}"? Its link stops working.`)) return;
    try {
      await api(`/api/shares/${share.id}`, { method: "DELETE" });
      navigate("/shares");
    } catch (err) {
      notify(errorText(err), "error");
    }
  });
  const messages = h("ol", { class: "messages", "aria-label": "Messages" });
  // Read-only: no edit, regenerate or rating. Files download through the share's own copies (the share's ids).
  const fileUrl = (file) => `/api/shares/${share.id}/files/${file.id}`;
  const actions = {
    readOnly: true,
    agent,
    fileUrl,
    download: (file) => download(fileUrl(file), file.filename).catch((err) => notify(errorText(err), "error")),
  };
  for (const message of share.messages) messages.append(messageItem(message, actions));
  pageTitle(share.title || "New chat");
  fill(
    root,
    h(
      "header",
      { class: "chat-header" },
      h("a", { class: "ghost button", href: "#/shares", "aria-label": "All shared chats" }, "‹"),
      avatar(agent),
      h(
        "div",
        { class: "chat-heading" },
        h("h1", {}, share.title || "New chat"),
        h("span", { class: "muted" }, `${agentLabel(agent)} · shared ${when(share.updated_at)} · read-only`),
      ),
      h("div", { class: "row" }, fork, remove),
    ),
    forkWhy,
    messages,
  );
}
