// The loader's "where the adapter acts" picture: ||s * strength * dW||_F per block (the report's delta_norms, made
// by hadakron/delta_norms.py) as a small heatmap. Layout and drawing on any 2D-context-like object; no DOM here.

export const HEAT_COLORS = Object.freeze({
  background: "#1b1b1b",
  empty: "#2c2c2c", // a block the adapter has no module in
  off: "#454545", // modules there, but strength 0 (block weight or node strength)
  label: "#9a9a9a",
  outline: "#111111",
});

/**
 * The report's delta_norms field checked: cells with finite non-negative norms, or null.
 * @param {unknown} raw
 * @returns {{cells: {part: string, block: string, norm: number, modules: number, exact: boolean}[], exact: boolean,
 *   note: string, max: number} | null}
 */
export function parseHeatmap(raw) {
  if (!raw || typeof raw !== "object" || !Array.isArray(/** @type {any} */ (raw).cells)) return null;
  const r = /** @type {any} */ (raw);
  const cells = [];
  for (const c of r.cells) {
    if (!c || typeof c !== "object" || typeof c.block !== "string") return null;
    const norm = Number(c.norm);
    cells.push({
      part: String(c.part ?? ""),
      block: c.block,
      norm: Number.isFinite(norm) && norm >= 0 ? norm : NaN,
      modules: Number.isInteger(c.modules) ? c.modules : 0,
      exact: c.exact !== false,
    });
  }
  if (!cells.length) return null;
  const max = cells.reduce((m, c) => (Number.isFinite(c.norm) && c.norm > m ? c.norm : m), 0);
  return { cells, exact: cells.every((c) => !c.modules || c.exact), note: String(r.note ?? ""), max };
}

/**
 * The row a block goes in: its name without the trailing number ("IN04" -> "IN", "blocks.7" -> "blocks"); the text
 * encoders share one row ("TE").
 * @param {{part: string, block: string}} cell
 */
export function rowOf(cell) {
  if (cell.part && cell.part !== "unet") return "TE";
  const m = /^(.*?)[._]?\d+$/.exec(cell.block);
  return m && m[1] ? m[1] : cell.block;
}

/** Colour of a cell from its share t in [0, 1] of the largest norm: dark blue to orange to light yellow. */
export function heatColor(t) {
  const stops = [
    [0, [38, 52, 110]],
    [0.5, [214, 96, 60]],
    [1, [255, 226, 120]],
  ];
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0));
  let i = 0;
  while (i < stops.length - 2 && x > stops[i + 1][0]) i++;
  const [t0, c0] = stops[i];
  const [t1, c1] = stops[i + 1];
  const f = (x - t0) / (t1 - t0);
  const c = c0.map((v, k) => Math.round(v + (c1[k] - v) * f));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

/**
 * Cell rectangles for a width in CSS pixels: one row per block group (IN, M, OUT, OTHER, TE; Anima blocks,
 * llm_adapter, OTHER, TE) with its label on the left; cells share one width so equal indices line up.
 * @param {NonNullable<ReturnType<typeof parseHeatmap>>} heat
 * @param {number} width
 * @returns {{width: number, height: number, labelWidth: number, rows: {label: string, y: number}[],
 *   cells: {x: number, y: number, w: number, h: number, fill: string, index: number}[]}}
 */
export function heatmapLayout(heat, width) {
  const labelWidth = 62;
  const rowH = 16;
  const gap = 2;
  /** @type {Map<string, number[]>} */
  const rows = new Map();
  heat.cells.forEach((c, i) => {
    const r = rowOf(c);
    if (!rows.has(r)) rows.set(r, []);
    rows.get(r).push(i);
  });
  const widest = Math.max(...[...rows.values()].map((r) => r.length));
  const cellW = Math.max(4, Math.min(26, Math.floor((width - labelWidth - 2) / widest) - gap));
  const out = { width, height: rows.size * (rowH + gap) + 14, labelWidth, rows: [], cells: [] };
  let y = 0;
  for (const [label, idx] of rows) {
    out.rows.push({ label, y });
    idx.forEach((i, k) => {
      const c = heat.cells[i];
      const fill = !c.modules ? HEAT_COLORS.empty : !(c.norm > 0) ? HEAT_COLORS.off : heatColor(heat.max > 0 ? c.norm / heat.max : 0);
      out.cells.push({ x: labelWidth + k * (cellW + gap), y, w: cellW, h: rowH, fill, index: i });
    });
    y += rowH + gap;
  }
  return out;
}

/**
 * Draws the heatmap: row labels, one filled square per block (index digits inside when they fit; a light corner
 * mark where the value is an upper bound), a colour scale.
 * @param {CanvasRenderingContext2D} ctx scaled so one unit is one CSS pixel
 * @param {NonNullable<ReturnType<typeof parseHeatmap>>} heat
 * @param {ReturnType<typeof heatmapLayout>} layout
 */
export function drawHeatmap(ctx, heat, layout) {
  ctx.fillStyle = HEAT_COLORS.background;
  ctx.fillRect(0, 0, layout.width, layout.height);
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  ctx.fillStyle = HEAT_COLORS.label;
  for (const r of layout.rows) ctx.fillText(r.label, layout.labelWidth - 4, r.y + 8);
  ctx.textAlign = "center";
  for (const cell of layout.cells) {
    ctx.fillStyle = cell.fill;
    ctx.fillRect(cell.x, cell.y, cell.w, cell.h);
    const c = heat.cells[cell.index];
    if (c.modules && !c.exact) {
      // an upper bound, not the exact norm: a light corner mark
      ctx.fillStyle = "#f0f0f0";
      ctx.beginPath();
      ctx.moveTo(cell.x + cell.w - 5, cell.y);
      ctx.lineTo(cell.x + cell.w, cell.y);
      ctx.lineTo(cell.x + cell.w, cell.y + 5);
      ctx.fill();
    }
    const digits = /(\d+)$/.exec(c.block);
    const text = digits ? String(Number(digits[1])) : "";
    if (text && cell.w >= 6 * text.length + 2) {
      ctx.fillStyle = c.modules && c.norm / heat.max > 0.6 ? "#202020" : "#d0d0d0";
      ctx.font = "9px sans-serif";
      ctx.fillText(text, cell.x + cell.w / 2, cell.y + cell.h / 2 + 0.5);
    }
  }
  // the scale: 0 .. max, left to right
  const y = layout.height - 10;
  const x0 = layout.labelWidth;
  const w = Math.max(20, Math.min(120, layout.width - x0 - 90));
  for (let i = 0; i < w; i++) {
    ctx.fillStyle = heatColor(i / (w - 1));
    ctx.fillRect(x0 + i, y, 1, 6);
  }
  ctx.fillStyle = HEAT_COLORS.label;
  ctx.font = "9px sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(`0 \u2013 ${formatNorm(heat.max)}`, x0 + w + 4, y + 3);
}

/** A norm as short text: 3 significant digits. */
export function formatNorm(v) {
  if (!Number.isFinite(v)) return "?";
  if (v === 0) return "0";
  return Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(2) : String(Number(v.toPrecision(3)));
}

/** The cell under a point (CSS pixels), or null: for the canvas tooltip. */
export function cellAt(layout, x, y) {
  return layout.cells.find((c) => x >= c.x && x < c.x + c.w && y >= c.y && y < c.y + c.h) ?? null;
}

/** Tooltip text of one cell: "IN04 · ||dW|| 0.0123 · 12 modules" (+ "upper bound" where not exact). */
export function cellText(c) {
  if (!c.modules) return `${c.block} \u00b7 no modules`;
  const bound = c.exact ? "" : " \u00b7 upper bound";
  return `${c.block} \u00b7 \u2016\u0394W\u2016 ${formatNorm(c.norm)} \u00b7 ${c.modules} module${c.modules > 1 ? "s" : ""}${bound}`;
}
