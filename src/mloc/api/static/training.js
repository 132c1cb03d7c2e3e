// A training task's metrics as curves: loss and eval loss, reward and KL, learning rate; another
// training run's curves overlaid dashed when the user names one to compare with.

import { api } from "./api.js";
import { legend, lineChart } from "./charts.js";
import { TRAINING_TYPES, compareForm } from "./compare.js";
import { clear, h, shortId } from "./dom.js";

const CHARTS = [
  { id: "loss", title: "Loss", keys: ["loss", "eval_loss"] },
  { id: "reward", title: "Reward and KL", keys: ["reward", "kl"] },
  { id: "learning_rate", title: "Learning rate", keys: ["learning_rate"] },
];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

async function metricsOf(taskId, signal) {
  return (await api(`api/v1/tasks/${encodeURIComponent(taskId)}/metrics`, { signal })).metrics;
}

function points(rows, key) {
  return rows.filter((row) => typeof row[key] === "number").map((row) => [row.step, row[key]]);
}

function charts(runs) {
  const out = h("div", { class: "charts", id: "metric-charts" });
  for (const spec of CHARTS) {
    const series = [];
    for (const run of runs) {
      spec.keys.forEach((key, colour) => {
        const found = points(run.rows, key);
        if (!found.length) return;
        const label = runs.length > 1 ? `${key} · ${run.name}` : key;
        series.push({ key, label, points: found, run: run.taskId, dashed: run.compared, colour });
      });
    }
    if (!series.length) continue;
    out.append(
      h(
        "figure",
        { class: "chart-box", "data-chart": spec.id },
        h("figcaption", { text: spec.title }),
        legend(series),
        lineChart({ id: spec.id, title: spec.title, series }),
      ),
    );
  }
  return out;
}

/**
 * Mount the panel in `section`; returns an update function the task page calls on each refresh, which
 * redraws only when a run reported new metrics.
 */
export function trainingPanel(section, task, compareId, signal) {
  const note = h("p", { class: "muted", id: "metrics-note" });
  const holder = h("div");
  clear(section).append(h("h2", { text: "Training metrics" }), compareForm(task, compareId, signal), note, holder);
  let compared = null; // {taskId, name, rows, ended}
  let drawn = "";

  const loadCompared = async () => {
    if (!compareId || (compared && compared.ended)) return;
    const other = await api(`api/v1/tasks/${encodeURIComponent(compareId)}`, { signal });
    if (!TRAINING_TYPES.has(other.task_type)) {
      throw new Error(`task ${shortId(other.task_id)} (${other.name}) has task type ${other.task_type}, not a training type; compare with an sft, dpo, grpo or ppo task`);
    }
    compared = {
      taskId: other.task_id,
      name: other.name,
      rows: await metricsOf(other.task_id, signal),
      ended: TERMINAL.has(other.state),
      compared: true,
    };
  };

  return async (current) => {
    const rows = await metricsOf(task.task_id, signal);
    let problem = "";
    try {
      await loadCompared();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      problem = `Cannot compare: ${err.message}`;
    }
    const runs = [{ taskId: task.task_id, name: current.name, rows, compared: false }];
    if (compared) runs.push(compared);
    const key = JSON.stringify(runs.map((run) => [run.taskId, run.rows.length, run.rows.at(-1)?.step]));
    if (problem) {
      note.textContent = problem;
      note.className = "reason";
    } else if (!rows.length) {
      note.textContent = TERMINAL.has(current.state) ? "This task reported no metrics." : "No metrics reported yet.";
      note.className = "muted";
    } else {
      note.textContent = compared ? `Solid: ${current.name}; dashed: ${compared.name} (${shortId(compared.taskId)}).` : "";
      note.className = "muted";
    }
    if (key === drawn) return;
    drawn = key;
    clear(holder).append(charts(runs));
  };
}
