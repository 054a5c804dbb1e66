// The forms of the pages loaded on first use (admin, API keys): labelled fields, and a refusal shown under the
// field it concerns, in the API's words. Not imported by main.js: a first visit does not download it.
import { ApiError, problem, problemText } from "./api.js";
import { h } from "./dom.js";
import { waitText } from "./views/messages.js";

/** An error as the page shows it: the API's `detail`, with when to try again after a 429 that says so. */
export function errorText(err) {
  if (!(err instanceof ApiError)) return "The server could not be reached.";
  const wait = err.status === 429 ? waitText(Number(err.retryAfter)) : null;
  return wait ? `${err.message.replace(/\.$/, "")}. Try again in ${wait}.` : err.message;
}

/** What the form itself finds wrong before sending: `problems` as a 422's `detail` would list them. */
export class FormProblems extends ApiError {
  constructor(problems) {
    super(0, problems.map((p) => p.msg).join("; "), null, { detail: problems });
  }
}
export const formProblem = (field, msg) => new FormProblems([{ loc: ["body", field], msg }]);

/** Remove what `showProblems` marked: the fields' messages and `aria-invalid`, and the form's line. A field's
 * own hint (`field`'s third argument) stays its description. */
export function clearProblems(form, line) {
  for (const note of form.querySelectorAll(".field-error")) note.remove();
  for (const control of form.querySelectorAll("[aria-invalid]")) {
    control.removeAttribute("aria-invalid");
    if (control.dataset.hint) control.setAttribute("aria-describedby", control.dataset.hint);
    else control.removeAttribute("aria-describedby");
  }
  line.hidden = true;
}

/**
 * A refusal shown where it applies: each 422 entry (the API's or the form's own) under the field it names (the
 * control of that name), in its words without the field's name; the rest, and any other error, in `line` under
 * the form. The first field concerned takes the focus; nothing typed is changed.
 */
export function showProblems(form, line, err) {
  clearProblems(form, line);
  const entries = err instanceof ApiError && Array.isArray(err.body?.detail) ? err.body.detail : null;
  const rest = entries ? [] : [errorText(err)];
  let first = null;
  for (const entry of entries || []) {
    const { field, msg } = problem(entry);
    const control = field ? form.elements.namedItem(field) : null;
    const box = control instanceof HTMLElement ? control.closest(".field") : null;
    if (!box) {
      rest.push(problemText(entry));
      continue;
    }
    let note = box.querySelector(".field-error");
    if (!note) {
      note = h("p", { class: "field-error error", id: `${control.id}-error`, role: "alert" });
      box.append(note);
    } else note.append(h("br"));
    note.append(msg);
    control.setAttribute("aria-invalid", "true");
    control.setAttribute("aria-describedby", [control.dataset.hint, note.id].filter(Boolean).join(" "));
    first ??= control;
  }
  if (rest.length) {
    line.textContent = rest.join("; ");
    line.hidden = false;
  }
  first?.focus();
}

let fields = 0;
/** A labelled control; `hint`: a line under it that describes it (`aria-describedby`). */
export function field(label, control, hint = null) {
  const id = `a-${control.name || "field"}-${++fields}`; // unique: several forms share field names
  control.id = id;
  const note = hint && h("p", { class: "muted field-hint", id: `${id}-hint` }, hint);
  if (note) {
    control.dataset.hint = note.id;
    control.setAttribute("aria-describedby", note.id);
  }
  return h("div", { class: "field" }, h("label", { for: id }, label), control, note);
}
