"""Key layouts: split_key, known spellings, the SGM <-> diffusers table, and lossless round trips."""
from __future__ import annotations

import re

import pytest

from hadakron.arch import (
    ANIMA, DIFFUSERS_TO_SGM, LAYOUTS, SDXL, convert_key, convert_state_dict, file_key, module_key,
    parse_keys, parse_module_key, split_key,
)


def layouts_of(family: str) -> list[str]:
    return [lay for lay in LAYOUTS if not (family == "anima" and lay == "diffusers")]


def all_keys(family, layout, params=("hada_w1_a", "alpha")):
    fam = SDXL if family == "sdxl" else ANIMA
    return {file_key(fam, part, d, p, layout): (part, d, p) for part in fam.parts for d in fam.layers[part] for p in params}


def test_split_key():
    assert split_key("lora_unet_blocks_0_mlp_layer1.hada_w1_a") == ("lora_unet_blocks_0_mlp_layer1", "hada_w1_a")
    assert split_key("lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w2_b") == (
        "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lokr_w2_b")
    assert split_key("x.lora_up.weight") == ("x", "lora_up.weight")
    assert split_key("x.lora_down.weight") == ("x", "lora_down.weight")
    assert split_key("x.lora_mid.weight") == ("x", "lora_mid.weight")
    assert split_key("base_model.model.blocks.0.mlp.layer1.lora_A.weight") == ("base_model.model.blocks.0.mlp.layer1", "lora_down.weight")
    assert split_key("base_model.model.blocks.0.mlp.layer1.lora_B.weight") == ("base_model.model.blocks.0.mlp.layer1", "lora_up.weight")
    assert split_key("unet.a.to_q_lora.up.weight") == ("unet.a.to_q", "lora_up.weight")
    assert split_key("m.dora_scale") == ("m", "dora_scale")
    for p in ("hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
              "lokr_w2", "lokr_w2_a", "lokr_t2", "alpha"):
        assert split_key(f"lora_unet_a_b.{p}") == ("lora_unet_a_b", p)
    with pytest.raises(ValueError, match=r"key 'lora_unet_a\.weird' ends in no known adapter tensor name"):
        split_key("lora_unet_a.weird")


def test_known_spellings_sdxl():
    q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    cases = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("unet", q, "kohya"),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": ("unet", q, "diffusers"),
        "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": ("unet", q, "lycoris"),
        "lycoris_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("unet", q, "lycoris"),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q": ("unet", q, "diffusers"),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": ("unet", q, "diffusers"),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out": (
            "unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0", "diffusers"),
        "diffusion_model." + q: ("unet", q, "comfyui"),
        "base_model.model." + q: ("unet", q, "peft"),
        "unet.base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": ("unet", q, "peft"),
        "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "input_blocks.1.0.in_layers.2", "kohya"),
        "lora_unet_middle_block_1_proj_in": ("unet", "middle_block.1.proj_in", "kohya"),
        "lora_unet_output_blocks_2_2_conv": ("unet", "output_blocks.2.2.conv", "kohya"),
        "lora_unet_label_emb_0_0": ("unet", "label_emb.0.0", "kohya"),
        "lora_unet_class_embedding_linear_1": ("unet", "label_emb.0.0", "diffusers"),
        "unet.add_embedding.linear_2": ("unet", "label_emb.0.2", "diffusers"),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("te1", "text_model.encoder.layers.0.self_attn.q_proj", "kohya"),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("te1", "text_model.encoder.layers.0.self_attn.q_proj", "kohya"),
        "lora_te2_text_model_encoder_layers_31_mlp_fc2": ("te2", "text_model.encoder.layers.31.mlp.fc2", "kohya"),
        "lora_te2_text_projection": ("te2", "text_projection", "kohya"),
        "clip_l.transformer.text_model.encoder.layers.3.mlp.fc1": ("te1", "text_model.encoder.layers.3.mlp.fc1", "comfyui"),
        "text_encoders.clip_g.transformer.text_model.encoder.layers.3.mlp.fc1": ("te2", "text_model.encoder.layers.3.mlp.fc1", "comfyui"),
        "text_encoder.text_model.encoder.layers.3.mlp.fc1": ("te1", "text_model.encoder.layers.3.mlp.fc1", "diffusers"),
        "text_encoder_2.text_model.encoder.layers.3.mlp.fc1": ("te2", "text_model.encoder.layers.3.mlp.fc1", "diffusers"),
        "base_model.model.text_model.encoder.layers.20.mlp.fc1": ("te2", "text_model.encoder.layers.20.mlp.fc1", "peft"),
    }
    for key, (part, dotted, layout) in cases.items():
        assert parse_module_key(key) == ("sdxl", part, dotted, layout), key


def test_known_spellings_anima():
    cases = {
        "lora_unet_blocks_0_self_attn_q_proj": ("unet", "blocks.0.self_attn.q_proj", "kohya"),
        "lora_unet_llm_adapter_blocks_0_mlp_0": ("unet", "llm_adapter.blocks.0.mlp.0", "kohya"),
        "lora_unet_blocks_3_adaln_modulation_self_attn_1": ("unet", "blocks.3.adaln_modulation_self_attn.1", "kohya"),
        "lora_unet_t_embedder_1_linear_1": ("unet", "t_embedder.1.linear_1", "kohya"),
        "lora_unet_final_layer_adaln_modulation_2": ("unet", "final_layer.adaln_modulation.2", "kohya"),
        "lora_te_layers_0_mlp_down_proj": ("te", "layers.0.mlp.down_proj", "kohya"),
        "diffusion_model.blocks.0.self_attn.q_proj": ("unet", "blocks.0.self_attn.q_proj", "comfyui"),
        "text_encoders.qwen3_06b.transformer.model.layers.0.mlp.down_proj": ("te", "layers.0.mlp.down_proj", "comfyui"),
        "text_encoders.transformer.model.layers.0.mlp.down_proj": ("te", "layers.0.mlp.down_proj", "comfyui"),
        "lycoris_blocks_27_mlp_layer2": ("unet", "blocks.27.mlp.layer2", "lycoris"),
        "base_model.model.blocks.27.mlp.layer2": ("unet", "blocks.27.mlp.layer2", "peft"),
        "base_model.model.layers.27.mlp.up_proj": ("te", "layers.27.mlp.up_proj", "peft"),
    }
    for key, (part, dotted, layout) in cases.items():
        assert parse_module_key(key) == ("anima", part, dotted, layout), key
    # sd-scripts' convert_anima_lora_to_comfy examples
    assert convert_key("lora_unet_blocks_0_self_attn_q_proj.hada_w1_a", "comfyui") == \
        "diffusion_model.blocks.0.self_attn.q_proj.hada_w1_a"
    assert convert_key("lora_te_layers_0_mlp_down_proj.lokr_w1", "comfyui") == \
        "text_encoders.qwen3_06b.transformer.model.layers.0.mlp.down_proj.lokr_w1"
    assert convert_key("lora_unet_llm_adapter_blocks_0_mlp_0.alpha", "comfyui") == \
        "diffusion_model.llm_adapter.blocks.0.mlp.0.alpha"
    # the underscores sd-scripts' converter gets wrong come out right here (names, not guesses)
    assert convert_key("lora_unet_blocks_0_adaln_modulation_cross_attn_1.alpha", "comfyui") == \
        "diffusion_model.blocks.0.adaln_modulation_cross_attn.1.alpha"


def test_unknown_names_are_not_guessed():
    assert parse_module_key("lora_unet_blocks_0_self_attn_x_proj") is None  # no such layer in an Anima block
    assert parse_module_key("lora_unet_blocks_07_self_attn_q_proj") is None  # module names have no leading zeros
    assert parse_module_key("lora_unet_llm_adapter_blocks_6_mlp_0") is None  # the llm_adapter has 6 blocks: 0..5
    assert parse_module_key("lora_unet_input_blocks_4_1_transformer_blocks_2_attn1_to_q") is None  # depth 2
    assert parse_module_key("lora_te1_text_model_encoder_layers_12_mlp_fc1") is None  # CLIP-L has 12 layers
    assert parse_module_key("lora_unet_blocks_0_self_attn_q_proj", "sdxl") is None
    assert parse_module_key("lora_transformer_blocks_0_attn_to_q") is None
    with pytest.raises(ValueError, match=r"cannot convert key 'lora_unet_foo\.alpha'"):
        convert_key("lora_unet_foo.alpha", "comfyui")
    with pytest.raises(ValueError, match="diffusers layout has no names for Anima"):
        module_key("anima", "unet", "blocks.0.mlp.layer1", "diffusers")
    with pytest.raises(ValueError, match="unknown layer 'blocks.99.mlp.layer3'"):
        module_key("anima", "unet", "blocks.99.mlp.layer3", "kohya")
    with pytest.raises(ValueError, match="unknown key layout 'onetrainer'"):
        module_key("anima", "unet", "blocks.0.mlp.layer1", "onetrainer")


def _expected_sgm(diff: str) -> str:
    """The SGM name of a diffusers UNet name, by the structural formulas (written independently here)."""
    m = re.fullmatch(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.*)", diff)
    res = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 3 * i + j + 1
        return f"input_blocks.{n}.0.{res[rest]}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv", diff)
    if m:
        return f"input_blocks.{3 * int(m[1]) + 3}.0.op"
    m = re.fullmatch(r"mid_block\.resnets\.(\d)\.(.*)", diff)
    if m:
        return f"middle_block.{2 * int(m[1])}.{res[m[2]]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.*)", diff)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.*)", diff)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 3 * i + j
        return f"output_blocks.{n}.0.{res[rest]}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv", diff)
    if m:
        return f"output_blocks.{3 * int(m[1]) + 2}.2.conv"
    return {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_out": "out.2"}[diff]


def test_diffusers_table_follows_the_structure():
    # (also checked once against ComfyUI v0.29's comfy.utils.unet_to_diffusers for SDXL: 794 of 794 agree)
    assert len(DIFFUSERS_TO_SGM) == len(SDXL.layers["unet"]) == 794
    assert set(DIFFUSERS_TO_SGM.values()) == set(SDXL.layers["unet"])
    for diff, sgm in DIFFUSERS_TO_SGM.items():
        assert _expected_sgm(diff) == sgm, diff
    # ComfyUI's examples
    ex = {"down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
          "up_blocks.0.attentions.2.proj_in": "output_blocks.2.1.proj_in",
          "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
          "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
          "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
          "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op"}
    for diff, sgm in ex.items():
        assert DIFFUSERS_TO_SGM[diff] == sgm


@pytest.mark.parametrize("family", ["sdxl", "anima"])
def test_every_layout_to_every_other_and_back(family):
    layouts = layouts_of(family)
    originals = {lay: all_keys(family, lay, ("hada_w1_a", "lora_up.weight", "alpha")) for lay in layouts}
    for src in layouts:
        keys = originals[src]
        assert len(set(keys)) == len(keys)
        for dst in layouts:
            there = convert_state_dict({k: k for k in keys}, dst, family)
            assert set(there) == set(originals[dst]), (src, dst)
            back = convert_state_dict(there, src, family)
            assert back == {k: k for k in keys}, (src, dst)  # same keys, each value back at its own key
        parsed, unknown = parse_keys(keys)
        assert not unknown
        assert {p.key: (p.part, p.dotted, p.param) for p in parsed} == keys
        # lycoris files name text encoders the kohya way (LyCORIS' own kohya wrapper does)
        assert {p.layout for p in parsed} == ({"lycoris", "kohya"} if src == "lycoris" else {src})


def test_lora_tensors_spelled_per_layout():
    q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert file_key("sdxl", "unet", q, "lora_up.weight", "peft") == f"base_model.model.{q}.lora_B.weight"
    assert file_key("sdxl", "unet", q, "lora_down.weight", "diffusers") == \
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert file_key("sdxl", "unet", q, "lora_down.weight", "kohya").endswith("to_q.lora_down.weight")
    assert file_key("anima", "te", "layers.0.mlp.up_proj", "hada_w2_a", "peft") == \
        "text_encoder.base_model.model.layers.0.mlp.up_proj.hada_w2_a"


def test_colliding_spellings_are_refused():
    with pytest.raises(ValueError, match="collide"):
        convert_state_dict({"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": 1,
                            "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": 2}, "kohya", "sdxl")
