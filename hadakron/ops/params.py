"""A module's parameter dict (the file's own names) -> algorithm, rank, scale and factor objects.

Scale rules are the ones ComfyUI applies (see docs/CONTRACTS.md): LoHa `alpha / hada_w1_b.shape[0]`; LoKr
`alpha / rank` of the decomposed factor, w2 first (Tucker rank = `lokr_t2.shape[0]`), 1.0 when both factors are
full; LoRA `alpha / lora_down.shape[0]`; no alpha -> 1.0. An alpha of 0 gives scale 0, as in ComfyUI.
"""

from __future__ import annotations

from typing import Mapping

import torch

from . import shape_rules
from .factors import Factor, Full, LowRank, Tucker
from .shape_rules import (  # noqa: F401  (PARAM_NAMES, COMMON_NAMES: re-exported, their home is shape_rules)
    COMMON_NAMES, PARAM_NAMES, NotATensor, algorithm_of, loha_shapes, lokr_shapes, lora_shapes,
)

Params = Mapping[str, torch.Tensor]


def shapes_of(params: Mapping[str, object]) -> dict[str, object]:
    """{param: shape tuple} of a parameter dict, for `shape_rules` (a value that is not a tensor is named by type)."""
    return {k: tuple(int(s) for s in t.shape) if isinstance(t, torch.Tensor) else NotATensor(type(t).__name__)
            for k, t in params.items()}


def _lora_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1])


def loha_factors(params: Params) -> tuple[Factor, Factor]:
    """The two Hadamard factors: LowRank(hada_w*_a, hada_w*_b), or Tucker(hada_t*, hada_w*_a, hada_w*_b)."""
    loha_shapes(shapes_of(params))
    if "hada_t1" in params or "hada_t2" in params:
        return (Tucker(params["hada_t1"], params["hada_w1_a"], params["hada_w1_b"]),
                Tucker(params["hada_t2"], params["hada_w2_a"], params["hada_w2_b"]))
    return (LowRank(params["hada_w1_a"], params["hada_w1_b"]), LowRank(params["hada_w2_a"], params["hada_w2_b"]))


def lokr_factors(params: Params) -> tuple[Factor, Factor]:
    """(W1, W2) of the Kronecker product: each Full, LowRank, or (W2 only) Tucker."""
    lokr_shapes(shapes_of(params))
    w1: Factor = Full(params["lokr_w1"]) if "lokr_w1" in params else LowRank(params["lokr_w1_a"], params["lokr_w1_b"])
    if "lokr_w2" in params:
        w2: Factor = Full(params["lokr_w2"])
    elif "lokr_t2" in params:
        w2 = Tucker(params["lokr_t2"], params["lokr_w2_a"], params["lokr_w2_b"])
    else:
        w2 = LowRank(params["lokr_w2_a"], params["lokr_w2_b"])
    return w1, w2


def lora_factor(params: Params) -> Factor:
    """LoRA as one factor: LowRank(up, down), or Tucker(lora_mid, up^T, down) when a mid is present."""
    lora_shapes(shapes_of(params))
    up2 = _lora_2d(params["lora_up.weight"])
    if "lora_mid.weight" in params:
        return Tucker(params["lora_mid.weight"], up2.t(), _lora_2d(params["lora_down.weight"]))
    return LowRank(up2, params["lora_down.weight"])


def module_factors(params: Params) -> tuple[str, tuple[Factor, ...]]:
    """(algorithm, factors): two for LoHa/LoKr, one for LoRA. ValueError for an unknown module."""
    alg = algorithm_of(params)
    if alg == "loha":
        return alg, loha_factors(params)
    if alg == "lokr":
        return alg, lokr_factors(params)
    if alg == "lora":
        return alg, (lora_factor(params),)
    names = ", ".join(sorted(params)) or "none"
    raise ValueError(f"not a LoHa, LoKr or LoRA module: no known tensor names among ({names})")


def module_rank(params: Params) -> int | None:
    """The rank alpha is divided by; None for a LoKr whose factors are both full (or an unknown module)."""
    return shape_rules.module_rank(shapes_of(params))


def alpha_of(params: Params) -> float | None:
    """The module's alpha as a float, None when absent."""
    a = params.get("alpha")
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        if a.numel() != 1:
            raise ValueError(f"'alpha' must hold one value, found shape {tuple(a.shape)}")
        return float(a.detach().reshape(()).to(torch.float64).cpu())
    return float(a)


def module_scale(params: Params) -> float:
    """alpha / rank as ComfyUI applies it; 1.0 without alpha or when LoKr has no decomposed factor."""
    alpha = alpha_of(params)
    rank = module_rank(params)
    if alpha is None or rank is None:
        return 1.0
    return alpha / rank


def applied_params(params: Params) -> frozenset[str]:
    """Names of the tensors `delta_weight`/`patched_weight` read for this module: its factors, `dora_scale`, and
    `alpha` only where it sets the scale (a LoKr with both factors full ignores it; sd-scripts may store inf there)."""
    return shape_rules.applied_names(shapes_of(params))
