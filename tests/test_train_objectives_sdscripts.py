"""sd-scripts' objective and noise options (SdScriptsObjective) against float64 references written from
sd-scripts' formulas, for fixed, seeded batches of timesteps and noise.

The model side is written here as ComfyUI's sampling objects compute it (EPS / V_PREDICTION with sigma_data 1 over
the SDXL schedule, CONST flow matching), so no ComfyUI is needed. Random draws are replayed from a generator with the
same seed in the order the objective documents: sigma (u, or the flow sampling's draws), noise, noise offset,
multires levels, input perturbation.
"""
import math

import numpy as np
import pytest
import torch

from hadakron.train.objective_options import ObjectiveOptions, objective_metadata
from hadakron.train.objectives import ModelSamplingObjective, SdScriptsObjective

B, C, H, W = 5, 4, 8, 8
TIMESTEPS = np.array([0, 10, 250, 500, 999])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ref_alphas_cumprod() -> np.ndarray:
    """SDXL's scaled-linear schedule in float64."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


ACP = ref_alphas_cumprod()
SIGMAS = np.sqrt((1 - ACP) / ACP)  # ComfyUI's SDXL sigma per timestep


def sdxl_callables(v: bool):
    """sigma_for_uniform (timestep (1 - u) 999, log-sigma interpolated), noise_scaling and denoise as ComfyUI's
    ModelSamplingDiscrete with EPS or V_PREDICTION computes them, plus timestep_of_sigma (nearest timestep)."""
    log_sigmas = torch.from_numpy(np.log(SIGMAS)).float()

    def sigma_for_uniform(u):
        t = ((1 - u.clamp(1e-5, 1 - 1e-5)) * 999).double()
        lo, hi, w = t.floor().long(), t.ceil().long(), (t - t.floor()).float()
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()

    def noise_scaling(s, noise, x0):
        return x0 + s.view(-1, 1, 1, 1) * noise

    def denoise(s, out, xt):
        s = s.view(-1, 1, 1, 1)
        if v:
            return xt / (s ** 2 + 1) - out * s / (s ** 2 + 1).sqrt()
        return xt - out * s

    def timestep_of_sigma(s):
        return (s.log()[None, :] - log_sigmas[:, None]).abs().argmin(dim=0)

    return sigma_for_uniform, noise_scaling, denoise, timestep_of_sigma


def flow_callables(shift: float = 3.0):
    """Anima's ModelSamplingDiscreteFlow (multiplier 1) with CONST: sigma = shift(1 - u), x_t = s eps + (1 - s) x0."""
    def sigma_for_uniform(u):
        t = 1 - u.clamp(1e-5, 1 - 1e-5)
        return shift * t / (1 + (shift - 1) * t)

    def noise_scaling(s, noise, x0):
        s = s.view(-1, *([1] * (noise.ndim - 1)))
        return s * noise + (1 - s) * x0

    def denoise(s, out, xt):
        return xt - out * s.view(-1, *([1] * (out.ndim - 1)))

    return sigma_for_uniform, noise_scaling, denoise, lambda s: s


def sdxl_objective(v: bool = False, zsnr: bool = False, **options) -> SdScriptsObjective:
    f, ns, dn, ts = sdxl_callables(v)
    return SdScriptsObjective(f, ns, dn, options=ObjectiveOptions(**options), family="sdxl",
                              prediction="v_prediction" if v else "epsilon", timestep_of_sigma=ts, zsnr=zsnr)


def anima_objective(**options) -> SdScriptsObjective:
    f, ns, dn, ts = flow_callables()
    return SdScriptsObjective(f, ns, dn, options=ObjectiveOptions(**options), family="anima", prediction="flow",
                              timestep_of_sigma=ts)


def fixed_batch(seed: int, shape=(B, C, H, W)):
    """(pred, target) float32 and their float64 difference."""
    g = gen(seed)
    pred = torch.randn(shape, generator=g)
    target = torch.randn(shape, generator=g)
    return pred, target, pred.double().numpy() - target.double().numpy()


def sdxl_sigma_batch() -> torch.Tensor:
    return torch.from_numpy(SIGMAS[TIMESTEPS]).float()


def per_sample_mean(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).mean(axis=1)


# ---------------------------------------------------------------- defaults: today's objective, bit for bit


@pytest.mark.parametrize("family", ["sdxl_eps", "sdxl_v", "anima"])
def test_defaults_are_model_sampling_objective_bit_for_bit(family):
    f, ns, dn, ts = flow_callables() if family == "anima" else sdxl_callables(family == "sdxl_v")
    shape = (B, 16, 1, H, W) if family == "anima" else (B, C, H, W)
    plain = ModelSamplingObjective(f, ns, dn)
    ours = SdScriptsObjective(f, ns, dn, options=ObjectiveOptions(), timestep_of_sigma=ts,
                              family="anima" if family == "anima" else "sdxl",
                              prediction={"sdxl_eps": "epsilon", "sdxl_v": "v_prediction", "anima": "flow"}[family])
    x0 = torch.randn(shape, generator=gen(1))
    a, b = plain.sample(x0, gen(2)), ours.sample(x0, gen(2))
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)
    pred = torch.randn(shape, generator=gen(3))
    assert torch.equal(plain.loss(pred, a.target, a.timestep), ours.loss(pred, b.target, b.timestep))
    assert ObjectiveOptions().non_default() == []


# ---------------------------------------------------------------- SDXL loss weights


def ref_weighted_loss(diff: np.ndarray, weight: np.ndarray) -> float:
    return float((per_sample_mean(diff ** 2) * weight).mean())


@pytest.mark.parametrize("v", [False, True])
def test_min_snr_gamma(v):
    pred, target, diff = fixed_batch(10)
    snr = ACP[TIMESTEPS] / (1 - ACP[TIMESTEPS])
    weight = np.minimum(snr, 5.0) / (snr + 1 if v else snr)
    got = sdxl_objective(v=v, v_parameterization=v, min_snr_gamma=5.0).loss(pred, target, sdxl_sigma_batch())
    assert got.item() == pytest.approx(ref_weighted_loss(diff, weight), rel=1e-5)


def test_scale_v_pred_loss_like_noise_pred_caps_snr_at_1000():
    pred, target, diff = fixed_batch(11)
    snr = np.minimum(ACP[TIMESTEPS] / (1 - ACP[TIMESTEPS]), 1000.0)
    assert ACP[0] / (1 - ACP[0]) > 1000  # the cap is reached at t = 0
    weight = snr / (snr + 1)
    got = sdxl_objective(v=True, scale_v_pred_loss_like_noise_pred=True).loss(pred, target, sdxl_sigma_batch())
    assert got.item() == pytest.approx(ref_weighted_loss(diff, weight), rel=1e-5)


@pytest.mark.parametrize("v", [False, True])
def test_debiased_estimation_loss(v):
    pred, target, diff = fixed_batch(12)
    snr = np.minimum(ACP[TIMESTEPS] / (1 - ACP[TIMESTEPS]), 1000.0)
    weight = 1 / (snr + 1) if v else 1 / np.sqrt(snr)
    got = sdxl_objective(v=v, debiased_estimation_loss=True).loss(pred, target, sdxl_sigma_batch())
    assert got.item() == pytest.approx(ref_weighted_loss(diff, weight), rel=1e-5)


def test_weights_multiply_in_sd_scripts_order():
    """min_snr_gamma, then scale_v_pred_loss_like_noise_pred, then debiased_estimation_loss, all on one loss."""
    pred, target, diff = fixed_batch(13)
    raw = ACP[TIMESTEPS] / (1 - ACP[TIMESTEPS])
    capped = np.minimum(raw, 1000.0)
    weight = np.minimum(raw, 2.0) / (raw + 1) * (capped / (capped + 1)) * (1 / (capped + 1))
    obj = sdxl_objective(v=True, min_snr_gamma=2.0, scale_v_pred_loss_like_noise_pred=True,
                         debiased_estimation_loss=True)
    assert obj.loss(pred, target, sdxl_sigma_batch()).item() == pytest.approx(ref_weighted_loss(diff, weight),
                                                                             rel=1e-5)


# ---------------------------------------------------------------- loss types and the Huber schedules


def ref_huber_c(schedule: str, c: float, t: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    if schedule == "constant":
        return np.full(t.shape, c)
    if schedule == "exponential":
        return np.exp(t * math.log(c) / 1000.0)
    return (1 - c) / (1 + sigma) ** 2 + c


def ref_element_loss(kind: str, d: np.ndarray, c: np.ndarray | None) -> np.ndarray:
    if kind == "l1":
        return np.abs(d)
    cb = c.reshape(-1, *([1] * (d.ndim - 1)))
    root = np.sqrt(d ** 2 + cb ** 2) - cb
    return 2 * cb * root if kind == "huber" else 2 * root


def test_l1_loss():
    pred, target, diff = fixed_batch(20)
    got = sdxl_objective(loss_type="l1").loss(pred, target, sdxl_sigma_batch())
    assert got.item() == pytest.approx(float(per_sample_mean(np.abs(diff)).mean()), rel=1e-5)


@pytest.mark.parametrize("kind", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_losses_sdxl(kind, schedule):
    pred, target, diff = fixed_batch(21)
    c = ref_huber_c(schedule, 0.2, TIMESTEPS.astype(np.float64), SIGMAS[TIMESTEPS])
    want = float(per_sample_mean(ref_element_loss(kind, diff, c)).mean())
    obj = sdxl_objective(loss_type=kind, huber_schedule=schedule, huber_c=0.2)
    assert obj.huber_threshold(sdxl_sigma_batch()).double().numpy() == pytest.approx(c, rel=1e-5)
    assert obj.loss(pred, target, sdxl_sigma_batch()).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential"])
def test_huber_losses_anima_use_timestep_1000_sigma(kind, schedule):
    shape = (B, 16, 1, 4, 4)
    pred, target, diff = fixed_batch(22, shape)
    sigma = np.array([0.05, 0.2, 0.5, 0.8, 1.0])
    c = ref_huber_c(schedule, 0.3, 1000 * sigma, sigma)
    want = float(per_sample_mean(ref_element_loss(kind, diff, c)).mean())
    obj = anima_objective(loss_type=kind, huber_schedule=schedule, huber_c=0.3)
    assert obj.loss(pred, target, torch.tensor(sigma, dtype=torch.float32)).item() == pytest.approx(want, rel=1e-5)


def test_huber_with_min_snr_weight():
    pred, target, diff = fixed_batch(23)
    snr = ACP[TIMESTEPS] / (1 - ACP[TIMESTEPS])
    c = ref_huber_c("snr", 0.1, TIMESTEPS.astype(np.float64), SIGMAS[TIMESTEPS])
    want = float((per_sample_mean(ref_element_loss("huber", diff, c)) * np.minimum(snr, 5.0) / snr).mean())
    obj = sdxl_objective(min_snr_gamma=5.0, loss_type="huber")
    assert obj.loss(pred, target, sdxl_sigma_batch()).item() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- SDXL noise


def replay(seed: int, *draws):
    """The objective's draws from a generator with `seed`, as float64 arrays: ("rand", n), ("randn", shape),
    ("rand0",) for one scalar."""
    g = gen(seed)
    out = []
    for kind, *shape in draws:
        if kind == "rand":
            out.append(torch.rand((shape[0],), generator=g).double().numpy())
        elif kind == "rand0":
            out.append(float(torch.rand((), generator=g)))
        else:
            out.append(torch.randn(tuple(shape[0]), generator=g).double().numpy())
    return out


def ref_sdxl_sigma(u: np.ndarray) -> np.ndarray:
    """ComfyUI's sigma for u: timestep (1 - u) 999, log-sigma interpolated."""
    t = (1 - np.clip(u, 1e-5, 1 - 1e-5)) * 999
    lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - np.floor(t)
    return np.exp((1 - w) * np.log(SIGMAS[lo]) + w * np.log(SIGMAS[hi]))


def test_noise_offset_and_adaptive_scale():
    x0 = torch.randn(B, C, H, W, generator=gen(30)) + torch.tensor([0.5, -0.3, 0.0, 1.2]).view(1, C, 1, 1)
    x = x0.double().numpy()
    u, eps, offset = replay(31, ("rand", B), ("randn", (B, C, H, W)), ("randn", (B, C, 1, 1)))
    sigma = ref_sdxl_sigma(u)
    for adaptive in (0.0, 0.1, -0.2):
        strength = 0.05 if not adaptive else np.maximum(0.05 + adaptive * np.abs(x.mean(axis=(2, 3), keepdims=True)),
                                                         0.0)
        want_eps = eps + strength * offset
        noisy, s, target = sdxl_objective(noise_offset=0.05, adaptive_noise_scale=adaptive).sample(x0, gen(31))
        assert s.double().numpy() == pytest.approx(sigma, rel=1e-5)
        assert np.abs(target.double().numpy() - want_eps).max() < 1e-4
        assert np.abs(noisy.double().numpy() - (x + sigma.reshape(-1, 1, 1, 1) * want_eps)).max() < 1e-3
    assert (np.maximum(0.05 - 0.2 * np.abs(x.mean(axis=(2, 3))), 0) == 0).any()  # the clamp at 0 was reached


def ref_multires(seed: int, b: int, c: int, h: int, w: int, iterations: int, discount: float):
    """sd-scripts' pyramid_noise_like in float64 after the objective's u and noise draws: every level's size is
    taken from the full (h, w); bilinear upsampling without corner alignment; divided by the std of the whole."""
    g = gen(seed)
    torch.rand((b,), generator=g)
    noise = torch.randn((b, c, h, w), generator=g).double()
    sizes = []
    for i in range(iterations):
        r = float(torch.rand((), generator=g)) * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        sizes.append((hn, wn))
        low = torch.randn((b, c, hn, wn), generator=g).double()
        noise = noise + torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear",
                                                        align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return (noise / noise.std()).numpy(), sizes


@pytest.mark.parametrize("iterations", [3, 10])
def test_multires_noise(iterations):
    x0 = torch.randn(B, C, 32, 32, generator=gen(40))
    want, sizes = ref_multires(41, B, C, 32, 32, iterations, 0.4)
    _, _, target = sdxl_objective(multires_noise_iterations=iterations, multires_noise_discount=0.4).sample(x0,
                                                                                                       gen(41))
    assert np.abs(target.double().numpy() - want).max() < 1e-4
    assert sizes[0] == (32, 32) and all(s[0] >= 1 for s in sizes)
    if iterations == 10:
        assert len(sizes) < 10 and 1 in sizes[-1]  # stopped at the 1-pixel level


def test_noise_offset_then_multires():
    """Both on: sd-scripts applies the offset, then the pyramid over the offset noise."""
    x0 = torch.randn(B, C, 16, 16, generator=gen(42))
    g = gen(43)
    torch.rand((B,), generator=g)
    noise = torch.randn((B, C, 16, 16), generator=g).double()
    noise = noise + 0.1 * torch.randn((B, C, 1, 1), generator=g).double()
    for i in range(2):
        r = float(torch.rand((), generator=g)) * 2 + 2
        hn, wn = max(1, int(16 / r ** i)), max(1, int(16 / r ** i))
        noise = noise + torch.nn.functional.interpolate(torch.randn((B, C, hn, wn), generator=g).double(),
                                                        size=(16, 16), mode="bilinear") * 0.3 ** i
    want = (noise / noise.std()).numpy()
    _, _, target = sdxl_objective(noise_offset=0.1, multires_noise_iterations=2).sample(x0, gen(43))
    assert np.abs(target.double().numpy() - want).max() < 1e-4


@pytest.mark.parametrize("v", [False, True])
def test_ip_noise_gamma_sdxl(v):
    """The input is noised with eps + gamma xi; the target is eps (epsilon) or v of eps (v-prediction)."""
    x0 = torch.randn(B, C, H, W, generator=gen(50))
    x = x0.double().numpy()
    u, eps, xi = replay(51, ("rand", B), ("randn", (B, C, H, W)), ("randn", (B, C, H, W)))
    s = ref_sdxl_sigma(u).reshape(-1, 1, 1, 1)
    noisy, _, target = sdxl_objective(v=v, ip_noise_gamma=0.1).sample(x0, gen(51))
    assert np.abs(noisy.double().numpy() - (x + s * (eps + 0.1 * xi))).max() < 1e-3
    want = (eps - s * x) / np.sqrt(s ** 2 + 1) if v else eps  # v = sqrt(a) eps - sqrt(1 - a) x0
    assert np.abs(target.double().numpy() - want).max() < 2e-4


# ---------------------------------------------------------------- Anima timestep sampling and weighting


def ref_shift(t: np.ndarray, s: float) -> np.ndarray:
    return s * t / (1 + (s - 1) * t)


def ref_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


ANIMA_SHAPE = (B, 16, 1, 4, 4)


@pytest.mark.parametrize("case", [
    dict(timestep_sampling="uniform"),
    dict(timestep_sampling="sigmoid", sigmoid_scale=1.5),
    dict(timestep_sampling="shift", discrete_flow_shift=3.0, sigmoid_scale=0.8),
    dict(timestep_sampling="sigma", discrete_flow_shift=3.0),
    dict(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.7),
    dict(timestep_sampling="sigma", weighting_scheme="mode", mode_scale=1.29, discrete_flow_shift=2.0),
])
def test_flow_timestep_sampling(case):
    kind = case["timestep_sampling"]
    scheme = case.get("weighting_scheme", "uniform")
    first = ("randn", (B,)) if kind in ("sigmoid", "shift") or scheme == "logit_normal" else ("rand", B)
    draw, eps = replay(60, first, ("randn", ANIMA_SHAPE))
    shift, scale = case.get("discrete_flow_shift", 1.0), case.get("sigmoid_scale", 1.0)
    if kind == "uniform":
        sigma = draw
    elif kind == "sigmoid":
        sigma = ref_sigmoid(scale * draw)
    elif kind == "shift":
        sigma = ref_shift(ref_sigmoid(scale * draw), shift)
    else:
        if scheme == "logit_normal":
            u = ref_sigmoid(case["logit_mean"] + case["logit_std"] * draw)
        elif scheme == "mode":
            u = 1 - draw - case["mode_scale"] * (np.cos(np.pi * draw / 2) ** 2 - 1 + draw)
        else:
            u = draw
        index = np.clip(np.floor(u * 1000).astype(int), 0, 999)
        # FlowMatchEulerDiscreteScheduler: timesteps 1000..1 (index 0 is t = 1), sigma = shift(t / 1000)
        sigma = ref_shift((1000 - index) / 1000.0, shift)
    x0 = torch.randn(ANIMA_SHAPE, generator=gen(61))
    x = x0.double().numpy()
    noisy, s, target = anima_objective(**case).sample(x0, gen(60))
    assert s.double().numpy() == pytest.approx(sigma, abs=1e-6)
    sb = sigma.reshape(-1, 1, 1, 1, 1)
    assert np.abs(noisy.double().numpy() - ((1 - sb) * x + sb * eps)).max() < 1e-5
    assert np.abs(target.double().numpy() - (eps - x)).max() < 1e-4


def test_flow_sampling_distributions():
    """Large-batch moments: sigmoid(N(0, 1)) has median 1/2; the logit-normal density's median is
    sigmoid(logit_mean); shift 3 moves the median to 3/4."""
    x0 = torch.zeros(100000, 1, 1, 1, 1)
    for case, median in ((dict(timestep_sampling="sigmoid"), 0.5),
                         (dict(timestep_sampling="shift", discrete_flow_shift=3.0), 0.75),
                         (dict(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=0.5),
                          1 - ref_sigmoid(0.5))):  # index = u T maps u to t = 1 - u
        _, s, _ = anima_objective(**case).sample(x0, gen(62))
        assert s.double().median().item() == pytest.approx(median, abs=5e-3), case


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_flow_loss_weighting(scheme):
    pred, target, diff = fixed_batch(63, ANIMA_SHAPE)
    sigma = np.array([0.05, 0.2, 0.5, 0.8, 1.0])
    weight = sigma ** -2.0 if scheme == "sigma_sqrt" else 2 / (np.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    for sampling in ("model", "shift"):  # a loss weight, whatever the sampling
        obj = anima_objective(weighting_scheme=scheme, timestep_sampling=sampling)
        got = obj.loss(pred, target, torch.tensor(sigma, dtype=torch.float32)).item()
        assert got == pytest.approx(ref_weighted_loss(diff, weight), rel=1e-5)


def test_ip_noise_gamma_anima():
    x0 = torch.randn(ANIMA_SHAPE, generator=gen(64))
    x = x0.double().numpy()
    z, eps, xi = replay(65, ("randn", (B,)), ("randn", ANIMA_SHAPE), ("randn", ANIMA_SHAPE))
    sb = ref_sigmoid(z).reshape(-1, 1, 1, 1, 1)
    noisy, _, target = anima_objective(timestep_sampling="sigmoid", ip_noise_gamma=0.2).sample(x0, gen(65))
    assert np.abs(noisy.double().numpy() - ((1 - sb) * x + sb * (eps + 0.2 * xi))).max() < 1e-5
    assert np.abs(target.double().numpy() - (eps - x)).max() < 1e-4


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("family,options,message", [
    ("sdxl", dict(timestep_sampling="shift"), r"\['timestep_sampling'\] are Anima options.*SDXL model"),
    ("sdxl", dict(weighting_scheme="cosmap", logit_std=2.0), r"\['weighting_scheme', 'logit_std'\] are Anima"),
    ("anima", dict(min_snr_gamma=5.0), r"\['min_snr_gamma'\] are SDXL options.*Anima model"),
    ("anima", dict(noise_offset=0.1, zero_terminal_snr=True), r"\['noise_offset', 'zero_terminal_snr'\] are SDXL"),
])
def test_foreign_family_options_refused_by_name(family, options, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveOptions(**options).validate(family, "epsilon" if family == "sdxl" else "flow")


@pytest.mark.parametrize("options,message", [
    (dict(min_snr_gamma=-1.0), r"min_snr_gamma: expected >= 0.*found -1.0"),
    (dict(noise_offset=-0.1), r"noise_offset: expected >= 0"),
    (dict(multires_noise_iterations=2.5), r"multires_noise_iterations: expected an integer >= 0"),
    (dict(multires_noise_iterations=2, multires_noise_discount=1.5), r"multires_noise_discount: expected in \[0, 1\]"),
    (dict(ip_noise_gamma=-0.1), r"ip_noise_gamma: expected >= 0"),
    (dict(loss_type="huber", huber_c=0.0), r"huber_c: expected in \(0, 1\], found 0.0"),
    (dict(loss_type="mse"), r"loss_type: expected one of .*found 'mse'"),
    (dict(loss_type="huber", huber_schedule="cosine"), r"huber_schedule: expected one of .*found 'cosine'"),
    (dict(adaptive_noise_scale=0.1), r"adaptive_noise_scale: has an effect only with noise_offset > 0"),
    (dict(multires_noise_discount=0.5), r"multires_noise_discount: has an effect only with multires"),
    (dict(huber_c=0.2), r"huber_c: has an effect only with loss_type huber or smooth_l1"),
    (dict(v_parameterization=True), r"v_parameterization: the model samples as epsilon"),
    (dict(scale_v_pred_loss_like_noise_pred=True), r"scale_v_pred_loss_like_noise_pred: expected a v-prediction"),
    (dict(zero_terminal_snr=True), r"zero_terminal_snr: the model's schedule is not zero terminal SNR"),
])
def test_sdxl_options_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveOptions(**options).validate("sdxl", "epsilon")


@pytest.mark.parametrize("options,message", [
    (dict(timestep_sampling="logit"), r"timestep_sampling: expected one of .*found 'logit'"),
    (dict(timestep_sampling="shift", discrete_flow_shift=0.0), r"discrete_flow_shift: expected > 0"),
    (dict(timestep_sampling="sigmoid", sigmoid_scale=-1.0), r"sigmoid_scale: expected > 0"),
    (dict(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_std=0.0), r"logit_std: expected > 0"),
    (dict(discrete_flow_shift=3.0), r"discrete_flow_shift: has an effect only with timestep_sampling shift or sigma"),
    (dict(timestep_sampling="uniform", sigmoid_scale=2.0), r"sigmoid_scale: has an effect only with"),
    (dict(timestep_sampling="shift", logit_mean=0.5), r"logit_mean: has an effect only with timestep_sampling sigma"),
    (dict(timestep_sampling="sigma", mode_scale=1.0), r"mode_scale: has an effect only with .*weighting_scheme mode"),
    (dict(timestep_sampling="shift", weighting_scheme="logit_normal"),
     r"weighting_scheme 'logit_normal': a timestep density, read only by timestep_sampling sigma"),
    (dict(loss_type="huber"), r"huber_schedule 'snr'.*Anima choose constant or exponential"),
])
def test_anima_options_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveOptions(**options).validate("anima", "flow")


def test_valid_combinations_pass():
    ObjectiveOptions(v_parameterization=True, scale_v_pred_loss_like_noise_pred=True, zero_terminal_snr=True,
                     debiased_estimation_loss=True).validate("sdxl", "v_prediction", zsnr=True)
    ObjectiveOptions(noise_offset=0.05, adaptive_noise_scale=0.01, multires_noise_iterations=6,
                     multires_noise_discount=0.3, loss_type="smooth_l1", huber_schedule="exponential",
                     ip_noise_gamma=0.1).validate("sdxl", "epsilon")
    ObjectiveOptions(timestep_sampling="sigma", weighting_scheme="mode", mode_scale=1.0, discrete_flow_shift=3.0,
                     loss_type="huber", huber_schedule="constant").validate("anima", "flow")
    ObjectiveOptions(weighting_scheme="sigma_sqrt").validate("anima", "flow")  # a loss weight: fine with "model"


def test_widget_rounding_reads_as_the_default():
    """A float widget's rounding (0.3 sent as 0.30000000000000004) is the default, not an idle option."""
    rounded = ObjectiveOptions(multires_noise_discount=0.30000000000000004, mode_scale=1.2900000000000003,
                               huber_c=0.10000000000000002, multires_noise_iterations=0.0)
    assert rounded.non_default() == []
    rounded.validate("sdxl", "epsilon")
    assert ObjectiveOptions(multires_noise_discount=0.3001).non_default() == ["multires_noise_discount"]


def test_objective_validates_on_construction():
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        sdxl_objective(v=True, zero_terminal_snr=True)
    sdxl_objective(v=True, zsnr=True, zero_terminal_snr=True)


# ---------------------------------------------------------------- metadata


def test_metadata_sdxl_as_sd_scripts_writes_it():
    meta = objective_metadata(ObjectiveOptions(min_snr_gamma=5.0, noise_offset=0.0357, loss_type="huber",
                                               huber_c=0.2), "sdxl", "v_prediction", zsnr=True)
    assert meta == {
        "min_snr_gamma": "5.0", "noise_offset": "0.0357", "adaptive_noise_scale": "None",
        "multires_noise_iterations": "None", "multires_noise_discount": "0.3", "ip_noise_gamma": "None",
        "loss_type": "huber", "huber_schedule": "snr", "huber_c": "0.2", "v_parameterization": "True",
        "scale_v_pred_loss_like_noise_pred": "False", "debiased_estimation": "False", "zero_terminal_snr": "True",
    }


def test_metadata_anima_as_sd_scripts_writes_it():
    options = ObjectiveOptions(timestep_sampling="sigma", discrete_flow_shift=3.0, weighting_scheme="logit_normal",
                               logit_mean=0.5)
    meta = objective_metadata(options, "anima", "flow", model_shift=3.0)
    assert meta == {
        "timestep_sampling": "sigma", "discrete_flow_shift": "3.0", "sigmoid_scale": "1.0",
        "weighting_scheme": "logit_normal", "logit_mean": "0.5", "logit_std": "1.0", "mode_scale": "1.29",
        "ip_noise_gamma": "None", "loss_type": "l2", "huber_schedule": "snr", "huber_c": "0.1",
    }
    # timestep_sampling "model": the shift written is the model's own
    assert objective_metadata(ObjectiveOptions(), "anima", "flow", model_shift=3.0)["discrete_flow_shift"] == "3.0"
