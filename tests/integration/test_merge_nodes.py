"""Adapter Merge / Adapter Combine against real ComfyUI.

Adapter Merge then ComfyUI's CheckpointSave writes a checkpoint whose weights equal `hadakron merge` (the
file-level bake) applied to the same model saved without adapters; Adapter Combine writes a LoRA that ComfyUI's
own LoraLoader applies to the same weights as the two adapters merged.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

from adapter_forms import make_params
from conftest import patched_weights

UNET_Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
UNET_FF = "input_blocks.4.1.transformer_blocks.0.ff.net.2"
UNET_CONV = "input_blocks.1.0.in_layers.2"
CLIP_L_Q = "text_model.encoder.layers.0.self_attn.q_proj"
CLIP_G_K = "text_model.encoder.layers.1.self_attn.k_proj"
CLIP_G_FC1 = "text_model.encoder.layers.0.mlp.fc1"


@pytest.fixture(scope="module")
def merge_nodes(pack):
    return importlib.import_module(pack.__name__ + ".nodes.merge")


def _adapters(model, clip, write_lora):
    """Two files: a LoKr/LoHa file (UNet + both CLIPs) and a LoRA + LoHa file overlapping it."""
    from hadakron.comfy_keys import comfy_weight_key

    msd, csd = model.model.state_dict(), clip.cond_stage_model.state_dict()
    shape = lambda part, dotted: tuple((csd if part != "unet" else msd)[comfy_weight_key("sdxl", part, dotted)].shape)  # noqa: E731
    prefix = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
    g = torch.Generator().manual_seed(5)

    def file(name, modules):
        tensors = {}
        for part, dotted, form in modules:
            params = make_params(form, shape(part, dotted), g, rank=2, alpha=3.0)
            for p, t in params.items():
                tensors[f"{prefix[part]}{dotted.replace('.', '_')}.{p}"] = t
        return write_lora(name, tensors)

    a = file("merge_a.safetensors", [("unet", UNET_Q, "lokr_lowrank"), ("unet", UNET_CONV, "loha_tucker"),
                                     ("te1", CLIP_L_Q, "loha"), ("te2", CLIP_G_K, "lokr_both")])
    b = file("merge_b.safetensors", [("unet", UNET_Q, "loha"), ("unet", UNET_FF, "lokr_full"),
                                     ("te2", CLIP_G_FC1, "loha")])
    return a, b


def _save(env, model, clip, prefix, out_dir):
    import comfy_extras.nodes_model_merging as mm
    mm.save_checkpoint(model, clip=clip, filename_prefix=prefix, output_dir=str(out_dir))
    files = sorted(out_dir.glob(prefix + "*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_adapter_merge_then_checkpoint_save_equals_file_bake(comfy_env, merge_nodes, small_sdxl, small_sdxl_clip,
                                                             write_lora, loras_dir, tmp_path):
    from hadakron.io import read_adapter
    from hadakron.merge import bake_checkpoint

    a, b = _adapters(small_sdxl, small_sdxl_clip, write_lora)
    node = merge_nodes.HadakronAdapterMerge()
    out = node.merge(small_sdxl, a, 0.7, clip=small_sdxl_clip, adapter_2=b, strength_2=-0.4)
    merged_model, merged_clip, text = out["result"]
    assert "merge_a.safetensors @ 0.7: 4 modules applied, 0 not applied" in text
    assert "merge_b.safetensors @ -0.4: 3 modules applied" in text

    base_file = _save(comfy_env, small_sdxl, small_sdxl_clip, "base", tmp_path)
    merged_file = _save(comfy_env, merged_model, merged_clip, "merged", tmp_path)
    ours = tmp_path / "ours.safetensors"
    report = bake_checkpoint(base_file, [(read_adapter(loras_dir / a), 0.7), (read_adapter(loras_dir / b), -0.4)], ours)
    assert sum(len(r.unmatched) for r in report.adapters) == 0, report.lines()

    comfy_sd, our_sd, base_sd = load_file(str(merged_file)), load_file(str(ours)), load_file(str(base_file))
    assert comfy_sd.keys() == our_sd.keys()
    changed = [k for k in our_sd if not torch.equal(our_sd[k], base_sd[k])]
    assert len(changed) == report.weights_changed == 6  # q, conv, ff, CLIP-L q, CLIP-G in_proj (k rows), CLIP-G c_fc
    assert any("in_proj_weight" in k for k in changed)
    for k in our_sd:
        assert torch.equal(comfy_sd[k], our_sd[k]), f"{k}: max diff {(comfy_sd[k].double() - our_sd[k].double()).abs().max()}"


def test_adapter_merge_patch_equals_bake_of_the_weight(comfy_env, merge_nodes, small_sdxl, small_sdxl_clip, write_lora):
    """Sampling path: ComfyUI patching the clone (load_models_gpu) gives W + sum s_i dW_i (float64 reference)."""
    from hadakron.ops import delta_weight

    a, b = _adapters(small_sdxl, small_sdxl_clip, write_lora)
    merged_model, _, _ = merge_nodes.HadakronAdapterMerge().merge(small_sdxl, a, 1.5, adapter_2=b, strength_2=0.5)["result"]
    key = f"diffusion_model.{UNET_Q}.weight"
    got = patched_weights(merged_model, [key])[key].double()
    from hadakron.io import read_adapter
    import folder_paths
    fa = read_adapter(folder_paths.get_full_path("loras", a))
    fb = read_adapter(folder_paths.get_full_path("loras", b))
    mk = "lora_unet_" + UNET_Q.replace(".", "_")
    w = small_sdxl.model.state_dict()[key].double()
    want = w + 1.5 * delta_weight(fa.modules[mk], tuple(w.shape), dtype=torch.float64) \
        + 0.5 * delta_weight(fb.modules[mk], tuple(w.shape), dtype=torch.float64)
    assert (got - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    # the original model is untouched
    assert torch.equal(small_sdxl.model.state_dict()[key].double(), w)


def test_adapter_combine_writes_lora_that_comfy_applies_exactly(comfy_env, merge_nodes, small_sdxl, small_sdxl_clip,
                                                                write_lora, tmp_path):
    import comfy.sd
    import comfy.utils
    import folder_paths

    a, b = _adapters(small_sdxl, small_sdxl_clip, write_lora)
    folder_paths.set_output_directory(str(tmp_path))
    text = merge_nodes.HadakronAdapterCombine().combine(a, 0.7, 0, "loras/combined", adapter_2=b, strength_2=-0.4,
                                                        dtype="fp32")["result"][0]
    rel = text.splitlines()[0].removeprefix("wrote ")
    assert rel == "loras/combined_00001_.safetensors", text  # relative to the output folder, as core's save nodes
    path = str(tmp_path / rel)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    model_l, clip_l = comfy.sd.load_lora_for_models(small_sdxl, small_sdxl_clip, lora, 1.0, 1.0)
    merged_model, merged_clip, _ = merge_nodes.HadakronAdapterMerge().merge(
        small_sdxl, a, 0.7, clip=small_sdxl_clip, adapter_2=b, strength_2=-0.4)["result"]
    keys = [f"diffusion_model.{d}.weight" for d in (UNET_Q, UNET_FF, UNET_CONV)]
    via_lora = patched_weights(model_l, keys)
    via_merge = patched_weights(merged_model, keys)
    for k in keys:
        assert (via_lora[k] - via_merge[k]).abs().max() <= 1e-5 * (1 + via_merge[k].abs().max()), k


def test_anima_merge_then_checkpoint_save_equals_file_bake(comfy_env, merge_nodes, small_anima, small_anima_clip,
                                                           write_lora, loras_dir, tmp_path):
    """Anima DiT + Qwen3 text encoder: the saved checkpoint (model.diffusion_model., cond_stage_model.qwen3_06b...)
    baked by `hadakron merge` equals Adapter Merge -> CheckpointSave."""
    from hadakron.comfy_keys import comfy_weight_key
    from hadakron.io import read_adapter
    from hadakron.merge import bake_checkpoint

    msd, csd = small_anima.model.state_dict(), small_anima_clip.cond_stage_model.state_dict()
    g = torch.Generator().manual_seed(9)
    tensors = {}
    for part, dotted, form, sd, prefix in (
            ("unet", "blocks.0.self_attn.q_proj", "lokr_lowrank", msd, "lora_unet_"),
            ("unet", "blocks.3.mlp.layer1", "loha", msd, "lora_unet_"),
            ("unet", "llm_adapter.blocks.0.cross_attn.q_proj", "lokr_both", msd, "lora_unet_"),
            ("te", "layers.1.mlp.up_proj", "loha", csd, "lora_te_")):
        shape = tuple(sd[comfy_weight_key("anima", part, dotted)].shape)
        for p, t in make_params(form, shape, g, rank=2, alpha=2.0).items():
            tensors[f"{prefix}{dotted.replace('.', '_')}.{p}"] = t
    name = write_lora("anima_merge.safetensors", tensors)
    merged_model, merged_clip, text = merge_nodes.HadakronAdapterMerge().merge(
        small_anima, name, 0.9, clip=small_anima_clip)["result"]
    assert "4 modules applied, 0 not applied" in text
    base_file = _save(comfy_env, small_anima, small_anima_clip, "anima_base", tmp_path)
    merged_file = _save(comfy_env, merged_model, merged_clip, "anima_merged", tmp_path)
    ours = tmp_path / "anima_ours.safetensors"
    report = bake_checkpoint(base_file, [(read_adapter(loras_dir / name), 0.9)], ours)
    assert report.weights_changed == 4 and set(report.checkpoint_parts) == {"anima/unet", "anima/te"}
    comfy_sd, our_sd = load_file(str(merged_file)), load_file(str(ours))
    assert comfy_sd.keys() == our_sd.keys()
    for k in our_sd:
        assert torch.equal(comfy_sd[k], our_sd[k]), k


def test_in_memory_adapter_merges_like_its_file(comfy_env, merge_nodes, small_sdxl, small_sdxl_clip, write_lora,
                                                loras_dir):
    from hadakron.io import AdapterFile, read_adapter

    a, _ = _adapters(small_sdxl, small_sdxl_clip, write_lora)
    f = read_adapter(loras_dir / a)
    mem = AdapterFile(path=None, tensors=f.tensors, metadata=f.metadata, modules=f.modules, problems=[])
    node = merge_nodes.HadakronAdapterMerge()
    by_file, _, _ = node.merge(small_sdxl, a, 0.75)["result"]
    by_mem, _, text = node.merge(small_sdxl, a, 0.0, adapter=mem, adapter_strength=0.75)["result"]
    assert "in-memory adapter @ 0.75" in text
    keys = [f"diffusion_model.{UNET_Q}.weight", f"diffusion_model.{UNET_CONV}.weight"]
    w_file, w_mem = patched_weights(by_file, keys), patched_weights(by_mem, keys)
    for k in keys:
        assert torch.equal(w_file[k], w_mem[k])


def test_adapter_merge_skips_broken_modules_by_name(comfy_env, merge_nodes, small_sdxl, small_sdxl_clip, write_lora):
    """A module with an integer factor, or one whose dora_scale fits neither side of its weight, is listed as
    refused in the merge report and changes no weight; the good module of the same file still applies."""
    from hadakron.comfy_keys import comfy_weight_key

    msd = small_sdxl.model.state_dict()
    g = torch.Generator().manual_seed(11)
    shape = lambda dotted: tuple(msd[comfy_weight_key("sdxl", "unet", dotted)].shape)  # noqa: E731
    key = lambda dotted: "lora_unet_" + dotted.replace(".", "_")  # noqa: E731
    tensors = {}
    for dotted in (UNET_Q, UNET_FF, UNET_CONV):
        for p, t in make_params("loha", shape(dotted), g, rank=2, alpha=3.0).items():
            tensors[f"{key(dotted)}.{p}"] = t
    tensors[f"{key(UNET_FF)}.hada_w2_a"] = tensors[f"{key(UNET_FF)}.hada_w2_a"].to(torch.int32)
    tensors[f"{key(UNET_CONV)}.dora_scale"] = torch.ones(7, 1)
    name = write_lora("merge_broken.safetensors", tensors)

    merged, _, text = merge_nodes.HadakronAdapterMerge().merge(small_sdxl, name, 1.0)["result"]
    assert "1 modules applied, 2 not applied" in text, text
    lines = text.splitlines()
    ff_line = next(line for line in lines if key(UNET_FF) in line)
    conv_line = next(line for line in lines if key(UNET_CONV) in line)
    assert "refused" in ff_line and "hada_w2_a" in ff_line, ff_line
    assert "refused" in conv_line and "dora_scale" in conv_line, conv_line
    keys = [f"diffusion_model.{d}.weight" for d in (UNET_Q, UNET_FF, UNET_CONV)]
    got = patched_weights(merged, keys)
    assert not torch.equal(got[keys[0]], msd[keys[0]])
    assert torch.equal(got[keys[1]], msd[keys[1]]) and torch.equal(got[keys[2]], msd[keys[2]])
