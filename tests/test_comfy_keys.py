"""ComfyUI key naming for (part, dotted) layers (pure strings, no ComfyUI needed)."""
import pytest

from hadakron.comfy_keys import comfy_weight_key, is_clip_part, layer_shapes


def test_weight_keys():
    assert comfy_weight_key("sdxl", "unet", "input_blocks.4.1.proj_in") == "diffusion_model.input_blocks.4.1.proj_in.weight"
    assert comfy_weight_key("sdxl", "te1", "text_model.encoder.layers.0.mlp.fc1") == \
        "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert comfy_weight_key("sdxl", "te2", "text_projection") == "clip_g.transformer.text_projection.weight"
    assert comfy_weight_key("anima", "te", "layers.3.mlp.up_proj") == "qwen3_06b.transformer.model.layers.3.mlp.up_proj.weight"
    assert comfy_weight_key("anima", "unet", "blocks.0.self_attn.q_proj") == "diffusion_model.blocks.0.self_attn.q_proj.weight"
    assert is_clip_part("sdxl", "te2") and not is_clip_part("anima", "unet")
    with pytest.raises(ValueError, match="no ComfyUI prefix"):
        comfy_weight_key("anima", "te1", "x")


def test_layer_shapes_from_state_dict_shapes():
    sd = {"diffusion_model.input_blocks.1.0.in_layers.2.weight": (4, 4, 3, 3),
          "diffusion_model.input_blocks.1.0.in_layers.2.bias": (4,),
          "diffusion_model.out.0.weight": (4,),  # a norm: 1-D, not adaptable
          "model_sampling.sigmas": (1000,)}
    assert layer_shapes("sdxl", sd, clip=False) == {("unet", "input_blocks.1.0.in_layers.2"): (4, 4, 3, 3)}
    csd = {"clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (8, 4),
           "clip_g.transformer.text_projection.weight": (6, 6),
           "clip_g.transformer.text_model.embeddings.position_ids": (1, 77)}
    assert layer_shapes("sdxl", csd, clip=True) == {("te1", "text_model.encoder.layers.0.mlp.fc1"): (8, 4),
                                                     ("te2", "text_projection"): (6, 6)}
