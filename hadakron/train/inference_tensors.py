"""Training on tensors made under `torch.inference_mode()` (everything a ComfyUI prompt hands a node).

Inference tensors cannot be saved for backward, so a frozen base weight that is one breaks the adapter's
backward even though it never needs a gradient itself. Two tools, neither copying the model:
- `autograd_safe_weights(*modules)`: swap every inference-tensor parameter/buffer for a normal tensor over the
  same storage (same memory, no copy) while training, and put the originals back after;
- `normal_copy(value)`: clone the few small inputs (latents, conditioning) that are inference tensors.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def storage_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor viewing exactly `t`'s memory: same storage, offset, sizes and strides."""
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return alias


def _plain_inference(t) -> bool:
    """An inference tensor of a plain dtype/layout; tensor subclasses (e.g. ComfyUI's quantized fp8 weights) keep
    their own storage layout and are left alone rather than aliased as something they are not."""
    return t is not None and type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and t.is_inference()


def _inference_entries(modules) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(owner module, attribute name, is_parameter, tensor) for every inference parameter/buffer, each owner once."""
    seen: set[int] = set()
    found = []
    for root in modules:
        for owner in root.modules():
            if id(owner) in seen:
                continue
            seen.add(id(owner))
            for name, p in owner._parameters.items():
                if _plain_inference(p):
                    found.append((owner, name, True, p))
            for name, b in owner._buffers.items():
                if _plain_inference(b):
                    found.append((owner, name, False, b))
    return found


@contextlib.contextmanager
def autograd_safe_weights(*modules: nn.Module) -> Iterator[int]:
    """While inside, every inference-tensor parameter and buffer of `modules` is a frozen normal tensor over the
    same memory (no copy), so backward can save it; the original objects are restored on exit. Yields the count.

    Parameters stay `requires_grad=False`; the adapters being trained are separate modules. Swapped tensors share
    storage with the originals, so nothing here may write them (the trainers never write base weights).
    """
    entries = _inference_entries(modules)
    swapped = []
    try:
        for owner, name, is_param, original in entries:
            alias = storage_alias(original)
            if is_param:
                owner._parameters[name] = nn.Parameter(alias, requires_grad=False)
            else:
                owner._buffers[name] = alias
            swapped.append((owner, name, is_param, original))
        yield len(swapped)
    finally:
        for owner, name, is_param, original in swapped:
            (owner._parameters if is_param else owner._buffers)[name] = original


def normal_copy(value):
    """`value` with every inference tensor inside (nested dicts, lists, tuples) cloned into a normal tensor.

    Other tensors and objects are returned as they are (not copied); containers are rebuilt, so the caller's
    own structures (e.g. a conditioning list shared with other nodes) are never modified.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_inference():
            return value
        with torch.inference_mode(False):
            return value.clone()
    if isinstance(value, dict):
        return {k: normal_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normal_copy(v) for v in value]
    if isinstance(value, tuple):
        items = [normal_copy(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value
