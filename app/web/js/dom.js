// Building DOM nodes without innerHTML: text is always text (no markup parsed), handlers are listeners.

/** h("button", {class: "x", onclick: fn, hidden: true}, "text", child) -> the element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "value") el.value = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A short date and time in the reader's locale. */
export function when(iso) {
  return iso ? new Date(iso).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" }) : "";
}

/** The values of a form's named fields, empty strings left out. */
export function formValues(form) {
  const values = {};
  for (const [name, value] of new FormData(form)) if (typeof value === "string" && value.trim() !== "") values[name] = value.trim();
  return values;
}

/**
 * A keydown that belongs to an IME composition (Japanese, Chinese...), whose Enter confirms the text rather than
 * sends it: `isComposing`, or keyCode 229, which some Safari versions send instead for the composition's Enter.
 */
export const composing = (event) => event.isComposing || event.keyCode === 229;

/** A touch screen as the main pointer (a phone, a tablet), whose keyboard has no Shift+Enter: there Enter in a
 * message box (the composer, an edit) adds a line and the form's button sends. */
export const touchScreen = () => window.matchMedia("(pointer: coarse)").matches;

// Whether a message may show now: main.js says not while nobody is signed in, so the error of a request that the
// ended session left behind (its 401, "Not authenticated") does not show over the login form.
let showing = () => true;
export function toastsWhen(predicate) {
  showing = predicate;
}

/** A message in the page's toast area (role=status, so screen readers announce it). */
export function notify(text, kind = "info") {
  const area = document.getElementById("toasts");
  if (!area || !showing()) return;
  const toast = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  area.append(toast);
  setTimeout(() => toast.remove(), kind === "error" ? 8000 : 4000);
}

/** Copy a link (or `what` else); without the clipboard API (plain http is not a secure context) select it for Ctrl+C. */
export function copy(text, field, what = "Link") {
  const manual = () => {
    // A form field selects its value; any other element (an id in a table) its text.
    if (field.select) field.select();
    else getSelection().selectAllChildren(field);
    notify("Selected: press Ctrl+C (⌘C) to copy.");
  };
  if (navigator.clipboard) navigator.clipboard.writeText(text).then(() => notify(`${what} copied.`), manual);
  else manual();
}

/** An id from the browser's CSPRNG (crypto.randomUUID needs a secure context; this works on plain http too). */
export function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export const APP_NAME = "n8n Chat";

/** The browser tab's title: the page's own name (the open chat's title, an admin page's name), then the app's. */
export function pageTitle(name) {
  document.title = name ? `${name} – ${APP_NAME}` : APP_NAME;
}
