"""The lazy patch object hadakron hands to ComfyUI: one per adapted weight, delta-W from `hadakron.ops`.

ComfyUI stores patch values in `ModelPatcher.patches` and calls `calculate_weight` only when it patches that
weight (full load, lowvram/dynamic casting, or saving). It may rebuild the object as
`type(value)(value.loaded_keys, <weights with tensors moved>)` to stage tensors on the GPU
(`comfy.lora.prefetch_prepared_value`), so every tensor lives in `.weights` and the constructor takes exactly
`(loaded_keys, weights)`. `weights = (names, *tensors)`: `names` is a tuple of the file's parameter names
(strings pass through staging untouched), followed by the tensors in that order.
"""
from __future__ import annotations

from typing import Mapping

import torch
from comfy.weight_adapter.base import WeightAdapterBase

from hadakron import ops


class HadakronWeightPatch(WeightAdapterBase):
    """Exact LoHa/LoKr patch: W' = W + strength * delta_W (DoRA when the module has `dora_scale`), float32 math."""

    name = "hadakron"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = set(loaded_keys)
        self.weights = tuple(weights)

    @classmethod
    def from_params(cls, params: Mapping[str, torch.Tensor], loaded_keys=()) -> "HadakronWeightPatch":
        """Build from a module's parameter dict (file tensor names -> tensors)."""
        names = tuple(sorted(params))
        return cls(set(loaded_keys), (names,) + tuple(params[n] for n in names))

    def params(self, device=None) -> dict[str, torch.Tensor]:
        """The parameter dict, moved to `device` when given."""
        names, tensors = self.weights[0], self.weights[1:]
        if device is None:
            return dict(zip(names, tensors))
        return {n: t.to(device) for n, t in zip(names, tensors)}

    def calculate_shape(self, key):
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """Patch `weight` in place (ComfyUI's contract) and return it; the math runs in float32 on its device."""
        with torch.no_grad():
            return self._patch(weight, strength, function)

    def _patch(self, weight, strength, function):
        params = self.params(weight.device)
        if "dora_scale" in params:
            new = ops.patched_weight(weight, params, strength, dtype=torch.float32)
        else:
            dw = ops.delta_weight(params, tuple(weight.shape), dtype=torch.float32, device=weight.device)
            dw = dw.mul_(strength) if strength != 1.0 else dw
            if function is not None:
                dw = function(dw)
            if weight.dtype == torch.float32:
                return weight.add_(dw)
            new = weight.to(torch.float32).add_(dw)
        weight.copy_(new.to(weight.dtype))
        return weight
