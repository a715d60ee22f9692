"""Module checks on loaded tensors: the NaN/Inf scan (torch), and `hadakron.io.module_specs`' checks applied to
tensors through their (dtype, shape) specs, so the torch path and `hadakron inspect` share one rule.

Each check returns human-readable problem strings naming the key, the expected and the found value.
"""
from __future__ import annotations

from typing import Mapping

import torch

from hadakron.io import module_specs
from hadakron.io.module_specs import (  # noqa: F401  (re-exported: the one home of these is module_specs)
    COMMON_PARAMS, KNOWN_PARAMS, TensorSpec, algorithm_guess, group_modules, split_key,
)
from hadakron.io.safetensors_format import NAME_FROM_DTYPE
from hadakron.ops import applied_params


def spec_of(t: object) -> TensorSpec:
    """A tensor's (safetensors dtype name, shape, value when it holds one number) for the spec checks."""
    if not isinstance(t, torch.Tensor):
        return TensorSpec("F64", (), float(t)) if isinstance(t, (int, float)) else TensorSpec("?", ())
    value = None
    if t.numel() == 1 and t.dtype != torch.bool:
        value = float(t.detach().reshape(()).to(torch.float64).cpu())
    return TensorSpec(NAME_FROM_DTYPE.get(t.dtype, str(t.dtype)), tuple(int(d) for d in t.shape), value)


def specs_of(params: Mapping[str, object]) -> dict[str, TensorSpec]:
    """{param: TensorSpec} of one module's tensors."""
    return {p: spec_of(t) for p, t in params.items()}


def module_problems(module: str, params: Mapping[str, torch.Tensor]) -> list[str]:
    """`module_specs.module_problems` on loaded tensors."""
    return module_specs.module_problems(module, specs_of(params))


def refusal(params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...] | None = None) -> str | None:
    """`module_specs.refusal` on loaded tensors: why the module must not be applied, else None."""
    return module_specs.refusal(specs_of(params), weight_shape)


# (same-size integer dtype, exponent mask): a float is NaN/Inf exactly when all its exponent bits are set.
_EXPONENT_MASKS = {
    torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000),
}

# module key -> param -> (NaN count, Inf count), for the tensors that hold any.
NonfiniteTensors = dict[str, dict[str, tuple[int, int]]]


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, Inf count) of a floating tensor that holds any, else None.

    Reads only (no `_version`, nothing in place), so inference tensors from a ComfyUI prompt are fine; the first
    pass is an integer test of the exponent bits (torch.isfinite is slow on bf16 CPU).
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    spec = _EXPONENT_MASKS.get(t.dtype)
    if spec is not None:
        int_dtype, mask = spec
        if not bool(((t.contiguous().view(int_dtype) & mask) == mask).any()):
            return None
    values = t if spec is not None else t.float()
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    return (nan, inf) if nan or inf else None


def nonfinite_tensors(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> NonfiniteTensors:
    """Every tensor holding NaN/Inf, by module and parameter name: one pass over the file's values."""
    found: NonfiniteTensors = {}
    for module, params in modules.items():
        for param, t in params.items():
            counts = nonfinite_counts(t)
            if counts is not None:
                found.setdefault(module, {})[param] = counts
    return found


def nonfinite_applied(params: Mapping[str, torch.Tensor], bad: Mapping[str, object] | None) -> list[str]:
    """The names, among one module's NaN/Inf tensors `bad`, that `hadakron.ops` applies (an unused alpha is not one)."""
    return sorted(set(bad or ()) & applied_params(params))


def nonfinite_problems(modules: Mapping[str, Mapping[str, torch.Tensor]], found: NonfiniteTensors) -> list[str]:
    """`module_specs.nonfinite_problems` on loaded tensors."""
    return module_specs.nonfinite_problems({m: specs_of(modules[m]) for m in found}, found)
