"""AdapterNetwork.build(seed=...): the same seed gives the same adapter init; the caller's RNG is untouched."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hadakron.network import AdapterNetwork, NetworkConfig

logging.getLogger("hadakron").setLevel(logging.ERROR)


def tiny_unet() -> nn.Module:
    """One SDXL-named layer: input_blocks.4.1.transformer_blocks.0.attn1.to_q."""
    root = nn.Module()
    root.input_blocks = nn.ModuleList([nn.Module() for _ in range(5)])
    block = root.input_blocks[4]
    block.add_module("1", nn.Module())
    attn = nn.Module()
    attn.to_q = nn.Linear(16, 16, bias=False)
    tb = nn.Module()
    tb.attn1 = attn
    getattr(block, "1").transformer_blocks = nn.ModuleList([tb])
    return root


def factors(net: AdapterNetwork) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.file_state_dict().items()}


@pytest.mark.filterwarnings("ignore:SDXL unet")  # the tiny model holds 1 of 722 layers: expected
def test_same_seed_same_init_and_caller_rng_untouched():
    for algo in ("loha", "lokr"):
        config = NetworkConfig(algo=algo, network_dim=4, network_alpha=2.0)
        models = [tiny_unet() for _ in range(3)]  # built first: nn.Linear init draws from the global RNG
        torch.manual_seed(123)
        expected_next = torch.rand(3)
        torch.manual_seed(123)
        a = factors(AdapterNetwork.build("sdxl", {"unet": models[0]}, config, seed=7))
        assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream continues as if nothing happened
        b = factors(AdapterNetwork.build("sdxl", {"unet": models[1]}, config, seed=7))
        c = factors(AdapterNetwork.build("sdxl", {"unet": models[2]}, config, seed=8))
        assert a.keys() == b.keys() and len(a) >= 3
        assert all(torch.equal(a[k], b[k]) for k in a)
        random_keys = [k for k in a if a[k].numel() > 1 and a[k].abs().sum() > 0]
        assert random_keys and any(not torch.equal(a[k], c[k]) for k in random_keys)
