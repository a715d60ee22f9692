"""Adapter Merge and Adapter Combine through POST /prompt on the real server, fed by the core loader nodes.

- Adapter Merge (a LoHa file at 0.7 and a LoKr file at -0.4, UNet and text-encoder modules) -> ModelSave /
  CheckpointSave: every targeted tensor is the float64 W + sum s_i * dW_i rounded once to the saved dtype (float32
  math allowed for), every other tensor is the base file's bit for bit; a later prompt's ModelSave of the cached base
  model shows the merge left the loaded model untouched; the saved checkpoint reloads with CheckpointLoaderSimple and
  samples.
- Adapter Combine (exact, rank 0) -> a LoRA file under output/loras -> core LoraLoader in the next prompt ->
  ModelSave: W + sum s_i * dW_i within the rounding of the file's fp16 factors.
The references are `adapter_forms.reference_delta` (float64, independent of hadakron.ops) on the adapter tensors
as written, and the base tensors are read from the model files themselves.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_forms import make_params, reference_delta
from comfy_client import Graph
from model_files import SafetensorsWeights

LOHA_STRENGTH, LOKR_STRENGTH = 0.7, -0.4
EPS32 = torch.finfo(torch.float32).eps

UNET_Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
UNET_FF = "input_blocks.4.1.transformer_blocks.0.ff.net.2"
UNET_CONV = "input_blocks.1.0.in_layers.2"
CLIP_L_Q = "text_model.encoder.layers.0.self_attn.q_proj"
CLIP_G_K = "text_model.encoder.layers.1.self_attn.k_proj"
# CLIP-G's k_proj is rows [h, 2h) of OpenCLIP's fused in_proj_weight in the checkpoint (and in CheckpointSave's file)
CLIP_G_IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."

ANIMA_Q = "blocks.0.self_attn.q_proj"
ANIMA_MLP = "blocks.3.mlp.layer1"
ANIMA_LLM = "llm_adapter.blocks.0.cross_attn.q_proj"
ANIMA_TE_UP = "layers.1.mlp.up_proj"


# ---------------------------------------------------------------- adapter files and references


@dataclass
class Target:
    """One saved tensor the adapters change: its key in the saved file, its key in the base file, the rows the
    modules cover, and the (params, strength) of each module on it."""

    saved_key: str
    base_key: str
    rows: tuple[int, int] | None = None
    modules: list[tuple[dict[str, torch.Tensor], float]] = field(default_factory=list)


def write_loras(folder: Path, files: dict[str, dict[str, dict[str, torch.Tensor]]]) -> list[Path]:
    """Write {file name: {module key: params}} as kohya-layout .safetensors into `folder` (temp file + rename)."""
    paths = []
    for name, modules in files.items():
        tensors = {f"{mk}.{p}": t.contiguous() for mk, params in modules.items() for p, t in params.items()}
        tmp = folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / name)
        paths.append(folder / name)
    return paths


def kohya_key(part: str, dotted: str) -> str:
    return f"lora_{part}_{dotted.replace('.', '_')}"


def merged_reference(base: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """(W + sum s_i dW_i in float64, |W| + sum |s_i| dW_i(|factors|)): the second is the sum of the magnitudes of
    every product term, the scale of float32 rounding error in computing the first (cancellation included)."""
    w = base.to(torch.float64)
    ref, scale = w.clone(), w.abs()
    r0, r1 = target.rows or (0, w.shape[0])
    shape = tuple(w[r0:r1].shape)
    for params, strength in target.modules:
        ref[r0:r1] += strength * reference_delta(params, shape)
        scale[r0:r1] += abs(strength) * reference_delta({k: v.abs() for k, v in params.items()}, shape)
    return ref, scale


def assert_rounded_once(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, label: str) -> None:
    """`got` is `ref` rounded once to got's dtype, up to float32 arithmetic: |got - ref| <= ulp/2 + 8 eps32 scale."""
    assert got.shape == ref.shape, (label, got.shape, ref.shape)
    assert torch.isfinite(got).all(), label
    finfo = torch.finfo(got.dtype)
    # half a unit in the last place of ref in got's dtype (the one rounding), plus float32 math on the terms
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(finfo.tiny)))) * finfo.eps
    err = (got.to(torch.float64) - ref).abs()
    bound = 0.5 * ulp + 8 * EPS32 * scale + finfo.tiny
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{label}: |saved - float64 reference| exceeds one rounding to {got.dtype} at flat index {worst}: "
        f"error {err.flatten()[worst]:.3g}, bound {bound.flatten()[worst]:.3g}, "
        f"{int((err > bound).sum())} of {err.numel()} elements")
    if got.dtype == torch.float16:
        exact = (got == ref.to(torch.float16)).double().mean().item()
        assert exact > 0.99, f"{label}: only {exact:.4f} of the elements equal round(reference) exactly"


def new_files(folder: Path, before: set[Path]) -> list[Path]:
    return sorted(p for p in folder.rglob("*.safetensors") if p not in before)


def saved_by(comfy, graph: Graph, subfolder: str, **run_kw):
    """Run `graph` and return (run, [files it added under output/<subfolder>])."""
    folder = comfy.output_dir / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.rglob("*.safetensors"))
    run = comfy.run(graph, **run_kw)
    return run, new_files(folder, before)


def compare_saved(saved_path: Path, base_files: list[tuple[str, str, SafetensorsWeights]],
                  targets: list[Target]) -> int:
    """Every tensor of `saved_path` under one of `base_files`' (saved prefix, base prefix, weights) equals the base
    bit for bit, except `targets`, which are checked against the float64 reference; returns the tensors checked."""
    by_saved = {t.saved_key: t for t in targets}
    checked = 0
    with safe_open(str(saved_path), framework="pt") as saved:
        keys = set(saved.keys())
        for saved_prefix, base_prefix, weights in base_files:
            expected = {saved_prefix + k[len(base_prefix):]: k for k in weights if k.startswith(base_prefix)}
            missing = sorted(set(expected) - keys)
            assert not missing, f"{saved_path.name} lacks {len(missing)} base tensors, e.g. {missing[:3]}"
            with safe_open(str(weights.path), framework="pt") as base_file:
                for skey, bkey in expected.items():
                    got, base = saved.get_tensor(skey), base_file.get_tensor(bkey)
                    _check_tensor(skey, bkey, got, base, by_saved.get(skey))
                    checked += 1
    assert set(by_saved) <= keys, sorted(set(by_saved) - keys)
    return checked


def _check_tensor(skey: str, bkey: str, got: torch.Tensor, base: torch.Tensor, target: Target | None) -> None:
    """A targeted tensor against the float64 reference (rows outside the modules' slice: the base's); any other
    tensor bit for bit the base's (values compared exactly; ComfyUI on CPU saves the fp16 UNet as float32)."""
    if target is None:
        # equal values both ways round (an exact upcast, e.g. fp16 -> float32, passes; any changed value does not)
        same = (got.shape == base.shape and torch.equal(got, base.to(got.dtype))
                and torch.equal(got.to(base.dtype), base))
        assert same, (f"{skey}: not bit for bit the base tensor {bkey} "
                      f"(max diff {(got.double() - base.double()).abs().max():.3g})")
        return
    ref, scale = merged_reference(base, target)
    assert_rounded_once(got, ref, scale, skey)
    if target.rows is not None:
        r0, r1 = target.rows
        rest = torch.cat([got[:r0], got[r1:]]).to(torch.float64)
        assert torch.equal(rest, torch.cat([base[:r0], base[r1:]]).to(torch.float64)), skey


# ---------------------------------------------------------------- SDXL adapters


@dataclass
class SDXLAdapters:
    loha: str
    lokr: str
    modules: dict[str, dict[str, dict[str, torch.Tensor]]]
    unet_targets: list[Target]
    clip_targets: list[Target]


@pytest.fixture(scope="module")
def sdxl_adapters(comfy, sdxl_files):
    """Two files in models/loras: a LoHa (UNet q, UNet 3x3 conv in Tucker form, CLIP-L q) and a LoKr (UNet q,
    UNet ff, CLIP-G k): q gets both adapters, CLIP-G k is a row slice of the checkpoint's fused in_proj."""
    shapes = sdxl_files.weights.shapes
    in_proj = shapes[CLIP_G_IN_PROJ]
    hidden = in_proj[1]
    assert in_proj == (3 * hidden, hidden), in_proj
    unet, clip_l = sdxl_files.unet_layers, sdxl_files.clip_l_layers
    g = torch.Generator().manual_seed(11)
    loha = {kohya_key("unet", UNET_Q): make_params("loha", unet[UNET_Q], g, rank=2, alpha=0.5),
            kohya_key("unet", UNET_CONV): make_params("loha_tucker", unet[UNET_CONV], g, rank=2, alpha=0.5),
            kohya_key("te1", CLIP_L_Q): make_params("loha", clip_l[CLIP_L_Q], g, rank=2, alpha=0.5)}
    lokr = {kohya_key("unet", UNET_Q): make_params("lokr_lowrank", unet[UNET_Q], g, rank=2, alpha=0.5),
            kohya_key("unet", UNET_FF): make_params("lokr_full", unet[UNET_FF], g, rank=2, alpha=0.5),
            kohya_key("te2", CLIP_G_K): make_params("lokr_both", (hidden, hidden), g, rank=2, alpha=0.5)}
    names = {"server_merge_loha.safetensors": loha, "server_merge_lokr.safetensors": lokr}
    paths = write_loras(comfy.models_dir("loras"), names)

    def unet_target(dotted, *mods):
        key = sdxl_files.unet_key(dotted)
        return Target(key, key, None, list(mods))
    unet_targets = [
        unet_target(UNET_Q, (loha[kohya_key("unet", UNET_Q)], LOHA_STRENGTH),
                    (lokr[kohya_key("unet", UNET_Q)], LOKR_STRENGTH)),
        unet_target(UNET_CONV, (loha[kohya_key("unet", UNET_CONV)], LOHA_STRENGTH)),
        unet_target(UNET_FF, (lokr[kohya_key("unet", UNET_FF)], LOKR_STRENGTH)),
    ]
    clip_l_key = f"{CLIP_L_PREFIX}{CLIP_L_Q}.weight"
    clip_targets = [Target(clip_l_key, clip_l_key, None, [(loha[kohya_key("te1", CLIP_L_Q)], LOHA_STRENGTH)]),
                    Target(CLIP_G_IN_PROJ, CLIP_G_IN_PROJ, (hidden, 2 * hidden),
                           [(lokr[kohya_key("te2", CLIP_G_K)], LOKR_STRENGTH)])]
    yield SDXLAdapters("server_merge_loha.safetensors", "server_merge_lokr.safetensors",
                       {"loha": loha, "lokr": lokr}, unet_targets, clip_targets)
    for p in paths:
        p.unlink(missing_ok=True)


def merge_node(g: Graph, model, clip, adapters: SDXLAdapters):
    return g.node("HadakronAdapterMerge", model=model, clip=clip, adapter_1=adapters.loha, strength_1=LOHA_STRENGTH,
                  adapter_2=adapters.lokr, strength_2=LOKR_STRENGTH)


def assert_merge_report(run, node, adapters: SDXLAdapters) -> None:
    (text,) = run.outputs[node.id]["text"]
    assert f"{adapters.loha} @ 0.7: 3 modules applied, 0 not applied" in text, text
    assert f"{adapters.lokr} @ -0.4: 3 modules applied, 0 not applied" in text, text
    assert "5 weights merged (3 in the model, 2 in the text encoders)" in text, text


def test_sdxl_merge_model_save_is_exact_and_base_model_untouched(comfy, sdxl_files, sdxl_adapters):
    """Adapter Merge -> ModelSave: targeted UNet weights = float64 reference rounded once, the rest the base's;
    then ModelSave of the (cached) base model in the next prompt equals the checkpoint file bit for bit."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    merge = merge_node(g, ckpt[0], ckpt[1], sdxl_adapters)
    g.node("ModelSave", model=merge[0], filename_prefix="diffusion_models/server_merge_sdxl_merged")
    run, files = saved_by(comfy, g, "diffusion_models")
    assert [p.name for p in files] == ["server_merge_sdxl_merged_00001_.safetensors"], files
    assert_merge_report(run, merge, sdxl_adapters)
    unet = [("model.diffusion_model.", "model.diffusion_model.", sdxl_files.weights)]
    checked = compare_saved(files[0], unet, sdxl_adapters.unet_targets)
    assert checked == sum(1 for k in sdxl_files.weights if k.startswith("model.diffusion_model.")), checked

    # the loaded base model (served from the executor's cache) is untouched by the merge prompt
    g2 = Graph()
    ckpt2 = g2.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    g2.node("ModelSave", model=ckpt2[0], filename_prefix="diffusion_models/server_merge_sdxl_base_after")
    run2, files2 = saved_by(comfy, g2, "diffusion_models")
    assert ckpt2.id in run2.cached_nodes, (
        "CheckpointLoaderSimple ran again instead of serving the model the merge prompt used: "
        f"cached {run2.cached_nodes}, executed {run2.executed_nodes}")
    assert len(files2) == 1, files2
    compare_saved(files2[0], unet, [])


def _sample_graph(g: Graph, model, clip, vae, prefix: str) -> dict[str, str]:
    pos = g.node("CLIPTextEncode", text="a photo of a cat", clip=clip)
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    # cfg 1: one UNet call per step on these CPUs
    ks = g.node("KSampler", model=model, seed=3, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
                positive=pos[0], negative=pos[0], latent_image=lat[0], denoise=1.0)
    dec = g.node("VAEDecode", samples=ks[0], vae=vae)
    return {"latent": g.node("SaveLatent", samples=ks[0], filename_prefix=f"latents/{prefix}").id,
            "image": g.node("SaveImage", images=dec[0], filename_prefix=prefix).id}


@pytest.mark.slow
def test_sdxl_merge_checkpoint_save_exact_then_reload_and_sample(comfy, sdxl_files, sdxl_adapters):
    """Adapter Merge -> CheckpointSave: UNet, CLIP-L and CLIP-G (a row slice of in_proj) targets = float64
    reference rounded once, all other tensors the base's; CheckpointLoaderSimple reloads the file and samples."""
    from PIL import Image

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    merge = merge_node(g, ckpt[0], ckpt[1], sdxl_adapters)
    g.node("CheckpointSave", model=merge[0], clip=merge[1], vae=ckpt[2],
           filename_prefix="checkpoints/server_merge_sdxl_ckpt")
    run, files = saved_by(comfy, g, "checkpoints")
    assert [p.name for p in files] == ["server_merge_sdxl_ckpt_00001_.safetensors"], files
    assert_merge_report(run, merge, sdxl_adapters)
    everything = [("", "", sdxl_files.weights)]
    checked = compare_saved(files[0], everything, sdxl_adapters.unet_targets + sdxl_adapters.clip_targets)
    assert checked == len(sdxl_files.weights)

    # ComfyUI's main.py lists output/checkpoints among the checkpoint folders: reload it by name and sample
    g2 = Graph()
    reloaded = g2.node("CheckpointLoaderSimple", ckpt_name=files[0].name)
    ids = _sample_graph(g2, reloaded[0], reloaded[1], reloaded[2], "server_merge_reloaded")
    log_start = len(comfy.log.read_text(errors="replace"))
    run2 = comfy.run(g2)
    log = comfy.log.read_text(errors="replace")[log_start:]
    assert "Requested to load SDXL" in log and "missing" not in log and "left over keys" not in log, log[-3000:]
    (item,) = run2.outputs[ids["latent"]]["latents"]
    with safe_open(str(comfy.output_dir / item["subfolder"] / item["filename"]), framework="pt") as f:
        latent = f.get_tensor("latent_tensor")
    assert tuple(latent.shape) == (1, 4, 8, 8) and torch.isfinite(latent).all() and latent.abs().max() > 0
    (img,) = run2.outputs[ids["image"]]["images"]
    image = np.asarray(Image.open(io.BytesIO(comfy.view(img["filename"], img["subfolder"], img["type"]))))
    assert image.shape == (64, 64, 3) and image.std() > 0.5, (image.shape, image.std())
    assert "invalid value encountered" not in log, "NaN/inf reached SaveImage"


# ---------------------------------------------------------------- Adapter Combine -> core LoraLoader


def lora_factor_bound(tensors: dict[str, torch.Tensor], module: str, shape: tuple[int, ...]) -> torch.Tensor:
    """How far rounding the file's up/down factors (and ComfyUI's float32 up @ down) can move delta-W, per element:
    scale * ((eps + rank eps32) |up| @ |down| + sub/2 (row sums of |up| + column sums of |down|)), where a factor
    element rounds by at most eps/2 of itself or half the smallest subnormal `sub` of the file dtype."""
    up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
    rank = down.shape[0]
    alpha = float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else rank
    finfo = torch.finfo(up.dtype)
    u = up.abs().double().reshape(up.shape[0], rank)
    d = down.abs().double().reshape(rank, -1)
    relative = (finfo.eps + rank * EPS32) * (u @ d)
    underflow = 0.5 * finfo.tiny * finfo.eps * (u.sum(1, keepdim=True) + d.sum(0, keepdim=True))
    return abs(alpha / rank) * (relative + underflow).reshape(shape)


def test_combine_writes_lora_that_core_lora_loader_applies(comfy, sdxl_files, sdxl_adapters):
    """Adapter Combine (rank 0, fp16) -> file in output/loras -> next prompt: LoraLoader -> ModelSave shows
    W + 0.7 dW_loha - 0.4 dW_lokr within the rounding of the file's fp16 factors (float32 math on top)."""
    g = Graph()
    # named but unconnected (never run): the executor's RAM cache keeps the checkpoint for the next prompt
    g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    comb = g.node("HadakronAdapterCombine", adapter_1=sdxl_adapters.loha, strength_1=LOHA_STRENGTH,
                  adapter_2=sdxl_adapters.lokr, strength_2=LOKR_STRENGTH, rank=0,
                  filename_prefix="loras/server_combined", layout="kohya", dtype="fp16")
    run, files = saved_by(comfy, g, "loras")
    assert [p.name for p in files] == ["server_combined_00001_.safetensors"], files
    (text,) = run.outputs[comb.id]["text"]
    first = text.splitlines()[0]
    # the report names the file it wrote relative to the output folder, as core's save nodes do
    assert first == "wrote loras/server_combined_00001_.safetensors", text
    assert (comfy.output_dir / first[len("wrote "):]).resolve() == files[0].resolve(), (first, files)
    assert "exact" in text, text
    leftovers = [p.name for p in (comfy.output_dir / "loras").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temp files left in output/loras: {leftovers}"

    with safe_open(str(files[0]), framework="pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for k, t in lora.items() if not k.endswith(".alpha")} == {torch.float16}
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    assert modules == {kohya_key("unet", d) for d in (UNET_Q, UNET_CONV, UNET_FF)} | \
        {kohya_key("te1", CLIP_L_Q), kohya_key("te2", CLIP_G_K)}, sorted(modules)

    # ComfyUI lists output/loras among the loras folders (main.py), so the file is picked by its name there
    lora_name = files[0].relative_to(comfy.output_dir / "loras").as_posix()
    g2 = Graph()
    ckpt = g2.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    loaded = g2.node("LoraLoader", model=ckpt[0], clip=ckpt[1], lora_name=lora_name, strength_model=1.0,
                     strength_clip=1.0)
    g2.node("ModelSave", model=loaded[0], filename_prefix="diffusion_models/server_combined_lora_loader")
    log_start = len(comfy.log.read_text(errors="replace"))
    run2, saved = saved_by(comfy, g2, "diffusion_models")
    log = comfy.log.read_text(errors="replace")[log_start:]
    assert "lora key not loaded" not in log, log[-3000:]
    assert len(saved) == 1, saved
    untouched = [sdxl_files.unet_key(d) for d in ("input_blocks.4.1.transformer_blocks.0.attn1.to_k",
                                                  "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
                                                  "input_blocks.1.0.in_layers.0")]
    with safe_open(str(saved[0]), framework="pt") as f:
        for target in sdxl_adapters.unet_targets:
            got = f.get_tensor(target.saved_key).to(torch.float64)
            base = sdxl_files.weights[target.base_key]
            ref, scale = merged_reference(base, target)
            dotted = target.base_key[len("model.diffusion_model."):-len(".weight")]
            bound = lora_factor_bound(lora, kohya_key("unet", dotted), tuple(base.shape)) + 8 * EPS32 * scale
            err = (got - ref).abs()
            assert bool((err <= bound).all()), (
                f"{target.saved_key}: LoraLoader's weight is off the reference by {err.max():.3g} "
                f"(bound there {bound.flatten()[int(torch.argmax(err))]:.3g})")
            assert (got - base.double()).abs().max() > 20 * bound.max(), "the LoRA changed nothing measurable"
        for key in untouched:
            assert torch.equal(f.get_tensor(key).double(), sdxl_files.weights[key].double()), key


# ---------------------------------------------------------------- Anima: UNETLoader + CLIPLoader -> merge


@pytest.mark.slow
def test_anima_merge_model_save_and_clip_save_are_exact(comfy, anima_files):
    """UNETLoader + CLIPLoader -> Adapter Merge (LoHa + LoKr on the DiT, LLM adapter and Qwen3) -> ModelSave
    and CLIPSave: targets = float64 reference rounded once, all other tensors the base files' bit for bit."""
    unet, te = anima_files.unet_layers, anima_files.te_layers
    g = torch.Generator().manual_seed(12)
    loha = {kohya_key("unet", ANIMA_Q): make_params("loha", unet[ANIMA_Q], g, rank=2, alpha=0.5),
            kohya_key("te", ANIMA_TE_UP): make_params("loha", te[ANIMA_TE_UP], g, rank=2, alpha=0.5)}
    lokr = {kohya_key("unet", ANIMA_Q): make_params("lokr_both", unet[ANIMA_Q], g, rank=2, alpha=0.5),
            kohya_key("unet", ANIMA_MLP): make_params("lokr_lowrank", unet[ANIMA_MLP], g, rank=2, alpha=0.5),
            kohya_key("unet", ANIMA_LLM): make_params("lokr_full", unet[ANIMA_LLM], g, rank=2, alpha=0.5)}
    names = {"server_merge_anima_loha.safetensors": loha, "server_merge_anima_lokr.safetensors": lokr}
    paths = write_loras(comfy.models_dir("loras"), names)
    try:
        graph = Graph()
        model = graph.node("UNETLoader", unet_name=anima_files.unet, weight_dtype="default")
        clip = graph.node("CLIPLoader", clip_name=anima_files.text_encoder, type=anima_files.clip_type)
        merge = graph.node("HadakronAdapterMerge", model=model[0], clip=clip[0],
                           adapter_1="server_merge_anima_loha.safetensors", strength_1=LOHA_STRENGTH,
                           adapter_2="server_merge_anima_lokr.safetensors", strength_2=LOKR_STRENGTH)
        graph.node("ModelSave", model=merge[0], filename_prefix="diffusion_models/server_merge_anima")
        graph.node("CLIPSave", clip=merge[1], filename_prefix="clip/server_merge_anima_te")
        before = {d: set((comfy.output_dir / d).rglob("*.safetensors")) for d in ("diffusion_models", "clip")}
        run = comfy.run(graph)
        (text,) = run.outputs[merge.id]["text"]
        assert "server_merge_anima_loha.safetensors @ 0.7: 2 modules applied, 0 not applied" in text, text
        assert "server_merge_anima_lokr.safetensors @ -0.4: 3 modules applied, 0 not applied" in text, text
        (dit_file,) = new_files(comfy.output_dir / "diffusion_models", before["diffusion_models"])
        (te_file,) = new_files(comfy.output_dir / "clip", before["clip"])

        def dit(dotted, *mods):
            return Target(anima_files.saved_unet_key(dotted), anima_files.unet_key(dotted), None, list(mods))
        dit_targets = [dit(ANIMA_Q, (loha[kohya_key("unet", ANIMA_Q)], LOHA_STRENGTH),
                           (lokr[kohya_key("unet", ANIMA_Q)], LOKR_STRENGTH)),
                       dit(ANIMA_MLP, (lokr[kohya_key("unet", ANIMA_MLP)], LOKR_STRENGTH)),
                       dit(ANIMA_LLM, (lokr[kohya_key("unet", ANIMA_LLM)], LOKR_STRENGTH))]
        checked = compare_saved(dit_file, [("model.diffusion_model.", "net.", anima_files.unet_weights)],
                                dit_targets)
        assert checked == len(anima_files.unet_weights)
        te_key = f"model.{ANIMA_TE_UP}.weight"
        te_targets = [Target(f"qwen3_06b.transformer.{te_key}", te_key, None,
                             [(loha[kohya_key("te", ANIMA_TE_UP)], LOHA_STRENGTH)])]
        checked = compare_saved(te_file, [("qwen3_06b.transformer.", "", anima_files.te_weights)], te_targets)
        assert checked == len(anima_files.te_weights)
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
