// Usage per user and UTC day, from /api/v1/stats, drawn as inline SVG bars.

import { api } from "./api.js";
import { clear, fmtNumber, h, svg } from "./dom.js";
import { showError } from "./ui.js";

const COUNTERS = [
  ["tasks", "tasks"],
  ["prompt_tokens", "prompt tokens"],
  ["completion_tokens", "completion tokens"],
  ["total_tokens", "total tokens"],
  ["train_samples", "training samples"],
  ["train_tokens", "training tokens"],
  ["gpu_seconds", "GPU seconds"],
  ["wall_sec", "wall seconds"],
];
const DEFAULT_DAYS = 14;
const MAX_DAYS = 366;

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function daysBetween(start, end) {
  const out = [];
  const day = new Date(`${start}T00:00:00Z`);
  const last = new Date(`${end}T00:00:00Z`);
  while (day <= last && out.length < MAX_DAYS) {
    out.push(isoDay(day));
    day.setUTCDate(day.getUTCDate() + 1);
  }
  return out;
}

/** One bar per day; a <title> on each bar gives the exact figure on hover. */
function barChart(user, days, values, label) {
  const width = 760;
  const height = 200;
  const pad = { left: 56, right: 8, top: 12, bottom: 28 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const max = Math.max(0, ...values);
  const slot = plotW / Math.max(1, days.length);
  const barW = Math.max(2, Math.min(40, slot * 0.7));
  const chart = svg("svg", {
    class: "chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `${label} per day for ${user}`,
    "data-user": user,
  });
  chart.append(
    svg("line", { x1: pad.left, y1: pad.top + plotH, x2: width - pad.right, y2: pad.top + plotH, class: "axis" }),
    svg("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: pad.top + plotH, class: "axis" }),
    svg("text", { x: pad.left - 6, y: pad.top + 4, class: "tick", "text-anchor": "end" }, fmtNumber(max)),
    svg("text", { x: pad.left - 6, y: pad.top + plotH, class: "tick", "text-anchor": "end" }, "0"),
  );
  const labelEvery = Math.ceil(days.length / 12);
  days.forEach((day, i) => {
    const value = values[i];
    const barH = max > 0 ? (value / max) * plotH : 0;
    const x = pad.left + i * slot + (slot - barW) / 2;
    const bar = svg(
      "rect",
      {
        x: x.toFixed(1),
        y: (pad.top + plotH - barH).toFixed(1),
        width: barW.toFixed(1),
        height: Math.max(0, barH).toFixed(1),
        class: value > 0 ? "bar" : "bar empty",
        "data-day": day,
        "data-value": value,
      },
      svg("title", {}, `${day}: ${fmtNumber(value)} ${label}`),
    );
    chart.append(bar);
    if (i % labelEvery === 0) {
      chart.append(svg("text", { x: (x + barW / 2).toFixed(1), y: height - 10, class: "tick", "text-anchor": "middle" }, day.slice(5)));
    }
  });
  return chart;
}

function userSection(entry, days, counter, label) {
  const byDay = new Map(entry.days.map((row) => [row.date, row]));
  const values = days.map((day) => Number((byDay.get(day) || {})[counter] || 0));
  const totals = COUNTERS.filter(([key]) => entry.totals[key]).map(([key, name]) => `${fmtNumber(entry.totals[key])} ${name}`);
  return h(
    "section",
    { class: "panel usage", "data-user": entry.user },
    h("h2", { text: entry.user }),
    h("p", { class: "muted", text: totals.length ? totals.join(" · ") : "no usage in this range" }),
    barChart(entry.user, days, values, label),
  );
}

export function usageView(root, { params, signal }) {
  const today = new Date();
  const start = new Date(today.getTime() - (DEFAULT_DAYS - 1) * 86400000);
  const user = h("input", { id: "usage-user", name: "user", placeholder: "all users", value: params.get("user") || "", spellcheck: "false" });
  const from = h("input", { id: "usage-start", name: "start_date", type: "date", value: params.get("start_date") || isoDay(start) });
  const to = h("input", { id: "usage-end", name: "end_date", type: "date", value: params.get("end_date") || isoDay(today) });
  const counter = h("select", { id: "usage-counter", name: "counter" }, ...COUNTERS.map(([key, name]) => h("option", { value: key, text: name })));
  counter.value = params.get("counter") || "tasks";
  const form = h(
    "form",
    { class: "filters", id: "usage-form" },
    h("label", {}, "User ", user),
    h("label", {}, "From ", from),
    h("label", {}, "To ", to),
    h("label", {}, "Show ", counter),
    h("button", { type: "submit", text: "Show" }),
  );
  const out = h("div", { id: "usage-charts" });
  root.append(h("h1", {}, "Usage"), h("p", { class: "muted", text: "Per user and UTC day; admins see everyone, users themselves." }), form, out);

  const apply = (event) => {
    if (event) event.preventDefault();
    const query = new URLSearchParams();
    for (const el of [user, from, to, counter]) if (el.value.trim()) query.set(el.name, el.value.trim());
    location.hash = `#/usage?${query}`;
  };
  form.addEventListener("submit", apply);
  counter.addEventListener("change", apply);

  (async () => {
    try {
      const data = await api("api/v1/stats", {
        params: { user: user.value.trim(), start_date: from.value, end_date: to.value },
        signal,
      });
      const days = daysBetween(data.start_date, data.end_date);
      const label = (COUNTERS.find(([key]) => key === counter.value) || COUNTERS[0])[1];
      clear(out);
      if (!data.users.length) out.append(h("p", { class: "empty", text: "No usage recorded yet." }));
      for (const entry of data.users) out.append(userSection(entry, days, counter.value, label));
      // The all-users report comes a page at a time; this view shows the first page.
      if (data.next_after) out.append(h("p", { class: "muted", id: "usage-more", text: `Showing the first ${data.users.length} users; enter a user name to see another.` }));
    } catch (err) {
      showError(err);
    }
  })();
}
