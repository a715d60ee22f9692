"""The fused LoKr path on a ComfyUI-style cast Linear does the per-op work the layer's own forward does.

ComfyUI's cast ops call the module-level `run_every_op()` (the interrupt check behind Cancel) at the start of every
forward. Without ComfyUI, a stand-in `comfy.ops` module is built here (a module object named "comfy.ops", never put
in sys.modules) with the same shape of forward: the hook first, the cast path when weights need casting, else
nn.Linear's forward via super(). Which path ran is read from the output's grad_fn.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hadakron.network import AdapterNetwork, NetworkConfig

from helpers import one_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:.*selected layers are not in the given module")

FUSED = "KronLinearBackward"

# A stand-in for comfy/ops.py's cast Linear, written for this test: same names, same order of work per call.
STAND_IN_OPS = '''
import torch

class Interrupted(Exception):
    pass

state = {"calls": 0, "interrupt": False}

def run_every_op():
    state["calls"] += 1
    if state["interrupt"]:
        state["interrupt"] = False
        raise Interrupted()

def count_cast(module):
    state["casts"] = state.get("casts", 0) + 1

class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []

class Linear(torch.nn.Linear, CastWeightBiasOp):
    def forward_comfy_cast_weights(self, input):
        count_cast(self)
        return torch.nn.functional.linear(input, self.weight.to(input.dtype), self.bias.to(input.dtype))

    def forward(self, *args, **kwargs):
        run_every_op()
        if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)

class ManualCastLinear(Linear):
    comfy_cast_weights = True

class NoisyLinear(torch.nn.Linear, CastWeightBiasOp):
    def forward(self, *args, **kwargs):  # does more per op than the fused path knows how to repeat
        run_every_op()
        count_cast(self)
        return super().forward(*args, **kwargs)

class OtherLinear(torch.nn.Linear):  # another backend's Linear with its own kernel
    def forward(self, input):
        count_cast(self)
        return torch.nn.functional.linear(input, self.weight, self.bias)

class OtherBackendLinear(OtherLinear, Linear):  # like cublas_ops.Linear: super() reaches another forward
    def forward(self, *args, **kwargs):
        run_every_op()
        if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)
'''


@pytest.fixture()
def comfy_ops() -> types.ModuleType:
    """A fresh stand-in `comfy.ops` module (its forwards report `__module__ == "comfy.ops"`)."""
    mod = types.ModuleType("comfy.ops")
    exec(compile(STAND_IN_OPS, "<stand-in comfy.ops>", "exec"), mod.__dict__)
    return mod


def tiny_dit(linear_cls) -> nn.Module:
    """One Anima-named Linear, blocks.0.mlp.layer1 (64 -> 128), of the given class, float64, frozen."""
    root, block = nn.Module(), nn.Module()
    block.mlp = nn.Module()
    block.mlp.layer1 = linear_cls(64, 128, bias=True, dtype=torch.float64)
    root.blocks = nn.ModuleList([block])
    root.requires_grad_(False)
    return root


def attached(linear_cls):
    """(network attached, its one target) with random LoKr factors (W1 8x8 full, W2 16x8 rank 2)."""
    net = AdapterNetwork.build("anima", {"unet": tiny_dit(linear_cls)},
                               NetworkConfig(algo="lokr", network_dim=2, network_alpha=1.5), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return net.attach(), net.targets[0]


def reference(layer, adapter, x):
    """F.linear(x, W + s * kron(W1, W2), b) in float64 (s = alpha / rank of W2)."""
    w1 = adapter.lokr_w1.double()
    w2 = adapter.lokr_w2_a.double() @ adapter.lokr_w2_b.double()
    dw = torch.kron(w1, w2) * (float(adapter.alpha) / adapter.lokr_w2_b.shape[0])
    return F.linear(x, layer.weight.double() + dw, layer.bias.double())


def x_in() -> torch.Tensor:
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_fused_path_calls_run_every_op_once_per_call(comfy_ops):
    net, t = attached(comfy_ops.Linear)
    try:
        x = x_in().requires_grad_()
        y = t.layer(x)
        assert type(y.grad_fn).__name__ == FUSED
        assert comfy_ops.state["calls"] == 1
        assert torch.allclose(y, reference(t.layer, t.adapter, x), rtol=1e-10, atol=1e-10)
        t.layer(x)
        t.layer(x)
        assert comfy_ops.state["calls"] == 3
    finally:
        net.detach()


def test_cancel_is_seen_in_the_fused_op(comfy_ops):
    net, t = attached(comfy_ops.Linear)
    try:
        comfy_ops.state["interrupt"] = True
        with pytest.raises(comfy_ops.Interrupted):
            t.layer(x_in())
        assert type(t.layer(x_in()).grad_fn).__name__ == FUSED  # the flag is consumed, as ComfyUI's is
    finally:
        net.detach()


def test_hook_is_looked_up_on_every_call(comfy_ops):
    """A later patch of comfy.ops.run_every_op reaches the fused path, as it reaches the layer's own forward."""
    net, t = attached(comfy_ops.Linear)
    seen = []
    try:
        comfy_ops.run_every_op = lambda: seen.append("patched")
        t.layer(x_in())
        assert seen == ["patched"] and comfy_ops.state["calls"] == 0
    finally:
        net.detach()


def test_cast_path_runs_the_layers_forward_and_its_hook_once(comfy_ops):
    net, t = attached(comfy_ops.ManualCastLinear)
    try:
        x = x_in()
        y = t.layer(x)
        assert type(y.grad_fn).__name__ != FUSED
        assert comfy_ops.state["calls"] == 1 and comfy_ops.state["casts"] == 1
        assert torch.allclose(y, reference(t.layer, t.adapter, x), rtol=1e-10, atol=1e-10)
    finally:
        net.detach()


@pytest.mark.parametrize("cls_name", ["NoisyLinear", "OtherBackendLinear"])
def test_comfy_forwards_doing_other_work_are_not_fused(comfy_ops, cls_name):
    net, t = attached(getattr(comfy_ops, cls_name))
    try:
        x = x_in()
        y = t.layer(x)
        assert type(y.grad_fn).__name__ != FUSED
        assert comfy_ops.state["calls"] == 1 and comfy_ops.state["casts"] == 1  # the layer's own work, once
        assert torch.allclose(y, reference(t.layer, t.adapter, x), rtol=1e-10, atol=1e-10)
    finally:
        net.detach()


def test_plain_linear_has_no_hook(comfy_ops):
    net, t = attached(nn.Linear)
    try:
        assert type(t.layer(x_in()).grad_fn).__name__ == FUSED and comfy_ops.state["calls"] == 0
    finally:
        net.detach()
