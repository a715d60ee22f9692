"""The geometry of the frozen layer an adapter sits beside, read once from the layer.

An adapter keeps only these numbers, never the layer itself, so the base weights never show up in
the adapter's `parameters()` or `state_dict()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """Shape and conv arguments of an `nn.Linear` or `nn.Conv2d` (subclasses included)."""

    kind: str  # "linear" or "conv2d"
    out_dim: int
    in_dim: int  # per group for conv
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    # Extra padding done by F.pad before the conv (left, right, top, bottom) with this mode, for
    # padding="same" with odd total padding or a padding_mode other than "zeros" (as torch does).
    pre_pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    pad_mode: str = "constant"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The layer's weight shape: `(out, in)` or `(out, in, kh, kw)`."""
        if self.kind == "linear":
            return (self.out_dim, self.in_dim)
        return (self.out_dim, self.in_dim, *self.kernel)

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv2d"

    @property
    def kernel_numel(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @classmethod
    def of(cls, layer: nn.Module) -> "LayerSpec":
        """Read the spec from a layer; raises TypeError for anything but Linear/Conv2d."""
        if isinstance(layer, nn.Linear):
            return cls("linear", int(layer.out_features), int(layer.in_features))
        if isinstance(layer, nn.Conv2d):
            return _conv_spec(layer)
        raise TypeError(
            f"LoHa/LoKr adapters support nn.Linear and nn.Conv2d (or subclasses); got {type(layer).__name__}"
        )

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the padding that F.conv2d's own `padding` argument cannot express."""
        if self.is_conv and any(self.pre_pad):
            return F.pad(x, self.pre_pad, mode=self.pad_mode)
        return x

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`x` through this layer's op with `weight` (no bias): F.linear or F.conv2d with the layer's args."""
        if not self.is_conv:
            return F.linear(x, weight)
        return F.conv2d(
            self.prepare_input(x), weight.reshape(self.weight_shape), None,
            self.stride, self.padding, self.dilation, self.groups,
        )

    def output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape of the layer's output for input `x` (for a skipped adapter's zero term)."""
        if not self.is_conv:
            return (*x.shape[:-1], self.out_dim)
        h, w = x.shape[-2:]
        (pl, pr, pt, pb) = self.pre_pad
        h, w = h + pt + pb, w + pl + pr
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return (*x.shape[:-3], self.out_dim, oh, ow)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def _conv_spec(layer: nn.Conv2d) -> LayerSpec:
    kernel = _pair(layer.kernel_size)
    stride = _pair(layer.stride)
    dilation = _pair(layer.dilation)
    pre_pad = (0, 0, 0, 0)
    pad_mode = "constant"
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): torch pads total d*(k-1), the extra one on the right/bottom
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            if all(t % 2 == 0 for t in totals):
                padding = (totals[0] // 2, totals[1] // 2)
            else:
                padding = (0, 0)
                pre_pad = (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2)
    else:
        padding = _pair(layer.padding)
    if layer.padding_mode != "zeros":
        # torch pads with the mode first, then convolves with padding 0
        ph, pw = padding
        pl, pr, pt, pb = pre_pad
        pre_pad = (pl + pw, pr + pw, pt + ph, pb + ph)
        padding = (0, 0)
        pad_mode = layer.padding_mode
    return LayerSpec(
        "conv2d", int(layer.out_channels), int(layer.in_channels) // int(layer.groups), kernel,
        stride, padding, dilation, int(layer.groups), pre_pad, pad_mode,
    )


def layer_device(layer: nn.Module) -> torch.device:
    """The device of the layer's weight (CPU when it has none or it is on the meta device)."""
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.device.type != "meta":
        return w.device
    return torch.device("cpu")
