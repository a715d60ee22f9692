// Unit tests for web/lib/report_format.js.
import test from "node:test";
import assert from "node:assert/strict";

import {
  blockCompare, blocksText, breakPieces, formatReport, matchedByPart, naturalCompare, reportBlocks, reportText, textBlocks,
  truncate, unmatchedEntries,
} from "../../web/lib/report_format.js";

// Shape of hadakron/load_report.py LoadReport.to_dict() (produced by the real function for a small case).
const REPORT = {
  source: "x.safetensors",
  family: "sdxl",
  file_family: null,
  layouts: ["kohya"],
  loaded_parts: ["unet", "te1"],
  total_modules: 16,
  matched_count: 13,
  unmatched_count: 3,
  by_part: { unet: 12, te1: 1 },
  by_block: { unet: { IN04: 2, IN10: 1, IN07: 3, M00: 1, OUT02: 5 }, te1: { TE: 1 } },
  by_algorithm: { lokr: 12, loha: 1 },
  matched: [{ key: "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", part: "unet", block: "IN04" }],
  unmatched: [
    { key: "lora_unet_bogus_layer", kind: "unknown_module", reason: "not a SDXL layer name in any known key layout" },
    {
      key: "lora_unet_output_blocks_0_1_proj_in",
      kind: "shape_mismatch",
      reason: "delta-W is [8, 8] but unet 'output_blocks.0.1.proj_in' weight is [1280, 1280]",
      expected: [1280, 1280],
      found: [8, 8],
    },
    { key: "lora_te2_text_model_encoder_layers_0_mlp_fc1", kind: "part_not_loaded", reason: "te2 not loaded" },
  ],
  problems: ["alpha of lora_unet_x is NaN"],
  training: { ss_network_dim: "8", ss_network_args: { algo: "lokr", factor: 8 }, ss_base_model_version: "sdxl_base_v1-0", zzz_custom: "1" },
  strengths: { model: 1.0, clip: 0.5 },
  block_weights: "",
};

test("naturalCompare orders embedded numbers numerically", () => {
  const xs = ["IN10", "IN04", "OUT02", "M00", "IN7", "blocks.10", "blocks.9", "blocks.1"];
  assert.deepEqual(xs.slice().sort(naturalCompare), ["IN04", "IN7", "IN10", "M00", "OUT02", "blocks.1", "blocks.9", "blocks.10"]);
  assert.equal(naturalCompare("a", "a"), 0);
});

test("truncate cuts long text with an ellipsis", () => {
  assert.equal(truncate("abcdef", 4), "abc\u2026");
  assert.equal(truncate("abc", 4), "abc");
});

test("matchedByPart accepts nested counts, flat counts, entry lists and a bare number", () => {
  const nested = matchedByPart({ unet: { IN01: 2, OUT00: 3 }, te: 4 });
  assert.deepEqual([...nested.keys()], ["unet", "te"], "parts keep the report's order");
  assert.equal(nested.get("unet").get("IN01"), 2);
  assert.equal(nested.get("unet").get("OUT00"), 3);
  assert.equal(nested.get("te").get(""), 4);
  const list = matchedByPart([
    { part: "unet", block: "IN01" },
    { part: "unet", block: "IN01" },
    { part: "te", block: "TE", count: 5 },
  ]);
  assert.equal(list.get("unet").get("IN01"), 2);
  assert.equal(list.get("te").get("TE"), 5);
  assert.equal(matchedByPart(7).get("all").get(""), 7);
  assert.equal(matchedByPart(null).size, 0);
});

test("unmatchedEntries folds shapes into the reason only when the words lack them", () => {
  const e = unmatchedEntries([
    { key: "a", reason: "shape", expected: [4, 2], found: [2, 4] },
    { key: "b", reason: "delta-W is [8, 8] but weight is [1280, 1280]", expected: [1280, 1280], found: [8, 8] },
    "c",
  ]);
  assert.deepEqual(e[0], { key: "a", reason: "shape (expected (4, 2), found (2, 4))", kind: "" });
  assert.equal(e[1].reason, "delta-W is [8, 8] but weight is [1280, 1280]");
  assert.deepEqual(e[2], { key: "c", reason: "", kind: "" });
  assert.deepEqual(unmatchedEntries({ k: "why" }), [{ key: "k", reason: "why", kind: "" }]);
});

test("formatReport: headline, summary, per part/block counts in natural order", () => {
  const f = formatReport(REPORT);
  assert.equal(f.headline, "SDXL \u00b7 13/16 applied \u00b7 3 not applied \u00b7 1 warning");
  assert.deepEqual(f.summary, [
    "file: x.safetensors",
    "family: sdxl",
    "key layout: kohya",
    "parts: unet, te1",
    "algorithms: LoKr 12, LoHa 1",
    "strength: model 1, clip 0.5",
  ]);
  assert.deepEqual(f.matched, ["unet: 12", "  IN04: 2", "  IN07: 3", "  IN10: 1", "  M00: 1", "  OUT02: 5", "te1: 1"]);
  assert.equal(f.matchedTotal, 13);
});

test("blockCompare: natural order with case ignored, OTHER last (SDXL and Anima labels)", () => {
  const sdxl = ["OTHER", "OUT05", "IN10", "M00", "IN04", "OUT00"];
  assert.deepEqual(sdxl.slice().sort(blockCompare), ["IN04", "IN10", "M00", "OUT00", "OUT05", "OTHER"]);
  const anima = ["OTHER", "llm_adapter", "blocks.10", "blocks.2", "blocks.39"];
  assert.deepEqual(anima.slice().sort(blockCompare), ["blocks.2", "blocks.10", "blocks.39", "llm_adapter", "OTHER"]);
  assert.equal(blockCompare("blocks.3", "blocks.3"), 0);
});

test("formatReport: Anima blocks listed as the report labels them, in block order", () => {
  const f = formatReport({
    family: "anima",
    by_block: { unet: { OTHER: 1, llm_adapter: 6, "blocks.10": 10, "blocks.2": 10 }, te: { te: 7 } },
  });
  assert.deepEqual(f.matched, ["unet: 27", "  blocks.2: 10", "  blocks.10: 10", "  llm_adapter: 6", "  OTHER: 1", "te: 7"]);
});

test("formatReport: unmatched lines with reasons and kinds, metadata known keys first", () => {
  const f = formatReport(REPORT);
  assert.deepEqual(f.unmatched, [
    "lora_unet_bogus_layer: not a SDXL layer name in any known key layout",
    "lora_unet_output_blocks_0_1_proj_in: delta-W is [8, 8] but unet 'output_blocks.0.1.proj_in' weight is [1280, 1280]",
    "lora_te2_text_model_encoder_layers_0_mlp_fc1: te2 not loaded",
  ]);
  assert.equal(f.unmatchedKinds, "unknown module 1, shape mismatch 1, part not loaded 1");
  assert.equal(f.unmatchedCollapsed, false);
  assert.deepEqual(f.metadata, ["dim: 8", "network args: algo lokr, factor 8", "base model: sdxl_base_v1-0", "zzz_custom: 1"]);
  assert.deepEqual(f.warnings, ["alpha of lora_unet_x is NaN"]);
});

test("formatReport collapses long unmatched lists and cuts long values", () => {
  const many = Array.from({ length: 30 }, (_, i) => ({ key: `k${i}`, kind: "unknown_module", reason: "unknown" }));
  const f = formatReport({ family: "anima", unmatched: many, training: { ss_training_comment: "x".repeat(500) } }, { collapseAfter: 10, maxValue: 50 });
  assert.equal(f.unmatched.length, 30);
  assert.equal(f.unmatchedCollapsed, true);
  assert.equal(f.unmatchedKinds, "unknown module 30");
  assert.equal(f.metadata[0].length, "comment: ".length + 50);
  assert.equal(f.headline, "ANIMA \u00b7 0/30 applied \u00b7 30 not applied");
});

test("formatReport survives an empty or odd report", () => {
  const f = formatReport(null);
  assert.equal(f.headline, "0/0 applied");
  assert.deepEqual([f.summary, f.matched, f.unmatched, f.metadata, f.warnings], [[], [], [], [], []]);
  const g = formatReport({ matched: 5, unmatched: "nope", metadata: { ss_network_dim: 4 } });
  assert.equal(g.matchedTotal, 5);
  assert.deepEqual(g.metadata, ["dim: 4"]);
});

test("reportText lists every section", () => {
  const text = reportText(formatReport(REPORT));
  const lines = text.split("\n");
  assert.equal(lines[0], "SDXL \u00b7 13/16 applied \u00b7 3 not applied \u00b7 1 warning");
  assert.ok(lines.includes("applied per part / block:"));
  assert.ok(lines.includes("    IN10: 1"));
  assert.ok(lines.includes("not applied (3: unknown module 1, shape mismatch 1, part not loaded 1):"));
  assert.ok(lines.includes("training metadata:"));
  assert.ok(lines.includes("file warnings:"));
  assert.equal(lines[lines.length - 1], "  alpha of lora_unet_x is NaN");
});

test("formatReport: the loader's zero-strength note becomes the headline", () => {
  const text = "a.safetensors: both strengths are 0; nothing applied";
  const f = formatReport({ source: "a.safetensors", matched_count: 0, patches_added: 0, note: text });
  assert.equal(f.headline, text);
  assert.deepEqual(f.summary, [`note: ${text}`, "file: a.safetensors", "patches added: 0"]);
});

test("breakPieces: breaks after key punctuation, never inside a word or a number", () => {
  assert.deepEqual(breakPieces("lora_unet_input_blocks.4.1"), ["lora_", "unet_", "input_", "blocks.", "4.1"]);
  assert.deepEqual(breakPieces("error 4.361e-01, rank 0.5"), ["error 4.361e-01, rank 0.5"]);
  assert.deepEqual(breakPieces("a/b=c:(d"), ["a/", "b=", "c:", "(", "d"]);
  assert.deepEqual(breakPieces(""), [""]);
  for (const t of ["applied", "lora_te2_text_model_encoder_layers_0_mlp_fc1: te2 not loaded", "x.y.z"]) {
    assert.equal(breakPieces(t).join(""), t);
    for (const piece of breakPieces(t).slice(0, -1)) assert.match(piece, /[_/\\,;:=|(\[.]$/, piece);
  }
});

test("reportBlocks: headline first, summary lines, titled blocks with counts, long lists collapsed", () => {
  const r = reportBlocks(REPORT, { collapseAfter: 2 });
  assert.equal(r.headline, "SDXL \u00b7 13/16 applied \u00b7 3 not applied \u00b7 1 warning");
  assert.ok(r.lines.some((l) => l.startsWith("file: x.safetensors")));
  assert.deepEqual(r.warnings, ["alpha of lora_unet_x is NaN"]);
  assert.deepEqual(r.blocks.map((b) => b.kind), ["matched", "unmatched", "metadata"]);
  assert.equal(r.blocks[0].title, "applied per part / block (13 modules)");
  assert.equal(r.blocks[0].open, true, "the per-block list stays open up to 12 lines");
  assert.match(r.blocks[1].title, /^not applied \(3: unknown module 1, shape mismatch 1, part not loaded 1\)$/);
  assert.equal(r.blocks[1].open, false, "3 > collapseAfter 2: collapsed, the title holds the count");
  assert.equal(r.blocks[2].open, false, "metadata starts collapsed");
  assert.equal(r.blocks[2].title, `training metadata (${r.blocks[2].lines.length})`);
  const text = blocksText(r);
  assert.ok(text.startsWith(r.headline + "\n"));
  assert.ok(text.includes("  lora_unet_bogus_layer: not a SDXL layer name in any known key layout"));
});

test("textBlocks: first line is the headline, indented details become a block per heading", () => {
  const text = ["wrote loras/combined.safetensors", "794 LoRA modules (kohya layout), rank 8..64: exact (no truncation)",
    "a.safetensors @ 1: 790 modules applied, 4 not applied", ...[1, 2, 3, 4].map((i) => `  not applied m${i}: reason`),
    "790 weights merged"].join("\n");
  const r = textBlocks(text, { collapseAfter: 3 });
  assert.equal(r.headline, "wrote loras/combined.safetensors");
  assert.deepEqual(r.lines, ["794 LoRA modules (kohya layout), rank 8..64: exact (no truncation)"]);
  assert.equal(r.blocks.length, 2);
  assert.deepEqual(r.blocks[0], { title: "a.safetensors @ 1: 790 modules applied, 4 not applied (4)",
    lines: ["not applied m1: reason", "not applied m2: reason", "not applied m3: reason", "not applied m4: reason"],
    open: false, kind: "text" });
  assert.deepEqual(r.blocks[1], { title: "790 weights merged", lines: [], open: true, kind: "line" });
  const short = textBlocks("saved x\n  detail");
  assert.deepEqual(short.blocks, [{ title: "details (1)", lines: ["detail"], open: true, kind: "text" }]);
  assert.equal(blocksText(textBlocks("one line")), "one line");
});
