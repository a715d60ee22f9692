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
import { formatReport, reportText } from "./lib/report_format.js";

const EXTENSION_NAME = "hadakron.ui";
const CHART_WIDGET = "hadakron_loss_chart";
const REPORT_WIDGET = "hadakron_report_view";
/** node.properties key holding the last curve, so a saved workflow shows it again. */
const SERIES_PROPERTY = "hadakron_loss_curve";
const SMOOTHING_PROPERTY = "hadakron_loss_smoothing";
/** "auto" (window of about a twentieth of the run) or a weight in [0, 1); editable in the node's properties. */
const DEFAULT_SMOOTHING = "auto";
const PERSIST_POINTS = 400;

const STYLE = `
.hadakron-loss { display: flex; flex-direction: column; width: 100%; height: 100%; box-sizing: border-box;
  gap: 2px; overflow: hidden; }
.hadakron-loss canvas { flex: 1 1 auto; min-height: 0; width: 100%; border-radius: 4px; display: block; }
.hadakron-loss .hadakron-status { flex: 0 0 auto; font: 11px monospace; color: #c8c8c8; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.hadakron-loss .hadakron-message { flex: 0 0 auto; font: 11px monospace; color: #ffb86b; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.hadakron-loss .hadakron-message:empty { display: none; }
.hadakron-loss .hadakron-legend { flex: 0 0 auto; font: 10px sans-serif; color: #9a9a9a; }
.hadakron-loss .hadakron-legend b { font-weight: normal; }
.hadakron-report { width: 100%; height: 100%; box-sizing: border-box; overflow: auto; font: 11px monospace;
  color: #d0d0d0; background: rgba(0, 0, 0, 0.25); border-radius: 4px; padding: 4px 6px; }
.hadakron-report .hadakron-headline { font-weight: bold; margin-bottom: 2px; }
.hadakron-report .hadakron-warn { color: #ffb86b; }
.hadakron-report details { margin-top: 2px; }
.hadakron-report summary { cursor: pointer; color: #9ecbff; }
.hadakron-report pre { margin: 0; white-space: pre-wrap; word-break: break-all; font: inherit; }
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
  const status = document.createElement("div");
  status.className = "hadakron-status";
  status.textContent = "waiting for training";
  const message = document.createElement("div");
  message.className = "hadakron-message";
  root.append(canvas, legend, status, message);

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
    message,
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
  state.status.textContent = statusText(series, state.history.length ? state.history.lastLr : NaN);
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
  const drawn = drawLossChart(ctx, cssW, cssH, series);
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
  const text = parseReportOutput({ text: output.text })?.text ?? "";
  state.message.textContent = text;
  state.message.title = text;
  state.history.setFinal(parsed.losses, firstStepOfFinal(state.history, parsed.losses.length, parsed.firstStep));
  state.live = false;
  persistSeries(state);
  scheduleDraw(state);
}

function restoreTrainer(node) {
  const state = chartState(node);
  if (!state) return;
  const series = seriesFromJSON(node.properties?.[SERIES_PROPERTY]);
  if (series) {
    state.restored = series;
    scheduleDraw(state);
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

// ------------------------------------------------------------------ loader: report

function setupReport(node, placeholder) {
  if (node.__hadakronReport) return;
  injectStyle();
  const root = document.createElement("div");
  root.className = "hadakron-report";
  root.textContent = placeholder;
  const state = { node, widget: null, root, lastOutputKey: null, height: 60 };
  const widget = node.addDOMWidget(REPORT_WIDGET, "hadakron-report", root, {
    serialize: false,
    getMinHeight: () => state.height,
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false;
  state.widget = widget;
  node.__hadakronReport = state;
  fitNode(node, 320);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function section(title, lines, open) {
  const d = el("details");
  d.open = open;
  d.append(el("summary", "", title), el("pre", "", lines.join("\n")));
  return d;
}

/** Renders the report into root; returns the number of text lines visible with the default open sections. */
function renderReport(root, parsed) {
  root.replaceChildren();
  if (!parsed.report) {
    root.append(el("pre", "", parsed.text ?? ""));
    root.dataset.text = parsed.text ?? "";
    return (parsed.text ?? "").split("\n").length;
  }
  const f = formatReport(parsed.report);
  root.append(el("div", "hadakron-headline", f.headline));
  if (f.summary.length) root.append(el("pre", "", f.summary.join("\n")));
  if (f.warnings.length) root.append(el("pre", "hadakron-warn", f.warnings.join("\n")));
  if (f.matched.length) root.append(section(`applied per part / block (${f.matchedTotal})`, f.matched, true));
  if (f.unmatched.length) {
    const title = `not applied (${f.unmatched.length}${f.unmatchedKinds ? ": " + f.unmatchedKinds : ""})`;
    root.append(section(title, f.unmatched, !f.unmatchedCollapsed));
  }
  if (f.metadata.length) root.append(section("training metadata", f.metadata, false));
  root.dataset.text = reportText(f);
  return (
    1 +
    f.summary.length +
    f.warnings.length +
    (f.matched.length ? 1 + f.matched.length : 0) +
    (f.unmatched.length ? 1 + (f.unmatchedCollapsed ? 0 : f.unmatched.length) : 0) +
    (f.metadata.length ? 1 : 0)
  );
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
  const lines = renderReport(state.root, parsed);
  // Grow the widget to show the report without scrolling, up to about 24 lines; longer reports scroll.
  state.height = Math.min(360, Math.max(60, 14 * lines + 14));
  fitNode(node, 360);
  markCanvasDirty();
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
      const placeholder = LOADER_NODES.includes(nodeData.name)
        ? "the load report appears here after a run"
        : "the result appears here after a run";
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupReport(this, placeholder);
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
