"""Factor kinds of LoHa/LoKr: Full, LowRank (a @ b) and Tucker (core with a, b).

A factor stands for one matrix-like tensor of shape ``(rows, cols, *kernel)`` (2-D for Linear and flat/1x1
convs, 4-D when it carries a kernel). Each kind knows, once, how to materialise itself, apply itself to an input
(Linear or Conv2d), count its parameters and give its exact LoRA pair ``(up (rows, R), down (R, cols*K))``.

Layouts (as in the files): ``LowRank(a (rows, r), b (r, cols) | (r, cols*K) | (r, cols, kh, kw))``;
``Tucker(core (r1, r2, kh, kw), a (r1, rows), b (r2, cols))`` with
``W[p, q, y, x] = sum_ij core[i, j, y, x] a[i, p] b[j, q]`` (the einsum ``"i j k l, j r, i p -> p r k l"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    return t.to(device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype)


def conv_weight(w2d: torch.Tensor, cols: int, kernel: Sequence[int]) -> torch.Tensor:
    """View a 2-D (R, cols*kh*kw) matrix as a conv weight (R, cols, kh, kw); no kernel means 1x1."""
    kernel = tuple(kernel) or (1, 1)
    return w2d.reshape(w2d.shape[0], cols, *kernel)


@dataclass(frozen=True)
class Full:
    """A stored full matrix ``w`` of shape (rows, cols) or (rows, cols, kh, kw)."""

    w: torch.Tensor

    def __post_init__(self) -> None:
        if self.w.dim() < 2:
            raise ValueError(f"full factor must have at least 2 dims, found shape {_shape(self.w)}")

    @property
    def rows(self) -> int:
        return int(self.w.shape[0])

    @property
    def cols(self) -> int:
        """Width of the flattened 2-D form (cols * kh * kw)."""
        return math.prod(int(d) for d in self.w.shape[1:])  # not w[0]: an autograd select per call

    @property
    def kernel(self) -> tuple[int, ...]:
        return _shape(self.w)[2:]

    @property
    def shape(self) -> tuple[int, ...]:
        return _shape(self.w)

    @property
    def rank(self) -> int:
        """Inner width of the exact LoRA pair given by `lora_pair`."""
        return min(self.rows, self.cols)

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    @property
    def device(self) -> torch.device:
        return self.w.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.w,)

    def param_count(self) -> int:
        return int(self.w.numel())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Full":
        return Full(_cast(self.w, dtype, device))

    def scaled(self, scale: float) -> "Full":
        """The same factor times `scale` (multiplies the stored tensor: it is the only piece)."""
        return self if scale == 1.0 else Full(self.w * scale)

    def materialize(self) -> torch.Tensor:
        return self.w

    def matrix(self) -> torch.Tensor:
        """The 2-D (rows, cols*K) form."""
        return self.w.reshape(self.rows, -1)

    def lora_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (up, down) with the identity on the smaller side: R = min(rows, cols*K)."""
        m = self.matrix()
        if self.rows <= self.cols:
            return torch.eye(self.rows, dtype=m.dtype, device=m.device), m
        return m, torch.eye(self.cols, dtype=m.dtype, device=m.device)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., cols) -> x @ W^T (..., rows)."""
        return F.linear(x, self.matrix())

    def conv2d(self, x: torch.Tensor, kernel: Sequence[int], stride=1, padding=0, dilation=1) -> torch.Tensor:
        w = self.w if self.w.dim() == 4 else conv_weight(self.w.reshape(self.rows, -1), x.shape[1], kernel)
        return F.conv2d(x, w, None, stride, padding, dilation)


@dataclass(frozen=True)
class LowRank:
    """``a @ b`` with a (rows, r) and b (r, cols), (r, cols*K) or (r, cols, kh, kw)."""

    a: torch.Tensor
    b: torch.Tensor

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() < 2:
            raise ValueError(
                f"low-rank factor needs a 2-D 'a' and an 'b' of 2+ dims, found {_shape(self.a)} and {_shape(self.b)}"
            )
        if self.a.shape[1] != self.b.shape[0]:
            raise ValueError(
                f"low-rank factor: 'a' {_shape(self.a)} needs 'b' with {self.a.shape[1]} rows, found {_shape(self.b)}"
            )

    @property
    def rows(self) -> int:
        return int(self.a.shape[0])

    @property
    def cols(self) -> int:
        return math.prod(int(d) for d in self.b.shape[1:])

    @property
    def kernel(self) -> tuple[int, ...]:
        return _shape(self.b)[2:]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows,) + _shape(self.b)[1:]

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.a, self.b)

    def param_count(self) -> int:
        return int(self.a.numel() + self.b.numel())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LowRank":
        return LowRank(_cast(self.a, dtype, device), _cast(self.b, dtype, device))

    def b2d(self) -> torch.Tensor:
        return self.b.reshape(self.rank, -1)

    def scaled(self, scale: float) -> "LowRank":
        """Times `scale`, folded into the smaller of a and b."""
        if scale == 1.0:
            return self
        if self.a.numel() <= self.b.numel():
            return LowRank(self.a * scale, self.b)
        return LowRank(self.a, self.b * scale)

    def matrix(self) -> torch.Tensor:
        return self.a @ self.b2d()

    def materialize(self) -> torch.Tensor:
        return self.matrix().reshape(self.shape)

    def lora_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a, self.b2d()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.b2d()), self.a)

    def conv2d(self, x: torch.Tensor, kernel: Sequence[int], stride=1, padding=0, dilation=1) -> torch.Tensor:
        down = self.b if self.b.dim() == 4 else conv_weight(self.b2d(), x.shape[1], kernel)
        h = F.conv2d(x, down, None, stride, padding, dilation)
        return F.conv2d(h, self.a[:, :, None, None])


@dataclass(frozen=True)
class Tucker:
    """Tucker factor: core (r1, r2, *k), a (r1, rows), b (r2, cols); W = core x_0 a^T x_1 b^T."""

    core: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor

    def __post_init__(self) -> None:
        c, a, b = self.core, self.a, self.b
        if c.dim() < 2 or a.dim() != 2 or b.dim() != 2:
            raise ValueError(
                f"Tucker factor needs core (r1, r2, ...), a (r1, rows), b (r2, cols); "
                f"found {_shape(c)}, {_shape(a)}, {_shape(b)}"
            )
        if a.shape[0] != c.shape[0] or b.shape[0] != c.shape[1]:
            raise ValueError(
                f"Tucker factor: core {_shape(c)} needs a with {c.shape[0]} rows and b with {c.shape[1]} rows, "
                f"found a {_shape(a)}, b {_shape(b)}"
            )

    @property
    def rows(self) -> int:
        return int(self.a.shape[1])

    @property
    def cols(self) -> int:
        return int(self.b.shape[1]) * math.prod(self.kernel)

    @property
    def kernel(self) -> tuple[int, ...]:
        return _shape(self.core)[2:]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, int(self.b.shape[1])) + self.kernel

    @property
    def rank(self) -> int:
        return int(self.core.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.core.dtype

    @property
    def device(self) -> torch.device:
        return self.core.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.core, self.a, self.b)

    def param_count(self) -> int:
        return int(self.core.numel() + self.a.numel() + self.b.numel())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Tucker":
        return Tucker(_cast(self.core, dtype, device), _cast(self.a, dtype, device), _cast(self.b, dtype, device))

    def scaled(self, scale: float) -> "Tucker":
        if scale == 1.0:
            return self
        sizes = [self.core.numel(), self.a.numel(), self.b.numel()]
        which = sizes.index(min(sizes))
        parts = [self.core, self.a, self.b]
        parts[which] = parts[which] * scale
        return Tucker(*parts)

    def folded_down(self) -> torch.Tensor:
        """The core folded into b: M[i, q, *k] = sum_j core[i, j, *k] b[j, q], shape (r1, cols, *k)."""
        c = self.core
        k = c.shape[2:]
        # (r1, r2, K) x (r2, cols) -> (r1, cols, K)
        m = torch.matmul(c.reshape(c.shape[0], c.shape[1], -1).transpose(1, 2), self.b)  # (r1, K, cols)
        return m.transpose(1, 2).reshape(c.shape[0], self.b.shape[1], *k)

    def as_low_rank(self) -> LowRank:
        """Exact LowRank(a^T, folded core): rank r1, kernel kept on the b side."""
        return LowRank(self.a.t(), self.folded_down())

    def matrix(self) -> torch.Tensor:
        return self.as_low_rank().matrix()

    def materialize(self) -> torch.Tensor:
        return self.matrix().reshape(self.shape)

    def lora_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.as_low_rank().lora_pair()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.as_low_rank().linear(x)

    def conv2d(self, x: torch.Tensor, kernel: Sequence[int] | None = None, stride=1, padding=0, dilation=1) -> torch.Tensor:
        """1x1 conv with b, kxk conv with the core, 1x1 conv with a: never builds the (rows, cols, k) weight."""
        h = F.conv2d(x, self.b[:, :, None, None])
        h = F.conv2d(h, self.core, None, stride, padding, dilation)  # core (r1 out, r2 in, kh, kw)
        return F.conv2d(h, self.a.t()[:, :, None, None])


Factor = Union[Full, LowRank, Tucker]


def as_factor(f: "Factor | torch.Tensor | tuple") -> Factor:
    """A tensor is a Full factor; a pair (a, b) is LowRank; a triple (core, a, b) is Tucker."""
    if isinstance(f, (Full, LowRank, Tucker)):
        return f
    if isinstance(f, torch.Tensor):
        return Full(f)
    if isinstance(f, (tuple, list)) and len(f) == 2:
        return LowRank(*f)
    if isinstance(f, (tuple, list)) and len(f) == 3:
        return Tucker(*f)
    raise TypeError(f"cannot make a factor from {type(f).__name__}")
