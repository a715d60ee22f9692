"""Family data: full-size names and shapes, sd-scripts target counts, selection rules, block labels."""
from __future__ import annotations

import re

import pytest
from torch import nn

from hadakron.arch import ANIMA, SDXL, get_family
from tests.models import adaptable_layers, anima_parts, full_size_layers, full_size_parts_on_meta, sdxl_parts

# sd-scripts' target class names, and the classes of our test models that play them
SD_SCRIPTS_TARGETS = {
    "sdxl": {"unet": ["SpatialTransformer"], "unet_conv": ["ResBlock", "Downsample", "Upsample"],
             "te1": ["CLIPAttention", "CLIPMLP"], "te2": ["CLIPAttention", "CLIPMLP"]},
    "anima": {"unet": ["Block", "PatchEmbed", "TimestepEmbedding", "FinalLayer"],
              "unet_llm": ["LLMAdapterTransformerBlock"], "te": ["Qwen3Attention", "Qwen3MLP"]},
}


def sd_scripts_walk(root: nn.Module, classes: list[str], conv: bool, excludes=(), includes=()) -> list[str]:
    """An independent re-telling of sd-scripts' create_modules on a live model (class-name walk)."""
    out = []
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)) or not child_name:
                continue
            original = f"{name}.{child_name}"
            excluded = any(re.fullmatch(p, original) for p in excludes)
            if excluded and not any(re.fullmatch(p, original) for p in includes):
                continue
            is_small = isinstance(child, nn.Linear) or child.kernel_size == (1, 1)
            if is_small or conv:
                out.append(original)
    return out


@pytest.fixture(scope="module")
def meta_models():
    return {"sdxl": full_size_parts_on_meta("sdxl"), "anima": full_size_parts_on_meta("anima")}


@pytest.mark.parametrize("family", ["sdxl", "anima"])
def test_full_size_shapes_match_the_real_structure(family, meta_models):
    fam = get_family(family)
    for part, model in meta_models[family].items():
        assert adaptable_layers(model) == fam.layer_shapes(part), part


def test_full_size_layer_lists():
    # every known Linear/Conv2d: SDXL UNet 722 transformer + 66 conv-mode + 6 never targeted (time/label emb,
    # conv_in, out.2); CLIP-G adds text_projection; Anima 28x16 block + 6 embed/final + 60 adapter + out_proj
    sizes = {(f, p): len(full_size_layers(f, p)) for f, p in
             [("sdxl", "unet"), ("sdxl", "te1"), ("sdxl", "te2"), ("anima", "unet"), ("anima", "te")]}
    assert sizes == {("sdxl", "unet"): 722 + 66 + 6, ("sdxl", "te1"): 72, ("sdxl", "te2"): 193,
                     ("anima", "unet"): 28 * 16 + 6 + 60 + 1, ("anima", "te"): 196}
    n_params = sum(s[0] * s[1] * (s[2] * s[3] if len(s) == 4 else 1) for s in full_size_layers("anima", "unet").values())
    assert n_params == 28 * (4 * 2048 * 2048 + 2 * 2048 * 2048 + 2 * 2048 * 1024 + 2 * 8192 * 2048
                             + 3 * (256 * 2048 + 6144 * 256)) \
        + 2048 * 68 + 2048 * 2048 + 6144 * 2048 + 64 * 2048 + 256 * 2048 + 4096 * 256 \
        + 6 * (8 * 1024 * 1024 + 2 * 4096 * 1024) + 1024 * 1024


def test_known_full_size_shapes():
    u = SDXL.layer_shapes("unet")
    assert u["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == (640, 640)
    assert u["middle_block.1.transformer_blocks.0.attn2.to_k"] == (1280, 2048)
    assert u["output_blocks.2.1.transformer_blocks.9.ff.net.0.proj"] == (10240, 1280)
    assert u["input_blocks.1.0.in_layers.2"] == (320, 320, 3, 3)  # flat LoHa b is (r, 2880)
    assert u["output_blocks.0.0.skip_connection"] == (1280, 2560, 1, 1)
    assert u["input_blocks.3.0.op"] == (320, 320, 3, 3)
    assert u["output_blocks.5.2.conv"] == (640, 640, 3, 3)
    assert SDXL.layer_shapes("te2")["text_model.encoder.layers.31.mlp.fc2"] == (1280, 5120)
    assert SDXL.layer_shapes("te1")["text_model.encoder.layers.0.self_attn.q_proj"] == (768, 768)
    d = ANIMA.layer_shapes("unet")
    assert d["blocks.0.cross_attn.k_proj"] == (2048, 1024)
    assert d["blocks.27.mlp.layer2"] == (2048, 8192)
    assert d["x_embedder.proj.1"] == (2048, 68)
    assert d["final_layer.adaln_modulation.2"] == (4096, 256)
    assert d["llm_adapter.blocks.5.mlp.0"] == (4096, 1024)
    t = ANIMA.layer_shapes("te")
    assert t["layers.0.self_attn.q_proj"] == (2048, 1024) and t["layers.27.mlp.down_proj"] == (1024, 3072)


def test_default_counts_as_sd_scripts():
    assert len(SDXL.default_targets("unet")) == 722
    assert len(SDXL.default_targets("te1")) + len(SDXL.default_targets("te2")) == 72 + 192 == 264
    assert len(ANIMA.default_targets("unet")) == 280
    assert len(ANIMA.default_targets("unet", train_llm_adapter=True)) == 280 + 60
    assert len(ANIMA.default_targets("te")) == 196
    # conv_dim: 17 ResBlocks x (in_layers.2, out_layers.3, emb_layers.1) + 11 channel-changing skips
    # (input_blocks.4/7 and all 9 output blocks) + 2 Downsample + 2 Upsample = 66
    assert len(SDXL.default_targets("unet", conv=True)) == 722 + 17 * 3 + 11 + 2 + 2 == 788
    # options without effect: conv on Anima/CLIP, llm adapter on SDXL
    assert len(ANIMA.default_targets("unet", conv=True)) == 280
    assert len(SDXL.default_targets("unet", train_llm_adapter=True)) == 722
    assert len(SDXL.default_targets("te2", conv=True)) == 192


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("llm", [False, True])
def test_selection_equals_sd_scripts_walk(conv, llm, meta_models):
    sd = meta_models["sdxl"]
    want = sd_scripts_walk(sd["unet"], SD_SCRIPTS_TARGETS["sdxl"]["unet"]
                           + (SD_SCRIPTS_TARGETS["sdxl"]["unet_conv"] if conv else []), conv)
    assert sorted(SDXL.select("unet", conv=conv, train_llm_adapter=llm)) == sorted(want)
    for part in ("te1", "te2"):
        assert sorted(SDXL.select(part, conv=conv)) == sorted(
            sd_scripts_walk(sd[part], SD_SCRIPTS_TARGETS["sdxl"][part], conv))
    an = meta_models["anima"]
    ex = ANIMA.default_excludes
    classes = SD_SCRIPTS_TARGETS["anima"]["unet"] + (SD_SCRIPTS_TARGETS["anima"]["unet_llm"] if llm else [])
    assert sorted(ANIMA.select("unet", conv=conv, train_llm_adapter=llm)) == sorted(
        sd_scripts_walk(an["unet"], classes, conv, ex))
    assert sorted(ANIMA.select("te")) == sorted(sd_scripts_walk(an["te"], SD_SCRIPTS_TARGETS["anima"]["te"], conv, ex))


def test_include_rescues_and_user_excludes(meta_models):
    inc = [r".*adaln_modulation_mlp.*", r"x_embedder\..*", r"final_layer\.linear"]
    got = ANIMA.select("unet", include_patterns=inc)
    assert len(got) == 280 + 28 * 2 + 1 + 1
    assert "blocks.3.adaln_modulation_mlp.2" in got and "final_layer.adaln_modulation.1" not in got
    want = sd_scripts_walk(meta_models["anima"]["unet"], SD_SCRIPTS_TARGETS["anima"]["unet"], False,
                           ANIMA.default_excludes, inc)
    assert sorted(got) == sorted(want)
    # include only rescues: it does not narrow the selection
    assert len(ANIMA.select("unet", include_patterns=[r"blocks\.0\.mlp\..*"])) == 280
    assert len(ANIMA.select("unet", include_patterns=[r"blocks\.0\..*"])) == 280 + 6  # its 6 adaLN rescued
    # user excludes add to the default ones (fullmatch on the unprefixed dotted name)
    got = ANIMA.select("unet", exclude_patterns=[r".*\.mlp\..*"])
    assert len(got) == 28 * 8
    assert len(SDXL.select("unet", exclude_patterns=[r"output_blocks\..*"])) == 722 - 3 * 102 - 3 * 22
    assert len(SDXL.select("te1", exclude_patterns=[r"text_model\.encoder\.layers\.(1[01])\..*"])) == 60


def test_bad_patterns_and_parts():
    with pytest.raises(ValueError, match=r"exclude_patterns: invalid regular expression '\(unclosed'"):
        SDXL.select("unet", exclude_patterns=["(unclosed"])
    with pytest.raises(ValueError, match=r"include_patterns: invalid regular expression"):
        ANIMA.select("unet", include_patterns=["[x"])
    with pytest.raises(ValueError, match=r"anima: unknown part 'te1'; this family has parts \['unet', 'te'\]"):
        ANIMA.layer_shapes("te1")
    with pytest.raises(ValueError, match="unknown model family 'flux'"):
        get_family("flux")


def test_block_labels():
    b = SDXL.block_of
    assert b("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q") == "IN04"
    assert b("unet", "input_blocks.3.0.op") == "IN03"
    assert b("unet", "middle_block.1.proj_in") == "M00"
    assert b("unet", "output_blocks.5.2.conv") == "OUT05"
    assert b("unet", "time_embed.0") == "OTHER"
    assert b("te1", "text_model.encoder.layers.0.mlp.fc1") == "TE1"
    assert b("te2", "text_model.encoder.layers.0.mlp.fc1") == "TE2"
    a = ANIMA.block_of
    assert a("unet", "blocks.7.mlp.layer1") == "blocks.7"
    assert a("unet", "blocks.51.mlp.layer1") == "blocks.51"  # deeper checkpoints: any depth
    assert a("unet", "llm_adapter.blocks.2.mlp.0") == "llm_adapter"
    assert a("unet", "x_embedder.proj.1") == "OTHER"
    assert a("te", "layers.3.mlp.up_proj") == "te"
    labels = {b("unet", d) for d in SDXL.default_targets("unet", conv=True)}
    assert labels == {"IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00"} | {
        f"OUT{i:02d}" for i in range(9)}


def test_tiny_models_have_the_real_names():
    """The CPU test models carry every full-size name (narrow widths, same kernels)."""
    for family, parts in (("sdxl", sdxl_parts()), ("anima", anima_parts())):
        fam = get_family(family)
        for part, model in parts.items():
            live = adaptable_layers(model)
            full = fam.layer_shapes(part)
            assert set(live) == set(full), (family, part)
            for name, shape in full.items():
                assert len(live[name]) == len(shape) and live[name][2:] == shape[2:], name
