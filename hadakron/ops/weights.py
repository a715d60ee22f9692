"""Module-level entry points: `delta_weight`, `patched_weight` (with DoRA) and `lora_form` from a parameter dict.

Math runs in float32, or float64 when the inputs or the requested dtype are float64; results are cast to `dtype`.

`lora_form` returns the exact (up, down) with the scale folded into the smaller side, R being:
- LoRA: its rank r (a `lora_mid` core is folded into down).
- LoHa: r1*r2 (up = row-wise Khatri-Rao of the a factors, down = face-splitting product of the b factors;
  a Tucker core is folded into its b first).
- LoKr: R1*R2 with up = kron(P1, P2), down = kron(Q1, Q2) where W1 = P1 Q1, W2 = P2 Q2 and Ri is the width of
  that split: r for a low-rank factor (r1 = t2.shape[0] for Tucker), min(rows, cols*K) for a full one (the identity
  goes on the smaller side). E.g. full W1 (a, c) with a <= c and low-rank W2 of rank r: up = kron(I_a, W2a),
  down = kron(W1, W2b), R = a*r.
- Any kind: when R >= min(out, in*K) the trivial form (identity on the smaller side of the materialised delta-W)
  is returned instead, so R <= min(out, in*K) always.
`dora_scale` is not part of delta-W or of the LoRA form; only `patched_weight` applies it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .factors import Factor, Full, LowRank, Tucker
from . import shape_rules
from .params import Params, module_factors, module_scale, shapes_of
from .rebuild import fold_scale, hada_product, kron_into, low_rank_pair


def compute_dtype(params: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.dtype:
    """float64 when asked or when any floating input is float64, else float32."""
    if dtype == torch.float64:
        return torch.float64
    for t in params.values():
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _first_device(params: Params) -> torch.device:
    for k, t in params.items():
        if isinstance(t, torch.Tensor) and k != "alpha":
            return t.device
    return torch.device("cpu")


def _prepared(params: Params, dtype: torch.dtype | None, device) -> tuple[str, tuple[Factor, ...], float, torch.dtype, torch.device]:
    cd = compute_dtype(params, dtype)
    dev = torch.device(device) if device is not None else _first_device(params)
    alg, factors = module_factors(params)
    factors = tuple(f.to(dtype=cd, device=dev) for f in factors)
    return alg, factors, module_scale(params), cd, dev


def natural_shape(params: Params) -> tuple[int, ...]:
    """The weight shape a module's tensors multiply out to: (out, in) or (out, in, kh, kw) (flat convs: 2-D).

    From tensor shapes alone; ValueError naming the tensors when the factors do not multiply out."""
    return shape_rules.natural_shape(shapes_of(params))


def _natural_shape(alg: str, factors: tuple[Factor, ...]) -> tuple[int, ...]:
    if alg == "lokr":
        w1, w2 = factors
        return (w1.rows * w2.rows, w1.cols * w2.shape[1]) + tuple(w2.shape[2:])
    return tuple(factors[0].shape)


def _check_shape(alg: str, natural: tuple[int, ...], shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    n_nat = 1
    for s in natural:
        n_nat *= s
    n = 1
    for s in shape:
        n *= s
    if not shape or shape[0] != natural[0] or n != n_nat:
        raise ValueError(
            f"{alg} delta-W multiplies out to shape {natural} ({n_nat} values) "
            f"but the layer weight has shape {shape} ({n} values)"
        )
    return shape


def delta_weight(
    params: Params, shape: Sequence[int] | None = None, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Scaled delta-W (scale = module_scale) in `dtype` on `device`, reshaped to `shape` when given."""
    alg, factors, scale, cd, dev = _prepared(params, dtype, device)
    natural = _natural_shape(alg, factors)
    target = _check_shape(alg, natural, shape) if shape is not None else natural
    with torch.no_grad():
        if alg == "lokr":
            w1, w2 = factors
            m1, m2 = w1.matrix(), w2.materialize()
            m1, m2 = fold_scale([m1, m2], scale)
            dw = kron_into(m1, m2)
        elif alg == "loha":
            u1, v1 = low_rank_pair(factors[0])
            u2, v2 = low_rank_pair(factors[1])
            u1, v1, u2, v2 = fold_scale([u1, v1, u2, v2], scale)
            dw = hada_product(u1, v1, u2, v2)
        else:
            u, v = low_rank_pair(factors[0])
            u, v = fold_scale([u, v], scale)
            dw = u @ v
    dw = dw.reshape(target)  # outside no_grad: callers may modify the result in place with grad mode on
    return dw if dw.dtype == dtype else dw.to(dtype)


def dora_norm(weight: torch.Tensor, dora_scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(norm of `weight` broadcastable to it, row_wise): per output row when dora_scale has `out` entries along
    dim 0, else per input column (dora_scale (1, in, ...))."""
    out = int(weight.shape[0])
    ds = dora_scale
    row_wise = ds.dim() >= 1 and int(ds.shape[0]) == out and ds.numel() == out
    ones = (1,) * (weight.dim() - 1)
    if row_wise:
        return weight.reshape(out, -1).norm(dim=1).reshape((out,) + ones), True
    cols = int(weight.shape[1]) if weight.dim() > 1 else 1
    if ds.numel() != cols:
        raise ValueError(
            f"'dora_scale' has shape {tuple(ds.shape)}: expected {out} values (row-wise, (out, 1, ...)) "
            f"or {cols} values (column-wise, (1, in, ...)) for weight shape {tuple(weight.shape)}"
        )
    n = weight.transpose(0, 1).reshape(cols, -1).norm(dim=1)
    return n.reshape((1, cols) + ones[1:]), False


def patched_weight(
    weight: torch.Tensor, params: Params, strength: float = 1.0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W + strength * delta_W computed and returned in `dtype`; with `dora_scale`, DoRA on W + s*dW.

    DoRA: W_d = (W + s dW) * dora_scale / (||W + s dW|| + eps) (row- or column-wise by dora_scale's shape,
    eps = finfo(dtype).eps as LyCORIS/ComfyUI), then W + strength * (W_d - W) as ComfyUI applies strength.
    Not differentiable (a merge operation): it runs under no_grad whatever the grad mode.
    """
    with torch.no_grad():
        return _patched_weight(weight, params, strength, dtype)


def _patched_weight(weight: torch.Tensor, params: Params, strength: float, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    dw = delta_weight(params, tuple(weight.shape), dtype=dtype, device=weight.device)
    ds = params.get("dora_scale")
    if ds is None:
        return dw.mul_(strength).add_(w) if strength != 1.0 else dw.add_(w)
    ds = ds.to(dtype=dtype, device=weight.device)
    merged = dw.add_(w)  # W + s dW, in the delta's buffer
    norm, row_wise = dora_norm(merged, ds)
    norm.add_(torch.finfo(dtype).eps)
    factor = ds.reshape(norm.shape) / norm
    merged.mul_(factor)
    if strength == 1.0:
        return merged
    return merged.sub_(w).mul_(strength).add_(w)


def _split(f: Factor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact (P, Q) of the factor's 2-D matrix, as narrow as it can be without an SVD."""
    if isinstance(f, (LowRank, Tucker)):
        p, q = low_rank_pair(f)
        if p.shape[1] < min(p.shape[0], q.shape[1]):
            return p, q
        return Full(p @ q).lora_pair()
    return Full(f.matrix()).lora_pair()


def lora_form(
    params: Params, shape: Sequence[int] | None = None, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (up (out, R), down (R, in*kh*kw)), scale folded in: up @ down == delta_weight(params).reshape(out, -1)."""
    alg, factors, scale, cd, dev = _prepared(params, dtype, None)
    natural = _natural_shape(alg, factors)
    target = _check_shape(alg, natural, shape) if shape is not None else natural
    out = target[0]
    cols = 1
    for s in target[1:]:
        cols *= s
    with torch.no_grad():
        if alg == "lora":
            up, down = low_rank_pair(factors[0])
        elif alg == "loha":
            u1, v1 = low_rank_pair(factors[0])
            u2, v2 = low_rank_pair(factors[1])
            r1, r2 = int(u1.shape[1]), int(u2.shape[1])
            if r1 * r2 >= min(out, cols):
                up, down = Full(delta_weight(params, dtype=cd).reshape(out, cols)).lora_pair()
                scale = 1.0
            else:
                up = (u1[:, :, None] * u2[:, None, :]).reshape(out, r1 * r2)
                down = (v1[:, None, :] * v2[None, :, :]).reshape(r1 * r2, cols)
        else:
            w1, w2 = factors
            p1, q1 = _split(w1)
            p2, q2 = _split(w2)
            if p1.shape[1] * p2.shape[1] >= min(out, cols):
                up, down = Full(delta_weight(params, dtype=cd).reshape(out, cols)).lora_pair()
                scale = 1.0
            else:
                up, down = kron_into(p1, p2), kron_into(q1, q2)
        up, down = fold_scale([up.contiguous(), down.reshape(down.shape[0], -1).contiguous()], scale)
    if dtype is not None and up.dtype != dtype:
        up, down = up.to(dtype), down.to(dtype)
    return up, down
