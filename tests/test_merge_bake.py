"""bake_checkpoint: W' = W + sum s_i dW_i against an independent float64 reference, for LoHa, LoKr (all forms) and
LoRA, on a tiny SDXL-named single-file checkpoint (UNet, CLIP-L, OpenCLIP CLIP-G), Anima DiT and Qwen3 files."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hadakron.merge import OutputExistsError, bake_checkpoint, index_checkpoint
from test_merge_fixtures import C, CLIP, loha, lokr, lora, make_checkpoint, ref_delta, save_adapter

U = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0."
G = "conditioner.embedders.1.model.transformer.resblocks.0."
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def _close(got: torch.Tensor, want64: torch.Tensor, key: str) -> None:
    tol = TOL[got.dtype]
    assert got.dtype != torch.float64
    err = (got.double() - want64).abs().max().item()
    bound = tol * (1 + want64.abs().max().item())
    assert err <= bound, f"{key}: max error {err} > {bound}"


@pytest.fixture()
def sdxl(tmp_path):
    base = tmp_path / "base.safetensors"
    tensors = make_checkpoint(base)
    unet = {  # kohya layout
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": loha(C, C, 4, 2.0, seed=1),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": lokr(4, 4, 4, 6, seed=2, w1="full", w2="lowrank", r=3, alpha=1.5),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0": lokr(4, 2, 4, 8, seed=3, w1="lowrank", w2="lowrank", r=2, alpha=4.0),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj": lokr(8, 4, 8, 4, seed=4),  # both full: scale 1
        "lora_unet_input_blocks_1_0_in_layers_2": loha(C, 8, 2, 1.0, seed=5, kernel=(3, 3)),  # flat conv LoHa
        "lora_unet_input_blocks_4_1_proj_in": lora(C, C, 4, 2.0, seed=6),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": lora(CLIP, CLIP, 2, 1.0, seed=7),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": loha(CLIP, CLIP, 2, 1.0, seed=8),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": lokr(2, 2, 4, 4, seed=9, w2="lowrank", r=2, alpha=1.0),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": lora(4 * CLIP, CLIP, 3, 1.5, seed=10),
        "lora_te2_text_model_encoder_layers_0_mlp_fc2": lora(CLIP, 4 * CLIP, 3, 3.0, seed=11),
        "lora_te2_text_projection": lora(CLIP, CLIP, 2, 2.0, seed=12),
        "lora_unet_output_blocks_0_0_in_layers_2": lora(1280, 2560, 1, 1.0, seed=13, kernel=(3, 3)),  # not in base
    }
    second = {  # ComfyUI layout, overlapping layers with the first adapter
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q": lokr(4, 4, 4, 4, seed=20, w2="lowrank", r=2, alpha=0.5),
        "diffusion_model.input_blocks.1.0.in_layers.2": lokr(4, 2, 4, 4, seed=21, w2="tucker", r=2, alpha=3.0, kernel=(3, 3)),
        "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.out_proj": loha(CLIP, CLIP, 2, 0.5, seed=22),
        "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj": lora(CLIP, CLIP, 1, 1.0, seed=23),
    }
    a = save_adapter(tmp_path / "a.safetensors", unet)
    b = save_adapter(tmp_path / "b.safetensors", second)
    return base, tensors, a, b, unet, second


def _expected(tensors, contributions):
    """{key: float64 expected} from base tensors and [(key, rows, transposed, params, strength)]."""
    exp = {k: v.double().clone() for k, v in tensors.items()}
    for key, rows, transposed, params, s in contributions:
        region = exp[key] if rows is None else exp[key][rows[0]:rows[1]]
        shape = tuple(region.T.shape) if transposed else tuple(region.shape)
        d = ref_delta(params, shape) * s
        region += d.T if transposed else d
    return exp


def test_bake_sdxl_matches_float64_reference(sdxl, tmp_path):
    base, tensors, a, b, unet, second = sdxl
    out = tmp_path / "baked.safetensors"
    report = bake_checkpoint(base, [(a, 0.7), (b, -1.3)], out)
    got = load_file(str(out))
    assert list(got) == list(load_file(str(base)))
    sa, sb = 0.7, -1.3
    contributions = [
        (U + "attn1.to_q.weight", None, False, unet["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"], sa),
        (U + "attn1.to_q.weight", None, False, second["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"], sb),
        (U + "attn2.to_k.weight", None, False, unet["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"], sa),
        (U + "attn1.to_out.0.weight", None, False, unet["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"], sa),
        (U + "ff.net.0.proj.weight", None, False, unet["lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"], sa),
        ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", None, False, unet["lora_unet_input_blocks_1_0_in_layers_2"], sa),
        ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", None, False, second["diffusion_model.input_blocks.1.0.in_layers.2"], sb),
        ("model.diffusion_model.input_blocks.4.1.proj_in.weight", None, False, unet["lora_unet_input_blocks_4_1_proj_in"], sa),
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None, False,
         unet["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"], sa),
        (G + "attn.in_proj_weight", (0, CLIP), False, unet["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"], sa),
        (G + "attn.in_proj_weight", (0, CLIP), False,
         second["text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj"], sb),
        (G + "attn.in_proj_weight", (CLIP, 2 * CLIP), False, unet["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"], sa),
        (G + "attn.out_proj.weight", None, False,
         second["text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.out_proj"], sb),
        (G + "mlp.c_fc.weight", None, False, unet["lora_te2_text_model_encoder_layers_0_mlp_fc1"], sa),
        (G + "mlp.c_proj.weight", None, False, unet["lora_te2_text_model_encoder_layers_0_mlp_fc2"], sa),
        ("conditioner.embedders.1.model.text_projection", None, True, unet["lora_te2_text_projection"], sa),
    ]
    expected = _expected(tensors, contributions)
    changed = {c[0] for c in contributions}
    for key, t in got.items():
        assert t.dtype == tensors[key].dtype and t.shape == tensors[key].shape, key
        if key in changed:
            _close(t, expected[key], key)
            assert not torch.equal(t, tensors[key]), key
        else:
            assert torch.equal(t, tensors[key]), f"{key} must be copied unchanged"
    # v rows of the stacked CLIP-G in_proj are untouched, bit for bit
    assert torch.equal(got[G + "attn.in_proj_weight"][2 * CLIP:], tensors[G + "attn.in_proj_weight"][2 * CLIP:])
    assert report.weights_changed == len(changed)
    ra, rb = report.adapters
    assert len(ra.applied) == len(unet) - 1 and len(rb.applied) == len(second)
    assert [u[0] for u in ra.unmatched] == ["sdxl/unet output_blocks.0.0.in_layers.2"]


def test_bake_keeps_base_metadata_and_records_adapters(sdxl, tmp_path):
    base, _, a, b, _, _ = sdxl
    out = tmp_path / "baked.safetensors"
    bake_checkpoint(base, [(a, 0.7), (b, 1.0)], out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny sdxl" and meta["format"] == "pt"
    record = json.loads(meta["hadakron.baked_adapters"])
    assert [(r["file"], r["strength"]) for r in record] == [("a.safetensors", 0.7), ("b.safetensors", 1.0)]
    assert record[0]["unmatched"] == 1
    # baking again appends to the record
    out2 = tmp_path / "baked2.safetensors"
    bake_checkpoint(out, [(b, 0.5)], out2)
    with safe_open(str(out2), "pt") as f:
        assert [r["strength"] for r in json.loads(f.metadata()["hadakron.baked_adapters"])] == [0.7, 1.0, 0.5]


def test_baked_checkpoint_loads_back_with_same_tensors(sdxl, tmp_path):
    base, tensors, a, _, _, _ = sdxl
    out = tmp_path / "baked.safetensors"
    bake_checkpoint(base, [(a, 0.0)], out)  # strength 0: every weight must come back identical
    got = load_file(str(out))
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(got[k], tensors[k]), k
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.title"] == "tiny sdxl"


def test_refuses_to_overwrite(sdxl, tmp_path):
    base, _, a, _, _, _ = sdxl
    out = tmp_path / "baked.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        bake_checkpoint(base, [(a, 1.0)], out)
    assert out.read_bytes() == b"keep me"
    bake_checkpoint(base, [(a, 1.0)], out, overwrite=True)
    assert len(load_file(str(out))) == len(load_file(str(base)))


def test_error_midway_leaves_no_output(sdxl, tmp_path):
    base, _, a, _, _, _ = sdxl
    bad = save_adapter(tmp_path / "bad.safetensors", {  # last weight in the file gets a wrong-shaped module
        "lora_te2_text_projection": lora(CLIP + 1, CLIP, 2, 1.0, seed=3)})
    out = tmp_path / "baked.safetensors"
    with pytest.raises(ValueError, match="text_projection"):
        bake_checkpoint(base, [(a, 1.0), (bad, 1.0)], out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_kill_during_write_leaves_no_output(sdxl, tmp_path):
    base, _, _, _, _, _ = sdxl
    out = tmp_path / "killed.safetensors"
    script = f"""
import os, signal, torch
from hadakron.merge import rewrite_checkpoint
from hadakron.io.safetensors_format import read_header
h = read_header({str(base)!r})
last = h.entries[-1].name
def die(entry, t):
    os.kill(os.getpid(), signal.SIGKILL)
rewrite_checkpoint({str(base)!r}, {str(out)!r}, {{last: die}}, {{}})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the kill really happened mid-write


def test_no_matching_module_is_an_error(tmp_path):
    base = tmp_path / "base.safetensors"
    make_checkpoint(base)
    other = save_adapter(tmp_path / "anima.safetensors", {"lora_unet_blocks_0_self_attn_q_proj": lora(C, C, 2, 1.0, seed=1)})
    with pytest.raises(ValueError, match="none of the adapters"):
        bake_checkpoint(base, [(other, 1.0)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("prefix", ["", "net.", "model.diffusion_model."])
def test_bake_anima_dit_file_with_any_prefix(tmp_path, prefix):
    layout = {
        prefix + "blocks.0.mlp.layer1.weight": ((4 * C, C), torch.bfloat16),
        prefix + "blocks.0.self_attn.q_proj.weight": ((C, C), torch.bfloat16),
        prefix + "blocks.0.self_attn.q_norm.weight": ((8,), torch.bfloat16),
        prefix + "llm_adapter.blocks.0.cross_attn.q_proj.weight": ((C, C), torch.float32),
    }
    base = tmp_path / "anima.safetensors"
    tensors = make_checkpoint(base, layout=layout, metadata={})
    mods = {
        "lora_unet_blocks_0_self_attn_q_proj": lokr(4, 4, 4, 4, seed=1, w2="lowrank", r=2, alpha=2.0),
        "lora_unet_blocks_0_mlp_layer1": loha(4 * C, C, 2, 1.0, seed=2),
        "lora_unet_llm_adapter_blocks_0_cross_attn_q_proj": lora(C, C, 2, 1.0, seed=3),
    }
    adapter = save_adapter(tmp_path / "a.safetensors", mods)
    out = tmp_path / "out.safetensors"
    report = bake_checkpoint(base, [(adapter, 0.8)], out)
    assert report.checkpoint_parts == {"anima/unet": prefix}
    got = load_file(str(out))
    exp = _expected(tensors, [
        (prefix + "blocks.0.self_attn.q_proj.weight", None, False, mods["lora_unet_blocks_0_self_attn_q_proj"], 0.8),
        (prefix + "blocks.0.mlp.layer1.weight", None, False, mods["lora_unet_blocks_0_mlp_layer1"], 0.8),
        (prefix + "llm_adapter.blocks.0.cross_attn.q_proj.weight", None, False,
         mods["lora_unet_llm_adapter_blocks_0_cross_attn_q_proj"], 0.8),
    ])
    for k in exp:
        if "norm" in k:
            assert torch.equal(got[k], tensors[k])
        else:
            _close(got[k], exp[k], k)


@pytest.mark.parametrize("prefix", ["model.", "qwen3_06b.transformer.model."])
def test_bake_qwen3_text_encoder_file(tmp_path, prefix):
    layout = {
        prefix + "layers.0.self_attn.q_norm.weight": ((4,), torch.bfloat16),
        prefix + "layers.0.self_attn.q_proj.weight": ((2 * C, C), torch.bfloat16),
        prefix + "layers.0.mlp.up_proj.weight": ((3 * C, C), torch.bfloat16),
        prefix + "embed_tokens.weight": ((10, C), torch.bfloat16),
    }
    base = tmp_path / "qwen.safetensors"
    tensors = make_checkpoint(base, layout=layout, metadata={})
    mods = {"lora_te_layers_0_self_attn_q_proj": loha(2 * C, C, 3, 1.5, seed=4),
            "lora_te_layers_0_mlp_up_proj": lokr(3, 4, C, 4, seed=5, w2="lowrank", r=2, alpha=1.0)}
    adapter = save_adapter(tmp_path / "te.safetensors", mods)
    out = tmp_path / "out.safetensors"
    report = bake_checkpoint(base, [(adapter, 1.0)], out)
    assert report.checkpoint_parts == {"anima/te": prefix}
    got = load_file(str(out))
    exp = _expected(tensors, [(prefix + "layers.0.self_attn.q_proj.weight", None, False, mods["lora_te_layers_0_self_attn_q_proj"], 1.0),
                              (prefix + "layers.0.mlp.up_proj.weight", None, False, mods["lora_te_layers_0_mlp_up_proj"], 1.0)])
    for k in exp:
        _close(got[k], exp[k], k)


def test_index_maps_openclip_qkv_rows():
    idx = index_checkpoint({G + "attn.in_proj_weight": (3 * 1280, 1280), "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})
    t = idx.targets[("sdxl", "te2", "text_model.encoder.layers.0.self_attn.v_proj")]
    assert t.key == G + "attn.in_proj_weight" and t.rows == (2560, 3840)


def test_bake_dora_module_follows_the_dora_formula(tmp_path):
    """A module with a row-wise dora_scale: W' = W + s * (W_d - W), W_d = (W + dW) * m / ||W + dW||_row (float64 ref)."""
    key = U + "attn1.to_q.weight"
    layout = {key: ((C, C), torch.float32), U + "attn1.to_k.weight": ((C, C), torch.float32)}
    base = tmp_path / "base.safetensors"
    tensors = make_checkpoint(base, layout=layout, metadata={})
    params = loha(C, C, 2, 1.0, seed=3)
    params["dora_scale"] = torch.rand(C, 1, generator=torch.Generator().manual_seed(4)) + 0.5
    adapter = save_adapter(tmp_path / "dora.safetensors", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": params})
    out = tmp_path / "out.safetensors"
    bake_checkpoint(base, [(adapter, 0.6)], out)
    w = tensors[key].double()
    merged = w + ref_delta(params, (C, C))
    wd = merged * params["dora_scale"].double() / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    want = w + 0.6 * (wd - w)
    _close(load_file(str(out))[key], want, key)
    assert torch.equal(load_file(str(out))[U + "attn1.to_k.weight"], tensors[U + "attn1.to_k.weight"])
