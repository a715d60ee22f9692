"""Detection of family, parts and layout from a file's keys and from a live model's module names."""
from __future__ import annotations

import pytest
from torch import nn

from hadakron.arch import ANIMA, LAYOUTS, SDXL, detect_family, detect_model_family, file_key
from tests.models import AnimaDiT, CLIPConfig, CLIPTextModel, Qwen3Model, SDXLUNet, anima_parts, sdxl_parts


def default_file(family: str, layout: str, params=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"),
                 parts=None, llm: bool = False) -> list[str]:
    fam = SDXL if family == "sdxl" else ANIMA
    keys = []
    for part in parts or fam.parts:
        for d in fam.default_targets(part, train_llm_adapter=llm):
            keys += [file_key(fam, part, d, p, layout) for p in params]
    return keys


@pytest.mark.parametrize("family,layout", [(f, lay) for f in ("sdxl", "anima") for lay in LAYOUTS
                                            if not (f == "anima" and lay == "diffusers")])  # no diffusers Anima
def test_file_family_parts_layout(family, layout):
    r = detect_family(default_file(family, layout))
    assert r.family == family
    assert r.layout == layout
    if family == "sdxl":
        assert r.parts == ("unet", "te1", "te2")
        assert r.counts["sdxl"] == {"unet": 722, "te1": 72, "te2": 192}
    else:
        assert r.parts == ("unet", "te")
        assert r.counts["anima"] == {"unet": 280, "te": 196}
    assert r.algorithms == {"loha": sum(r.counts[family].values())}
    assert not r.unknown
    assert r.counts["anima" if family == "sdxl" else "sdxl"] == {p: 0 for p in (ANIMA if family == "sdxl" else SDXL).parts}


def test_parts_subset_and_summary():
    r = detect_family(default_file("anima", "kohya", ("lokr_w1", "lokr_w2", "alpha"), parts=["unet"], llm=True))
    assert (r.family, r.parts, r.layout) == ("anima", ("unet",), "kohya")
    assert r.counts["anima"]["unet"] == 340 and r.algorithms == {"lokr": 340}
    assert r.summary() == "Anima: DiT (340); layout kohya (lora_unet_/lora_te*_); 340 LoKr"
    r = detect_family(default_file("sdxl", "comfyui", parts=["te2"]))
    assert r.parts == ("te2",) and r.counts["sdxl"]["te2"] == 192


def test_sdxl_file_given_to_anima_says_so():
    r = detect_family(default_file("sdxl", "kohya"))
    with pytest.raises(ValueError) as e:
        r.require(family="anima")
    msg = str(e.value)
    assert "is not an Anima adapter" in msg
    assert "722 SDXL UNet modules (e.g. input_blocks." in msg
    assert "72 SDXL CLIP-L text encoder modules" in msg and "none of Anima's" in msg
    r.require(family="sdxl")  # no error


def test_lora_file_where_loha_or_lokr_was_asked():
    r = detect_family(default_file("sdxl", "kohya", ("lora_up.weight", "lora_down.weight", "alpha"), parts=["unet"]))
    assert r.algorithms == {"lora": 722}
    with pytest.raises(ValueError, match=r"file holds 722 LoRA modules \(lora_up/lora_down\), no LoHa/LoKr modules"):
        r.require(family="sdxl", algorithms={"loha", "lokr"})
    r.require(algorithms={"lora"})
    peft = detect_family(default_file("anima", "peft", ("lora_A.weight", "lora_B.weight"), parts=["unet"]))
    assert peft.layout == "peft" and peft.algorithms == {"lora": 280}


def test_unknown_and_mixed_files():
    r = detect_family(["foo.lora_up.weight", "transformer.x.alpha"])
    assert r.family is None and "none of 2 keys names a layer of SDXL or Anima" in r.reasons[0]
    with pytest.raises(ValueError, match="no key names a layer of Anima"):
        r.require(family="anima")
    keys = default_file("anima", "kohya", parts=["unet"]) + default_file("anima", "comfyui", parts=["te"])
    r = detect_family(keys + ["lora_unet_blocks_99_mlp_layer3.alpha"])  # blocks.N has no mlp.layer3
    assert r.family == "anima" and r.layout == "kohya"
    assert any("keys mix layouts: 1400 kohya, 980 comfyui" in x for x in r.reasons)
    assert r.unknown == ["lora_unet_blocks_99_mlp_layer3.alpha"]
    assert any("1 keys name no known Anima layer" in x for x in r.reasons)


class Wrapper(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            self.add_module(k, v)


def test_live_models():
    sd = sdxl_parts()
    r = detect_model_family(sd["unet"])
    assert (r.family, r.parts, r.prefixes) == ("sdxl", ("unet",), {"unet": ""})
    assert r.counts["sdxl"]["unet"] == 794
    # ComfyUI's BaseModel holds the UNet as `diffusion_model`
    r = detect_model_family(Wrapper(diffusion_model=sd["unet"]).named_modules())
    assert r.family == "sdxl" and r.prefixes == {"unet": "diffusion_model."}
    # CLIP-L vs CLIP-G by coverage; ComfyUI's SDXL clip holds both under clip_l./clip_g.transformer
    assert detect_model_family(sd["te1"]).parts == ("te1",)
    assert detect_model_family(sd["te2"]).parts == ("te2",)
    both = Wrapper(clip_l=Wrapper(transformer=sd["te1"]), clip_g=Wrapper(transformer=sd["te2"]))
    r = detect_model_family(both)
    assert r.parts == ("te1", "te2") and r.prefixes == {"te1": "clip_l.transformer.", "te2": "clip_g.transformer."}
    an = anima_parts()
    r = detect_model_family(Wrapper(diffusion_model=an["unet"]))
    assert (r.family, r.parts) == ("anima", ("unet",)) and r.counts["anima"]["unet"] == 515
    r = detect_model_family(Wrapper(model=an["te"]))  # HF Qwen3ForCausalLM holds the decoder as `model`
    assert (r.family, r.parts, r.prefixes) == ("anima", ("te",), {"te": "model."})
    r = detect_model_family(nn.Sequential(nn.Linear(2, 2)))
    assert r.family is None and "is a known SDXL or Anima layer" in r.reasons[0]


def test_live_model_classes_independent_of_names():
    # only names matter: a fresh tiny model of each kind is found
    assert detect_model_family(SDXLUNet()).family == "sdxl"
    assert detect_model_family(CLIPTextModel(CLIPConfig.large())).parts == ("te1",)
    assert detect_model_family(AnimaDiT()).family == "anima"
    assert detect_model_family(Qwen3Model()).parts == ("te",)
