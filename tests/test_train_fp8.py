"""Training on a float8 base (ComfyUI's UNETLoader `weight_dtype` fp8_e4m3fn / fp8_e5m2): the bypass upcasts each
layer's weight per call (forward and backward), the weights stay float8 and unchanged, and the run equals training
on a float32 copy of the same float8 values.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hadakron import ops
from hadakron.network import AdapterNetwork, NetworkConfig
from hadakron.train import LatentDataset, Sample, TrainConfig, train

from helpers import one_thread  # noqa: F401 (autouse fixture)
from models import SDXLConfig, SDXLUNet

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
CONFIG = SDXLConfig(transformer_depth=(0, 1, 1), middle_depth=1)


class FixedNoiseObjective:
    """eps objective with the same noise and timestep every step: the loss of a learning run falls step by step."""

    def __init__(self) -> None:
        self.fixed = None

    def sample(self, x0, generator):
        if self.fixed is None:
            g = torch.Generator().manual_seed(0)
            self.fixed = (torch.randn(x0.shape, generator=g), torch.rand(x0.shape[0], generator=g) * 999)
        noise, t = self.fixed
        return Sample(x0 + noise, t, noise)

    def loss(self, pred, target, t):
        return F.mse_loss(pred, target)


def _model():
    """(unet, network): a tiny SDXL UNet (float32) and LoKr adapters on its default targets, 3x3 convs included."""
    torch.manual_seed(0)
    unet = SDXLUNet(CONFIG).requires_grad_(False)
    net = AdapterNetwork.build("sdxl", {"unet": unet}, NetworkConfig(algo="lokr", network_dim=4, conv_dim=2, factor=4),
                               seed=3)
    return unet, net


def _store(unet, net, dtype: torch.dtype, *, upcast: bool) -> None:
    """Store every adapted layer's weight and bias as `dtype` (float8), or as float32 copies of those float8 values."""
    for t in net.targets:
        for name in ("weight", "bias"):
            p = getattr(t.layer, name)
            if p is not None:
                q = p.detach().to(dtype)
                setattr(t.layer, name, nn.Parameter(q.float() if upcast else q, requires_grad=False))


def _run(fp8: torch.dtype, *, upcast: bool, steps: int = 6, dtype: str = "fp32"):
    unet, net = _model()
    _store(unet, net, fp8, upcast=upcast)
    stored = {t.key: (t.layer.weight.detach().clone(), t.layer.weight.dtype) for t in net.targets}
    x, ts, ctx, y = unet.example_inputs(batch=1, size=8)
    data = LatentDataset(x, list(range(1)))
    config = TrainConfig(steps=steps, batch_size=1, learning_rate=1e-2, optimizer="AdamW", seed=1, dtype=dtype)
    net.attach()
    try:
        result = train(net, lambda noisy, t, batch: unet(noisy, t, ctx, y), data, FixedNoiseObjective(), config)
    finally:
        net.detach()
    return unet, net, result, stored


@pytest.mark.parametrize("fp8", FP8, ids=lambda d: str(d).split(".")[-1])
def test_adapter_trains_on_float8_base_which_stays_float8_and_unchanged(fp8):
    unet, net, result, stored = _run(fp8, upcast=False)
    losses = result.losses
    assert result.stop_reason == "completed" and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert any(t.layer.weight.dtype == fp8 for t in net.targets)
    for t in net.targets:
        before, dtype = stored[t.key]
        assert t.layer.weight.dtype == dtype == fp8 and t.layer.weight.grad is None
        assert torch.equal(t.layer.weight.view(torch.uint8), before.view(torch.uint8)), t.key
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("fp8", FP8, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_float8_run_equals_run_on_its_float32_upcast(fp8, dtype):
    _, net8, r8, _ = _run(fp8, upcast=False, dtype=dtype)
    _, net32, r32, _ = _run(fp8, upcast=True, dtype=dtype)
    tol = dict(rel=1e-5) if dtype == "fp32" else dict(rel=1e-2)
    assert r8.losses == pytest.approx(r32.losses, **tol)
    for (name, a), b in zip(net8.named_parameters(), net32.parameters()):
        a, b = a.detach(), b.detach()
        scale = float(b.abs().max()) + 1e-12
        assert float((a - b).abs().max()) <= (1e-5 if dtype == "fp32" else 2e-2) * scale, name


def _saved_tensors(fn, *args):
    """(shape, dtype) of every tensor autograd keeps for backward while `fn(*args)` runs."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_backward_keeps_only_the_float8_weight(kind):
    """No upcast copy of the weight is held between forward and backward (that is the memory a float8 base saves)."""
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(16, 24)
        x = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    else:
        layer = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        x = torch.randn(2, 8, 9, 9, generator=g, requires_grad=True)
    layer.requires_grad_(False)
    w8 = layer.weight.detach().to(torch.float8_e4m3fn)
    ref = copy.deepcopy(layer)
    ref.weight = nn.Parameter(w8.float(), requires_grad=False)
    layer.weight = nn.Parameter(w8, requires_grad=False)
    if kind == "linear":
        op = lambda x: ops.frozen_linear(x, layer.weight, layer.bias)  # noqa: E731
    else:
        op = lambda x: ops.frozen_conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding,  # noqa: E731
                                         layer.dilation, layer.groups)
    out, saved = _saved_tensors(op, x)
    assert (tuple(w8.shape), torch.float32) not in saved and (tuple(w8.shape), torch.float8_e4m3fn) in saved
    grad = torch.randn(out.shape, generator=g)
    (gx,) = torch.autograd.grad(out, x, grad)
    expected = ref(x)
    (gx_ref,) = torch.autograd.grad(expected, x, grad)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(gx, gx_ref, atol=1e-5)


def test_frozen_ops_refuse_a_trainable_weight():
    w = nn.Parameter(torch.zeros(3, 4).to(torch.float8_e4m3fn), requires_grad=False)
    w.requires_grad_(False)
    trainable = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="requires_grad=False"):
        ops.frozen_linear(torch.zeros(1, 4), trainable)
    assert ops.frozen_linear(torch.ones(1, 4), w).shape == (1, 3)
