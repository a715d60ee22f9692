"""The Objective Options node's settings: sd-scripts' objective and noise arguments, same names, same formulas.

Kept apart from trainer_options.py (which groups them) so the specs and their per-family notes live in one place.
Every default is hadakron's objective before these options (hadakron.train.objective_options); each tooltip says
which family reads the option and sd-scripts' default for that family.
"""
from __future__ import annotations

from hadakron.train.noise import FLOW_SAMPLINGS, HUBER_SCHEDULES, LOSS_TYPES, WEIGHTING_SCHEMES
from hadakron.train.objective_options import ObjectiveOptions

_D = ObjectiveOptions()


def _tip(name: str, family: str, text: str) -> str:
    """A tooltip: which family reads the option, what it does, and its sd-scripts argument."""
    return f"[{family}] {text} (sd-scripts: {name})"


def _float(default: float, lo: float, hi: float, step: float, tip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tip})


def objective_specs() -> dict[str, tuple]:
    """{setting: ComfyUI input spec} of every objective option, defaults from ObjectiveOptions."""
    return {
        "v_parameterization": ("BOOLEAN", {"default": _D.v_parameterization, "tooltip": _tip(
            "v_parameterization", "SDXL", "The prediction always follows the model's sampling (SDXL: epsilon; "
            "ComfyUI's ModelSamplingDiscrete node with v_prediction makes it v). On: refuse to train unless it is "
            "v. Default off, as sd-scripts.")}),
        "min_snr_gamma": _float(_D.min_snr_gamma, 0.0, 100.0, 0.5, _tip(
            "min_snr_gamma", "SDXL", "Min-SNR weight min(snr, gamma) / snr (v-prediction: / (snr + 1)), "
            "snr = 1 / sigma^2. 0: off (sd-scripts default; 5 is common).")),
        "scale_v_pred_loss_like_noise_pred": ("BOOLEAN", {
            "default": _D.scale_v_pred_loss_like_noise_pred, "tooltip": _tip(
                "scale_v_pred_loss_like_noise_pred", "SDXL v-prediction",
                "Weight snr / (snr + 1), snr capped at 1000. Default off.")}),
        "debiased_estimation_loss": ("BOOLEAN", {"default": _D.debiased_estimation_loss, "tooltip": _tip(
            "debiased_estimation_loss", "SDXL", "Weight 1 / sqrt(snr) (v-prediction: 1 / (snr + 1)), snr capped "
            "at 1000. Default off.")}),
        "noise_offset": _float(_D.noise_offset, 0.0, 1.0, 0.005, _tip(
            "noise_offset", "SDXL", "Adds noise_offset * N(0,1) per sample and channel to the noise. 0: off "
            "(sd-scripts default; 0.0357 is common).")),
        "adaptive_noise_scale": _float(_D.adaptive_noise_scale, -1.0, 1.0, 0.005, _tip(
            "adaptive_noise_scale", "SDXL", "The offset becomes max(0, noise_offset + this * |channel mean of the "
            "latent|); needs noise_offset. 0: off (sd-scripts default).")),
        "multires_noise_iterations": ("INT", {"default": _D.multires_noise_iterations, "min": 0, "max": 20,
                                              "tooltip": _tip(
            "multires_noise_iterations", "SDXL", "Pyramid noise: levels of upsampled low-resolution noise added "
            "(then divided by the std). 0: off (sd-scripts default; 6-10 is common).")}),
        "multires_noise_discount": _float(_D.multires_noise_discount, 0.0, 1.0, 0.05, _tip(
            "multires_noise_discount", "SDXL", "Level i is weighted discount^i; needs multires_noise_iterations. "
            "Default 0.3, as sd-scripts.")),
        "zero_terminal_snr": ("BOOLEAN", {"default": _D.zero_terminal_snr, "tooltip": _tip(
            "zero_terminal_snr", "SDXL", "The schedule always follows the model's sampling; ComfyUI's "
            "ModelSamplingDiscrete node with zsnr on rescales it as sd-scripts does. On: refuse to train unless "
            "it is zero terminal SNR. Default off, as sd-scripts.")}),
        "ip_noise_gamma": _float(_D.ip_noise_gamma, 0.0, 1.0, 0.01, _tip(
            "ip_noise_gamma", "SDXL and Anima", "Input perturbation: the model input is noised with noise + gamma "
            "* N(0,1), the target keeps the noise. 0: off (sd-scripts default; 0.1 is common).")),
        "loss_type": (list(LOSS_TYPES), {"default": _D.loss_type, "tooltip": _tip(
            "loss_type", "SDXL and Anima", "l2 (default, as sd-scripts), l1, huber 2c (sqrt(d^2 + c^2) - c), "
            "smooth_l1 2 (sqrt(d^2 + c^2) - c), with d = prediction - target.")}),
        "huber_schedule": (list(HUBER_SCHEDULES), {"default": _D.huber_schedule, "tooltip": _tip(
            "huber_schedule", "SDXL and Anima", "c per timestep t (0..1000) for huber / smooth_l1: constant c, "
            "exponential exp(t ln(c) / 1000), snr (1 - c) / (1 + sigma)^2 + c (SDXL only). Default snr, as "
            "sd-scripts; on Anima choose constant or exponential.")}),
        "huber_c": _float(_D.huber_c, 0.0001, 1.0, 0.01, _tip(
            "huber_c", "SDXL and Anima", "Huber threshold c for huber / smooth_l1. Default 0.1, as sd-scripts.")),
        "timestep_sampling": (list(FLOW_SAMPLINGS), {"default": _D.timestep_sampling, "tooltip": _tip(
            "timestep_sampling", "Anima", "model (default): the model's own t = 3u / (1 + 2u), u uniform, as "
            "before these options; sd-scripts' Anima default is sigmoid. uniform: U[0,1); sigmoid: "
            "sigmoid(sigmoid_scale N); shift: sigmoid, then discrete_flow_shift; sigma: the shifted 1000-step "
            "schedule drawn by weighting_scheme's density (logit_normal, mode, uniform).")}),
        "discrete_flow_shift": _float(_D.discrete_flow_shift, 0.01, 100.0, 0.05, _tip(
            "discrete_flow_shift", "Anima", "t' = s t / (1 + (s - 1) t), for timestep_sampling shift and sigma. "
            "Default 1.0, as sd-scripts' Anima (the model's own shift is 3).")),
        "sigmoid_scale": _float(_D.sigmoid_scale, 0.01, 100.0, 0.05, _tip(
            "sigmoid_scale", "Anima", "Scale of N before the sigmoid, for timestep_sampling sigmoid and shift. "
            "Default 1.0, as sd-scripts.")),
        "weighting_scheme": (list(WEIGHTING_SCHEMES), {"default": _D.weighting_scheme, "tooltip": _tip(
            "weighting_scheme", "Anima", "logit_normal / mode: the density of timestep_sampling sigma; "
            "sigma_sqrt (weight sigma^-2) / cosmap (2 / (pi (1 - 2s + 2s^2))): a loss weight; uniform / none: "
            "neither. Default uniform, as sd-scripts.")}),
        "logit_mean": _float(_D.logit_mean, -10.0, 10.0, 0.05, _tip(
            "logit_mean", "Anima", "Mean of the logit_normal density. Default 0.0, as sd-scripts.")),
        "logit_std": _float(_D.logit_std, 0.01, 10.0, 0.05, _tip(
            "logit_std", "Anima", "Std of the logit_normal density. Default 1.0, as sd-scripts.")),
        "mode_scale": _float(_D.mode_scale, -10.0, 10.0, 0.01, _tip(
            "mode_scale", "Anima", "Scale of the mode density. Default 1.29, as sd-scripts.")),
    }


def objective_options(kw: dict) -> ObjectiveOptions:
    """The ObjectiveOptions of one run's settings (the legacy trainers have none: all defaults)."""
    return ObjectiveOptions(**{k: kw[k] for k in objective_specs() if k in kw})
