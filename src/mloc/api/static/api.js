// The orchestrator's JSON API, called with the bearer token the user entered (kept in localStorage).

const TOKEN_KEY = "mloc.dashboard.token";

// Resolve API paths against the page's folder, so the dashboard also works behind a path prefix.
const BASE = new URL(".", document.baseURI);

export function getToken() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(accept) {
  const out = { Accept: accept };
  const token = getToken();
  if (token) out.Authorization = `Bearer ${token}`;
  return out;
}

function url(path, params) {
  const target = new URL(path.replace(/^\//, ""), BASE);
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(key, String(value));
  }
  return target;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's error page; the status says enough
  }
  const message = (body && body.message) || `HTTP ${response.status} ${response.statusText}`;
  return new ApiError(response.status, (body && body.error) || "http_error", message);
}

async function send(path, { method = "GET", params, signal, accept = "application/json" } = {}) {
  let response;
  try {
    response = await fetch(url(path, params), { method, headers: headers(accept), signal, cache: "no-store" });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "unreachable", `the orchestrator did not answer (${err.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function api(path, options = {}) {
  const response = await send(path, options);
  return response.json();
}

/**
 * Follow a task's log as server-sent events. EventSource cannot send an Authorization header, so this
 * reads the stream with fetch(). Calls onEntry(id, fields) per log entry and resolves with the final
 * state when the task ended; rejects when the connection breaks (the caller resumes from the last id).
 */
export async function followLogs(taskId, { since = "0", signal, onEntry }) {
  const response = await send(`api/v1/tasks/${encodeURIComponent(taskId)}/logs`, {
    params: { follow: "true", since },
    signal,
    accept: "text/event-stream",
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError(0, "stream_closed", "the log stream closed before the task ended");
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const event = { event: "message", id: null, data: [] };
      for (const line of block.split(/\r?\n/)) {
        const colon = line.indexOf(":");
        if (colon <= 0) continue;
        const field = line.slice(0, colon);
        const text = line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(text);
        else if (field === "event") event.event = text;
        else if (field === "id") event.id = text;
      }
      if (!event.data.length && event.event !== "end") continue; // a keep-alive comment
      const data = event.data.length ? JSON.parse(event.data.join("\n")) : {};
      if (event.event === "end") {
        await reader.cancel().catch(() => {});
        return data.state;
      }
      onEntry(event.id, data);
    }
  }
}
