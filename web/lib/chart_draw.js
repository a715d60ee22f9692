// Lays out and draws the loss chart on any CanvasRenderingContext2D-like object passed in.
// No DOM lookups here: the extension owns the canvas, tests pass a recording context.

import { downsampleMinMax, formatValue, linearScale, lossRange, niceTicks } from "./chart_math.js";

export const COLORS = Object.freeze({
  background: "#1b1b1b",
  grid: "#333333",
  axisText: "#9a9a9a",
  raw: "rgba(110, 160, 255, 0.35)",
  smooth: "#ffa53c",
  message: "#8a8a8a",
});

/**
 * Plot rectangle, scales and ticks for a series in a width x height box (CSS pixels).
 * @param {import("./loss_series.js").LossSeries} series
 * @param {number} width
 * @param {number} height
 * @returns {null | {plot: {x: number, y: number, w: number, h: number}, xTicks: number[], yTicks: number[],
 *   sx: (v: number) => number, sy: (v: number) => number, xDomain: [number, number], yDomain: [number, number]}}
 *   null when there is nothing finite to draw or the box is too small
 */
export function chartLayout(series, width, height) {
  const margin = { left: 46, right: 8, top: 8, bottom: 18 };
  const plot = { x: margin.left, y: margin.top, w: width - margin.left - margin.right, h: height - margin.top - margin.bottom };
  if (plot.w < 20 || plot.h < 20) return null;
  const yr = lossRange(series.raw.ys, series.smooth.ys);
  if (yr === null) return null;
  const yAxis = niceTicks(yr.min, yr.max, Math.max(2, Math.min(6, Math.floor(plot.h / 28))));
  const firstX = series.raw.xs.length ? series.raw.xs[0] : 0;
  const lastX = Math.max(series.lastStep, series.total || 0, firstX + 1);
  const x0 = firstX;
  const xAxis = niceTicks(x0, lastX, Math.max(2, Math.min(8, Math.floor(plot.w / 60))));
  const xTicks = xAxis.ticks.filter((t) => t >= x0 - 1e-9 && t <= lastX + 1e-9);
  return {
    plot,
    xTicks,
    yTicks: yAxis.ticks,
    sx: linearScale(x0, lastX, plot.x, plot.x + plot.w),
    sy: linearScale(yAxis.min, yAxis.max, plot.y + plot.h, plot.y),
    xDomain: [x0, lastX],
    yDomain: [yAxis.min, yAxis.max],
  };
}

/** Strokes one polyline through the finite points, clipped to the plot by the caller. */
function strokeSeries(ctx, xs, ys, sx, sy, color, lineWidth) {
  ctx.strokeStyle = color;
  ctx.lineWidth = lineWidth;
  ctx.beginPath();
  let pen = false;
  for (let i = 0; i < xs.length; i++) {
    if (!Number.isFinite(ys[i])) {
      pen = false;
      continue;
    }
    const px = sx(xs[i]);
    const py = sy(ys[i]);
    if (pen) ctx.lineTo(px, py);
    else ctx.moveTo(px, py);
    pen = true;
  }
  ctx.stroke();
}

/**
 * Draws the chart: background, grid with tick labels, raw loss (thin, translucent) and smoothed loss (bold).
 * With nothing to plot it writes a short message instead.
 * @param {CanvasRenderingContext2D} ctx already scaled so one unit is one CSS pixel
 * @param {number} width CSS pixels
 * @param {number} height CSS pixels
 * @param {import("./loss_series.js").LossSeries | null} series
 * @param {{emptyMessage?: string}} [opts]
 * @returns {boolean} true when curves were drawn
 */
export function drawLossChart(ctx, width, height, series, opts = {}) {
  const { emptyMessage = "loss appears here while training runs" } = opts;
  ctx.fillStyle = COLORS.background;
  ctx.fillRect(0, 0, width, height);
  const layout = series && series.raw.xs.length ? chartLayout(series, width, height) : null;
  if (!layout) {
    ctx.fillStyle = COLORS.message;
    ctx.font = "12px sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(emptyMessage, width / 2, height / 2);
    return false;
  }
  const { plot, sx, sy, xTicks, yTicks } = layout;

  ctx.font = "10px sans-serif";
  ctx.fillStyle = COLORS.axisText;
  ctx.strokeStyle = COLORS.grid;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const t of yTicks) {
    const y = Math.round(sy(t)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(plot.x, y);
    ctx.lineTo(plot.x + plot.w, y);
    ctx.stroke();
    ctx.fillText(formatValue(t), plot.x - 4, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of xTicks) {
    const x = Math.round(sx(t)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(x, plot.y);
    ctx.lineTo(x, plot.y + plot.h);
    ctx.stroke();
    ctx.fillText(String(t), x, plot.y + plot.h + 3);
  }

  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.x, plot.y, plot.w, plot.h);
  ctx.clip();
  const budget = Math.max(4, Math.floor(plot.w * 2));
  const raw = downsampleMinMax(series.raw.xs, series.raw.ys, budget);
  const smooth = downsampleMinMax(series.smooth.xs, series.smooth.ys, budget);
  strokeSeries(ctx, raw.xs, raw.ys, sx, sy, COLORS.raw, 1);
  strokeSeries(ctx, smooth.xs, smooth.ys, sx, sy, COLORS.smooth, 2);
  ctx.restore();
  return true;
}

/**
 * The status line under the chart: "step 37 / 100 · loss 0.1234 · avg 0.1301 · lr 1e-4".
 * @param {import("./loss_series.js").LossSeries | null} series
 * @param {number} [lr]
 */
export function statusText(series, lr = NaN) {
  if (!series || series.count === 0) return "waiting for training";
  const bits = [];
  bits.push(series.total > 0 ? `step ${series.lastStep} / ${series.total}` : `step ${series.lastStep}`);
  bits.push(`loss ${formatValue(series.lastLoss)}`);
  const sm = series.smooth.ys.length ? series.smooth.ys[series.smooth.ys.length - 1] : NaN;
  if (Number.isFinite(sm)) bits.push(`avg ${formatValue(sm)}`);
  if (Number.isFinite(lr)) bits.push(`lr ${formatValue(lr)}`);
  if (series.finished) bits.push("done");
  return bits.join(" \u00b7 ");
}
