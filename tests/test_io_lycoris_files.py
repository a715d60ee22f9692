"""Files written by lycoris-lora itself read cleanly: same tensors, grouped per LyCORIS module, no problems,
and the grouped parameters give the delta-W that LyCORIS's forward pass applies."""
from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.nn import functional as F

from hadakron.io import read_adapter
from hadakron.ops import delta_weight

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.WARNING)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(32, 64)
        self.conv = nn.Conv2d(8, 16, 3)
        self.ff = nn.Linear(64, 48)


CASES = [
    ("lokr", dict(factor=4)),
    ("lokr", dict(factor=-1, decompose_both=True, use_tucker=True)),
    ("loha", dict(use_tucker=True)),
    ("loha", dict()),
]


@pytest.mark.parametrize("algo,kwargs", CASES)
def test_lycoris_file_reads_cleanly(tmp_path, algo, kwargs):
    from lycoris import LycorisNetwork, create_lycoris

    torch.manual_seed(0)
    LycorisNetwork.apply_preset({"target_module": [], "target_name": ["proj_in", "conv", "ff"]})
    model = Tiny()
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo, conv_dim=4, conv_alpha=1, **kwargs)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 0:
                p.normal_()
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    expected = safetensors.torch.load_file(str(path))

    f = read_adapter(path)
    assert f.problems == []
    assert f.metadata == {"ss_network_module": "lycoris.kohya"}
    assert set(f.tensors) == set(expected)
    assert all(torch.equal(f.tensors[k], v) for k, v in expected.items())
    assert set(f.modules) == {lm.lora_name for lm in net.loras}
    # LyCORIS's own forward pass (its merge path double-scales LoHa, see reference/ecosystem.md section 8)
    x_lin = {"proj_in": torch.randn(5, 32), "ff": torch.randn(5, 64)}
    x_conv = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        for name in ("proj_in", "ff", "conv"):
            layer = getattr(model, name)
            delta = delta_weight(f.modules[f"lycoris_{name}"], tuple(layer.weight.shape))
            if name == "conv":
                want = layer(x_conv) - F.conv2d(x_conv, layer.weight, layer.bias)
                got = F.conv2d(x_conv, delta)
            else:
                want = layer(x_lin[name]) - F.linear(x_lin[name], layer.weight, layer.bias)
                got = F.linear(x_lin[name], delta)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
