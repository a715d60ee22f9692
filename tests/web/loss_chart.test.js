// Unit tests for web/lib/loss_history.js, loss_series.js and chart_draw.js (drawing on a recording context).
import test from "node:test";
import assert from "node:assert/strict";

import { LossHistory, firstStepOfFinal } from "../../web/lib/loss_history.js";
import { buildSeries, seriesFromJSON, seriesToJSON } from "../../web/lib/loss_series.js";
import { chartLayout, drawLossChart, statusText } from "../../web/lib/chart_draw.js";

function ev(step, loss, total = 10, lr = 1e-4) {
  return { node: "3", step, total, loss, lr };
}

test("LossHistory collects events and starts over when the step goes back", () => {
  const h = new LossHistory();
  assert.equal(h.lastStep, 0);
  assert.ok(Number.isNaN(h.lastLoss));
  for (let s = 1; s <= 4; s++) assert.equal(h.addEvent(ev(s, 1 / s)), false);
  assert.deepEqual(h.steps, [1, 2, 3, 4]);
  assert.equal(h.lastLoss, 0.25);
  assert.equal(h.total, 10);
  assert.equal(h.lastLr, 1e-4);
  assert.equal(h.addEvent(ev(1, 2)), true);
  assert.deepEqual(h.steps, [1]);
  assert.deepEqual(h.losses, [2]);
});

test("LossHistory.setFinal replaces the live points; a later event starts a new run", () => {
  const h = new LossHistory();
  h.addEvent(ev(1, 5));
  h.addEvent(ev(3, 4));
  h.setFinal([5, 4.5, 4, 3.5], 1);
  assert.deepEqual(h.steps, [1, 2, 3, 4]);
  assert.deepEqual(h.losses, [5, 4.5, 4, 3.5]);
  assert.equal(h.total, 4);
  assert.equal(h.finished, true);
  assert.equal(h.lastLr, 1e-4);
  h.setFinal([1, 2], 101);
  assert.deepEqual(h.steps, [101, 102]);
  assert.equal(h.addEvent(ev(200, 1)), true, "an event after a finished run starts a new one");
  assert.equal(h.finished, false);
});

test("LossHistory.resume continues a saved unfinished run", () => {
  const h = new LossHistory();
  h.resume([1, 5, 9], [0.9, 0.7, 0.6], 20);
  assert.equal(h.finished, false);
  assert.equal(h.total, 20);
  assert.equal(h.addEvent(ev(10, 0.55, 20)), false);
  assert.deepEqual(h.steps, [1, 5, 9, 10]);
  assert.deepEqual(h.losses, [0.9, 0.7, 0.6, 0.55]);
  assert.throws(() => h.resume([1], [], 0), RangeError);
});

test("firstStepOfFinal: explicit first_step, else the live run's end, else 1", () => {
  const h = new LossHistory();
  assert.equal(firstStepOfFinal(h, 5, null), 1);
  assert.equal(firstStepOfFinal(h, 5, 41), 41);
  // a run resumed at step 100 and followed live to step 150 ends with 50 losses: steps 101..150
  for (let s = 101; s <= 150; s++) h.addEvent(ev(s, 0.1, 150));
  assert.equal(firstStepOfFinal(h, 50, null), 101);
  assert.equal(firstStepOfFinal(h, 50, 7), 7);
  assert.equal(firstStepOfFinal(h, 400, null), 1, "more losses than live steps: start at 1");
  h.setFinal([1, 2, 3]);
  assert.equal(firstStepOfFinal(h, 3, null), 1, "a finished history says nothing about the next output");
});

test("buildSeries smooths over the whole run, then downsamples both curves", () => {
  const h = new LossHistory();
  const n = 5000;
  for (let s = 1; s <= n; s++) h.addEvent(ev(s, s % 2 ? 1 : 0, n));
  const series = buildSeries(h, { smoothing: 0.9, maxPoints: 200 });
  assert.equal(series.count, n);
  assert.equal(series.lastStep, n);
  assert.equal(series.lastLoss, 0);
  assert.ok(series.raw.xs.length <= 200 && series.smooth.xs.length <= 200);
  // alternating 1, 0 with w = 0.9: debiased EMA at an even step t is (1-w) * sum_{j odd < t} w^(t-j) / (1-w^t),
  // which tends to 0.1*0.9/(1-0.81) = 0.47368...; independent float64 sum here
  const w = 0.9;
  let num = 0;
  for (let j = 1; j < n; j += 2) num += (1 - w) * Math.pow(w, n - j);
  const expectedLast = num / (1 - Math.pow(w, n));
  const lastSmooth = series.smooth.ys[series.smooth.ys.length - 1];
  assert.ok(Math.abs(lastSmooth - expectedLast) < 1e-12, `${lastSmooth} vs ${expectedLast}`);
  assert.ok(Math.abs(expectedLast - 0.09 / 0.19) < 1e-9);
  assert.ok(series.raw.ys.includes(1) && series.raw.ys.includes(0), "min-max buckets keep both levels");
});

test("series JSON round trip keeps values and maps NaN to null and back", () => {
  const h = new LossHistory();
  [0.5, NaN, 0.25].forEach((l, i) => h.addEvent(ev(i + 1, l, 3)));
  const s = buildSeries(h, { smoothing: 0.5 });
  const json = JSON.parse(JSON.stringify(seriesToJSON(s)));
  const back = seriesFromJSON(json);
  assert.deepEqual(back.raw, { xs: [1, 3], ys: [0.5, 0.25] });
  assert.deepEqual(back.smooth.xs, [1, 3]);
  assert.equal(back.lastLoss, 0.25);
  assert.equal(back.total, 3);
  assert.equal(back.count, 3);
  const rounded = seriesToJSON(buildSeries(h, { smoothing: 0.5 }), { digits: 3 });
  assert.deepEqual(rounded.smooth.ys, [0.5, 0.333]);
  assert.equal(rounded.lastLoss, 0.25);
  assert.equal(seriesFromJSON({ version: 99 }), null);
  assert.equal(seriesFromJSON({ version: 1, raw: { xs: [1], ys: [] }, smooth: { xs: [], ys: [] } }), null);
  assert.equal(seriesFromJSON("junk"), null);
});

/** A CanvasRenderingContext2D stand-in that records paths and text. */
function recorder() {
  const calls = [];
  const paths = [];
  let current = null;
  const ctx = {
    calls,
    paths,
    fillStyle: "",
    strokeStyle: "",
    lineWidth: 1,
    font: "",
    textAlign: "",
    textBaseline: "",
    fillRect: (...a) => calls.push(["fillRect", ...a]),
    fillText: (t, x, y) => calls.push(["fillText", t, x, y]),
    beginPath: () => {
      current = [];
    },
    moveTo: (x, y) => current.push([x, y]),
    lineTo: (x, y) => current.push([x, y]),
    rect: () => {},
    clip: () => calls.push(["clip"]),
    save: () => {},
    restore: () => {},
    stroke: () => paths.push({ color: ctx.strokeStyle, width: ctx.lineWidth, points: current }),
  };
  return ctx;
}

test("chartLayout maps the data range inside the plot, larger loss higher up", () => {
  const h = new LossHistory();
  for (let s = 1; s <= 40; s++) h.addEvent(ev(s, 2 / s, 100));
  const series = buildSeries(h);
  const lay = chartLayout(series, 300, 160);
  assert.ok(lay.sy(2) < lay.sy(0.05), "y grows downward in pixels");
  assert.ok(lay.yDomain[0] <= 0.05 && lay.yDomain[1] >= 2);
  assert.deepEqual(lay.xDomain, [1, 100], "x axis runs to the planned total");
  assert.equal(lay.sx(1), lay.plot.x);
  assert.equal(lay.sx(100), lay.plot.x + lay.plot.w);
  assert.equal(chartLayout(series, 40, 30), null, "too small");
});

test("drawLossChart draws both curves inside the plot and labels the axes", () => {
  const h = new LossHistory();
  for (let s = 1; s <= 60; s++) h.addEvent(ev(s, 1 + Math.sin(s) * 0.2 + 3 / s, 60));
  const series = buildSeries(h);
  const ctx = recorder();
  assert.equal(drawLossChart(ctx, 320, 180, series), true);
  const lay = chartLayout(series, 320, 180);
  const curves = ctx.paths.filter((p) => p.points.length > 2);
  assert.equal(curves.length, 2, "raw and smoothed");
  assert.equal(curves[0].points.length, 60);
  assert.ok(curves[1].width > curves[0].width, "smoothed curve is bolder");
  for (const c of curves)
    for (const [x, y] of c.points) {
      assert.ok(x >= lay.plot.x - 1e-9 && x <= lay.plot.x + lay.plot.w + 1e-9);
      assert.ok(y >= lay.plot.y - 1e-9 && y <= lay.plot.y + lay.plot.h + 1e-9);
    }
  const labels = ctx.calls.filter((c) => c[0] === "fillText").map((c) => c[1]);
  assert.ok(labels.includes("60"), `x labels ${labels}`);
  assert.ok(labels.length >= 4);
});

test("drawLossChart with no data writes the waiting message", () => {
  const ctx = recorder();
  assert.equal(drawLossChart(ctx, 200, 120, null), false);
  assert.deepEqual(ctx.calls.at(-1).slice(0, 2), ["fillText", "loss appears here while training runs"]);
  const h = new LossHistory();
  h.addEvent(ev(1, NaN));
  const ctx2 = recorder();
  assert.equal(drawLossChart(ctx2, 200, 120, buildSeries(h)), false, "only NaN: nothing to plot");
});

test("statusText shows step, total, last and smoothed loss, lr and done", () => {
  assert.equal(statusText(null), "waiting for training");
  const h = new LossHistory();
  h.addEvent(ev(1, 0.5, 100, 0.0001));
  h.addEvent(ev(2, 0.25, 100, 0.0001));
  const s = buildSeries(h, { smoothing: 0.5 });
  // debiased EMA with w=0.5 over [0.5, 0.25]: (0.25*0.5 + 0.5*0.25) / 0.75 = 0.3333
  assert.equal(statusText(s, h.lastLr), "step 2 / 100 \u00b7 loss 0.25 \u00b7 avg 0.3333 \u00b7 lr 1.00e-4");
  h.setFinal([0.5, 0.25]);
  assert.equal(statusText(buildSeries(h, { smoothing: 0.5 })), "step 2 / 2 \u00b7 loss 0.25 \u00b7 avg 0.3333 \u00b7 done");
});

test("buildSeries without a smoothing weight uses autoSmoothing of the planned total", () => {
  const h = new LossHistory();
  const losses = [1, 0, 1, 0, 1];
  losses.forEach((l, i) => h.addEvent(ev(i + 1, l, 100))); // total 100 -> window 5 -> weight 0.8
  const s = buildSeries(h);
  const w = 0.8;
  let num = 0;
  losses.forEach((x, i) => (num += (1 - w) * Math.pow(w, losses.length - 1 - i) * x));
  const expected = num / (1 - Math.pow(w, losses.length));
  assert.ok(Math.abs(s.smooth.ys.at(-1) - expected) < 1e-12, `${s.smooth.ys.at(-1)} vs ${expected}`);
});
