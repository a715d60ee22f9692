"""sd-scripts' noise, timestep and loss formulas, by their argument names, as pure tensor functions.

Written from sd-scripts' maths (library/custom_train_functions.py: apply_noise_offset, pyramid_noise_like,
apply_snr_weight, get_snr_scale, apply_debiased_estimation; library/train_util.py: get_huber_threshold_if_needed,
conditional_loss; flux_train_utils / sd3_train_utils / anima_train_utils: timestep sampling, density and loss
weighting). Every random draw comes from the caller's `torch.Generator` (never Python's `random` or the global
RNG), so the same seed gives the same run.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
FLOW_SAMPLINGS = ("model", "uniform", "sigmoid", "shift", "sigma")
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
SNR_CAP = 1000.0  # sd-scripts caps snr at 1000 in get_snr_scale and apply_debiased_estimation
FLOW_SIGMA_MIN = 1e-5  # a flow sigma of exactly 0 has no velocity target (x_t = x0); sd-scripts' draws never reach it


def randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal float32 noise drawn on the generator's device, returned on `like`'s device."""
    out = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(like.device)


def rand(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """(n,) uniform [0, 1) float32 drawn on the generator's device, returned on `like`'s device."""
    return torch.rand((n,), generator=generator, device=generator.device, dtype=torch.float32).to(like.device)


def per_sample(t: Tensor, ndim: int) -> Tensor:
    """A (B,) tensor as (B, 1, ..., 1), to broadcast over a latent of `ndim` dims."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


# ---------------------------------------------------------------- noise (SDXL)


def noise_offset(latents: Tensor, noise: Tensor, offset: float, adaptive_noise_scale: float,
                 generator: torch.Generator) -> Tensor:
    """noise + o * N(0,1) drawn per (sample, channel); with adaptive_noise_scale
    o = max(0, offset + adaptive_noise_scale * |spatial mean of the latent's channel|)."""
    shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
    o: Tensor | float = offset
    if adaptive_noise_scale:
        mean = latents.float().mean(dim=tuple(range(2, latents.ndim)), keepdim=True).abs()
        o = torch.clamp(offset + adaptive_noise_scale * mean, min=0.0)
    return noise + o * randn(shape, generator, latents)


def multires_noise(noise: Tensor, iterations: int, discount: float, generator: torch.Generator) -> Tensor:
    """Pyramid noise of a (B, C, H, W) noise: level i adds N(0,1) of size (H / r_i^i, W / r_i^i) (floored, at least
    1; r_i uniform in [2, 4)), bilinearly upsampled, times discount^i; it stops after a level with a side of 1;
    the sum is divided by its std over the whole tensor."""
    if noise.ndim != 4:
        raise ValueError(f"multires_noise_iterations: expected a (B, C, H, W) latent, found {noise.ndim} dims")
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator, device=generator.device)) * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        low = randn((b, c, hn, wn), generator, noise)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


# ---------------------------------------------------------------- loss


def huber_c(schedule: str, c: float, timesteps: Tensor, sigmas: Tensor, num_timesteps: int = 1000) -> Tensor:
    """Per-sample Huber threshold. constant: c; exponential: exp(-a t), a = -ln(c) / T, t the 0..T timestep;
    snr: (1 - c) / (1 + sigma)^2 + c, sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod) (ComfyUI's SDXL sigma)."""
    if schedule == "constant":
        return torch.full(timesteps.shape, c, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        return torch.exp(-(-math.log(c) / num_timesteps) * timesteps.float())
    if schedule == "snr":
        return (1.0 - c) / (1.0 + sigmas.float()) ** 2 + c
    raise ValueError(f"huber_schedule: expected one of {HUBER_SCHEDULES}, found {schedule!r}")


def per_sample_loss(pred: Tensor, target: Tensor, loss_type: str = "l2", c: Tensor | None = None) -> Tensor:
    """(B,) mean of the element loss, float32, d = pred - target. l2: d^2; l1: |d|;
    huber: 2c (sqrt(d^2 + c^2) - c); smooth_l1: 2 (sqrt(d^2 + c^2) - c); c per sample."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        elem = diff.pow(2)
    elif loss_type == "l1":
        elem = diff.abs()
    elif loss_type in ("huber", "smooth_l1"):
        if c is None:
            raise ValueError(f"loss_type {loss_type!r} needs a Huber threshold c per sample")
        cb = per_sample(c.float().to(diff.device), diff.ndim)
        root = (diff.pow(2) + cb.pow(2)).sqrt() - cb
        elem = 2 * cb * root if loss_type == "huber" else 2 * root
    else:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, found {loss_type!r}")
    return elem.reshape(elem.shape[0], -1).mean(dim=1)


def scale_v_like_noise_weight(snr: Tensor) -> Tensor:
    """scale_v_pred_loss_like_noise_pred: s / (s + 1), s = min(snr, 1000)."""
    s = torch.clamp(snr, max=SNR_CAP)
    return s / (s + 1.0)


def debiased_weight(snr: Tensor, v_prediction: bool) -> Tensor:
    """debiased_estimation_loss: 1 / sqrt(s) (epsilon) or 1 / (s + 1) (v-prediction), s = min(snr, 1000)."""
    s = torch.clamp(snr, max=SNR_CAP)
    return 1.0 / (s + 1.0) if v_prediction else 1.0 / torch.sqrt(s)


# ---------------------------------------------------------------- flow matching (Anima)


def shift_sigma(t: Tensor, shift: float) -> Tensor:
    """discrete_flow_shift: t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def density_u(scheme: str, n: int, generator: torch.Generator, like: Tensor, *, logit_mean: float,
              logit_std: float, mode_scale: float) -> Tensor:
    """compute_density_for_timestep_sampling: logit_normal sigmoid(mean + std N); mode
    1 - u - mode_scale (cos(pi u / 2)^2 - 1 + u); else u, with u uniform [0, 1)."""
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * randn((n,), generator, like))
    u = rand(n, generator, like)
    if scheme == "mode":
        return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    return u


def flow_sigmas(sampling: str, n: int, generator: torch.Generator, like: Tensor, *, shift: float,
                sigmoid_scale: float, weighting_scheme: str, logit_mean: float, logit_std: float,
                mode_scale: float, num_timesteps: int = 1000) -> Tensor:
    """(n,) flow sigmas (= t in [0, 1]) by sd-scripts' timestep_sampling, floored at FLOW_SIGMA_MIN.
    uniform: U[0,1); sigmoid: sigmoid(sigmoid_scale N); shift: shift_sigma(sigmoid(sigmoid_scale N));
    sigma: the discrete schedule shift_sigma((T - i) / T) at i = floor(u T) (clamped to [0, T-1]), u from
    `weighting_scheme`'s density."""
    if sampling == "uniform":
        sigma = rand(n, generator, like)
    elif sampling == "sigmoid":
        sigma = torch.sigmoid(sigmoid_scale * randn((n,), generator, like))
    elif sampling == "shift":
        sigma = shift_sigma(torch.sigmoid(sigmoid_scale * randn((n,), generator, like)), shift)
    elif sampling == "sigma":
        u = density_u(weighting_scheme, n, generator, like, logit_mean=logit_mean, logit_std=logit_std,
                      mode_scale=mode_scale)
        index = (u * num_timesteps).long().clamp(0, num_timesteps - 1)
        sigma = shift_sigma((num_timesteps - index).float() / num_timesteps, shift)
    else:
        raise ValueError(f"timestep_sampling: expected one of {FLOW_SAMPLINGS[1:]}, found {sampling!r}")
    return sigma.clamp(min=FLOW_SIGMA_MIN)


def flow_loss_weight(scheme: str, sigmas: Tensor) -> Tensor:
    """compute_loss_weighting_for_anima: sigma_sqrt sigma^-2; cosmap 2 / (pi (1 - 2s + 2s^2)); else 1."""
    s = sigmas.float()
    if scheme == "sigma_sqrt":
        return s ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s ** 2))
    return torch.ones_like(s)
