"""Pure low-rank algebra for combining adapters: stack LoRA pairs, cap at full rank, truncate by SVD.

A pair (up (out, R), down (R, n)) stands for the matrix up @ down. Stacking pairs along R sums their
products exactly; the truncated SVD keeps the best rank-k approximation and says how much it lost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class LowRankResult:
    """A pair and what it cost: input rank, output rank, and the relative Frobenius error (0 when exact).

    `norm_sq` and `lost_sq` (||D||_F^2 and ||D - D_k||_F^2) let callers pool errors over many modules.
    """

    up: torch.Tensor
    down: torch.Tensor
    rank_in: int
    norm_sq: float
    lost_sq: float

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.lost_sq / self.norm_sq) if self.norm_sq > 0 else 0.0


def stack_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ranks) pair whose product is sum_i s_i * up_i @ down_i; the strength goes into the up side."""
    if not pairs:
        raise ValueError("stack_pairs: no pairs given")
    ups = [up * s for up, _, s in pairs]
    downs = [down for _, down, _ in pairs]
    for i, (u, d) in enumerate(zip(ups, downs)):
        if u.shape[0] != ups[0].shape[0] or d.shape[1] != downs[0].shape[1]:
            raise ValueError(f"stack_pairs: pair {i} is {list(u.shape)} @ {list(d.shape)}, expected "
                             f"({ups[0].shape[0]}, r) @ (r, {downs[0].shape[1]}) like pair 0")
        if u.shape[1] != d.shape[0]:
            raise ValueError(f"stack_pairs: pair {i} does not multiply: up {list(u.shape)} down {list(d.shape)}")
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U, S, Vh) of up @ down through two thin QRs, never forming the (out, n) product when R is small."""
    qu, ru = torch.linalg.qr(up)            # (out, k1), (k1, R)
    qd, rd = torch.linalg.qr(down.T)        # (n, k2), (k2, R)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ u, s, vh @ qd.T


def reduce_pair(up: torch.Tensor, down: torch.Tensor, rank: int | None = None) -> LowRankResult:
    """The pair (up, down) at most `rank` wide (None: exact), computed in float64, returned in float32.

    Without `rank` the pair stays exact, but is re-expressed at full rank min(out, n) when wider than that.
    With `rank` the truncated SVD gives the best rank-k product; the split is balanced (sqrt of S each side).
    """
    up64, down64 = up.to(torch.float64), down.to(torch.float64)
    r_in = int(up.shape[1])
    full = min(int(up.shape[0]), int(down.shape[1]))
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, found {rank}")
    if rank is None or r_in <= rank:
        if r_in <= full:
            norm_sq = float(((up64.T @ up64) * (down64 @ down64.T)).sum()) if r_in else 0.0  # ||up@down||_F^2
            return LowRankResult(up.to(torch.float32), down.to(torch.float32), r_in, norm_sq, 0.0)
        prod = up64 @ down64
        norm_sq = float(torch.linalg.matrix_norm(prod).square())
        if prod.shape[0] <= prod.shape[1]:
            new_up, new_down = torch.eye(prod.shape[0], dtype=torch.float64), prod
        else:
            new_up, new_down = prod, torch.eye(prod.shape[1], dtype=torch.float64)
        return LowRankResult(new_up.float(), new_down.float(), r_in, norm_sq, 0.0)
    u, s, vh = _svd_of_product(up64, down64)
    k = min(rank, int(s.shape[0]))
    root = s[:k].sqrt()
    norm_sq = float(s.square().sum())
    lost_sq = float(s[k:].square().sum())
    return LowRankResult((u[:, :k] * root).float(), (root[:, None] * vh[:k]).float(), r_in, norm_sq, lost_sq)
