"""The load report: matching file modules to a model's layers, reasons for what is left out, renderings."""
import json
import math

import pytest
import torch

from hadakron.load_report import build_load_report, delta_shape, training_metadata, weight_accepts

Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
CONV = "input_blocks.1.0.in_layers.2"
TE = "text_model.encoder.layers.0.mlp.fc1"


def _loha(out, cols, r=2, alpha=1.0):
    g = torch.Generator().manual_seed(out * 7 + cols)
    return {"hada_w1_a": torch.randn(out, r, generator=g), "hada_w1_b": torch.randn(r, cols, generator=g),
            "hada_w2_a": torch.randn(out, r, generator=g), "hada_w2_b": torch.randn(r, cols, generator=g),
            "alpha": torch.tensor(alpha)}


def _lokr(w1_shape, w2_shape, alpha=4.0):
    return {"lokr_w1": torch.randn(*w1_shape), "lokr_w2": torch.randn(*w2_shape), "alpha": torch.tensor(alpha)}


MODEL = {("unet", Q): (8, 8), ("unet", CONV): (4, 4, 3, 3), ("te1", TE): (6, 4)}


def _report(modules, metadata=None, **kw):
    return build_load_report(modules, metadata or {}, "sdxl", MODEL, source="test.safetensors", **kw)


def test_delta_shapes_from_tensor_shapes():
    assert delta_shape(_loha(8, 36)) == (8, 36)
    assert delta_shape(_lokr((2, 2), (4, 4))) == (8, 8)
    # LoKr conv, full w2 with kernel: (2*4, 1*4*3*3)
    assert delta_shape(_lokr((2, 1), (2, 4, 3, 3))) == (4, 36)
    # Tucker LoHa: a (r, out), b (r, in), t (r, r, kh, kw)
    tucker = {"hada_w1_a": torch.randn(2, 4), "hada_w1_b": torch.randn(2, 4), "hada_t1": torch.randn(2, 2, 3, 3),
              "hada_w2_a": torch.randn(2, 4), "hada_w2_b": torch.randn(2, 4), "hada_t2": torch.randn(2, 2, 3, 3)}
    assert delta_shape(tucker) == (4, 36)
    assert weight_accepts((4, 4, 3, 3), (4, 36)) and not weight_accepts((4, 4, 3, 3), (4, 16))


def test_matched_per_part_and_block_and_scales():
    modules = {
        "lora_unet_" + Q.replace(".", "_"): _loha(8, 8, r=2, alpha=1.0),
        "lora_unet_" + CONV.replace(".", "_"): _lokr((2, 1), (2, 4, 3, 3), alpha=3.0),
        "lora_te1_" + TE.replace(".", "_"): _loha(6, 4, r=4, alpha=2.0),
    }
    rep = _report(modules)
    assert len(rep.matched) == 3 and not rep.unmatched
    assert rep.counts_by_part() == {"unet": 2, "te1": 1}
    assert rep.counts_by_block() == {"unet": {"IN04": 1, "IN01": 1}, "te1": {"TE1": 1}}
    by_key = {m.dotted: m for m in rep.matched}
    assert by_key[Q].scale == pytest.approx(1.0 / 2) and by_key[Q].rank == 2
    assert by_key[TE].scale == pytest.approx(2.0 / 4)
    assert by_key[CONV].scale == 1.0  # LoKr with both factors full ignores alpha (ComfyUI/LyCORIS)
    assert by_key[CONV].layout == "kohya" and by_key[CONV].algorithm == "lokr"
    d = json.loads(rep.to_json())
    assert d["matched_count"] == 3 and d["by_algorithm"] == {"loha": 2, "lokr": 1}


def test_unmatched_reasons():
    modules = {
        "lora_unet_" + Q.replace(".", "_"): _loha(8, 6),                       # shape mismatch
        "lora_unet_not_a_layer": _loha(8, 8),                                   # unknown name
        "lora_unet_output_blocks_0_1_proj_in": _loha(8, 8),                     # valid SDXL name, absent in model
        "lora_unet_" + CONV.replace(".", "_"): {"lora_up.weight": torch.randn(4, 2),
                                               "lora_down.weight": torch.randn(2, 36)},  # LoRA
        "lora_te1_" + TE.replace(".", "_"): {"oft_blocks": torch.randn(2, 3, 3)},   # other algorithm
    }
    rep = _report(modules)
    assert not rep.matched
    kinds = {u.key: u for u in rep.unmatched}
    mism = kinds["lora_unet_" + Q.replace(".", "_")]
    assert mism.kind == "shape_mismatch" and mism.expected == (8, 8) and mism.found == (8, 6)
    assert kinds["lora_unet_not_a_layer"].kind == "unknown_module"
    assert kinds["lora_unet_output_blocks_0_1_proj_in"].kind == "not_in_model"
    lora = kinds["lora_unet_" + CONV.replace(".", "_")]
    assert lora.kind == "unsupported_algorithm" and "LoraLoader" in lora.reason
    assert kinds["lora_te1_" + TE.replace(".", "_")].kind == "unsupported_algorithm"
    text = rep.to_text()
    assert "0/5 modules applied" in text and "delta-W is [8, 6] but unet" in text
    d = rep.to_dict()
    assert {u["kind"] for u in d["unmatched"]} == {"shape_mismatch", "unknown_module", "not_in_model",
                                                   "unsupported_algorithm"}
    assert [u for u in d["unmatched"] if u["kind"] == "shape_mismatch"][0]["expected"] == [8, 8]


def test_part_not_loaded_and_nonfinite():
    bad = _loha(8, 8)
    bad["hada_w2_b"][0, 0] = math.nan
    modules = {"lora_unet_" + Q.replace(".", "_"): bad, "lora_te1_" + TE.replace(".", "_"): _loha(6, 4)}
    rep = _report(modules, loaded_parts=("unet",))
    kinds = {u.kind: u for u in rep.unmatched}
    assert set(kinds) == {"nonfinite", "part_not_loaded"}
    assert "hada_w2_b" in kinds["nonfinite"].reason
    assert "te1" in kinds["part_not_loaded"].reason


def test_layouts_resolve_to_the_same_layer():
    for key in ("lora_unet_" + Q.replace(".", "_"),
                "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                "diffusion_model." + Q,
                "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"):
        rep = _report({key: _loha(8, 8)})
        assert [(m.part, m.dotted) for m in rep.matched] == [("unet", Q)], key


def test_anima_report():
    model = {("unet", "blocks.3.self_attn.q_proj"): (16, 16), ("te", "layers.0.mlp.up_proj"): (8, 4)}
    modules = {"lora_unet_blocks_3_self_attn_q_proj": _lokr((4, 4), (4, 4)),
               "lora_te_layers_0_mlp_up_proj": _loha(8, 4)}
    rep = build_load_report(modules, {}, "anima", model)
    assert rep.counts_by_block() == {"unet": {"blocks.3": 1}, "te": {"te": 1}}


def test_training_metadata_is_decoded():
    meta = {"ss_network_dim": "16", "ss_network_alpha": "8", "ss_network_args": '{"algo": "lokr", "factor": "8"}',
            "ss_base_model_version": "sdxl_base_v1-0", "ss_steps": "1200", "unrelated": "x", "ss_epoch": "None"}
    t = training_metadata(meta)
    assert t == {"ss_network_dim": "16", "ss_network_alpha": "8", "ss_network_args": {"algo": "lokr", "factor": "8"},
                 "ss_base_model_version": "sdxl_base_v1-0", "ss_steps": "1200"}
    rep = _report({"lora_unet_" + Q.replace(".", "_"): _loha(8, 8)}, meta)
    assert "network_dim=16" in rep.to_text() and rep.to_dict()["training"]["ss_steps"] == "1200"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonfinite_scan_is_exact(dtype):
    from hadakron.io.module_checks import nonfinite_counts

    t = torch.randn(50, 9).to(dtype)
    assert nonfinite_counts(t) is None
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # largest finite values are not flagged
    assert nonfinite_counts(big) is None and nonfinite_counts(-big) is None
    for bad, counts in ((math.nan, (1, 0)), (math.inf, (0, 1)), (-math.inf, (0, 1))):
        u = t.clone()
        u[7, 2] = bad
        assert nonfinite_counts(u) == counts and nonfinite_counts(u.t()) == counts


def test_scan_and_report_on_inference_tensors_twice():
    """A prompt hands the loader inference tensors (no version counter); the same file is reported again on re-queue."""
    with torch.inference_mode():
        good = _loha(8, 8, r=2)
        bad = _loha(6, 4, r=2)
        bad["hada_w2_b"][0, 1] = math.nan
        modules = {"lora_unet_" + Q.replace(".", "_"): good, "lora_te1_" + TE.replace(".", "_"): bad}
    assert good["hada_w1_a"].is_inference()
    for _ in range(2):
        with torch.inference_mode():
            rep = _report(modules)
        assert [m.dotted for m in rep.matched] == [Q]
        assert [(u.kind, u.reason) for u in rep.unmatched] == [
            ("nonfinite", "hada_w2_b hold NaN/Inf values; module skipped")]


def test_precomputed_scan_is_used_not_redone():
    """The loader passes the file's one scan; the report trusts it (a module flagged there is dropped)."""
    modules = {"lora_unet_" + Q.replace(".", "_"): _loha(8, 8, r=2)}
    rep = _report(modules, nonfinite={"lora_unet_" + Q.replace(".", "_"): {"hada_w1_a": (1, 0)}})
    assert not rep.matched and rep.unmatched[0].kind == "nonfinite"


def test_unused_inf_alpha_of_full_lokr_is_applied():
    """sd-scripts saves a LoKr with both factors full (dim 100000) in fp16 with alpha = inf: alpha is unused (scale 1),
    so the module applies; an inf alpha that does set the scale (w2 decomposed) drops the module."""
    full = {"lokr_w1": torch.randn(2, 2).half(), "lokr_w2": torch.randn(4, 4).half(),
            "alpha": torch.tensor(math.inf, dtype=torch.float16)}
    low = {"lokr_w1": torch.randn(2, 2).half(), "lokr_w2_a": torch.randn(4, 2).half(),
           "lokr_w2_b": torch.randn(2, 4).half(), "alpha": torch.tensor(math.inf, dtype=torch.float16)}
    rep = _report({"lora_unet_" + Q.replace(".", "_"): full, "lora_te1_" + TE.replace(".", "_"): dict(low)})
    assert [m.dotted for m in rep.matched] == [Q] and rep.matched[0].scale == 1.0
    assert rep.unmatched[0].kind == "shape_mismatch" or rep.unmatched[0].kind == "nonfinite"
    rep2 = _report({"lora_unet_" + Q.replace(".", "_"): low})
    assert not rep2.matched and rep2.unmatched[0].kind == "nonfinite" and "alpha" in rep2.unmatched[0].reason
    d = json.loads(rep.to_json())  # strict JSON for the browser: no bare Infinity token
    assert d["matched"][0]["alpha"] == "inf"
    json.loads(rep.to_json(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
