"""LoHa/LoKr Loader against real ComfyUI: every patched weight equals W + s * delta-W.

Small SDXL / Anima models and text encoders are built with ComfyUI's own classes (conftest). Files in every
form and layout go through the node function; ComfyUI then patches the weights (ModelPatcher.patch_model on
CPU) and each one is compared with a float64 reference written here (adapter_forms.reference_delta), with
`hadakron.ops.patched_weight`, and, where ComfyUI computes the form correctly, with ComfyUI's LoraLoader.
"""
from __future__ import annotations

import pytest
import torch

from adapter_forms import CONV_FORMS, LINEAR_FORMS, make_params, reference_delta
from conftest import patched_weights

S_MODEL, S_CLIP = 0.8, -0.6


def _layers(family: str, model, clip):
    """[(part, dotted, comfy_key, shape, on_clip)] for every adaptable layer the family knows by name."""
    from hadakron.arch import get_family
    from hadakron.comfy_keys import comfy_weight_key, layer_shapes

    fam = get_family(family)
    out = []
    sides = [(model.model, False)] + ([(clip.cond_stage_model, True)] if clip is not None else [])
    for module, on_clip in sides:
        shapes = layer_shapes(family, {k: v.shape for k, v in module.state_dict().items()}, clip=on_clip)
        for (part, dotted), shape in sorted(shapes.items()):
            if dotted in fam.layers[part] and len(shape) in (2, 4):
                out.append((part, dotted, comfy_weight_key(family, part, dotted), shape, on_clip))
    return out


def _kohya_key(family: str, part: str, dotted: str) -> str:
    prefix = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te": "lora_te_"}[part]
    return prefix + dotted.replace(".", "_")


def _form_for(form: str, shape) -> str | None:
    if form in ("loha_tucker", "lokr_tucker"):
        return form if len(shape) == 4 and shape[2] > 1 else None
    return form


def _build_file(family, layers, form, seed, key_fn=_kohya_key):
    g = torch.Generator().manual_seed(seed)
    tensors, modules = {}, {}
    for part, dotted, ckey, shape, on_clip in layers:
        f = _form_for(form, shape)
        if f is None:
            continue
        params = make_params(f, tuple(shape), g, rank=2 + (len(modules) % 3), alpha=1.0 + (len(modules) % 4))
        mk = key_fn(family, part, dotted)
        for name, t in params.items():
            tensors[f"{mk}.{name}"] = t
        modules[ckey] = (params, tuple(shape), on_clip)
    return tensors, modules


def _check_patched(model, clip, new_model, new_clip, modules, s_model, s_clip, *, atol=2e-5):
    from hadakron import ops

    model_keys = [k for k, (_, _, c) in modules.items() if not c]
    clip_keys = [k for k, (_, _, c) in modules.items() if c]
    got = patched_weights(new_model, model_keys)
    if clip_keys:
        got.update(patched_weights(new_clip.patcher, clip_keys))
    orig = {k: v.detach().clone() for k, v in model.model.state_dict().items() if k in model_keys}
    if clip is not None:
        orig.update({k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items() if k in clip_keys})
    worst = 0.0
    for key, (params, shape, on_clip) in modules.items():
        s = s_clip if on_clip else s_model
        w = orig[key]
        ref = w.to(torch.float64) + s * reference_delta(params, shape)
        err = (got[key].to(torch.float64) - ref).abs().max().item()
        worst = max(worst, err / (ref.abs().max().item() + 1e-12))
        assert err <= atol * (1 + ref.abs().max().item()), f"{key}: max error {err} vs float64 reference"
        via_ops = ops.patched_weight(w, params, s, dtype=torch.float32)
        assert torch.allclose(got[key], via_ops, rtol=1e-5, atol=1e-6), f"{key}: differs from hadakron.ops"
        assert not torch.equal(got[key], w), f"{key}: weight was not patched"
    return got, worst


@pytest.mark.parametrize("form", CONV_FORMS)
def test_sdxl_every_form_kohya_matches_reference(form, pack_nodes, small_sdxl, small_sdxl_clip, write_lora):
    layers = _layers("sdxl", small_sdxl, small_sdxl_clip)
    assert len(layers) > 100
    tensors, modules = _build_file("sdxl", layers, form, seed=sum(map(ord, form)))
    name = write_lora(f"sdxl_{form}.safetensors", tensors, {"ss_network_dim": "4", "ss_network_module": "lycoris.kohya"})
    node = pack_nodes.HadakronLoader()
    out = node.load(small_sdxl, small_sdxl_clip, name, S_MODEL, S_CLIP, "")
    new_model, new_clip, text = out["result"]
    import json
    report = json.loads(out["ui"]["hadakron_report"][0])
    assert report["matched_count"] == len(modules) and report["unmatched_count"] == 0, text
    assert report["patches_added"] == len(modules)
    assert out["ui"]["text"][0] == text
    # clones: the input model carries no patches; the output carries exactly one per matched weight
    assert not small_sdxl.patches and new_model is not small_sdxl
    n_clip = sum(1 for _, _, c in modules.values() if c)
    assert len(new_model.patches) == len(modules) - n_clip
    if n_clip:
        assert len(new_clip.patcher.patches) == n_clip
    for key, plist in new_model.patches.items():
        assert len(plist) == 1 and type(plist[0][1]).__name__ == "HadakronWeightPatch"
    _check_patched(small_sdxl, small_sdxl_clip, new_model, new_clip, modules, S_MODEL, S_CLIP)


# ComfyUI 0.29 gets Tucker LoKr wrong (torch.kron on a non-contiguous einsum raises; caught, weight unchanged),
# so the comparison with its LoraLoader covers the other forms.
COMFY_RIGHT_FORMS = [f for f in CONV_FORMS if f != "lokr_tucker"]


@pytest.mark.parametrize("form", COMFY_RIGHT_FORMS)
def test_sdxl_same_as_comfyui_loraloader(form, comfy_env, pack_nodes, small_sdxl, small_sdxl_clip, write_lora):
    layers = _layers("sdxl", small_sdxl, small_sdxl_clip)
    tensors, modules = _build_file("sdxl", layers, form, seed=7 + len(form))
    name = write_lora(f"cmp_{form}.safetensors", tensors)
    ours_model, ours_clip, _ = pack_nodes.HadakronLoader().load(small_sdxl, small_sdxl_clip, name, S_MODEL, S_CLIP)["result"]
    theirs_model, theirs_clip = comfy_env.comfy.sd.load_lora_for_models(small_sdxl, small_sdxl_clip, tensors, S_MODEL, S_CLIP)
    model_keys = [k for k, (_, _, c) in modules.items() if not c]
    clip_keys = [k for k, (_, _, c) in modules.items() if c]
    ours = patched_weights(ours_model, model_keys) | patched_weights(ours_clip.patcher, clip_keys)
    theirs = patched_weights(theirs_model, model_keys) | patched_weights(theirs_clip.patcher, clip_keys)
    for key in modules:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5), \
            f"{key}: ours vs ComfyUI max diff {(ours[key] - theirs[key]).abs().max().item()}"


def test_comfyui_tucker_lokr_is_the_form_we_fix(comfy_env, pack_nodes, small_sdxl, write_lora):
    """The reason COMFY_RIGHT_FORMS leaves Tucker LoKr out: ComfyUI leaves such weights unchanged; ours patch them."""
    layers = [l for l in _layers("sdxl", small_sdxl, None) if len(l[3]) == 4 and l[3][2] == 3][:4]
    tensors, modules = _build_file("sdxl", layers, "lokr_tucker", seed=5)
    theirs_model, _ = comfy_env.comfy.sd.load_lora_for_models(small_sdxl, None, tensors, 1.0, 0.0)
    keys = list(modules)
    theirs = patched_weights(theirs_model, keys)
    orig = {k: small_sdxl.model.state_dict()[k] for k in keys}
    name = write_lora("tucker_lokr.safetensors", tensors)
    ours_model = pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.0)["result"][0]
    ours = patched_weights(ours_model, keys)
    for k in keys:
        ref = orig[k].double() + reference_delta(modules[k][0], modules[k][1])
        assert torch.allclose(ours[k].double(), ref, atol=1e-4)
        if torch.equal(theirs[k], orig[k]):
            continue  # ComfyUI 0.29 behaviour (documented in shared/reference/ecosystem.md section 8)
        assert torch.allclose(theirs[k].double(), ref, atol=1e-4)  # if ComfyUI ever fixes it, it must agree


LAYOUT_CASES = ["comfyui", "peft", "lycoris", "diffusers"]


@pytest.mark.parametrize("layout", LAYOUT_CASES)
def test_sdxl_layouts(layout, pack_nodes, small_sdxl, small_sdxl_clip, write_lora):
    from hadakron.arch import module_key

    layers = _layers("sdxl", small_sdxl, small_sdxl_clip)
    if layout in ("lycoris", "diffusers"):
        layers = [l for l in layers if l[0] == "unet" or layout == "lycoris"]
    tensors, modules = _build_file("sdxl", layers, "lokr_lowrank", seed=11,
                                   key_fn=lambda f, p, d: module_key(f, p, d, layout))
    name = write_lora(f"layout_{layout}.safetensors", tensors)
    out = pack_nodes.HadakronLoader().load(small_sdxl, small_sdxl_clip, name, S_MODEL, S_CLIP)
    new_model, new_clip, text = out["result"]
    import json
    report = json.loads(out["ui"]["hadakron_report"][0])
    assert report["matched_count"] == len(modules), text
    _check_patched(small_sdxl, small_sdxl_clip, new_model, new_clip, modules, S_MODEL, S_CLIP)


@pytest.mark.parametrize("form", ["loha", "lokr_full", "lokr_both"])
def test_anima_dit_llm_adapter_and_te(form, comfy_env, pack_nodes, small_anima, small_anima_clip, write_lora):
    layers = _layers("anima", small_anima, small_anima_clip)
    # a cheap but complete cover: blocks 0, 3 and 9, the llm_adapter's first block, embedders, and the TE
    keep = [l for l in layers if l[4] or l[1].startswith(("blocks.0.", "blocks.3.", "blocks.9.", "llm_adapter.blocks.0.",
                                                           "t_embedder", "x_embedder", "final_layer"))]
    assert any(l[1].startswith("llm_adapter") for l in keep) and any(l[4] for l in keep)
    tensors, modules = _build_file("anima", keep, form, seed=23)
    name = write_lora(f"anima_{form}.safetensors", tensors)
    out = pack_nodes.HadakronLoader().load(small_anima, small_anima_clip, name, S_MODEL, S_CLIP)
    new_model, new_clip, text = out["result"]
    import json
    report = json.loads(out["ui"]["hadakron_report"][0])
    assert report["matched_count"] == len(modules) and report["family"] == "anima", text
    assert set(report["by_part"]) == {"unet", "te"}
    _check_patched(small_anima, small_anima_clip, new_model, new_clip, modules, S_MODEL, S_CLIP)
    # ComfyUI maps kohya `lora_unet_blocks_*` and single-TE `lora_te_*` for Anima: same numbers
    theirs_model, theirs_clip = comfy_env.comfy.sd.load_lora_for_models(small_anima, small_anima_clip, tensors,
                                                                         S_MODEL, S_CLIP)
    mk = [k for k, (_, _, c) in modules.items() if not c]
    ck = [k for k, (_, _, c) in modules.items() if c]
    ours = patched_weights(new_model, mk) | patched_weights(new_clip.patcher, ck)
    theirs = patched_weights(theirs_model, mk) | patched_weights(theirs_clip.patcher, ck)
    for k in modules:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-5), k


def test_anima_comfyui_layout_and_lycoris_prefix(pack_nodes, small_anima, write_lora):
    """Layouts ComfyUI itself does not map for Anima (lycoris_blocks_*) load here too."""
    layers = [l for l in _layers("anima", small_anima, None) if l[1].startswith("blocks.1.")]
    for layout, key_fn in (("lycoris", lambda f, p, d: "lycoris_" + d.replace(".", "_")),
                           ("comfyui", lambda f, p, d: "diffusion_model." + d)):
        tensors, modules = _build_file("anima", layers, "loha", seed=3, key_fn=key_fn)
        name = write_lora(f"anima_{layout}.safetensors", tensors)
        new_model = pack_nodes.HadakronLoaderModelOnly().load_model_only(small_anima, name, 1.0)["result"][0]
        _check_patched(small_anima, None, new_model, None, modules, 1.0, 0.0)


def test_strength_zero_adds_no_patches(pack_nodes, small_sdxl, small_sdxl_clip, write_lora):
    layers = _layers("sdxl", small_sdxl, small_sdxl_clip)
    tensors, modules = _build_file("sdxl", layers, "loha", seed=1)
    name = write_lora("zero.safetensors", tensors)
    node = pack_nodes.HadakronLoader()
    m, c, _ = node.load(small_sdxl, small_sdxl_clip, name, 0.0, 0.0)["result"]
    assert m is small_sdxl and c is small_sdxl_clip
    m, c, text = node.load(small_sdxl, small_sdxl_clip, name, 0.0, 1.0)["result"]
    assert m is small_sdxl and not m.patches          # model untouched
    assert c is not small_sdxl_clip and len(c.patcher.patches) == sum(1 for v in modules.values() if v[2])
    m, c, _ = node.load(small_sdxl, small_sdxl_clip, name, 1.0, 0.0)["result"]
    assert c is small_sdxl_clip and len(m.patches) == sum(1 for v in modules.values() if not v[2])


def test_block_weights_scale_per_block(pack_nodes, small_sdxl, small_sdxl_clip, write_lora):
    from hadakron.block_weights import sdxl_block_id

    layers = _layers("sdxl", small_sdxl, small_sdxl_clip)
    tensors, modules = _build_file("sdxl", layers, "lokr_both", seed=4)
    name = write_lora("bw.safetensors", tensors)
    text = "OUTALL, OUT01=0.5, BASE=0"
    new_model, new_clip, _ = pack_nodes.HadakronLoader().load(small_sdxl, small_sdxl_clip, name, 2.0, 1.0, text)["result"]
    assert new_clip is small_sdxl_clip  # BASE=0: no text-encoder patch at all
    keys = [k for k, (_, _, c) in modules.items() if not c]
    got = patched_weights(new_model, keys)
    orig = small_sdxl.model.state_dict()
    n_patched = 0
    for key in keys:
        params, shape, _ = modules[key]
        dotted = key[len("diffusion_model."):-len(".weight")]
        block = sdxl_block_id("unet", dotted)
        mult = {"OUT01": 0.5}.get(block, 1.0 if block.startswith("OUT") or block == "OTHER" else 0.0)
        ref = orig[key].double() + 2.0 * mult * reference_delta(params, shape)
        assert torch.allclose(got[key].double(), ref, atol=1e-4), f"{key} ({block}, x{mult})"
        n_patched += mult != 0
    assert len(new_model.patches) == n_patched


def test_patch_object_follows_comfy_staging_contract(comfy_env, pack_nodes, small_sdxl, write_lora):
    """ComfyUI rebuilds patches as type(v)(v.loaded_keys, staged weights) and counts their tensors (lowvram)."""
    import comfy.lora
    import comfy.model_patcher

    layers = [l for l in _layers("sdxl", small_sdxl, None) if len(l[3]) == 4][:3] + \
             [l for l in _layers("sdxl", small_sdxl, None) if len(l[3]) == 2][:3]
    tensors, modules = _build_file("sdxl", layers, "lokr_lowrank", seed=9)
    name = write_lora("staging.safetensors", tensors)
    new_model = pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 0.7)["result"][0]
    for key, (params, shape, _) in modules.items():
        patch = new_model.patches[key][0][1]
        assert set(patch.loaded_keys) == {k for k in tensors if k.startswith(_kohya_key("sdxl", "unet", key[16:-7]) + ".")}
        counter = [0]
        rebuilt = comfy.lora.prefetch_prepared_value(patch, counter, None, None, False)
        tensor_bytes = sum(t.numel() * t.element_size() for t in params.values())
        assert type(rebuilt) is type(patch) and counter[0] >= tensor_bytes
        # lowvram / dynamic path: LowVramPatch computes on the fly in the compute dtype (bf16 here)
        w = small_sdxl.model.state_dict()[key].to(torch.bfloat16)
        lv = comfy.model_patcher.LowVramPatch(key, new_model.patches)
        out = lv(w.clone())
        ref = w.double() + 0.7 * reference_delta(params, shape)
        assert out.dtype == torch.bfloat16
        assert torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_load_models_gpu_path_on_cpu(comfy_env, pack_nodes, small_sdxl, write_lora):
    """The normal loading path (model_management.load_models_gpu) patches in place and unpatches exactly."""
    layers = _layers("sdxl", small_sdxl, None)[:20]
    tensors, modules = _build_file("sdxl", layers, "loha", seed=13)
    name = write_lora("lmg.safetensors", tensors)
    new_model = pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, 1.3)["result"][0]
    orig = {k: v.detach().clone() for k, v in small_sdxl.model.state_dict().items() if k in modules}
    mm = comfy_env.mm
    mm.load_models_gpu([new_model], force_full_load=True)
    try:
        sd = new_model.model.state_dict()
        for key, (params, shape, _) in modules.items():
            ref = orig[key].double() + 1.3 * reference_delta(params, shape)
            assert torch.allclose(sd[key].double(), ref, atol=1e-4), key
    finally:
        mm.unload_all_models()
    sd = small_sdxl.model.state_dict()
    for key in modules:
        assert torch.equal(sd[key], orig[key]), f"{key} not restored after unload"


def _dora_reference(w, params, shape, strength, row_wise):
    """W + strength * (W_d - W), W_d = (W + dW) * m / ||W + dW|| (per output row or per input column), float64."""
    w = w.double()
    wc = w + reference_delta(params, shape)
    m = params["dora_scale"].double()
    if row_wise:
        norm = wc.reshape(wc.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (wc.dim() - 1))
    else:
        norm = wc.transpose(0, 1).reshape(wc.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (wc.dim() - 2))
    return w + strength * (wc * m / norm - w)


@pytest.mark.parametrize("row_wise", [False, True])
def test_dora_scale(row_wise, comfy_env, pack_nodes, small_sdxl, write_lora):
    layers = [l for l in _layers("sdxl", small_sdxl, None) if len(l[3]) == 2][:12]
    g = torch.Generator().manual_seed(31)
    tensors, modules = {}, {}
    for part, dotted, ckey, shape, _ in layers:
        params = make_params("loha", tuple(shape), g, rank=2, alpha=1.0)
        w = small_sdxl.model.state_dict()[ckey].double()
        norm = (w.norm(dim=1, keepdim=True) if row_wise else w.norm(dim=0, keepdim=True))
        params["dora_scale"] = (norm * (1 + 0.1 * torch.rand(norm.shape, generator=g, dtype=torch.float64))).float()
        for k, v in params.items():
            tensors[f"{_kohya_key('sdxl', part, dotted)}.{k}"] = v
        modules[ckey] = (params, tuple(shape))
    name = write_lora(f"dora_{row_wise}.safetensors", tensors)
    s = 0.7
    ours_model = pack_nodes.HadakronLoaderModelOnly().load_model_only(small_sdxl, name, s)["result"][0]
    ours = patched_weights(ours_model, list(modules))
    theirs_model, _ = comfy_env.comfy.sd.load_lora_for_models(small_sdxl, None, tensors, s, 0.0)
    theirs = patched_weights(theirs_model, list(modules))
    for key, (params, shape) in modules.items():
        w = small_sdxl.model.state_dict()[key]
        ref = _dora_reference(w, params, shape, s, row_wise)
        assert torch.allclose(ours[key].double(), ref, atol=1e-4), key
        if not row_wise:  # ComfyUI takes the row-wise norm of the original W (section 1.6); column-wise agrees
            assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5), key
