"""Bad input to the LoHa/LoKr Loader: a clear message for the user, no exception escapes as a crash of ComfyUI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from adapter_forms import make_params, reference_delta
from conftest import patched_weights

Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
CONV = "input_blocks.1.0.in_layers.2"


def _shape(model, dotted):
    return tuple(model.model.state_dict()[f"diffusion_model.{dotted}.weight"].shape)


def test_missing_file(pack_nodes, small_sdxl, small_sdxl_clip, loras_dir):
    with pytest.raises(pack_nodes.HadakronLoadError, match="was not found in the loras folder"):
        pack_nodes.HadakronLoader().load(small_sdxl, small_sdxl_clip, "does_not_exist.safetensors", 1.0, 1.0)


def test_corrupt_file(pack_nodes, small_sdxl, loras_dir):
    (loras_dir / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(pack_nodes.HadakronLoadError) as err:
        pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, "corrupt.safetensors", 1.0)
    msg = str(err.value)
    assert msg.startswith("cannot read corrupt.safetensors") and "\n" not in msg.strip()


def test_truncated_file(pack_nodes, small_sdxl, write_lora, loras_dir):
    g = torch.Generator().manual_seed(0)
    p = make_params("loha", _shape(small_sdxl, Q), g)
    name = write_lora("trunc.safetensors", {f"lora_unet_{Q.replace('.', '_')}.{k}": v for k, v in p.items()})
    data = (loras_dir / name).read_bytes()
    (loras_dir / name).write_bytes(data[: len(data) - 40])
    with pytest.raises(pack_nodes.HadakronLoadError, match="cannot read trunc.safetensors"):
        pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.0)


def test_nan_module_is_skipped_and_reported(pack_nodes, small_sdxl, write_lora):
    g = torch.Generator().manual_seed(1)
    good = make_params("lokr_lowrank", _shape(small_sdxl, CONV), g)
    bad = make_params("loha", _shape(small_sdxl, Q), g)
    bad["hada_w1_b"][0, 0] = math.nan
    tensors = {f"lora_unet_{CONV.replace('.', '_')}.{k}": v for k, v in good.items()}
    tensors |= {f"lora_unet_{Q.replace('.', '_')}.{k}": v for k, v in bad.items()}
    name = write_lora("nan.safetensors", tensors)
    out = pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.0)
    new_model, text = out["result"]
    report = json.loads(out["ui"]["hadakron_report"][0])
    assert report["matched_count"] == 1 and report["unmatched"][0]["kind"] == "nonfinite"
    assert "NaN" in text and "hada_w1_b" in text
    assert list(new_model.patches) == [f"diffusion_model.{CONV}.weight"]
    key = f"diffusion_model.{CONV}.weight"
    got = patched_weights(new_model, [key])[key]
    ref = small_sdxl.model.state_dict()[key].double() + reference_delta(good, _shape(small_sdxl, CONV))
    assert torch.isfinite(got).all() and torch.allclose(got.double(), ref, atol=1e-4)


def test_all_nan_fails_with_reason(pack_nodes, small_sdxl, write_lora):
    bad = make_params("loha", _shape(small_sdxl, Q), torch.Generator().manual_seed(2))
    bad["hada_w2_a"].fill_(math.inf)
    name = write_lora("allnan.safetensors", {f"lora_unet_{Q.replace('.', '_')}.{k}": v for k, v in bad.items()})
    with pytest.raises(pack_nodes.HadakronLoadError, match="NaN/Inf"):
        pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.0)


def test_wrong_family_is_one_line(pack_nodes, small_sdxl, write_lora):
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i in range(3):
        for k, v in make_params("lokr_full", (256, 256), g).items():
            tensors[f"lora_unet_blocks_{i}_self_attn_q_proj.{k}"] = v
    name = write_lora("anima_on_sdxl.safetensors", tensors)
    with pytest.raises(pack_nodes.HadakronLoadError) as err:
        pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.0)
    msg = str(err.value)
    assert "\n" not in msg and "ANIMA adapter" in msg and "model is SDXL" in msg


def test_lora_file_points_to_loraloader(pack_nodes, small_sdxl, write_lora):
    g = torch.Generator().manual_seed(4)
    out, cin = _shape(small_sdxl, Q)
    tensors = {f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.randn(out, 4, generator=g),
               f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.randn(4, cin, generator=g),
               f"lora_unet_{Q.replace('.', '_')}.alpha": torch.tensor(4.0)}
    name = write_lora("plain_lora.safetensors", tensors)
    with pytest.raises(pack_nodes.HadakronLoadError, match="is a LoRA file.*LoraLoader"):
        pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.0)


def test_bad_block_weights_and_non_sdxl_model(pack_nodes, comfy_env, small_sdxl, write_lora):
    p = make_params("loha", _shape(small_sdxl, Q), torch.Generator().manual_seed(5))
    name = write_lora("bwbad.safetensors", {f"lora_unet_{Q.replace('.', '_')}.{k}": v for k, v in p.items()})
    with pytest.raises(pack_nodes.HadakronLoadError, match="SDXL takes 12 values"):
        pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.0, "1,0,1")

    class NotSupported:
        model = object()
    with pytest.raises(pack_nodes.HadakronLoadError, match="supports SDXL and Anima"):
        pack_nodes.HadakronLoaderModelOnly().load_model_only(NotSupported(), name, 1.0)


def test_te_only_file_on_model_only_loader_reports(pack_nodes, small_sdxl, small_sdxl_clip, write_lora):
    key = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    shape = tuple(small_sdxl_clip.cond_stage_model.state_dict()[key].shape)
    p = make_params("loha", shape, torch.Generator().manual_seed(6))
    name = write_lora("te_only.safetensors",
                      {f"lora_te1_text_model_encoder_layers_0_mlp_fc1.{k}": v for k, v in p.items()})
    out = pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.0)
    new_model, text = out["result"]
    assert new_model is small_sdxl and "te1 not loaded by this node" in text


def test_in_memory_adapter_input(pack_nodes, small_sdxl, small_sdxl_clip):
    """The optional HADAKRON_ADAPTER input (an AdapterFile from the trainer) replaces lora_name."""
    from pathlib import Path
    from hadakron.io import AdapterFile

    p = make_params("lokr_both", _shape(small_sdxl, Q), torch.Generator().manual_seed(8))
    mk = f"lora_unet_{Q.replace('.', '_')}"
    adapter = AdapterFile(path=Path("trained_in_graph.safetensors"),
                          tensors={f"{mk}.{k}": v for k, v in p.items()}, metadata={"ss_steps": "10"})
    out = pack_nodes.HadakronLoader().load(small_sdxl, small_sdxl_clip, "ignored.safetensors", 0.5, 1.0,
                                           "", adapter=adapter)
    new_model, new_clip, text = out["result"]
    assert "trained_in_graph.safetensors: 1/1 modules applied" in text and "steps=10" in text
    key = f"diffusion_model.{Q}.weight"
    got = patched_weights(new_model, [key])[key]
    ref = small_sdxl.model.state_dict()[key].double() + 0.5 * reference_delta(p, _shape(small_sdxl, Q))
    assert torch.allclose(got.double(), ref, atol=1e-4)
