"""combine: the combined LoRA's delta-W equals sum_i s_i dW_i (float64 reference from the formulas, not from ops),
exactly without a rank; with a rank, the reported error is the true relative Frobenius error of the truncation."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hadakron.io import read_adapter
from hadakron.merge import combine
from test_merge_fixtures import C, loha, lokr, lora, ref_delta, save_adapter

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_input_blocks_1_0_in_layers_2"
SHAPES = {Q: (C, C), K: (C, 24), CONV: (C, 8, 3, 3)}


def lora_delta(params: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """delta-W of a written LoRA module, in float64, straight from its tensors (up @ down * alpha / rank)."""
    up = params["lora_up.weight"].double()
    down = params["lora_down.weight"].double()
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(shape) * float(params["alpha"]) / r


@pytest.fixture()
def three(tmp_path):
    a = {Q: loha(C, C, 3, 2.0, seed=1), K: lokr(4, 4, 4, 6, seed=2, w2="lowrank", r=2, alpha=1.0),
         CONV: loha(C, 8, 2, 1.0, seed=3, kernel=(3, 3), tucker=True)}
    b = {Q: lokr(4, 4, 4, 4, seed=4, w1="lowrank", w2="lowrank", r=2, alpha=3.0),
         CONV: lokr(4, 2, 4, 4, seed=5, w2="tucker", r=2, alpha=2.0, kernel=(3, 3))}
    c = {"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q": lora(C, C, 2, 1.0, seed=6),
         "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k": lora(C, 24, 4, 8.0, seed=7)}
    files = [save_adapter(tmp_path / f"{n}.safetensors", m) for n, m in (("a", a), ("b", b), ("c", c))]
    strengths = [0.8, -0.5, 1.25]
    expected = {key: sum(s * ref_delta(m[key], shape) for m, s in zip((a, b), strengths[:2]) if key in m) for key, shape in SHAPES.items()}
    expected[Q] = expected[Q] + strengths[2] * ref_delta(c["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"], SHAPES[Q])
    expected[K] = expected[K] + strengths[2] * ref_delta(c["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k"], SHAPES[K])
    return list(zip(files, strengths)), expected


def test_exact_combine_equals_weighted_sum(three, tmp_path):
    adapters, expected = three
    result = combine(adapters)
    path = result.write(tmp_path / "combined.safetensors")
    back = read_adapter(path)
    assert back.problems == []
    assert set(back.modules) == set(SHAPES)
    for key, shape in SHAPES.items():
        got = lora_delta(back.modules[key], shape)
        want = expected[key]
        assert (got - want).norm() <= 1e-5 * want.norm(), key
    conv = back.modules[CONV]
    assert conv["lora_down.weight"].dim() == 4 and conv["lora_down.weight"].shape[1:] == (8, 3, 3)
    assert conv["lora_up.weight"].shape[2:] == (1, 1)
    assert result.overall_error == 0.0
    # ranks: Q = LoHa 3*3 + LoKr (2*2 ... capped) + LoRA 2 concatenated, never above min(out, in)
    assert all(m.rank <= 16 for m in result.modules)
    meta = back.metadata
    assert [d["strength"] for d in json.loads(meta["hadakron.combined_from"])] == [0.8, -0.5, 1.25]
    assert meta["ss_network_module"] == "networks.lora" and "sshs_model_hash" in meta


@pytest.mark.parametrize("rank", [1, 3])
def test_truncated_combine_reports_true_error(three, rank):
    adapters, expected = three
    result = combine(adapters, rank=rank)
    lost_total = norm_total = 0.0
    for m in result.modules:
        key = m.module_key
        shape = SHAPES[key]
        params = {name: result.tensors[f"{key}.{name}"] for name in ("lora_up.weight", "lora_down.weight", "alpha")}
        got = lora_delta(params, shape)
        want = expected[key]
        true_err = ((got - want).norm() / want.norm()).item()
        assert m.rank <= rank
        assert math.isclose(m.relative_error, true_err, rel_tol=1e-4, abs_tol=1e-6), (key, m.relative_error, true_err)
        # optimal: equals the tail of the singular values of the exact sum (Eckart-Young)
        sv = torch.linalg.svdvals(want.reshape(shape[0], -1))
        optimal = (sv[rank:].square().sum() / sv.square().sum()).sqrt().item()
        assert math.isclose(true_err, optimal, rel_tol=1e-4, abs_tol=1e-6)
        lost_total += ((got - want).norm() ** 2).item()
        norm_total += (want.norm() ** 2).item()
    assert math.isclose(result.overall_error, math.sqrt(lost_total / norm_total), rel_tol=1e-4)
    assert result.overall_error > 0
    assert json.loads(result.metadata["hadakron.combine_module_errors"])  # recorded in the file


def test_dora_and_unknown_modules_are_skipped_with_reason(tmp_path):
    dora = loha(C, C, 2, 1.0, seed=1)
    dora["dora_scale"] = torch.ones(C, 1)
    f = save_adapter(tmp_path / "d.safetensors", {Q: dora, K: lora(C, 24, 2, 1.0, seed=2),
                                                  "lora_unet_not_a_layer": lora(4, 4, 1, 1.0, seed=3)})
    result = combine([(f, 1.0)])
    assert [m.module_key for m in result.modules] == [K]
    reasons = dict(result.skipped)
    assert "DoRA" in reasons[f"d.safetensors: {Q}"]
    assert "not recognised" in reasons["d.safetensors: lora_unet_not_a_layer"]


def test_combine_in_peft_layout(three):
    adapters, expected = three
    result = combine(adapters, layout="peft")
    assert "base_model.model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_B.weight" in result.tensors
    up = result.tensors["base_model.model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_B.weight"].double()
    down = result.tensors["base_model.model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight"].double()
    alpha = float(result.tensors["base_model.model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.alpha"])
    got = up @ down * alpha / down.shape[0]
    assert (got - expected[Q]).norm() <= 1e-5 * expected[Q].norm()


def test_in_memory_adapter_without_a_path(tmp_path):
    """A trainer's in-memory adapter (AdapterFile with path None) combines and is named in reports."""
    from hadakron.io import AdapterFile

    params = loha(C, C, 2, 1.0, seed=11)
    mem = AdapterFile(path=None, tensors={f"{Q}.{k}": v for k, v in params.items()}, metadata={}, modules={Q: params})
    result = combine([(mem, 2.0)])
    up, down = result.tensors[f"{Q}.lora_up.weight"].double(), result.tensors[f"{Q}.lora_down.weight"].double()
    got = up @ down * float(result.tensors[f"{Q}.alpha"]) / down.shape[0]
    want = 2.0 * ref_delta(params, (C, C))
    assert (got - want).norm() <= 1e-5 * want.norm()
    assert json.loads(result.metadata["hadakron.combined_from"])[0]["file"] == "in-memory adapter"
