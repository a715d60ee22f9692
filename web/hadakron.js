// hadakron frontend extension: a live loss chart on the LoKr/LoHa trainer nodes and the load report on the
// loader nodes. Plain ES module loaded by the ComfyUI frontend from /extensions/<pack>/hadakron.js.
// The logic lives in ./lib (pure, unit-tested with node); this file only wires it to the page.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LossHistory, firstStepOfFinal } from "./lib/loss_history.js";
import { buildSeries, seriesFromJSON, seriesToJSON } from "./lib/loss_series.js";
import { drawLossChart, statusText } from "./lib/chart_draw.js";
import {
  LOADER_NODES,
  LOSS_EVENT,
  TEXT_NODES,
  TRAINER_NODES,
  parseLossEvent,
  parseLossOutput,
  parseReportOutput,
} from "./lib/payloads.js";
import { blocksText, breakPieces, reportBlocks, textBlocks } from "./lib/report_format.js";
import { cellAt, cellText, drawHeatmap, heatmapLayout, parseHeatmap } from "./lib/heatmap.js";
import { RUN_EVENTS, STATE_LABELS, initialRunState, nextRunState, runStateFromJSON } from "./lib/run_state.js";

const EXTENSION_NAME = "hadakron.ui";
const CHART_WIDGET = "hadakron_loss_chart";
const REPORT_WIDGET = "hadakron_report_view";
/** node.properties key holding the last curve, so a saved workflow shows it again. */
const SERIES_PROPERTY = "hadakron_loss_curve";
const SMOOTHING_PROPERTY = "hadakron_loss_smoothing";
/** node.properties key holding the last run's end state ({state, reason}), shown again after a reload. */
const RUN_STATE_PROPERTY = "hadakron_loss_state";
/** "auto" (window of about a twentieth of the run) or a weight in [0, 1); editable in the node's properties. */
const DEFAULT_SMOOTHING = "auto";
const PERSIST_POINTS = 400;

const STYLE = `
.hadakron-loss { display: flex; flex-direction: column; width: 100%; height: 100%; box-sizing: border-box;
  gap: 2px; overflow: hidden; }
.hadakron-loss canvas { flex: 1 1 auto; min-height: 0; width: 100%; border-radius: 4px; display: block; }
.hadakron-loss .hadakron-status { flex: 0 0 auto; font: 11px monospace; color: #c8c8c8; white-space: normal;
  word-break: normal; overflow-wrap: normal; }
.hadakron-loss .hadakron-message { flex: 0 0 auto; font: 11px monospace; color: #ffb86b; white-space: normal;
  word-break: normal; overflow-wrap: normal; max-height: 3.9em; overflow: auto; scrollbar-width: thin; }
.hadakron-loss .hadakron-message:empty { display: none; }
.hadakron-loss .hadakron-legend { flex: 0 0 auto; font: 10px sans-serif; color: #9a9a9a; }
.hadakron-loss .hadakron-legend b { font-weight: normal; }
.hadakron-report { position: relative; width: 100%; height: 100%; box-sizing: border-box; overflow: auto;
  font: 11px monospace; color: #d0d0d0; background: rgba(0, 0, 0, 0.25); border-radius: 4px; padding: 4px 6px;
  white-space: pre-wrap; word-break: normal; overflow-wrap: normal; line-break: auto;
  scrollbar-width: thin; scrollbar-color: #8a8a8a rgba(255, 255, 255, 0.06); }
.hadakron-report .hadakron-headline { font-weight: bold; margin-bottom: 3px; color: #f0f0f0; }
.hadakron-report .hadakron-line { padding-left: 1.5em; text-indent: -1.5em; }
.hadakron-report .hadakron-warn { color: #ffb86b; }
.hadakron-report details { margin-top: 3px; }
.hadakron-report summary { cursor: pointer; color: #9ecbff; }
.hadakron-report details .hadakron-list { max-height: 168px; overflow: auto; padding-left: 0.8em;
  scrollbar-width: thin; scrollbar-color: #8a8a8a rgba(255, 255, 255, 0.06); }
.hadakron-report .hadakron-heat { margin: 3px 0; }
.hadakron-report .hadakron-caption { color: #9a9a9a; font-size: 10px; }
.hadakron-report canvas.hadakron-heatmap { display: block; width: 100%; height: 60px; border-radius: 3px; }
.hadakron-report .hadakron-more { display: none; position: sticky; bottom: -4px; text-align: center;
  font-size: 10px; color: #9ecbff; background: linear-gradient(transparent, rgba(20, 20, 20, 0.95) 45%); }
.hadakron-report.hadakron-overflow .hadakron-more { display: block; }
.hadakron-loss .hadakron-row { flex: 0 0 auto; display: flex; gap: 6px; align-items: baseline; min-width: 0; }
.hadakron-loss .hadakron-row .hadakron-status { flex: 1 1 auto; min-width: 0; }
.hadakron-loss .hadakron-state { flex: 0 0 auto; font: bold 10px sans-serif; padding: 0 5px; border-radius: 3px;
  color: #111; background: #8a8a8a; text-transform: uppercase; }
.hadakron-loss[data-state="running"] .hadakron-state { background: #6ea0ff; }
.hadakron-loss[data-state="finished"] .hadakron-state { background: #5fcf80; }
.hadakron-loss[data-state="interrupted"] .hadakron-state { background: #ffb86b; }
.hadakron-loss[data-state="failed"] .hadakron-state { background: #ff6b6b; }
.hadakron-loss .hadakron-message.hadakron-error { color: #ff8a8a; }
`;

function injectStyle() {
  if (document.getElementById("hadakron-style")) return;
  const el = document.createElement("style");
  el.id = "hadakron-style";
  el.textContent = STYLE;
  document.head.appendChild(el);
}

function warn(...args) {
  console.warn("[hadakron]", ...args);
}

/** The node for a server node id, also inside subgraphs ("5:3" = node 3 of the subgraph in node 5). */
function findNode(id) {
  const root = app.rootGraph ?? app.graph;
  if (!root) return null;
  const direct = root.getNodeById?.(id) ?? root.getNodeById?.(Number(id));
  if (direct) return direct;
  const path = String(id).split(":");
  let graph = root;
  let node = null;
  for (const part of path) {
    node = graph?.getNodeById?.(part) ?? graph?.getNodeById?.(Number(part));
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

function markCanvasDirty() {
  app.graph?.setDirtyCanvas?.(true, false);
}

/** Grows the node so its widgets fit, never shrinks what the user made bigger. */
function fitNode(node, minWidth) {
  const size = node.computeSize?.();
  if (!size) return;
  node.setSize?.([Math.max(node.size[0], minWidth, size[0]), Math.max(node.size[1], size[1])]);
}

// ------------------------------------------------------------------ trainer: loss chart

/** Chart states of the trainer nodes that exist now (also those inside subgraphs). */
const CHARTS = new Set();

/** Per-node chart state, kept on the node object. */
function chartState(node) {
  return node.__hadakronChart ?? null;
}

/** The node's smoothing weight, or null for automatic. */
function smoothingOf(node) {
  const p = node.properties?.[SMOOTHING_PROPERTY];
  const v = typeof p === "string" && p.trim() !== "" ? Number(p) : p;
  return typeof v === "number" && v >= 0 && v < 1 ? v : null;
}

function setupTrainer(node) {
  if (chartState(node)) return;
  injectStyle();
  const root = document.createElement("div");
  root.className = "hadakron-loss";
  const canvas = document.createElement("canvas");
  const legend = document.createElement("div");
  legend.className = "hadakron-legend";
  legend.innerHTML = '<b style="color:#6ea0ff">\u2014 loss</b> &nbsp; <b style="color:#ffa53c">\u2014 smoothed</b>';
  const row = document.createElement("div");
  row.className = "hadakron-row";
  const badge = document.createElement("span");
  badge.className = "hadakron-state";
  badge.textContent = STATE_LABELS.idle;
  const status = document.createElement("span");
  status.className = "hadakron-status";
  status.textContent = "waiting for training";
  row.append(badge, status);
  const message = document.createElement("div");
  message.className = "hadakron-message";
  root.append(canvas, legend, row, message);
  root.dataset.state = "idle";

  const widget = node.addDOMWidget(CHART_WIDGET, "hadakron-loss-chart", root, {
    serialize: false,
    getMinHeight: () => 190,
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false;

  const state = {
    node,
    widget,
    root,
    canvas,
    status,
    badge,
    message,
    run: initialRunState(),
    history: new LossHistory(),
    /** Series shown when there is no live history (restored from properties). */
    restored: null,
    live: false,
    lastOutputKey: null,
    frame: 0,
    observer: null,
  };
  node.__hadakronChart = state;
  CHARTS.add(state);
  if (node.properties && !(SMOOTHING_PROPERTY in node.properties)) node.properties[SMOOTHING_PROPERTY] = DEFAULT_SMOOTHING;

  if (typeof ResizeObserver !== "undefined") {
    state.observer = new ResizeObserver(() => scheduleDraw(state));
    state.observer.observe(root);
  }
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    state.observer?.disconnect();
    CHARTS.delete(state);
    if (state.frame) cancelAnimationFrame(state.frame);
    return onRemoved?.apply(this, arguments);
  };
  fitNode(node, 340);
  scheduleDraw(state);
}

function currentSeries(state) {
  if (state.history.length) return buildSeries(state.history, { smoothing: smoothingOf(state.node) });
  return state.restored;
}

/** Draws now; returns whether curves were drawn. */
function drawChart(state) {
  const series = currentSeries(state);
  const run = state.run.state;
  state.status.textContent = !series?.count && run !== "idle" && run !== "running" ? "no step completed"
    : statusText(series, state.history.length ? state.history.lastLr : NaN);
  state.badge.textContent = STATE_LABELS[run] ?? run;
  state.root.dataset.state = run;
  const cssW = state.canvas.clientWidth;
  const cssH = state.canvas.clientHeight;
  if (cssW < 2 || cssH < 2) return false;
  // Backing store at screen resolution: device pixels times the graph zoom when the frontend scales the
  // widget with a CSS transform (the layout size then stays in graph units).
  const onScreen = state.canvas.getBoundingClientRect().width;
  const zoom = onScreen > 0 ? onScreen / cssW : 1;
  const k = Math.min(4, Math.max(0.5, (window.devicePixelRatio || 1) * zoom));
  const w = Math.round(cssW * k);
  const h = Math.round(cssH * k);
  if (state.canvas.width !== w) state.canvas.width = w;
  if (state.canvas.height !== h) state.canvas.height = h;
  const ctx = state.canvas.getContext("2d");
  if (!ctx) return false;
  ctx.setTransform(k, 0, 0, k, 0, 0);
  // a stopped run (interrupted, failed) is drawn over the steps it made, not over the steps it planned
  const stopped = series && (run === "interrupted" || run === "failed") && !series.finished;
  const drawn = drawLossChart(ctx, cssW, cssH, stopped ? { ...series, total: 0 } : series);
  state.root.dataset.points = String(series ? series.count : 0);
  return drawn;
}

function scheduleDraw(state) {
  if (state.frame) return;
  state.frame = requestAnimationFrame(() => {
    state.frame = 0;
    try {
      drawChart(state);
    } catch (e) {
      warn("drawing the loss chart failed", e);
    }
  });
}

/** The curve as stored in the workflow (downsampled, rounded), or null without points. */
function storedSeries(state) {
  if (!state.history.length) return null;
  const series = buildSeries(state.history, { smoothing: smoothingOf(state.node), maxPoints: PERSIST_POINTS });
  return seriesToJSON(series, { digits: 5 });
}

/** Stores the curve in node.properties so a saved workflow keeps it. */
function persistSeries(state) {
  const stored = storedSeries(state);
  if (!stored) return;
  state.node.properties = state.node.properties ?? {};
  state.node.properties[SERIES_PROPERTY] = stored;
}

/** node.onSerialize: every save / tab switch / undo snapshot gets the curve as it is now, also mid-run. */
function serializeTrainer(node, data) {
  const state = chartState(node);
  if (!state?.live) return;
  const stored = storedSeries(state);
  if (stored && data) {
    data.properties = data.properties ?? {};
    data.properties[SERIES_PROPERTY] = stored;
  }
}

function onLossEvent(event) {
  const ev = parseLossEvent(event?.detail);
  if (!ev) {
    warn("ignoring malformed", LOSS_EVENT, "event", event?.detail);
    return;
  }
  const node = findNode(ev.node);
  const state = node && chartState(node);
  if (!state) return;
  const saved = state.restored;
  if (!state.history.length && saved && !saved.finished && saved.raw.xs.length && ev.step > saved.lastStep) {
    // the node was re-created mid-run (workflow tab switched or reloaded): continue the stored curve
    state.history.resume(saved.raw.xs, saved.raw.ys, saved.total);
  }
  if (state.history.addEvent(ev) || state.history.length === 1) state.message.textContent = "";
  state.live = true;
  if (state.run.state !== "running") showRunState(state, { state: "running", reason: "", promptId: state.run.promptId });
  state.lastOutputKey = null; // the run's final output must be applied even if it equals the previous one
  scheduleDraw(state);
}

/** Applies a trainer's ui output (final loss curve). fromExecuted: the executor just ran this node. */
function applyTrainerOutput(node, output, fromExecuted) {
  const state = chartState(node);
  if (!state) return;
  const raw = output?.hadakron_loss;
  if (raw === undefined) return;
  const key = JSON.stringify(raw);
  if (key === state.lastOutputKey) return;
  if (!fromExecuted && state.live) return; // a stale stored output must not wipe a run in progress
  const parsed = parseLossOutput(output);
  if (!parsed) {
    warn("ignoring malformed hadakron_loss output of node", node.id);
    return;
  }
  state.lastOutputKey = key;
  if (fromExecuted || state.run.state === "idle") showRunState(state, { state: "finished", reason: "", promptId: state.run.promptId });
  const text = parseReportOutput({ text: output.text })?.text ?? "";
  state.message.replaceChildren(...wrappable(text));
  state.message.title = text;
  state.history.setFinal(parsed.losses, firstStepOfFinal(state.history, parsed.losses.length, parsed.firstStep));
  state.live = false;
  persistSeries(state);
  scheduleDraw(state);
}

function restoreTrainer(node) {
  const state = chartState(node);
  if (!state) return;
  const run = runStateFromJSON(node.properties?.[RUN_STATE_PROPERTY]);
  if (run) showRunState(state, run);
  const series = seriesFromJSON(node.properties?.[SERIES_PROPERTY]);
  if (series && !run && series.finished) showRunState(state, { state: "finished", reason: "", promptId: null });
  if (series) {
    state.restored = series;
    scheduleDraw(state);
  }
}

/** Shows a run state on the chart: the badge, and for a failure the one-line reason under the curve. */
function showRunState(state, run) {
  const was = state.run;
  state.run = run;
  if (run.state === "failed") {
    state.message.replaceChildren(...wrappable(`failed: ${run.reason}`));
    state.message.title = run.reason;
    state.message.classList.add("hadakron-error");
  } else if (was.state === "failed" || run.state === "running") {
    state.message.textContent = "";
    state.message.title = "";
    state.message.classList.remove("hadakron-error");
  }
  if (["finished", "interrupted", "failed"].includes(run.state) && state.node.properties) {
    state.node.properties[RUN_STATE_PROPERTY] = { state: run.state, reason: run.reason };
  }
  scheduleDraw(state);
}

/** One ComfyUI execution event, matched to every trainer chart by its node id. */
function onRunEvent(type, event) {
  for (const state of CHARTS) {
    const id = state.node.id;
    const next = nextRunState(state.run, type, event?.detail, id);
    if (next !== state.run) showRunState(state, next);
  }
}

function endOfRun() {
  // The run stopped (success, error or interrupt): keep what arrived and store it with the workflow.
  for (const state of CHARTS) {
    if (state.live) {
      state.live = false;
      persistSeries(state);
    }
  }
}

// ------------------------------------------------------------------ loader, merge, combine: readable reports

/** Tallest the report grows the node to; longer content scrolls inside it (visible scrollbar, "more" hint). */
const REPORT_MAX_HEIGHT = { loader: 420, text: 260 };

function setupReport(node, placeholder, kind) {
  if (node.__hadakronReport) return;
  injectStyle();
  const root = document.createElement("div");
  root.className = "hadakron-report";
  root.textContent = placeholder;
  const state = { node, widget: null, root, lastOutputKey: null, height: 60, kind, heat: null, observer: null };
  const widget = node.addDOMWidget(REPORT_WIDGET, "hadakron-report", root, {
    serialize: false,
    getMinHeight: () => state.height,
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false;
  state.widget = widget;
  node.__hadakronReport = state;
  root.addEventListener("scroll", () => markOverflow(root), { passive: true });
  // a section opened or closed: size the node to the new content
  root.addEventListener("toggle", () => resizeReport(state), true);
  if (typeof ResizeObserver !== "undefined") {
    state.observer = new ResizeObserver(() => {
      drawHeat(state);
      markOverflow(root);
      // shown for the first time (or made narrower, so lines wrap): let the node grow to the content again
      const max = REPORT_MAX_HEIGHT[state.kind] ?? 260;
      if (root.scrollHeight > root.clientHeight + 1 && state.height < max && root.clientHeight > 0) {
        const want = Math.min(max, root.scrollHeight + (state.height - root.clientHeight) + 2);
        if (want > state.height + 1) {
          state.height = want;
          fitNode(state.node, 360);
          markCanvasDirty();
        }
      }
    });
    state.observer.observe(root);
  }
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    state.observer?.disconnect();
    return onRemoved?.apply(this, arguments);
  };
  fitNode(node, 320);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.append(...wrappable(text));
  return e;
}

/** Text as nodes with a <wbr> at each break point (breakPieces): long keys wrap at punctuation, never mid-word. */
function wrappable(text) {
  const out = [];
  breakPieces(String(text)).forEach((piece, i) => {
    if (i) out.push(document.createElement("wbr"));
    out.push(document.createTextNode(piece));
  });
  return out;
}

function lineList(lines, cls) {
  const list = el("div", cls ? `hadakron-list ${cls}` : "hadakron-list");
  for (const line of lines) list.append(el("div", "hadakron-line", line));
  return list;
}

/** The "where it acts" heatmap: a canvas drawn from the report's delta_norms, with a caption and tooltips. */
function heatSection(state, heat) {
  const wrap = el("div", "hadakron-heat");
  const caption = el("div", "hadakron-caption",
    heat.exact ? "where it acts: \u2016s\u00b7strength\u00b7\u0394W\u2016 (Frobenius) per block, exact"
      : "where it acts: \u2016s\u00b7strength\u00b7\u0394W\u2016 (Frobenius) per block; \u25e5 cells are upper bounds, the rest exact");
  const canvas = document.createElement("canvas");
  canvas.className = "hadakron-heatmap";
  wrap.append(caption, canvas);
  state.heat = { data: heat, canvas, layout: null };
  canvas.addEventListener("mousemove", (e) => {
    const layout = state.heat?.layout;
    if (!layout) return;
    const r = canvas.getBoundingClientRect();
    const k = r.width > 0 ? layout.width / r.width : 1;
    const c = cellAt(layout, (e.clientX - r.left) * k, (e.clientY - r.top) * k);
    canvas.title = c ? cellText(heat.cells[c.index]) : "";
  });
  return wrap;
}

function drawHeat(state) {
  const h = state.heat;
  if (!h || !h.canvas.isConnected) return;
  const cssW = h.canvas.clientWidth || h.canvas.parentElement?.clientWidth || 0;
  if (cssW < 40) return;
  const layout = heatmapLayout(h.data, cssW);
  h.canvas.style.height = `${layout.height}px`;
  const onScreen = h.canvas.getBoundingClientRect().width;
  const zoom = onScreen > 0 ? onScreen / cssW : 1;
  const k = Math.min(4, Math.max(1, (window.devicePixelRatio || 1) * zoom));
  h.canvas.width = Math.round(cssW * k);
  h.canvas.height = Math.round(layout.height * k);
  const ctx = h.canvas.getContext("2d");
  if (!ctx) return;
  ctx.setTransform(k, 0, 0, k, 0, 0);
  drawHeatmap(ctx, h.data, layout);
  h.layout = layout;
  h.canvas.dataset.cells = String(layout.cells.length);
  h.canvas.dataset.scale = String(k);
  h.canvas.dataset.rects = JSON.stringify(layout.cells.map((c) => [c.x, c.y, c.w, c.h, h.data.cells[c.index].block]));
}

/** Renders a report (headline, summary lines, heatmap, warnings, titled blocks) into root. */
function renderBlocks(state, r, heat) {
  const root = state.root;
  root.replaceChildren();
  state.heat = null;
  root.append(el("div", "hadakron-headline", r.headline));
  if (r.lines.length) root.append(lineList(r.lines, "hadakron-summary"));
  if (heat) root.append(heatSection(state, heat));
  if (r.warnings.length) root.append(lineList(r.warnings, "hadakron-warn"));
  for (const b of r.blocks) {
    if (b.kind === "line") {
      root.append(el("div", "hadakron-line", b.title));
      continue;
    }
    const d = document.createElement("details");
    d.open = b.open;
    d.dataset.kind = b.kind;
    d.append(el("summary", "", b.title), lineList(b.lines));
    root.append(d);
  }
  root.append(el("div", "hadakron-more", "\u25be more below (scroll)"));
  root.dataset.text = blocksText(r);
}

/** Marks whether content is hidden below (the hint at the bottom shows then). */
function markOverflow(root) {
  const more = root.scrollHeight - root.clientHeight - root.scrollTop > 2;
  root.classList.toggle("hadakron-overflow", more);
}

/** The height the report's content needs at the node's width (measured off-screen, as laid out now). */
function naturalHeight(state) {
  const root = state.root;
  const width = Math.max(root.clientWidth, (state.node.size?.[0] ?? 360) - 20, 200);
  const probe = root.cloneNode(true);
  probe.style.cssText = `position: fixed; left: -10000px; top: 0; width: ${width}px; height: auto; max-height: none;`;
  probe.classList.remove("hadakron-overflow");
  const heatHeight = state.heat ? heatmapLayout(state.heat.data, width - 12).height : 60;
  for (const c of probe.querySelectorAll("canvas")) c.style.height = `${heatHeight}px`;
  document.body.append(probe);
  const h = probe.scrollHeight;
  probe.remove();
  return h;
}

function resizeReport(state) {
  const max = REPORT_MAX_HEIGHT[state.kind] ?? 260;
  drawHeat(state);
  state.height = Math.min(max, Math.max(60, naturalHeight(state) + 2));
  fitNode(state.node, 360);
  markCanvasDirty();
  requestAnimationFrame(() => {
    drawHeat(state);
    markOverflow(state.root);
  });
}

function applyReportOutput(node, output) {
  const state = node.__hadakronReport;
  if (!state || !output) return;
  if (output.hadakron_report === undefined && output.text === undefined) return;
  const key = JSON.stringify([output.hadakron_report, output.text]);
  if (key === state.lastOutputKey) return;
  const parsed = parseReportOutput(output);
  if (!parsed) {
    warn("ignoring malformed report output of node", node.id);
    return;
  }
  state.lastOutputKey = key;
  const blocks = parsed.report ? reportBlocks(parsed.report) : textBlocks(parsed.text ?? "");
  renderBlocks(state, blocks, parsed.report ? parseHeatmap(parsed.report.delta_norms) : null);
  resizeReport(state);
}

// ------------------------------------------------------------------ registration

function chain(proto, name, after) {
  const orig = proto[name];
  proto[name] = function () {
    const r = orig?.apply(this, arguments);
    try {
      after.apply(this, arguments);
    } catch (e) {
      warn(`${name} failed`, e);
    }
    return r;
  };
}

app.registerExtension({
  name: EXTENSION_NAME,

  async setup() {
    api.addEventListener(LOSS_EVENT, onLossEvent);
    for (const type of RUN_EVENTS) api.addEventListener(type, (e) => onRunEvent(type, e));
    for (const type of ["execution_success", "execution_error", "execution_interrupted"]) api.addEventListener(type, endOfRun);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (TRAINER_NODES.includes(nodeData?.name)) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupTrainer(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        restoreTrainer(this);
      });
      chain(nodeType.prototype, "onSerialize", function (data) {
        serializeTrainer(this, data);
      });
      chain(nodeType.prototype, "onPropertyChanged", function (name) {
        const state = chartState(this);
        if (state && name === SMOOTHING_PROPERTY) scheduleDraw(state);
      });
      chain(nodeType.prototype, "onExecuted", function (output) {
        applyTrainerOutput(this, output, true);
      });
    } else if (LOADER_NODES.includes(nodeData?.name) || TEXT_NODES.includes(nodeData?.name)) {
      const loader = LOADER_NODES.includes(nodeData.name);
      const placeholder = loader ? "the load report appears here after a run" : "the result appears here after a run";
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupReport(this, placeholder, loader ? "loader" : "text");
      });
      chain(nodeType.prototype, "onExecuted", function (output) {
        applyReportOutput(this, output);
      });
    }
  },

  /** Outputs restored from the queue/history panel arrive here, keyed by node id. */
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      if (!output || typeof output !== "object") continue;
      if (output.hadakron_loss === undefined && output.hadakron_report === undefined && output.text === undefined) continue;
      const node = findNode(id);
      if (!node) continue;
      if (chartState(node)) applyTrainerOutput(node, output, false);
      else if (node.__hadakronReport) applyReportOutput(node, output);
    }
  },
});
