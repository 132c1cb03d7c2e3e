// DOM helpers. Every string goes into the page as a text node or an attribute value, never as HTML,
// so task names, log lines and results cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) throw new Error(`use addEventListener, not ${key}`);
    if (key === "text") el.textContent = String(value);
    else if (key === "class") el.setAttribute("class", String(value));
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h("a", {href: "#/x", class: "y"}, "text", otherNode) */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

export function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

export function fmtTime(epochSec) {
  if (!epochSec) return "—";
  const d = new Date(epochSec * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDuration(sec) {
  if (sec === null || sec === undefined || Number.isNaN(sec)) return "—";
  if (sec < 1) return `${Math.round(sec * 1000)} ms`;
  if (sec < 90) return `${sec.toFixed(sec < 10 ? 1 : 0)} s`;
  if (sec < 5400) return `${Math.floor(sec / 60)} min ${Math.round(sec % 60)} s`;
  if (sec < 172800) return `${Math.floor(sec / 3600)} h ${Math.round((sec % 3600) / 60)} min`;
  return `${Math.round(sec / 86400)} days`;
}

export function fmtAge(epochSec) {
  if (!epochSec) return "—";
  return `${fmtDuration(Math.max(0, Date.now() / 1000 - epochSec))} ago`;
}

export function fmtBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}

export function fmtNumber(n) {
  if (n === null || n === undefined) return "—";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: 2 });
}

export function stateBadge(state) {
  return h("span", { class: `badge state-${state}`, "data-state": state, text: state });
}

/** A progress bar; percent may be null for an unknown total. */
export function progressBar(percent, label) {
  const bar = h("div", { class: "progress-fill" });
  bar.style.width = `${Math.max(0, Math.min(100, percent ?? 0))}%`;
  return h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": percent ?? undefined,
      "aria-label": label || "progress",
    },
    bar,
  );
}

/** Pretty JSON, shortened past `limit` characters so a huge result cannot freeze the page. */
export function jsonBlock(value, limit = 200000) {
  let text = JSON.stringify(value, null, 2);
  if (text.length > limit) text = `${text.slice(0, limit)}\n… (${text.length - limit} more characters)`;
  return h("pre", { class: "json" }, text);
}
