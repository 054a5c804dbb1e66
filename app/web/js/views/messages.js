// One message of a chat as an element: Markdown for answers, steps, status, errors, attached files, the branch
// switcher and the actions (edit, regenerate, feedback). Actions call back into the chat view (views/chat.js);
// a read-only view (a shared chat, views/shares.js) passes `readOnly` and gets none of them.
import { api } from "../api.js";
import { composing, h, notify, randomId, touchScreen } from "../dom.js";
import { renderMarkdown } from "../markdown.js";

const STATUS_TEXT = {
  streaming: "Writing…",
  cancelled: "Stopped",
  error: "Failed",
  interrupted: "Interrupted (the server stopped)",
};

export function avatar(agent, size = "small") {
  if (agent?.avatar_url) return h("img", { class: `avatar ${size}`, src: agent.avatar_url, alt: "" });
  const initials = (agent?.name || "?").split(/\s+/).map((w) => w[0]).join("").slice(0, 2).toUpperCase();
  return h("span", { class: `avatar ${size} initials`, "aria-hidden": "true" }, initials);
}

/**
 * An agent by id, for a chat or share whose agent may be deactivated: members list only active agents
 * (`known`, from `GET /api/agents`), while `GET /api/agents/{id}` answers for a deactivated one too, so its
 * name and avatar can show. Each id is read once per `reads` map; null for no agent (removed, or no longer
 * readable).
 */
export function agentById(id, known, reads) {
  if (!id) return Promise.resolve(null);
  if (known.has(id)) return Promise.resolve(known.get(id));
  if (!reads.has(id)) reads.set(id, api(`/api/agents/${encodeURIComponent(id)}`).catch(() => null));
  return reads.get(id);
}

/** The agent's name as a chat or share shows it: marked when deactivated, a label when there is none. */
export function agentLabel(agent) {
  if (!agent) return "(agent removed)";
  return agent.is_active === false ? `${agent.name} (deactivated)` : agent.name;
}

/** A wait as people say it: "30 s", "2 min", "1 h 30 min" (minutes rounded up); null for none. */
export function waitText(seconds) {
  if (!(seconds > 0)) return null;
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  const minutes = Math.ceil(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const rest = minutes % 60;
  return `${Math.floor(minutes / 60)} h${rest ? ` ${rest} min` : ""}`;
}

/** A failed answer's error line, with "Try again in …" while n8n's Retry-After (`actions.waitFor`) runs. */
function errorLine(message, actions) {
  const wait = waitText(actions.waitFor?.(message.id));
  return wait ? `${message.error.message.replace(/\.$/, "")}. Try again in ${wait}.` : message.error.message;
}

/** Bytes as people read them: 812 B, 4.2 KB, 1.3 MB. */
export function size(bytes) {
  if (bytes < 1000) return `${bytes} B`;
  if (bytes < 1_000_000) return `${(bytes / 1000).toFixed(1)} KB`;
  return `${(bytes / 1_000_000).toFixed(1)} MB`;
}

/**
 * A message's files: names and sizes, each a download link when `actions.download` is given (the API sends
 * them as attachments; the page never displays a file's content). The name is text, never markup. A file
 * without an id came with an imported chat: its name and size travelled, its bytes did not.
 */
export function fileList(files, actions) {
  if (!files?.length) return null;
  return h(
    "ul",
    { class: "files", "aria-label": "Attached files" },
    files.map((file) =>
      h(
        "li",
        {},
        actions.download && file.id
          ? h(
              "a",
              {
                href: actions.fileUrl(file),
                download: file.filename,
                class: "file-link",
                onclick: (event) => {
                  event.preventDefault();
                  actions.download(file);
                },
              },
              file.filename,
            )
          : h("span", { class: "file-name" }, file.filename),
        " ",
        h("span", { class: "muted" }, file.id ? size(file.size) : `${size(file.size)}, not stored here`),
      ),
    ),
  );
}

const asText = (value) => (typeof value === "string" ? value : JSON.stringify(value, null, 2));

/** A status or tool step (live event data or a stored `metadata.steps` item) as a list item. */
export function stepItem(step) {
  if (step.type === "status" || (step.description !== undefined && step.name === undefined))
    return h("li", { class: "step status" }, step.description);
  return h(
    "li",
    { class: "step tool" },
    h(
      "details",
      {},
      h("summary", {}, "Tool: ", h("code", {}, step.name)),
      step.input !== undefined && h("pre", {}, "input: ", asText(step.input)),
      step.output !== undefined && h("pre", {}, "output: ", asText(step.output)),
    ),
  );
}

/** Put text in a message's content element: Markdown for answers, plain text for the user's own words. */
export function setContent(el, role, text) {
  if (role === "assistant") {
    el.replaceChildren(renderMarkdown(text));
    for (const pre of el.querySelectorAll("pre")) codeBlock(pre);
  } else el.textContent = text;
}

/**
 * A code block of an answer gets a Copy button (added after DOMPurify, with a listener: nothing inline for the
 * CSP to refuse). Its visible word is CSS-generated (`data-label`), so selecting and copying the whole message
 * takes the code, not "Copy". Without the clipboard API (plain http other than localhost) the code is selected
 * for Ctrl+C, as the share dialog's Copy link does.
 */
function codeBlock(pre) {
  const button = h("button", { type: "button", class: "ghost copy-code", "aria-label": "Copy code", "data-label": "Copy" });
  const copied = () => {
    button.dataset.label = "Copied";
    button.setAttribute("aria-label", "Copied");
    notify("Copied.");
    setTimeout(() => {
      button.dataset.label = "Copy";
      button.setAttribute("aria-label", "Copy code");
    }, 2000);
  };
  const manual = () => {
    getSelection().selectAllChildren(pre);
    notify("Selected: press Ctrl+C (⌘C) to copy.");
  };
  button.addEventListener("click", () => {
    const text = pre.textContent;
    if (navigator.clipboard) navigator.clipboard.writeText(text).then(copied, manual);
    else manual();
  });
  const block = h("div", { class: "code-block" });
  pre.replaceWith(block);
  block.append(button, pre);
}

/** A few words of a message, for its buttons' description (which message an Edit or Helpful is for). */
function gist(text) {
  const words = (text || "").replace(/\s+/g, " ").trim();
  return words.length > 80 ? `${words.slice(0, 80)}…` : words;
}

/**
 * The element of a stored Message. `actions`: {edit(message, newText), regenerate(message),
 * switchTo(siblingId), feedback(message, rating), fileUrl(file), download(file), agent, busy(), waitFor(messageId):
 * seconds left before the answer may be tried again, or null}, or
 * {readOnly: true, agent} for a message that can only be read.
 */
export function messageItem(message, actions) {
  const { role } = message;
  const content = h("div", { class: "content" });
  setContent(content, role, message.content);
  const steps = h("ol", { class: "steps", hidden: !message.metadata?.steps?.length });
  for (const step of message.metadata?.steps || []) steps.append(stepItem(step));
  // The message's buttons (Edit, Regenerate, Helpful, Not helpful) are named by their words, the same on every
  // message: their description says which message they act on (a screen reader reads it on the button).
  const about = `about-${randomId()}`;
  const item = h(
    "li",
    { class: `msg ${role} ${message.status}`, "data-id": message.id, "data-status": message.status },
    !actions.readOnly &&
      h("span", { id: about, class: "about", hidden: true }, role === "user" ? `Your message: ${gist(message.content)}` : `The answer: ${gist(message.content)}`),
    role === "assistant" ? avatar(actions.agent) : null,
    h(
      "div",
      { class: "bubble" },
      steps,
      h("p", { class: "live-status", role: "status", hidden: true }),
      content,
      fileList(message.files, actions),
      STATUS_TEXT[message.status] && h("p", { class: "badge" }, STATUS_TEXT[message.status]),
      message.error?.message && h("p", { class: "error" }, errorLine(message, actions)),
      !actions.readOnly && footer(message, actions, about),
    ),
  );
  if (actions.readOnly) return item;
  wireEdit(item, message, actions);
  return item;
}

function branchSwitcher(message, actions) {
  const ids = message.sibling_ids || [];
  if (ids.length < 2) return null;
  const at = ids.indexOf(message.id);
  return h(
    "span",
    { class: "branches", role: "group", "aria-label": "Versions" },
    h(
      "button",
      { type: "button", class: "ghost", "aria-label": "Previous version", disabled: at <= 0, onclick: () => actions.switchTo(ids[at - 1]) },
      "‹",
    ),
    h("span", { class: "branch-pos" }, `${at + 1} / ${ids.length}`),
    h(
      "button",
      { type: "button", class: "ghost", "aria-label": "Next version", disabled: at >= ids.length - 1, onclick: () => actions.switchTo(ids[at + 1]) },
      "›",
    ),
  );
}

function footer(message, actions, about) {
  const buttons = [];
  if (message.role === "user") {
    buttons.push(h("button", { type: "button", class: "ghost edit", "data-action": "edit", "aria-describedby": about }, "Edit"));
  } else if (message.status !== "streaming") {
    buttons.push(h("button", { type: "button", class: "ghost", "aria-describedby": about, onclick: () => actions.regenerate(message) }, "Regenerate"));
    const rating = message.feedback?.rating ?? null;
    // Named by their visible words (no other aria-label): what a screen reader says is what voice control and
    // sighted users go by.
    for (const [value, text] of [
      [1, "Helpful"],
      [-1, "Not helpful"],
    ])
      buttons.push(
        h(
          "button",
          {
            type: "button",
            class: "ghost rate",
            "aria-describedby": about,
            "aria-pressed": String(rating === value),
            onclick: () => actions.feedback(message, rating === value ? null : value),
          },
          text,
        ),
      );
  }
  return h("div", { class: "msg-actions" }, branchSwitcher(message, actions), buttons);
}

/** The Edit button turns the user's message into a form; sending it creates a sibling (a new branch). */
function wireEdit(item, message, actions) {
  const button = item.querySelector("[data-action=edit]");
  if (!button) return;
  button.addEventListener("click", () => {
    // Open already (a second click, a double click): its text box takes the focus; there is no content to swap.
    const open = item.querySelector(".edit-form textarea");
    if (open) return open.focus();
    if (actions.busy()) return;
    const content = item.querySelector(".content");
    // Cancelled (Escape or Cancel): the message again, and the focus back on its Edit button, not lost to the page.
    const cancel = () => {
      form.replaceWith(content);
      button.focus();
    };
    const text = h("textarea", { class: "edit-text", rows: 3, "aria-label": "Edited message" });
    text.value = message.content;
    const form = h(
      "form",
      {
        class: "edit-form",
        onsubmit: (event) => {
          event.preventDefault();
          if (text.value.trim()) actions.edit(message, text.value); // the message's files are kept (chat.js)
        },
      },
      text,
      h("div", { class: "row" }, h("button", { type: "submit" }, "Send"), h("button", { type: "button", class: "ghost", onclick: cancel }, "Cancel")),
    );
    text.addEventListener("keydown", (event) => {
      if (event.key === "Escape") cancel();
      // Not the Enter ending an IME composition; on a touch screen Enter adds a line (the form's Send sends).
      if (event.key === "Enter" && !event.shiftKey && !composing(event) && !touchScreen()) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    content.replaceWith(form);
    text.focus();
  });
}
