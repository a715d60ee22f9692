"""sd-scripts' objective and noise arguments, by their names: the values, what each family accepts, the metadata.

The defaults are hadakron's objective before these options existed (the model's own sampling, plain MSE on its
prediction), so a run that sets none of them is unchanged. Per family that is sd-scripts' default too, except for
Anima's timestep distribution: sd-scripts' anima_train_network defaults to `timestep_sampling` sigmoid with
`discrete_flow_shift` 1.0, hadakron to "model" (the model's own shifted uniform t, shift 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from hadakron.train.noise import FLOW_SAMPLINGS, HUBER_SCHEDULES, LOSS_TYPES, WEIGHTING_SCHEMES

FAMILIES = ("sdxl", "anima")
PREDICTIONS = ("epsilon", "v_prediction", "flow")
SDXL_ONLY = ("v_parameterization", "min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss",
             "noise_offset", "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount",
             "zero_terminal_snr")
ANIMA_ONLY = ("timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "weighting_scheme", "logit_mean",
              "logit_std", "mode_scale")
BOTH = ("ip_noise_gamma", "loss_type", "huber_schedule", "huber_c")
# sd-scripts writes these as "None" when they are off (their argparse default is None); hadakron's off is 0
_NONE_WHEN_ZERO = ("min_snr_gamma", "noise_offset", "adaptive_noise_scale", "multires_noise_iterations",
                   "ip_noise_gamma")


def _same(value, default) -> bool:
    """An option's value equals its default: exactly for str / bool, to 1e-9 (relative and absolute) for numbers."""
    if isinstance(default, (str, bool)) or isinstance(value, (str, bool)):
        return value == default
    return math.isclose(float(value), float(default), rel_tol=1e-9, abs_tol=1e-12)


@dataclass(frozen=True)
class ObjectiveOptions:
    """sd-scripts' objective and noise arguments (see the module docstring for the defaults)."""

    v_parameterization: bool = False
    min_snr_gamma: float = 0.0
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation_loss: bool = False
    noise_offset: float = 0.0
    adaptive_noise_scale: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    zero_terminal_snr: bool = False
    ip_noise_gamma: float = 0.0
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    timestep_sampling: str = "model"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def non_default(self) -> list[str]:
        """Names of the options not at their default, in field order (floats compared to 1e-9, so a widget's
        rounding, 0.30000000000000004 for 0.3, still reads as the default)."""
        base = ObjectiveOptions()
        return [f.name for f in fields(self) if not _same(getattr(self, f.name), getattr(base, f.name))]

    def validate(self, family: str, prediction: str, *, zsnr: bool = False) -> None:
        """Raise ValueError naming the first options that cannot run on this model: out of range, of the other
        family, or set where they have no effect. `prediction`: epsilon / v_prediction (SDXL) or flow (Anima);
        `zsnr`: the model's schedule has zero terminal SNR."""
        if family not in FAMILIES or prediction not in PREDICTIONS:
            raise ValueError(f"objective: expected family in {FAMILIES} and prediction in {PREDICTIONS}, "
                             f"found {family!r}, {prediction!r}")
        changed = self.non_default()
        foreign = [n for n in changed if n in (ANIMA_ONLY if family == "sdxl" else SDXL_ONLY)]
        if foreign:
            model, other = ("an SDXL", "Anima") if family == "sdxl" else ("an Anima", "SDXL")
            raise ValueError(f"objective options {foreign} are {other} options, and this is {model} model: "
                             f"leave them at their defaults")
        _check_choices(self)
        _check_ranges(self)
        _check_idle(self, changed)
        _check_model(self, family, prediction, zsnr)


def _check_choices(o: ObjectiveOptions) -> None:
    """Combo options are one of their choices."""
    for name, choices in (("loss_type", LOSS_TYPES), ("huber_schedule", HUBER_SCHEDULES),
                          ("timestep_sampling", FLOW_SAMPLINGS), ("weighting_scheme", WEIGHTING_SCHEMES)):
        if getattr(o, name) not in choices:
            raise ValueError(f"{name}: expected one of {choices}, found {getattr(o, name)!r}")


def _check_ranges(o: ObjectiveOptions) -> None:
    """Numbers inside the ranges their formulas are defined on."""
    rules = (("min_snr_gamma", o.min_snr_gamma >= 0, ">= 0 (0: off)"),
             ("noise_offset", o.noise_offset >= 0, ">= 0 (0: off)"),
             ("multires_noise_iterations", o.multires_noise_iterations >= 0
              and int(o.multires_noise_iterations) == o.multires_noise_iterations, "an integer >= 0 (0: off)"),
             ("multires_noise_discount", 0 <= o.multires_noise_discount <= 1, "in [0, 1]"),
             ("ip_noise_gamma", o.ip_noise_gamma >= 0, ">= 0 (0: off)"),
             ("huber_c", 0 < o.huber_c <= 1, "in (0, 1]"),
             ("discrete_flow_shift", o.discrete_flow_shift > 0, "> 0"),
             ("sigmoid_scale", o.sigmoid_scale > 0, "> 0"),
             ("logit_std", o.logit_std > 0, "> 0"))
    for name, ok, expected in rules:
        if not ok:
            raise ValueError(f"{name}: expected {expected}, found {getattr(o, name)!r}")


def _check_idle(o: ObjectiveOptions, changed: list[str]) -> None:
    """Options changed from their default where the formulas never read them (sd-scripts ignores most of these
    silently; a setting that does nothing is a mistake worth naming)."""
    huber = o.loss_type in ("huber", "smooth_l1")
    sigma_density = o.timestep_sampling == "sigma"
    needs = {
        "adaptive_noise_scale": (o.noise_offset > 0, "noise_offset > 0"),
        "multires_noise_discount": (o.multires_noise_iterations > 0, "multires_noise_iterations > 0"),
        "huber_schedule": (huber, "loss_type huber or smooth_l1"),
        "huber_c": (huber, "loss_type huber or smooth_l1"),
        "discrete_flow_shift": (o.timestep_sampling in ("shift", "sigma"), "timestep_sampling shift or sigma"),
        "sigmoid_scale": (o.timestep_sampling in ("sigmoid", "shift"), "timestep_sampling sigmoid or shift"),
        "logit_mean": (sigma_density and o.weighting_scheme == "logit_normal",
                       "timestep_sampling sigma with weighting_scheme logit_normal"),
        "logit_std": (sigma_density and o.weighting_scheme == "logit_normal",
                      "timestep_sampling sigma with weighting_scheme logit_normal"),
        "mode_scale": (sigma_density and o.weighting_scheme == "mode",
                       "timestep_sampling sigma with weighting_scheme mode"),
    }
    for name in changed:
        if name in needs and not needs[name][0]:
            raise ValueError(f"{name}: has an effect only with {needs[name][1]}; found {name}="
                             f"{getattr(o, name)!r} without it (set it back to its default, or set that too)")
    if o.weighting_scheme in ("logit_normal", "mode") and not sigma_density:
        raise ValueError(f"weighting_scheme {o.weighting_scheme!r}: a timestep density, read only by "
                         f"timestep_sampling sigma; found timestep_sampling {o.timestep_sampling!r}")


def _check_model(o: ObjectiveOptions, family: str, prediction: str, zsnr: bool) -> None:
    """Options that state a property of the model, or need one."""
    v_pred = prediction == "v_prediction"
    if o.v_parameterization and not v_pred:
        raise ValueError("v_parameterization: the model samples as epsilon prediction; put ComfyUI's "
                         "ModelSamplingDiscrete node (sampling v_prediction) before the trainer")
    if o.scale_v_pred_loss_like_noise_pred and not v_pred:
        raise ValueError("scale_v_pred_loss_like_noise_pred: expected a v-prediction model, found epsilon "
                         "prediction (sd-scripts refuses it without v_parameterization too)")
    if o.zero_terminal_snr and not zsnr:
        raise ValueError("zero_terminal_snr: the model's schedule is not zero terminal SNR; put ComfyUI's "
                         "ModelSamplingDiscrete node (zsnr on) before the trainer")
    if family == "anima" and o.loss_type in ("huber", "smooth_l1") and o.huber_schedule == "snr":
        raise ValueError(f"huber_schedule 'snr': an SDXL schedule (alphas_cumprod), which a flow-matching model "
                         f"has not (sd-scripts refuses it too); with loss_type {o.loss_type!r} on Anima choose "
                         f"constant or exponential")


def objective_metadata(o: ObjectiveOptions, family: str, prediction: str, *, zsnr: bool = False,
                       model_shift: float | None = None) -> dict[str, str]:
    """The run's objective as sd-scripts' metadata keys (without the `ss_` prefix), values as sd-scripts writes
    them (str; "None" for an option that is off). v_parameterization and zero_terminal_snr say what the model
    trained with; Anima's discrete_flow_shift under timestep_sampling "model" is the model's own shift."""
    def text(name: str) -> str:
        value = getattr(o, name)
        return "None" if name in _NONE_WHEN_ZERO and not value else str(value)

    out = {name: text(name) for name in BOTH}
    if family == "sdxl":
        out.update({name: text(name) for name in SDXL_ONLY if name != "debiased_estimation_loss"})
        out["debiased_estimation"] = str(bool(o.debiased_estimation_loss))
        out["v_parameterization"] = str(prediction == "v_prediction")
        out["zero_terminal_snr"] = str(bool(zsnr))
    else:
        out.update({name: text(name) for name in ANIMA_ONLY})
        if o.timestep_sampling == "model" and model_shift is not None:
            out["discrete_flow_shift"] = str(float(model_shift))
    return out
