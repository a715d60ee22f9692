"""Objectives: noising, targets, timestep distributions and loss weights against float64 references."""
import math

import numpy as np
import pytest
import torch

from hadakron.train.objectives import (
    DiffusionObjective,
    FlowMatchingObjective,
    ModelSamplingObjective,
    shift_timesteps,
)


def ref_alphas_cumprod() -> np.ndarray:
    """SDXL scaled-linear schedule written out in float64 (diffusers' `scaled_linear`, 1000 steps)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_endpoints_match_sdxl():
    acp = ref_alphas_cumprod()
    obj = DiffusionObjective()
    assert np.allclose(obj.alphas_cumprod.numpy(), acp, rtol=0, atol=1e-15)
    assert acp[0] == pytest.approx(0.99915, abs=1e-12)
    assert acp[-1] == pytest.approx(0.0046, abs=2e-4)


def test_epsilon_sample_is_ddpm_forward_process():
    x0 = torch.randn(6, 4, 5, 5, generator=gen(1))
    obj = DiffusionObjective("epsilon")
    noisy, t, target = obj.sample(x0, gen(2))
    assert t.dtype == torch.long and t.shape == (6,)
    a = torch.from_numpy(ref_alphas_cumprod()[t.numpy()]).view(-1, 1, 1, 1)
    ref = a.sqrt() * x0.double() + (1 - a).sqrt() * target.double()
    assert torch.allclose(noisy.double(), ref, atol=1e-5)
    assert target.std().item() == pytest.approx(1.0, abs=0.15)


def test_v_target_matches_definition():
    x0 = torch.randn(6, 4, 5, 5, generator=gen(3))
    noisy, t, v = DiffusionObjective("v_prediction").sample(x0, gen(4))
    a = torch.from_numpy(ref_alphas_cumprod()[t.numpy()]).view(-1, 1, 1, 1)
    eps = (noisy.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
    assert torch.allclose(v.double(), a.sqrt() * eps - (1 - a).sqrt() * x0.double(), atol=1e-4)
    # the identity x0 = sqrt(a) x_t - sqrt(1-a) v
    assert torch.allclose(a.sqrt() * noisy.double() - (1 - a).sqrt() * v.double(), x0.double(), atol=1e-5)


def test_timesteps_uniform_over_range():
    x0 = torch.zeros(40000, 1, 1, 1)
    _, t, _ = DiffusionObjective(min_timestep=100, max_timestep=300).sample(x0, gen(5))
    assert t.min().item() >= 100 and t.max().item() <= 299
    assert t.double().mean().item() == pytest.approx(199.5, abs=1.5)
    with pytest.raises(ValueError, match="timestep range"):
        DiffusionObjective(min_timestep=500, max_timestep=400)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weighting(prediction):
    gamma = 5.0
    obj = DiffusionObjective(prediction, min_snr_gamma=gamma)
    pred = torch.randn(4, 3, 2, 2, generator=gen(6))
    target = torch.randn(4, 3, 2, 2, generator=gen(7))
    t = torch.tensor([0, 200, 600, 999])
    acp = ref_alphas_cumprod()[t.numpy()]
    snr = acp / (1 - acp)
    w = np.minimum(snr, gamma) / (snr if prediction == "epsilon" else snr + 1)
    mse = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    assert obj.loss(pred, target, t).item() == pytest.approx(float((mse * w).mean()), rel=1e-5)
    plain = DiffusionObjective(prediction).loss(pred, target, t).item()
    assert plain == pytest.approx(float(mse.mean()), rel=1e-6)


def test_noise_offset_adds_per_channel_shift():
    x0 = torch.zeros(64, 4, 32, 32)
    offset = 0.5
    _, _, eps = DiffusionObjective("epsilon", noise_offset=offset).sample(x0, gen(8))
    channel_means = eps.mean(dim=(2, 3)).double()
    # per-channel mean = offset * N(0,1) + mean of 1024 N(0,1): variance offset^2 + 1/1024
    assert channel_means.var().item() == pytest.approx(offset ** 2 + 1 / 1024, rel=0.3)
    _, _, plain = DiffusionObjective("epsilon").sample(x0, gen(8))
    assert plain.mean(dim=(2, 3)).double().var().item() == pytest.approx(1 / 1024, rel=0.3)


def test_flow_sample_and_target():
    x0 = torch.randn(8, 16, 1, 4, 4, generator=gen(9))
    noisy, t, target = FlowMatchingObjective("uniform").sample(x0, gen(10))
    tb = t.double().view(-1, 1, 1, 1, 1)
    eps = target.double() + x0.double()
    assert torch.allclose(noisy.double(), (1 - tb) * x0.double() + tb * eps, atol=1e-5)
    assert ((t >= 0) & (t <= 1)).all()


def test_flow_timestep_distributions():
    x0 = torch.zeros(200000, 1)
    _, t_u, _ = FlowMatchingObjective("uniform").sample(x0, gen(11))
    assert t_u.double().mean().item() == pytest.approx(0.5, abs=3e-3)
    _, t_s, _ = FlowMatchingObjective("shift", shift=3.0).sample(x0, gen(12))
    # E[3u/(1+2u)] for u ~ U(0,1) = 1.5 - 0.75 ln 3
    assert t_s.double().mean().item() == pytest.approx(1.5 - 0.75 * math.log(3.0), abs=3e-3)
    _, t_l, _ = FlowMatchingObjective("logit_normal", logit_mean=0.5, logit_std=1.0).sample(x0, gen(13))
    assert t_l.double().median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=5e-3)
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(shift_timesteps(u, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))


def _comfy_like_discrete_sigmas() -> torch.Tensor:
    acp = torch.from_numpy(ref_alphas_cumprod())
    return ((1 - acp) / acp).sqrt()


def test_model_sampling_objective_eps_target_is_noise():
    sigmas = _comfy_like_discrete_sigmas()
    obj = ModelSamplingObjective(
        sigma_for_uniform=lambda u: sigmas[(u * 1000).long().clamp(max=999)].float(),
        noise_scaling=lambda s, n, x0: x0 + s.view(-1, 1, 1, 1) * n,
        denoise=lambda s, out, xt: xt - s.view(-1, 1, 1, 1) * out,
    )
    x0 = torch.randn(5, 4, 3, 3, generator=gen(14))
    noisy, sigma, target = obj.sample(x0, gen(15))
    eps = (noisy.double() - x0.double()) / sigma.double().view(-1, 1, 1, 1)
    assert torch.allclose(target.double(), eps, atol=2e-4)


def test_model_sampling_objective_v_and_flow_targets():
    sigmas = _comfy_like_discrete_sigmas()
    x0 = torch.randn(5, 4, 3, 3, generator=gen(16))

    def v_denoise(s, out, xt):  # ComfyUI V_PREDICTION.calculate_denoised with sigma_data = 1
        s = s.view(-1, 1, 1, 1)
        return xt / (s ** 2 + 1) - out * s / (s ** 2 + 1).sqrt()

    v_obj = ModelSamplingObjective(
        sigma_for_uniform=lambda u: sigmas[(u * 1000).long().clamp(max=999)].float(),
        noise_scaling=lambda s, n, x: x + s.view(-1, 1, 1, 1) * n,
        denoise=v_denoise,
    )
    noisy, sigma, target = v_obj.sample(x0, gen(17))
    s = sigma.double().view(-1, 1, 1, 1)
    eps = (noisy.double() - x0.double()) / s
    a = 1 / (1 + s ** 2)
    assert torch.allclose(target.double(), a.sqrt() * eps - (1 - a).sqrt() * x0.double(), atol=2e-4)

    flow = ModelSamplingObjective(
        sigma_for_uniform=lambda u: shift_timesteps(u, 3.0),
        noise_scaling=lambda s, n, x: s.view(-1, 1, 1, 1) * n + (1 - s.view(-1, 1, 1, 1)) * x,
        denoise=lambda s, out, xt: xt - s.view(-1, 1, 1, 1) * out,
        weight=lambda s: 1 + s,
    )
    noisy, sigma, target = flow.sample(x0, gen(18))
    s = sigma.double().view(-1, 1, 1, 1)
    eps = (noisy.double() - (1 - s) * x0.double()) / s
    assert torch.allclose(target.double(), eps - x0.double(), atol=2e-4)
    pred = torch.zeros_like(target)
    per = (target.double() ** 2).mean(dim=(1, 2, 3)) * (1 + sigma.double())
    assert flow.loss(pred, target, sigma).item() == pytest.approx(per.mean().item(), rel=1e-5)
