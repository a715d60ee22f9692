"""convert: LoHa/LoKr -> LoRA reproduces delta-W exactly (float64 reference from the formulas), the SVD form reports
its true error, and key layout conversion is lossless both ways."""
from __future__ import annotations

import math

import pytest
import torch

from hadakron.io import read_adapter
from hadakron.merge import convert_layout, to_lora
from test_merge_fixtures import C, loha, lokr, ref_delta, save_adapter

KEY = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # (C, C)
FF = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"  # (4C, C)
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # (C, 8, 3, 3)

CASES = {
    "lokr full/full": (FF, lokr(8, 4, 8, 4, seed=1), (4 * C, C)),
    "lokr full/lowrank": (FF, lokr(8, 4, 8, 4, seed=2, w2="lowrank", r=2, alpha=3.0), (4 * C, C)),
    "lokr lowrank/lowrank": (FF, lokr(8, 4, 8, 4, seed=3, w1="lowrank", w2="lowrank", r=2, alpha=0.5), (4 * C, C)),
    "lokr conv full w2": (CONV, lokr(4, 2, 4, 4, seed=4, kernel=(3, 3)), (C, 8, 3, 3)),
    "lokr conv flat w2": (CONV, lokr(4, 2, 4, 4, seed=5, w2="flat", r=2, alpha=2.0, kernel=(3, 3)), (C, 8, 3, 3)),
    "lokr conv tucker": (CONV, lokr(4, 2, 4, 4, seed=6, w2="tucker", r=2, alpha=2.0, kernel=(3, 3)), (C, 8, 3, 3)),
    "loha": (KEY, loha(C, C, 2, 1.0, seed=7), (C, C)),
    "loha conv tucker": (CONV, loha(C, 8, 2, 4.0, seed=8, kernel=(3, 3), tucker=True), (C, 8, 3, 3)),
}


def _lora_delta(tensors, key, shape):
    up, down = tensors[f"{key}.lora_up.weight"].double(), tensors[f"{key}.lora_down.weight"].double()
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(shape) * float(tensors[f"{key}.alpha"]) / r


@pytest.mark.parametrize("case", list(CASES))
def test_exact_to_lora_reproduces_delta(tmp_path, case):
    key, params, shape = CASES[case]
    f = save_adapter(tmp_path / "in.safetensors", {key: params})
    result = to_lora(f)
    out = read_adapter(result.write(tmp_path / "out.safetensors"))
    assert out.problems == []
    want = ref_delta(params, shape)
    got = _lora_delta(out.tensors, key, shape)
    assert (got - want).norm() <= 2e-6 * want.norm(), case
    assert result.overall_error == 0.0
    if len(shape) == 4 and "flat" not in case:  # a flat factor does not say its kernel (see the next test)
        assert out.tensors[f"{key}.lora_down.weight"].shape[1:] == shape[1:]


def test_flat_conv_gets_its_kernel_from_the_family_layer_list(tmp_path):
    params = lokr(4, 4, 80, 80, seed=3, w2="flat", r=2, alpha=2.0, kernel=(3, 3))  # full-size SDXL conv 320x320x3x3
    f = save_adapter(tmp_path / "in.safetensors", {CONV: params})
    result = to_lora(f)
    down = result.tensors[f"{CONV}.lora_down.weight"]
    assert down.shape[1:] == (320, 3, 3) and result.tensors[f"{CONV}.lora_up.weight"].shape[2:] == (1, 1)
    got = _lora_delta(result.tensors, CONV, (320, 320, 3, 3))
    want = ref_delta(params, (320, 320, 3, 3))
    assert (got - want).norm() <= 2e-6 * want.norm()


def test_to_lora_with_rank_reports_true_error(tmp_path):
    params = lokr(8, 4, 8, 4, seed=9)  # full/full: rank up to 16
    f = save_adapter(tmp_path / "in.safetensors", {FF: params})
    result = to_lora(f, rank=4)
    want = ref_delta(params, (4 * C, C))
    got = _lora_delta(result.tensors, FF, (4 * C, C))
    true_err = ((got - want).norm() / want.norm()).item()
    assert result.modules[0].rank == 4
    assert math.isclose(result.overall_error, true_err, rel_tol=1e-4)
    sv = torch.linalg.svdvals(want)
    assert math.isclose(true_err, (sv[4:].square().sum() / sv.square().sum()).sqrt().item(), rel_tol=1e-4)


def test_to_lora_keeps_the_file_layout(tmp_path):
    f = save_adapter(tmp_path / "in.safetensors", {"diffusion_model.input_blocks.4.1.proj_in": loha(C, C, 2, 1.0, seed=1)})
    result = to_lora(f)
    assert set(result.tensors) == {"diffusion_model.input_blocks.4.1.proj_in." + n
                                   for n in ("lora_up.weight", "lora_down.weight", "alpha")}


def test_layout_round_trip_is_lossless(tmp_path):
    mods = {KEY: loha(C, C, 2, 1.0, seed=1), CONV: lokr(4, 2, 4, 4, seed=2, w2="tucker", r=2, kernel=(3, 3)),
            "lora_te2_text_model_encoder_layers_3_mlp_fc1": {"lora_up.weight": torch.randn(32, 2),
                                                             "lora_down.weight": torch.randn(2, 8), "alpha": torch.tensor(1.0)}}
    f = save_adapter(tmp_path / "k.safetensors", mods, metadata={"ss_network_dim": "2"})
    current, path = f, tmp_path / "k.safetensors"
    for layout in ("comfyui", "peft", "lycoris", "kohya"):
        conv = convert_layout(current, layout)
        path = conv.write(tmp_path / f"{layout}.safetensors")
        current = read_adapter(path)
    assert set(current.tensors) == set(f.tensors)
    for k, t in f.tensors.items():
        assert torch.equal(current.tensors[k], t), k
    assert current.metadata["ss_network_dim"] == "2"
    peft = read_adapter(tmp_path / "peft.safetensors").tensors
    assert "text_encoder_2.base_model.model.text_model.encoder.layers.3.mlp.fc1.lora_B.weight" in peft
    assert "base_model.model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.hada_w1_a" in peft


def test_layout_conversion_refuses_unknown_keys(tmp_path):
    f = save_adapter(tmp_path / "x.safetensors", {"lora_unet_nonsense_layer": loha(4, 4, 1, 1.0, seed=1)})
    with pytest.raises(ValueError, match="nonsense"):
        convert_layout(f, "comfyui")
