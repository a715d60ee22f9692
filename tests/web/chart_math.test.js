// Unit tests for web/lib/chart_math.js (run with `node --test tests/web/`).
import test from "node:test";
import assert from "node:assert/strict";

import {
  autoSmoothing,
  downsampleMinMax,
  emaSmooth,
  finiteExtent,
  formatValue,
  linearScale,
  lossRange,
  niceStep,
  niceTicks,
  quantile,
} from "../../web/lib/chart_math.js";

/** Closed-form debiased EMA: sum_i (1-w) w^(t-i) x_i / (1 - w^t) over the finite values seen so far. */
function emaReference(values, w) {
  const finite = [];
  return values.map((v) => {
    if (!Number.isFinite(v)) return NaN;
    finite.push(v);
    const t = finite.length;
    let num = 0;
    for (let i = 0; i < t; i++) num += (1 - w) * Math.pow(w, t - 1 - i) * finite[i];
    return num / (1 - Math.pow(w, t));
  });
}

function lcg(seed) {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

test("emaSmooth matches the closed-form debiased average", () => {
  const rnd = lcg(7);
  const xs = Array.from({ length: 200 }, (_, i) => 1 / (1 + i * 0.05) + 0.3 * (rnd() - 0.5));
  for (const w of [0, 0.5, 0.9, 0.99]) {
    const got = emaSmooth(xs, w);
    const ref = emaReference(xs, w);
    assert.equal(got.length, xs.length);
    for (let i = 0; i < xs.length; i++) assert.ok(Math.abs(got[i] - ref[i]) < 1e-12, `w=${w} i=${i}: ${got[i]} vs ${ref[i]}`);
  }
});

test("emaSmooth: first value is unbiased, weight 0 is identity, constant stays constant", () => {
  assert.equal(emaSmooth([3.5, 1], 0.9)[0], 3.5);
  assert.deepEqual(emaSmooth([1, 2, 3], 0), [1, 2, 3]);
  for (const v of emaSmooth(new Array(50).fill(0.25), 0.97)) assert.ok(Math.abs(v - 0.25) < 1e-15);
});

test("emaSmooth skips NaN and Infinity without poisoning later values", () => {
  const xs = [1, NaN, 2, Infinity, 3];
  const got = emaSmooth(xs, 0.5);
  assert.ok(Number.isNaN(got[1]) && Number.isNaN(got[3]));
  // finite subsequence [1, 2, 3] with w = 0.5: (0.5*1)/0.5 = 1; (0.25+1)/0.75; (0.125+0.5+1.5)/0.875
  assert.ok(Math.abs(got[0] - 1) < 1e-15);
  assert.ok(Math.abs(got[2] - 1.25 / 0.75) < 1e-15);
  assert.ok(Math.abs(got[4] - 2.125 / 0.875) < 1e-15);
});

test("emaSmooth rejects a weight outside [0, 1)", () => {
  assert.throws(() => emaSmooth([1], 1), RangeError);
  assert.throws(() => emaSmooth([1], -0.1), RangeError);
  assert.throws(() => emaSmooth([1], NaN), RangeError);
});

test("finiteExtent and quantile ignore non-finite values", () => {
  assert.deepEqual(finiteExtent([NaN, 3, -Infinity, -2, 7]), { min: -2, max: 7 });
  assert.equal(finiteExtent([NaN, Infinity]), null);
  assert.equal(quantile([4, 1, 3, 2, NaN], 0.5), 2.5);
  assert.equal(quantile([10, 0], 0.25), 2.5);
  assert.equal(quantile([5], 0.9), 5);
  assert.ok(Number.isNaN(quantile([], 0.5)));
});

test("lossRange clips a single early spike above the 99% quantile but keeps the smoothed curve", () => {
  const raw = Array.from({ length: 200 }, (_, i) => 0.1 + 0.001 * (i % 10));
  raw[0] = 50;
  const r = lossRange(raw, raw.map(() => 0.105));
  assert.equal(r.min, 0.1);
  // 99% quantile of the 200 values: position 0.99*199 = 197.01 in the sorted list (all 0.109 there but the spike at 199)
  assert.ok(Math.abs(r.max - 0.109) < 1e-12, `max ${r.max}`);
  const r2 = lossRange(raw, raw.map(() => 0.5));
  assert.equal(r2.max, 0.5);
  // few points: no clipping
  assert.deepEqual(lossRange([1, 5, 2], []), { min: 1, max: 5 });
});

test("lossRange widens a flat series and returns null without finite values", () => {
  const r = lossRange([2, 2, 2], [2, 2]);
  assert.ok(r.min < 2 && r.max > 2);
  assert.ok(Math.abs(r.max - 2.1) < 1e-12 && Math.abs(r.min - 1.9) < 1e-12);
  assert.deepEqual(lossRange([0, 0], []), { min: -1, max: 1 });
  assert.equal(lossRange([NaN], [NaN]), null);
});

test("niceStep picks 1, 2, 5 times a power of ten", () => {
  assert.equal(niceStep(10, 5), 2);
  assert.equal(niceStep(1, 4), 0.5);
  assert.equal(niceStep(100, 10), 10);
  assert.equal(niceStep(0.07, 5), 0.02);
  assert.equal(niceStep(7, 1), 10);
});

test("niceTicks covers the range with nice evenly spaced values", () => {
  const cases = [
    [0.0813, 0.1427, 5],
    [0, 1000, 5],
    [1, 37, 4],
    [-3.2, 4.9, 6],
    [1e-5, 3e-5, 4],
    [12345, 12399, 5],
  ];
  for (const [lo, hi, n] of cases) {
    const t = niceTicks(lo, hi, n);
    assert.ok(t.min <= lo + 1e-12 && t.max >= hi - 1e-12, `[${lo}, ${hi}] not covered by [${t.min}, ${t.max}]`);
    assert.ok(t.ticks.length - 1 <= n, `${t.ticks.length - 1} intervals > ${n}`);
    assert.ok(t.ticks.length >= 2);
    const mant = t.step / Math.pow(10, Math.floor(Math.log10(t.step) + 1e-9));
    assert.ok([1, 2, 5, 10].some((m) => Math.abs(mant - m) < 1e-9), `step ${t.step} not nice`);
    for (let i = 1; i < t.ticks.length; i++) assert.ok(Math.abs(t.ticks[i] - t.ticks[i - 1] - t.step) < t.step * 1e-9);
    // each tick is a whole multiple of the step
    for (const v of t.ticks) assert.ok(Math.abs(v / t.step - Math.round(v / t.step)) < 1e-6);
  }
  assert.deepEqual(niceTicks(0, 10, 5).ticks, [0, 2, 4, 6, 8, 10]);
  assert.deepEqual(niceTicks(0.08, 0.14, 3).ticks, [0.08, 0.1, 0.12, 0.14]);
  assert.deepEqual(niceTicks(0.0813, 0.1427, 5).ticks, [0.08, 0.1, 0.12, 0.14, 0.16]);
});

test("niceTicks handles equal and reversed bounds, rejects non-finite", () => {
  const t = niceTicks(5, 5, 4);
  assert.ok(t.min < 5 && t.max > 5);
  const r = niceTicks(10, 0, 5);
  assert.deepEqual(r.ticks, [0, 2, 4, 6, 8, 10]);
  assert.throws(() => niceTicks(0, Infinity), RangeError);
});

test("downsampleMinMax keeps short series, drops non-finite values", () => {
  const got = downsampleMinMax([1, 2, 3, 4], [0.5, NaN, 0.25, 0.125], 10);
  assert.deepEqual(got, { xs: [1, 3, 4], ys: [0.5, 0.25, 0.125] });
});

test("downsampleMinMax bounds the point count and keeps extremes, endpoints and order", () => {
  const n = 10000;
  const rnd = lcg(3);
  const xs = Array.from({ length: n }, (_, i) => i + 1);
  const ys = xs.map((x) => 1 / Math.sqrt(x) + 0.05 * rnd());
  ys[4321] = 9; // spike
  ys[7777] = -1; // dip
  const d = downsampleMinMax(xs, ys, 300);
  assert.ok(d.xs.length <= 300, `${d.xs.length} points`);
  assert.ok(d.xs.length >= 250);
  assert.equal(d.xs[0], 1);
  assert.equal(d.xs[d.xs.length - 1], n);
  for (let i = 1; i < d.xs.length; i++) assert.ok(d.xs[i] > d.xs[i - 1]);
  assert.ok(d.ys.includes(9) && d.ys.includes(-1));
  // every kept point is a real sample
  for (let i = 0; i < d.xs.length; i++) assert.equal(d.ys[i], ys[d.xs[i] - 1]);
  // each bucket's max is kept: the envelope of the input is preserved per bucket of ~ (n-2)/149 points
  const inner = n - 2;
  const buckets = Math.floor((300 - 2) / 2);
  for (let b = 0; b < buckets; b++) {
    const s = 1 + Math.floor((b * inner) / buckets);
    const e = 1 + Math.floor(((b + 1) * inner) / buckets);
    let hi = -Infinity;
    for (let k = s; k < e; k++) hi = Math.max(hi, ys[k]);
    assert.ok(d.ys.includes(hi), `bucket ${b} max ${hi} lost`);
  }
});

test("downsampleMinMax rejects mismatched lengths", () => {
  assert.throws(() => downsampleMinMax([1, 2], [1], 10), RangeError);
});

test("linearScale maps ends and midpoints, flips for pixel y", () => {
  const s = linearScale(0, 10, 100, 0);
  assert.equal(s(0), 100);
  assert.equal(s(10), 0);
  assert.equal(s(2.5), 75);
  assert.equal(linearScale(3, 3, 0, 50)(3), 25);
});

test("formatValue gives 4 significant digits or exponent form", () => {
  assert.equal(formatValue(0.123456), "0.1235");
  assert.equal(formatValue(1.5), "1.5");
  assert.equal(formatValue(0.0001), "1.00e-4");
  assert.equal(formatValue(123456), "1.23e5");
  assert.equal(formatValue(0), "0");
  assert.equal(formatValue(NaN), "NaN");
  assert.equal(formatValue(Infinity), "inf");
  assert.equal(formatValue(-Infinity), "-inf");
});

test("autoSmoothing: window of n/20 steps clamped to [1, 50]", () => {
  assert.equal(autoSmoothing(10), 0);
  assert.equal(autoSmoothing(20), 0);
  assert.ok(Math.abs(autoSmoothing(100) - 0.8) < 1e-15);
  assert.ok(Math.abs(autoSmoothing(1000) - 0.98) < 1e-15);
  assert.ok(Math.abs(autoSmoothing(1e6) - 0.98) < 1e-15);
});
