// Messages and polling shared by the views.

import { ApiError, getToken } from "./api.js";

const message = document.getElementById("message");

/** Show why something failed, in words a person can act on. */
export function showError(err) {
  if (err && err.name === "AbortError") return;
  let text;
  if (err instanceof ApiError && err.status === 401) {
    text = getToken()
      ? `The orchestrator refused this token: ${err.message}. Enter a valid token above.`
      : `This orchestrator needs a token: ${err.message}. Enter the admin's or your user token above.`;
  } else if (err instanceof ApiError && err.status === 403) {
    text = `Not allowed with this token: ${err.message}`;
  } else if (err instanceof ApiError) {
    text = err.message;
  } else {
    text = `Something went wrong in the page: ${err && err.message ? err.message : err}`;
  }
  message.textContent = text;
  message.dataset.kind = err instanceof ApiError ? err.code : "error";
  message.hidden = false;
}

export function clearError() {
  message.hidden = true;
  message.textContent = "";
  delete message.dataset.kind;
}

/** Run fn every `ms` until the view's signal aborts; the first run is immediate. */
export function every(ms, signal, fn) {
  let timer = null;
  let first = true;
  const tick = async () => {
    if (signal.aborted) return;
    // A hidden tab does not poll (it would only load the orchestrator); it catches up when shown.
    if (document.hidden && !first) {
      timer = setTimeout(tick, ms);
      return;
    }
    first = false;
    try {
      await fn();
      clearError();
    } catch (err) {
      showError(err);
    }
    if (!signal.aborted) timer = setTimeout(tick, ms);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  tick();
}
