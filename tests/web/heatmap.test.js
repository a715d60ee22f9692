// Unit tests for web/lib/heatmap.js: parsing the report's delta_norms, rows, colours, layout, drawing calls.
import test from "node:test";
import assert from "node:assert/strict";

import { cellAt, cellText, drawHeatmap, formatNorm, heatColor, heatmapLayout, parseHeatmap, rowOf } from "../../web/lib/heatmap.js";

const SDXL_BLOCKS = [..."012345678"].map((i) => `IN0${i}`).concat(["M00"], [..."012345678"].map((i) => `OUT0${i}`), ["OTHER"]);

function sdxlHeat() {
  const cells = SDXL_BLOCKS.map((b, i) => ({ part: "unet", block: b, norm: b.startsWith("IN0") && i < 4 ? 0 : i / 10, modules: i < 2 ? 0 : 3, exact: b !== "OUT01" }));
  cells.push({ part: "te1", block: "TE1", norm: 1, modules: 1, exact: true }, { part: "te2", block: "TE2", norm: 0, modules: 0, exact: true });
  return parseHeatmap({ cells, exact: false, note: "n", max: 2 });
}

test("parseHeatmap checks cells and recomputes the max; junk gives null", () => {
  const h = sdxlHeat();
  assert.equal(h.cells.length, 22);
  assert.equal(h.max, 1.9);
  assert.equal(h.exact, false);
  assert.equal(parseHeatmap(null), null);
  assert.equal(parseHeatmap({ cells: [] }), null);
  assert.equal(parseHeatmap({ cells: [{ norm: 1 }] }), null);
  assert.ok(Number.isNaN(parseHeatmap({ cells: [{ block: "a", norm: "x" }] }).cells[0].norm));
});

test("rows: SDXL IN / M / OUT / OTHER / TE; Anima blocks / llm_adapter / OTHER / TE", () => {
  assert.deepEqual(["IN04", "M00", "OUT08", "OTHER"].map((b) => rowOf({ part: "unet", block: b })), ["IN", "M", "OUT", "OTHER"]);
  assert.equal(rowOf({ part: "te2", block: "TE2" }), "TE");
  assert.deepEqual(["blocks.0", "blocks.27", "llm_adapter"].map((b) => rowOf({ part: "unet", block: b })), ["blocks", "blocks", "llm_adapter"]);
  assert.equal(rowOf({ part: "te", block: "te" }), "TE");
});

test("heatColor runs dark blue -> orange -> light yellow and clamps", () => {
  assert.equal(heatColor(0), "rgb(38, 52, 110)");
  assert.equal(heatColor(0.5), "rgb(214, 96, 60)");
  assert.equal(heatColor(1), "rgb(255, 226, 120)");
  assert.equal(heatColor(2), heatColor(1));
  assert.equal(heatColor(NaN), heatColor(0));
  assert.equal(heatColor(0.25), "rgb(126, 74, 85)");
});

test("layout: one cell per block, rows in order, cells inside the width, empty and zero cells greyed", () => {
  const h = sdxlHeat();
  const lay = heatmapLayout(h, 360);
  assert.equal(lay.cells.length, 22);
  assert.deepEqual(lay.rows.map((r) => r.label), ["IN", "M", "OUT", "OTHER", "TE"]);
  for (const c of lay.cells) assert.ok(c.x >= lay.labelWidth && c.x + c.w <= 360 && c.w >= 4, JSON.stringify(c));
  const byBlock = Object.fromEntries(lay.cells.map((c) => [h.cells[c.index].block, c]));
  assert.equal(byBlock.IN00.fill, "#2c2c2c"); // no modules
  assert.equal(byBlock.IN02.fill, "#454545"); // modules at strength 0
  assert.equal(byBlock.OTHER.fill, heatColor(1)); // the largest (1.9)
  assert.equal(byBlock.OUT08.fill, heatColor(1.8 / 1.9));
  assert.equal(byBlock.IN04.x, byBlock.OUT04.x); // equal indices line up
  assert.equal(cellAt(lay, byBlock.M00.x + 1, byBlock.M00.y + 1), byBlock.M00);
  assert.equal(cellAt(lay, 0, 0), null);
  // Anima: 28 blocks in one row still fit 340 px
  const anima = parseHeatmap({ cells: Array.from({ length: 28 }, (_, i) => ({ part: "unet", block: `blocks.${i}`, norm: i, modules: 1 })) });
  const al = heatmapLayout(anima, 340);
  assert.ok(al.cells.every((c) => c.x + c.w <= 340));
});

test("drawHeatmap fills one rectangle per cell with its colour", () => {
  const h = sdxlHeat();
  const lay = heatmapLayout(h, 360);
  const fills = [];
  const marks = [];
  let path = [];
  const ctx = { fillStyle: "", font: "", textAlign: "", textBaseline: "",
    fillRect(x, y, w, hh) { fills.push([this.fillStyle, x, y, w, hh]); }, fillText() {},
    beginPath() { path = []; }, moveTo(x, y) { path.push([x, y]); }, lineTo(x, y) { path.push([x, y]); },
    fill() { marks.push(path); } };
  drawHeatmap(ctx, h, lay);
  for (const c of lay.cells) assert.ok(fills.some((f) => f[0] === c.fill && f[1] === c.x && f[2] === c.y), c.index);
  // one corner mark, on the only inexact block with modules (OUT01)
  const out01 = lay.cells.find((c) => h.cells[c.index].block === "OUT01");
  assert.deepEqual(marks, [[[out01.x + out01.w - 5, out01.y], [out01.x + out01.w, out01.y], [out01.x + out01.w, out01.y + 5]]]);
});

test("formatNorm and cellText", () => {
  assert.equal(formatNorm(0.012345), "0.0123");
  assert.equal(formatNorm(123456), "1.23e+5");
  assert.equal(formatNorm(0), "0");
  assert.equal(cellText({ block: "IN04", norm: 0.5, modules: 2, exact: false }), "IN04 \u00b7 \u2016\u0394W\u2016 0.5 \u00b7 2 modules \u00b7 upper bound");
  assert.equal(cellText({ block: "M00", norm: 0, modules: 0, exact: true }), "M00 \u00b7 no modules");
});
