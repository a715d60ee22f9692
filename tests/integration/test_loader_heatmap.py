"""The loader's ||dW|| heatmap (report field `delta_norms`) on small real ComfyUI models: one cell per block of the
family's vocabulary, each the norm of s * strength * block weight * dW over the block's modules, against the dense
float64 reference of adapter_forms (independent of hadakron.ops and hadakron.delta_norms)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from adapter_forms import reference_delta
from test_loader_patches import S_CLIP, S_MODEL, _build_file, _layers


def _expected(family, layers, modules, mult_of):
    from hadakron.arch import get_family

    fam = get_family(family)
    by_key = {ckey: (part, dotted, on_clip) for part, dotted, ckey, _, on_clip in layers}
    acc: dict[tuple[str, str], float] = {}
    for ckey, (params, shape, on_clip) in modules.items():
        part, dotted, _ = by_key[ckey]
        block = fam.block_of(part, dotted)
        s = (S_CLIP if on_clip else S_MODEL) * mult_of(block)
        n = float(torch.linalg.vector_norm(reference_delta(params, shape).reshape(-1))) * abs(s)
        acc[(part, block)] = acc.get((part, block), 0.0) + n * n
    return {k: math.sqrt(v) for k, v in acc.items()}


@pytest.mark.parametrize("form", ["loha", "lokr_both", "lokr_tucker"])
def test_sdxl_heatmap_matches_dense_norms(form, pack_nodes, small_sdxl, small_sdxl_clip, write_lora):
    layers = _layers("sdxl", small_sdxl, small_sdxl_clip)
    tensors, modules = _build_file("sdxl", layers, form, seed=11)
    name = write_lora(f"heat_{form}.safetensors", tensors)
    out = pack_nodes.HadakronLoader().load(small_sdxl, small_sdxl_clip, name, S_MODEL, S_CLIP, "IN04=0, OUT01=0.5")
    heat = json.loads(out["ui"]["hadakron_report"][0])["delta_norms"]
    cells = {(c["part"], c["block"]): c for c in heat["cells"]}
    unet = ["IN%02d" % i for i in range(9)] + ["M00"] + ["OUT%02d" % i for i in range(9)] + ["OTHER"]
    assert [(c["part"], c["block"]) for c in heat["cells"]] == [("unet", b) for b in unet] + [("te1", "TE1"),
                                                                                            ("te2", "TE2")]
    want = _expected("sdxl", layers, modules, lambda b: {"IN04": 0.0, "OUT01": 0.5}.get(b, 1.0))
    for key, cell in cells.items():
        assert cell["exact"], cell  # rank <= 4: every LoHa is exact
        assert math.isclose(cell["norm"], want.get(key, 0.0), rel_tol=1e-5, abs_tol=1e-9), (key, cell, want.get(key))
    assert cells[("unet", "IN04")]["modules"] > 0 and cells[("unet", "IN04")]["norm"] == 0.0  # block weight 0
    assert heat["exact"] is True and math.isclose(heat["max"], max(want.values()), rel_tol=1e-5)


def test_anima_heatmap_cells_follow_the_model_depth(pack_nodes, small_anima, small_anima_clip, write_lora):
    layers = _layers("anima", small_anima, small_anima_clip)
    tensors, modules = _build_file("anima", layers, "lokr_lowrank", seed=5)
    name = write_lora("heat_anima.safetensors", tensors)
    out = pack_nodes.HadakronLoader().load(small_anima, small_anima_clip, name, S_MODEL, S_CLIP, "")
    heat = json.loads(out["ui"]["hadakron_report"][0])["delta_norms"]
    depth = len(small_anima.model.diffusion_model.blocks)
    assert [c["block"] for c in heat["cells"]] == [f"blocks.{i}" for i in range(depth)] + ["llm_adapter", "OTHER", "te"]
    want = _expected("anima", layers, modules, lambda b: 1.0)
    for c in heat["cells"]:
        assert math.isclose(c["norm"], want.get((c["part"], c["block"]), 0.0), rel_tol=1e-5, abs_tol=1e-9), c
