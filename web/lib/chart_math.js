// Pure numeric helpers for the loss chart: smoothing, axis ranges and ticks, downsampling, scales.
// No DOM and no ComfyUI imports, so node's test runner can load this file directly.

/**
 * Exponential moving average with bias correction (as TensorBoard's smoothing slider).
 * Non-finite inputs give NaN at that index and do not disturb the average.
 * @param {number[]} values raw series
 * @param {number} weight smoothing weight in [0, 1): 0 returns the input, larger is smoother
 * @returns {number[]} smoothed series, same length
 */
export function emaSmooth(values, weight = 0.95) {
  if (!(weight >= 0 && weight < 1)) throw new RangeError(`smoothing weight must be in [0, 1), got ${weight}`);
  const out = new Array(values.length);
  let acc = 0;
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) {
      out[i] = NaN;
      continue;
    }
    acc = acc * weight + (1 - weight) * v;
    count += 1;
    out[i] = acc / (1 - Math.pow(weight, count));
  }
  return out;
}

/**
 * Default smoothing weight for a run of n steps: an EMA window of about n/20 steps, between 1 and 50
 * (weight 1 - 1/window), so a 100-step run is not flattened and a 10k-step run is readable.
 * @param {number} n planned (or seen) number of steps
 */
export function autoSmoothing(n) {
  const window = Math.min(50, Math.max(1, n / 20));
  return 1 - 1 / window;
}

/**
 * Minimum and maximum of the finite values, or null when there are none.
 * @param {number[]} values
 * @returns {{min: number, max: number} | null}
 */
export function finiteExtent(values) {
  let min = Infinity;
  let max = -Infinity;
  for (const v of values) {
    if (!Number.isFinite(v)) continue;
    if (v < min) min = v;
    if (v > max) max = v;
  }
  return min <= max ? { min, max } : null;
}

/**
 * The q-quantile (0..1) of the finite values with linear interpolation, or NaN when there are none.
 * @param {number[]} values
 * @param {number} q
 */
export function quantile(values, q) {
  const sorted = values.filter(Number.isFinite).sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  const pos = Math.min(Math.max(q, 0), 1) * (sorted.length - 1);
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

/**
 * Y range for a loss chart: from the lowest value to the top quantile of the raw series (so one early spike
 * does not flatten the curve) but never below the smoothed curve's maximum. A flat series gets a small span.
 * @param {number[]} raw
 * @param {number[]} smooth
 * @param {{clipQuantile?: number, minCountForClip?: number}} [opts]
 * @returns {{min: number, max: number} | null}
 */
export function lossRange(raw, smooth = [], opts = {}) {
  const { clipQuantile = 0.99, minCountForClip = 50 } = opts;
  const all = finiteExtent(raw.concat(smooth));
  if (all === null) return null;
  let max = all.max;
  const finiteRaw = raw.filter(Number.isFinite);
  if (finiteRaw.length >= minCountForClip) {
    const q = quantile(finiteRaw, clipQuantile);
    const sm = finiteExtent(smooth);
    max = Math.max(q, sm ? sm.max : -Infinity);
  }
  let min = all.min;
  if (max - min <= 0) {
    const pad = Math.abs(min) > 0 ? Math.abs(min) * 0.05 : 1;
    return { min: min - pad, max: max + pad };
  }
  return { min, max };
}

/**
 * The "nice" step (1, 2 or 5 times a power of ten) closest to span / count from above.
 * @param {number} span positive
 * @param {number} count wanted number of intervals
 */
export function niceStep(span, count) {
  const raw = span / Math.max(count, 1);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const frac = raw / power;
  let nice;
  if (frac <= 1 + 1e-9) nice = 1;
  else if (frac <= 2 + 1e-9) nice = 2;
  else if (frac <= 5 + 1e-9) nice = 5;
  else nice = 10;
  return nice * power;
}

/**
 * Axis ticks on nice numbers covering [min, max]; the returned min/max are widened to whole steps.
 * @param {number} min
 * @param {number} max
 * @param {number} maxTicks upper bound on the number of tick intervals
 * @returns {{min: number, max: number, step: number, ticks: number[]}}
 */
export function niceTicks(min, max, maxTicks = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) throw new RangeError(`axis bounds must be finite, got ${min}, ${max}`);
  if (max < min) [min, max] = [max, min];
  if (max === min) {
    const pad = min === 0 ? 1 : Math.abs(min) * 0.1;
    min -= pad;
    max += pad;
  }
  let step = niceStep(max - min, maxTicks);
  let lo = Math.floor(min / step + 1e-9) * step;
  let hi = Math.ceil(max / step - 1e-9) * step;
  while (Math.round((hi - lo) / step) > maxTicks) {
    step = niceStep(step * 1.5, 1);
    lo = Math.floor(min / step + 1e-9) * step;
    hi = Math.ceil(max / step - 1e-9) * step;
  }
  const n = Math.round((hi - lo) / step);
  const decimals = Math.max(0, -Math.floor(Math.log10(step)) + 1);
  const ticks = [];
  for (let i = 0; i <= n; i++) ticks.push(Number((lo + i * step).toFixed(Math.min(decimals, 20))));
  return { min: ticks[0], max: ticks[ticks.length - 1], step, ticks };
}

/**
 * Keeps at most about maxPoints points of an (x, y) series by splitting it into buckets and keeping each
 * bucket's lowest and highest point in x order, so spikes survive. First and last points are always kept.
 * Non-finite y values are dropped.
 * @param {number[]} xs
 * @param {number[]} ys
 * @param {number} maxPoints at least 4
 * @returns {{xs: number[], ys: number[]}}
 */
export function downsampleMinMax(xs, ys, maxPoints) {
  if (xs.length !== ys.length) throw new RangeError(`xs and ys differ in length: ${xs.length} vs ${ys.length}`);
  const idx = [];
  for (let i = 0; i < ys.length; i++) if (Number.isFinite(ys[i])) idx.push(i);
  const limit = Math.max(4, Math.floor(maxPoints));
  if (idx.length <= limit) return { xs: idx.map((i) => xs[i]), ys: idx.map((i) => ys[i]) };
  const keep = [idx[0]];
  const inner = idx.slice(1, -1);
  const buckets = Math.floor((limit - 2) / 2);
  for (let b = 0; b < buckets; b++) {
    const start = Math.floor((b * inner.length) / buckets);
    const end = Math.floor(((b + 1) * inner.length) / buckets);
    if (end <= start) continue;
    let lo = inner[start];
    let hi = inner[start];
    for (let k = start + 1; k < end; k++) {
      const i = inner[k];
      if (ys[i] < ys[lo]) lo = i;
      if (ys[i] > ys[hi]) hi = i;
    }
    if (lo === hi) keep.push(lo);
    else keep.push(Math.min(lo, hi), Math.max(lo, hi));
  }
  keep.push(idx[idx.length - 1]);
  return { xs: keep.map((i) => xs[i]), ys: keep.map((i) => ys[i]) };
}

/**
 * Linear map from [d0, d1] to [r0, r1] (pixels); a zero-width domain maps to the middle of the range.
 * @returns {(v: number) => number}
 */
export function linearScale(d0, d1, r0, r1) {
  if (d1 === d0) return () => (r0 + r1) / 2;
  const k = (r1 - r0) / (d1 - d0);
  return (v) => r0 + (v - d0) * k;
}

/**
 * Short human text for a loss / learning-rate value: 4 significant digits, exponent form when tiny or huge.
 * @param {number} v
 */
export function formatValue(v) {
  if (typeof v !== "number" || Number.isNaN(v)) return "NaN";
  if (!Number.isFinite(v)) return v > 0 ? "inf" : "-inf";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(2).replace("e+", "e");
  return String(Number(v.toPrecision(4)));
}
