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
