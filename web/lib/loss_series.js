// What the loss chart draws: raw and EMA-smoothed series, downsampled, plus the run's status.
// The same object is stored in node.properties so a reloaded workflow shows the last curve.

import { autoSmoothing, emaSmooth, downsampleMinMax } from "./chart_math.js";

export const SERIES_VERSION = 1;

/**
 * @typedef {{xs: number[], ys: number[]}} XY
 * @typedef {{version: number, raw: XY, smooth: XY, count: number, lastStep: number, lastLoss: number,
 *            total: number, finished: boolean}} LossSeries
 */

/**
 * Builds the drawable series of a history: EMA over the full run, then both curves downsampled.
 * @param {import("./loss_history.js").LossHistory} history
 * @param {{smoothing?: number | null, maxPoints?: number}} [opts] smoothing weight in [0, 1); null or absent:
 *   autoSmoothing of the planned total (or the steps seen)
 * @returns {LossSeries}
 */
export function buildSeries(history, opts = {}) {
  const { maxPoints = 800 } = opts;
  const smoothing = opts.smoothing ?? autoSmoothing(Math.max(history.total, history.length));
  const smooth = emaSmooth(history.losses, smoothing);
  return {
    version: SERIES_VERSION,
    raw: downsampleMinMax(history.steps, history.losses, maxPoints),
    smooth: downsampleMinMax(history.steps, smooth, maxPoints),
    count: history.length,
    lastStep: history.lastStep,
    lastLoss: history.lastLoss,
    total: history.total,
    finished: history.finished,
  };
}

/**
 * Plain JSON form (NaN/Infinity become null) for node.properties; losses rounded to `digits` significant digits
 * to keep saved workflows (and the PNGs that embed them) small.
 * @param {LossSeries} series
 * @param {{digits?: number}} [opts] default 17 (no rounding)
 */
export function seriesToJSON(series, opts = {}) {
  const { digits = 17 } = opts;
  const fin = (v) => (Number.isFinite(v) ? Number(v.toPrecision(digits)) : null);
  return {
    version: SERIES_VERSION,
    raw: { xs: series.raw.xs.slice(), ys: series.raw.ys.map(fin) },
    smooth: { xs: series.smooth.xs.slice(), ys: series.smooth.ys.map(fin) },
    count: series.count,
    lastStep: series.lastStep,
    lastLoss: fin(series.lastLoss),
    total: series.total,
    finished: series.finished,
  };
}

function parseXY(obj) {
  if (!obj || !Array.isArray(obj.xs) || !Array.isArray(obj.ys) || obj.xs.length !== obj.ys.length) return null;
  if (!obj.xs.every(Number.isFinite)) return null;
  return { xs: obj.xs.slice(), ys: obj.ys.map((v) => (v === null ? NaN : Number(v))) };
}

/**
 * Reads what seriesToJSON wrote; anything malformed or of another version gives null.
 * @param {unknown} obj
 * @returns {LossSeries | null}
 */
export function seriesFromJSON(obj) {
  if (!obj || typeof obj !== "object") return null;
  const o = /** @type {any} */ (obj);
  if (o.version !== SERIES_VERSION) return null;
  const raw = parseXY(o.raw);
  const smooth = parseXY(o.smooth);
  if (!raw || !smooth) return null;
  const num = (v, d) => (Number.isFinite(v) ? v : d);
  return {
    version: SERIES_VERSION,
    raw,
    smooth,
    count: num(o.count, raw.xs.length),
    lastStep: num(o.lastStep, raw.xs.length ? raw.xs[raw.xs.length - 1] : 0),
    lastLoss: o.lastLoss === null ? NaN : num(o.lastLoss, NaN),
    total: num(o.total, 0),
    finished: o.finished === true,
  };
}
