// Unit tests for web/lib/payloads.js.
import test from "node:test";
import assert from "node:assert/strict";

import { LOSS_EVENT, parseLossEvent, parseLossOutput, parseReportOutput, TRAINER_NODES, LOADER_NODES } from "../../web/lib/payloads.js";

test("node ids and event name are the contract names", () => {
  assert.equal(LOSS_EVENT, "hadakron.loss");
  assert.deepEqual([...TRAINER_NODES], ["HadakronTrainLoKr", "HadakronTrainLoHa", "HadakronLoKrTrainer", "HadakronLoHaTrainer"]);
  assert.deepEqual([...LOADER_NODES], ["HadakronLoader", "HadakronLoaderModelOnly"]);
});

test("parseLossEvent reads a well-formed event and stringifies the node id", () => {
  assert.deepEqual(parseLossEvent({ node: "12", step: 3, total: 100, loss: 0.25, lr: 1e-4 }), {
    node: "12",
    step: 3,
    total: 100,
    loss: 0.25,
    lr: 1e-4,
  });
  assert.equal(parseLossEvent({ node: 7, step: 1, total: 2, loss: 1, lr: 0 }).node, "7");
  assert.equal(parseLossEvent({ node: "5:3", step: 1, total: 2, loss: 1, lr: 0 }).node, "5:3");
});

test("parseLossEvent maps NaN/inf spellings and rejects malformed events", () => {
  assert.ok(Number.isNaN(parseLossEvent({ node: "1", step: 2, total: 5, loss: null, lr: 1 }).loss));
  assert.ok(Number.isNaN(parseLossEvent({ node: "1", step: 2, total: 5, loss: "NaN", lr: 1 }).loss));
  assert.equal(parseLossEvent({ node: "1", step: 2, total: 5, loss: "Infinity", lr: 1 }).loss, Infinity);
  assert.equal(parseLossEvent({ node: "1", step: 2, total: 5, loss: "-inf", lr: 1 }).loss, -Infinity);
  assert.ok(Number.isNaN(parseLossEvent({ node: "1", step: 2, total: 5, loss: 0.5 }).lr));
  assert.equal(parseLossEvent({ node: "1", step: 2, loss: 0.5 }).total, 0);
  for (const bad of [
    null,
    "x",
    { step: 1, loss: 1 },
    { node: "1", step: 1.5, loss: 1 },
    { node: "1", step: -1, loss: 1 },
    { node: "1", step: 1, loss: "abc" },
    { node: "1", step: 1, loss: {} },
    { node: "1", step: 1 },
  ]) {
    assert.equal(parseLossEvent(bad), null, JSON.stringify(bad));
  }
});

test("parseLossOutput reads the JSON string in the ui list, including Python's NaN/Infinity", () => {
  assert.deepEqual(parseLossOutput({ hadakron_loss: ['{"loss": [0.5, 0.25, 0.125]}'] }), { losses: [0.5, 0.25, 0.125], firstStep: null });
  const withNaN = parseLossOutput({ hadakron_loss: ['{"loss": [1.0, NaN, -Infinity, 2.0], "first_step": 51}'] });
  assert.equal(withNaN.firstStep, 51);
  assert.equal(withNaN.losses[0], 1);
  assert.ok(Number.isNaN(withNaN.losses[1]) && Number.isNaN(withNaN.losses[2]));
  assert.equal(withNaN.losses[3], 2);
  // an already-decoded object (e.g. restored by another path) is accepted too
  assert.deepEqual(parseLossOutput({ hadakron_loss: [{ loss: [3] }] }), { losses: [3], firstStep: null });
});

test("parseLossOutput returns null for anything else", () => {
  for (const bad of [null, {}, { hadakron_loss: [] }, { hadakron_loss: ["not json"] }, { hadakron_loss: ['{"x": 1}'] }, { hadakron_loss: ['{"loss": ["a"]}'] }]) {
    assert.equal(parseLossOutput(bad), null, JSON.stringify(bad));
  }
});

test("parseReportOutput reads the report JSON and the text; NaN inside strings survives", () => {
  const out = parseReportOutput({
    hadakron_report: ['{"family": "sdxl", "unmatched": [{"key": "k", "reason": "NaN in tensor"}], "training": {"x": NaN}}'],
    text: ["line 1", "line 2"],
  });
  assert.equal(out.report.family, "sdxl");
  assert.equal(out.report.unmatched[0].reason, "NaN in tensor");
  assert.equal(out.report.training.x, null);
  assert.equal(out.text, "line 1\nline 2");
  assert.deepEqual(parseReportOutput({ text: ["only text"] }), { report: null, text: "only text" });
  assert.deepEqual(parseReportOutput({ hadakron_report: ['{"family": "anima"}'] }), { report: { family: "anima" }, text: null });
  assert.equal(parseReportOutput({ images: [] }), null);
  assert.equal(parseReportOutput({ hadakron_report: ["[1, 2]"] }), null);
  assert.equal(parseReportOutput(undefined), null);
});
