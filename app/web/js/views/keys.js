// API keys (`#/keys`): a member's personal keys for the OpenAI-compatible API (/v1) and scripts
// (docs/API_REFERENCE.md, "API keys"). A new key is shown once, on this page only: never in the address, the tab's
// storage or a toast, and it goes with the page (another page, a reload, the tab put in the back-forward cache).
// Loaded on first use, like the admin pages.
import { ApiError, api } from "../api.js";
import { copy, fill, formValues, h, notify, pageTitle, when } from "../dom.js";
import { clearProblems, errorText, field, formProblem, showProblems } from "../forms.js";

const pad = (n) => String(n).padStart(2, "0");
const localDay = (date) => `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;

/** The end of the chosen day (`YYYY-MM-DD`) in the reader's time zone, as the API wants it (UTC, ISO 8601): a key
 * "expiring on" a day works through that day. Null for a date no clock can hold. */
function endOfDay(day) {
  const [year, month, date] = day.split("-").map(Number);
  const end = new Date(year, month - 1, date, 23, 59, 59);
  return Number.isNaN(end.getTime()) ? null : end.toISOString();
}

export async function renderKeys(main, { user }) {
  const admin = user.role === "admin";
  const root = h("div", { class: "admin keys" });
  main.append(root);
  pageTitle("API keys");

  // --- the key just created: shown once ---------------------------------------------------------------
  const created = h("div");
  let shownKey = null; // the id of the key `created` shows
  const forget = () => {
    fill(created);
    shownKey = null;
  };
  function showSecret(key) {
    shownKey = key.id;
    const out = h("input", {
      class: "invite-link secret",
      readonly: true,
      value: key.key,
      autocomplete: "off",
      spellcheck: "false",
      "aria-label": `New API key ${key.name}`,
      "aria-describedby": "key-once",
    });
    fill(
      created,
      h(
        "section",
        { class: "card", "aria-labelledby": "key-created" },
        h("h2", { id: "key-created" }, `New key: ${key.name}`),
        h(
          "p",
          { id: "key-once" },
          h("strong", {}, "Copy it now: you will not see it again."),
          " Anyone who has it can use the API as you: keep it like a password. Lost, revoke it and create another.",
        ),
        h("div", { class: "row" }, out, h("button", { type: "button", class: "secondary", onclick: () => copy(key.key, out, "Key") }, "Copy key")),
        h("p", {}, h("button", { type: "button", class: "ghost", onclick: () => { forget(); name.focus(); } }, "Done: hide the key")),
      ),
    );
    // A page kept in the back-forward cache (the user went to another site) would show the key again on Back.
    window.addEventListener("pagehide", forget, { once: true });
    out.focus();
    out.select();
  }

  // --- the form ----------------------------------------------------------------------------------------
  const name = h("input", { name: "name", maxlength: 100, autocomplete: "off", required: true });
  const expiry = h("input", { name: "expires_at", type: "date", min: localDay(new Date()), max: "9999-12-31" });
  const button = h("button", { type: "submit" }, "Create key");
  const line = h("p", { class: "error", role: "alert", hidden: true });
  // `novalidate`: the page says what is wrong under the field (the API's words for a past date), not the browser.
  const form = h(
    "form",
    { class: "card inline-form", novalidate: true, "aria-label": "New API key", onsubmit: (event) => create(event) },
    field("Name", name, "What it is for, e.g. “laptop scripts”."),
    field("Expires on (optional)", expiry, "It works until the end of that day, your time. Empty: until revoked."),
    button,
  );
  async function create(event) {
    event.preventDefault();
    if (button.disabled) return; // one key per click, however fast the second
    clearProblems(form, line);
    const v = formValues(form);
    if (!v.name) return showProblems(form, line, formProblem("name", "Name is required"));
    // A date typed in part reads as empty: never a key that does not expire when an expiry was meant.
    if (expiry.validity.badInput) return showProblems(form, line, formProblem("expires_at", "Enter the whole date, or none for a key that does not expire"));
    const body = { name: v.name };
    if (v.expires_at) {
      body.expires_at = endOfDay(v.expires_at);
      if (!body.expires_at) return showProblems(form, line, formProblem("expires_at", "This date is out of range"));
    }
    button.disabled = true;
    try {
      const key = await api("/api/api-keys", { method: "POST", body });
      form.reset();
      showSecret(key);
      notify(`Key “${key.name}” created. Copy it now: it is shown only once.`);
      await load();
    } catch (err) {
      showProblems(form, line, err);
    } finally {
      button.disabled = false;
    }
  }

  // --- the list ----------------------------------------------------------------------------------------
  const list = h("div", { "aria-busy": "true" });
  const all = admin ? h("input", { type: "checkbox", name: "all", onchange: () => load() }) : null;
  const allBox = all && h("label", { class: "check" }, all, "Show the whole team's keys, with their owners");
  let owners = null; // user id -> email, for the whole team's list
  let loads = 0; // the latest load(): an earlier one (the switch flipped twice) draws nothing

  async function ownerNames() {
    try {
      return new Map((await api("/api/users")).map((u) => [u.id, u.email]));
    } catch {
      return new Map(); // the owner's id stands in
    }
  }

  async function load() {
    const seq = ++loads;
    const whole = all?.checked ?? false;
    list.setAttribute("aria-busy", "true");
    try {
      // The owners are read with each list: a member added since has their email, not an id.
      const [keys, names] = await Promise.all([api(`/api/api-keys${whole ? "?all=true" : ""}`), whole ? ownerNames() : owners]);
      if (seq !== loads) return;
      owners = names;
      draw(keys, whole);
    } catch (err) {
      if (seq !== loads) return;
      // No longer an admin (demoted since the page was drawn): the switch goes, and the own keys show.
      if (whole && err instanceof ApiError && err.status === 403) {
        all.checked = false;
        allBox.hidden = true;
        notify(errorText(err), "error");
        return load();
      }
      fill(list, h("p", { class: "error", role: "alert" }, `The keys could not be read: ${errorText(err)}`));
    } finally {
      if (seq === loads) list.removeAttribute("aria-busy");
    }
  }

  const ownerOf = (key) => (key.user_id === user.id ? `${user.email} (you)` : owners?.get(key.user_id) || `user ${key.user_id.slice(0, 8)}`);

  function draw(keys, whole) {
    if (!keys.length) {
      fill(list, h("p", { class: "muted" }, whole ? "Nobody in the team has an API key." : "You have no API key yet."));
      return;
    }
    const now = Date.now();
    const headers = ["Name", "Key", whole && "Owner", "Created", "Expires", "Last used", ""].filter((x) => x !== false);
    const rows = keys.map((key) => {
      const expired = key.expires_at && new Date(key.expires_at).getTime() <= now;
      return h(
        "tr",
        { "data-key": key.id },
        h("th", { scope: "row", class: "wrap" }, key.name),
        h("td", {}, h("code", {}, `${key.prefix}…`)),
        whole && h("td", { class: "wrap" }, ownerOf(key)),
        h("td", {}, when(key.created_at)),
        h("td", {}, key.expires_at ? `${when(key.expires_at)}${expired ? " (expired)" : ""}` : "never"),
        h("td", {}, key.last_used_at ? when(key.last_used_at) : "never"),
        h(
          "td",
          {},
          h("button", { type: "button", class: "ghost revoke", "aria-label": `Revoke ${key.name} (${key.prefix}…)`, onclick: () => revoke(key, whole) }, "Revoke"),
        ),
      );
    });
    fill(
      list,
      h(
        "div",
        { class: "table-wrap" },
        h("table", { "aria-label": whole ? "The team's API keys" : "Your API keys" }, h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))), h("tbody", {}, rows)),
      ),
    );
  }

  async function revoke(key, whole) {
    const whose = key.user_id === user.id ? "" : ` of ${ownerOf(key)}`;
    if (!confirm(`Revoke the key “${key.name}” (${key.prefix}…)${whose}? Whatever uses it is refused from now on.`)) return;
    const buttons = () => [...list.querySelectorAll("button.revoke")];
    const at = buttons().findIndex((b) => b.closest("tr")?.dataset.key === key.id);
    try {
      await api(`/api/api-keys/${key.id}`, { method: "DELETE" });
      notify(`Key “${key.name}” revoked.`);
    } catch (err) {
      // 404: revoked meanwhile (another tab, an admin): the list read again shows it gone.
      if (err instanceof ApiError && err.status === 404) notify(`Key “${key.name}” was already revoked.`);
      else {
        notify(errorText(err), "error");
        return;
      }
    }
    if (key.id === shownKey) forget(); // it no longer works: it leaves the page
    await load();
    // The row went with the table: the focus goes to the Revoke of the key that took its place (or the last one),
    // else to the form, not to the page's start.
    const left = buttons();
    (left[Math.min(Math.max(at, 0), left.length - 1)] || name).focus();
  }

  // --- how to use --------------------------------------------------------------------------------------
  const base = `${location.origin}/v1`;
  const models = h("p", {});
  const example = h("pre", {});
  const showModels = (slugs) => {
    const model = slugs[0] || "<agent slug>";
    example.textContent = [
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url="${base}", api_key="n8nr_…")`,
      `answer = client.chat.completions.create(model="${model}", messages=[{"role": "user", "content": "Hello"}])`,
      "print(answer.choices[0].message.content)",
    ].join("\n");
    if (slugs.length) fill(models, "Models (your team's active agents): ", ...slugs.flatMap((slug, i) => [i ? ", " : "", h("code", {}, slug)]), ".");
    else fill(models, "No agent is active in your team yet: an admin adds them on the Agents page.");
  };
  showModels([]);
  const howTo = h(
    "section",
    { class: "card", "aria-labelledby": "keys-how" },
    h("h2", { id: "keys-how" }, "How to use a key"),
    h(
      "p",
      {},
      "It works with OpenAI's SDKs and any client of its Chat Completions API: the base URL is ",
      h("code", {}, base),
      ", the API key is the key, and the model is the slug of one of your team's agents. A key acts as you with a member's rights (never an admin's), on ",
      h("code", {}, "/v1"),
      " and the ",
      h("code", {}, "/api"),
      " routes, until it expires or is revoked.",
    ),
    models,
    example,
  );

  fill(
    root,
    h("h1", {}, "API keys"),
    h("h2", {}, "Create a key"),
    form,
    line,
    created,
    h("div", { class: "row spread" }, h("h2", {}, admin ? "Keys" : "Your keys"), allBox),
    list,
    howTo,
  );
  const agents = api("/api/agents")
    .then((items) => showModels(items.filter((a) => a.is_active !== false).map((a) => a.slug)))
    .catch(() => {}); // the hint's list of models is a nicety: the placeholder stays
  await Promise.all([load(), agents]);
}
