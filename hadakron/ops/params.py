"""A module's parameter dict (the file's own names) -> algorithm, rank, scale and factor objects.

Scale rules are the ones ComfyUI applies (see docs/CONTRACTS.md): LoHa `alpha / hada_w1_b.shape[0]`; LoKr
`alpha / rank` of the decomposed factor, w2 first (Tucker rank = `lokr_t2.shape[0]`), 1.0 when both factors are
full; LoRA `alpha / lora_down.shape[0]`; no alpha -> 1.0. An alpha of 0 gives scale 0, as in ComfyUI.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .factors import Factor, Full, LowRank, Tucker

PARAM_NAMES: dict[str, frozenset[str]] = {
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
}
COMMON_NAMES: frozenset[str] = frozenset({"alpha", "dora_scale"})

Params = Mapping[str, torch.Tensor]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def algorithm_of(params: Params) -> str | None:
    """"loha" | "lokr" | "lora" from the tensor names present, None when none of them is there."""
    keys = set(params)
    if keys & PARAM_NAMES["loha"]:
        return "loha"
    if keys & PARAM_NAMES["lokr"]:
        return "lokr"
    if keys & PARAM_NAMES["lora"]:
        return "lora"
    return None


def _get(params: Params, name: str, dims: tuple[int, ...], algorithm: str) -> torch.Tensor:
    """The tensor `name`, checked to have one of `dims` dimensions; ValueError naming it otherwise."""
    if name not in params:
        present = ", ".join(sorted(k for k in params if k not in COMMON_NAMES)) or "none"
        raise ValueError(f"{algorithm} module is missing '{name}' (tensors present: {present})")
    t = params[name]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"'{name}' must be a tensor, found {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"'{name}' must be {want}, found shape {_shape(t)}")
    return t


def _match(name: str, t: torch.Tensor, axis: int, size: int, other: str, other_t: torch.Tensor) -> None:
    if int(t.shape[axis]) != size:
        raise ValueError(
            f"'{name}' has shape {_shape(t)} but '{other}' {_shape(other_t)} needs size {size} on its axis {axis}"
        )


def _low_rank(params: Params, a_name: str, b_name: str, algorithm: str) -> LowRank:
    a = _get(params, a_name, (2,), algorithm)
    b = _get(params, b_name, (2, 3, 4, 5), algorithm)
    _match(b_name, b, 0, int(a.shape[1]), a_name, a)
    return LowRank(a, b)


def _tucker(params: Params, t_name: str, a_name: str, b_name: str, algorithm: str) -> Tucker:
    t = _get(params, t_name, (3, 4, 5), algorithm)
    a = _get(params, a_name, (2,), algorithm)
    b = _get(params, b_name, (2,), algorithm)
    _match(a_name, a, 0, int(t.shape[0]), t_name, t)
    _match(b_name, b, 0, int(t.shape[1]), t_name, t)
    return Tucker(t, a, b)


def loha_factors(params: Params) -> tuple[Factor, Factor]:
    """The two Hadamard factors: LowRank(hada_w*_a, hada_w*_b), or Tucker(hada_t*, hada_w*_a, hada_w*_b)."""
    if "hada_t1" in params or "hada_t2" in params:
        f1 = _tucker(params, "hada_t1", "hada_w1_a", "hada_w1_b", "LoHa")
        f2 = _tucker(params, "hada_t2", "hada_w2_a", "hada_w2_b", "LoHa")
    else:
        f1 = _low_rank(params, "hada_w1_a", "hada_w1_b", "LoHa")
        f2 = _low_rank(params, "hada_w2_a", "hada_w2_b", "LoHa")
    if f1.shape != f2.shape:
        raise ValueError(
            f"LoHa factors differ in shape: hada_w1_* multiplies out to {f1.shape}, hada_w2_* to {f2.shape}"
        )
    return f1, f2


def lokr_factors(params: Params) -> tuple[Factor, Factor]:
    """(W1, W2) of the Kronecker product: each Full, LowRank, or (W2 only) Tucker."""
    if "lokr_w1" in params:
        w1: Factor = Full(_get(params, "lokr_w1", (2, 4), "LoKr"))
    elif "lokr_w1_a" in params or "lokr_w1_b" in params:
        w1 = _low_rank(params, "lokr_w1_a", "lokr_w1_b", "LoKr")
    else:
        raise ValueError("LoKr module needs 'lokr_w1' or 'lokr_w1_a' + 'lokr_w1_b'; found neither")
    if w1.kernel and any(k != 1 for k in w1.kernel):
        raise ValueError(f"'lokr_w1' must be 2-D (or (m, n, 1, 1)), found shape {w1.shape}")
    if "lokr_w2" in params:
        w2: Factor = Full(_get(params, "lokr_w2", (2, 3, 4, 5), "LoKr"))
    elif "lokr_t2" in params:
        w2 = _tucker(params, "lokr_t2", "lokr_w2_a", "lokr_w2_b", "LoKr")
    elif "lokr_w2_a" in params or "lokr_w2_b" in params:
        w2 = _low_rank(params, "lokr_w2_a", "lokr_w2_b", "LoKr")
    else:
        raise ValueError("LoKr module needs 'lokr_w2', 'lokr_w2_a' + 'lokr_w2_b', or those with 'lokr_t2'; found none")
    return w1, w2


def lora_factor(params: Params) -> Factor:
    """LoRA as one factor: LowRank(up, down), or Tucker(lora_mid, up^T, down) when a mid is present."""
    up = _get(params, "lora_up.weight", (2, 3, 4, 5), "LoRA")
    down = _get(params, "lora_down.weight", (2, 3, 4, 5), "LoRA")
    if any(int(s) != 1 for s in up.shape[2:]):
        raise ValueError(f"'lora_up.weight' must be (out, r) or (out, r, 1, 1), found shape {_shape(up)}")
    up2 = up.reshape(up.shape[0], up.shape[1])
    if "lora_mid.weight" in params:
        mid = _get(params, "lora_mid.weight", (3, 4, 5), "LoRA")
        if any(int(s) != 1 for s in down.shape[2:]):
            raise ValueError(f"'lora_down.weight' must be (r, in, 1, 1) with a lora_mid, found shape {_shape(down)}")
        down2 = down.reshape(down.shape[0], down.shape[1])
        _match("lora_up.weight", up2, 1, int(mid.shape[0]), "lora_mid.weight", mid)
        _match("lora_down.weight", down2, 0, int(mid.shape[1]), "lora_mid.weight", mid)
        return Tucker(mid, up2.t(), down2)
    _match("lora_down.weight", down, 0, int(up2.shape[1]), "lora_up.weight", up)
    return LowRank(up2, down)


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
    alg = algorithm_of(params)
    if alg == "loha":
        return int(_get(params, "hada_w1_b", (2, 3, 4, 5), "LoHa").shape[0])
    if alg == "lokr":
        if "lokr_t2" in params:
            return int(params["lokr_t2"].shape[0])
        if "lokr_w2" not in params and "lokr_w2_b" in params:
            return int(params["lokr_w2_b"].shape[0])
        if "lokr_w1" not in params and "lokr_w1_b" in params:
            return int(params["lokr_w1_b"].shape[0])
        return None
    if alg == "lora":
        return int(_get(params, "lora_down.weight", (2, 3, 4, 5), "LoRA").shape[0])
    return None


def alpha_of(params: Params) -> float | None:
    """The module's alpha as a float, None when absent."""
    a = params.get("alpha")
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        if a.numel() != 1:
            raise ValueError(f"'alpha' must hold one value, found shape {_shape(a)}")
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
    alg = algorithm_of(params)
    if alg is None:
        return frozenset()
    names = {n for n in params if n in PARAM_NAMES[alg] or n == "dora_scale"}
    if "alpha" in params and module_rank(params) is not None:
        names.add("alpha")
    return frozenset(names)
