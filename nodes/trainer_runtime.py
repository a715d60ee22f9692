"""What the trainer nodes need from ComfyUI: the model's own sampling objective, conds per batch through a
guider, per-block gradient checkpointing, a differentiable stand-in for comfy_kitchen's fused RMS+RoPE op,
and the run itself (hadakron.train.train inside a guider's sampler slot).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.samplers
from comfy_extras.nodes_train import TrainGuider, make_batch_extra_option_dict, process_cond_list

from hadakron.train import (
    LatentDataset, ModelSamplingObjective, TrainCallbacks, TrainConfig, autograd_safe_weights, train,
)
from hadakron.train.objective_options import ObjectiveOptions, objective_metadata
from hadakron.train.objectives import SdScriptsObjective

from .trainer_inputs import with_latent_sizes

log = logging.getLogger("hadakron")


# ---------------------------------------------------------------- objective from model_sampling


def model_sampling_objective(model_sampling, *, weight: Callable | None = None) -> ModelSamplingObjective:
    """Noise scaling, sigma sampling and the raw-output target from the model's own `model_sampling`.

    Sigma: `percent_to_sigma(u)` for u uniform (timesteps uniform for SDXL, shifted t for Anima's flow).
    """

    def sigma_for_uniform(u: torch.Tensor) -> torch.Tensor:
        u = u.clamp(1e-5, 1.0 - 1e-5)
        return torch.tensor([float(model_sampling.percent_to_sigma(float(x))) for x in u.tolist()],
                            dtype=torch.float32)

    return ModelSamplingObjective(
        sigma_for_uniform,
        noise_scaling=lambda s, noise, x0: model_sampling.noise_scaling(s, noise, x0, False),
        denoise=lambda s, out, xt: model_sampling.calculate_denoised(s, out, xt),
        weight=weight,
    )


def objective_facts(model_sampling) -> dict:
    """What the objective options need to know of a model's sampling: family ("sdxl" / "anima"), prediction
    (epsilon / v_prediction / flow), zsnr (zero terminal SNR schedule) and shift (a flow model's own shift)."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.CONST):
        return {"family": "anima", "prediction": "flow", "zsnr": False,
                "shift": float(getattr(model_sampling, "shift", 1.0))}
    prediction = "v_prediction" if isinstance(model_sampling, ms.V_PREDICTION) else "epsilon"
    return {"family": "sdxl", "prediction": prediction, "zsnr": bool(getattr(model_sampling, "zsnr", False)),
            "shift": None}


def objective_for(model_sampling, options: ObjectiveOptions | None = None) -> ModelSamplingObjective:
    """The model's own objective, with sd-scripts' options on top when any is set (refused by name when they do
    not fit this model)."""
    if options is None or not options.non_default():
        return model_sampling_objective(model_sampling)
    facts = objective_facts(model_sampling)
    base = model_sampling_objective(model_sampling)
    return SdScriptsObjective(
        base.sigma_for_uniform, base.noise_scaling, base.denoise, options=options, family=facts["family"],
        prediction=facts["prediction"], zsnr=facts["zsnr"],
        timestep_of_sigma=lambda s: model_sampling.timestep(s.to(model_sampling.sigmas.device)),
    )


def objective_metadata_of(model_sampling, options: ObjectiveOptions) -> dict[str, str]:
    """The run's objective as sd-scripts' metadata keys (no ss_ prefix), for this model."""
    facts = objective_facts(model_sampling)
    return objective_metadata(options, facts["family"], facts["prediction"], zsnr=facts["zsnr"],
                              model_shift=facts["shift"])


def raw_output_from_denoised(model_sampling, sigma: torch.Tensor, denoised: torch.Tensor, noisy: torch.Tensor):
    """Invert `calculate_denoised` (affine in the model output) to get the raw prediction back, in float32."""
    noisy = noisy.float()
    offset = model_sampling.calculate_denoised(sigma, torch.zeros_like(noisy), noisy).float()
    slope = model_sampling.calculate_denoised(sigma, torch.ones_like(noisy), noisy).float() - offset
    return (denoised.float() - offset) / slope


# ---------------------------------------------------------------- comfy_kitchen fused op


def rms_rope_split_half(q, k, freqs_cis, q_scale, k_scale=None, epsilon: float = 1e-6):
    """Per-head RMSNorm then split-half RoPE (pair i = elements i and i + d/2), with autograd.

    Same math as comfy_kitchen's `rms_rope_split_half` (which has no backward).
    """
    k_scale = q_scale if k_scale is None else k_scale

    def one(x, scale):
        x_norm = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight=scale, eps=epsilon)
        t = x_norm.reshape(*x_norm.shape[:-1], 2, -1).movedim(-2, -1).unsqueeze(-2).to(freqs_cis.dtype)
        out = freqs_cis[..., 0] * t[..., 0] + freqs_cis[..., 1] * t[..., 1]
        return out.movedim(-1, -2).reshape(*x.shape).type_as(x)

    return one(q, q_scale), one(k, k_scale)


class _DifferentiableKitchen:
    """comfy_kitchen with its fused RMS+RoPE op replaced by a differentiable one; everything else delegated."""

    def __init__(self, kitchen) -> None:
        self._kitchen = kitchen

    def __getattr__(self, name):
        return getattr(self._kitchen, name)

    rms_rope_split_half = staticmethod(rms_rope_split_half)


@contextlib.contextmanager
def differentiable_kitchen():
    """While training, route `comfy.quant_ops.ck.rms_rope_split_half` (Anima) through autograd; restore after."""
    try:
        import comfy.quant_ops as quant_ops
    except ImportError:
        yield
        return
    kitchen = getattr(quant_ops, "ck", None)
    if kitchen is None or not hasattr(kitchen, "rms_rope_split_half") or isinstance(kitchen, _DifferentiableKitchen):
        yield
        return
    quant_ops.ck = _DifferentiableKitchen(kitchen)
    try:
        yield
    finally:
        quant_ops.ck = kitchen


# ---------------------------------------------------------------- CLIP layers without in-place residuals


def _out_of_place_clip_layer(layer):
    """ComfyUI's CLIPLayer.forward with `x = x + ...` instead of `x += ...` (same math; autograd-safe)."""

    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


@contextlib.contextmanager
def autograd_safe_text_encoders(modules):
    """ComfyUI's CLIP layers add their residuals in place, which breaks backward; swap in an out-of-place
    forward on every CLIPLayer instance while training, and restore after."""
    import comfy.clip_model

    patched = []
    for root in modules:
        for module in root.modules():
            if isinstance(module, comfy.clip_model.CLIPLayer) and "forward" not in module.__dict__:
                module.forward = _out_of_place_clip_layer(module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


# ---------------------------------------------------------------- gradient checkpointing per block


def checkpoint_blocks(diffusion_model, family: str, *, llm_adapter: bool = False) -> list:
    """The modules checkpointed one per segment: the layers inside SDXL's input/middle/output blocks (ComfyUI calls
    those layers one by one through `forward_timestep_embed`, never a block's own forward), Anima `blocks.N`."""
    if family == "sdxl":
        blocks = (*diffusion_model.input_blocks, diffusion_model.middle_block, *diffusion_model.output_blocks)
        return [layer for block in blocks for layer in block]
    blocks = list(diffusion_model.blocks)
    if llm_adapter and hasattr(diffusion_model, "llm_adapter"):
        blocks += list(getattr(diffusion_model.llm_adapter, "blocks", []))
    return blocks


@contextlib.contextmanager
def gradient_checkpointing(modules: list, enabled: bool = True):
    """Wrap each module's forward in a non-reentrant torch checkpoint; restore the forwards after."""
    if not enabled:
        yield
        return
    saved = []
    for module in modules:
        had = "forward" in module.__dict__
        original = module.__dict__.get("forward")
        bound = module.forward

        def wrapped(*args, _f=bound, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_f, *args, use_reentrant=False, **kwargs)
            return _f(*args, **kwargs)
        module.forward = wrapped
        saved.append((module, had, original))
    try:
        yield
    finally:
        for module, had, original in saved:
            if had:
                module.forward = original
            else:
                module.__dict__.pop("forward", None)


# ---------------------------------------------------------------- the run inside a guider


class _HadakronSampler(comfy.samplers.Sampler):
    """Occupies the sampler slot of a guider so ComfyUI prepares conds and loads the model; runs the loop."""

    def __init__(self, run: Callable) -> None:
        self.run = run
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.run(model_wrap, extra_args)
        return torch.zeros_like(latent_image)


def run_training(mp, network, latents: list[torch.Tensor], positive: list, config: TrainConfig,
                 callbacks: TrainCallbacks, *, resume=None, blocks: list | None = None,
                 gradient_checkpoint: bool = True, encode: Callable[[int], dict] | None = None,
                 text_encoder=None, objective_options=None):
    """Train `network` (already built on mp's diffusion model) on latents/conds with the model's own objective.

    `latents`: per-sample latents (C, ...) in the VAE's space (process_latent_in is applied here);
    `positive`: one conditioning entry per sample. `encode(i)`, when given, re-encodes sample i's caption
    with gradients (text-encoder training: `{"cond", "pooled_output", ...}` as CLIP.encode_from_tokens
    returns with return_dict) and its model conds are rebuilt every step; `text_encoder` is the CLIP clone it
    encodes with, loaded once beside the diffusion model for the whole run. The frozen weights of both (inference
    tensors when the models were loaded by a prompt) are swapped for same-storage normal tensors while training
    (`autograd_safe_weights`; no copy). Returns hadakron.train's TrainResult.
    """
    model_sampling = mp.get_model_object("model_sampling")
    device = mp.load_device
    processed = [mp.model.process_latent_in(x[None].float()).squeeze(0) for x in latents]
    count = len(processed)
    dataset = LatentDataset(processed, list(range(count)))
    objective = objective_for(model_sampling, objective_options)

    def run(model_wrap, extra_args):
        model_wrap.conds = process_cond_list(model_wrap.conds)
        conds = model_wrap.conds["positive"]

        def fresh_cond(i, noisy):
            out = dict(encode(i))
            params = {k: v for k, v in conds[i].items() if k != "model_conds"}
            params["cross_attn"] = out.pop("cond")
            params.update(out)
            params["model_conds"] = conds[i]["model_conds"]
            return comfy.samplers.encode_model_conds(mp.model.extra_conds, [params], noisy[:1], noisy.device,
                                                     "positive")[0]

        def model_call(noisy, sigma, batch):
            idx = list(batch.indices)
            if encode is None:
                model_wrap.conds["positive"] = [conds[i] for i in idx]
            else:
                model_wrap.conds["positive"] = [fresh_cond(i, noisy) for i in idx]
            extra = make_batch_extra_option_dict(extra_args, idx, full_size=count)
            denoised = model_wrap(noisy, sigma, **extra)
            return raw_output_from_denoised(model_sampling, sigma, denoised, noisy)

        frozen = [mp.model]
        if text_encoder is not None:
            # once per run: ComfyUI's encode_from_tokens would call load_models_gpu at every step
            comfy.model_management.load_models_gpu([mp, text_encoder.patcher])
            text_encoder.load_model = lambda tokens={}: text_encoder.patcher
            frozen.append(text_encoder.cond_stage_model)
        with autograd_safe_weights(*frozen):
            return train(network, model_call, dataset, objective, config, callbacks, resume=resume)

    sampler = _HadakronSampler(run)
    guider = TrainGuider(mp)
    guider.set_conds(with_latent_sizes(positive, latents))  # each sample's own size, not the dummy's
    largest = max(processed, key=lambda x: x.numel())  # buckets differ in size: load memory for the largest
    dummy = largest[None].repeat(count, *([1] * largest.ndim)).to(device)
    sigmas = torch.tensor(range(count))
    previous = getattr(comfy.model_management, "in_training", False)
    network.attach()
    try:
        with differentiable_kitchen(), gradient_checkpointing(blocks or [], gradient_checkpoint):
            comfy.model_management.in_training = True
            # the guider runs process_latent_in on this dummy; the loop reads the real latents from `dataset`
            guider.sample(torch.zeros_like(dummy), mp.model.process_latent_out(dummy), sampler, sigmas, seed=config.seed)
    finally:
        comfy.model_management.in_training = previous
        network.detach()
    return sampler.result
