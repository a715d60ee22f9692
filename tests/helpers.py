"""Pieces several test files share: float64 reference formulas and fixtures (import what a file uses)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared, loaded CPU: one thread is much faster than many fighting each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ref_tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild as LyCORIS writes it: W[p, q, y, x] = sum_ij t[i, j, y, x] a[i, p] b[j, q]."""
    return torch.einsum("ijyx,ip,jq->pqyx", t, a, b)


@pytest.fixture(scope="module")
def sdxl():
    """Tiny SDXL parts (unet, te1, te2) with the real module names, built once per test module."""
    from models import sdxl_parts
    return sdxl_parts()


@pytest.fixture(scope="module")
def anima():
    """Tiny Anima parts (unet with llm_adapter, te) with the real module names, built once per test module."""
    from models import anima_parts
    return anima_parts()


def build_network(family: str, parts: dict, **config):
    """`AdapterNetwork.build(family, parts, NetworkConfig(**config))`."""
    from hadakron.network import AdapterNetwork, NetworkConfig
    return AdapterNetwork.build(family, parts, NetworkConfig(**config))


def ref_dora(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> torch.Tensor:
    """Row-wise DoRA in float64: W + s * (W_d - W), W_d = (W + dW) * m / (||W + dW||_row + eps(float32))."""
    w = weight.double()
    merged = w + delta.double()
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    wd = merged * dora_scale.double().reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
    return w + strength * (wd - w)


def read_adapter_in_inference_mode(path):
    """`hadakron.io.read_adapter` inside `torch.inference_mode()`, as ComfyUI runs the loader: inference tensors."""
    from hadakron.io import read_adapter
    with torch.inference_mode():
        return read_adapter(path)


def copy_watch(storages: set[int]):
    """A TorchDispatchMode recording every op that copies out of one of `storages` (untyped storage data_ptrs):
    clone, _to_copy, a `to`/`contiguous` that returns new memory, or copy_ from it. `.copies` lists them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = torch.ops.aten
    copy_like = {ops.clone, ops._to_copy, ops.to, ops.contiguous, ops.detach_copy, ops.alias_copy, ops.lift_fresh_copy}

    def reads(t) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in storages

    class CopyWatch(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.copies: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            packet = func.overloadpacket
            if packet is ops.copy_ and len(args) > 1 and reads(args[1]):
                self.copies.append(f"{func}{tuple(args[1].shape)}")
            elif packet in copy_like and args and reads(args[0]) and not reads(out):
                self.copies.append(f"{func}{tuple(args[0].shape)}")
            return out

    return CopyWatch()
