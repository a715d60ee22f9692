"""Modules built and trained-looking by lycoris-lora 4.1.3, saved as state dicts, loaded by from_params.

LyCORIS' own forward is the anchor: y_lyco - y_base must equal our forward (its merge path scales LoHa twice,
see reference/ecosystem.md section 8, so it is not used). Tensors come back bit-identical on save.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hadakron.adapters import AdapterModule, LoHa, LoKr

lyco_loha = pytest.importorskip("lycoris.modules.loha")
lyco_lokr = pytest.importorskip("lycoris.modules.lokr")

F64 = torch.float64

LIN_S = (nn.Linear, (12, 20))
LIN_K = (nn.Linear, (64, 96))
CASES = [
    ("loha-linear", lyco_loha.LohaModule, LIN_S, dict(lora_dim=3, alpha=2.0)),
    ("loha-linear-scalar", lyco_loha.LohaModule, LIN_S, dict(lora_dim=3, alpha=2.0, use_scalar=True)),
    ("loha-conv-flat", lyco_loha.LohaModule, (nn.Conv2d, (8, 12, 3), dict(padding=1)), dict(lora_dim=2, alpha=3.0)),
    ("loha-conv-tucker", lyco_loha.LohaModule, (nn.Conv2d, (8, 12, 3), dict(padding=1, stride=2)),
     dict(lora_dim=2, alpha=3.0, use_tucker=True)),
    ("loha-conv1x1", lyco_loha.LohaModule, (nn.Conv2d, (8, 12, 1)), dict(lora_dim=2, alpha=0.5)),
    ("lokr-linear", lyco_lokr.LokrModule, LIN_K, dict(lora_dim=2, alpha=3.0)),
    ("lokr-linear-scalar", lyco_lokr.LokrModule, LIN_K, dict(lora_dim=2, alpha=3.0, use_scalar=True)),
    ("lokr-linear-both", lyco_lokr.LokrModule, LIN_K, dict(lora_dim=2, alpha=3.0, factor=8, decompose_both=True)),
    ("lokr-linear-full", lyco_lokr.LokrModule, LIN_K, dict(lora_dim=8, alpha=3.0)),
    ("lokr-linear-factor4", lyco_lokr.LokrModule, LIN_K, dict(lora_dim=3, alpha=1.0, factor=4)),
    ("lokr-conv-flat", lyco_lokr.LokrModule, (nn.Conv2d, (16, 24, 3), dict(padding=1)),
     dict(lora_dim=2, alpha=3.0, factor=2)),
    ("lokr-conv-tucker", lyco_lokr.LokrModule, (nn.Conv2d, (16, 24, 3), dict(padding=1, stride=2)),
     dict(lora_dim=2, alpha=3.0, factor=2, use_tucker=True)),
    ("lokr-conv1x1-full4d", lyco_lokr.LokrModule, (nn.Conv2d, (16, 24, 1)), dict(lora_dim=4, alpha=3.0)),
    ("lokr-conv3x3-full", lyco_lokr.LokrModule, (nn.Conv2d, (16, 24, 3), dict(padding=1)), dict(lora_dim=4, alpha=3.0)),
]


def make_layer(spec):
    cls, args, *kw = spec
    torch.manual_seed(0)
    return cls(*args, **(kw[0] if kw else {})).double()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lycoris_module_state_dict_loads_with_same_output(case, caplog):
    _, lyco_cls, layer_spec, kwargs = case
    layer = make_layer(layer_spec)
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        x = torch.randn(3, 2, layer.in_features, generator=g, dtype=F64)
    else:
        x = torch.randn(2, layer.in_channels, 7, 6, generator=g, dtype=F64)
    y_base = layer(x)
    with caplog.at_level(logging.ERROR):  # LyCORIS logs its own full-matrix warning
        lyco = lyco_cls("lycoris_test", layer, multiplier=1.0, **kwargs).double()
    with torch.no_grad():  # random, nonzero weights everywhere (as after training)
        for name, p in lyco.named_parameters():
            p.copy_(torch.full_like(p, 0.6) if name == "scalar" else torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
    lyco.apply_to()
    y_lyco = layer(x)
    sd = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
    assert "scalar" not in sd  # LyCORIS folds it into w1_a / w1 when saving

    ours = AdapterModule.from_params(sd, layer)
    assert isinstance(ours, LoHa if "loha" in case[0] else LoKr)
    expected = y_lyco - y_base
    assert expected.abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours(x), expected, rtol=1e-10, atol=1e-12)
    ours.multiplier = 0.5
    lyco.multiplier = 0.5
    torch.testing.assert_close(ours(x), layer(x) - y_base, rtol=1e-10, atol=1e-12)

    again = ours.file_state_dict()
    assert set(again) == set(sd)
    for k in sd:
        assert again[k].dtype == sd[k].dtype and torch.equal(again[k], sd[k]), k
    if isinstance(ours, LoKr):
        assert ours.rank == kwargs["lora_dim"]


def test_lycoris_accepts_our_files():
    """Our for_layer modules, saved, load into LyCORIS' modules with the same shapes and output."""
    layer = nn.Linear(64, 96).double()
    ours = LoKr.for_layer(layer, 2, 3.0, factor=8, decompose_both=True, use_scalar=True).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.tensor(0.8, dtype=F64) if name == "scalar" else torch.randn(p.shape, generator=g, dtype=F64))
    sd = ours.file_state_dict()
    lyco = lyco_lokr.LokrModule("lycoris_test", layer, lora_dim=2, alpha=3.0, factor=8, decompose_both=True).double()
    lyco.load_state_dict(sd)
    x = torch.randn(4, 64, generator=g, dtype=F64)
    y_base = layer(x)
    lyco.apply_to()
    torch.testing.assert_close(ours(x), layer(x) - y_base, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wd_on_out", [True, False])
@pytest.mark.parametrize("lyco_cls", [lyco_loha.LohaModule, lyco_lokr.LokrModule], ids=["loha", "lokr"])
def test_lycoris_dora_modules_match_at_multiplier_one(lyco_cls, wd_on_out):
    """DoRA (weight_decompose): same output as LyCORIS at multiplier 1, base weight read from the layer.

    At other multipliers LyCORIS keeps (1 - m) * dW in the weight; we follow ComfyUI (m * (W_d - W)).
    """
    torch.manual_seed(0)
    layer = nn.Linear(64, 96).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, generator=g, dtype=F64)
    y_base = layer(x)
    lyco = lyco_cls("lycoris_test", layer, lora_dim=2, alpha=1.0, weight_decompose=True, wd_on_out=wd_on_out).double()
    with torch.no_grad():
        for name, p in lyco.named_parameters():
            if name != "dora_scale":
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
    lyco.apply_to()
    expected = layer(x) - y_base
    sd = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
    assert "dora_scale" in sd
    ours = AdapterModule.from_params(sd, layer)
    assert "weight" not in dict(ours.named_parameters())
    torch.testing.assert_close(ours(x), expected, rtol=1e-9, atol=1e-11)
