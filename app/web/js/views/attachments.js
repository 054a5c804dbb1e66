// The composer's attachments: pick, drop or paste files, upload them one at a time with a progress bar, remove
// an unsent one, show the API's refusal (415 type, 413 size, 409 too many, 429 busy) on the file it concerns.
// The chat view sends the uploaded ones' ids with the message (`file_ids`, docs/FILES.md).
import { ApiError, api, upload } from "../api.js";
import { h, notify } from "../dom.js";
import { pendingUploads } from "../stream.js";
import { size } from "./messages.js";

let next = 0;

export class Attachments {
  /**
   * `chatId`: null for a new chat not made yet; `create` makes it (the first upload waits for it) and gives its id.
   * `user`: whose pending files the tab keeps (`pendingUploads`): those kept for this chat are pending again.
   */
  constructor(chatId, create = null, user = null) {
    this.chatId = chatId;
    this.create = create;
    this.user = user;
    this.items = []; // {key, file, state: "waiting" | "uploading" | "done" | "error", progress, record, error, handle}
    this.queue = Promise.resolve(); // one upload at a time: the server allows a user only a few at once
    this.closed = false; // close(): the chats were left, nothing more is sent
    this.list = h("ul", { class: "uploads", "aria-label": "Files to send", hidden: true });
    this.input = h("input", { type: "file", multiple: true, hidden: true, "aria-label": "Files to attach" });
    this.input.addEventListener("change", () => {
      this.add([...this.input.files]);
      this.input.value = "";
    });
    if (chatId) {
      const kept = pendingUploads.read(chatId);
      if (kept?.user === user && Array.isArray(kept.files)) this.restore(kept.files);
      else if (kept) pendingUploads.clear(chatId); // another user's: not shown, and gone
    }
  }

  /** The uploaded files still pending, kept in the tab (on each change of state: a few ids and names), so a
   * reload gives them back with the draft; none kept once they are sent or removed. */
  keep() {
    if (!this.chatId || this.closed) return;
    const files = this.items.filter((item) => item.state === "done").map((item) => item.record);
    if (files.length) pendingUploads.write(this.chatId, { user: this.user, files });
    else pendingUploads.clear(this.chatId);
  }

  /** The list of pending files (the same element across renders of the composer). */
  element() {
    return this.list;
  }

  /** The attach button and its (hidden) file input. */
  button() {
    return [
      h("button", { type: "button", class: "secondary attach", "aria-label": "Attach files", title: "Attach files (or drop or paste them here)", onclick: () => this.input.click() }, "Attach"),
      this.input,
    ];
  }

  /** Files dropped on the composer or pasted into the message box are attached too. */
  accept(form, textarea) {
    form.addEventListener("dragover", (event) => {
      if (!event.dataTransfer?.types.includes("Files")) return;
      event.preventDefault();
      form.classList.add("dropping");
    });
    form.addEventListener("dragleave", () => form.classList.remove("dropping"));
    form.addEventListener("drop", (event) => {
      form.classList.remove("dropping");
      if (!event.dataTransfer?.files.length) return;
      event.preventDefault();
      this.add([...event.dataTransfer.files]);
    });
    textarea.addEventListener("paste", (event) => {
      const files = [...(event.clipboardData?.files || [])];
      if (!files.length) return; // plain text pastes as usual
      event.preventDefault();
      this.add(files);
    });
  }

  add(files) {
    if (this.closed) return; // a composer still on screen while the next page loads
    for (const file of files) {
      const item = { key: ++next, file, state: "waiting", progress: 0, record: null, error: null, handle: null };
      this.items.push(item);
      this.queue = this.queue.then(() => this.upload(item));
    }
    this.render();
  }

  async upload(item) {
    if (!this.items.includes(item)) return; // removed while waiting
    if (!this.chatId) {
      try {
        this.chatId = await this.create();
      } catch (err) {
        item.state = "error";
        item.error = err instanceof ApiError ? err.message : "The server could not be reached.";
        if (this.items.includes(item)) this.render();
        return;
      }
      if (!this.items.includes(item) || this.closed) return;
    }
    item.state = "uploading";
    item.handle = upload(`/api/chats/${this.chatId}/files`, item.file, {
      onProgress: (fraction) => {
        item.progress = fraction;
        const bar = this.list.querySelector(`[data-key="${item.key}"] progress`);
        if (bar) bar.value = fraction;
      },
    });
    this.render();
    try {
      item.record = await item.handle.result;
      item.state = "done";
    } catch (err) {
      if (err instanceof DOMException && err.name === "AbortError") return;
      item.state = "error";
      // Shown on the file itself (role=alert, so it is announced), not in a toast that would go away.
      item.error = err instanceof ApiError ? err.message : "The server could not be reached.";
    }
    if (this.items.includes(item)) this.render();
    else if (item.record && !this.closed) this.discard(item.record); // removed while uploading: delete what arrived
  }

  /** The page leaves the chats for good (a logout, a session that ends, another page): the upload under way
   * is cancelled and the waiting ones never start, so no file goes out later, refused with 401 or with the
   * cookies of whoever signs in next in the tab. Uploads already stored stay on the server unsent, as after
   * a reload (docs/FILES.md): no request is made for them, since the session may be gone. */
  close() {
    this.closed = true;
    const running = this.items.find((item) => item.state === "uploading");
    this.items = [];
    running?.handle.abort();
  }

  /** Files already uploaded (`records`) pending again: a send given back after a reload (chat.js). Those still
   * pending (the chat was left and opened again in the same page) are not listed twice. */
  restore(records) {
    if (this.closed) return;
    const pending = new Set(this.items.map((item) => item.record?.id));
    for (const record of records) {
      if (!pending.has(record.id)) this.items.push({ key: ++next, file: null, state: "done", progress: 1, record, error: null, handle: null });
    }
    this.render();
  }

  /** The uploaded files to send, or null while one is still on its way. Refused ones are not sent. */
  ready() {
    if (this.items.some((item) => item.state === "waiting" || item.state === "uploading")) return null;
    return this.items.filter((item) => item.state === "done").map((item) => item.record);
  }

  /** The message carrying `files` is stored: they leave the composer, and so do the refused ones. */
  sent(files) {
    const ids = new Set(files.map((file) => file.id));
    this.items = this.items.filter((item) => item.state !== "error" && !(item.record && ids.has(item.record.id)));
    this.render();
  }

  /** Remove a pending file: cancel its upload, or delete the unsent upload on the server. */
  async remove(item) {
    this.items = this.items.filter((other) => other !== item);
    this.render();
    if (item.state === "uploading") item.handle.abort();
    if (item.record) await this.discard(item.record);
  }

  async discard(record) {
    try {
      await api(`/api/chats/${this.chatId}/files/${record.id}`, { method: "DELETE" });
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) notify(`${record.filename}: ${err.message}`, "error");
    }
  }

  /**
   * Draw the pending files, changing only what changed: a file's element stays while its state does (an upload's
   * progress only moves its bar), so the focus on its × stays, and a refusal (`role="alert"`) is announced once,
   * not again on every progress event of another upload. The focus on the × of a file that went (removed, or
   * drawn anew in another state) goes to that file's new ×, else the next file's, else the previous one's, else
   * the message box.
   */
  render() {
    this.keep();
    this.list.hidden = this.items.length === 0;
    const shown = new Map([...this.list.children].map((li) => [li.dataset.key, li]));
    const focused = this.list.contains(document.activeElement) ? document.activeElement.closest("li") : null;
    const focusedAt = focused ? [...this.list.children].indexOf(focused) : -1;
    let previous = null;
    for (const item of this.items) {
      let li = shown.get(String(item.key));
      shown.delete(String(item.key));
      if (li?.dataset.state === item.state) {
        const bar = li.querySelector("progress");
        if (bar) bar.value = item.progress;
      } else {
        const fresh = this.itemElement(item);
        li?.remove();
        li = fresh;
      }
      if (previous ? previous.nextSibling !== li : this.list.firstChild !== li) {
        if (previous) previous.after(li);
        else this.list.prepend(li);
      }
      previous = li;
    }
    for (const li of shown.values()) li.remove();
    if (focused && !focused.isConnected) {
      const same = this.list.querySelector(`li[data-key="${focused.dataset.key}"]`);
      const near = same || this.list.children[focusedAt] || this.list.children[focusedAt - 1];
      (near?.querySelector(".remove") || this.list.closest("form")?.querySelector("textarea"))?.focus();
    }
  }

  itemElement(item) {
    const name = item.record?.filename ?? item.file.name;
    return h(
      "li",
      { class: `upload ${item.state}`, "data-key": item.key, "data-state": item.state },
      h("span", { class: "file-name" }, name),
      " ",
      h("span", { class: "muted" }, size(item.record?.size ?? item.file.size)),
      item.state === "uploading" && h("progress", { max: 1, value: item.progress, "aria-label": `Uploading ${name}` }),
      item.state === "waiting" && h("span", { class: "muted" }, " waiting…"),
      item.state === "error" && h("span", { class: "error", role: "alert" }, ` ${item.error}`),
      h("button", { type: "button", class: "ghost remove", "aria-label": `Remove ${name}`, onclick: () => this.remove(item) }, "×"),
    );
  }
}
