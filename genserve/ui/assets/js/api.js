// The API client: every request the page makes goes through here.
//
// - URLs are resolved against the app's root, found from this module's own URL (…/ui/assets/js/api.js), never
//   written as "/…": behind a reverse proxy that serves GenServe under a path prefix, the prefix is kept.
// - The API key (keys.js keeps it) rides on every request as "Authorization: Bearer". That is also why the page
//   reads event streams with fetch() instead of EventSource, and images as blobs instead of <img src>: neither
//   EventSource nor an <img> can send a header.
// - Errors become ApiError with the server's own message (GenServe's `detail`/`error`, or OpenAI's error.message).
// - Seeds go up to 2^63-1, past what a JS number holds exactly: JSON is parsed and written so a seed keeps all of
//   its digits (parseJson, seedJson).

export const API_ROOT = new URL("../../../", import.meta.url);

let apiKey = null;

export function setApiKey(key) {
  apiKey = key || null;
}

export function url(path, query) {
  const target = new URL(path.replace(/^\/+/, ""), API_ROOT);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null) target.searchParams.set(name, String(value));
  }
  return target;
}

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status; // 0: the server could not be reached
    this.body = body;
  }

  get needsKey() {
    return this.status === 401;
  }
}

function headers(extra) {
  const all = { ...(extra || {}) };
  if (apiKey) all.Authorization = `Bearer ${apiKey}`;
  return all;
}

// JSON.parse, except that integers too large for a JS number (seeds) come back as BigInt with every digit.
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value) && context?.source) {
      return BigInt(context.source);
    }
    return value;
  });
}

// A seed as it goes into a JSON body: a number, or the digits themselves when a number would round them.
export function seedJson(seed) {
  if (typeof seed === "bigint") {
    return JSON.rawJSON ? JSON.rawJSON(seed.toString()) : Number(seed);
  }
  return seed;
}

function stringify(body) {
  return JSON.stringify(body, (key, value) => (typeof value === "bigint" ? seedJson(value) : value));
}

function messageOf(status, body, fallback) {
  if (body && typeof body === "object") {
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((item) => item.msg || String(item)).join("; ");
    if (typeof body.error === "string") return body.error;
    if (body.error && typeof body.error.message === "string") return body.error.message;
  }
  return fallback || `HTTP ${status}`;
}

async function send(path, { method = "GET", query, body, signal, accept = "application/json" } = {}) {
  const init = { method, signal, headers: headers({ Accept: accept }) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = stringify(body);
  }
  let response;
  try {
    response = await fetch(url(path, query), init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "the server cannot be reached (is it running?)", null);
  }
  if (!response.ok) {
    const text = await response.text();
    let parsed = null;
    try {
      parsed = parseJson(text);
    } catch {
      parsed = null;
    }
    throw new ApiError(response.status, messageOf(response.status, parsed, text.slice(0, 200) || response.statusText), parsed);
  }
  return response;
}

export async function getJson(path, query) {
  const response = await send(path, { query });
  return parseJson(await response.text());
}

export async function postJson(path, body) {
  const response = await send(path, { method: "POST", body });
  return parseJson(await response.text());
}

export async function post(path) {
  const response = await send(path, { method: "POST" });
  return parseJson(await response.text());
}

// An image of a job as a Blob (format: png | jpeg | webp).
export async function imageBlob(jobId, format) {
  const response = await send(`image/${encodeURIComponent(jobId)}`, {
    query: format && format !== "png" ? { format } : undefined,
    accept: "image/*",
  });
  return response.blob();
}

// Read a Server-Sent Events stream, calling onEvent(kind, data) for each event, until the stream ends or `signal`
// aborts it. Resolves when the server closes the stream (GenServe does after a job's terminal event).
export async function readEvents(path, onEvent, signal) {
  const response = await send(path, { signal, accept: "text/event-stream" });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n"); // GenServe writes \n; other servers may write \r\n
    // Events end with a blank line; a chunk may hold several events, or part of one.
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      dispatch(buffer.slice(0, end), onEvent);
      buffer = buffer.slice(end + 2);
    }
  }
}

function dispatch(block, onEvent) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") kind = value;
    else if (field === "data") data.push(value);
  }
  if (data.length) onEvent(kind, parseJson(data.join("\n")));
}
