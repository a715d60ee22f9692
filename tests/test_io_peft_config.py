"""PEFT files: `adapter_config.json` beside `adapter_model.safetensors` decides the scale, exactly as PEFT does.

References are written here from PEFT's formula in float64: LoHa (w1a @ w1b) * (w2a @ w2b) * alpha / r;
LoKr kron(W1, W2) * alpha / r for every form (both factors full too, where the LyCORIS rule is 1);
LoRA B @ A * lora_alpha / r (/ sqrt(r) with use_rslora); r and alpha per module from rank_pattern / alpha_pattern
(first key k, in file order, with re.match(rf"(.*\\.)?({k})$", name)). Tested through `read_adapter`,
which applies the config (`apply_peft_config`) before it checks the modules.
"""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from hadakron import ops
from hadakron.io import AdapterFile, AdapterFileError, read_adapter
from hadakron.io.module_checks import group_modules, module_problems
from hadakron.io.peft_config import find_peft_config, peft_config_path, peft_module_name
from hadakron.merge import convert_layout

from helpers import one_thread  # noqa: F401  (autouse fixture)

P = "base_model.model."


_SEEDS = itertools.count(1)


def rand(*shape) -> torch.Tensor:
    """float32 normal values, a new seed per call (reproducible in file order)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(next(_SEEDS)), dtype=torch.float64).float()


def write_peft(tmp_path, tensors: dict[str, torch.Tensor], config: dict | None, name="adapter_model.safetensors",
               metadata: dict | None = None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return path


def read_with_config(path):
    """(raw, tensors, modules, problems): `read_adapter(path)` (which applies the config beside the file) and `raw`,
    the same file read from a folder without that config."""
    import shutil

    raw_dir = path.parent / "without_config"
    raw_dir.mkdir(exist_ok=True)
    shutil.copy(path, raw_dir / path.name)
    raw = read_adapter(raw_dir / path.name)
    af = read_adapter(path)
    return raw, af.tensors, af.modules, af.problems


def delta64(params) -> torch.Tensor:
    return ops.delta_weight(params, dtype=torch.float64).reshape(-1)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return bool((a.double() - b.double()).norm() <= rtol * b.double().norm())


# ----------------------------------------------------------------------------------------------- LoHa
LOHA_CONFIG = {
    "peft_type": "LOHA", "r": 4, "alpha": 6, "rank_dropout": 0.0, "module_dropout": 0.0,
    "rank_pattern": {"blocks.1.mlp.layer1": 2},          # suffix match
    "alpha_pattern": {"^blocks.2.mlp.layer1": 3.5},      # anchored: the name inside the wrapped model
    "target_modules": ["layer1", "q_proj"], "use_effective_conv2d": False,
}
LOHA_MODULES = {  # module name inside the model -> (r, alpha) PEFT uses
    "blocks.0.mlp.layer1": (4, 6.0), "blocks.1.mlp.layer1": (2, 6.0), "blocks.2.mlp.layer1": (4, 3.5),
}


def loha_file(tmp_path, config=LOHA_CONFIG):
    tensors, ref = {}, {}
    for name, (r, alpha) in LOHA_MODULES.items():
        t = {"hada_w1_a": rand(12, r), "hada_w1_b": rand(r, 10), "hada_w2_a": rand(12, r), "hada_w2_b": rand(r, 10)}
        tensors.update({f"{P}{name}.{k}": v for k, v in t.items()})
        d = {k: v.double() for k, v in t.items()}
        ref[P + name] = ((d["hada_w1_a"] @ d["hada_w1_b"]) * (d["hada_w2_a"] @ d["hada_w2_b"]) * alpha / r).reshape(-1)
    return write_peft(tmp_path, tensors, config), ref


def test_peft_loha_gets_exactly_peft_scale(tmp_path):
    path, ref = loha_file(tmp_path)
    af, tensors, modules, problems = read_with_config(path)
    # a clean config adds no warning and answers every "alpha: missing" of the raw read
    assert problems == [p for p in af.problems if "alpha: missing" not in p]
    for key, want in ref.items():
        assert close(delta64(modules[key]), want, 1e-12), key
        assert not close(delta64(af.modules[key]), want, 1e-3)  # without the config: scale 1, not PEFT's
        assert [p for p in module_problems(key, modules[key]) if "alpha" in p] == []
    assert float(modules[P + "blocks.2.mlp.layer1"]["alpha"]) == 3.5
    assert {k: set(v) for k, v in group_modules(tensors).items()} == {k: set(v) for k, v in modules.items()}
    assert all(tensors[f"{k}.{p}"] is t for k, v in modules.items() for p, t in v.items())
    assert af.modules[P + "blocks.0.mlp.layer1"].keys() == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}


def test_converted_peft_file_keeps_peft_delta(tmp_path):
    """Downstream users see plain tensors: convert to kohya names, write, read back: the same delta-W."""
    path, ref = loha_file(tmp_path)
    af, tensors, modules, _ = read_with_config(path)
    conv = convert_layout(AdapterFile(path=None, tensors=tensors, metadata=af.metadata, modules=modules), "kohya")
    out = tmp_path / "converted" / "kohya.safetensors"
    out.parent.mkdir()
    save_file(conv.tensors, str(out))
    back = read_adapter(out)  # no config beside it any more: the scale now lives in the alpha tensors
    for key, want in ref.items():
        kohya = "lora_unet_" + key[len(P):].replace(".", "_")
        assert close(delta64(back.modules[kohya]), want, 1e-12), kohya


# ----------------------------------------------------------------------------------------------- LoKr
LOKR_CONFIG = {
    "peft_type": "LOKR", "r": 4, "alpha": 6, "decompose_both": False, "decompose_factor": -1,
    "rank_pattern": {"blocks.1.mlp.layer1": 16, "blocks.3.mlp.layer1": 2},
    "alpha_pattern": {"blocks.2.mlp.layer1": 2.5},
    "use_effective_conv2d": False, "rank_dropout_scale": False,
}


def lokr_file(tmp_path, config=LOKR_CONFIG):
    """W1 (4, 3) x W2 (8, 6) -> (32, 18). Forms: w2 low-rank; both full (r=16 >= 8/2); alpha_pattern; w1 and w2
    low-rank (decompose_both, r=2)."""
    forms = {
        "blocks.0.mlp.layer1": ({"lokr_w1": rand(4, 3), "lokr_w2_a": rand(8, 4), "lokr_w2_b": rand(4, 6)}, 4, 6.0),
        "blocks.1.mlp.layer1": ({"lokr_w1": rand(4, 3), "lokr_w2": rand(8, 6)}, 16, 6.0),
        "blocks.2.mlp.layer1": ({"lokr_w1": rand(4, 3), "lokr_w2_a": rand(8, 4), "lokr_w2_b": rand(4, 6)}, 4, 2.5),
        "blocks.3.mlp.layer1": ({"lokr_w1_a": rand(4, 2), "lokr_w1_b": rand(2, 3),
                                 "lokr_w2_a": rand(8, 2), "lokr_w2_b": rand(2, 6)}, 2, 6.0),
    }
    tensors, ref = {}, {}
    for name, (t, r, alpha) in forms.items():
        tensors.update({f"{P}{name}.{k}": v for k, v in t.items()})
        d = {k: v.double() for k, v in t.items()}
        w1 = d["lokr_w1"] if "lokr_w1" in d else d["lokr_w1_a"] @ d["lokr_w1_b"]
        w2 = d["lokr_w2"] if "lokr_w2" in d else d["lokr_w2_a"] @ d["lokr_w2_b"]
        ref[P + name] = (torch.kron(w1, w2) * alpha / r).reshape(-1)
    return write_peft(tmp_path, tensors, config), ref


def test_peft_lokr_gets_exactly_peft_scale_full_factors_included(tmp_path):
    path, ref = lokr_file(tmp_path)
    af, tensors, modules, problems = read_with_config(path)
    for key, want in ref.items():
        full = "lokr_w2" in modules[key]
        # the both-full module carries the scale in its smaller factor, computed once in float32
        assert close(delta64(modules[key]), want, 1e-6 if full else 1e-12), key
    both_full = P + "blocks.1.mlp.layer1"
    assert "alpha" not in modules[both_full]
    assert close(delta64(af.modules[both_full]), ref[both_full] * 16 / 6, 1e-12)  # LyCORIS rule alone: scale 1
    assert modules[both_full]["lokr_w1"].dtype == torch.float32
    assert torch.equal(modules[both_full]["lokr_w2"], af.modules[both_full]["lokr_w2"])  # the larger one untouched
    assert tensors[both_full + ".lokr_w1"] is modules[both_full]["lokr_w1"]
    assert not any("lokr_w2 is full" in p for p in problems)


def test_bf16_lokr_folds_in_float32(tmp_path):
    t = {"lokr_w1": rand(4, 3).bfloat16(), "lokr_w2": rand(8, 6).bfloat16()}
    path = write_peft(tmp_path, {f"{P}blocks.0.mlp.layer1.{k}": v for k, v in t.items()},
                      {"peft_type": "LOKR", "r": 5, "alpha": 3})
    _, _, modules, _ = read_with_config(path)
    params = modules[P + "blocks.0.mlp.layer1"]
    assert params["lokr_w1"].dtype == torch.float32 and params["lokr_w2"].dtype == torch.bfloat16
    want = torch.kron(t["lokr_w1"].double(), t["lokr_w2"].double()).reshape(-1) * 3 / 5
    assert close(delta64(params), want, 1e-6)


def test_a_full_w2_that_peft_would_not_have_made_is_flagged(tmp_path):
    config = dict(LOKR_CONFIG, rank_pattern={"blocks.1.mlp.layer1": 3, "blocks.3.mlp.layer1": 2})  # 3 < 8/2
    path, _ = lokr_file(tmp_path, config)
    _, _, _, problems = read_with_config(path)
    assert any("blocks.1.mlp.layer1: lokr_w2 is full (8x6) but the PEFT config's r=3" in p for p in problems)


# ----------------------------------------------------------------------------------------------- LoRA, metadata
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_scale_from_config_embedded_in_metadata(tmp_path, rslora):
    a, b = rand(3, 10), rand(12, 3)
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 5, "use_rslora": rslora, "rank_pattern": {}}
    tensors = {f"{P}blocks.0.mlp.layer1.lora_A.weight": a, f"{P}blocks.0.mlp.layer1.lora_B.weight": b}
    path = write_peft(tmp_path, tensors,
                      None, name="pytorch_lora_weights.safetensors",
                      metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    _, _, modules, problems = read_with_config(path)
    scale = 5 / math.sqrt(3) if rslora else 5 / 3
    want = (b.double() @ a.double() * scale).reshape(-1)
    assert close(delta64(modules[P + "blocks.0.mlp.layer1"]), want, 1e-12)
    assert not any("PEFT would have named" in p for p in problems)  # the config is the file's own


# ----------------------------------------------------------------------------------------------- what is left alone
def test_no_config_or_no_peft_layout_changes_nothing(tmp_path):
    shapes = {"hada_w1_a": (6, 2), "hada_w1_b": (2, 5), "hada_w2_a": (6, 2), "hada_w2_b": (2, 5)}
    kohya = {f"lora_unet_blocks_0_mlp_layer1.{k}": rand(*v) for k, v in shapes.items()}
    path = write_peft(tmp_path, kohya, LOHA_CONFIG, name="kohya.safetensors")  # a stray config beside a kohya file
    af, tensors, modules, problems = read_with_config(path)
    assert tensors.keys() == af.tensors.keys() and modules.keys() == af.modules.keys() and problems == af.problems
    alone = tmp_path / "alone"
    alone.mkdir()
    path, _ = loha_file(alone, config=None)
    af, tensors, modules, problems = read_with_config(path)
    assert find_peft_config(path) is None and tensors.keys() == af.tensors.keys() and problems == af.problems
    assert peft_config_path(path) is None
    assert peft_config_path(tmp_path / "x.safetensors") == tmp_path / "adapter_config.json"


def test_a_modules_own_alpha_wins(tmp_path):
    t = {"hada_w1_a": rand(6, 4), "hada_w1_b": rand(4, 5), "hada_w2_a": rand(6, 4), "hada_w2_b": rand(4, 5),
         "alpha": torch.tensor(2.0)}
    path = write_peft(tmp_path, {f"{P}blocks.0.mlp.layer1.{k}": v for k, v in t.items()}, LOHA_CONFIG)
    af, _, modules, problems = read_with_config(path)
    assert torch.equal(delta64(modules[P + "blocks.0.mlp.layer1"]), delta64(af.modules[P + "blocks.0.mlp.layer1"]))
    assert any("1 modules carry their own alpha" in p and "scale 0.5 from its alpha, 1.5 from the config" in p
               for p in problems)


def test_renamed_file_gets_the_config_with_a_warning(tmp_path):
    path, ref = loha_file(tmp_path)
    renamed = path.rename(tmp_path / "my_style.safetensors")
    _, _, modules, problems = read_with_config(renamed)
    assert close(delta64(modules[P + "blocks.0.mlp.layer1"]), ref[P + "blocks.0.mlp.layer1"], 1e-12)
    assert any("applied to my_style.safetensors, which PEFT would have named adapter_model.safetensors" in p
               for p in problems)


def test_missing_r_and_alpha_take_peft_defaults_with_a_note(tmp_path):
    t = {"hada_w1_a": rand(6, 8), "hada_w1_b": rand(8, 5), "hada_w2_a": rand(6, 8), "hada_w2_b": rand(8, 5)}
    path = write_peft(tmp_path, {f"{P}blocks.0.mlp.layer1.{k}": v for k, v in t.items()}, {"peft_type": "LOHA"})
    _, _, modules, problems = read_with_config(path)
    assert float(modules[P + "blocks.0.mlp.layer1"]["alpha"]) == 8.0
    assert sum("PEFT's default 8 is used" in p for p in problems) == 2


def test_peft_module_names():
    assert peft_module_name("base_model.model.blocks.0.mlp.layer1") == "blocks.0.mlp.layer1"
    assert peft_module_name("text_encoder.base_model.model.layers.0.mlp.up_proj") == "layers.0.mlp.up_proj"
    assert peft_module_name("lora_unet_blocks_0_mlp_layer1") is None
    name = "down_blocks.1.attentions.0.proj_in"
    assert peft_module_name("unet." + name, embedded=True) == name and peft_module_name("unet." + name) is None


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("config,key,fragment", [
    ({"peft_type": "IA3", "r": 4}, "peft_type", "not a LoHa, LoKr or LoRA config"),
    ({"peft_type": "LOKR", "r": 4, "alpha": 6}, "peft_type", "another algorithm"),
    ({"peft_type": "LOHA", "r": 8, "alpha": 6}, "'r'", "expected 4 (the rank of module"),
    ({"peft_type": "LOHA", "r": 4, "alpha": 6, "rank_pattern": {"blocks.1.mlp.layer1": 3}},
     "rank_pattern['blocks.1.mlp.layer1']", "found 3"),
    ({"peft_type": "LOHA", "r": 0}, "'r'", "a positive integer rank"),
    ({"peft_type": "LOHA", "r": 4, "alpha": "six"}, "'alpha'", "a finite number"),
    ({"peft_type": "LOHA", "r": 4, "alpha_pattern": {"blocks.(": 1}}, "alpha_pattern['blocks.(']",
     "regular expression"),
    ({"peft_type": "LOHA", "r": 4, "rank_pattern": [4]}, "'rank_pattern'", "an object"),
    (["not", "an", "object"], None, "not a PEFT adapter config"),
])
def test_bad_or_foreign_configs_name_the_config_and_key(tmp_path, config, key, fragment):
    path, _ = loha_file(tmp_path, config)
    with pytest.raises(AdapterFileError) as err:
        read_with_config(path)
    text = str(err.value)
    assert str(tmp_path / "adapter_config.json") in text and fragment in text
    if key is not None:
        assert f"key {key}" in text or f"key {key!r}" in text, text


def test_invalid_json_names_the_config(tmp_path):
    path, _ = loha_file(tmp_path, None)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: not valid JSON"):
        read_with_config(path)
