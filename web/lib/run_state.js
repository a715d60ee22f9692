// The run state one trainer node's chart shows (idle / running / finished / interrupted / failed), from ComfyUI's
// own websocket events matched to that node's id. Pure: the extension passes each event in and shows the result;
// the loss curve itself is kept elsewhere (loss_history.js) and is never cleared here, so the last good curve stays
// visible after a failure or an interrupt.

export const RUN_STATES = Object.freeze(["idle", "running", "finished", "interrupted", "failed"]);

/** ComfyUI websocket events the chart follows (the frontend dispatches them on its api object). */
export const RUN_EVENTS = Object.freeze([
  "execution_start",
  "executing",
  "execution_cached",
  "execution_error",
  "execution_interrupted",
  "execution_success",
]);

/** Words shown for each state (the badge on the chart). */
export const STATE_LABELS = Object.freeze({
  idle: "waiting",
  running: "running",
  finished: "finished",
  interrupted: "interrupted",
  failed: "failed",
});

/**
 * The first non-empty line of an exception message, shortened: the one-line reason a failed chart shows.
 * @param {unknown} message
 * @param {number} [max]
 */
export function oneLine(message, max = 240) {
  const line = String(message ?? "")
    .split(/\r?\n/)
    .map((l) => l.trim())
    .find((l) => l !== "");
  if (!line) return "";
  return line.length <= max ? line : line.slice(0, max - 1) + "\u2026";
}

/** @typedef {{state: string, reason: string, promptId: string | null}} RunState */

/** @returns {RunState} */
export function initialRunState() {
  return { state: "idle", reason: "", promptId: null };
}

const sameNode = (a, b) => a !== undefined && a !== null && String(a) === String(b);

/**
 * The state after one ComfyUI event for the trainer node `nodeId`; the same object when the event does not concern
 * it. `executing` carries the node id now running (null when the prompt is done); `execution_error` carries
 * node_id and exception_message; `execution_interrupted` node_id (the node running when it stopped).
 * @param {RunState} prev
 * @param {string} type one of RUN_EVENTS
 * @param {any} detail the event's detail as the frontend dispatches it
 * @param {string | number} nodeId the trainer node's id (the server's id, "5:3" inside subgraphs)
 * @returns {RunState}
 */
export function nextRunState(prev, type, detail, nodeId) {
  const promptId = detail && typeof detail === "object" && detail.prompt_id ? String(detail.prompt_id) : null;
  const running = prev.state === "running";
  const ours = !running || promptId === null || prev.promptId === null || promptId === prev.promptId;
  switch (type) {
    case "executing": {
      const id = detail && typeof detail === "object" ? (detail.display_node ?? detail.node) : detail;
      if (sameNode(id, nodeId)) return { state: "running", reason: "", promptId: promptId ?? prev.promptId };
      // the executor moved on to another node (or finished the prompt): the trainer returned
      if (running) return { state: "finished", reason: "", promptId: prev.promptId };
      return prev;
    }
    case "execution_start":
      return running ? prev : { ...prev, promptId };
    case "execution_error":
      if (sameNode(detail?.node_id, nodeId) || (running && ours)) {
        const kind = detail?.exception_type ? String(detail.exception_type).split(".").pop() : "";
        const msg = oneLine(detail?.exception_message);
        return { state: "failed", reason: msg || kind || "error", promptId: promptId ?? prev.promptId };
      }
      return prev;
    case "execution_interrupted":
      if (sameNode(detail?.node_id, nodeId) || (running && ours)) {
        return { state: "interrupted", reason: "", promptId: promptId ?? prev.promptId };
      }
      return prev;
    case "execution_success":
      return running && ours ? { state: "finished", reason: "", promptId: prev.promptId } : prev;
    default:
      return prev;
  }
}

/**
 * A stored state ({state, reason}) checked, for node.properties; running is not restored (a reloaded page cannot
 * know whether that run still goes on, and live events set it again).
 * @param {unknown} stored
 * @returns {RunState | null}
 */
export function runStateFromJSON(stored) {
  if (!stored || typeof stored !== "object") return null;
  const s = /** @type {any} */ (stored);
  if (!["finished", "interrupted", "failed"].includes(s.state)) return null;
  return { state: s.state, reason: typeof s.reason === "string" ? oneLine(s.reason) : "", promptId: null };
}
