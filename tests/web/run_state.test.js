// Unit tests for web/lib/run_state.js: the chart's run state from ComfyUI's execution events.
import test from "node:test";
import assert from "node:assert/strict";

import { initialRunState, nextRunState, oneLine, runStateFromJSON } from "../../web/lib/run_state.js";

function run(events, nodeId = "8") {
  let s = initialRunState();
  const seen = [];
  for (const [type, detail] of events) {
    s = nextRunState(s, type, detail, nodeId);
    seen.push(s.state);
  }
  return { s, seen };
}

test("a successful run: running while the trainer executes, finished when the executor moves on", () => {
  const { seen } = run([
    ["execution_start", { prompt_id: "p1" }],
    ["executing", "3"],
    ["executing", "8"],
    ["executing", "9"],
    ["executing", null],
    ["execution_success", { prompt_id: "p1" }],
  ]);
  assert.deepEqual(seen, ["idle", "idle", "running", "finished", "finished", "finished"]);
});

test("a failure at the trainer gives failed with the first line of its message", () => {
  const { s } = run([
    ["execution_start", { prompt_id: "p1" }],
    ["executing", "8"],
    ["execution_error", { prompt_id: "p1", node_id: "8", exception_type: "ValueError",
      exception_message: "\nautosave_prefix '../x' leaves the output folder\nTraceback ..." }],
    ["executing", null],
  ]);
  assert.deepEqual(s, { state: "failed", reason: "autosave_prefix '../x' leaves the output folder", promptId: "p1" });
});

test("an error in another node before the trainer ran leaves the chart as it was", () => {
  const { s } = run([
    ["execution_start", { prompt_id: "p1" }],
    ["executing", "3"],
    ["execution_error", { prompt_id: "p1", node_id: "3", exception_message: "bad vae" }],
  ]);
  assert.equal(s.state, "idle");
});

test("an interrupt while the trainer runs gives interrupted; one after it finished does not", () => {
  assert.equal(run([["executing", "8"], ["execution_interrupted", { prompt_id: "p", node_id: "8" }]]).s.state, "interrupted");
  assert.equal(run([["executing", "8"], ["executing", "13"], ["execution_interrupted", { node_id: "13" }]]).s.state, "finished");
  assert.equal(run([["executing", "2"], ["execution_interrupted", { node_id: "2" }]]).s.state, "idle");
});

test("the frontend's executing detail may be an object with display_node", () => {
  assert.equal(run([["executing", { node: "x", display_node: "8", prompt_id: "p" }]]).s.state, "running");
  assert.equal(run([["executing", 8]], 8).s.state, "running");
});

test("a cached trainer keeps its state; a new run after a failure starts running again", () => {
  let s = nextRunState(initialRunState(), "execution_error", { node_id: "8", exception_message: "x" }, "8");
  assert.equal(s.state, "failed");
  assert.equal(nextRunState(s, "execution_cached", { nodes: ["8"] }, "8"), s);
  s = nextRunState(s, "executing", "8", "8");
  assert.deepEqual(s, { state: "running", reason: "", promptId: null });
});

test("oneLine and the stored form", () => {
  assert.equal(oneLine("  \n first \n second"), "first");
  assert.equal(oneLine("x".repeat(300), 10), "xxxxxxxxx\u2026");
  assert.equal(oneLine(undefined), "");
  assert.deepEqual(runStateFromJSON({ state: "failed", reason: "a\nb" }), { state: "failed", reason: "a", promptId: null });
  assert.equal(runStateFromJSON({ state: "running" }), null);
  assert.equal(runStateFromJSON("finished"), null);
});
