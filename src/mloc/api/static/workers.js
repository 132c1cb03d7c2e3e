// Workers: hardware, free capacity, heartbeat age and warm models.

import { api } from "./api.js";
import { clear, fmtBytes, fmtDuration, h, shortId } from "./dom.js";
import { every } from "./ui.js";

function cores(milli) {
  return `${(Number(milli || 0) / 1000).toLocaleString("en-US", { maximumFractionDigits: 1 })}`;
}

function meter(free, total, label) {
  const used = total ? Math.round((100 * (total - free)) / total) : 0;
  const fill = h("div", { class: "progress-fill" });
  fill.style.width = `${used}%`;
  return h("div", { class: "meter", title: `${used}% in use` }, h("div", { class: "progress" }, fill), h("small", { text: label }));
}

function gpuList(worker) {
  const gpus = (worker.hardware && worker.hardware.gpus) || [];
  if (!gpus.length) return h("span", { class: "muted", text: "none" });
  const free = new Set(worker.free.gpus || []);
  return h(
    "ul",
    { class: "gpus" },
    ...gpus.map((gpu) =>
      h(
        "li",
        { class: free.has(gpu.index) ? "gpu free" : "gpu busy", "data-gpu-model": gpu.name },
        h("span", { class: "mono", text: `#${gpu.index}` }),
        " ",
        gpu.name,
        gpu.memory_bytes ? ` · ${fmtBytes(gpu.memory_bytes)}` : "",
        h("span", { class: "gpu-state", text: free.has(gpu.index) ? "free" : "in use" }),
      ),
    ),
  );
}

function summary(workers) {
  const byModel = new Map();
  let active = 0;
  for (const worker of workers) {
    if (worker.status === "active") active += 1;
    // Lost and offline workers' GPUs cannot take work; /metrics leaves them out of the totals too.
    if (worker.status === "lost" || worker.status === "offline") continue;
    const free = new Set(worker.free.gpus || []);
    for (const gpu of (worker.hardware && worker.hardware.gpus) || []) {
      const entry = byModel.get(gpu.name) || { total: 0, free: 0 };
      entry.total += 1;
      if (worker.status === "active" && free.has(gpu.index)) entry.free += 1;
      byModel.set(gpu.name, entry);
    }
  }
  const parts = [`${workers.length} worker${workers.length === 1 ? "" : "s"}, ${active} active`];
  for (const [model, n] of byModel) parts.push(`${model}: ${n.free} of ${n.total} GPUs free`);
  if (!byModel.size) parts.push("no GPUs");
  return parts.join(" · ");
}

function workerRow(worker) {
  const age = worker.heartbeat_age_sec;
  const tasks = worker.tasks || [];
  // A user is sent only their own tasks' ids; the others are a count.
  const hidden = worker.hidden_tasks || 0;
  const others = hidden ? [h("li", { class: "muted", text: `${hidden} of other users` })] : [];
  return h(
    "tr",
    { "data-worker-id": worker.worker_id, "data-status": worker.status },
    h(
      "td",
      {},
      h("strong", { class: "mono", text: worker.worker_id }),
      h("div", { class: "muted", text: [worker.hostname, worker.version && `v${worker.version}`].filter(Boolean).join(" · ") }),
    ),
    h(
      "td",
      {},
      h("span", { class: `badge worker-${worker.status}`, text: worker.status }),
      h("div", { class: age !== null && age > 60 ? "stale" : "muted", text: age === null ? "" : `heartbeat ${fmtDuration(age)} ago` }),
    ),
    h("td", {}, gpuList(worker)),
    h("td", {}, meter(worker.free.cpu_milli, worker.capacity.cpu_milli, `${cores(worker.free.cpu_milli)} of ${cores(worker.capacity.cpu_milli)} cores free`)),
    h("td", {}, meter(worker.free.memory_bytes, worker.capacity.memory_bytes, `${fmtBytes(worker.free.memory_bytes)} of ${fmtBytes(worker.capacity.memory_bytes)} free`)),
    h("td", {}, meter(worker.free.slots, worker.capacity.slots, `${worker.free.slots} of ${worker.capacity.slots} free`)),
    h(
      "td",
      {},
      tasks.length || hidden
        ? h("ul", { class: "plain" }, ...tasks.map((id) => h("li", {}, h("a", { href: `#/task/${encodeURIComponent(id)}`, class: "mono", text: shortId(id) }))), ...others)
        : h("span", { class: "muted", text: "idle" }),
    ),
    h("td", {}, (worker.warm_models || []).length ? h("ul", { class: "plain" }, ...worker.warm_models.map((m) => h("li", { text: m }))) : h("span", { class: "muted", text: "none" })),
    h("td", { class: "small" }, h("div", { text: (worker.task_types || []).join(", ") }), h("div", { class: "muted", text: (worker.topics || []).join(", ") })),
  );
}

export function workersView(root, { signal }) {
  const head = h("p", { id: "worker-summary", class: "summary" });
  const body = h("tbody", { id: "worker-rows" });
  root.append(
    h("h1", {}, "Workers"),
    head,
    h(
      "table",
      { class: "grid", id: "worker-table" },
      h(
        "thead",
        {},
        h("tr", {}, ...["Worker", "Status", "GPUs", "CPU", "Memory", "Slots", "Tasks", "Warm models", "Task types · topics"].map((t) => h("th", { text: t }))),
      ),
      body,
    ),
  );
  every(4000, signal, async () => {
    // One page holds up to 1,000 workers; a larger fleet says how many are not shown.
    const data = await api("api/v1/workers?page_size=1000", { signal });
    head.textContent = summary(data.items) + (data.total > data.items.length ? ` (showing ${data.items.length} of ${data.total})` : "");
    clear(body);
    if (!data.items.length) body.append(h("tr", {}, h("td", { colspan: 9, class: "empty", text: "No worker has registered." })));
    for (const worker of data.items) body.append(workerRow(worker));
  });
}
