// Line charts drawn as inline SVG with DOM calls (no library): a few series over training steps,
// axes with round tick values, a legend; a compared run's series dashed.

import { h, svg } from "./dom.js";

const WIDTH = 460;
const HEIGHT = 240;
const PAD = { left: 62, right: 14, top: 14, bottom: 34 };
const MAX_DOTS = 60; // past this many points a dot per point only clutters the line

/** About `count` round values covering [min, max] (1, 2 or 5 times a power of ten apart). */
export function niceTicks(min, max, count = 4) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (min === max) {
    const pad = Math.abs(min) / 10 || 1;
    min -= pad;
    max += pad;
  }
  const raw = (max - min) / Math.max(1, count - 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || 10 * power;
  const start = Math.floor(min / step) * step;
  const end = Math.ceil(max / step) * step;
  const ticks = [];
  // Counted in steps, not summed, so float error cannot add or drop a tick.
  for (let i = 0; start + i * step <= end + step * 1e-9; i += 1) ticks.push(Number((start + i * step).toPrecision(12)));
  return ticks;
}

/** A tick label: 3 significant digits, powers of ten past a thousandth or a million, a true minus sign. */
export function fmtTick(value) {
  if (value === 0) return "0";
  const size = Math.abs(value);
  const text = size < 1e-3 || size >= 1e6 ? value.toExponential(1) : String(Number(value.toPrecision(3)));
  return text.replaceAll("-", "\u2212");
}

/**
 * A line chart. `series`: [{key, label, points: [[step, value], ...], run, dashed, colour}], where
 * `colour` is an index into the chart palette (the same metric keeps its colour across runs).
 */
export function lineChart({ id, title, series, xLabel = "step" }) {
  const drawn = series
    .map((s) => ({ ...s, points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)) }))
    .filter((s) => s.points.length);
  const xs = drawn.flatMap((s) => s.points.map(([x]) => x));
  const ys = drawn.flatMap((s) => s.points.map(([, y]) => y));
  const xTicks = niceTicks(Math.min(...xs), Math.max(...xs), 5);
  const yTicks = niceTicks(Math.min(...ys), Math.max(...ys), 4);
  const [x0, x1] = [xTicks[0], xTicks[xTicks.length - 1]];
  const [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0 || 1)) * plotW;
  const sy = (y) => PAD.top + plotH - ((y - y0) / (y1 - y0 || 1)) * plotH;

  const chart = svg("svg", {
    class: "chart line-chart",
    "data-chart": id,
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": `${title} per ${xLabel}`,
  });
  for (const tick of yTicks) {
    const y = sy(tick).toFixed(1);
    chart.append(
      svg("line", { class: "grid-line", x1: PAD.left, y1: y, x2: WIDTH - PAD.right, y2: y }),
      svg("text", { class: "tick y-tick", x: PAD.left - 6, y: Number(y) + 4, "text-anchor": "end" }, fmtTick(tick)),
    );
  }
  for (const tick of xTicks) {
    const x = sx(tick).toFixed(1);
    chart.append(
      svg("line", { class: "axis", x1: x, y1: PAD.top + plotH, x2: x, y2: PAD.top + plotH + 4 }),
      svg("text", { class: "tick x-tick", x, y: PAD.top + plotH + 16, "text-anchor": "middle" }, fmtTick(tick)),
    );
  }
  chart.append(
    svg("line", { class: "axis", x1: PAD.left, y1: PAD.top + plotH, x2: WIDTH - PAD.right, y2: PAD.top + plotH }),
    svg("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: PAD.top + plotH }),
    svg("text", { class: "tick axis-label", x: PAD.left + plotW / 2, y: HEIGHT - 4, "text-anchor": "middle" }, xLabel),
  );
  for (const s of drawn) {
    const cls = `series colour-${s.colour ?? 0}${s.dashed ? " dashed" : ""}`;
    const line = svg(
      "polyline",
      {
        class: cls,
        points: s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
        "data-metric": s.key,
        "data-run": s.run,
        "data-points": s.points.length,
      },
      svg("title", {}, s.label),
    );
    chart.append(line);
    if (s.points.length <= MAX_DOTS) {
      for (const [x, y] of s.points) {
        chart.append(
          svg(
            "circle",
            { class: `dot colour-${s.colour ?? 0}`, cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.5 },
            svg("title", {}, `${s.label} at ${xLabel} ${x}: ${fmtTick(y)}`),
          ),
        );
      }
    }
  }
  return chart;
}

/** The key to a chart's lines: a sample of each line (dashed where the line is) and its label. */
export function legend(series) {
  return h(
    "ul",
    { class: "legend" },
    ...series.map((s) =>
      h(
        "li",
        { "data-metric": s.key, "data-run": s.run },
        svg(
          "svg",
          { class: "legend-sample", viewBox: "0 0 28 10", width: 28, height: 10, "aria-hidden": "true" },
          svg("line", { class: `series colour-${s.colour ?? 0}${s.dashed ? " dashed" : ""}`, x1: 0, y1: 5, x2: 28, y2: 5 }),
        ),
        ` ${s.label}`,
      ),
    ),
  );
}
