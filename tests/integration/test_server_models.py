"""The test model files (model_files.py) load in the real server with the core loader nodes and sample.

This proves the harness every server test builds on: CheckpointLoaderSimple detects the small SDXL checkpoint as
SDXL (MODEL, CLIP, VAE), UNETLoader + CLIPLoader + VAELoader load the small Anima files as Anima, and
CLIPTextEncode, VAEEncode, KSampler and VAEDecode run on them with finite results.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from comfy_client import Graph


def _latent(comfy, run, node: str) -> torch.Tensor:
    from safetensors.torch import load_file
    (item,) = run.outputs[node]["latents"]
    return load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def _image(comfy, run, node: str) -> np.ndarray:
    from PIL import Image
    (item,) = run.outputs[node]["images"]
    return np.asarray(Image.open(io.BytesIO(comfy.view(item["filename"], item["subfolder"], item["type"]))))


def _sample_graph(g: Graph, model, clip, vae, image_name: str, prefix: str) -> dict:
    pos = g.node("CLIPTextEncode", text="a photo of a cat", clip=clip)
    img = g.node("LoadImage", image=image_name)
    enc = g.node("VAEEncode", pixels=img[0], vae=vae)
    # cfg 1: ComfyUI skips the negative pass (one UNet call per step on these CPUs)
    ks = g.node("KSampler", model=model, seed=7, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
                positive=pos[0], negative=pos[0], latent_image=enc[0], denoise=0.75)
    dec = g.node("VAEDecode", samples=ks[0], vae=vae)
    return {"encoded": g.node("SaveLatent", samples=enc[0], filename_prefix=f"latents/{prefix}_enc").id,
            "sampled": g.node("SaveLatent", samples=ks[0], filename_prefix=f"latents/{prefix}_ks").id,
            "image": g.node("SaveImage", images=dec[0], filename_prefix=prefix).id}


def _check_samples(comfy, run, ids: dict, latent_shape: tuple[int, ...], log: str) -> None:
    encoded, sampled = _latent(comfy, run, ids["encoded"]), _latent(comfy, run, ids["sampled"])
    assert tuple(encoded.shape) == latent_shape and tuple(sampled.shape) == latent_shape, \
        (encoded.shape, sampled.shape)
    assert torch.isfinite(encoded).all() and torch.isfinite(sampled).all()
    assert encoded.abs().max() > 0 and (sampled - encoded).abs().max() > 1e-3, "KSampler left the latent unchanged"
    image = _image(comfy, run, ids["image"])
    assert image.shape == (64, 64, 3), image.shape
    assert image.std() > 0.5, "decoded image is constant"
    assert "invalid value encountered" not in log, "NaN/inf reached SaveImage's uint8 cast"


@pytest.mark.slow  # CI: the loader and trainer server tests load and sample it
def test_sdxl_checkpoint_loads_as_sdxl_and_samples(comfy, sdxl_files, input_image):
    log_start = len(comfy.log.read_text(errors="replace"))
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    ids = _sample_graph(g, ckpt[0], ckpt[1], ckpt[2], input_image, "models_sdxl")
    run = comfy.run(g)
    log = comfy.log.read_text(errors="replace")[log_start:]
    assert "model_type EPS" in log and "Requested to load SDXL" in log, log[-3000:]
    assert "Requested to load SDXLClipModel" in log, log[-3000:]
    assert "missing" not in log and "left over keys" not in log, log[-3000:]
    _check_samples(comfy, run, ids, (1, 4, 8, 8), log)
    print(f"sdxl sample graph: {run.seconds:.1f} s")


@pytest.mark.slow  # CI: the loader matrix and example runs load Anima
def test_anima_files_load_as_anima_and_sample(comfy, anima_files, input_image):
    log_start = len(comfy.log.read_text(errors="replace"))
    g = Graph()
    unet = g.node("UNETLoader", unet_name=anima_files.unet, weight_dtype="default")
    clip = g.node("CLIPLoader", clip_name=anima_files.text_encoder, type=anima_files.clip_type)
    vae = g.node("VAELoader", vae_name=anima_files.vae)
    ids = _sample_graph(g, unet[0], clip[0], vae[0], input_image, "models_anima")
    run = comfy.run(g)
    log = comfy.log.read_text(errors="replace")[log_start:]
    assert "model_type FLOW" in log and "Requested to load Anima" in log, log[-3000:]
    assert "Requested to load AnimaTEModel" in log, log[-3000:]
    assert "missing" not in log and "left over keys" not in log, log[-3000:]
    _check_samples(comfy, run, ids, (1, 16, 1, 8, 8), log)
    print(f"anima sample graph: {run.seconds:.1f} s")


def test_sdxl_checkpoint_detected_in_process(comfy_env, sdxl_files):
    """ComfyUI's own detection on the file's keys (the builder's contract, independent of the server)."""
    import model_files as mf
    mf.check_sdxl_detection(comfy_env, sdxl_files.weights)
    unet_params = sum(int(np.prod(s)) for k, s in sdxl_files.weights.shapes.items()
                      if k.startswith("model.diffusion_model."))
    assert 250e6 < unet_params < 320e6, unet_params
    assert sdxl_files.unet_layers["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] == (320, 2048)
    assert sdxl_files.unet_layers["label_emb.0.0"] == (1280, 2816)


@pytest.mark.parametrize("graph_error", ["validation", "execution"])
def test_client_reports_server_errors(comfy, graph_error):
    """A 400 from /prompt raises PromptRejected with node_errors; an execution error raises PromptFailed with the
    server's exception type and traceback (and expect_error=True returns it instead)."""
    from comfy_client import PromptFailed, PromptRejected
    g = Graph()
    if graph_error == "validation":
        g.node("CheckpointLoaderSimple", ckpt_name="no_such_checkpoint.safetensors")
        g.node("ModelSave", model=["1", 0], filename_prefix="diffusion_models/never_written")
        with pytest.raises(PromptRejected) as info:
            comfy.queue(g)
        assert "no_such_checkpoint.safetensors" in str(info.value)
        assert info.value.node_errors["1"]["errors"][0]["type"] == "value_not_in_list"
        return
    # upscaling an 8x8 latent by 0.01 asks torch for a 0x0 output: the node raises at run time
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    bad = g.node("LatentUpscaleBy", samples=lat[0], upscale_method="nearest-exact", scale_by=0.01)
    g.node("SaveLatent", samples=bad[0], filename_prefix="latents/client_error")
    with pytest.raises(PromptFailed) as info:
        comfy.run(g)
    assert "Traceback" in str(info.value) or "File " in str(info.value)
    run = comfy.run(g, expect_error=True)
    assert run.error["node_type"] == "LatentUpscaleBy" and run.error["exception_type"]
    assert run.status.get("status_str") == "error"


@pytest.mark.slow  # CI: the trainer server test interrupts a run
def test_client_interrupts_a_running_prompt(comfy, sdxl_files):
    """queue + wait_event("progress") + interrupt + wait(expect_error=True): the run ends interrupted mid-KSampler."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    pos = g.node("CLIPTextEncode", text="a photo of a cat", clip=ckpt[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.node("KSampler", model=ckpt[0], seed=3, steps=500, cfg=1.0, sampler_name="euler", scheduler="normal",
                positive=pos[0], negative=pos[0], latent_image=lat[0], denoise=1.0)
    save = g.node("SaveLatent", samples=ks[0], filename_prefix="latents/interrupted")
    prompt_id = comfy.queue(g)
    first = comfy.wait_event(prompt_id, "progress", timeout=600)
    assert first["node"] == ks.id and first["max"] == 500, first
    comfy.interrupt()
    run = comfy.wait(prompt_id, timeout=300, expect_error=True)
    assert run.interrupted and not run.succeeded
    assert run.error["node_type"] == "KSampler", run.error
    assert max(d["value"] for d in run.events_of("progress")) < 500
    assert save.id not in run.outputs and run.status.get("status_str") == "error"
