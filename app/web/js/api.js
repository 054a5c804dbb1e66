// The API client: same-origin fetch with the httpOnly cookies, JSON errors, and one silent refresh on 401.

export class ApiError extends Error {
  constructor(status, detail, retryAfter = null) {
    super(detail);
    this.status = status;
    this.retryAfter = retryAfter;
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

/** The error an answer carries: FastAPI's `detail`, a string or the 422 list (field: message). */
export async function errorOf(response) {
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail))
      detail = body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "body"}: ${d.msg}`).join("; ");
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, detail, response.headers.get("Retry-After"));
}

/**
 * A request to the API. `body` is sent as JSON, `form` as multipart; `raw` returns the Response (streams).
 * A 401 triggers one refresh and one retry (same headers, so an Idempotency-Key is kept).
 */
export async function api(path, { method = "GET", body, form, headers = {}, raw = false, signal } = {}) {
  const init = { method, credentials: "same-origin", headers: { ...headers }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  } else if (form) init.body = form;
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
