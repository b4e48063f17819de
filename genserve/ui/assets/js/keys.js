// The API key: kept in this browser's local storage, asked for when the server answers 401, explained when it
// answers 403. The key is handed to api.js, which sends it as "Authorization: Bearer" on every request.

import { setApiKey } from "./api.js";

// Local storage is per origin (scheme, host, port); the app's path is part of the name so that two servers behind
// one proxy, under different prefixes, keep their keys apart.
const STORAGE_KEY = `genserve.apiKey:${new URL("../../../", import.meta.url).pathname}`;

export function storedKey() {
  try {
    return localStorage.getItem(STORAGE_KEY);
  } catch {
    return null; // storage switched off: the key lasts as long as the page
  }
}

function store(key) {
  try {
    if (key) localStorage.setItem(STORAGE_KEY, key);
    else localStorage.removeItem(STORAGE_KEY);
  } catch {
    // storage switched off: nothing to keep
  }
}

// Explanations of the answers that concern the key, for people who have never seen the server's config.
export function explain(error) {
  if (error.status === 401) {
    return storedKey()
      ? `The server refused the API key (401: ${error.message}). Check it, or ask the server's operator for one.`
      : "This server needs an API key (401). Enter one to use the playground; the operator configures them in auth.keys.";
  }
  if (error.status === 403) {
    return `The API key is valid but may not do this (403: ${error.message}). A key needs the 'read' scope to browse and 'generate' to make images.`;
  }
  return error.message;
}

export class KeyPrompt {
  // onChange(): called after a key is saved or forgotten, so the page reloads what it shows.
  constructor(elements, onChange) {
    this.el = elements;
    this.onChange = onChange;
    setApiKey(storedKey());
    this.el.button.addEventListener("click", () => this.ask("Enter the API key for this server."));
    this.el.form.addEventListener("submit", (event) => this.submit(event));
    this.refreshButton();
  }

  // Open the dialog with a reason (why the page asks).
  ask(reason) {
    this.el.reason.textContent = reason;
    this.el.input.value = storedKey() || "";
    this.el.forget.hidden = !storedKey();
    this.el.button.hidden = false;
    if (!this.el.dialog.open) this.el.dialog.showModal();
    this.el.input.focus();
  }

  submit(event) {
    const action = event.submitter ? event.submitter.value : "save";
    const key = action === "forget" ? "" : this.el.input.value.trim();
    if (action === "save" && !key) {
      event.preventDefault(); // keep the dialog open: an empty key cannot work
      this.el.reason.textContent = "Type a key first.";
      return;
    }
    store(key);
    setApiKey(key);
    this.refreshButton();
    this.onChange();
  }

  refreshButton() {
    const key = storedKey();
    this.el.button.textContent = key ? "API key ✓" : "API key";
    if (key) this.el.button.hidden = false;
  }
}
