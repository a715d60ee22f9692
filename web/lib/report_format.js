// Turns the loader's report dict (hadakron_report ui output) into text lines for the node.
// Tolerant of shape: matched may be {part: {block: n}}, {part: n}, [{part, block, count}] or a number;
// unmatched may be [{key, reason, expected, found}], [string] or {key: reason}.

/** Training metadata keys shown first, in this order, with a short label (others follow, sorted). */
const METADATA_KEYS = [
  ["ss_network_module", "network"],
  ["ss_network_dim", "dim"],
  ["ss_network_alpha", "alpha"],
  ["ss_network_args", "network args"],
  ["ss_base_model_version", "base model"],
  ["ss_sd_model_name", "trained on"],
  ["modelspec.architecture", "architecture"],
  ["modelspec.title", "title"],
  ["ss_steps", "steps"],
  ["ss_max_train_steps", "max steps"],
  ["ss_num_train_images", "images"],
  ["ss_learning_rate", "lr"],
  ["ss_training_comment", "comment"],
];

/** Top-level fields of the report shown in the summary, with a label (hadakron/load_report.py to_dict). */
const SUMMARY_KEYS = [
  ["note", "note"],
  ["source", "file"],
  ["family", "family"],
  ["file_family", "file looks like"],
  ["layouts", "key layout"],
  ["loaded_parts", "parts"],
  ["by_algorithm", "algorithms"],
  ["algorithm", "algorithm"],
  ["strengths", "strength"],
  ["block_weights", "block weights"],
  ["patches_added", "patches added"],
];

const ALGORITHM_NAMES = { loha: "LoHa", lokr: "LoKr", lora: "LoRA" };

/**
 * Compares strings with embedded numbers numerically ("input_blocks.10" after "input_blocks.9").
 * @param {string} a
 * @param {string} b
 */
export function naturalCompare(a, b) {
  const re = /(\d+)|(\D+)/g;
  const ta = String(a).match(re) || [];
  const tb = String(b).match(re) || [];
  for (let i = 0; i < Math.min(ta.length, tb.length); i++) {
    const x = ta[i];
    const y = tb[i];
    if (x === y) continue;
    const nx = /^\d+$/.test(x);
    const ny = /^\d+$/.test(y);
    if (nx && ny) return Number(x) - Number(y) || x.length - y.length;
    return x < y ? -1 : 1;
  }
  return ta.length - tb.length;
}

/**
 * Orders the report's block labels (hadakron.arch block_of, the names block_weights takes): natural order, case
 * ignored, the catch-all OTHER last. SDXL: IN00 < IN10 < M00 < OUT00 < OTHER; Anima: blocks.2 < blocks.10 <
 * llm_adapter < OTHER.
 * @param {string} a
 * @param {string} b
 */
export function blockCompare(a, b) {
  const otherA = String(a).toUpperCase() === "OTHER";
  const otherB = String(b).toUpperCase() === "OTHER";
  if (otherA !== otherB) return otherA ? 1 : -1;
  return naturalCompare(String(a).toLowerCase(), String(b).toLowerCase()) || naturalCompare(a, b);
}

/** Shortens text to at most max characters with an ellipsis. */
export function truncate(text, max = 120) {
  const s = String(text);
  return s.length <= max ? s : s.slice(0, Math.max(0, max - 1)) + "\u2026";
}

/** A value as short text: objects/arrays as compact JSON, shapes as (a, b). */
function valueText(v) {
  if (v === null || v === undefined) return "";
  if (Array.isArray(v) && v.every((x) => Number.isInteger(x))) return `(${v.join(", ")})`;
  if (Array.isArray(v) && v.every((x) => typeof x === "string")) return v.join(", ");
  if (typeof v === "object") {
    const entries = Object.entries(v);
    if (entries.every(([, x]) => x === null || typeof x !== "object")) return entries.map(([k, x]) => `${k} ${x}`).join(", ");
    return JSON.stringify(v);
  }
  return String(v);
}

/**
 * Normalises the report's matched counts to {part: {block: count}} (a bare count goes under block "").
 * @param {unknown} matched
 * @returns {Map<string, Map<string, number>>}
 */
export function matchedByPart(matched) {
  /** @type {Map<string, Map<string, number>>} */
  const out = new Map();
  const add = (part, block, n) => {
    const c = Number(n);
    if (!Number.isFinite(c)) return;
    if (!out.has(part)) out.set(part, new Map());
    const blocks = out.get(part);
    blocks.set(block, (blocks.get(block) || 0) + c);
  };
  if (typeof matched === "number") add("all", "", matched);
  else if (Array.isArray(matched)) {
    for (const e of matched) if (e && typeof e === "object") add(String(e.part ?? "all"), String(e.block ?? ""), e.count ?? e.n ?? 1);
  } else if (matched && typeof matched === "object") {
    for (const [part, v] of Object.entries(matched)) {
      if (v && typeof v === "object" && !Array.isArray(v)) for (const [block, n] of Object.entries(v)) add(part, block, n);
      else add(part, "", v);
    }
  }
  return out;
}

/**
 * The unmatched entries as {key, reason} with expected/found shapes folded into the reason.
 * @param {unknown} unmatched
 * @returns {{key: string, reason: string, kind: string}[]}
 */
export function unmatchedEntries(unmatched) {
  const out = [];
  const reasonOf = (e) => {
    let r = valueText(e.reason ?? e.message ?? e.kind ?? "unmatched");
    const mentions = (shape) => Array.isArray(shape) && r.includes(shape.join(", "));
    if ((e.expected !== undefined || e.found !== undefined) && !(mentions(e.expected) && mentions(e.found))) {
      r += ` (expected ${valueText(e.expected)}, found ${valueText(e.found)})`;
    }
    return r;
  };
  if (Array.isArray(unmatched)) {
    for (const e of unmatched) {
      if (typeof e === "string") out.push({ key: e, reason: "", kind: "" });
      else if (e && typeof e === "object") out.push({ key: String(e.key ?? e.module ?? "?"), reason: reasonOf(e), kind: e.kind ? String(e.kind) : "" });
    }
  } else if (unmatched && typeof unmatched === "object") {
    for (const [key, v] of Object.entries(unmatched)) {
      out.push({ key, reason: v && typeof v === "object" ? reasonOf(v) : valueText(v), kind: v && typeof v === "object" && v.kind ? String(v.kind) : "" });
    }
  }
  return out;
}

/**
 * The report as sections of lines for display.
 * @param {object} report the hadakron_report dict (hadakron/load_report.py LoadReport.to_dict)
 * @param {{collapseAfter?: number, maxValue?: number}} [opts] unmatched lists longer than collapseAfter are
 *   marked collapsed; metadata values are cut to maxValue characters
 * @returns {{headline: string, summary: string[], matched: string[], matchedTotal: number, unmatched: string[],
 *   unmatchedKinds: string, unmatchedCollapsed: boolean, metadata: string[], warnings: string[]}}
 */
export function formatReport(report, opts = {}) {
  const { collapseAfter = 8, maxValue = 120 } = opts;
  const r = report && typeof report === "object" ? /** @type {any} */ (report) : {};

  const summary = [];
  for (const [key, label] of SUMMARY_KEYS) {
    let v = r[key];
    if (v === undefined || v === null || v === "") continue;
    if (key === "file_family" && v === r.family) continue;
    if (key === "by_algorithm" && typeof v === "object") {
      v = Object.fromEntries(Object.entries(v).map(([k, n]) => [ALGORITHM_NAMES[k] ?? k, n]));
    }
    const text = valueText(v);
    if (text === "" || text === "{}") continue;
    summary.push(`${label}: ${truncate(text, maxValue)}`);
  }

  const parts = matchedByPart(r.by_block ?? r.matched);
  const matched = [];
  let matchedTotal = 0;
  for (const part of parts.keys()) {
    // parts in the report's order (unet first), blocks by blockCompare (IN01 < IN10 < M00 < OUT00 < OTHER)
    const blocks = parts.get(part);
    const sum = [...blocks.values()].reduce((a, b) => a + b, 0);
    matchedTotal += sum;
    matched.push(`${part}: ${sum}`);
    const named = [...blocks.keys()].filter((b) => b !== "").sort(blockCompare);
    if (named.length === 1 && blocks.size === 1) continue; // one block: its line would repeat the part's
    for (const b of named) matched.push(`  ${b}: ${blocks.get(b)}`);
  }
  if (Number.isFinite(r.matched_count)) matchedTotal = r.matched_count;

  const entries = unmatchedEntries(r.unmatched);
  const unmatched = entries.map((e) => (e.reason ? `${e.key}: ${e.reason}` : e.key));
  const kinds = new Map();
  for (const e of entries) if (e.kind) kinds.set(e.kind, (kinds.get(e.kind) || 0) + 1);
  const unmatchedKinds = [...kinds.entries()].map(([k, n]) => `${k.replace(/_/g, " ")} ${n}`).join(", ");

  const metadata = [];
  const meta = [r.training, r.metadata].find((m) => m && typeof m === "object" && !Array.isArray(m)) ?? {};
  const shown = new Set();
  for (const [key, label] of METADATA_KEYS) {
    if (meta[key] === undefined || meta[key] === null || meta[key] === "") continue;
    shown.add(key);
    metadata.push(`${label}: ${truncate(valueText(meta[key]), maxValue)}`);
  }
  const rest = Object.keys(meta).filter((k) => !shown.has(k)).sort(naturalCompare);
  for (const key of rest) metadata.push(`${key}: ${truncate(valueText(meta[key]), maxValue)}`);

  const warnings = [];
  const w = r.warnings ?? r.problems;
  if (Array.isArray(w)) for (const x of w) warnings.push(truncate(valueText(x), 300));
  else if (typeof w === "string" && w) warnings.push(w);

  const unmatchedCount = Number.isFinite(r.unmatched_count) ? r.unmatched_count : unmatched.length;
  const bits = [];
  if (r.family) bits.push(String(r.family).toUpperCase());
  const total = Number.isFinite(r.total_modules) ? r.total_modules : matchedTotal + unmatchedCount;
  bits.push(`${matchedTotal}/${total} applied`);
  if (unmatchedCount) bits.push(`${unmatchedCount} not applied`);
  if (warnings.length) bits.push(`${warnings.length} warning${warnings.length > 1 ? "s" : ""}`);

  // nothing matched or refused (e.g. both strengths 0): the loader's note says why
  const headline = total === 0 && typeof r.note === "string" && r.note ? r.note : bits.join(" \u00b7 ");
  return {
    headline,
    summary,
    matched,
    matchedTotal,
    unmatched,
    unmatchedKinds,
    unmatchedCollapsed: unmatched.length > collapseAfter,
    metadata,
    warnings,
  };
}

/**
 * The whole report as plain text (for copying and for the test), sections separated by headings.
 * @param {ReturnType<typeof formatReport>} f
 */
export function reportText(f) {
  const out = [f.headline, ...f.summary];
  if (f.matched.length) out.push("applied per part / block:", ...f.matched.map((l) => "  " + l));
  if (f.unmatched.length) {
    out.push(`not applied (${f.unmatched.length}${f.unmatchedKinds ? ": " + f.unmatchedKinds : ""}):`);
    out.push(...f.unmatched.map((l) => "  " + l));
  }
  if (f.metadata.length) out.push("training metadata:", ...f.metadata.map((l) => "  " + l));
  if (f.warnings.length) out.push("file warnings:", ...f.warnings.map((l) => "  " + l));
  return out.join("\n");
}

// ------------------------------------------------------------------ readable blocks (loader, merge, combine)

/** Lists longer than this many lines start collapsed (their title says how many). */
export const COLLAPSE_AFTER = 8;

/**
 * Splits text into pieces between which a line may break: after `_ / \ , ; : = | ( [` and after a `.` that is not
 * between two digits (so `4.361e-01` and `0.5` stay whole; `input_blocks.4` may break after `blocks.`). Spaces break
 * by themselves. The extension puts a <wbr> between the pieces and styles the text with `word-break: normal`, so
 * long keys wrap at their punctuation and never inside a word or number.
 * @param {string} text
 * @returns {string[]} pieces whose concatenation is text
 */
export function breakPieces(text) {
  const s = String(text);
  const out = [];
  let start = 0;
  for (let i = 0; i < s.length - 1; i++) {
    const c = s[i];
    let after = "_/\\,;:=|([".includes(c);
    if (c === ".") after = !(/\d/.test(s[i - 1] ?? "") && /\d/.test(s[i + 1]));
    if (after && s[i + 1] !== " ") {
      out.push(s.slice(start, i + 1));
      start = i + 1;
    }
  }
  out.push(s.slice(start));
  return out;
}

/**
 * @typedef {{title: string, lines: string[], open: boolean, kind: string}} ReportBlock
 *   a titled section; `open` false: collapsed, the title ends with the line count
 */

function block(title, lines, kind, openWhenShort = true, collapseAfter = COLLAPSE_AFTER) {
  const collapsed = !openWhenShort || lines.length > collapseAfter;
  return { title: `${title} (${lines.length})`, lines, open: !collapsed, kind };
}

/**
 * The loader's report as a headline and titled blocks, in reading order: summary lines (no title), warnings,
 * applied per part / block, not applied, training metadata. Long lists start collapsed.
 * @param {object} report LoadReport.to_dict()
 * @param {{collapseAfter?: number}} [opts]
 * @returns {{headline: string, lines: string[], warnings: string[], blocks: ReportBlock[]}}
 */
export function reportBlocks(report, opts = {}) {
  const { collapseAfter = COLLAPSE_AFTER } = opts;
  const f = formatReport(report, { collapseAfter });
  const blocks = [];
  if (f.matched.length) {
    const b = block("applied per part / block", f.matched, "matched", true, Math.max(collapseAfter, 12));
    b.title = `applied per part / block (${f.matchedTotal} modules)`;
    blocks.push(b);
  }
  if (f.unmatched.length) {
    const b = block("not applied", f.unmatched, "unmatched", true, collapseAfter);
    if (f.unmatchedKinds) b.title = `not applied (${f.unmatched.length}: ${f.unmatchedKinds})`;
    blocks.push(b);
  }
  if (f.metadata.length) blocks.push(block("training metadata", f.metadata, "metadata", false));
  return { headline: f.headline, lines: f.summary, warnings: f.warnings, blocks };
}

/**
 * A text result (Adapter Merge, Adapter Combine, Save Adapter) as a headline and blocks: the first line is the
 * headline; every later line that is not indented starts a line of its own, and the indented lines under it (the
 * per-module details) become its block, collapsed with a count when long.
 * @param {string} text
 * @param {{collapseAfter?: number}} [opts]
 * @returns {{headline: string, lines: string[], warnings: string[], blocks: ReportBlock[]}}
 */
export function textBlocks(text, opts = {}) {
  const { collapseAfter = COLLAPSE_AFTER } = opts;
  const all = String(text ?? "").replace(/\s+$/, "").split(/\r?\n/);
  const headline = all[0] ?? "";
  /** @type {{head: string, items: string[]}[]} */
  const groups = [];
  for (const line of all.slice(1)) {
    if (/^\s/.test(line) && groups.length) groups[groups.length - 1].items.push(line.trim());
    else if (/^\s/.test(line)) groups.push({ head: "", items: [line.trim()] });
    else groups.push({ head: line, items: [] });
  }
  const lines = [];
  const blocks = [];
  // a headline's own indented details (text whose first line has children) go in a block titled "details"
  for (const g of groups) {
    if (!g.items.length) {
      if (blocks.length) blocks.push({ title: g.head, lines: [], open: true, kind: "line" });
      else lines.push(g.head);
      continue;
    }
    const b = block(g.head || "details", g.items, "text", true, collapseAfter);
    blocks.push(b);
  }
  return { headline, lines, warnings: [], blocks };
}

/** A report's blocks as plain text (what the node shows, for copying and for the tests). */
export function blocksText(r) {
  const out = [r.headline, ...r.lines, ...r.warnings];
  for (const b of r.blocks) {
    out.push(b.kind === "line" ? b.title : b.title + ":");
    out.push(...b.lines.map((l) => "  " + l));
  }
  return out.join("\n");
}
