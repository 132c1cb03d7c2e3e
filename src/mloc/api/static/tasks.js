// Tasks: the filtered, paged list, and one task's detail with its live log.

import { api, followLogs } from "./api.js";
import { TRAINING_TYPES } from "./compare.js";
import {
  clear,
  fmtAge,
  fmtBytes,
  fmtDuration,
  fmtNumber,
  fmtTime,
  h,
  jsonBlock,
  progressBar,
  shortId,
  stateBadge,
} from "./dom.js";
import { evalPanel } from "./evals.js";
import { pipelineGraph } from "./graph.js";
import { trainingPanel } from "./training.js";
import { every, showError } from "./ui.js";

const STATES = ["pending", "assigned", "running", "cancelling", "succeeded", "failed", "cancelled"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const TASK_TYPES = ["inference", "sft", "dpo", "grpo", "ppo", "eval", "rag_inference", "agent_inference", "echo"];
const PAGE_SIZES = [20, 50, 100];
const MAX_LOG_LINES = 5000; // older lines are dropped from the page (the API keeps them)

function progressText(progress) {
  if (!progress) return "";
  const parts = [];
  if (progress.total) parts.push(`${progress.step}/${progress.total}`);
  else if (progress.step !== null && progress.step !== undefined) parts.push(`step ${progress.step}`);
  if (progress.percent !== undefined && progress.percent !== null) parts.push(`${progress.percent}%`);
  if (progress.eta_sec !== null && progress.eta_sec !== undefined) parts.push(`ETA ${fmtDuration(progress.eta_sec)}`);
  if (progress.message) parts.push(progress.message);
  return parts.join(" · ");
}

/** What the task asked for, in one line: "2× A100 GPU · 8 cores · 32 GiB · tags gpu, fast". */
function needs(request) {
  if (!request || !Object.keys(request).length) return null;
  const parts = [];
  if (request.gpu_count) {
    const type = request.gpu_type && request.gpu_type !== "any" ? `${request.gpu_type} ` : "";
    parts.push(`${request.gpu_count}× ${type}GPU${request.gpu_mem ? ` (${fmtBytes(request.gpu_mem)} each)` : ""}`);
  } else {
    parts.push("no GPU");
  }
  if (request.cpu) parts.push(`${request.cpu / 1000} cores`);
  if (request.mem) parts.push(fmtBytes(request.mem));
  if (request.tags && request.tags.length) parts.push(`tags ${request.tags.join(", ")}`);
  if (request.model) parts.push(`model ${request.model}`);
  if (request.engine) parts.push(`engine ${request.engine}`);
  return parts.join(" · ");
}

function usageFacts(usage) {
  return facts(Object.entries(usage).map(([key, value]) => [key.replaceAll("_", " "), typeof value === "number" ? fmtNumber(value) : JSON.stringify(value)]));
}

function note(task) {
  if (task.reason) return task.reason;
  if (task.state === "pending" && task.pending_reason) {
    return task.unschedulable ? `unschedulable: ${task.pending_reason}` : task.pending_reason;
  }
  return "";
}

function filterForm(params) {
  const state = h("select", { id: "filter-state", name: "state" }, h("option", { value: "", text: "any state" }));
  for (const s of STATES) state.append(h("option", { value: s, text: s }));
  state.value = params.get("state") || "";
  const owner = h("input", {
    id: "filter-owner",
    name: "owner",
    placeholder: "owner",
    value: params.get("owner") || "",
    spellcheck: "false",
  });
  const types = h("datalist", { id: "task-types" }, ...TASK_TYPES.map((t) => h("option", { value: t })));
  const type = h("input", {
    id: "filter-type",
    name: "task_type",
    placeholder: "task type",
    list: "task-types",
    value: params.get("task_type") || "",
    spellcheck: "false",
  });
  const size = h("select", { id: "filter-size", name: "page_size" });
  for (const n of PAGE_SIZES) size.append(h("option", { value: n, text: `${n} a page` }));
  size.value = params.get("page_size") || "20";
  const form = h(
    "form",
    { class: "filters", id: "task-filters" },
    h("label", {}, "State ", state),
    h("label", {}, "Owner ", owner),
    h("label", {}, "Type ", type, types),
    size,
    h("button", { type: "submit", text: "Filter" }),
    h("a", { href: "#/tasks", class: "button secondary", text: "Clear" }),
  );
  const apply = (event) => {
    if (event) event.preventDefault();
    const query = new URLSearchParams();
    for (const [key, el] of [["state", state], ["owner", owner], ["task_type", type], ["page_size", size]]) {
      if (el.value.trim()) query.set(key, el.value.trim());
    }
    location.hash = `#/tasks?${query}`;
  };
  form.addEventListener("submit", apply);
  state.addEventListener("change", apply);
  size.addEventListener("change", apply);
  return form;
}

function taskRow(task) {
  const link = h("a", { href: `#/task/${encodeURIComponent(task.task_id)}`, class: "task-link" }, task.name || "(unnamed)");
  const progress = task.progress;
  const progressCell = h("td", { class: "progress-cell" });
  if (progress && !TERMINAL.has(task.state)) {
    progressCell.append(progressBar(progress.percent, `progress of ${task.name}`), h("small", {}, progressText(progress)));
  }
  return h(
    "tr",
    { "data-task-id": task.task_id, "data-state": task.state },
    h("td", {}, link, h("div", { class: "muted mono", text: shortId(task.task_id) })),
    h("td", { text: task.task_type }),
    h("td", { text: task.owner }),
    h("td", {}, stateBadge(task.state)),
    h("td", { class: "mono", text: task.worker_id || "—" }),
    progressCell,
    h("td", { title: fmtTime(task.created_at), text: fmtAge(task.created_at) }),
    h("td", { class: "note", text: note(task) }),
  );
}

export function tasksView(root, { params, signal }) {
  const page = Math.max(1, Number.parseInt(params.get("page") || "1", 10) || 1);
  const pageSize = Number.parseInt(params.get("page_size") || "20", 10) || 20;
  const body = h("tbody", { id: "task-rows" });
  const summary = h("span", { id: "task-summary", class: "muted" });
  const prev = h("a", { class: "button secondary disabled", id: "page-prev", text: "← Newer" });
  const next = h("a", { class: "button secondary disabled", id: "page-next", text: "Older →" });
  const pageLink = (n) => {
    const query = new URLSearchParams(params);
    query.set("page", String(n));
    return `#/tasks?${query}`;
  };
  root.append(
    h("h1", {}, "Tasks"),
    filterForm(params),
    h(
      "table",
      { class: "grid", id: "task-table" },
      h(
        "thead",
        {},
        h("tr", {}, ...["Task", "Type", "Owner", "State", "Worker", "Progress", "Submitted", "Reason"].map((t) => h("th", { text: t }))),
      ),
      body,
    ),
    h("div", { class: "pager" }, prev, summary, next),
  );
  every(3000, signal, async () => {
    const data = await api("api/v1/tasks", {
      params: {
        page,
        page_size: pageSize,
        state: params.get("state"),
        owner: params.get("owner"),
        task_type: params.get("task_type"),
      },
      signal,
    });
    clear(body);
    if (!data.items.length) {
      body.append(h("tr", {}, h("td", { colspan: 8, class: "empty", text: "No tasks match." })));
    }
    for (const task of data.items) body.append(taskRow(task));
    const pages = Math.max(1, Math.ceil(data.total / pageSize));
    summary.textContent = `Page ${page} of ${pages} · ${data.total} task${data.total === 1 ? "" : "s"}`;
    for (const [el, target, ok] of [[prev, page - 1, page > 1], [next, page + 1, page < pages]]) {
      if (ok) el.setAttribute("href", pageLink(target));
      else el.removeAttribute("href");
      el.classList.toggle("disabled", !ok);
    }
  });
}

function facts(rows) {
  const dl = h("dl", { class: "facts" });
  for (const [label, value] of rows) {
    if (value === null || value === undefined || value === "") continue;
    dl.append(h("dt", { text: label }), h("dd", {}, value));
  }
  return dl;
}

function logLine(fields) {
  const ts = fields.ts ? fmtTime(Number(fields.ts)).slice(11) : "";
  const level = fields.level || fields.ev || "";
  const text = fields.text ?? fields.message ?? JSON.stringify(fields);
  return h(
    "div",
    { class: `log-line level-${String(level).toLowerCase()}` },
    h("span", { class: "log-ts", text: ts }),
    h("span", { class: "log-level", text: level }),
    h("span", { class: "log-text", text }),
  );
}

/** Draw the task's pipeline and keep it current until every step has ended. */
function followPipeline(section, pipelineId, taskId, signal) {
  const poller = new AbortController();
  signal.addEventListener("abort", () => poller.abort());
  section.hidden = false;
  every(1500, poller.signal, async () => {
    const pipeline = await api(`api/v1/pipelines/${encodeURIComponent(pipelineId)}`, { signal });
    const ended = pipeline.tasks.filter((step) => TERMINAL.has(step.state)).length;
    clear(section).append(
      h("h2", {}, "Pipeline ", stateBadge(pipeline.state)),
      h("p", { class: "muted", id: "pipeline-summary" }, `${ended} of ${pipeline.tasks.length} steps ended · `, h("span", { class: "mono", text: pipelineId })),
      h("div", { class: "graph-scroll" }, pipelineGraph(pipeline, taskId)),
    );
    if (ended === pipeline.tasks.length) poller.abort();
  });
}

export function taskView(root, { arg: taskId, params, signal }) {
  const compareId = (params && params.get("compare")) || "";
  const header = h("div", { class: "task-head" });
  const progress = h("section", { id: "task-progress", class: "panel" });
  const pipeline = h("section", { id: "task-pipeline", class: "panel", hidden: true });
  const measured = h("section", { id: "task-metrics", class: "panel", hidden: true });
  const details = h("section", { id: "task-details", class: "panel" });
  const result = h("section", { id: "task-result", class: "panel", hidden: true });
  const logs = h("div", { id: "task-logs", class: "logs", role: "log", "aria-live": "polite" });
  const logState = h("span", { id: "log-state", class: "muted", text: "connecting…" });
  root.append(
    h("p", {}, h("a", { href: "#/tasks", text: "← all tasks" })),
    header,
    progress,
    pipeline,
    measured,
    details,
    h("section", { class: "panel" }, h("h2", {}, "Log ", logState), logs),
    result,
  );

  let resultShown = false;
  let lastState = null;
  const render = (task) => {
    lastState = task.state;
    clear(header).append(
      h("h1", {}, task.name || "(unnamed)", " ", stateBadge(task.state)),
      h("div", { class: "mono muted", text: task.task_id }),
    );
    if (!TERMINAL.has(task.state) && !task.cancel_requested) {
      const cancel = h("button", { type: "button", class: "danger", id: "task-cancel", text: "Cancel task" });
      cancel.addEventListener("click", async () => {
        if (!window.confirm(`Cancel task ${task.name}?`)) return;
        try {
          await api(`api/v1/tasks/${encodeURIComponent(task.task_id)}/cancel`, { method: "POST" });
        } catch (err) {
          showError(err);
        }
      });
      header.append(cancel);
    }

    clear(progress).append(h("h2", { text: "Progress" }));
    const p = task.progress;
    if (p) {
      const percent = p.percent ?? (task.state === "succeeded" ? 100 : null);
      progress.append(
        progressBar(percent, "task progress"),
        h("div", { id: "progress-text", text: progressText(p) || "started" }),
      );
    } else {
      progress.append(
        progressBar(task.state === "succeeded" ? 100 : 0, "task progress"),
        h("div", { id: "progress-text", class: "muted", text: task.state === "succeeded" ? "done" : "no progress reported yet" }),
      );
    }
    if (task.reason) {
      progress.append(
        h("p", { class: "reason", id: "task-reason" }, h("strong", { text: "Reason: " }), task.reason, task.reason_code ? ` (${task.reason_code})` : ""),
      );
    }
    if (task.state === "pending" && task.pending_reason) {
      progress.append(
        h(
          "p",
          { class: task.unschedulable ? "reason" : "pending", id: "task-pending-reason" },
          h("strong", { text: task.unschedulable ? "Unschedulable: " : "Waiting: " }),
          task.pending_reason,
        ),
      );
    }

    const wait = task.started_at ? task.started_at - task.created_at : null;
    const run = task.started_at ? (task.finished_at || Date.now() / 1000) - task.started_at : null;
    const worker = task.worker_id ? h("a", { href: "#/workers", class: "mono", text: task.worker_id }) : null;
    clear(details).append(
      h("h2", { text: "Details" }),
      facts([
        ["Owner", task.owner],
        ["Type", `${task.task_type} (${task.kind})`],
        ["Topic", task.topic],
        ["Priority", String(task.priority)],
        ["Needs", needs(task.request)],
        ["Worker", worker],
        // Starts ended by a lost worker are requeues: they do not count against max_attempts.
        ["Attempts", task.requeues ? `${task.attempts}, ${task.requeues} ended by a lost worker (${task.max_attempts} for its own failures)` : `${task.attempts} of ${task.max_attempts}`],
        ["Submitted", fmtTime(task.created_at)],
        ["Started", task.started_at ? `${fmtTime(task.started_at)} (waited ${fmtDuration(wait)})` : null],
        ["Finished", task.finished_at ? `${fmtTime(task.finished_at)} (ran ${fmtDuration(run)})` : null],
        ["Running for", !task.finished_at && task.started_at ? fmtDuration(run) : null],
        ["Parent", task.parent_id ? h("a", { href: `#/task/${encodeURIComponent(task.parent_id)}`, text: task.parent_id }) : null],
        ["Replicas", task.children && task.children.length ? String(task.children.length) : null],
      ]),
    );
    if (task.usage) details.append(h("h3", { text: "Usage" }), usageFacts(task.usage));
  };

  const showResult = async (task) => {
    if (resultShown || !TERMINAL.has(task.state) || task.state === "cancelled") return;
    resultShown = true;
    result.hidden = false;
    clear(result).append(h("h2", { text: "Result" }));
    try {
      const body = await api(`api/v1/tasks/${encodeURIComponent(task.task_id)}/result`, { signal });
      result.append(jsonBlock(body));
      if (task.task_type === "eval" && task.state === "succeeded") await evalPanel(measured, task, body, compareId, signal);
    } catch (err) {
      if (err.name === "AbortError") return;
      // A failed task usually has no result; its reason above says why, so say nothing more here.
      if (err.status === 404 && task.state === "failed" && !task.result_summary) {
        result.hidden = true;
        return;
      }
      result.append(h("p", { class: "muted", text: err.message }));
      if (task.result_summary) result.append(jsonBlock(task.result_summary));
    }
  };

  let pipelineShown = false;
  let updateCurves = null;
  const refresh = async () => {
    const task = await api(`api/v1/tasks/${encodeURIComponent(taskId)}`, { signal });
    render(task);
    if (task.pipeline_id && !pipelineShown) {
      pipelineShown = true;
      followPipeline(pipeline, task.pipeline_id, task.task_id, signal);
    }
    if (TRAINING_TYPES.has(task.task_type)) {
      if (!updateCurves) {
        measured.hidden = false;
        updateCurves = trainingPanel(measured, task, compareId, signal);
      }
      await updateCurves(task);
    }
    await showResult(task);
    return task;
  };

  // Poll the record (state, progress) until the task ends; the log has its own stream.
  const poller = new AbortController();
  signal.addEventListener("abort", () => poller.abort());
  every(1500, poller.signal, async () => {
    const task = await refresh();
    if (TERMINAL.has(task.state)) poller.abort();
  });

  (async () => {
    let since = "0";
    let count = 0;
    while (!signal.aborted) {
      try {
        logState.textContent = "following…";
        const state = await followLogs(taskId, {
          since,
          signal,
          onEntry: (id, fields) => {
            if (id) since = id;
            const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
            logs.append(logLine(fields));
            count += 1;
            if (logs.childElementCount > MAX_LOG_LINES) logs.firstChild.remove();
            if (atBottom) logs.scrollTop = logs.scrollHeight;
          },
        });
        logState.textContent = `ended (${state}) · ${count} line${count === 1 ? "" : "s"}`;
        if (!count) logs.append(h("div", { class: "muted", text: "This task wrote no log lines." }));
        if (lastState !== state) await refresh().catch(showError);
        return;
      } catch (err) {
        if (signal.aborted || err.name === "AbortError") return;
        if (err.status === 401 || err.status === 403 || err.status === 404) {
          logState.textContent = "not available";
          showError(err);
          return;
        }
        logState.textContent = `reconnecting (${err.message})…`;
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    }
  })();
}
