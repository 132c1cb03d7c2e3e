// An eval task's scores as a table, and, when the user names another eval run, both side by side from
// /api/v1/evals/compare with the difference and whether it exceeds two combined standard errors.

import { api } from "./api.js";
import { compareForm } from "./compare.js";
import { clear, h, shortId } from "./dom.js";

const STDERR = "_stderr";

function fmtScore(value) {
  return value == null ? "—" : value.toFixed(4);
}

function withError(value, stderr) {
  return h(
    "td",
    { class: "num" },
    fmtScore(value),
    stderr == null ? "" : h("span", { class: "stderr", text: ` ± ${fmtScore(stderr)}` }),
  );
}

function grid(id, headings, rows) {
  return h(
    "table",
    { class: "grid scores", id },
    h("thead", {}, h("tr", {}, ...headings.map((text) => h("th", { text })))),
    h("tbody", {}, ...rows),
  );
}

/** One row per task and metric of a result's `scores` ({task: {metric: v, metric_stderr: se}}). */
export function scoreTable(scores) {
  const rows = [];
  for (const [name, metrics] of Object.entries(scores || {})) {
    for (const [metric, value] of Object.entries(metrics || {})) {
      if (metric.endsWith(STDERR)) continue;
      rows.push(
        h(
          "tr",
          { "data-task": name, "data-metric": metric },
          h("td", { text: name }),
          h("td", { text: metric }),
          withError(value, metrics[metric + STDERR]),
        ),
      );
    }
  }
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 3, class: "empty", text: "This run has no scores." })));
  return grid("eval-scores", ["Task", "Metric", "Score ± stderr"], rows);
}

function comparisonTable(data) {
  const names = data.runs.map((run) => `${run.name} (${shortId(run.task_id)})`);
  const pair = data.runs.length === 2;
  const rows = data.rows.map((row) => {
    const cells = row.cells.map((cell) => withError(cell.value, cell.stderr));
    const extra = pair
      ? [
          h("td", { class: "num difference", text: row.difference == null ? "—" : `${row.difference > 0 ? "+" : ""}${fmtScore(row.difference)}` }),
          h("td", { class: "num", text: row.combined_stderr == null ? "—" : fmtScore(row.combined_stderr) }),
          h("td", {
            class: row.significant ? "significant" : "muted",
            text: row.significant == null ? "—" : row.significant ? "significant" : "within noise",
          }),
        ]
      : [];
    return h(
      "tr",
      {
        "data-task": row.task,
        "data-metric": row.metric,
        "data-significant": row.significant == null ? null : String(row.significant),
        class: row.significant ? "significant-row" : null,
      },
      h("td", { text: row.task }),
      h("td", { text: row.metric }),
      ...cells,
      ...extra,
    );
  });
  const headings = ["Task", "Metric", ...names, ...(pair ? ["Difference", "Combined stderr", "> 2 stderr?"] : [])];
  return grid("eval-compare", headings, rows);
}

/** Fill `section` with this eval task's scores, and the comparison when `compareId` is set. */
export async function evalPanel(section, task, result, compareId, signal) {
  const scores = result && result.scores;
  clear(section).append(h("h2", { text: "Scores" }), compareForm(task, compareId, signal), scoreTable(scores));
  section.hidden = false;
  if (!compareId) return;
  const holder = h("div", { id: "eval-comparison" }, h("p", { class: "muted", text: "comparing…" }));
  section.append(h("h3", { text: "Side by side" }), holder);
  try {
    const data = await api("api/v1/evals/compare", { params: { tasks: `${task.task_id},${compareId}` }, signal });
    clear(holder).append(
      comparisonTable(data),
      h("p", { class: "muted small", text: "Difference: the second run minus the first. Significant: it exceeds twice the combined standard error." }),
    );
  } catch (err) {
    if (err.name === "AbortError") return;
    clear(holder).append(h("p", { class: "reason", id: "eval-compare-error", text: `Cannot compare: ${err.message}` }));
  }
}
