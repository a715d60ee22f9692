"""||dW||_F of LoHa/LoKr modules from their factors, per module and per block, without building dW.

Pure numpy (no torch, no other hadakron import), so `hadakron inspect` can use it without torch and the loader
can feed it small factor tensors converted with `.float().numpy()`. A module's parameter dict uses the file's own
names (docs/CONTRACTS.md): `hada_w1_a (out, r1)`, `hada_w1_b (r1, in*K)`, Tucker `hada_t* (r, r, kh, kw)` with
`hada_w*_a (r, out)`, `hada_w*_b (r, in)`; LoKr `lokr_w1 (a, c)` or `lokr_w1_a/_b`, `lokr_w2 (b, d, *k)` or
`lokr_w2_a/_b`, `lokr_t2` (Tucker).

Math runs in float64, or in float32 when the factors are float32 (the loader's, from `.float().numpy()`: rounding
then about 1e-6 relative, against ~2x the speed); "exact" below means the formula, not the rounding.

Which value is exact:
- a low-rank factor U V: ||U V||_F^2 = trace((U^T U)(V V^T)) with r x r Gram matrices (exact); Tucker cores are
  folded into V first (exact); full factors directly (exact);
- LoKr: ||kron(W1, W2)||_F = ||W1||_F * ||W2||_F (exact);
- LoHa: (U1 V1) o (U2 V2) = P Q with the face-splitting products P (out, r1*r2) and Q (r1*r2, in*K), so its norm
  is exact from two (r1*r2)^2 Gram matrices when that is cheap (`exact_flops`); otherwise the upper bound
  ||U1 V1||_F * ||U2 V2||_F (Cauchy-Schwarz on the squared entries; not tight, often several times too big).
A block's value is sqrt(sum of its modules' squared norms): the norm of all its deltas together; exact only when
every module's is, else an upper bound. `dora_scale` is ignored (it rescales W + s dW, not dW).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

# Multiply-adds allowed for the exact LoHa Gram form, about (out + in*K) * (r1*r2)^2: rank 8 on 1280 x 5120 is
# 27M (exact); rank 16 there is 420M, about the cost of building dW, so the bound is given instead.
EXACT_FLOPS = 1 << 26

Params = Mapping[str, "np.ndarray | float"]


@dataclass(frozen=True)
class DeltaNorm:
    """||dW||_F of one module before scale and strength; `exact` False: `value` is an upper bound."""

    value: float
    exact: bool
    method: str  # "full" | "gram" | "kron" | "hadamard-gram" | "hadamard-bound"


@dataclass(frozen=True)
class BlockNorm:
    """One heatmap cell: the block's ||s * strength * dW||_F over its `modules` (0 modules: the adapter has none)."""

    part: str
    block: str
    norm: float
    modules: int
    exact: bool

    def to_dict(self) -> dict:
        return {"part": self.part, "block": self.block, "norm": self.norm, "modules": self.modules,
                "exact": self.exact}


def _f64(x) -> np.ndarray:
    """float32 arrays stay float32 (the loader's factors: the Gram products run twice as fast, and a picture needs
    no more); everything else becomes float64."""
    a = np.asarray(x)
    return a if a.dtype == np.float32 else a.astype(np.float64)


def _low_rank_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U (rows, r), V (r, cols*K)) of a LowRank(a, b) factor."""
    a, b = _f64(a), _f64(b)
    return a, b.reshape(b.shape[0], -1)


def _tucker_pair(core: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U (rows, r1), V (r1, cols*K)) of Tucker(core (r1, r2, *k), a (r1, rows), b (r2, cols)): the core folded
    into b, columns in the weight's (in, kh, kw) order, as hadakron.ops.factors.Tucker.as_low_rank."""
    core, a, b = _f64(core), _f64(a), _f64(b)
    r1, r2 = core.shape[:2]
    k = int(np.prod(core.shape[2:], dtype=np.int64)) if core.ndim > 2 else 1
    folded = np.einsum("pqk,qi->pik", core.reshape(r1, r2, k), b)  # (r1, cols, K)
    return a.T, folded.reshape(r1, -1)


def _gram_norm(u: np.ndarray, v: np.ndarray) -> float:
    """||U V||_F from trace((U^T U)(V V^T)), never forming U V."""
    sq = float(np.sum((u.T @ u) * (v @ v.T), dtype=np.float64))
    return math.sqrt(max(sq, 0.0))


def factor_pair(params: Params, which: str, algorithm: str) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """Factor `which` ("1" or "2") of a module: a (U, V) pair for low-rank/Tucker, the array for a full factor."""
    if algorithm == "loha":
        if f"hada_t{which}" in params:
            return _tucker_pair(params[f"hada_t{which}"], params[f"hada_w{which}_a"], params[f"hada_w{which}_b"])
        return _low_rank_pair(params[f"hada_w{which}_a"], params[f"hada_w{which}_b"])
    if f"lokr_w{which}" in params:
        return _f64(params[f"lokr_w{which}"])
    if which == "2" and "lokr_t2" in params:
        return _tucker_pair(params["lokr_t2"], params["lokr_w2_a"], params["lokr_w2_b"])
    return _low_rank_pair(params[f"lokr_w{which}_a"], params[f"lokr_w{which}_b"])


def _factor_norm(f) -> float:
    if isinstance(f, tuple):
        return _gram_norm(*f)
    return float(np.linalg.norm(f.reshape(-1)))


def algorithm(params: Params) -> str | None:
    """"loha" | "lokr" from the tensor names, None otherwise (LoRA and others have no norm here)."""
    if any(k.startswith("hada_") for k in params):
        return "loha"
    if any(k.startswith("lokr_") for k in params):
        return "lokr"
    return None


def delta_norm(params: Params, *, exact_flops: int = EXACT_FLOPS) -> DeltaNorm:
    """||dW||_F of a LoHa/LoKr module without its scale (alpha/rank); see the module docstring for the methods.

    Raises ValueError for a module that is neither LoHa nor LoKr, KeyError when a factor tensor is missing.
    """
    alg = algorithm(params)
    if alg is None:
        raise ValueError(f"not a LoHa or LoKr module (tensors: {', '.join(sorted(params)) or 'none'})")
    f1, f2 = factor_pair(params, "1", alg), factor_pair(params, "2", alg)
    if alg == "lokr":
        kinds = "full" if not isinstance(f1, tuple) and not isinstance(f2, tuple) else "gram"
        return DeltaNorm(_factor_norm(f1) * _factor_norm(f2), True, f"kron-{kinds}")
    (u1, v1), (u2, v2) = f1, f2
    r1, r2 = u1.shape[1], u2.shape[1]
    cost = (u1.shape[0] + v1.shape[1]) * (r1 * r2) ** 2
    if cost <= exact_flops:
        p = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], r1 * r2)  # P[i, (a, b)] = U1[i, a] U2[i, b]
        q = (v1[:, None, :] * v2[None, :, :]).reshape(r1 * r2, v1.shape[1])  # Q[(a, b), j] = V1[a, j] V2[b, j]
        return DeltaNorm(_gram_norm(p, q), True, "hadamard-gram")
    return DeltaNorm(_gram_norm(u1, v1) * _gram_norm(u2, v2), False, "hadamard-bound")


def module_scale(params: Params) -> float:
    """alpha / rank as ComfyUI applies it (hadakron.ops.module_scale, here without torch; a test ties the two):
    LoHa `alpha / hada_w1_b.shape[0]`; LoKr `alpha / rank` of the decomposed factor, w2 first (Tucker: lokr_t2's
    rank), 1.0 when both are full; no alpha: 1.0."""
    if "alpha" not in params:
        return 1.0
    alpha = float(_f64(params["alpha"]).reshape(-1)[0])
    alg = algorithm(params)
    if alg == "loha":
        rank = np.shape(params["hada_w1_b"])[0]
    elif "lokr_t2" in params:
        rank = np.shape(params["lokr_t2"])[0]
    elif "lokr_w2" not in params and "lokr_w2_b" in params:
        rank = np.shape(params["lokr_w2_b"])[0]
    elif "lokr_w1" not in params and "lokr_w1_b" in params:
        rank = np.shape(params["lokr_w1_b"])[0]
    else:
        return 1.0
    return alpha / int(rank)


def block_norms(modules: Iterable[tuple[str, str, DeltaNorm, float]],
                blocks: Sequence[tuple[str, str]]) -> list[BlockNorm]:
    """Heatmap cells in the order of `blocks` ((part, block) of every block of the family, touched or not).

    `modules`: (part, block, unscaled norm, factor) per applied module; factor = module scale * strength (its
    absolute value is used). Blocks a module names that are not in `blocks` are appended in order of appearance.
    """
    acc: dict[tuple[str, str], list] = {key: [0.0, 0, True] for key in blocks}
    for part, block, norm, factor in modules:
        cell = acc.setdefault((part, block), [0.0, 0, True])
        cell[0] += (abs(factor) * norm.value) ** 2
        cell[1] += 1
        cell[2] = cell[2] and norm.exact
    return [BlockNorm(part, block, math.sqrt(sq), n, exact) for (part, block), (sq, n, exact) in acc.items()]


def heatmap_payload(cells: Sequence[BlockNorm]) -> dict:
    """The load report's `delta_norms` field: cells, whether every value is exact, and what the values are."""
    exact = all(c.exact for c in cells if c.modules)
    note = ("||s*strength*dW||_F per block, exact from the factors" if exact else
            "||s*strength*dW||_F per block; cells marked bound are upper bounds (LoHa of high rank: "
            "||W1a W1b||*||W2a W2b||), the others exact")
    return {"cells": [c.to_dict() for c in cells], "exact": exact, "note": note,
            "max": max((c.norm for c in cells), default=0.0)}


def text_bars(cells: Sequence[BlockNorm], *, width: int = 30, skip_empty: bool = False) -> list[str]:
    """The heatmap as text: one line per block, a bar scaled to the largest norm, the value, `(bound)` where it is
    not exact. Blocks without modules show an empty bar (or are left out with skip_empty)."""
    top = max((c.norm for c in cells), default=0.0)
    label_w = max((len(f"{c.part} {c.block}") for c in cells), default=0)
    lines = []
    for c in cells:
        if skip_empty and not c.modules:
            continue
        n = 0 if top <= 0 else round(width * c.norm / top)
        if c.norm > 0 and n == 0:
            n = 1  # a block that acts at all shows at least one mark
        bar = "#" * n + "." * (width - n)
        value = f"{c.norm:.4g}" if c.modules else "-"
        tail = f"  {c.modules} module{'s' if c.modules != 1 else ''}" if c.modules else ""
        mark = " (bound)" if c.modules and not c.exact else ""
        lines.append(f"{f'{c.part} {c.block}':<{label_w}}  {bar}  {value}{mark}{tail}")
    return lines


__all__ = ["DeltaNorm", "BlockNorm", "EXACT_FLOPS", "delta_norm", "module_scale", "block_norms", "heatmap_payload",
           "text_bars", "algorithm", "factor_pair"]
