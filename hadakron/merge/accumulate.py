"""Add s * delta-W of a module into a float32 weight in place, by row blocks, without a full-size temporary.

The factor objects and scale come from hadakron.ops (`module_factors`, `module_scale`, `low_rank_pair`); only
the final accumulation is fused here, because baking a whole checkpoint is bound by memory traffic. A module
is prepared once (its small pieces materialised), then added to any row range of the weight:
LoRA `W[r] += s * U[r] @ V` (`addmm_`); LoKr `W[i*b + j] += s * W1[i] (x) W2[j]` (broadcast `addcmul_`, never
building kron(W1, W2)); LoHa `W[r] += s * (U1[r] V1) * (U2[r] V2)` with row-block temporaries.
DoRA and non-contiguous targets fall back to `ops.patched_weight` / `ops.delta_weight`.
"""
from __future__ import annotations

from typing import Mapping

import torch

from hadakron.ops import delta_weight, module_factors, module_scale, patched_weight
from hadakron.ops.rebuild import low_rank_pair

Params = Mapping[str, torch.Tensor]


class RowAccumulator:
    """A module ready to add `s * delta-W` rows into a float (rows, cols) target; `scale` is alpha/rank."""

    def __init__(self, algorithm: str, pieces: tuple[torch.Tensor, ...], rows: int, cols: int, scale: float) -> None:
        self.algorithm, self.pieces, self.rows, self.cols, self.scale = algorithm, pieces, rows, cols, scale
        self._tmp: tuple[torch.Tensor, torch.Tensor] | None = None

    def add_rows_(self, target: torch.Tensor, r0: int, r1: int, strength: float) -> None:
        """target (r1 - r0, cols) += strength * scale * delta-W[r0:r1]."""
        s = float(strength) * self.scale
        if s == 0.0 or r1 <= r0:
            return
        if self.algorithm == "lora":
            u, v = self.pieces
            target.addmm_(u[r0:r1], v, alpha=s)
        elif self.algorithm == "lokr":
            m1, m2 = self.pieces
            b, c, d = int(m2.shape[0]), int(m1.shape[1]), int(m2.shape[1])
            for i in range(r0 // b, (r1 - 1) // b + 1):
                j0, j1 = max(r0 - i * b, 0), min(r1 - i * b, b)
                t0 = i * b + j0 - r0
                block = target[t0:t0 + (j1 - j0)].view(j1 - j0, c, d)
                block.addcmul_(m1[i].view(1, c, 1), m2[j0:j1].view(j1 - j0, 1, d), value=s)
        else:
            u1, v1, u2, v2 = self.pieces
            n = r1 - r0
            if self._tmp is None or self._tmp[0].shape[0] < n:
                self._tmp = (torch.empty(n, self.cols, dtype=target.dtype, device=target.device),
                             torch.empty(n, self.cols, dtype=target.dtype, device=target.device))
            p1, p2 = self._tmp[0][:n], self._tmp[1][:n]
            torch.mm(u1[r0:r1], v1, out=p1)
            torch.mm(u2[r0:r1], v2, out=p2)
            target.addcmul_(p1, p2, value=s)


def prepare(params: Params, rows: int, cols: int, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> RowAccumulator:
    """The module's pieces in `dtype`; ValueError when it does not multiply out to (rows, cols) (flattened)."""
    alg, factors = module_factors(params)
    factors = tuple(f.to(dtype=dtype, device=device) for f in factors)
    if alg == "lora":
        pieces = low_rank_pair(factors[0])
        natural = (pieces[0].shape[0], pieces[1].shape[1])
    elif alg == "lokr":
        w1, w2 = factors
        m1 = w1.matrix()
        m2 = w2.materialize().reshape(int(w2.rows), -1)
        pieces = (m1.contiguous(), m2.contiguous())
        natural = (m1.shape[0] * m2.shape[0], m1.shape[1] * m2.shape[1])
    else:
        u1, v1 = low_rank_pair(factors[0])
        u2, v2 = low_rank_pair(factors[1])
        pieces = (u1, v1, u2, v2)
        natural = (u1.shape[0], v1.shape[1])
    if (int(natural[0]), int(natural[1])) != (rows, cols):
        raise ValueError(f"{alg} delta-W multiplies out to {natural[0]}x{natural[1]} but the weight is "
                         f"{rows}x{cols} (flattened)")
    return RowAccumulator(alg, tuple(pieces), rows, cols, module_scale(params))


def add_delta_(target: torch.Tensor, params: Params, strength: float) -> torch.Tensor:
    """target += strength * delta_W(params), in place (target float32/float64 in the layer's weight shape)."""
    if "dora_scale" in params:
        target.copy_(patched_weight(target, params, strength, dtype=target.dtype))
    elif not target.is_contiguous():
        target.add_(delta_weight(params, tuple(target.shape), dtype=target.dtype, device=target.device), alpha=strength)
    else:
        rows = int(target.shape[0])
        cols = target.numel() // rows if rows else 0
        prepare(params, rows, cols, target.dtype, target.device).add_rows_(target.view(rows, cols), 0, rows, strength)
    return target
