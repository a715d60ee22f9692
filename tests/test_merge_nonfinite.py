"""Bake and combine skip a module whose applied tensors hold NaN/Inf (with the reason), as the loader does, and
still apply a module whose only non-finite value is an alpha that nothing uses (sd-scripts' full-full LoKr in fp16)."""
from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from hadakron.merge import bake_checkpoint, combine
from test_merge_fixtures import C, loha, lokr, make_checkpoint, ref_delta, save_adapter

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
Q_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
K_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def _file(tmp_path):
    bad = loha(C, C, 2, 1.0, seed=1)
    bad["hada_w2_b"][0, 0] = math.nan
    unused_inf = lokr(4, 6, 4, 4, seed=2)  # both factors full: alpha is ignored (scale 1)
    unused_inf["alpha"] = torch.tensor(math.inf)
    return save_adapter(tmp_path / "mixed.safetensors", {Q: bad, K: unused_inf}), unused_inf


def test_combine_skips_nan_module_keeps_unused_inf_alpha(tmp_path):
    adapter, good = _file(tmp_path)
    result = combine([(adapter, 1.0)])
    assert [reason for _, reason in result.skipped] == ["hada_w2_b hold NaN/Inf values; module skipped"]
    assert [m.module_key for m in result.modules] == [K]
    up, down = result.tensors[f"{K}.lora_up.weight"].double(), result.tensors[f"{K}.lora_down.weight"].double()
    got = up @ down * float(result.tensors[f"{K}.alpha"]) / down.shape[0]
    assert torch.allclose(got, ref_delta(good, (C, 24)), atol=1e-12)
    assert all(torch.isfinite(t).all() for t in result.tensors.values())


def test_bake_skips_nan_module(tmp_path):
    adapter, good = _file(tmp_path)
    base = make_checkpoint(tmp_path / "base.safetensors")
    report = bake_checkpoint(tmp_path / "base.safetensors", [(adapter, 1.0)], tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out[Q_KEY], base[Q_KEY])  # the NaN module changed nothing
    want = (base[K_KEY].double() + ref_delta(good, (C, 24))).to(base[K_KEY].dtype)
    assert torch.equal(out[K_KEY], want)
    assert any("NaN/Inf" in reason for a in report.adapters for _, reason in a.unmatched)
