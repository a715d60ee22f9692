"""Frozen low-precision base layers (float8 weights): upcast per layer, per call, in forward and again in backward.

`frozen_linear` / `frozen_conv2d` compute the layer's op with its weight cast to the compute dtype (autocast's when
autocast is on, else the input's) and keep only the stored (float8) weight for backward, where they cast it again:
autograd never holds an upcast copy, so training on a float8 model never holds more than one layer's weight in the
compute dtype. Gradients flow to the input only: the weight and bias must be frozen. Every float8 value is exact in
bfloat16, float16 and float32, so the result is that of the same layer with its weight upcast beforehand.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hadakron.ops.autocast import autocast_dtype

Tensor = torch.Tensor

FLOAT8_DTYPES = tuple(getattr(torch, name) for name in
                      ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name))


def is_float8(dtype: torch.dtype) -> bool:
    """True for torch's float8 storage dtypes (e4m3fn, e5m2 and their fnuz forms)."""
    return dtype in FLOAT8_DTYPES


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a layer's op runs in for input x: the autocast dtype when autocast is on for x's device, else x's."""
    dtype = autocast_dtype(x.device.type) if x.dtype != torch.float64 else None
    return x.dtype if dtype is None else dtype


def _cast(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return F.linear(x.to(dtype), _cast(weight, dtype, x.device), _cast(bias, dtype, x.device))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad.matmul(_cast(weight, grad.dtype, grad.device)) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.to(ctx.x_dtype)), None, None, None


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conv = (tuple(x.shape), x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x.to(dtype), _cast(weight, dtype, x.device), _cast(bias, dtype, x.device),
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, x_dtype, stride, padding, dilation, groups = ctx.conv
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = _cast(weight, grad.dtype, grad.device)
            grad_x = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups).to(x_dtype)
        return grad_x, None, None, None, None, None, None, None


def _check_frozen(weight: Tensor, bias: Tensor | None) -> None:
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("frozen layer op: expected a weight and bias with requires_grad=False, found a trainable one")


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` with weight `(out, in)` (e.g. float8) upcast to the compute dtype for this call."""
    _check_frozen(weight, bias)
    return _FrozenLinear.apply(x, weight, bias, compute_dtype(x))


def frozen_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
    """`F.conv2d` with weight `(out, in/groups, kh, kw)` upcast for this call; numeric padding (pad x before)."""
    _check_frozen(weight, bias)
    return _FrozenConv2d.apply(x, weight, bias, compute_dtype(x), tuple(stride), tuple(padding), tuple(dilation),
                               int(groups))
