// The message stream (docs/STREAMING_API_GUIDE.md): send with an Idempotency-Key and retry on a lost
// connection, follow a running answer after a reload with Last-Event-ID, stop it. Events are deduplicated by
// their id, which belongs to the generation: a retry or a resume replays nothing twice.
import { ApiError, api, errorOf } from "./api.js";
import { randomId } from "./dom.js";

const TERMINAL = new Set(["done", "error"]);
const RETRIES = 3;
const FOLLOWS = 5; // follows in a row that bring no new event before giving up

/** Each `{id, event}` of an SSE body, in order; `: ping` comments are skipped. */
export async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const lines = buffer.slice(0, end).split("\n");
        buffer = buffer.slice(end + 2);
        const id = lines.find((l) => l.startsWith("id:"))?.slice(3).trim();
        const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield { id: id === undefined ? null : Number(id), event: JSON.parse(data) };
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * A value per chat in this tab's sessionStorage, under `<prefix>:<chatId>` (JSON; unreadable reads as null).
 * A full sessionStorage (its quota) loses the value, never what writes it: an answer's position that could not
 * be kept was taken for a network failure (the send made again, then followed), a draft's stopped the typing.
 * The older value goes too: it would be read later as if it were the latest.
 */
function perChat(prefix) {
  return {
    key: (chatId) => `${prefix}:${chatId}`,
    read(chatId) {
      try {
        return JSON.parse(sessionStorage.getItem(this.key(chatId)) || "null");
      } catch {
        return null;
      }
    },
    write(chatId, state) {
      try {
        sessionStorage.setItem(this.key(chatId), JSON.stringify(state));
      } catch {
        this.clear(chatId);
      }
    },
    clear(chatId) {
      sessionStorage.removeItem(this.key(chatId));
    },
  };
}

/** Where this tab is in a chat's running answer, kept so a reload can continue it. */
export const saved = {
  ...perChat("stream"),
  /** Every chat's, the sends kept in `waiting`, the `drafts` and `pendingUploads` (the session ends: neither an answer's text nor
   * a message waiting to be sent or being written is left in the tab for whoever signs in next). */
  clearAll() {
    for (const key of Object.keys(sessionStorage)) if (/^(stream|unsent|draft|files):/.test(key)) sessionStorage.removeItem(key);
  },
};

/**
 * A send waiting for the network ({user, body, key, files}), kept while it waits: a chat left meanwhile (another
 * chat, a reload) stops the send, and its text would otherwise be gone. Given back when the chat opens again
 * (chat.js), to the same user only; `saved.clearAll` removes it with the session.
 */
export const waiting = perChat("unsent");

/**
 * What the message box holds and the server does not have yet ({user, text}), kept on each input so a reload,
 * a crashed tab restored or another chat opened loses nothing; given back when the chat opens, to the same user
 * only (chat.js). `saved.clearAll` removes it with the session.
 */
export const drafts = perChat("draft");

/**
 * A chat's uploaded files not sent yet ({user, files: [File]}), kept with its draft so a reload or the chats left
 * and opened again gives them back pending, to the same user only (attachments.js). Uploads still under way are
 * not: their bytes are the browser's. `saved.clearAll` removes them with the session.
 */
export const pendingUploads = perChat("files");

/** A send that never reached an answer: the server could not be reached (no HTTP answer at all). `key` is its
 * Idempotency-Key, to send the same message again with: if it did reach the server, it is answered, not stored
 * twice. */
export class NotSent extends Error {
  constructor(key) {
    super("Your message was not sent: the server could not be reached.");
    this.key = key;
  }
}

/**
 * One generation as this tab sees it. `handlers`: onStart(data), onStatus(data), onTool(data),
 * onText(fullText), onEnd(type, data), onWaiting(waiting) (a send waiting for the network). `from` resumes a
 * saved position ({generation, last, text}).
 */
export class Generation {
  constructor(chatId, handlers, from = null) {
    this.chatId = chatId;
    this.handlers = handlers;
    this.generation = from?.generation ?? null;
    this.last = from?.last ?? 0;
    this.text = from?.text ?? "";
    this.ended = false;
    this.waiting = false; // the send waits for the network: the server has nothing yet (Stop cancels it)
    this.aborter = new AbortController(); // leave(): the page moved on; the server goes on regardless
  }

  leave() {
    this.aborter.abort();
  }

  get left() {
    return this.aborter.signal.aborted;
  }

  handle({ id, event }) {
    // Left (another chat, a logout): events still buffered in the stream are not this page's any more, and
    // writing their position would put back what a logout removed from sessionStorage.
    if (this.left) return;
    if (id !== null) {
      if (id <= this.last) return; // already handled (a retry or a resume replays from an earlier id)
      this.last = id;
    }
    const { type, data } = event;
    if (type === "start") {
      this.generation = data.assistant_message_id;
      this.handlers.onStart?.(data);
    } else if (type === "status") this.handlers.onStatus?.(data);
    else if (type === "tool") this.handlers.onTool?.(data);
    else if (type === "message") {
      this.text += data.content;
      this.handlers.onText?.(this.text);
    }
    if (TERMINAL.has(type)) {
      this.ended = true;
      saved.clear(this.chatId);
      this.handlers.onEnd?.(type, data);
    } else if (this.generation) {
      saved.write(this.chatId, { generation: this.generation, last: this.last, text: this.text });
    }
  }

  async consume(response) {
    for await (const item of sseEvents(response.body)) {
      this.handle(item);
      if (this.ended) return;
    }
  }

  /**
   * POST a message (`body`: {content} | {content, edit_of} | {regenerate_of}) with Idempotency-Key `key`. A
   * refusal (JSON 4xx/5xx) throws an ApiError; a connection lost before the `start` event is retried with the
   * same key (the server answers a request it already has with the same generation: nothing is stored or sent
   * to n8n twice). While the browser is offline nothing is counted: the send waits for the network
   * (onWaiting(true), then onWaiting(false)) and is tried again. RETRIES failures in a row while online, and
   * no `start`: the server cannot be reached, and NotSent is thrown, so the caller gives the text back to the
   * user (sent again with the same key, a request that did reach the server is answered, not stored twice).
   * Once `start` came, the answer is followed on /stream from the last event handled: a retried send answers
   * the whole stream again, and once its live events are gone it is rebuilt from storage with the text in one
   * event, which would be added to the text already shown.
   */
  async send(body, key = randomId()) {
    for (let failures = 0; !this.ended && !this.generation && !this.left; ) {
      try {
        const response = await api(`/api/chats/${this.chatId}/messages`, {
          method: "POST",
          body,
          raw: true,
          headers: { "Idempotency-Key": key, Accept: "text/event-stream" },
          signal: this.aborter.signal,
        });
        if (!response.ok) throw await errorOf(response);
        await this.consume(response);
      } catch (err) {
        if (err instanceof ApiError) throw err;
        // a network error: tried again below
      }
      if (this.ended || this.generation || this.left) break;
      if (offline()) {
        this.waiting = true;
        this.handlers.onWaiting?.(true);
        await online(this.aborter.signal);
        this.waiting = false;
        if (!this.left) this.handlers.onWaiting?.(false);
        continue;
      }
      if (++failures >= RETRIES) throw new NotSent(key);
      await pause(400 * failures, this.aborter.signal);
    }
    if (!this.ended && !this.left) await this.follow();
  }

  /**
   * Follow the chat's running answer after `this.last` (204: it ended and the stored message is the answer).
   * A lost connection, a 5xx or a stream that closes before its terminal event is followed again from
   * `this.last`, after a growing pause: FOLLOWS times in a row without a new event, then it ends as "gone".
   * While the browser is offline it waits for the network instead, and follows again once it is back.
   */
  async follow() {
    for (let failures = 0; !this.ended && !this.left; ) {
      const before = this.last;
      try {
        const query = this.generation ? `?assistant_message_id=${encodeURIComponent(this.generation)}` : "";
        const headers = this.last ? { "Last-Event-ID": String(this.last) } : {};
        const response = await api(`/api/chats/${this.chatId}/stream${query}`, {
          raw: true,
          headers,
          signal: this.aborter.signal,
        });
        if (response.status === 204) {
          this.ended = true;
          saved.clear(this.chatId);
          this.handlers.onEnd?.("gone", null);
          return;
        }
        if (!response.ok && response.status < 500) throw await errorOf(response);
        if (response.ok) await this.consume(response);
      } catch (err) {
        if (err instanceof ApiError) throw err;
        // a network error: followed again below
      }
      if (this.ended || this.left) return;
      if (offline()) {
        // The browser has no network: the server is not at fault, so nothing is counted, and the answer is
        // followed as soon as the network is back (giving up would leave a chat that cannot be read either).
        await online(this.aborter.signal);
        failures = 0;
        continue;
      }
      failures = this.last > before ? 0 : failures + 1; // new events: the connection worked, then dropped
      if (failures >= FOLLOWS) break;
      await pause(Math.min(500 * 2 ** failures, 8000), this.aborter.signal);
    }
    if (!this.ended && !this.left) {
      this.ended = true;
      this.handlers.onEnd?.("gone", null);
    }
  }
}

/** The browser knows it has no network (`navigator.onLine` false is certain; true may not be). */
const offline = () => navigator.onLine === false;

/** Wait until the browser is online again, or `signal` aborts (the page moved on). */
export const online = (signal) =>
  new Promise((resolve) => {
    const done = () => {
      window.removeEventListener("online", done);
      signal.removeEventListener("abort", done);
      resolve();
    };
    window.addEventListener("online", done);
    signal.addEventListener("abort", done, { once: true });
    if (!offline() || signal.aborted) done();
  });

/** Wait `ms`, or less when `signal` aborts (the page moved on); no listener is left behind either way. */
const pause = (ms, signal) =>
  new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });

/** Stop the chat's running answer; null when nothing was running (409). */
export async function stopGeneration(chatId) {
  try {
    return await api(`/api/chats/${chatId}/stop`, { method: "POST" });
  } catch (err) {
    if (err instanceof ApiError && err.status === 409) return null;
    throw err;
  }
}
