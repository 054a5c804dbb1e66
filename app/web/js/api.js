// The API client: same-origin fetch with the httpOnly cookies, JSON errors, and one silent refresh on 401.

export class ApiError extends Error {
  /** `body`: the JSON error as sent, for what it carries besides `detail` (a login's `teams`). */
  constructor(status, detail, retryAfter = null, body = null) {
    super(detail);
    this.status = status;
    this.retryAfter = retryAfter;
    this.body = body;
  }
}

/** Called when the session is gone for good (refresh refused); main.js shows the login page. */
let onSignedOut = () => {};
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

// One refresh at a time: parallel 401s (several requests of one page) share it, so the refresh token is
// rotated once. The server's grace window covers two tabs refreshing at once.
let refreshing = null;
export function refreshSession() {
  refreshing ??= fetch("/api/auth/refresh", { method: "POST", credentials: "same-origin" })
    .then((response) => response.ok)
    .catch(() => false)
    .finally(() => setTimeout(() => (refreshing = null), 0));
  return refreshing;
}

const NO_REFRESH = ["/api/auth/login", "/api/auth/refresh", "/api/auth/logout", "/api/auth/register"];

/**
 * One entry of a 422 `detail` list as a reader wants it: `field`, the body's (or query's) field it concerns
 * (`loc` past `body`, `query`...: null for the whole body or an item of a list body), `path` (all of `loc`
 * past its first element, dotted) and `msg` without pydantic's "Value error, " prefix.
 */
export function problem(d) {
  const loc = (Array.isArray(d?.loc) ? d.loc : []).slice(1).map(String);
  const msg = String(d?.msg ?? "").replace(/^(Value error|Assertion failed), /, "");
  return { field: loc.length && !/^\d+$/.test(loc[0]) ? loc[0] : null, path: loc.join("."), msg };
}

const escaped = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/**
 * A 422 entry as one line, naming its field once: "name: String should have at least 1 character", but
 * "webhook_url contains whitespace…" (the message already starts with the field), and "Chat 1: …" alone for
 * an item of a list body (an import: the message names the item itself).
 */
export function problemText(d) {
  const { path, msg } = problem(d);
  if (/^\d+(\.|$)/.test(path)) return msg;
  const last = path.split(".").at(-1);
  if (last && new RegExp(`^\`?${escaped(last)}\`? `).test(msg)) return msg;
  return `${path || "body"}: ${msg}`;
}

/** FastAPI's `detail` as text: a string as it is, the 422 list as its lines (`problemText`); else `fallback`. */
function detailText(detail, fallback) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map(problemText).join("; ");
  return fallback;
}

/** The error an answer carries: FastAPI's `detail`, a string or the 422 list (field: message). */
export async function errorOf(response) {
  let detail = `${response.status} ${response.statusText}`;
  let body = null;
  try {
    body = await response.json();
    detail = detailText(body.detail, detail);
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, detail, response.headers.get("Retry-After"), body);
}

/**
 * A request to the API. `body` is sent as JSON, `form` as multipart, `payload` (a Blob or File) as it is
 * with the Content-Type given in `headers`; `raw` returns the Response (streams).
 * A 401 triggers one refresh and one retry (same headers, so an Idempotency-Key is kept).
 */
export async function api(path, { method = "GET", body, form, payload, headers = {}, raw = false, signal } = {}) {
  const init = { method, credentials: "same-origin", headers: { ...headers }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  } else if (form) init.body = form;
  else if (payload !== undefined) init.body = payload;
  let response = await fetch(path, init);
  if (response.status === 401 && !NO_REFRESH.includes(path)) {
    if (await refreshSession()) response = await fetch(path, init);
    if (response.status === 401) onSignedOut();
  }
  if (raw) return response;
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

/** A page of a list endpoint: its items and the `X-Total-Count` header. */
export async function page(path, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== ""));
  const response = await api(`${path}?${query}`, { raw: true });
  if (!response.ok) throw await errorOf(response);
  return { items: await response.json(), total: Number(response.headers.get("X-Total-Count") || 0) };
}

/**
 * Upload one file as the multipart field `file`, reporting progress (fetch cannot: XMLHttpRequest can).
 * Resolves with the JSON answer; rejects with an ApiError (the API's `detail`) or a TypeError (network).
 * `abort` cancels it. A 401 triggers the same one refresh and one retry as `api`.
 */
export function upload(path, file, { onProgress = () => {} } = {}) {
  let xhr = null;
  let aborted = false;
  const once = () =>
    new Promise((resolve, reject) => {
      xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      xhr.withCredentials = true;
      xhr.upload.addEventListener("progress", (event) => event.lengthComputable && onProgress(event.loaded / event.total));
      xhr.addEventListener("load", () => resolve(xhr));
      xhr.addEventListener("error", () => reject(new TypeError("The server could not be reached.")));
      xhr.addEventListener("abort", () => reject(new DOMException("Upload cancelled", "AbortError")));
      const form = new FormData();
      form.append("file", file, file.name);
      xhr.send(form);
    });
  const result = (async () => {
    let done = await once();
    if (done.status === 401 && !aborted && (await refreshSession())) {
      // Cancelled while the session was refreshed (removed, or the chats left): not sent again.
      if (aborted) throw new DOMException("Upload cancelled", "AbortError");
      done = await once();
    }
    if (done.status === 401) onSignedOut();
    let body = null;
    try {
      body = JSON.parse(done.responseText);
    } catch {
      // not JSON: the status line below
    }
    if (done.status >= 200 && done.status < 300) return body;
    const detail = detailText(body?.detail, `${done.status} ${done.statusText}`); // a 422 names its field, as in `api`
    throw new ApiError(done.status, detail, done.getResponseHeader("Retry-After"), body);
  })();
  return {
    result,
    abort() {
      aborted = true;
      xhr?.abort();
    },
  };
}

/** The file name a `Content-Disposition: attachment` header gives (RFC 6266 `filename*` first), or null. */
export function attachmentName(header) {
  if (!header) return null;
  const extended = /filename\*=UTF-8''([^;]+)/i.exec(header);
  if (extended) {
    try {
      return decodeURIComponent(extended[1]);
    } catch {
      // a malformed encoding: fall back to the plain name
    }
  }
  return /filename="([^"]*)"/i.exec(header)?.[1] ?? null;
}

/**
 * Download an API attachment (a file, an export) through `api`, so the silent refresh applies and a refusal
 * is an ApiError, then hand the bytes to the browser as a saved file (a blob: URL on a temporary link).
 * The content is never displayed by the page.
 */
export async function download(path, fallbackName = "download") {
  const response = await api(path, { raw: true });
  if (!response.ok) throw await errorOf(response);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = attachmentName(response.headers.get("Content-Disposition")) || fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
