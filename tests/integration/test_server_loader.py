"""LoHa/LoKr Loader through POST /prompt on the real server, fed by the real core loader nodes.

The small SDXL checkpoint and Anima files (model_files.py) are loaded by CheckpointLoaderSimple / UNETLoader +
CLIPLoader + VAELoader; HadakronLoader patches them; ModelSave and CLIPSave write the patched weights, which are
compared with a float64 reference W + strength * delta-W (adapter_forms.reference_delta) for every targeted
tensor, and bit for bit with the base file for every other tensor. Sampling is compared with ComfyUI's own
LoraLoader on a plain LoHa file, and the executor cache / file replacement behaviour is checked.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pytest
import torch

from adapter_forms import make_params, reference_delta
from comfy_client import Graph

# (part, module) -> form; SDXL modules in ComfyUI's internal names, text encoders in HF names
SDXL_LOHA = {
    ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"): "loha",
    ("unet", "middle_block.1.transformer_blocks.3.ff.net.0.proj"): "loha",
    ("unet", "input_blocks.1.0.in_layers.2"): "loha",                    # Conv2d 3x3
    ("unet", "output_blocks.2.2.conv"): "loha_tucker",                   # Upsample conv, Tucker
    ("te1", "text_model.encoder.layers.0.self_attn.q_proj"): "loha",
    ("te2", "text_model.encoder.layers.5.mlp.fc1"): "loha",
}
SDXL_LOKR = {
    ("unet", "input_blocks.7.1.transformer_blocks.9.attn2.to_k"): "lokr_lowrank",   # (320, 2048)
    ("unet", "output_blocks.5.1.proj_out"): "lokr_full",
    ("unet", "input_blocks.3.0.op"): "lokr_tucker",                     # Downsample conv, Tucker
    ("unet", "output_blocks.8.0.out_layers.3"): "lokr_both",
    ("te1", "text_model.encoder.layers.11.mlp.fc2"): "lokr_lowrank",
    ("te2", "text_model.encoder.layers.31.self_attn.out_proj"): "lokr_full",
}
ANIMA_MIXED = {
    ("unet", "blocks.0.self_attn.q_proj"): "loha",
    ("unet", "blocks.9.mlp.layer1"): "lokr_lowrank",
    ("unet", "blocks.4.cross_attn.k_proj"): "lokr_full",
    ("unet", "llm_adapter.blocks.0.self_attn.q_proj"): "loha",
    ("te", "layers.0.mlp.up_proj"): "loha",
    ("te", "layers.27.self_attn.o_proj"): "lokr_both",
}
KOHYA = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te": "lora_te_"}


# ---------------------------------------------------------------- adapter files and references


def _write_adapter(server_lora, name: str, modules: Mapping[tuple[str, str], str],
                   shapes: Mapping[tuple[str, str], tuple[int, ...]], seed: int) -> dict:
    """Write a kohya-named LoHa/LoKr file; returns {(part, module): params} (float32, as in the file)."""
    g = torch.Generator().manual_seed(seed)
    tensors, params = {}, {}
    for i, ((part, module), form) in enumerate(sorted(modules.items())):
        p = make_params(form, shapes[(part, module)], g, rank=2 + i % 3, alpha=1.0 + i % 4)
        params[(part, module)] = p
        key = KOHYA[part] + module.replace(".", "_")
        tensors.update({f"{key}.{n}": t for n, t in p.items()})
    server_lora(name, tensors, {"ss_network_module": "lycoris.kohya"})
    return params


def _tolerance(dtype: torch.dtype, ref: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """The saved dtype's rounding of the exact value, plus float32 accumulation on the delta's magnitude."""
    return torch.finfo(dtype).eps * ref.abs() + 8 * torch.finfo(torch.float32).eps * bound + \
        torch.finfo(dtype).tiny


def _expected(base: torch.Tensor, params: dict, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, error bound) in float64 for base W (any shape) and a module's params."""
    shape = tuple(base.shape)
    ref = base.to(torch.float64) + strength * reference_delta(params, shape)
    bound = abs(strength) * reference_delta({k: v.abs() for k, v in params.items()}, shape)
    return ref, bound


def _assert_baked(saved_path: Path, base_of: Callable[[str], torch.Tensor | None], targets: dict,
                  strength: float, extras: frozenset[str] = frozenset()) -> int:
    """Every tensor of `saved_path`: targets[key] = params -> W + s*dW within rounding; others == base bit for bit.
    `base_of(saved_key)` returns the base tensor (None when the key has no base: a failure unless the key is one of
    `extras`, ComfyUI's own tensors that no file carries). Returns the number of tensors saved."""
    from safetensors import safe_open
    with safe_open(str(saved_path), framework="pt") as f:
        keys = list(f.keys())
        missing = sorted(set(targets) - set(keys))
        assert not missing, f"{saved_path.name}: targeted tensors not saved: {missing}"
        no_base, differ = [], []
        for key in keys:
            saved = f.get_tensor(key)
            base = base_of(key)
            if base is None:
                if key not in extras:
                    no_base.append(key)
                continue
            assert saved.shape == base.shape, f"{saved_path.name}: {key} shape {tuple(saved.shape)} vs base {tuple(base.shape)}"
            if key in targets:
                ref, bound = _expected(base, targets[key], strength)
                err = (saved.to(torch.float64) - ref).abs()
                tol = _tolerance(saved.dtype, ref, bound)
                worst = (err - tol).argmax()
                assert bool((err <= tol).all()), (
                    f"{saved_path.name}: {key} ({saved.dtype}) off the float64 reference W + {strength}*dW: "
                    f"max err {err.max().item():.3g}, at flat index {worst.item()} err {err.flatten()[worst].item():.3g} "
                    f"> tol {tol.flatten()[worst].item():.3g}")
                # the patch is far above the tolerance, so an unpatched tensor cannot pass
                assert (saved.to(torch.float64) - base.to(torch.float64)).abs().max() > 100 * tol.max(), key
            elif not _same_values(saved, base):
                differ.append(key)
        assert not no_base, f"{saved_path.name}: {len(no_base)} saved tensors with no base tensor: {no_base[:10]}"
        assert not differ, f"{saved_path.name}: {len(differ)} untargeted tensors differ from the base: {differ[:10]}"
    return len(keys)


def _same_values(saved: torch.Tensor, base: torch.Tensor) -> bool:
    """Bit for bit: the saved tensor holds exactly the base values (a wider saved dtype represents them exactly)."""
    if saved.dtype == base.dtype:
        return torch.equal(saved, base)
    widening = saved.is_floating_point() and base.is_floating_point() and \
        torch.finfo(saved.dtype).bits >= torch.finfo(base.dtype).bits and saved.dtype != torch.bfloat16
    return torch.equal(saved, base.to(saved.dtype)) and (widening or torch.equal(saved.to(base.dtype), base))


def _saved(comfy, subfolder: str, prefix: str, since: float) -> list[Path]:
    """Files a save node wrote under output/<subfolder>/<prefix>_* after `since` (oldest first)."""
    files = [p for p in (comfy.output_dir / subfolder).glob(f"{prefix}_*.safetensors") if p.stat().st_mtime >= since]
    return sorted(files, key=lambda p: p.stat().st_mtime_ns)


def _report(run, node_id: str) -> tuple[dict, str]:
    ui = run.outputs[node_id]
    assert set(ui) >= {"hadakron_report", "text"}, ui.keys()
    return json.loads(ui["hadakron_report"][0]), ui["text"][0]


def _check_report(report: dict, text: str, family: str, modules: Mapping[tuple[str, str], str], name: str) -> None:
    n = len(modules)
    assert report["family"] == family and report["source"] == name, report
    assert report["matched_count"] == n and report["patches_added"] == n and report["unmatched_count"] == 0, \
        {k: report[k] for k in ("matched_count", "patches_added", "unmatched", "problems")}
    assert {(m["part"], m["layer"]) for m in report["matched"]} == set(modules)
    assert f"{n}/{n} modules applied" in text, text


def _free(paths) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


# ---------------------------------------------------------------- SDXL


def _sdxl_shapes(env, sdxl_files) -> dict[tuple[str, str], tuple[int, ...]]:
    shapes = {("unet", m): s for m, s in sdxl_files.unet_layers.items()}
    shapes |= {("te1", m): s for m, s in sdxl_files.clip_l_layers.items()}
    shapes |= {("te2", m): s for m, s in sdxl_files.clip_g_layers(env).items()}
    return shapes


@pytest.mark.slow  # CI: test_server_loader_matrix.py bakes every form and layout in one prompt
@pytest.mark.parametrize("form_set", ["loha", "lokr"])
def test_sdxl_loader_bakes_exactly_through_model_and_clip_save(comfy, comfy_env, sdxl_files, server_lora, form_set):
    t0 = time.time()
    modules = SDXL_LOHA if form_set == "loha" else SDXL_LOKR
    name = f"srv_sdxl_{form_set}.safetensors"
    params = _write_adapter(server_lora, name, modules, _sdxl_shapes(comfy_env, sdxl_files), seed=11)
    s_model, s_clip = 0.7, -1.3
    prefix = f"srv_sdxl_{form_set}_{int(t0)}"

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    loader = g.node("HadakronLoader", model=ckpt[0], clip=ckpt[1], lora_name=name,
                    strength_model=s_model, strength_clip=s_clip, block_weights="")
    g.node("ModelSave", model=loader[0], filename_prefix=f"diffusion_models/{prefix}")
    g.node("CLIPSave", clip=loader[1], filename_prefix=f"clip/{prefix}")
    run = comfy.run(g)

    report, text = _report(run, loader.id)
    _check_report(report, text, "sdxl", modules, name)
    executed = run.events_of("executed")
    assert any(e["node"] == loader.id and "hadakron_report" in (e.get("output") or {}) for e in executed)

    (unet_file,) = _saved(comfy, "diffusion_models", prefix, t0)
    unet_targets = {sdxl_files.unet_key(m): params[(p, m)] for (p, m) in modules if p == "unet"}
    n_unet = _assert_baked(unet_file, sdxl_files.weights.get, unet_targets, s_model)
    assert n_unet == sum(1 for k in sdxl_files.weights if k.startswith(sdxl_files.unet_prefix))

    clip_base = sdxl_files.clip_weights(comfy_env)
    clip_files = _saved(comfy, "clip", prefix, t0)
    assert {p.name for p in clip_files} == {f"{prefix}_{c}_00001_.safetensors" for c in ("clip_l", "clip_g")}, \
        [p.name for p in clip_files]
    for path in clip_files:
        part_name = "clip_l" if f"{prefix}_clip_l_" in path.name else "clip_g"
        part = {"clip_l": "te1", "clip_g": "te2"}[part_name]
        targets = {f"{m}.weight": params[(p, m)] for (p, m) in modules if p == part}
        # SGM checkpoints carry no CLIP-L projection / logit scale: ComfyUI's own (unloaded) tensors, never patched
        extras = frozenset({"logit_scale", "text_projection.weight"}) if part_name == "clip_l" else frozenset()
        _assert_baked(path, clip_base[part_name].get, targets, s_clip, extras)
    _free([unet_file, *clip_files])
    print(f"\n[time] sdxl {form_set}: {time.time() - t0:.1f} s (prompt {run.seconds:.1f} s)")


def test_sdxl_sampling_matches_core_lora_loader_on_plain_loha(comfy, comfy_env, sdxl_files, server_lora, input_image):
    """Same seed, same LoHa file: our loader and ComfyUI's LoraLoader give the same image; unpatched differs."""
    t0 = time.time()
    modules = {k: "loha" for k in SDXL_LOHA if SDXL_LOHA[k] == "loha"}  # core computes plain LoHa correctly
    name = "srv_sdxl_plain_loha.safetensors"
    _write_adapter(server_lora, name, modules, _sdxl_shapes(comfy_env, sdxl_files), seed=23)
    s_model, s_clip = 0.8, 1.0

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    img = g.node("LoadImage", image=input_image)
    enc = g.node("VAEEncode", pixels=img[0], vae=ckpt[2])
    ours = g.node("HadakronLoader", model=ckpt[0], clip=ckpt[1], lora_name=name, strength_model=s_model,
                  strength_clip=s_clip, block_weights="")
    core = g.node("LoraLoader", model=ckpt[0], clip=ckpt[1], lora_name=name, strength_model=s_model,
                  strength_clip=s_clip)
    outs = {}
    for tag, model, clip in (("ours", ours[0], ours[1]), ("core", core[0], core[1]), ("base", ckpt[0], ckpt[1])):
        pos = g.node("CLIPTextEncode", text="a photo of a cat", clip=clip)
        ks = g.node("KSampler", model=model, seed=5, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
                    positive=pos[0], negative=pos[0], latent_image=enc[0], denoise=0.8)
        dec = g.node("VAEDecode", samples=ks[0], vae=ckpt[2])
        outs[tag] = (g.node("SaveLatent", samples=ks[0], filename_prefix=f"latents/srv_cmp_{tag}").id,
                     g.node("SaveImage", images=dec[0], filename_prefix=f"srv_cmp_{tag}").id)
    run = comfy.run(g)

    from PIL import Image
    from safetensors.torch import load_file
    lat, pix = {}, {}
    for tag, (lat_id, img_id) in outs.items():
        (item,) = run.outputs[lat_id]["latents"]
        lat[tag] = load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"].double()
        (item,) = run.outputs[img_id]["images"]
        pix[tag] = np.asarray(Image.open(io.BytesIO(comfy.view(item["filename"], item["subfolder"]))), dtype=np.int16)
        assert torch.isfinite(lat[tag]).all(), tag
    scale = lat["base"].abs().max().item()
    diff_core = (lat["ours"] - lat["core"]).abs().max().item()
    diff_base = (lat["ours"] - lat["base"]).abs().max().item()
    assert diff_core <= 1e-4 * scale, f"ours vs core LoraLoader latents differ by {diff_core:.3g} (scale {scale:.3g})"
    assert diff_base > 1e-2 * scale, f"the LoHa did not change the sample ({diff_base:.3g})"
    assert np.abs(pix["ours"] - pix["core"]).max() <= 1
    assert np.abs(pix["ours"] - pix["base"]).mean() > 1.0
    print(f"\n[time] sdxl ours-vs-core sampling: {time.time() - t0:.1f} s (prompt {run.seconds:.1f} s); latent "
          f"max |base| {scale:.3g}, |ours-core| {diff_core:.2g}, |ours-base| {diff_base:.2g}")


def test_requeue_is_cached_and_a_replaced_file_is_reloaded(comfy, comfy_env, sdxl_files, server_lora):
    t0 = time.time()
    modules = {("unet", "input_blocks.5.1.transformer_blocks.1.attn1.to_v"): "lokr_lowrank",
               ("unet", "output_blocks.4.0.in_layers.2"): "loha"}
    shapes = _sdxl_shapes(comfy_env, sdxl_files)
    name = "srv_sdxl_replaced.safetensors"
    first = _write_adapter(server_lora, name, modules, shapes, seed=31)
    prefix = f"srv_replaced_{int(t0)}"
    s_model = 1.5

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    loader = g.node("HadakronLoaderModelOnly", model=ckpt[0], lora_name=name, strength_model=s_model,
                    block_weights="")
    save = g.node("ModelSave", model=loader[0], filename_prefix=f"diffusion_models/{prefix}")
    base_of = sdxl_files.weights.get

    run1 = comfy.run(g)
    assert loader.id in run1.executed_nodes and save.id in run1.executed_nodes
    (file1,) = _saved(comfy, "diffusion_models", prefix, t0)
    _assert_baked(file1, base_of, {sdxl_files.unet_key(m): first[(p, m)] for p, m in modules}, s_model)

    run2 = comfy.run(g)
    assert {ckpt.id, loader.id, save.id} <= set(run2.cached_nodes), run2.cached_nodes
    assert loader.id not in run2.executed_nodes and save.id not in run2.executed_nodes, run2.executed_nodes
    assert _saved(comfy, "diffusion_models", prefix, t0) == [file1], "a cached prompt wrote a new file"

    time.sleep(0.05)  # a new mtime even on coarse clocks
    second = _write_adapter(server_lora, name, modules, shapes, seed=32)
    path = comfy.models_dir("loras") / name
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    run3 = comfy.run(g)
    assert loader.id in run3.executed_nodes and save.id in run3.executed_nodes, run3.executed_nodes
    assert ckpt.id in run3.cached_nodes
    files = _saved(comfy, "diffusion_models", prefix, t0)
    assert len(files) == 2 and files[0] == file1, files
    _assert_baked(files[1], base_of, {sdxl_files.unet_key(m): second[(p, m)] for p, m in modules}, s_model)
    _free(files)
    print(f"\n[time] requeue/replace: {time.time() - t0:.1f} s "
          f"(prompts {run1.seconds:.1f} / {run2.seconds:.1f} / {run3.seconds:.1f} s)")


# ---------------------------------------------------------------- Anima


@pytest.mark.slow  # CI: test_server_loader_matrix.py covers Anima
def test_anima_loader_bakes_exactly_through_model_and_clip_save(comfy, anima_files, server_lora):
    t0 = time.time()
    shapes = {("unet", m): s for m, s in anima_files.unet_layers.items()}
    shapes |= {("te", m): s for m, s in anima_files.te_layers.items()}
    name = "srv_anima_mixed.safetensors"
    params = _write_adapter(server_lora, name, ANIMA_MIXED, shapes, seed=41)
    s_model, s_clip = 1.2, 0.6
    prefix = f"srv_anima_{int(t0)}"

    g = Graph()
    unet = g.node("UNETLoader", unet_name=anima_files.unet, weight_dtype="default")
    clip = g.node("CLIPLoader", clip_name=anima_files.text_encoder, type=anima_files.clip_type)
    loader = g.node("HadakronLoader", model=unet[0], clip=clip[0], lora_name=name, strength_model=s_model,
                    strength_clip=s_clip, block_weights="")
    g.node("ModelSave", model=loader[0], filename_prefix=f"diffusion_models/{prefix}")
    g.node("CLIPSave", clip=loader[1], filename_prefix=f"clip/{prefix}")
    run = comfy.run(g)

    report, text = _report(run, loader.id)
    _check_report(report, text, "anima", ANIMA_MIXED, name)

    (unet_file,) = _saved(comfy, "diffusion_models", prefix, t0)
    dm = "model.diffusion_model."
    unet_w = anima_files.unet_weights

    def unet_base(key: str):
        return unet_w.get(anima_files.unet_prefix + key[len(dm):]) if key.startswith(dm) else None
    targets = {anima_files.saved_unet_key(m): params[(p, m)] for (p, m) in ANIMA_MIXED if p == "unet"}
    n = _assert_baked(unet_file, unet_base, targets, s_model)
    assert n == len(unet_w)

    (te_file,) = _saved(comfy, "clip", prefix, t0)
    te_w = anima_files.te_weights
    te_prefix = "qwen3_06b.transformer."

    def te_base(key: str):
        return te_w.get(key[len(te_prefix):]) if key.startswith(te_prefix) else None
    targets = {f"{te_prefix}model.{m}.weight": params[(p, m)] for (p, m) in ANIMA_MIXED if p == "te"}
    # SDClipModel's logit_scale is ComfyUI's own parameter (no Qwen3 file has it); everything else is the file's
    _assert_baked(te_file, te_base, targets, s_clip, extras=frozenset({"qwen3_06b.logit_scale"}))
    _free([unet_file, te_file])
    print(f"\n[time] anima mixed: {time.time() - t0:.1f} s (prompt {run.seconds:.1f} s)")


def test_anima_report_and_block_weights_follow_the_models_ten_blocks(comfy, anima_files, server_lora):
    """ComfyUI builds 10 DiT blocks at narrow widths (not sd-scripts' 28): a file on every block, plus two blocks past
    the model, reports blocks.0..blocks.9 with the two extras as beyond its 10 blocks; `blocks.10=` is refused."""
    depth = 1 + max(int(m.split(".")[1]) for m in anima_files.unet_layers if m.startswith("blocks."))
    assert depth == 10  # what ComfyUI builds from the small DiT file
    shape = anima_files.unet_layers["blocks.0.self_attn.q_proj"]
    on_model = {("unet", f"blocks.{i}.self_attn.q_proj"): "lokr_lowrank" for i in range(depth)}
    beyond = {("unet", "blocks.10.self_attn.q_proj"): "loha", ("unet", "blocks.27.self_attn.q_proj"): "loha"}
    name = "srv_anima_every_block.safetensors"
    _write_adapter(server_lora, name, on_model | beyond, {k: shape for k in on_model | beyond}, seed=43)

    def prompt(block_weights: str):
        g = Graph()
        unet = g.node("UNETLoader", unet_name=anima_files.unet, weight_dtype="default")
        loader = g.node("HadakronLoaderModelOnly", model=unet[0], lora_name=name, strength_model=1.0,
                        block_weights=block_weights)
        g.node("PreviewAny", source=loader[1])
        return g, loader

    g, loader = prompt("blocks.9=0.5")
    report, text = _report(comfy.run(g), loader.id)
    assert report["by_block"] == {"unet": {f"blocks.{i}": 1 for i in range(depth)}}, report["by_block"]
    assert report["depths"] == {"unet": depth} and report["patches_added"] == depth
    assert sorted(u["key"] for u in report["unmatched"]) == ["lora_unet_blocks_10_self_attn_q_proj",
                                                            "lora_unet_blocks_27_self_attn_q_proj"]
    for u in report["unmatched"]:
        assert u["kind"] == "not_in_model" and "beyond its depth (10 blocks, blocks.0..blocks.9)" in u["reason"], u
    cells = [c["block"] for c in report["delta_norms"]["cells"]]
    assert cells == [f"blocks.{i}" for i in range(depth)] + ["llm_adapter", "OTHER"], cells
    assert f"unet of {depth} blocks: {depth} (blocks.0 1, " in text, text

    g, loader = prompt("blocks.10=0")
    run = comfy.run(g, expect_error=True)
    message = (run.error or {}).get("exception_message", "")
    assert "'blocks.10' is out of range: this Anima model has 10 blocks" in message, run.error
    assert "the last is blocks.9" in message, message
