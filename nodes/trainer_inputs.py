"""What the trainers take as `latents` and `positive`, unwrapped from ComfyUI's containers.

Accepted (inputs are lists: the trainers are INPUT_IS_LIST):
- a LATENT batch with one CONDITIONING (shared) or one conditioning entry per sample (VAEEncode, CLIPTextEncode);
- core's dataset chain: MakeTrainingDataset / LoadTrainingDataset (one latent dict and one CONDITIONING per image,
  sizes may differ) and ResolutionBucket (one latent batch per resolution with the list of its conditionings).
Pairing and bucketing are hadakron.train.data's; this module only reads the containers (no comfy import).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from hadakron.train import bucket_summary, pair_conditioning, split_batches

log = logging.getLogger("hadakron")


def latent_batches(latents: list) -> list[torch.Tensor]:
    """The `samples` batch (B, C, ...) of every LATENT in the list (a bare tensor is taken as the batch)."""
    batches = []
    for i, latent in enumerate(latents or []):
        samples = latent.get("samples") if isinstance(latent, dict) else latent
        if not isinstance(samples, torch.Tensor) or samples.ndim < 3:
            found = type(samples).__name__ if not isinstance(samples, torch.Tensor) else f"shape {tuple(samples.shape)}"
            raise ValueError(f"latents[{i}]: expected a LATENT with a (B, C, ...) 'samples' tensor, found {found}")
        batches.append(samples)
    return batches


def conditioning_groups(positive: list) -> list[list]:
    """Each CONDITIONING of the list as its list of [cond, options] entries (one group per input item)."""
    return [list(cond) if isinstance(cond, list) else [cond] for cond in (positive or [])]


def training_samples(latents: list, positive: list) -> tuple[list[torch.Tensor], list[Any]]:
    """One float (C, ...) latent and one conditioning entry per sample, paired as hadakron.train.data says."""
    batches = latent_batches(latents)
    samples = [s.clone().float() for s in split_batches(batches)]
    conds = pair_conditioning(conditioning_groups(positive), [int(b.shape[0]) for b in batches])
    log.info("hadakron: training on %s", bucket_summary(samples))
    return samples, conds


def latent_pixel_size(sample: torch.Tensor) -> tuple[int | None, int]:
    """(width, height) ComfyUI's encode_model_conds assumes for a latent of this shape (no batch dim): 8 x the last
    two dims of the batched shape, width None below 4 dims."""
    shape = (1, *sample.shape)
    return (shape[3] * 8 if len(shape) >= 4 else None), shape[2] * 8


def with_latent_sizes(conds: list, samples: list[torch.Tensor]) -> list:
    """Each sample's conditioning entry with its own latent's `width`/`height` unless it names them.

    The guider encodes every sample's model conds against one dummy latent; without this, SDXL's size embedding
    would tell every bucket the first bucket's resolution.
    """
    out = []
    for cond, sample in zip(conds, samples):
        width, height = latent_pixel_size(sample)
        if isinstance(cond, (list, tuple)) and len(cond) >= 2 and isinstance(cond[1], dict):
            options = {"width": width, "height": height, **cond[1]}
            cond = [cond[0], options, *cond[2:]]
        out.append(cond)
    return out
