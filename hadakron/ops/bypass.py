"""Bypass products s * dW x that never build delta-W (training beside a frozen layer).

Factor arguments are `Factor` objects (Full / LowRank / Tucker from `hadakron.ops.factors`) or plain tensors (a tensor
is a Full factor, a pair (a, b) LowRank, a triple (core, a, b) Tucker). Math runs in `x.dtype` (factors are cast to
it, differentiably), because training runs in the model's compute dtype. Only groups=1 convolutions.
The two Linear products run through the `KronLinear` autograd Function, which autocast does not see: under
`torch.autocast` they first cast x (and so the factors, weight and bias) to the autocast dtype, as autocast casts
`F.linear` (`hadakron.ops.autocast`); the gradients flow back through those casts to the inputs' own dtypes.

- `lokr_bypass_linear(x, w1, w2, scale)`: x (..., c*d) -> (..., a*b) with W1 (a, c), W2 (b, d), by the
  Kronecker-vector identity y = vec(W1 X W2^T), X = x viewed (c, d).
- `lokr_linear(x, weight, bias, w1, w2, scale)`: the frozen Linear and the LoKr term in one autograd node
  (`KronLinear`), which accumulates into the layer's output and input gradient: the fastest training path.
- `lokr_bypass_conv2d(x, w1, w2, scale, stride, padding, dilation, kernel_size=None)`: the c input groups are
  folded into the batch, W2 runs as a conv (full, low-rank 1x1-after-kxk, or Tucker 1x1/kxk/1x1 chain), then W1
  mixes the groups.
- `loha_bypass(x, w1, w2, scale, *, kernel_size, stride, padding, dilation, mode="auto")`: through the exact
  rank r1*r2 form (row-wise Khatri-Rao up, face-splitting down) when `loha_bypass_mode` says it is cheaper, else
  through `HadaWeight` (rebuild whose backward recomputes, saving only factors).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .autocast import autocast_input
from .autograd import HadaWeight
from .kron_linear import KronLinear
from .factors import Factor, LowRank, Tucker, as_factor
from .rebuild import low_rank_pair


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1.0


def _cast(f: Factor, x: torch.Tensor) -> Factor:
    ts = f.tensors()
    if all(t.dtype == x.dtype and t.device == x.device for t in ts):
        return f
    return f.to(dtype=x.dtype, device=x.device)


def _w1_2d(w1: Factor) -> Factor:
    if isinstance(w1, Tucker):
        raise ValueError("LoKr W1 cannot be a Tucker factor")
    if w1.kernel and any(k != 1 for k in w1.kernel):
        raise ValueError(f"LoKr W1 must be 2-D (or (m, n, 1, 1)), found shape {w1.shape}")
    return w1


def _kron_linear_inputs(x: torch.Tensor, w1, w2, scale):
    """(x, W1 * scale, Q, P) for `KronLinear`, all in one dtype: x's, or autocast's when it is on for x's device."""
    x = autocast_input(x)
    if isinstance(w1, torch.Tensor) and isinstance(w2, torch.Tensor) and w1.dim() == 2 and w2.dim() == 2:
        # two full matrices (what the trainer attaches): the same inputs, without the Factor objects' per-call cost
        w1 = w1 if (w1.dtype == x.dtype and w1.device == x.device) else w1.to(dtype=x.dtype, device=x.device)
        w2 = w2 if (w2.dtype == x.dtype and w2.device == x.device) else w2.to(dtype=x.dtype, device=x.device)
        if x.shape[-1] != w1.shape[1] * w2.shape[1]:
            raise ValueError(f"LoKr bypass: input width {x.shape[-1]} != W1 cols {w1.shape[1]} x W2 cols {w2.shape[1]}")
        return x, _scaled(w1, scale, x.dtype), w2, None
    f1, f2 = _w1_2d(_cast(as_factor(w1), x)), _cast(as_factor(w2), x)
    c, d = f1.cols, f2.cols
    if x.shape[-1] != c * d:
        raise ValueError(f"LoKr bypass: input width {x.shape[-1]} != W1 cols {c} x W2 cols {d}")
    m1 = _scaled(f1.matrix(), scale, x.dtype)
    if isinstance(f2, (LowRank, Tucker)):
        p2, q2 = low_rank_pair(f2)  # W2 = p2 (b, r) @ q2 (r, d)
    else:
        p2, q2 = None, f2.matrix()
    return x, m1, q2, p2


def _scaled(m: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """m * scale kept in `dtype` (a float32 scale tensor of shape (1,) would otherwise promote a half m)."""
    if _is_one(scale):
        return m
    out = m * scale
    return out if out.dtype == dtype else out.to(dtype)


def lokr_bypass_linear(x: torch.Tensor, w1, w2, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """scale * x @ kron(W1, W2)^T without building the product: x (..., c*d) -> (..., a*b)."""
    x, m1, q2, p2 = _kron_linear_inputs(x, w1, w2, scale)
    return KronLinear.apply(x, None, None, m1, q2, p2)


def lokr_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1, w2, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """F.linear(x, weight, bias) + scale * x @ kron(W1, W2)^T in one autograd node (the frozen layer fused in:
    the LoKr term is accumulated into the layer's output and input gradient, saving two full-size passes).
    The weight and bias are cast to x's dtype (autocast's under autocast)."""
    x, m1, q2, p2 = _kron_linear_inputs(x, w1, w2, scale)
    if weight.dtype != x.dtype or weight.device != x.device:
        weight = weight.to(dtype=x.dtype, device=x.device)
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        bias = bias.to(dtype=x.dtype, device=x.device)
    return KronLinear.apply(x, weight, bias, m1, q2, p2)


def _kernel_of(f: Factor, in_channels: int, kernel_size) -> tuple[int, int]:
    if kernel_size is not None:
        return _pair(kernel_size)
    if f.kernel:
        return _pair(tuple(f.kernel))
    k = f.cols // in_channels
    side = math.isqrt(k)
    if side * side != k or k * in_channels != f.cols:
        raise ValueError(
            f"cannot tell the kernel size of a flat factor with {f.cols} columns for {in_channels} input channels; "
            "pass kernel_size"
        )
    return side, side


def lokr_bypass_conv2d(
    x: torch.Tensor, w1, w2, scale: float | torch.Tensor = 1.0,
    stride=1, padding=0, dilation=1, kernel_size=None,
) -> torch.Tensor:
    """scale * conv2d(x, kron(W1, W2)) without building the product (groups=1): x (B, c*d, H, W)."""
    f1, f2 = _w1_2d(_cast(as_factor(w1), x)), _cast(as_factor(w2), x)
    if x.dim() != 4:
        raise ValueError(f"LoKr conv bypass needs x (B, C, H, W), found shape {tuple(x.shape)}")
    B, C, H, W = (int(s) for s in x.shape)
    c = f1.cols
    if C % c:
        raise ValueError(f"LoKr conv bypass: {C} input channels do not split into W1's {c} groups")
    d = C // c
    kernel = _kernel_of(f2, d, kernel_size)
    if f2.cols != d * math.prod(kernel):
        raise ValueError(f"LoKr conv bypass: W2 {f2.shape} does not fit {d} channels x kernel {kernel}")
    if not _is_one(scale):
        f1 = f1.scaled(scale)
    h = f2.conv2d(x.reshape(B * c, d, H, W), kernel, stride, padding, dilation)  # (B*c, b, Ho, Wo)
    Ho, Wo = int(h.shape[-2]), int(h.shape[-1])
    h = h.reshape(B, c, -1)  # (B, c, b*Ho*Wo): W1 mixes the groups with B wide GEMMs, no copies
    if isinstance(f1, LowRank):
        y = torch.matmul(f1.a, torch.matmul(f1.b2d(), h))
    else:
        y = torch.matmul(f1.matrix(), h)  # (B, a, b*Ho*Wo)
    return y.reshape(B, f1.rows * f2.rows, Ho, Wo)


def hada_lora_pair(w1, w2, scale: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (up (out, r1*r2), down (r1*r2, cols)) of (W1 * W2) * scale: row-wise Khatri-Rao and face-splitting."""
    u1, v1 = low_rank_pair(as_factor(w1))
    u2, v2 = low_rank_pair(as_factor(w2))
    r1, r2 = int(u1.shape[1]), int(u2.shape[1])
    up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], r1 * r2)
    down = (v1[:, None, :] * v2[None, :, :]).reshape(r1 * r2, v1.shape[1])
    if not _is_one(scale):
        if up.numel() <= down.numel():
            up = up * scale
        else:
            down = down * scale
    return up, down


def loha_bypass_mode(tokens: int, out: int, cols: int, r1: int, r2: int) -> str:
    """"lowrank" when the rank r1*r2 form costs fewer multiply-adds than rebuild + dense product, else "rebuild"."""
    rank = r1 * r2
    lowrank = tokens * rank * (cols + out) + rank * (out + cols)
    rebuild = tokens * out * cols + out * cols * (r1 + r2 + 1)
    return "lowrank" if lowrank < rebuild else "rebuild"


def loha_bypass(
    x: torch.Tensor, w1, w2, scale: float | torch.Tensor = 1.0, *,
    kernel_size=None, stride=1, padding=0, dilation=1, mode: str = "auto",
) -> torch.Tensor:
    """scale * dW x for LoHa, Linear (x (..., cols)) or Conv2d (x (B, C, H, W), groups=1).

    mode: "auto" (by `loha_bypass_mode` from the shapes and token count), "lowrank" or "rebuild".
    """
    f1, f2 = _cast(as_factor(w1), x), _cast(as_factor(w2), x)
    if (f1.rows, f1.cols) != (f2.rows, f2.cols):
        raise ValueError(f"LoHa factors differ in shape: {f1.shape} vs {f2.shape}")
    out, cols = f1.rows, f1.cols
    conv = x.dim() == 4
    if conv:
        cin = int(x.shape[1])
        kernel = _kernel_of(f1, cin, kernel_size)
        if cin * math.prod(kernel) != cols:
            raise ValueError(f"LoHa conv bypass: factors {f1.shape} do not fit {cin} channels x kernel {kernel}")
    elif x.shape[-1] != cols:
        raise ValueError(f"LoHa bypass: input width {x.shape[-1]} != factor cols {cols}")
    u1, v1 = low_rank_pair(f1)
    u2, v2 = low_rank_pair(f2)
    if mode == "auto":
        if conv:
            sh, sw = _pair(stride)
            tokens = int(x.shape[0]) * max(1, int(x.shape[2]) // sh) * max(1, int(x.shape[3]) // sw)
        else:
            tokens = x.numel() // max(1, cols)
        mode = loha_bypass_mode(tokens, out, cols, int(u1.shape[1]), int(u2.shape[1]))
    if mode == "lowrank":
        up, down = hada_lora_pair(LowRank(u1, v1), LowRank(u2, v2), scale)
        if conv:
            h = F.conv2d(x, down.reshape(down.shape[0], cin, *kernel), None, stride, padding, dilation)
            return F.conv2d(h, up[:, :, None, None])
        return F.linear(F.linear(x, down), up)
    if mode != "rebuild":
        raise ValueError(f"loha_bypass mode must be 'auto', 'lowrank' or 'rebuild', found {mode!r}")
    if not _is_one(scale):
        if u1.numel() <= v1.numel():
            u1 = u1 * scale
        else:
            v1 = v1 * scale
    dw = HadaWeight.apply(u1, v1, u2, v2, 1.0)
    if conv:
        return F.conv2d(x, dw.view(out, cin, *kernel), None, stride, padding, dilation)
    return F.linear(x, dw)


__all__ = [
    "lokr_bypass_linear", "lokr_linear", "lokr_bypass_conv2d", "loha_bypass", "loha_bypass_mode", "hada_lora_pair",
]
