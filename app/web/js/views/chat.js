// The chat screen: the chat list (search, pin, archive, rename, delete, load more, export all, import) and the
// chat pane (agent picker, messages, composer with attachments, streaming, stop, resume after reload, edit,
// regenerate, branches, feedback). Each chat's menu (in the list and in the chat's header) shares and exports it.
import { ApiError, api, download, page } from "../api.js";
import { composing, fill, h, notify, pageTitle, randomId, touchScreen } from "../dom.js";
import { Generation, NotSent, drafts, online, pendingUploads, saved, stopGeneration, waiting } from "../stream.js";
import { Attachments } from "./attachments.js";
import { agentById, agentLabel, avatar, messageItem, setContent, stepItem, waitText } from "./messages.js";

const PAGE = 30;
const PINNED_MAX = 100; // the most the API lists at once
const LAST = 50; // messages shown when a chat opens; "Show earlier" doubles it
const SHARES_PAGE = 100; // the most GET /api/shares lists at once
const SHARES_READ = 10; // pages read to learn which chats are shared; past that, menus offer both actions

/** The key of a chat's draft and pending files: its id, or for a chat not made yet (#/new/<agent id>) its agent's. */
const unsavedKey = (agentId) => `new-${agentId}`;
const draftKey = (chat) => chat.id ?? unsavedKey(chat.agent_id);
const errorText = (err) => (err instanceof ApiError ? err.message : "The server could not be reached.");

export class ChatsView {
  constructor(main, { user, navigate }) {
    this.navigate = navigate;
    this.userId = user.id; // whose sends waiting for the network this tab may give back (`waiting`)
    this.agents = new Map(); // the active agents (the picker's)
    this.agentReads = new Map(); // deactivated agents read by id (agentById), their promises
    this.otherAgents = new Map(); // and those read, by id
    // Failed answers whose n8n asked to wait (the error event's retry_after): id -> when the wait ends (ms).
    // Read when a message is drawn; no timer, so nothing keeps a chat that was left alive.
    this.retryAt = new Map();
    this.pendingFiles = new Map(); // chat id -> its Attachments (files uploaded, not yet sent)
    this.chatId = null;
    // A chat not made yet (#/new/<agent id>): its agent's id. The chat is made by its first message (or its first
    // file, which the server keeps in a chat): picking an agent and leaving stores nothing.
    this.newAgentId = null;
    this.creations = new Map(); // agent id -> the POST /api/chats under way for its new chat
    this.generation = null;
    this.unsent = null; // {chatId, body (JSON), key} of the send that could not reach the server, to reuse its key
    // Read again when the network is back: the chat (its id) and the list whose reading got no HTTP answer.
    this.unread = null;
    this.listUnread = false;
    this.onOnline = () => {
      if (this.listUnread) this.loadChats();
      if (this.unread) this.readAgain(this.unread);
    };
    window.addEventListener("online", this.onOnline);
    // A chat's ⋯ menu (a <details>) stays open until told otherwise: a click anywhere else closes it.
    this.closeMenus = (event) => {
      for (const menu of this.root.querySelectorAll("details.menu[open]")) if (!menu.contains(event.target)) menu.open = false;
    };
    document.addEventListener("click", this.closeMenus);
    this.query = { q: "", archived: false, shown: 0 };
    this.listSeq = 0; // the latest loadChats of a new list
    this.list = h("ul", { class: "chat-list", "aria-label": "Chats" });
    this.more = h("button", { type: "button", class: "ghost more", hidden: true, onclick: () => this.loadChats(true) }, "Load more");
    const search = h("input", { type: "search", placeholder: "Search chats", "aria-label": "Search chats" });
    let timer;
    search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        this.query.q = search.value.trim();
        this.loadChats();
      }, 250);
    });
    const importInput = h("input", { type: "file", accept: ".json,.jsonl,.ndjson,application/json", hidden: true, "aria-label": "Chats to import" });
    importInput.addEventListener("change", () => {
      const [file] = importInput.files;
      importInput.value = "";
      if (file) this.later("importChats", file);
    });
    const archived = h("input", { type: "checkbox", id: "show-archived" });
    archived.addEventListener("change", () => {
      this.query.archived = archived.checked;
      this.loadChats();
    });
    this.sidebar = h(
      "aside",
      { class: "sidebar" },
      h("a", { class: "button new-chat", href: "#/new" }, "+ New chat"),
      search,
      h("label", { class: "check" }, archived, " Archived"),
      this.list,
      this.more,
      h(
        "div",
        { class: "sidebar-tools" },
        h("a", { href: "#/shares" }, "Shared with team"),
        h("button", { type: "button", class: "ghost", onclick: () => this.later("exportAll") }, "Export all"),
        h("button", { type: "button", class: "ghost", onclick: () => importInput.click() }, "Import…"),
        importInput,
      ),
    );
    this.pane = h("section", { class: "pane", "aria-label": "Chat" });
    this.root = h("div", { class: "chats" }, this.sidebar, this.pane);
    main.append(this.root);
    this.agentsRead = this.loadAgents();
    this.ready = Promise.all([this.agentsRead, this.loadChats()]);
    this.sharedIds = undefined; // my chats that are shared: a Set, null when unknown, undefined while read
    this.sharedRead = this.loadShared();
  }

  leave() {
    this.generation?.leave();
    this.generation = null;
  }

  /** The view is dropped (a logout, another page): what `leave` does, and the pending files' uploads stop. */
  close() {
    this.closed = true;
    this.leave();
    window.removeEventListener("online", this.onOnline);
    document.removeEventListener("click", this.closeMenus);
    for (const attachments of this.pendingFiles.values()) attachments.close();
    this.pendingFiles.clear();
  }

  async loadAgents() {
    try {
      for (const agent of await api("/api/agents")) this.agents.set(agent.id, agent);
    } catch (err) {
      notify(errorText(err), "error");
    }
  }

  /**
   * Which chats are shared, so a chat's menu offers only the action that applies. The API says it in the team's
   * shares list only (a share names its chat), read here once per view and kept up to date by this page's own
   * share and unshare. A team with more shares than SHARES_READ pages, or a list that cannot be read: unknown,
   * and the menus offer both actions, as a share made or removed in another tab may still make one of them moot.
   */
  async loadShared() {
    const ids = new Set();
    try {
      for (let offset = 0, total = 1; offset < total; offset += SHARES_PAGE) {
        if (offset >= SHARES_PAGE * SHARES_READ) {
          this.sharedIds = null;
          return;
        }
        const { items, total: all } = await page("/api/shares", { limit: SHARES_PAGE, offset });
        for (const share of items) if (share.chat_id) ids.add(share.chat_id);
        total = items.length ? all : 0;
      }
      this.sharedIds = ids;
    } catch {
      this.sharedIds = null;
    }
  }

  /** true, false, or null when it is not known whether the chat is shared. */
  isShared(chatId) {
    return this.sharedIds ? this.sharedIds.has(chatId) : null;
  }

  /** A chat's agent as known now: active, or deactivated and already read (`agentOf`). */
  knownAgent(id) {
    return this.agents.get(id) ?? this.otherAgents.get(id);
  }

  /** A chat's agent, a deactivated one read by id (members list only active agents), so its name shows. */
  async agentOf(id) {
    const agent = await agentById(id, this.agents, this.agentReads);
    if (agent && !this.agents.has(id)) this.otherAgents.set(id, agent);
    return agent;
  }

  // --- the list ---------------------------------------------------------------------------------

  // The API lists chats by activity only; the pinned ones (at most PINNED_MAX) are fetched apart and shown
  // first, then the others page by page. Only the latest list asked for is shown: an answer to an older
  // search (or a page of the list it replaced) that arrives late is dropped.
  async loadChats(more = false) {
    // Load more is disabled while its page loads: a second click would ask for the same offset and list that
    // page twice.
    if (more && this.more.disabled) return;
    const seq = more ? this.listSeq : ++this.listSeq;
    const offset = more ? this.query.shown : 0;
    const filter = { q: this.query.q, archived: this.query.archived };
    // Disabling the button drops its focus: a keyboard user goes on from the first chat the page adds instead.
    const focusAdded = more && document.activeElement === this.more;
    if (more) this.more.disabled = true;
    try {
      const pinned = more ? null : await page("/api/chats", { ...filter, pinned: true, limit: PINNED_MAX });
      if (seq !== this.listSeq) return;
      const { items, total } = await page("/api/chats", { ...filter, pinned: false, limit: PAGE, offset });
      if (seq !== this.listSeq) return;
      if (!more) {
        this.list.replaceChildren();
        for (const chat of pinned.items) this.list.append(this.chatRow(chat));
        if (!pinned.items.length && !items.length) {
          this.list.append(h("li", { class: "muted" }, this.query.q ? "No chat matches." : this.query.archived ? "No archived chats." : "No chats yet."));
        }
      }
      const rows = items.map((chat) => this.chatRow(chat));
      this.list.append(...rows);
      if (focusAdded) rows[0]?.querySelector(".chat-link").focus();
      this.query.shown = offset + items.length;
      this.more.hidden = this.query.shown >= total;
      if (!more) this.listUnread = false;
    } catch (err) {
      if (seq !== this.listSeq) return;
      // A failed "Load more" keeps the pages shown and its button (to click again): only a whole list read is
      // read again when the network is back.
      if (!more) this.listUnread = !(err instanceof ApiError);
      notify(errorText(err), "error");
    } finally {
      if (more) this.more.disabled = false;
      // Nothing added (the page could not be read): back on the button, to press again.
      if (focusAdded && document.activeElement === document.body && !this.more.hidden) this.more.focus();
    }
  }

  chatRow(chat) {
    const agent = this.knownAgent(chat.agent_id);
    const title = chat.title || "New chat";
    const face = avatar(agent);
    const link = h(
      "a",
      { href: `#/chats/${chat.id}`, class: "chat-link", "aria-current": chat.id === this.chatId ? "page" : null },
      face,
      h("span", { class: "chat-title", title }, chat.pinned ? h("span", { class: "pin", title: "Pinned" }, "★ ") : "", title),
    );
    // Not known yet (the agents still being read) or deactivated: the avatar once it is known.
    if (!agent)
      this.agentsRead.then(() => this.agentOf(chat.agent_id)).then((found) => found && face.isConnected && face.replaceWith(avatar(found)));
    const menu = this.chatMenu(chat, [
      [chat.pinned ? "Unpin" : "Pin", () => this.updateChat(chat.id, { pinned: !chat.pinned })],
      [chat.archived ? "Unarchive" : "Archive", () => this.updateChat(chat.id, { archived: !chat.archived })],
      ["Rename", () => this.rename(row, chat)],
      ["Delete", () => this.remove(chat)],
    ]);
    const row = h("li", { "data-id": chat.id, class: chat.id === this.chatId ? "current" : "" }, link, menu);
    return row;
  }

  /**
   * A chat's menu (a `<details>`, so the keyboard opens it): the given items, then share and export. Sharing
   * offers what applies, as known when the menu opens: "Share with team" for a chat not shared, "Update share"
   * (a new snapshot under the same link, and the link again) and "Stop sharing" for a shared one.
   */
  chatMenu(chat, items) {
    const title = chat.title || "New chat";
    const list = h("div", { class: "menu-items" });
    const summary = h("summary", { "aria-label": `Actions for ${title}` }, "⋯");
    const menu = h("details", { class: "menu" }, summary, list);
    // Escape closes it, back on its ⋯ (a click elsewhere closes it too: `closeMenus`).
    menu.addEventListener("keydown", (event) => {
      if (event.key !== "Escape" || !menu.open) return;
      event.preventDefault();
      menu.open = false;
      summary.focus();
    });
    // An item's action draws the list (or the header) again, taking the menu with it: the focus goes to the same
    // chat's ⋯ as drawn again, unless the action put it somewhere (the rename's field, the share dialog).
    // A chat that left the list (archived, deleted): the ⋯ of the chat now in its place, else of the one before.
    const act = async (handler) => {
      menu.open = false;
      summary.focus();
      const inList = this.list.contains(menu);
      const at = inList ? [...this.list.children].indexOf(menu.closest("li")) : -1;
      await handler();
      if (document.activeElement && document.activeElement !== document.body) return;
      const rows = this.list.children;
      const again = inList
        ? this.list.querySelector(`li[data-id="${chat.id}"] summary`) || (rows[at] || rows[at - 1])?.querySelector("summary")
        : this.header?.querySelector("summary");
      again?.focus();
    };
    const fillItems = () => {
      const reading = this.sharedIds === undefined; // a moment: the items follow once the shares are read
      const shared = this.isShared(chat.id);
      fill(
        list,
        [
          ...items,
          !reading && shared !== true && ["Share with team", () => this.later("share", chat)],
          !reading && shared === true && ["Update share", () => this.later("share", chat)],
          !reading && shared !== false && ["Stop sharing", () => this.later("unshare", chat)],
          ["Export as JSON", () => this.later("exportChat", chat, "json")],
          ["Export as Markdown", () => this.later("exportChat", chat, "markdown")],
        ]
          .filter(Boolean)
          .map(([text, handler]) =>
            h("button", { type: "button", class: "ghost", onclick: () => act(handler) }, text),
          ),
      );
    };
    fillItems();
    // Opened before the shares were read: the items once they are (they are then known for every menu).
    menu.addEventListener("toggle", () => {
      if (!menu.open) return;
      fillItems();
      if (this.sharedIds === undefined) this.sharedRead.then(() => menu.open && fillItems());
    });
    return menu;
  }

  // --- sharing, export, import ------------------------------------------------------------------

  /** Sharing, an export, an import: rarely used, so in shares.js, loaded on first use. */
  async later(name, ...args) {
    try {
      await (await import("./shares.js"))[name](this, ...args);
    } catch (err) {
      notify(errorText(err), "error"); // the module could not be loaded
    }
  }

  async updateChat(chatId, changes) {
    try {
      const chat = await api(`/api/chats/${chatId}`, { method: "PUT", body: changes });
      await this.loadChats();
      if (chatId === this.chatId) this.renderHeader(chat);
      return chat;
    } catch (err) {
      notify(errorText(err), "error");
      return null;
    }
  }

  rename(row, chat) {
    const input = h("input", { class: "rename", "aria-label": "Chat title", maxlength: 200 });
    input.value = chat.title || "";
    // The list is drawn again once the title is saved (or the rename cancelled): the focus goes back to the chat's
    // ⋯ menu, where the rename began, not to the page's start.
    const back = () => this.list.querySelector(`li[data-id="${chat.id}"] summary`)?.focus();
    const form = h(
      "form",
      {
        onsubmit: async (event) => {
          event.preventDefault();
          if (await this.updateChat(chat.id, { title: input.value.trim() || null })) back();
        },
      },
      input,
    );
    input.addEventListener("keydown", (event) => event.key === "Escape" && this.loadChats().then(back));
    row.replaceChildren(form);
    input.focus();
    input.select();
  }

  async remove(chat) {
    if (!confirm(`Delete "${chat.title || "New chat"}" and all its messages?`)) return;
    try {
      await api(`/api/chats/${chat.id}`, { method: "DELETE" });
      saved.clear(chat.id);
      waiting.clear(chat.id);
      drafts.clear(chat.id);
      pendingUploads.clear(chat.id);
      if (chat.id === this.chatId) this.navigate("/new");
      await this.loadChats();
    } catch (err) {
      notify(errorText(err), "error");
    }
  }

  // --- the pane ---------------------------------------------------------------------------------

  /**
   * Show a chat, or (null) the agent picker; `picker` shows it on a phone too, where it replaces the list.
   * `agentId` (with no chat): a new chat with that agent, not made on the server until its first message.
   */
  async open(chatId, picker = false, agentId = null) {
    await this.ready;
    this.root.classList.toggle("has-chat", Boolean(chatId) || picker);
    if (chatId === this.chatId && chatId) return;
    if (!chatId && agentId && agentId === this.newAgentId) return; // the same new chat: what is typed stays
    this.leave();
    this.chatId = chatId;
    this.newAgentId = chatId ? null : agentId;
    this.chat = null; // the previous chat's messages say nothing of this one (resumeIfRunning)
    // Pending files stay with their chat while the page lives: moving to another chat and back keeps them. A new
    // chat's first file makes the chat (the server keeps files in a chat), then goes on uploading into it.
    const key = chatId ?? (agentId ? unsavedKey(agentId) : null);
    if (key && !this.pendingFiles.has(key)) this.pendingFiles.set(key, new Attachments(chatId, chatId ? null : () => this.ensureChat(agentId), this.userId));
    this.attachments = key ? this.pendingFiles.get(key) : null;
    for (const row of this.list.children) {
      row.classList.toggle("current", row.dataset.id === chatId);
      row.querySelector(".chat-link")?.setAttribute("aria-current", row.dataset.id === chatId ? "page" : "false");
    }
    if (!chatId && agentId) return this.openNew(agentId);
    if (!chatId) {
      pageTitle(picker ? "New chat" : "Chats");
      this.renderPicker();
      // Asked for (+ New chat): the first agent takes the focus, so the keyboard does not Tab through the whole
      // chat list to reach the picker. The chats' page shown by default (after the login) leaves it as it is.
      if (picker) this.pane.querySelector(".agent-card")?.focus();
      return;
    }
    this.last = LAST;
    pageTitle(null); // the chat's title once it is read (renderHeader)
    if (!(await this.reload())) return; // not on a chat that could not be read (404...)
    this.giveBackWaiting();
    this.resumeIfRunning();
  }

  /** A new chat with the agent, shown as an empty chat (its draft kept, files attachable) until its first message. */
  openNew(agentId) {
    const agent = this.agents.get(agentId); // active agents only: a chat cannot be made with another
    if (!agent) {
      pageTitle("Agent not found");
      fill(
        this.pane,
        h(
          "div",
          { class: "center" },
          h("p", { class: "error", role: "alert" }, "This agent does not exist or is not active: pick another one."),
          h("a", { href: "#/new" }, "Start a chat"),
        ),
      );
      return;
    }
    this.render({ id: null, agent_id: agentId, title: null, messages: [], has_more: false });
    this.giveBackWaiting();
  }

  /**
   * The new chat on the server (its first message is being sent, or its first file attached): made once, then it
   * takes the new chat's place: its address replaces #/new/<agent id> in the history (Back does not come to an
   * empty new chat again), the draft and files are its own, the list shows it. Resolves to its id.
   */
  ensureChat(agentId) {
    // Per agent, not per page shown: a file attached just before another chat was opened goes to its own new chat.
    let creation = this.creations.get(agentId);
    if (!creation) {
      creation = api("/api/chats", { method: "POST", body: { agent_id: agentId } }).then(
        (chat) => this.adopt(chat, agentId),
        (err) => {
          this.creations.delete(agentId); // to try again with the next send
          throw err;
        },
      );
      this.creations.set(agentId, creation);
    }
    return creation;
  }

  adopt(chat, agentId) {
    this.creations.delete(agentId); // the agent's next new chat is another one
    const key = unsavedKey(agentId);
    const attachments = this.pendingFiles.get(key);
    this.pendingFiles.delete(key);
    if (attachments && !this.closed) {
      attachments.chatId = chat.id;
      this.pendingFiles.set(chat.id, attachments);
    }
    const draft = drafts.read(key);
    drafts.clear(key);
    if (draft && !this.closed) drafts.write(chat.id, draft);
    if (this.closed) return chat.id;
    if (this.newAgentId === agentId && !this.chatId) {
      this.chatId = chat.id;
      this.newAgentId = null;
      this.last = LAST;
      history.replaceState(history.state, "", `#/chats/${chat.id}`); // no hashchange: the chat stays as it is
      this.render({ ...chat, messages: chat.messages ?? [], has_more: false });
    }
    this.loadChats();
    return chat.id;
  }

  /** A new chat's first message: the chat made (once), then the message sent in it. Offline, it waits for the
   * network as a send in a made chat does (waitFirst); another error leaves it in the box. */
  async sendFirst(body, files) {
    const agentId = this.newAgentId;
    const key = unsavedKey(agentId);
    for (let waited = false; ; ) {
      try {
        const id = await this.ensureChat(agentId);
        if (id !== this.chatId || this.generation) return; // Enter pressed twice: sent by the first
        waiting.clear(key);
        if (this.input.value === body.content) this.input.value = ""; // its draft, given back by adopt()
        return this.stream(body, { appendUser: body.content, files });
      } catch (err) {
        if (this.newAgentId !== agentId || this.generation) return;
        if (err instanceof ApiError || navigator.onLine !== false) return waited ? this.giveBack(body, null, errorText(err)) : notify(errorText(err), "error");
        const wait = this.waitFirst(key, body, files);
        waited = true;
        await online(wait.aborter.signal);
        if (wait.left) return;
        this.generation = null;
        this.live.user.remove();
        this.live.item.remove();
        this.setBusy(false);
      }
    }
  }

  /** The first message shown waiting, Stop to give it back; its Generation sends nothing, a chat left ends it. */
  waitFirst(key, body, files) {
    const view = { request: { body, key: null }, send: { user: this.userId, body, key: null, files } };
    view.user = messageItem({ id: null, role: "user", content: body.content, status: "complete", sibling_ids: [], files }, this.actions());
    this.messages.append(view.user);
    view.item = this.liveItem();
    this.input.value = ""; // its draft stays
    this.live = view;
    this.generation = new Generation(null, this.handlers(key, view));
    this.generation.waiting = true;
    this.generation.handlers.onWaiting(true);
    this.setBusy(true);
    this.scrollDown();
    return this.generation;
  }

  renderPicker() {
    const agents = [...this.agents.values()];
    fill(
      this.pane,
      h(
        "div",
        { class: "picker" },
        h("h1", {}, "Start a chat"),
        agents.length
          ? h(
              "ul",
              { class: "agents", "aria-label": "Agents" },
              agents.map((agent) =>
                h(
                  "li",
                  {},
                  h(
                    "button",
                    { type: "button", class: "agent-card", onclick: () => this.startChat(agent) },
                    avatar(agent, "large"),
                    h("strong", {}, agent.name),
                    agent.description && h("span", { class: "muted" }, agent.description),
                  ),
                ),
              ),
            )
          : h("p", { class: "muted" }, "No agent yet: an admin adds one under Agents."),
      ),
    );
  }

  // Nothing is made on the server yet: the new chat is, by its first message (ensureChat). A double click opens
  // the same new chat twice, which keeps it as it is.
  startChat(agent) {
    this.navigate(`/new/${agent.id}`);
  }

  /** Read the chat again and show it; false when it could not be read (or another chat opened meanwhile). */
  async reload() {
    const chatId = this.chatId;
    let chat;
    try {
      chat = await api(`/api/chats/${chatId}?last=${this.last}`);
    } catch (err) {
      if (chatId !== this.chatId) return false;
      if (err instanceof ApiError) {
        // A 422 is an address that is no chat id at all (mistyped, cut): to a reader, a chat that does not exist.
        const missing = err.status === 404 || err.status === 422;
        pageTitle(missing ? "Chat not found" : "Chat unavailable"); // not the bare app name, as if nothing were open
        fill(this.pane, h("p", { class: "error center", role: "alert" }, missing ? "This chat does not exist." : errorText(err)));
        return false;
      }
      // No HTTP answer (offline, the server down): read again when the network is back, or on request.
      this.unread = chatId;
      pageTitle("Chat unavailable");
      fill(
        this.pane,
        h(
          "div",
          { class: "error center", role: "alert" },
          h("p", {}, "The chat could not be read: the server could not be reached. It is read again when the network is back."),
          h("button", { type: "button", onclick: () => this.readAgain(chatId) }, "Try again"),
        ),
      );
      return false;
    }
    if (chatId !== this.chatId) return false;
    if (this.unread === chatId) this.unread = null; // read now: the network's return has nothing left to read
    await this.agentOf(chat.agent_id); // at once for an active agent; a deactivated one is read once
    if (chatId !== this.chatId) return false;
    this.render(chat);
    return true;
  }

  /** The chat whose reading got no HTTP answer, read again (the network is back, or "Try again"), then what
   * opening it does after reading: a send left waiting given back, a running answer followed. Not while this tab
   * still sends or follows in it ("Show earlier messages" clicked offline): that send goes on, not given back,
   * and that answer is followed once. */
  async readAgain(chatId) {
    if (chatId !== this.chatId || this.unread !== chatId) return;
    this.unread = null;
    if (!(await this.reload()) || this.generation) return;
    this.giveBackWaiting();
    this.resumeIfRunning();
  }

  render(chat) {
    // What is typed stays when the same chat is shown again (an answer's end, a version); a chat opened gets
    // its own draft back (`drafts`), never another chat's.
    // A new chat not made yet keeps its draft under its agent's id (draftKey).
    const key = draftKey(chat);
    const same = Boolean(this.chat) && draftKey(this.chat) === key;
    const draft = same ? this.input?.value || "" : this.draftOf(key);
    // The message box takes the focus when the chat opens, or when the focus was in the pane (or nowhere),
    // never from the list, the search or the menus.
    const active = document.activeElement;
    const focus = !same || !active || active === document.body || this.pane.contains(active);
    // The same chat drawn again (an answer's end, a version chosen): a reader scrolled up stays where they were.
    const kept = same && this.messages?.isConnected && !this.atEnd() ? this.messages.scrollTop : null;
    this.chat = chat;
    this.agent = this.knownAgent(chat.agent_id);
    this.header = h("header", { class: "chat-header" });
    this.messages = h("ol", { class: "messages", "aria-label": "Messages" });
    this.input = h("textarea", {
      rows: 2,
      placeholder: touchScreen() ? "Message" : "Message (Enter to send, Shift+Enter for a new line)",
      "aria-label": "Message",
      maxlength: 32000,
    });
    this.input.value = draft;
    this.input.addEventListener("input", () => this.keepDraft(key));
    this.input.addEventListener("keydown", (event) => {
      // On a touch screen (a coarse pointer: a phone's keyboard has no Shift+Enter) Enter adds a line and Send sends.
      if (event.key === "Enter" && !event.shiftKey && !composing(event) && !touchScreen()) {
        event.preventDefault();
        this.composer.requestSubmit();
      }
    });
    this.sendButton = h("button", { type: "submit", class: "send" }, "Send");
    this.stopButton = h("button", { type: "button", class: "stop danger", hidden: true, onclick: () => this.stop() }, "Stop");
    this.composer = h(
      "form",
      {
        class: "composer",
        onsubmit: (event) => {
          event.preventDefault();
          const content = this.input.value;
          // One answer at a time in a chat (the API refuses a second with 409), this tab's or one another tab
          // started that this tab follows: the text stays in the box, and the page says why nothing was sent.
          if (this.generation) {
            if (content.trim()) notify("An answer is still being written in this chat: send your message when it ends, or press Stop.");
            return;
          }
          const files = this.attachments.ready();
          if (files === null) return notify("Wait until the files are uploaded, or remove them.", "error");
          if (!content.trim()) {
            if (files.length) notify("Write a message to send with the files.", "error");
            return;
          }
          const body = files.length ? { content, file_ids: files.map((f) => f.id) } : { content };
          if (!this.chatId) return this.sendFirst(body, files);
          performance.mark("send");
          this.input.value = "";
          this.stream(body, { appendUser: content, files });
        },
      },
      this.attachments.element(),
      this.input,
      h("div", { class: "composer-buttons" }, this.attachments.button(), this.sendButton, this.stopButton),
    );
    this.attachments.accept(this.composer, this.input);
    this.renderHeader(chat);
    if (chat.has_more)
      this.messages.append(
        h("li", { class: "earlier" }, h("button", { type: "button", class: "ghost", onclick: () => this.showEarlier() }, "Show earlier messages")),
      );
    // An answer being written keeps its elements (its handlers write into them), at the end of the branch.
    const live = this.generation ? [this.live.user, this.live.item].filter(Boolean) : [];
    const liveIds = new Set(live.map((item) => item.dataset.id).filter(Boolean));
    // Before its `start` event the live answer has no id yet: the running answer the server already stored
    // (with the question this page sent, if it sent one) is that answer, drawn once, by the live elements.
    const stored = chat.messages.at(-1);
    if (this.generation && !this.live.item.dataset.id && stored?.role === "assistant" && stored.status === "streaming") {
      liveIds.add(stored.id);
      if (this.live.user) liveIds.add(stored.parent_id);
    }
    for (const message of chat.messages) if (!liveIds.has(message.id)) this.messages.append(messageItem(message, this.actions()));
    if (!chat.id) this.messages.append(h("li", { class: "muted center" }, "Your first message starts the chat."));
    this.messages.append(...live);
    fill(this.pane, this.header, this.messages, this.composer);
    if (this.generation) this.setBusy(true); // the new buttons: Stop, not Send
    if (kept === null) this.scrollDown();
    else this.messages.scrollTop = kept;
    if (focus) this.input.focus({ preventScroll: kept !== null });
  }

  /**
   * The chat's draft kept in the tab, if this user wrote it (another user's goes). One whose send was on its way
   * when the page left it (`key`: a reload before the server answered) keeps that send's Idempotency-Key: sent
   * again, a message that did reach the server is answered, not stored twice.
   */
  draftOf(chatId) {
    const kept = drafts.read(chatId);
    if (kept?.user !== this.userId || typeof kept.text !== "string") {
      if (kept) drafts.clear(chatId);
      return "";
    }
    if (kept.key) this.unsent = { chatId, body: JSON.stringify({ content: kept.text }), key: kept.key };
    return kept.text;
  }

  /** What the box holds is the chat's draft, kept on each input (cheap: one small sessionStorage write); an
   * empty box keeps none. `key`: the box holds a send given back, which keeps its Idempotency-Key (draftOf). */
  keepDraft(chatId, key = undefined) {
    if (this.input.value) drafts.write(chatId, { user: this.userId, text: this.input.value, key });
    else drafts.clear(chatId);
  }

  renderHeader(chat) {
    if (!this.header) return;
    if (chat.id === this.chatId) pageTitle(chat.title || "New chat");
    fill(
      this.header,
      h("a", { class: "back ghost button", href: "#/chats", "aria-label": "Back to the chat list" }, "‹"),
      avatar(this.agent),
      h("div", { class: "chat-heading" }, h("h1", { title: chat.title || null }, chat.title || "New chat"), h("span", { class: "muted agent-name", title: agentLabel(this.agent) }, agentLabel(this.agent))),
      chat.id && this.chatMenu(chat, []), // nothing to share or export before the first message
    );
  }

  actions() {
    return {
      agent: this.agent,
      busy: () => Boolean(this.generation),
      waitFor: (messageId) => {
        const left = ((this.retryAt.get(messageId) ?? 0) - Date.now()) / 1000;
        if (left <= 0) this.retryAt.delete(messageId);
        return left > 0 ? left : null;
      },
      fileUrl: (file) => `/api/chats/${this.chatId}/files/${file.id}`,
      download: (file) => download(`/api/chats/${this.chatId}/files/${file.id}`, file.filename).catch((err) => notify(errorText(err), "error")),
      edit: (message, text) => {
        if (this.generation) return; // a form opened before an answer started: one answer at a time
        this.truncateFrom(message.id);
        // The new version keeps the question's files (an edit without `file_ids` would drop them).
        const files = message.files || [];
        const body = files.length ? { content: text, edit_of: message.id, file_ids: files.map((f) => f.id) } : { content: text, edit_of: message.id };
        this.stream(body, { appendUser: text, files });
      },
      regenerate: (message) => {
        if (this.generation) return;
        this.truncateFrom(message.id);
        this.stream({ regenerate_of: message.id }, {});
      },
      switchTo: async (messageId) => {
        if (this.generation) return;
        const label = document.activeElement?.getAttribute("aria-label");
        const chat = await this.updateChat(this.chatId, { current_message_id: messageId });
        if (!chat) return;
        this.render(chat);
        // A keyboard user stays on the switcher: on the same arrow, or the other one at the last version.
        const buttons = [...this.messages.querySelectorAll(`[data-id="${messageId}"] .branches button:not(:disabled)`)];
        (buttons.find((b) => b.getAttribute("aria-label") === label) || buttons[0])?.focus();
      },
      feedback: async (message, rating) => {
        try {
          const updated = await api(`/api/chats/${this.chatId}/messages/${message.id}/feedback`, { method: "PUT", body: { rating } });
          const item = this.messages.querySelector(`[data-id="${message.id}"]`);
          if (!item) return;
          // The message is drawn again with its new rating: a keyboard user stays on the button they pressed.
          const pressed = item.contains(document.activeElement) ? document.activeElement.textContent : null;
          const drawn = messageItem(updated, this.actions());
          item.replaceWith(drawn);
          if (pressed) [...drawn.querySelectorAll(".rate")].find((b) => b.textContent === pressed)?.focus();
        } catch (err) {
          notify(errorText(err), "error");
        }
      },
    };
  }

  /** Remove a message and everything after it (an edit or a regenerate replaces that part of the branch). */
  truncateFrom(messageId) {
    const item = this.messages.querySelector(`[data-id="${messageId}"]`);
    while (item?.nextSibling) item.nextSibling.remove();
    item?.remove();
  }

  /** More of the chat's history: the reader stays where they were (the oldest message shown so far stays in view,
   * the earlier ones above it), not at the end of the chat, where drawing the chat again puts them. */
  async showEarlier() {
    const oldest = this.messages.querySelector(".msg[data-id]")?.dataset.id;
    this.last *= 2;
    if (!(await this.reload()) || !oldest) return;
    this.messages.querySelector(`.msg[data-id="${oldest}"]`)?.scrollIntoView({ block: "start" });
    // More still to show: the button keeps the focus, to press again.
    this.messages.querySelector(".earlier button")?.focus({ preventScroll: true });
  }

  scrollDown() {
    this.messages.lastElementChild?.scrollIntoView({ block: "end" });
  }

  /** Whether the reader is at the end of the messages (give or take a line): only then does the chat follow what
   * is added there; a reader who scrolled up to read stays where they are. */
  atEnd(list = this.messages) {
    return !list || list.scrollHeight - list.scrollTop - list.clientHeight < 48;
  }

  /** A placeholder for the answer being written, with its live parts (steps, status, text). */
  liveItem(messageId = null) {
    const existing = messageId && this.messages.querySelector(`[data-id="${messageId}"]`);
    const item = existing || messageItem({ id: messageId, role: "assistant", content: "", status: "streaming", sibling_ids: [] }, this.actions());
    if (!existing) this.messages.append(item);
    item.classList.add("streaming");
    item.setAttribute("aria-busy", "true");
    return item;
  }

  handlers(chatId, view) {
    let painted = false;
    let pending = null;
    const q = (selector) => view.item.querySelector(selector);
    return {
      onStart: (data) => {
        this.attachments?.sent(data.user_message.files || []); // stored with the message: no longer pending
        if (view.send) waiting.clear(chatId); // the server has it: nothing to give back
        // Nor to keep as a draft (unless the box holds something else since: that is the draft now).
        if (view.draft !== undefined && drafts.read(chatId)?.text === view.draft) drafts.clear(chatId);
        view.user?.setAttribute("data-id", data.user_message.id);
        view.item.setAttribute("data-id", data.assistant_message_id);
        if (view.stopping && chatId === this.chatId) this.stop(); // Stop was pressed before the server had it
      },
      onWaiting: (offline) => {
        const line = q(".live-status");
        line.textContent = "Waiting for the network: sent as soon as it is back.";
        line.hidden = !offline;
        // Kept for a chat left (or a page reloaded) before the network is back, which stops this send.
        if (offline && view.send) waiting.write(chatId, view.send);
      },
      onStatus: (data) => {
        const line = q(".live-status");
        line.textContent = data.description;
        line.hidden = Boolean(data.done);
      },
      onTool: (data) => {
        const steps = q(".steps");
        steps.hidden = false;
        steps.append(stepItem({ type: "tool", ...data }));
      },
      onText: (text) => {
        pending = text;
        requestAnimationFrame(() => {
          if (pending === null) return;
          const follow = this.atEnd();
          setContent(q(".content"), "assistant", pending);
          pending = null;
          q(".live-status").hidden = true;
          if (follow) this.scrollDown();
          if (!painted) {
            painted = true;
            // The next frame starts once this one (with the first token) is painted.
            requestAnimationFrame(() => performance.getEntriesByName("send").length && performance.measure("first-token", "send"));
          }
        });
      },
      onEnd: (type, data) => {
        if (type === "error") {
          // n8n refused with 429/503 and a Retry-After: when to try again, in the toast and the error line
          // (the stored message has no retry_after: a wait counted from the refusal would be stale later).
          const wait = waitText(data.retry_after);
          const id = view.item.dataset.id;
          if (wait && id) this.retryAt.set(id, Date.now() + data.retry_after * 1000);
          notify(wait ? `${String(data.message).replace(/\.$/, "")}. Try again in ${wait}.` : data.message, "error");
        }
        if (chatId === this.chatId) this.finish();
      },
    };
  }

  /** Send a message (new, edit or regenerate) and stream its answer into the pane. */
  async stream(body, { appendUser, files = [] }) {
    const chatId = this.chatId;
    const view = {};
    if (appendUser !== undefined) {
      view.user = messageItem({ id: null, role: "user", content: appendUser, status: "complete", sibling_ids: [], files }, this.actions());
      this.messages.append(view.user);
    }
    view.item = this.liveItem();
    this.scrollDown();
    // Regenerate or an edit's Send went with the messages they were on: the focus goes to the message box (as
    // after a send from it), where Stop is next, not to the page's start.
    if (!document.activeElement || document.activeElement === document.body) this.input?.focus();
    // The same message sent again after the server could not be reached: the same Idempotency-Key, so that
    // one which did reach it is answered (replayed), not stored a second time.
    const json = JSON.stringify(body);
    const unsent = this.unsent?.chatId === chatId && this.unsent.body === json ? this.unsent : null;
    this.unsent = null;
    const key = unsent?.key ?? randomId();
    view.request = { body, key };
    // What to give back if the chat is left while this send waits for the network (a regenerate has no text).
    if (body.content) view.send = { user: this.userId, body, key, files };
    // A new message's text stays the chat's draft until the server has it (onStart), with its key (draftOf).
    if (body.content && !body.edit_of) {
      view.draft = body.content;
      if (drafts.read(chatId)?.text === body.content) drafts.write(chatId, { user: this.userId, text: body.content, key });
    }
    this.live = view;
    this.generation = new Generation(chatId, this.handlers(chatId, view));
    this.setBusy(true);
    try {
      await this.generation.send(body, key);
    } catch (err) {
      waiting.clear(chatId); // not sent, or refused: given back below, not on the next opening
      if (err instanceof NotSent) return this.notSent(chatId, body, err.key);
      notify(errorText(err), "error");
      // A refused new message (nothing was stored) goes back to the box, to be fixed and sent again.
      if (err instanceof ApiError && !body.edit_of && body.content && chatId === this.chatId && !this.input.value) {
        this.input.value = body.content;
        this.keepDraft(chatId);
      }
      if (chatId === this.chatId) this.finish();
    }
  }

  /**
   * The server could not be reached (no HTTP answer, while the browser was online): the chat is drawn again as
   * last read, without the question, whose text goes back where it was typed (the message box, or the edit
   * form), its files still pending; and its key is kept for the same message sent again. Not read again
   * from the server, which cannot be reached: the pane would show only that error.
   */
  notSent(chatId, body, key) {
    if (chatId !== this.chatId) return;
    this.giveBack(body, key, body.content ? "Your message was not sent: the server could not be reached. Send it again." : "Nothing was sent: the server could not be reached.");
  }

  /**
   * A send that was waiting for the network when its chat was left (another chat, a reload: `waiting`), given
   * back as one the server could not be reached for, its files pending again; only to the user who wrote it.
   */
  giveBackWaiting() {
    const kept = waiting.read(draftKey(this.chat));
    waiting.clear(draftKey(this.chat));
    if (!kept?.body?.content || kept.user !== this.userId) return;
    if (!kept.body.edit_of) this.attachments.restore(kept.files || []);
    // The draft restored in the box is that same message (kept until the server has it): given back once.
    if (!kept.body.edit_of && this.input.value === kept.body.content) this.input.value = "";
    this.giveBack(kept.body, kept.key, "Your message was not sent: it was waiting for the network when the chat was left. Send it again.");
  }

  /** A send that was not sent: the chat as last read, and its text back where it was typed, `key` kept for the
   * same message sent again; `message` says why (a toast of `kind`). */
  giveBack(body, key, message, kind = "error") {
    this.unsent = { chatId: this.chatId, body: JSON.stringify(body), key };
    this.generation = null;
    this.render(this.chat);
    // An edit goes back into its form; into the message box when that message is not shown (not among the
    // messages read), rather than be lost.
    const item = body.edit_of ? this.messages.querySelector(`[data-id="${body.edit_of}"]`) : null;
    item?.querySelector("[data-action=edit]")?.click();
    const box = item?.querySelector(".edit-text");
    if (box) box.value = body.content;
    else if (body.content) {
      this.input.value = this.input.value ? `${body.content}\n${this.input.value}` : body.content;
      // Back in the box: the chat's draft, which a reload keeps (with the send's key while it is that text alone).
      this.keepDraft(draftKey(this.chat), !body.edit_of && this.input.value === body.content ? key : undefined);
    }
    notify(message, kind);
  }

  /** The id of the answer the shown chat is still writing, or null. */
  running() {
    const last = this.chat.messages.at(-1);
    return last?.role === "assistant" && last.status === "streaming" ? last.id : null;
  }

  /** After a reload: follow the chat's running answer from where this tab was (or from its start). */
  resumeIfRunning() {
    const chatId = this.chatId;
    const running = this.running();
    let from = saved.read(chatId);
    if (from && running && from.generation !== running) from = null; // saved for an answer that ended since
    if (!from && !running) return;
    const start = from || { generation: running, last: 0, text: "" };
    const view = { item: this.liveItem(start.generation) };
    if (from) setContent(view.item.querySelector(".content"), "assistant", from.text);
    this.live = view;
    this.generation = new Generation(chatId, this.handlers(chatId, view), start);
    this.setBusy(true);
    this.generation.follow().catch((err) => {
      notify(errorText(err), "error");
      if (chatId === this.chatId) this.finish();
    });
  }

  async stop() {
    const { generation, live } = this;
    if (!generation) return;
    if (generation.waiting) return this.cancelWaiting(generation, live);
    live.stopping = true;
    live.stops = (live.stops || 0) + 1; // in flight: a stop resent on `start` while the first is on its way
    this.stopButton.disabled = true;
    let usable = false;
    try {
      // The stream then ends with `done` (status cancelled). A 409 (null) before the `start` event: the send
      // is not registered yet, and its `start` sends the stop again (handlers).
      const stopped = await stopGeneration(this.chatId);
      usable = stopped === null && Boolean(generation.generation);
    } catch (err) {
      notify(errorText(err), "error");
      usable = true;
    }
    live.stops -= 1;
    if (usable) this.stopUsable(live);
  }

  /** Stop pressed while the send waits for the network: nothing reaches the server once the network is back
   * (no stop request either: it could not), and the text goes back where it was typed, as a send not sent. */
  cancelWaiting(generation, live) {
    generation.leave();
    waiting.clear(draftKey(this.chat));
    const { body, key } = live.request;
    this.giveBack(body, key, body.content ? "Stopped: your message was not sent." : "Stopped: nothing was sent.", "info");
  }

  /** A stop that did nothing: Stop can be pressed again (while that answer is still the one shown), once no
   * other stop of it is on its way. */
  stopUsable(live) {
    if (live.stops) return;
    live.stopping = false;
    if (this.live === live && this.generation) this.stopButton.disabled = false;
  }

  setBusy(busy) {
    this.sendButton.hidden = busy;
    this.stopButton.hidden = !busy;
    this.stopButton.disabled = Boolean(busy && this.live?.stopping);
    // An edit form opened before the answer started waits for its end.
    for (const button of this.messages.querySelectorAll(".edit-form [type=submit]")) button.disabled = busy;
  }

  /**
   * The answer ended: show the chat as stored (ids, versions, final status) and refresh the list order. An
   * answer running there that is not the one that ended (started in another tab, or the reason a send was
   * refused with 409) is followed in turn; the one that ended is never followed again.
   */
  async finish() {
    const chatId = this.chatId;
    const ended = this.generation?.generation ?? null;
    this.generation = null;
    this.setBusy(false);
    const shown = await this.reload();
    this.loadChats();
    if (shown && chatId === this.chatId && !this.generation && this.running() && this.running() !== ended) this.resumeIfRunning();
  }
}
