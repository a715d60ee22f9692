"""`HadaWeight`: the LoHa delta-W as a custom autograd Function that saves only the factors.

Backward recomputes the two rank-r products chunk by chunk instead of keeping them, so training through a
rebuilt LoHa delta-W costs no full-size saved tensors. Tucker LoHa folds each core into its `b` factor first
(`hada_weight_tucker`): the fold is small and ordinary autograd handles it.
"""

from __future__ import annotations

import torch

from .factors import Tucker
from . import rebuild
from .rebuild import hada_product


class HadaWeight(torch.autograd.Function):
    """((w1a @ w1b) * (w2a @ w2b)) * scale with w*a (out, r*), w*b (r*, cols); scale a float (no gradient)."""

    @staticmethod
    def forward(ctx, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float = 1.0):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = float(scale)
        u1 = w1a * ctx.scale if ctx.scale != 1.0 else w1a
        return hada_product(u1, w1b, w2a, w2b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        s = ctx.scale
        need = ctx.needs_input_grad
        rows, cols = int(w1a.shape[0]), int(w1b.shape[1])
        g1a = w1a.new_empty(w1a.shape) if need[0] else None
        g2a = w2a.new_empty(w2a.shape) if need[2] else None
        g1b = torch.zeros_like(w1b) if need[1] else None
        g2b = torch.zeros_like(w2b) if need[3] else None
        step = max(1, min(rows, rebuild.HADA_CHUNK_ELEMENTS // max(1, cols)))
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            g = grad[lo:hi] * s if s != 1.0 else grad[lo:hi]
            if need[0] or need[1]:
                t = w2a[lo:hi] @ w2b  # rebuild of the other product for this chunk
                t.mul_(g)
                if need[0]:
                    torch.mm(t, w1b.t(), out=g1a[lo:hi])
                if need[1]:
                    g1b.addmm_(w1a[lo:hi].t(), t)
            if need[2] or need[3]:
                t = w1a[lo:hi] @ w1b
                t.mul_(g)
                if need[2]:
                    torch.mm(t, w2b.t(), out=g2a[lo:hi])
                if need[3]:
                    g2b.addmm_(w2a[lo:hi].t(), t)
        return g1a, g1b, g2a, g2b, None


def hada_weight(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Differentiable (w1a@w1b)*(w2a@w2b)*scale (2-D; b may be (r, in, kh, kw), flattened here)."""
    return HadaWeight.apply(w1a, w1b.reshape(w1b.shape[0], -1), w2a, w2b.reshape(w2b.shape[0], -1), float(scale))


def hada_weight_tucker(
    t1: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor,
    t2: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float = 1.0,
) -> torch.Tensor:
    """Differentiable Tucker LoHa delta (out, in, *k): t* (r, r, *k), w*a (r, out), w*b (r, in)."""
    f1, f2 = Tucker(t1, w1a, w1b).as_low_rank(), Tucker(t2, w2a, w2b).as_low_rank()
    out = HadaWeight.apply(f1.a, f1.b2d(), f2.a, f2.b2d(), float(scale))
    return out.view(f1.shape)
