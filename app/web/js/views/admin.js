// The admin pages: agents (create, edit, write-only secret headers, avatar, connection test), users and
// invitations, usage, and the error log. Every write goes through the same API a script would use.
import { api, page } from "../api.js";
import { copy, fill, formValues, h, notify, pageTitle, when } from "../dom.js";
import { FormProblems, clearProblems, errorText, field, formProblem, showProblems } from "../forms.js";
import { avatar } from "./messages.js";

function table(headers, rows, label = null) {
  return h(
    "div",
    { class: "table-wrap" },
    h("table", { "aria-label": label }, h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))), h("tbody", {}, rows)),
  );
}

// --- agents ---------------------------------------------------------------------------------------

/** "Name: value" lines -> {name: value}; an unparsable line is an error the form shows. */
function parseHeaders(text) {
  const headers = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const at = line.indexOf(":");
    if (at <= 0) throw formProblem("webhook_headers", `Header line "${line.slice(0, 40)}" needs the form Name: value`);
    headers[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return headers;
}

/** The form's required fields, as the form's own check names them (the form is `novalidate`: see agentForm). */
const REQUIRED = { name: "Name is required", webhook_url: "Webhook URL is required" };

function agentBody(form, agent) {
  const v = formValues(form);
  // Left blank, a field would not be sent at all: a new agent got "Field required", an edit kept the stored
  // name or URL while saying "Saved".
  const blank = Object.entries(REQUIRED).filter(([name]) => !v[name]);
  if (blank.length) throw new FormProblems(blank.map(([name, msg]) => ({ loc: ["body", name], msg })));
  const body = {
    name: v.name,
    webhook_url: v.webhook_url,
    description: v.description ?? null,
    system_prompt: v.system_prompt ?? null,
    response_mode: v.response_mode,
    is_active: form.elements.is_active.checked,
  };
  if (v.slug) body.slug = v.slug;
  try {
    body.config = v.config ? JSON.parse(v.config) : {};
  } catch {
    throw formProblem("config", "Config must be JSON, like {\"model\": \"gpt-4\"}");
  }
  // Write-only: the values are never shown; empty keeps the stored ones (unless "remove" is ticked).
  if (v.webhook_headers) body.webhook_headers = parseHeaders(v.webhook_headers);
  else if (form.elements.clear_headers?.checked) body.webhook_headers = {};
  else if (!agent) body.webhook_headers = null;
  return body;
}

function testResult(result) {
  return h(
    "div",
    { class: `test-result ${result.ok ? "ok" : "bad"}`, role: "status" },
    h("strong", {}, result.ok ? "✓ The agent answers" : `✗ ${result.code || "Not working"}`),
    h(
      "p",
      { class: "muted" },
      `HTTP ${result.http_status ?? "—"} · format ${result.format ?? "—"} · first byte ${result.first_byte_ms ?? "—"} ms · total ${result.total_ms} ms`,
    ),
    result.hint && h("p", { class: "hint" }, result.hint),
    result.sample && h("pre", { class: "sample" }, result.sample),
  );
}

function agentForm(agent, done) {
  const text = (name, value, attrs = {}) => h("input", { name, value: value ?? "", ...attrs });
  const area = (name, value, attrs = {}) => {
    const el = h("textarea", { name, rows: 3, ...attrs });
    el.value = value ?? "";
    return el;
  };
  const mode = h("select", { name: "response_mode" }, ["stream", "callback"].map((m) => h("option", { value: m }, m)));
  mode.value = agent?.response_mode || "stream";
  const active = h("input", { type: "checkbox", name: "is_active" });
  active.checked = agent ? agent.is_active : true;
  const names = agent?.webhook_header_names || [];
  const result = h("div", { class: "test-slot", "aria-live": "polite" });
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const submit = h("button", { type: "submit" }, "Save");
  // novalidate: the API checks every field and its 422 says why (Test connection, a plain button, shows the
  // same); Chromium's own URL check would block Save with a bare "Please enter a URL." for what it cannot
  // parse (an IPv6 zone id), and the reason, naming what to change, would never show.
  const form = h(
    "form",
    { class: "card agent-form", novalidate: true, onsubmit: (event) => save(event) },
    h("h2", {}, agent ? `Edit ${agent.name}` : "New agent"),
    field("Name", text("name", agent?.name, { required: true, maxlength: 100 })),
    field("Slug (model name; empty: made from the name)", text("slug", agent?.slug, { pattern: "[a-z0-9-]{1,64}" })),
    field("Description", text("description", agent?.description)),
    field("Webhook URL (n8n production URL)", text("webhook_url", agent?.webhook_url, { type: "url", required: true })),
    field(
      names.length ? `Secret headers (stored: ${names.join(", ")}; empty keeps them, unless the URL changes)` : "Secret headers (one Name: value a line)",
      area("webhook_headers", "", { placeholder: "X-N8N-Auth: …", autocomplete: "off", spellcheck: "false" }),
    ),
    names.length ? h("label", { class: "check" }, h("input", { type: "checkbox", name: "clear_headers" }), " Remove the stored headers") : null,
    field("System prompt", area("system_prompt", agent?.system_prompt)),
    field("Config (JSON)", area("config", JSON.stringify(agent?.config || {}, null, 2), { spellcheck: "false" })),
    field("Response mode", mode),
    h("label", { class: "check" }, active, " Active"),
    agent && avatarInput(agent, done),
    error,
    h(
      "div",
      { class: "row" },
      submit,
      h("button", { type: "button", class: "secondary", onclick: () => test() }, "Test connection"),
      h("button", { type: "button", class: "ghost", onclick: () => done(null) }, "Cancel"),
    ),
    result,
  );

  const fail = (err) => showProblems(form, error, err);

  // Disabled while the request runs: a second click (or Enter) would create the agent twice.
  async function save(event) {
    event.preventDefault();
    if (submit.disabled) return;
    clearProblems(form, error);
    submit.disabled = true;
    try {
      const body = agentBody(form, agent);
      const saved = agent
        ? await api(`/api/agents/${agent.id}`, { method: "PUT", body })
        : await api("/api/agents", { method: "POST", body });
      notify(`Saved ${saved.name}`);
      done(saved);
    } catch (err) {
      fail(err);
    } finally {
      submit.disabled = false;
    }
  }

  // A saved agent is tested as stored (its secret headers included); a new one with the form's values.
  async function test() {
    clearProblems(form, error);
    fill(result, h("p", { class: "muted" }, "Testing…"));
    try {
      const outcome = agent
        ? await api(`/api/agents/${agent.id}/test`, { method: "POST" })
        : await api("/api/agents/test", { method: "POST", body: agentBody(form, null) });
      fill(result, testResult(outcome));
    } catch (err) {
      fill(result);
      fail(err);
    }
  }
  return form;
}

function avatarInput(agent, done) {
  const preview = h("span", { class: "avatar-preview" }, avatar(agent, "large"));
  const input = h("input", { type: "file", name: "avatar", accept: "image/png,image/jpeg,image/webp,image/gif" });
  input.addEventListener("change", async () => {
    const file = input.files[0];
    if (!file) return;
    const url = URL.createObjectURL(file);
    fill(preview, h("img", { class: "avatar large", src: url, alt: "" }));
    const form = new FormData();
    form.append("file", file);
    try {
      const updated = await api(`/api/agents/${agent.id}/avatar`, { method: "POST", form });
      notify("Avatar saved");
      done(updated, { stay: true });
    } catch (err) {
      notify(errorText(err), "error");
      fill(preview, avatar(agent, "large"));
    } finally {
      URL.revokeObjectURL(url);
      // The input only picks: a refused file does not stay chosen, and picking it again uploads it again.
      input.value = "";
    }
  });
  return h("div", { class: "row" }, preview, field("Avatar (PNG, JPEG, WebP or GIF)", input));
}

async function agentsPage(main) {
  const list = h("div", { class: "agent-admin-list" });
  const slot = h("div");
  const newAgent = h("button", { type: "button", onclick: () => show(null) }, "+ New agent");
  const show = async (editing) => {
    fill(slot, editing === undefined ? null : agentForm(editing, async (saved, opts) => {
      if (!opts?.stay) fill(slot);
      await load();
      // The form went (saved or cancelled) with the focus in it: back to the agent's Edit (the new agent's, once
      // saved), or to "+ New agent", rather than to the page's start.
      if (!opts?.stay) (list.querySelector(`tr[data-id="${(saved || editing)?.id}"] button`) || newAgent).focus();
    }));
    slot.querySelector("input")?.focus();
  };
  async function load() {
    try {
      const agents = await api("/api/agents?include_inactive=true");
      fill(
        list,
        agents.length
          ? table(
              ["", "Name", "Slug", "Webhook", "Headers", "Active", ""],
              agents.map((a) =>
                h(
                  "tr",
                  { "data-id": a.id },
                  h("td", {}, avatar(a)),
                  h("td", {}, a.name),
                  h("td", {}, h("code", {}, a.slug)),
                  h("td", { class: "wrap" }, a.webhook_url),
                  h("td", {}, a.webhook_header_names.join(", ") || "—"),
                  h("td", {}, a.is_active ? "yes" : "no"),
                  // Named with its agent: a screen reader's list of buttons is not "Edit, Edit, Edit".
                  h("td", {}, h("button", { type: "button", class: "ghost", "aria-label": `Edit ${a.name}`, onclick: () => show(a) }, "Edit")),
                ),
              ),
            )
          : h("p", { class: "muted" }, "No agent yet."),
      );
    } catch (err) {
      notify(errorText(err), "error");
    }
  }
  fill(main, h("div", { class: "admin" }, h("div", { class: "row spread" }, h("h1", {}, "Agents"), newAgent), slot, list));
  await load();
}

// --- users and invitations -------------------------------------------------------------------------

async function usersPage(main, { user: me, navigate }) {
  const users = h("div");
  const invites = h("div");
  const created = h("div", { "aria-live": "polite" });
  let shownInvite = null; // the invitation whose one-time link `created` shows

  async function patch(user, changes) {
    // The table is drawn again below: the control just changed (its label names the user) keeps the focus.
    const label = document.activeElement?.getAttribute("aria-label");
    try {
      await api(`/api/users/${user.id}`, { method: "PATCH", body: changes });
      notify(`Updated ${user.email}`);
      // My own role or activation: the route reads me again (a demoted admin leaves the admin pages).
      if (user.id === me.id) {
        navigate("/admin/users");
        return;
      }
    } catch (err) {
      notify(errorText(err), "error");
    }
    // The invitations too: demoting or deactivating an admin revokes the ones they made.
    await Promise.all([loadUsers(), loadInvites()]).catch((err) => notify(errorText(err), "error"));
    if (label && (!document.activeElement || document.activeElement === document.body))
      [...users.querySelectorAll("[aria-label]")].find((control) => control.getAttribute("aria-label") === label)?.focus();
  }

  async function loadUsers() {
    const list = await api("/api/users");
    fill(
      users,
      table(
        ["Email", "Name", "Role", "Active", "Last login"],
        list.map((u) => {
          const role = h("select", { "aria-label": `Role of ${u.email}` }, h("option", { value: "user" }, "user"), h("option", { value: "admin" }, "admin"));
          role.value = u.role;
          // Asked first: an arrow key on the focused list (Chromium, Firefox on Windows and Linux) changes its value
          // and fires `change` at once, so a keyboard user looking at the choices made the user an admin, or
          // demoted themselves out of the admin pages. Cancelled, the list shows the role as it is.
          role.addEventListener("change", () => {
            const question =
              role.value === "admin"
                ? `Make ${u.email} an admin?`
                : u.id === me.id
                  ? "Make yourself a user? You will no longer see the admin pages."
                  : `Make ${u.email} a user? The invitations they made are revoked.`;
            if (confirm(question)) patch(u, { role: role.value });
            else role.value = u.role;
          });
          const active = h("input", { type: "checkbox", "aria-label": `${u.email} active` });
          active.checked = u.is_active;
          active.addEventListener("change", () => patch(u, { is_active: active.checked }));
          return h("tr", {}, h("td", {}, u.email, u.id === me.id ? " (you)" : ""), h("td", {}, u.full_name || ""), h("td", {}, role), h("td", {}, active), h("td", {}, when(u.last_login_at)));
        }),
        "Users",
      ),
    );
  }

  async function loadInvites() {
    const list = await api("/api/teams/current/invites");
    fill(
      invites,
      list.length
        ? table(
            ["Email", "Role", "Uses", "Expires", "Status", ""],
            list.map((i) =>
              h(
                "tr",
                {},
                h("td", {}, i.email || "anyone"),
                h("td", {}, i.role),
                h("td", {}, `${i.uses} / ${i.max_uses}`),
                h("td", {}, when(i.expires_at)),
                h("td", {}, i.status),
                h(
                  "td",
                  {},
                  i.status === "active" &&
                    h("button", { type: "button", class: "ghost", "aria-label": `Revoke the invitation for ${i.email || "anyone"}, ${i.role}, expires ${when(i.expires_at)}`, onclick: async () => {
                      try {
                        await api(`/api/teams/current/invites/${i.id}`, { method: "DELETE" });
                        // Its link no longer works: it leaves the page.
                        if (i.id === shownInvite) {
                          fill(created);
                          shownInvite = null;
                        }
                      } catch (err) {
                        notify(errorText(err), "error");
                      }
                      await loadInvites().catch((err) => notify(errorText(err), "error"));
                    } }, "Revoke"),
                ),
              ),
            ),
            "Invitations",
          )
        : h("p", { class: "muted" }, "No invitation yet."),
    );
  }

  const inviteButton = h("button", { type: "submit" }, "Create invitation");
  const inviteForm = h(
    "form",
    {
      class: "card inline-form",
      onsubmit: async (event) => {
        event.preventDefault();
        if (inviteButton.disabled) return; // one invitation per click, however fast the second
        inviteButton.disabled = true;
        const v = formValues(inviteForm);
        const body = { role: v.role, expires_in_days: Number(v.expires_in_days), max_uses: Number(v.max_uses) };
        if (v.email) body.email = v.email;
        try {
          const invite = await api("/api/teams/current/invites", { method: "POST", body });
          shownInvite = invite.id;
          const link = `${location.origin}/#/join/${invite.token}`;
          const out = h("input", { class: "invite-link", readonly: true, "aria-label": "Invitation link", value: link });
          fill(
            created,
            h("div", { class: "card" }, h("p", {}, "Send this link (shown only now):"), h("div", { class: "row" }, out, h("button", { type: "button", class: "secondary", onclick: () => copy(link, out) }, "Copy"))),
          );
          out.select();
          await loadInvites();
        } catch (err) {
          notify(errorText(err), "error");
        } finally {
          inviteButton.disabled = false;
        }
      },
    },
    field("Email (optional)", h("input", { name: "email", type: "email" })),
    field("Role", h("select", { name: "role" }, h("option", { value: "user" }, "user"), h("option", { value: "admin" }, "admin"))),
    field("Days valid", h("input", { name: "expires_in_days", type: "number", min: 1, max: 30, value: 7 })),
    field("Uses", h("input", { name: "max_uses", type: "number", min: 1, max: 1000, value: 1 })),
    inviteButton,
  );

  const userButton = h("button", { type: "submit" }, "Add user");
  const userForm = h(
    "form",
    {
      class: "card inline-form",
      onsubmit: async (event) => {
        event.preventDefault();
        if (userButton.disabled) return;
        userButton.disabled = true;
        try {
          await api("/api/users", { method: "POST", body: formValues(userForm) });
          userForm.reset();
          await loadUsers();
        } catch (err) {
          notify(errorText(err), "error");
        } finally {
          userButton.disabled = false;
        }
      },
    },
    field("Email", h("input", { name: "email", type: "email", required: true })),
    field("Name", h("input", { name: "full_name" })),
    field("Password", h("input", { name: "password", type: "password", minlength: 8, required: true, autocomplete: "new-password" })),
    field("Role", h("select", { name: "role" }, h("option", { value: "user" }, "user"), h("option", { value: "admin" }, "admin"))),
    userButton,
  );

  fill(main, h("div", { class: "admin" }, h("h1", {}, "Users"), users, h("details", {}, h("summary", {}, "Add a user directly"), userForm), h("h2", {}, "Invitations"), inviteForm, created, invites));
  await Promise.all([loadUsers(), loadInvites()]).catch((err) => notify(errorText(err), "error"));
}

// --- usage and errors --------------------------------------------------------------------------------

async function usagePage(main) {
  const out = h("div");
  const today = new Date().toISOString().slice(0, 10);
  const monthAgo = new Date(Date.now() - 29 * 86400000).toISOString().slice(0, 10);
  const form = h(
    "form",
    { class: "row", onsubmit: (event) => { event.preventDefault(); load(); } },
    field("From", h("input", { name: "from", type: "date", value: monthAgo })),
    field("To", h("input", { name: "to", type: "date", value: today })),
    field("By", h("select", { name: "group_by" }, ["day", "agent", "user"].map((g) => h("option", { value: g }, g)))),
    h("button", { type: "submit" }, "Show"),
  );
  // A refused query (422: `from` after `to`...) says why under the form, and the previous period's table goes: a
  // table left in place would read as the answer to the dates now in the form.
  const error = h("p", { class: "field-error error", role: "alert", hidden: true });
  async function load() {
    try {
      const rows = await api(`/api/usage?${new URLSearchParams(formValues(form))}`);
      error.hidden = true;
      error.textContent = "";
      const num = (x) => (x === null || x === undefined ? "—" : String(x));
      fill(
        out,
        rows.length
          ? table(
              ["", "Answers", "Completed", "Errors", "Stopped", "Chars in", "Chars out", "Tokens in", "Tokens out", "TTFC p50 ms", "Duration p50 ms"],
              rows.map((r) => h("tr", {}, [r.label, r.generations, r.completed, r.errors, r.cancelled, r.chars_in, r.chars_out, r.tokens_in, r.tokens_out, r.ttfc_ms_p50, r.duration_ms_p50].map((x, i) => h(i ? "td" : "th", i ? { class: "num" } : { scope: "row" }, num(x))))),
            )
          : h("p", { class: "muted" }, "No usage in this period."),
      );
    } catch (err) {
      out.replaceChildren();
      error.textContent = errorText(err);
      error.hidden = false;
    }
  }
  fill(main, h("div", { class: "admin" }, h("h1", {}, "Usage"), form, error, out));
  await load();
}

/**
 * The error log's chat: the admin's own is a link (an admin opens only their own chats: another user's would be a
 * 404), another user's is its whole id (cut to fit, whole when selected or copied) with a Copy button, so it can
 * be quoted to support or searched for in the logs.
 */
function errorChat(entry, me) {
  if (!entry.chat_id) return "—";
  if (entry.user_id === me.id) return h("a", { href: `#/chats/${entry.chat_id}`, title: entry.chat_id }, "Open the chat");
  const id = h("code", { class: "id-cut", title: entry.chat_id }, entry.chat_id);
  return [id, " ", h("button", { type: "button", class: "ghost", "aria-label": `Copy id of chat ${entry.chat_id.slice(0, 8)}`, onclick: () => copy(entry.chat_id, id, "Chat id") }, "Copy id")];
}

async function errorsPage(main, { user: me }) {
  // Who and which agent, by name: read once per visit (every agent, deactivated ones too). A list that cannot be
  // read leaves the ids' start, as before.
  const names = Promise.all([api("/api/agents?include_inactive=true"), api("/api/users")]).then(
    ([agents, users]) => ({ agents: new Map(agents.map((a) => [a.id, a.name])), users: new Map(users.map((u) => [u.id, u.full_name || u.email])) }),
    () => ({ agents: new Map(), users: new Map() }),
  );
  const short = (id) => h("code", { title: id }, id.slice(0, 8));
  const body = h("tbody");
  const more = h("button", { type: "button", class: "ghost", hidden: true, onclick: () => load() }, "Load more");
  let shown = 0;
  async function load() {
    // Disabling the button drops its focus: a keyboard user goes on from the first row the page adds instead.
    const focusAdded = document.activeElement === more;
    more.disabled = true; // one page at a time: a second click would list the same page twice
    try {
      const [{ items, total }, { agents, users }] = await Promise.all([page("/api/error-logs", { limit: 50, offset: shown }), names]);
      const agentCell = (id) => (id ? agents.get(id) ?? short(id) : "—");
      const userCell = (id) => (!id ? "—" : id === me.id ? "You" : users.get(id) ?? short(id));
      const rows = items.map((e) =>
        h(
          "tr",
          {},
          h("td", {}, when(e.created_at)),
          h("td", {}, h("code", {}, e.code)),
          h("td", { class: "wrap" }, e.message),
          h("td", {}, e.upstream_status ?? "—"),
          h("td", {}, agentCell(e.agent_id)),
          h("td", {}, userCell(e.user_id)),
          h("td", { class: "nowrap" }, errorChat(e, me)),
        ),
      );
      body.append(...rows);
      if (focusAdded && rows.length) {
        rows[0].tabIndex = -1; // focusable from the script only, not a Tab stop
        rows[0].focus();
      }
      shown += items.length;
      more.hidden = shown >= total;
      if (!total) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No error logged.")));
    } catch (err) {
      notify(errorText(err), "error");
    } finally {
      more.disabled = false;
      if (focusAdded && document.activeElement === document.body && !more.hidden) more.focus();
    }
  }
  fill(
    main,
    h(
      "div",
      { class: "admin" },
      h("h1", {}, "Error log"),
      h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["When", "Code", "Message", "HTTP", "Agent", "User", "Chat"].map((x) => h("th", { scope: "col" }, x)))), body)),
      more,
    ),
  );
  await load();
}

const PAGES = { agents: agentsPage, users: usersPage, usage: usagePage, errors: errorsPage };

const TITLES = { agents: "Agents", users: "Users", usage: "Usage", errors: "Error log" };

export function renderAdmin(main, name, ctx) {
  pageTitle(TITLES[PAGES[name] ? name : "agents"]);
  (PAGES[name] || agentsPage)(main, ctx);
}
