"""AdapterNetwork on the tiny SDXL/Anima models: selection rules, bad input, optimizer groups."""
from __future__ import annotations

import logging
import re

import pytest

from hadakron.network import NetworkConfig

from helpers import anima, sdxl  # noqa: F401 (fixtures)
from helpers import build_network as build

logging.getLogger("hadakron").setLevel(logging.ERROR)  # LoKr's full-W2 notice on tiny layers


# ---------------------------------------------------------------------------------------- selection
def test_default_counts(sdxl, anima):
    assert build("sdxl", sdxl, algo="loha").counts() == {"unet": 722, "te1": 72, "te2": 192}
    net = build("sdxl", sdxl, algo="lokr", conv_dim=2, conv_alpha=0.5, network_dim=3, network_alpha=2.0)
    assert net.counts() == {"unet": 788, "te1": 72, "te2": 192}
    by = {t.dotted: t for t in net.targets if t.part == "unet"}
    # 3x3 convs take conv_dim/conv_alpha; emb_layers.1 and 1x1 skip_connection take network_dim/alpha
    assert (by["input_blocks.1.0.in_layers.2"].rank, by["input_blocks.1.0.in_layers.2"].alpha) == (2, 0.5)
    assert (by["input_blocks.3.0.op"].rank, by["output_blocks.5.2.conv"].rank) == (2, 2)
    assert (by["input_blocks.4.0.skip_connection"].rank, by["input_blocks.4.0.skip_connection"].alpha) == (3, 2.0)
    assert (by["middle_block.0.emb_layers.1"].rank, by["middle_block.0.emb_layers.1"].alpha) == (3, 2.0)
    assert build("anima", anima).counts() == {"unet": 280, "te": 196}
    assert build("anima", anima, train_llm_adapter=True).counts() == {"unet": 340, "te": 196}
    only_dit = build("anima", {"unet": anima["unet"]}, train_llm_adapter=True)
    assert only_dit.counts() == {"unet": 340}
    assert sum(t.dotted.startswith("llm_adapter.") for t in only_dit.targets) == 60


def test_include_exclude_and_reg_dims(sdxl, anima):
    net = build("anima", {"unet": anima["unet"]}, include_patterns=[r".*adaln_modulation_mlp\.\d", r"final_layer\.linear"],
                exclude_patterns=[r"blocks\.(2[0-7])\..*"])
    # include rescues from user excludes too: the adaLN MLP layers of blocks 20..27 come back
    assert net.counts() == {"unet": 20 * 10 + 28 * 2 + 1}
    assert {t.dotted for t in net.targets} >= {"blocks.0.adaln_modulation_mlp.1", "final_layer.linear"}
    # first matching reg dim wins; reg dim 0 skips; alpha stays network_alpha (also on 3x3 convs)
    net = build("sdxl", {"unet": sdxl["unet"]}, algo="loha", network_dim=4, network_alpha=3.0, conv_dim=2, conv_alpha=1.0,
                network_reg_dims=r"input_blocks\.1\.0\.in_layers\.2=5,input_blocks\..*=6,middle_block\..*=0")
    by = {t.dotted: t for t in net.targets}
    assert (by["input_blocks.1.0.in_layers.2"].rank, by["input_blocks.1.0.in_layers.2"].alpha) == (5, 3.0)
    assert by["input_blocks.1.0.in_layers.2"].adapter.hada_w1_b.shape[0] == 5
    assert by["input_blocks.4.1.transformer_blocks.0.attn1.to_q"].rank == 6
    assert by["output_blocks.2.2.conv"].rank == 2 and by["output_blocks.0.1.proj_in"].rank == 4
    assert not any(d.startswith("middle_block.") for d in by)
    assert net.counts()["unet"] == 788 - (102 + 2 * 3)
    # each module keeps its own alpha in the file
    sd = net.file_state_dict()
    assert float(sd["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 3.0
    assert float(sd["lora_unet_output_blocks_2_2_conv.alpha"]) == 1.0


def test_bad_input_is_reported(sdxl, anima):
    with pytest.raises(ValueError, match=r"exclude_patterns: invalid regular expression '\[bad'"):
        NetworkConfig(exclude_patterns=["[bad"])
    with pytest.raises(ValueError, match=r"network_reg_dims: entry 'blocks' is not 'regex=value'"):
        NetworkConfig(network_reg_dims="blocks")
    with pytest.raises(ValueError, match=re.escape(r"network_reg_lrs: value 'fast' for 'blocks\.0\..*' is not a float")):
        NetworkConfig(network_reg_lrs={r"blocks\.0\..*": "fast"})
    with pytest.raises(ValueError, match=r"network_reg_dims: invalid regular expression '\('"):
        NetworkConfig(network_reg_dims="(=4")
    with pytest.raises(ValueError, match="algo must be one of"):
        NetworkConfig(algo="lora")
    with pytest.raises(ValueError, match=r"anima: unknown part 'te1'"):
        build("anima", {"te1": anima["te"]})
    with pytest.raises(ValueError, match=r"Anima te: the given module has none of the Qwen3-0.6B text encoder's layer names"):
        build("anima", {"te": sdxl["te1"]})
    with pytest.raises(ValueError, match=r"Anima te: no layer selected"):
        build("anima", {"te": anima["te"]}, exclude_patterns=[r"layers\..*"])
    with pytest.raises(ValueError, match=r"is the same module as te1:"), \
            pytest.warns(UserWarning, match=r"SDXL te2: 120 of 192 selected layers are not in the given module"):
        build("sdxl", {"te1": sdxl["te1"], "te2": sdxl["te1"]})
    with pytest.warns(UserWarning, match=re.escape(r"exclude_patterns: pattern 'blocks\.99\..*' matches no layer")):
        build("anima", {"unet": anima["unet"]}, exclude_patterns=[r"blocks\.99\..*"])
    with pytest.warns(UserWarning, match=re.escape(r"include_patterns: pattern 'blocks\.0\.mlp\.layer1' matches no excluded layer")):
        build("anima", {"unet": anima["unet"]}, include_patterns=[r"blocks\.0\.mlp\.layer1"])
    with pytest.warns(UserWarning, match=re.escape(r"network_reg_lrs: pattern 'input_blocks\..*' matches no layer")):
        build("anima", {"te": anima["te"]}, network_reg_lrs={r"input_blocks\..*": 1e-3})


# ---------------------------------------------------------------------------------------- optimizer groups
def test_param_groups_sdxl(sdxl):
    net = build("sdxl", sdxl, algo="loha", network_dim=2,
                network_reg_lrs={r"middle_block\..*": 5e-4, r"text_model\.encoder\.layers\.(0|1)\..*": 0.0},
                loraplus_unet_lr_ratio=4.0, loraplus_lr_ratio=2.0)
    groups = net.param_groups(unet_lr=1e-3, te_lr=[1e-5, 2e-5], default_lr=9.0)
    desc = [(g["description"], g["lr"]) for g in groups]
    assert desc == [("textencoder 1", 1e-5), ("textencoder 1 plus", 2e-5),
                    ("textencoder 2", 2e-5), ("textencoder 2 plus", 4e-5),
                    ("unet reg_lr_0", 5e-4), ("unet reg_lr_0 plus", 2e-3), ("unet", 1e-3), ("unet plus", 4e-3)]
    by = {g["description"]: g for g in groups}
    params = dict(net.named_parameters())
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(params["adapters." + n]) for n in g["names"]]
    assert all(n.endswith(".hada_w2_a") for g in groups if g["kind"] == "plus" for n in g["names"])
    assert all(not n.endswith(".hada_w2_a") for g in groups if g["kind"] == "lora" for n in g["names"])
    # reg lr 0 drops te layers 0 and 1 (in both encoders): 2 layers x 6 modules x 4 tensors are not trained
    assert len(by["textencoder 1"]["names"]) + len(by["textencoder 1 plus"]["names"]) == (12 - 2) * 6 * 4
    assert not any(".layers_0_" in n or "layers_1_" in n for g in groups for n in g["names"] if "_te" in n)
    assert len(by["unet reg_lr_0"]["names"]) == 102 * 3 and all(n.startswith("lora_unet_middle_block_") for n in by["unet reg_lr_0"]["names"])
    assert len(by["unet plus"]["names"]) == 722 - 102
    total = sum(len(g["params"]) for g in groups)
    assert total == len(params) - 2 * 2 * 6 * 4
    # te lr 0 leaves the text encoders out; no ratio -> no plus groups
    plain = build("sdxl", sdxl, algo="loha", network_dim=2)
    groups = plain.param_groups(unet_lr=None, te_lr=0.0, default_lr=1e-4)
    assert [(g["description"], g["lr"]) for g in groups] == [("unet", 1e-4)]
    assert len(groups[0]["params"]) == 722 * 4


def test_param_groups_anima_lokr(anima):
    net = build("anima", anima, algo="lokr", network_dim=2, decompose_both=True, train_llm_adapter=True,
                loraplus_text_encoder_lr_ratio=8.0)
    groups = net.param_groups(unet_lr=1e-4, te_lr={"te": 3e-5})
    assert [(g["description"], g["lr"]) for g in groups] == [("textencoder 1", 3e-5), ("textencoder 1 plus", 2.4e-4),
                                                             ("unet", 1e-4)]
    plus = groups[1]["names"]
    assert plus and all(n.split(".")[-1].startswith("lokr_w1") for n in plus)
    assert all(n.startswith("lora_te_") for n in plus)
    assert len(groups[2]["names"]) == sum(len(list(t.adapter.parameters())) for t in net.targets if t.part == "unet")


def test_network_args_round_trip():
    cfg = NetworkConfig(algo="lokr", network_dim=8, network_alpha=4.0, conv_dim=4, factor=8, decompose_both=True,
                        exclude_patterns=[r".*\.mlp\..*"], include_patterns=[r"blocks\.0\.mlp\.layer1"],
                        network_reg_dims={r"blocks\.(0|1)\..*": 16, r"layers\..*": 2},
                        network_reg_lrs={r"blocks\.27\..*": 5e-5}, train_llm_adapter=True, loraplus_lr_ratio=4.0)
    args = cfg.network_args()
    assert args["conv_dim"] == "4" and args["conv_alpha"] == "1.0" and args["decompose_both"] == "true"
    assert args["network_reg_dims"] == r"blocks\.(0|1)\..*=16,layers\..*=2"
    assert "use_tucker" not in args and "rank_dropout" not in args
    back = NetworkConfig.from_network_args(args, network_dim=8, network_alpha=4.0)
    assert back == cfg
    # sd-scripts' own strings (as in ss_network_args), with its ignored "dropout"
    sd = NetworkConfig.from_network_args({"conv_dim": "8", "use_tucker": "True", "dropout": None,
                                          "exclude_patterns": "['.*attn2.*']", "network_reg_lrs": "a=1e-4,b=2e-4"},
                                         algo="loha", network_dim=16, network_alpha=8)
    assert (sd.conv_dim, sd.conv_alpha, sd.use_tucker, sd.exclude_patterns) == (8, 1.0, True, [".*attn2.*"])
    assert sd.network_reg_lrs == {"a": 1e-4, "b": 2e-4}
    with pytest.raises(ValueError, match="network_args: unknown key 'block_dims'"):
        NetworkConfig.from_network_args({"block_dims": "2,2,2"})
    with pytest.raises(ValueError, match=r"network_args: conv_dim='eight' is not a int"):
        NetworkConfig.from_network_args({"conv_dim": "eight"})


def test_patterns_from_the_multiline_widget_are_one_regex_per_line():
    """The trainer's exclude/include widgets are multiline, one regex per line: each line is its own pattern (read as
    one regex holding a line break, they matched no layer and excluded nothing)."""
    config = NetworkConfig(exclude_patterns=".*attn1.*\n\n  .*ff.*  \n", include_patterns=".*attn1.to_q")
    assert config.exclude_patterns == [".*attn1.*", ".*ff.*"]
    assert config.include_patterns == [".*attn1.to_q"]
    assert NetworkConfig(exclude_patterns="['.*a.*', '.*b.*']").exclude_patterns == [".*a.*", ".*b.*"]
