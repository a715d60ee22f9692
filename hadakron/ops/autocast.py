"""What `torch.autocast` would do to a matmul's input, for the custom autograd ops that run outside its op lists.

An `autograd.Function` is not on autocast's cast lists: its inputs arrive in their own dtypes, and in-place ops
inside it (`addmm_`) are never cast. The callers therefore cast their inputs first, differentiably, exactly as
autocast casts `F.linear`'s: every floating tensor except float64 goes to the autocast dtype of its device.
"""
from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype autocast is running matmuls in on `device_type` now, None when it is off there."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions, cpu and cuda only
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x cast (differentiably) to the dtype autocast gives a matmul input on x's device; x itself when autocast is
    off there, x is not floating, is float64 (autocast leaves it), or already has that dtype."""
    if not x.is_floating_point() or x.dtype == torch.float64:
        return x
    dtype = autocast_dtype(x.device.type)
    return x if dtype is None or dtype == x.dtype else x.to(dtype)


__all__ = ["autocast_dtype", "autocast_input"]
