// Parsing what the Python nodes send: the "hadakron.loss" WS event and the ui dicts of trainers and loaders.
// Every parser returns null on input it does not understand instead of throwing, so a malformed message can
// never break the page; the extension logs a warning in that case.

export const LOSS_EVENT = "hadakron.loss";
export const TRAINER_NODES = Object.freeze(["HadakronTrainLoKr", "HadakronTrainLoHa", "HadakronLoKrTrainer", "HadakronLoHaTrainer"]);
export const LOADER_NODES = Object.freeze(["HadakronLoader", "HadakronLoaderModelOnly"]);
/** Nodes whose ui "text" (what was saved / merged / combined) is shown on the node. */
export const TEXT_NODES = Object.freeze(["HadakronSaveAdapter", "HadakronAdapterMerge", "HadakronAdapterCombine"]);

/**
 * A "hadakron.loss" event detail {node, step, total, loss, lr} with types checked. loss may be NaN/Infinity
 * (JSON cannot carry them, so null or a string "NaN"/"Infinity" are accepted and mapped).
 * @param {unknown} detail
 * @returns {{node: string, step: number, total: number, loss: number, lr: number} | null}
 */
export function parseLossEvent(detail) {
  if (!detail || typeof detail !== "object") return null;
  const d = /** @type {any} */ (detail);
  if (d.node === undefined || d.node === null) return null;
  const node = String(d.node);
  const step = Number(d.step);
  if (!Number.isInteger(step) || step < 0) return null;
  const total = Number.isFinite(Number(d.total)) ? Number(d.total) : 0;
  const loss = toNumber(d.loss);
  const lr = toNumber(d.lr);
  if (loss === undefined) return null;
  return { node, step, total, loss, lr: lr === undefined ? NaN : lr };
}

/** Number, or NaN for null/"nan"-like strings, or undefined for anything else. */
function toNumber(v) {
  if (typeof v === "number") return v;
  if (v === null) return NaN;
  if (typeof v === "string") {
    const t = v.trim().toLowerCase();
    if (t === "nan") return NaN;
    if (t === "inf" || t === "infinity" || t === "+inf") return Infinity;
    if (t === "-inf" || t === "-infinity") return -Infinity;
    const n = Number(t);
    return t !== "" && Number.isFinite(n) ? n : undefined;
  }
  return undefined;
}

/** First element of a ui list entry (ComfyUI wraps every ui value in a list), parsed when it is JSON text. */
function firstJSON(value) {
  const v = Array.isArray(value) ? value[0] : value;
  if (v === undefined || v === null) return undefined;
  if (typeof v === "string") {
    try {
      return JSON.parse(v);
    } catch {
      // Python's json.dumps writes bare NaN / Infinity, which JSON.parse rejects: map them (outside strings) to null.
      try {
        return JSON.parse(v.replace(/"(?:[^"\\]|\\.)*"|-?\b(?:Infinity|NaN)\b/g, (m) => (m[0] === '"' ? m : "null")));
      } catch {
        return undefined;
      }
    }
  }
  return v;
}

/**
 * The final loss curve from a trainer's ui output {"hadakron_loss": ['{"loss": [...]}']}.
 * Returns the losses (null entries become NaN) and the step of the first one (key "first_step"; null when the
 * output does not say, see firstStepOfFinal).
 * @param {unknown} output the ui dict passed to onExecuted
 * @returns {{losses: number[], firstStep: number | null} | null}
 */
export function parseLossOutput(output) {
  if (!output || typeof output !== "object") return null;
  const obj = firstJSON(/** @type {any} */ (output).hadakron_loss);
  if (!obj || typeof obj !== "object" || !Array.isArray(obj.loss)) return null;
  const losses = [];
  for (const v of obj.loss) {
    const n = toNumber(v);
    if (n === undefined) return null;
    losses.push(n);
  }
  const firstStep = Number.isInteger(obj.first_step) && obj.first_step >= 0 ? obj.first_step : null;
  return { losses, firstStep };
}

/**
 * The loader's report from its ui output {"hadakron_report": ['<json>'], "text": ['<text>']}.
 * @param {unknown} output
 * @returns {{report: object | null, text: string | null} | null} null when neither is present
 */
export function parseReportOutput(output) {
  if (!output || typeof output !== "object") return null;
  const o = /** @type {any} */ (output);
  const rep = firstJSON(o.hadakron_report);
  const report = rep && typeof rep === "object" && !Array.isArray(rep) ? rep : null;
  let text = null;
  if (Array.isArray(o.text)) text = o.text.filter((t) => typeof t === "string").join("\n") || null;
  else if (typeof o.text === "string") text = o.text;
  if (report === null && text === null) return null;
  return { report, text };
}
