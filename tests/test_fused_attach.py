"""Attached LoKr on a Linear runs as one fused op (`ops.lokr_linear`) where safe, else layer(x) + adapter(x).

Outputs and gradients are checked against a float64 reference written here (F.linear with W + m*s*kron(W1, W2),
differentiated by autograd) and against the unfused path; which path ran is read from the output's grad_fn.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hadakron.adapters import LoKr
from hadakron.network import AdapterNetwork, NetworkConfig

pytestmark = pytest.mark.filterwarnings("ignore:.*selected layers are not in the given module")

FUSED = "KronLinearBackward"
FORMS = {
    "full_w1_lowrank_w2": dict(network_dim=2),
    "full_w2": dict(network_dim=2, full_matrix=True),
    "decompose_both": dict(network_dim=2, decompose_both=True),
}


def tiny_dit(linear_cls=nn.Linear, bias=True, dtype=torch.float64) -> nn.Module:
    """Two Anima-named Linears: blocks.0.mlp.layer1 (64 -> 128, LoKr W1 8x8, W2 16x8), layer2 (128 -> 64)."""
    root, block = nn.Module(), nn.Module()
    block.mlp = nn.Module()
    block.mlp.layer1 = linear_cls(64, 128, bias=bias, dtype=dtype)
    block.mlp.layer2 = nn.Linear(128, 64, bias=False, dtype=dtype)
    root.blocks = nn.ModuleList([block])
    root.requires_grad_(False)
    return root


def build(model, dtype=torch.float64, seed=0, **kw):
    net = AdapterNetwork.build("anima", {"unet": model}, NetworkConfig(algo="lokr", network_alpha=1.5, **kw),
                               dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return net, net.targets[0]


def reference(layer, adapter, x):
    """F.linear(x, W + multiplier * s * kron(W1, W2), b) in float64, differentiable in x and every factor."""
    p = {n: getattr(adapter, n).double() for n in adapter.factor_names}
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    alpha = float(adapter.alpha)
    scale = alpha / p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else (
        alpha / p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else 1.0)
    if adapter.scalar is not None:
        scale = scale * adapter.scalar.double()
    dw = torch.kron(w1, w2) * scale * adapter.multiplier
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double() + dw, bias)


def grads(y, g, x, adapter):
    """Gradients of <y, g> w.r.t. x and every trainable adapter tensor (then cleared)."""
    y.backward(g)
    tensors = [x, *adapter.parameters()]
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def inputs(in_dim=64, out_dim=128, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, in_dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return x, torch.randn(2, 5, out_dim, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", list(FORMS))
def test_fused_equals_unfused_and_reference_in_float64(form, bias):
    model = tiny_dit(bias=bias)
    net, t = build(model, **FORMS[form])
    layer, adapter = t.layer, t.adapter
    assert adapter.w1_full == (form != "decompose_both") and (adapter.w2_form == "full") == (form == "full_w2")
    x, g = inputs()
    net.attach()
    y = layer(x)
    assert type(y.grad_fn).__name__ == FUSED
    fused = grads(y, g, x, adapter)
    net.detach()
    y_unfused = layer(x) + adapter(x)  # the plain forward after detach, plus the adapter's own term
    assert type(y_unfused.grad_fn).__name__ != FUSED
    unfused = grads(y_unfused, g, x, adapter)
    y_ref = reference(layer, adapter, x)
    want = grads(y_ref, g, x, adapter)
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(y, y_unfused, rtol=1e-10, atol=1e-10)
    assert len(fused) == 1 + len(adapter.factor_names)
    for a, b, c in zip(fused, unfused, want):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-10) and torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    assert (y - F.linear(x, layer.weight, layer.bias)).abs().max() > 1e-2  # the adapter term is there


def test_multiplier_and_scalar_are_folded_into_the_scale():
    net, t = build(tiny_dit(), network_dim=2, use_scalar=True)
    with torch.no_grad():
        t.adapter.scalar.fill_(0.6)
    net.set_multiplier(-0.7)
    x, g = inputs()
    net.attach()
    try:
        y = t.layer(x)
        assert type(y.grad_fn).__name__ == FUSED
        got = grads(y, g, x, t.adapter)
    finally:
        net.detach()
    y_ref = reference(t.layer, t.adapter, x)
    want = grads(y_ref, g, x, t.adapter)
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    assert len(got) == 2 + len(t.adapter.factor_names)  # the scalar gets its gradient too
    for a, c in zip(got, want):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-10)


class CastOnLinear(nn.Linear):  # like comfy.ops.manual_cast.Linear (the cast machinery is on)
    comfy_cast_weights = True
    weight_function: list = []
    bias_function: list = []


class CastOffLinear(nn.Linear):  # like comfy.ops.disable_weight_init.Linear with nothing to cast
    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []


def run_attached(net, layer, x, seed=5):
    net.attach()
    try:
        torch.manual_seed(seed)
        return layer(x)
    finally:
        net.detach()


def test_fallback_for_cast_layers_other_dtypes_and_patched_forwards():
    x, _ = inputs()
    net, t = build(tiny_dit(CastOnLinear), network_dim=2)
    y = run_attached(net, t.layer, x)
    assert type(y.grad_fn).__name__ == "AddBackward0"
    assert torch.allclose(y, reference(t.layer, t.adapter, x), rtol=1e-10, atol=1e-10)

    net, t = build(tiny_dit(CastOffLinear), network_dim=2)
    assert type(run_attached(net, t.layer, x).grad_fn).__name__ == FUSED
    t.layer.weight_function = [lambda w: w]  # ComfyUI's per-call weight patch: must go through the layer's forward
    try:
        assert type(run_attached(net, t.layer, x).grad_fn).__name__ == "AddBackward0"
    finally:
        del t.layer.weight_function

    net, t = build(tiny_dit(dtype=torch.float32), dtype=torch.float32, network_dim=2)
    with pytest.raises(RuntimeError, match="dtype"):  # float64 input, float32 weight: not cast, F.linear's error
        run_attached(net, t.layer, x)
    x32 = x.detach().float()
    assert type(run_attached(net, t.layer, x32).grad_fn).__name__ == FUSED

    net, t = build(tiny_dit(), network_dim=2)
    t.layer.forward = lambda inp: nn.Linear.forward(t.layer, inp) * 2.0  # patched before attach: kept
    y = run_attached(net, t.layer, x)
    assert type(y.grad_fn).__name__ == "AddBackward0"
    want = F.linear(x, t.layer.weight, t.layer.bias) * 2.0 + (reference(t.layer, t.adapter, x)
                                                               - F.linear(x, t.layer.weight, t.layer.bias))
    assert torch.allclose(y, want, rtol=1e-10, atol=1e-10)
    assert "forward" in t.layer.__dict__ and not hasattr(t.layer.forward, "adapter")


@pytest.mark.parametrize("option", ["module_dropout", "rank_dropout"])
def test_dropouts_fall_back_in_training_only(option):
    x, _ = inputs()
    net, t = build(tiny_dit(), network_dim=2, **{option: 0.5})
    y = run_attached(net, t.layer, x, seed=3)
    assert type(y.grad_fn).__name__ != FUSED
    torch.manual_seed(3)
    want = F.linear(x, t.layer.weight, t.layer.bias) + t.adapter(x)  # same draws, the adapter's own dropout
    assert torch.equal(y, want)
    net.eval()
    y = run_attached(net, t.layer, x)
    assert type(y.grad_fn).__name__ == FUSED
    assert torch.allclose(y, reference(t.layer, t.adapter, x), rtol=1e-10, atol=1e-10)


def test_dora_module_falls_back():
    layer = nn.Linear(64, 128, dtype=torch.float64)
    fresh = LoKr.for_layer(layer, 2, 1.0, dtype=torch.float64)
    params = {**fresh.file_state_dict(), "dora_scale": torch.rand(128, 1, dtype=torch.float64) + 0.5}
    adapter = LoKr.from_params(params, layer)
    x, _ = inputs()
    assert not adapter.fuses_linear() and fresh.fuses_linear()
    net = AdapterNetwork.from_file("anima", {"unet": tiny_dit()},
                                   {f"lora_unet_blocks_0_mlp_layer1.{k}": v for k, v in params.items()})
    t = net.targets[0]
    y = run_attached(net, t.layer, x)
    assert type(y.grad_fn).__name__ == "AddBackward0"
    want = F.linear(x, t.layer.weight, t.layer.bias) + t.adapter(x)
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)


def test_bf16_autocast():
    net, t = build(tiny_dit(dtype=torch.float32), dtype=torch.float32, network_dim=2)
    x, g = inputs(dtype=torch.float32)
    net.attach()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = t.layer(x)
        assert type(y.grad_fn).__name__ == FUSED and y.dtype == torch.bfloat16
        got = grads(y, g.bfloat16(), x, t.adapter)
    finally:
        net.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_unfused = t.layer(x) + t.adapter(x)
    assert y_unfused.dtype == torch.bfloat16
    y_ref = reference(t.layer, t.adapter, x)
    want = grads(y_ref, g.double(), x, t.adapter)
    err = (y.double() - y_ref).abs().max() / y_ref.abs().max()
    assert err < 2e-2 and (y_unfused.double() - y_ref).abs().max() / y_ref.abs().max() < 2e-2
    for a, c in zip(got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a.double() - c).norm() / c.norm() < 3e-2
