"""Delta-W rebuilds near the memory-write floor.

`lokr_delta` writes kron(W1, W2) * s with one broadcast multiply straight into the output (the scale folded into
the smaller factor, no torch.kron temporaries). `loha_delta` builds (U1 V1) * (U2 V2) * s row-chunk by row-chunk
into the output, so the second product only ever exists as a cache-sized chunk.
"""

from __future__ import annotations

import torch

from .factors import Factor, LowRank, Tucker, as_factor

# Elements of the per-chunk temporary in the LoHa rebuild (and its backward): 16 MiB in float32, a small
# fraction of a large layer, yet few enough chunks that per-call overhead stays low (1 << 18 was 2-10x slower
# on a loaded CPU at 1280x10240).
HADA_CHUNK_ELEMENTS = 1 << 22


def low_rank_pair(f: Factor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (rows, r), V (r, cols*K)) with U @ V the factor's 2-D matrix; Tucker folds its core into V."""
    f = as_factor(f)
    if isinstance(f, Tucker):
        f = f.as_low_rank()
    if isinstance(f, LowRank):
        return f.a, f.b2d()
    return f.lora_pair()


def fold_scale(tensors: list[torch.Tensor], scale: float | torch.Tensor) -> list[torch.Tensor]:
    """Multiply the smallest tensor of the list by `scale` (returns a new list)."""
    if isinstance(scale, (int, float)) and scale == 1.0:
        return list(tensors)
    sizes = [t.numel() for t in tensors]
    i = sizes.index(min(sizes))
    out = list(tensors)
    out[i] = out[i] * scale
    return out


def hada_product(
    u1: torch.Tensor, v1: torch.Tensor, u2: torch.Tensor, v2: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(u1 @ v1) * (u2 @ v2) written into `out` (rows, cols) chunk by chunk; no full-size temporary."""
    rows, cols = int(u1.shape[0]), int(v1.shape[1])
    if out is None:
        out = torch.empty(rows, cols, dtype=u1.dtype, device=u1.device)
    step = max(1, HADA_CHUNK_ELEMENTS // max(1, cols))
    if step >= rows:
        torch.mm(u1, v1, out=out)
        return out.mul_(u2 @ v2)
    tmp = torch.empty(step, cols, dtype=u1.dtype, device=u1.device)
    for s in range(0, rows, step):
        e = min(rows, s + step)
        o = out[s:e]
        t = tmp[: e - s]
        torch.mm(u1[s:e], v1, out=o)
        torch.mm(u2[s:e], v2, out=t)
        o.mul_(t)
    return out


def loha_delta(w1: Factor, w2: Factor, scale: float = 1.0) -> torch.Tensor:
    """(W1 * W2) * scale in the factors' natural shape ((out, cols) or (out, in, kh, kw) for Tucker)."""
    f1, f2 = as_factor(w1), as_factor(w2)
    if (f1.rows, f1.cols) != (f2.rows, f2.cols):
        raise ValueError(f"LoHa factors differ in shape: {f1.shape} vs {f2.shape}")
    u1, v1 = low_rank_pair(f1)
    u2, v2 = low_rank_pair(f2)
    u1, v1, u2, v2 = fold_scale([u1, v1, u2, v2], scale)
    return hada_product(u1, v1, u2, v2).view(f1.shape)


def kron_into(w1: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """kron(w1 (a, c), w2 (b, d, *k)) -> (a*b, c*d, *k), written by one broadcast multiply into `out`."""
    a, c = int(w1.shape[0]), int(w1.shape[1])
    b, d = int(w2.shape[0]), int(w2.shape[1])
    k = tuple(int(s) for s in w2.shape[2:])
    ones = (1,) * len(k)
    if out is None:
        out = torch.empty((a * b, c * d) + k, dtype=torch.promote_types(w1.dtype, w2.dtype), device=w2.device)
    torch.mul(w1.reshape((a, 1, c, 1) + ones), w2.reshape((1, b, 1, d) + k), out=out.view((a, b, c, d) + k))
    return out


def lokr_delta(w1: Factor, w2: Factor, scale: float = 1.0) -> torch.Tensor:
    """kron(W1, W2) * scale: (a*b, c*d, *k) with W1 (a, c) and W2 (b, d, *k) (or flat (b, d*K))."""
    f1, f2 = as_factor(w1), as_factor(w2)
    m1 = f1.matrix()
    m2 = f2.materialize()
    if m1.numel() <= m2.numel():
        m1 = m1 * scale if scale != 1.0 else m1
    else:
        m2 = m2 * scale if scale != 1.0 else m2
    return kron_into(m1, m2)


__all__ = ["loha_delta", "lokr_delta", "kron_into", "hada_product", "low_rank_pair", "fold_scale"]
