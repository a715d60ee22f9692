"""`KronLinear`: y = x W^T + b + x kron(W1, W2)^T as one autograd Function, never building kron(W1, W2).

With W2 = P Q (P (b, m), Q (m, d); a full W2 is Q with no P) and X = x viewed (N, c, d), every step is one plain
GEMM on a (possibly transposed) view, in a rank-major layout that needs no copies:
  T1 = Q X^T            (m, N*c)
  T2 = T1 W1^T          (m*N, a)   [T1 viewed (m*N, c): mixes the c groups]
  Y += T2^T P^T         (N*a, b)   [accumulated into the frozen layer's output by addmm_]
The LoKr term is accumulated into the frozen layer's output (addmm_) and, backward, into its input gradient, so
it adds no full-size passes of its own. Saved: x, the weight, the factors and the rank-width T1, T2.
All inputs share one dtype, and the in-place `addmm_` is not on autocast's lists: callers cast them first,
autocast's dtype included (`bypass.lokr_linear` / `lokr_bypass_linear` do); backward runs in that dtype too.
"""

from __future__ import annotations

import torch

class KronLinear(torch.autograd.Function):
    """Inputs, all in one dtype: x (..., c*d), weight (out, c*d) or None, bias or None, w1 (a, c), q (m, d),
    p (b, m) or None (W2 = q)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w1, q, p):
        a, c = int(w1.shape[0]), int(w1.shape[1])
        m, d = int(q.shape[0]), int(q.shape[1])
        b = int(p.shape[0]) if p is not None else m
        lead = x.shape[:-1]
        x2 = x.reshape(-1, c * d)
        n = int(x2.shape[0])
        xg = x2.view(n * c, d) if x2.is_contiguous() else x2.reshape(n * c, d)
        t1 = torch.mm(q, xg.t())  # (m, N*c)
        t2 = torch.mm(t1.view(m * n, c), w1.t())  # (m*N, a)
        t2v = t2.view(m, n * a).t()  # (N*a, m) view
        if weight is not None:
            y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
            yv = y.view(n * a, b)
            if p is not None:
                yv.addmm_(t2v, p.t())
            else:
                yv.add_(t2v)
        else:
            y = torch.mm(t2v, p.t()) if p is not None else t2v.contiguous()
            y = y.view(n, a * b)
            if bias is not None:
                y = y + bias
        ctx.save_for_backward(x2, weight, w1, q, p, t1, t2)
        ctx.dims = (a, b, c, d, m, n)
        ctx.lead = lead
        return y.view(*lead, a * b)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, w1, q, p, t1, t2 = ctx.saved_tensors
        a, b, c, d, m, n = ctx.dims
        need_x, need_w, need_b, need_w1, need_q, need_p = ctx.needs_input_grad
        g = grad.reshape(n, a * b)
        if not g.is_contiguous():
            g = g.contiguous()
        gy = g.view(n * a, b)
        g_weight = g.t().mm(x2) if need_w else None
        g_bias = g.sum(0) if need_b else None
        g_p = torch.mm(t2.view(m, n * a), gy).t() if (need_p and p is not None) else None  # (b, m)
        if not (need_x or need_w1 or need_q):
            return None, g_weight, g_bias, None, None, g_p
        gt2 = torch.mm(p.t(), gy.t()) if p is not None else gy.t().contiguous()  # (m, N*a)
        gt2 = gt2.view(m * n, a)
        g_w1 = torch.mm(gt2.t(), t1.view(m * n, c)) if need_w1 else None
        g_x = g_q = None
        if need_x or need_q:
            gt1 = torch.mm(gt2, w1).view(m, n * c)  # (m, N*c)
            xg = x2.view(n * c, d) if x2.is_contiguous() else x2.reshape(n * c, d)
            if need_q:
                g_q = torch.mm(gt1, xg)
            if need_x:
                if weight is not None:
                    g_x = torch.mm(g, weight)  # the frozen layer's input gradient, LoKr's added in place
                    g_x.view(n * c, d).addmm_(gt1.t(), q)
                else:
                    g_x = torch.mm(gt1.t(), q).view(n, c * d)
                g_x = g_x.view(*ctx.lead, c * d)
        return g_x, g_weight, g_bias, g_w1, g_q, g_p
