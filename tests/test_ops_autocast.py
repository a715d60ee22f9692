"""`ops.lokr_linear` / `lokr_bypass_linear` under `torch.autocast` with float32 inputs, forward and backward.

Autocast does not cast an autograd Function's inputs (nor the in-place addmm_ inside it), so the ops cast them
themselves, as autocast casts F.linear. Checked against the unfused float64 formula (F.linear with
W + s * kron(W1, W2), differentiated by autograd) for bf16 and fp16 autocast and for no autocast.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from hadakron import ops
from hadakron.ops.autocast import autocast_dtype, autocast_input

from helpers import one_thread  # noqa: F401  (autouse fixture)

# W1 (8, 8) x W2 (16, 8): x (2, 5, 64) -> (2, 5, 128)
FORMS = ("full_full", "full_lowrank", "lowrank_lowrank")
# (autocast dtype or None, max relative error of the output, of each gradient's norm)
PRECISIONS = {"bf16": (torch.bfloat16, 2e-2, 3e-2), "fp16": (torch.float16, 3e-3, 4e-3), "none": (None, 1e-5, 1e-5)}


def factors(form: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """float32 leaf factors (requires_grad) of one LoKr form."""
    shapes = {"full_full": {"w1": (8, 8), "w2": (16, 8)},
              "full_lowrank": {"w1": (8, 8), "w2_a": (16, 3), "w2_b": (3, 8)},
              "lowrank_lowrank": {"w1_a": (8, 2), "w1_b": (2, 8), "w2_a": (16, 3), "w2_b": (3, 8)}}[form]
    return {n: (torch.randn(s, generator=gen, dtype=torch.float64) * 0.4).float().requires_grad_()
            for n, s in shapes.items()}


def op_args(f: dict[str, torch.Tensor]):
    """(w1, w2) in the forms the ops take: a tensor (Full) or a pair (LowRank)."""
    w1 = f["w1"] if "w1" in f else (f["w1_a"], f["w1_b"])
    w2 = f["w2"] if "w2" in f else (f["w2_a"], f["w2_b"])
    return w1, w2


def kron64(f: dict[str, torch.Tensor]) -> torch.Tensor:
    d = {n: t.double() for n, t in f.items()}
    w1 = d["w1"] if "w1" in d else d["w1_a"] @ d["w1_b"]
    w2 = d["w2"] if "w2" in d else d["w2_a"] @ d["w2_b"]
    return torch.kron(w1, w2)


def grads_of(y: torch.Tensor, g: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    out = torch.autograd.grad(y, leaves, g.to(y.dtype))
    return list(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm())


def autocast_or_not(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_weight", [True, False], ids=["lokr_linear", "lokr_bypass_linear"])
def test_float32_inputs_under_autocast_match_float64_reference(form, precision, with_weight):
    dtype, tol_y, tol_g = PRECISIONS[precision]
    gen = torch.Generator().manual_seed(3)
    f = factors(form, gen)
    x = torch.randn(2, 5, 64, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(128, 64, generator=gen, dtype=torch.float64).float() * 0.2
    bias = torch.randn(128, generator=gen, dtype=torch.float64).float()
    g = torch.randn(2, 5, 128, generator=gen, dtype=torch.float64)
    scale = 0.75
    w1, w2 = op_args(f)
    with autocast_or_not(dtype):
        if with_weight:
            y = ops.lokr_linear(x, weight, bias, w1, w2, scale)
        else:
            y = ops.lokr_bypass_linear(x, w1, w2, scale)
    assert y.dtype == (dtype or torch.float32)
    leaves = [x, *f.values()]
    got = grads_of(y, g, leaves)

    x64 = x.detach().double().requires_grad_()
    f64 = {n: t.detach().double().requires_grad_() for n, t in f.items()}
    dw = kron64(f64) * scale
    y_ref = F.linear(x64, weight.double() + dw, bias.double()) if with_weight else F.linear(x64, dw)
    want = grads_of(y_ref, g, [x64, *f64.values()])

    assert rel(y, y_ref) < tol_y
    assert len(got) == len(want) == 1 + len(f)
    for leaf, a, b in zip(leaves, got, want):
        assert a.dtype == leaf.dtype == torch.float32  # gradients flow back through the casts to the leaves
        assert rel(a, b) < tol_g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_result_is_the_op_on_inputs_cast_as_autocast_casts(dtype):
    """Under autocast the op equals itself run on x, weight, bias, factors pre-cast to the autocast dtype."""
    gen = torch.Generator().manual_seed(4)
    f = factors("lowrank_lowrank", gen)
    x = torch.randn(3, 64, generator=gen)
    weight, bias = torch.randn(128, 64, generator=gen), torch.randn(128, generator=gen)
    w1, w2 = op_args(f)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=dtype):
            y = ops.lokr_linear(x, weight, bias, w1, w2, torch.tensor([0.5]))
        cast = lambda t: t.to(dtype)  # noqa: E731
        y_cast = ops.lokr_linear(cast(x), cast(weight), cast(bias), tuple(map(cast, w1)), tuple(map(cast, w2)),
                                 torch.tensor([0.5], dtype=dtype))
    assert y.dtype == dtype and torch.equal(y, y_cast)


def test_autocast_input_follows_autocast_rules():
    x32 = torch.ones(2, 3)
    assert autocast_dtype("cpu") is None and autocast_input(x32) is x32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        assert autocast_input(x32).dtype == torch.bfloat16
        x64 = x32.double()
        assert autocast_input(x64) is x64  # autocast leaves float64 alone
        xi = torch.ones(2, dtype=torch.int64)
        assert autocast_input(xi) is xi
