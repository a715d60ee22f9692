"""Diffusion training objectives: how a clean latent becomes (noisy input, timestep, target) and the loss.

Every objective has `sample(x0, generator) -> Sample(noisy, timestep, target)` and
`loss(pred, target, timestep) -> scalar`. The loss is taken on the model's own prediction target
(epsilon, v or flow velocity), as sd-scripts does, not in x0 space with a sigma^2 weight as
ComfyUI's built-in trainer does. All randomness comes from the caller's `torch.Generator`.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from hadakron.train import noise
from hadakron.train.objective_options import ObjectiveOptions

Tensor = torch.Tensor

PREDICTIONS = ("epsilon", "v_prediction")
FLOW_TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "shift")


class Sample(NamedTuple):
    """One noised batch: the model input, its timestep (or sigma) per sample, and the loss target."""

    noisy: Tensor
    timestep: Tensor
    target: Tensor


# the step's draws (shared with hadakron.train.noise, which the sd-scripts options use)
_randn, _rand, _per_sample = noise.randn, noise.rand, noise.per_sample


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample (B,), computed in float32."""
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def scaled_linear_alphas_cumprod(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """SD/SDXL "scaled linear" schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2; returns cumprod(1-beta), float64."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma loss weight per sample as sd-scripts applies it.

    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


class DiffusionObjective:
    """DDPM-style objective (SD/SDXL): epsilon or v-prediction over discrete timesteps.

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t the scaled-linear alphas_cumprod; timesteps uniform
    in [min_timestep, max_timestep); target eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0.
    Options: min-SNR-gamma weighting and sd-scripts' noise offset (eps += offset * N(0,1) per channel).
    """

    def __init__(
        self,
        prediction: str = "epsilon",
        *,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        num_timesteps: int = 1000,
        min_timestep: int = 0,
        max_timestep: int | None = None,
        alphas_cumprod: Tensor | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None; got {min_snr_gamma}")
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        self.noise_offset = float(noise_offset)
        acp = alphas_cumprod if alphas_cumprod is not None else scaled_linear_alphas_cumprod(num_timesteps)
        self.alphas_cumprod = acp.to(torch.float64)
        self.num_timesteps = int(self.alphas_cumprod.shape[0])
        self.min_timestep = int(min_timestep)
        self.max_timestep = int(max_timestep) if max_timestep is not None else self.num_timesteps
        if not 0 <= self.min_timestep < self.max_timestep <= self.num_timesteps:
            raise ValueError(
                f"timestep range must satisfy 0 <= min < max <= {self.num_timesteps}; "
                f"got min={self.min_timestep}, max={self.max_timestep}"
            )

    def snr(self, timestep: Tensor) -> Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t) per sample, float32."""
        acp = self.alphas_cumprod[timestep.long().cpu()]
        return (acp / (1.0 - acp)).to(torch.float32).to(timestep.device)

    def sample(self, x0: Tensor, generator: torch.Generator) -> Sample:
        """Draw timesteps and noise from `generator`; return (x_t, timesteps (B,) long, target)."""
        b = x0.shape[0]
        t = torch.randint(
            self.min_timestep, self.max_timestep, (b,), generator=generator, device=generator.device
        ).to(x0.device)
        noise = _randn(tuple(x0.shape), generator, x0)
        if self.noise_offset:
            offset_shape = (b, x0.shape[1]) + (1,) * (x0.ndim - 2)
            noise = noise + self.noise_offset * _randn(offset_shape, generator, x0)
        acp = _per_sample(self.alphas_cumprod[t.cpu()].to(torch.float32).to(x0.device), x0.ndim)
        sqrt_a, sqrt_1ma = acp.sqrt(), (1.0 - acp).sqrt()
        x0f = x0.float()
        noisy = sqrt_a * x0f + sqrt_1ma * noise
        target = noise if self.prediction == "epsilon" else sqrt_a * noise - sqrt_1ma * x0f
        return Sample(noisy.to(x0.dtype), t, target)

    def loss(self, pred: Tensor, target: Tensor, timestep: Tensor) -> Tensor:
        """MSE on the prediction target, per sample, min-SNR weighted when set, then batch mean."""
        per = per_sample_mse(pred, target)
        if self.min_snr_gamma is not None:
            per = per * min_snr_weight(self.snr(timestep), self.min_snr_gamma, self.prediction)
        return per.mean()


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Timestep shift used by SD3/Flux/Anima samplers: t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_flow_timesteps(
    n: int,
    generator: torch.Generator,
    like: Tensor,
    sampling: str = "shift",
    *,
    shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Draw n flow timesteps (= sigmas) in [0, 1]: uniform, logit-normal sigmoid(N(mean, std)), or shifted uniform."""
    if sampling == "uniform":
        return _rand(n, generator, like)
    if sampling == "logit_normal":
        z = torch.randn((n,), generator=generator, device=generator.device, dtype=torch.float32).to(like.device)
        return torch.sigmoid(logit_mean + logit_std * z)
    if sampling == "shift":
        return shift_timesteps(_rand(n, generator, like), shift)
    raise ValueError(f"timestep sampling must be one of {FLOW_TIMESTEP_SAMPLINGS}; got {sampling!r}")


class FlowMatchingObjective:
    """Rectified-flow velocity objective (Anima): x_t = (1 - t) x0 + t eps, target eps - x0, t in [0, 1].

    The model receives t itself as its timestep (Anima's sampling multiplier is 1.0).
    """

    def __init__(
        self,
        timestep_sampling: str = "shift",
        *,
        shift: float = 3.0,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        if timestep_sampling not in FLOW_TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"timestep_sampling must be one of {FLOW_TIMESTEP_SAMPLINGS}; got {timestep_sampling!r}"
            )
        if shift <= 0:
            raise ValueError(f"shift must be > 0; got {shift}")
        self.timestep_sampling = timestep_sampling
        self.shift = float(shift)
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)

    def sample(self, x0: Tensor, generator: torch.Generator) -> Sample:
        """Draw t and noise from `generator`; return (x_t, t (B,) float32, eps - x0)."""
        t = sample_flow_timesteps(
            x0.shape[0], generator, x0, self.timestep_sampling,
            shift=self.shift, logit_mean=self.logit_mean, logit_std=self.logit_std,
        )
        noise = _randn(tuple(x0.shape), generator, x0)
        tb = _per_sample(t, x0.ndim)
        x0f = x0.float()
        noisy = (1.0 - tb) * x0f + tb * noise
        return Sample(noisy.to(x0.dtype), t, noise - x0f)

    def loss(self, pred: Tensor, target: Tensor, timestep: Tensor) -> Tensor:
        """Plain MSE on the velocity, batch mean."""
        return per_sample_mse(pred, target).mean()


class ModelSamplingObjective:
    """An objective built from a model's own sampling callables (ComfyUI's `model_sampling`), without importing it.

    - `sigma_for_uniform(u)`: (B,) uniform [0,1) -> (B,) sigma (e.g. a discrete timestep lookup or a shifted flow t);
    - `noise_scaling(sigma, noise, x0) -> x_t`;
    - `denoise(sigma, model_output, x_t) -> x0_hat` (must be affine in `model_output`, as every
      parameterisation is: eps, v, flow).
    The target is the raw model output that would denoise x_t exactly to x0: with A = denoise(sigma, 0, x_t)
    and B = denoise(sigma, 1, x_t) - A, target = (x0 - A) / B. So the loss is on the model's own prediction
    (eps for EPS, v for V_PREDICTION, eps - x0 for flow), not sigma^2-weighted x0 error.
    `weight(sigma)`, when given, scales each sample's loss (e.g. min-SNR).
    """

    def __init__(
        self,
        sigma_for_uniform: Callable[[Tensor], Tensor],
        noise_scaling: Callable[[Tensor, Tensor, Tensor], Tensor],
        denoise: Callable[[Tensor, Tensor, Tensor], Tensor],
        *,
        weight: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.sigma_for_uniform = sigma_for_uniform
        self.noise_scaling = noise_scaling
        self.denoise = denoise
        self.weight = weight

    def sample(self, x0: Tensor, generator: torch.Generator) -> Sample:
        """Draw sigma and noise from `generator`; return (x_t, sigma (B,), the model-output target)."""
        u = _rand(x0.shape[0], generator, x0)
        sigma = self.sigma_for_uniform(u).to(device=x0.device, dtype=torch.float32).reshape(x0.shape[0])
        noise = _randn(tuple(x0.shape), generator, x0)
        x0f = x0.float()
        noisy = self.noise_scaling(sigma, noise, x0f).float()
        offset = self.denoise(sigma, torch.zeros_like(noisy), noisy).float()
        slope = self.denoise(sigma, torch.ones_like(noisy), noisy).float() - offset
        target = (x0f - offset) / slope
        return Sample(noisy.to(x0.dtype), sigma, target)

    def loss(self, pred: Tensor, target: Tensor, timestep: Tensor) -> Tensor:
        """MSE on the model-output target per sample, times `weight(sigma)` when set, batch mean."""
        per = per_sample_mse(pred, target)
        if self.weight is not None:
            per = per * self.weight(timestep).to(per.device, torch.float32).reshape(per.shape)
        return per.mean()


class SdScriptsObjective(ModelSamplingObjective):
    """The model's own sampling objective with sd-scripts' options on top (hadakron.train.objective_options).

    `family` "sdxl" (ComfyUI's sigma: snr = 1 / sigma^2) or "anima" (flow: sigma = t, x_t = (1-t) x0 + t eps);
    `prediction` epsilon / v_prediction / flow; `timestep_of_sigma` maps an SDXL sigma to its 0..999 timestep
    (the exponential Huber schedule), Anima's timestep is 1000 sigma. Draws from the step's generator: sigma
    (u as ModelSamplingObjective, or the flow sampling's own draws), the noise, then noise offset, multires
    levels and the input perturbation. The target comes from the noise before ip_noise_gamma, as in sd-scripts.
    With every option at its default, sample and loss are those of ModelSamplingObjective, bit for bit.
    """

    def __init__(self, sigma_for_uniform: Callable[[Tensor], Tensor],
                 noise_scaling: Callable[[Tensor, Tensor, Tensor], Tensor],
                 denoise: Callable[[Tensor, Tensor, Tensor], Tensor], *, options: ObjectiveOptions, family: str,
                 prediction: str, timestep_of_sigma: Callable[[Tensor], Tensor], zsnr: bool = False) -> None:
        super().__init__(sigma_for_uniform, noise_scaling, denoise)
        options.validate(family, prediction, zsnr=zsnr)
        self.options = options
        self.family = family
        self.prediction = prediction
        self.timestep_of_sigma = timestep_of_sigma

    def _sigma(self, x0: Tensor, generator: torch.Generator) -> Tensor:
        """(B,) sigma: the flow sampling's when one is chosen, else the model's from a uniform u."""
        o, b = self.options, x0.shape[0]
        if self.family == "anima" and o.timestep_sampling != "model":
            return noise.flow_sigmas(o.timestep_sampling, b, generator, x0, shift=o.discrete_flow_shift,
                                     sigmoid_scale=o.sigmoid_scale, weighting_scheme=o.weighting_scheme,
                                     logit_mean=o.logit_mean, logit_std=o.logit_std, mode_scale=o.mode_scale)
        u = _rand(b, generator, x0)
        return self.sigma_for_uniform(u).to(device=x0.device, dtype=torch.float32).reshape(b)

    def sample(self, x0: Tensor, generator: torch.Generator) -> Sample:
        """Draw sigma and noise; return (x_t with the perturbed noise, sigma (B,), the model-output target)."""
        o = self.options
        sigma = self._sigma(x0, generator)
        eps = _randn(tuple(x0.shape), generator, x0)
        x0f = x0.float()
        if o.noise_offset:
            eps = noise.noise_offset(x0f, eps, o.noise_offset, o.adaptive_noise_scale, generator)
        if o.multires_noise_iterations:
            eps = noise.multires_noise(eps, int(o.multires_noise_iterations), o.multires_noise_discount, generator)
        clean = self.noise_scaling(sigma, eps, x0f).float()
        noisy = clean
        if o.ip_noise_gamma:
            perturbed = eps + o.ip_noise_gamma * _randn(tuple(x0.shape), generator, x0)
            noisy = self.noise_scaling(sigma, perturbed, x0f).float()
        offset = self.denoise(sigma, torch.zeros_like(clean), clean).float()
        slope = self.denoise(sigma, torch.ones_like(clean), clean).float() - offset
        return Sample(noisy.to(x0.dtype), sigma, (x0f - offset) / slope)

    def weights(self, sigma: Tensor) -> Tensor | None:
        """(B,) loss weight per sample from sigma, the product of the options' weights (None: no weight)."""
        o = self.options
        parts: list[Tensor] = []
        if self.family == "anima":
            if o.weighting_scheme in ("sigma_sqrt", "cosmap"):
                parts.append(noise.flow_loss_weight(o.weighting_scheme, sigma))
        else:
            snr = 1.0 / sigma.float() ** 2
            v_pred = self.prediction == "v_prediction"
            if o.min_snr_gamma:
                parts.append(min_snr_weight(snr, o.min_snr_gamma, self.prediction))
            if o.scale_v_pred_loss_like_noise_pred:
                parts.append(noise.scale_v_like_noise_weight(snr))
            if o.debiased_estimation_loss:
                parts.append(noise.debiased_weight(snr, v_pred))
        if not parts:
            return None
        out = parts[0]
        for part in parts[1:]:
            out = out * part
        return out

    def huber_threshold(self, sigma: Tensor) -> Tensor | None:
        """(B,) Huber c of loss_type huber / smooth_l1 (None for l2 / l1)."""
        o = self.options
        if o.loss_type not in ("huber", "smooth_l1"):
            return None
        s = sigma.float()
        steps = s * 1000.0 if self.family == "anima" else self.timestep_of_sigma(s).float().to(s.device)
        return noise.huber_c(o.huber_schedule, o.huber_c, steps, s)

    def loss(self, pred: Tensor, target: Tensor, timestep: Tensor) -> Tensor:
        """sd-scripts' conditional_loss per sample, times the per-sample weights, batch mean."""
        c = self.huber_threshold(timestep.to(pred.device))
        per = noise.per_sample_loss(pred, target, self.options.loss_type, c)
        w = self.weights(timestep)
        if w is not None:
            per = per * w.to(per.device, torch.float32).reshape(per.shape)
        return per.mean()
