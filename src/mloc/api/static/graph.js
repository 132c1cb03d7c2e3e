// A pipeline's steps drawn as an SVG graph: a column per depth, an edge per dependency, each box
// coloured by its step's state and linked to the step's page.

import { svg } from "./dom.js";

const BOX_W = 180;
const BOX_H = 50;
const GAP_X = 70;
const GAP_Y = 18;
const PAD = 12;

/** Each step's column: 0 for a step that waits for no step of this pipeline, else 1 + the deepest one. */
export function depths(steps) {
  const byId = new Map(steps.map((step) => [step.task_id, step]));
  const memo = new Map();
  const depth = (step, trail) => {
    if (memo.has(step.task_id)) return memo.get(step.task_id);
    // Submit refuses cycles; the trail only keeps a damaged record from hanging the page.
    if (trail.has(step.task_id)) return 0;
    trail.add(step.task_id);
    let deepest = -1;
    for (const parent of step.depends_on || []) {
      if (byId.has(parent)) deepest = Math.max(deepest, depth(byId.get(parent), trail));
    }
    trail.delete(step.task_id);
    memo.set(step.task_id, deepest + 1);
    return deepest + 1;
  };
  return new Map(steps.map((step) => [step.task_id, depth(step, new Set())]));
}

function clip(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/** The graph of `pipeline` (GET /api/v1/pipelines/{id}), the step `currentId` outlined. */
export function pipelineGraph(pipeline, currentId) {
  const steps = pipeline.tasks || [];
  const column = depths(steps);
  const rows = new Map();
  const place = new Map();
  for (const step of steps) {
    const col = column.get(step.task_id);
    const row = rows.get(col) || 0;
    rows.set(col, row + 1);
    place.set(step.task_id, { x: PAD + col * (BOX_W + GAP_X), y: PAD + row * (BOX_H + GAP_Y) });
  }
  const cols = Math.max(1, ...[...column.values()].map((c) => c + 1));
  const height = PAD * 2 + Math.max(1, ...rows.values()) * (BOX_H + GAP_Y) - GAP_Y;
  const width = PAD * 2 + cols * (BOX_W + GAP_X) - GAP_X;
  const chart = svg("svg", {
    class: "graph",
    id: "pipeline-graph",
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    "aria-label": `pipeline of ${steps.length} steps`,
  });
  chart.append(
    svg(
      "defs",
      {},
      svg(
        "marker",
        { id: "graph-arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
        svg("path", { d: "M0,0 L10,5 L0,10 z", class: "graph-arrowhead" }),
      ),
    ),
  );
  // Edges first, so the boxes are drawn over their ends.
  for (const step of steps) {
    const to = place.get(step.task_id);
    for (const parent of step.depends_on || []) {
      const from = place.get(parent);
      if (!from) continue; // a task from before this submission: named in the box's tooltip instead
      chart.append(
        svg("line", {
          class: "edge",
          x1: from.x + BOX_W,
          y1: from.y + BOX_H / 2,
          x2: to.x,
          y2: to.y + BOX_H / 2,
          "marker-end": "url(#graph-arrow)",
          "data-from": parent,
          "data-to": step.task_id,
        }),
      );
    }
  }
  for (const step of steps) {
    const { x, y } = place.get(step.task_id);
    const state = step.state || "unknown";
    const outside = (step.depends_on || []).filter((id) => !place.has(id));
    const why = step.reason || (state === "pending" ? step.pending_reason : "") || "";
    const tip = [`${step.name}: ${state}`, why, outside.length ? `also waits for ${outside.join(", ")}` : ""];
    chart.append(
      svg(
        "a",
        {
          href: `#/task/${encodeURIComponent(step.task_id)}`,
          class: `node state-${state}${step.task_id === currentId ? " current" : ""}`,
          "data-task-id": step.task_id,
          "data-state": state,
          "data-column": column.get(step.task_id),
        },
        svg("title", {}, tip.filter(Boolean).join("\n")),
        svg("rect", { x, y, width: BOX_W, height: BOX_H, rx: 7 }),
        svg("text", { x: x + 10, y: y + 20, class: "node-name" }, clip(step.name, 22)),
        svg("text", { x: x + 10, y: y + 38, class: "node-state" }, state),
      ),
    );
  }
  return chart;
}
