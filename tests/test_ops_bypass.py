"""Bypass products and HadaWeight: outputs and gradients equal the materialised path F.linear/F.conv2d(x, dW)."""

import pytest
import torch
import torch.nn.functional as F

from hadakron.ops import (
    Full, HadaWeight, LowRank, Tucker, hada_weight, hada_weight_tucker, loha_bypass, loha_bypass_mode,
    lokr_bypass_conv2d, lokr_bypass_linear,
)

from helpers import ref_tucker

D = torch.float64


def leaf(*shape, seed=[500]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]), dtype=D).requires_grad_()


def grads(y, tensors, seed=7):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return torch.autograd.grad(y, tensors, g, retain_graph=True)


def assert_same(y, y_ref, tensors):
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(y, tensors), grads(y_ref, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- LoKr linear ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w2_kind", ["full", "lowrank"])
@pytest.mark.parametrize("w1_kind", ["full", "lowrank"])
def test_lokr_bypass_linear_matches_materialised(w1_kind, w2_kind):
    a, c, b, d = 3, 4, 5, 6
    x = leaf(2, 3, c * d)
    if w1_kind == "full":
        w1t = [leaf(a, c)]
        w1, m1 = Full(w1t[0]), w1t[0]
    else:
        w1t = [leaf(a, 2), leaf(2, c)]
        w1, m1 = LowRank(*w1t), w1t[0] @ w1t[1]
    if w2_kind == "full":
        w2t = [leaf(b, d)]
        w2, m2 = Full(w2t[0]), w2t[0]
    else:
        w2t = [leaf(b, 2), leaf(2, d)]
        w2, m2 = LowRank(*w2t), w2t[0] @ w2t[1]
    y = lokr_bypass_linear(x, w1, w2, 0.75)
    y_ref = F.linear(x, torch.kron(m1, m2) * 0.75)
    assert y.shape == (2, 3, a * b)
    assert_same(y, y_ref, [x, *w1t, *w2t])


def test_lokr_bypass_linear_accepts_plain_tensors_and_a_tensor_scale():
    x, w1, w2 = leaf(4, 6), leaf(2, 2), leaf(3, 3)
    s = torch.tensor(0.5, dtype=D, requires_grad=True)
    y = lokr_bypass_linear(x, w1, w2, s)
    assert_same(y, F.linear(x, torch.kron(w1, w2) * s), [x, w1, w2, s])


# ---- LoKr conv --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["full", "flat", "tucker", "lycoris4d_b", "1x1_2d"])
@pytest.mark.parametrize("conv_args", [dict(), dict(stride=2, padding=1), dict(stride=1, padding=2, dilation=2)])
def test_lokr_bypass_conv2d_matches_materialised(kind, conv_args):
    a, c, b, d, r = 2, 3, 4, 2, 2
    x = leaf(2, c * d, 7, 6)
    w1 = leaf(a, c)
    if kind == "full":
        t = [leaf(b, d, 3, 3)]
        f2, m2 = Full(t[0]), t[0]
    elif kind == "flat":
        t = [leaf(b, r), leaf(r, d * 9)]
        f2, m2 = LowRank(*t), (t[0] @ t[1]).reshape(b, d, 3, 3)
    elif kind == "lycoris4d_b":
        t = [leaf(b, r), leaf(r, d, 3, 3)]
        f2, m2 = LowRank(*t), (t[0] @ t[1].reshape(r, -1)).reshape(b, d, 3, 3)
    elif kind == "tucker":
        t = [leaf(r, r, 3, 3), leaf(r, b), leaf(r, d)]
        f2, m2 = Tucker(*t), ref_tucker(*t)
    else:
        t = [leaf(b, d)]
        f2, m2 = Full(t[0]), t[0][:, :, None, None]
    y = lokr_bypass_conv2d(x, Full(w1), f2, 1.25, **conv_args)
    dw = torch.kron(w1[:, :, None, None], m2.contiguous()) * 1.25  # torch.kron needs contiguous input
    y_ref = F.conv2d(x, dw, None, **conv_args)
    assert_same(y, y_ref, [x, w1, *t])
    # W1 decomposed (decompose_both): same product through its two factors
    w1a, w1b = leaf(a, 1), leaf(1, c)
    y = lokr_bypass_conv2d(x, LowRank(w1a, w1b), f2, 1.25, **conv_args)
    y_ref = F.conv2d(x, torch.kron((w1a @ w1b)[:, :, None, None], m2.contiguous()) * 1.25, None, **conv_args)
    assert_same(y, y_ref, [x, w1a, w1b, *t])


def test_lokr_bypass_conv2d_needs_kernel_for_non_square_flat():
    x = leaf(1, 4, 5, 5)
    w2 = LowRank(leaf(2, 1), leaf(1, 2 * 6))  # d=2, kernel 2x3 cannot be guessed
    with pytest.raises(ValueError, match="kernel_size"):
        lokr_bypass_conv2d(x, Full(leaf(1, 2)), w2)
    y = lokr_bypass_conv2d(x, Full(leaf(1, 2)), w2, kernel_size=(2, 3))
    assert y.shape == (1, 2, 4, 3)


# ---- LoHa -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lowrank", "rebuild", "auto"])
def test_loha_bypass_linear_both_paths(mode):
    a1, b1, a2, b2 = leaf(9, 2), leaf(2, 7), leaf(9, 3), leaf(3, 7)
    x = leaf(5, 7)
    y = loha_bypass(x, LowRank(a1, b1), LowRank(a2, b2), 0.5, mode=mode)
    y_ref = F.linear(x, (a1 @ b1) * (a2 @ b2) * 0.5)
    assert_same(y, y_ref, [x, a1, b1, a2, b2])


@pytest.mark.parametrize("mode", ["lowrank", "rebuild"])
@pytest.mark.parametrize("tucker", [False, True])
def test_loha_bypass_conv_both_paths(mode, tucker):
    out_c, in_c, r = 5, 3, 2
    x = leaf(2, in_c, 6, 6)
    if tucker:
        t1, a1, b1, t2, a2, b2 = leaf(r, r, 3, 3), leaf(r, out_c), leaf(r, in_c), leaf(r, r, 3, 3), leaf(r, out_c), leaf(r, in_c)
        f1, f2 = Tucker(t1, a1, b1), Tucker(t2, a2, b2)
        dw = ref_tucker(t1, a1, b1) * ref_tucker(t2, a2, b2)
        params = [t1, a1, b1, t2, a2, b2]
    else:
        a1, b1, a2, b2 = leaf(out_c, r), leaf(r, in_c * 9), leaf(out_c, r), leaf(r, in_c * 9)
        f1, f2 = LowRank(a1, b1), LowRank(a2, b2)
        dw = ((a1 @ b1) * (a2 @ b2)).reshape(out_c, in_c, 3, 3)
        params = [a1, b1, a2, b2]
    y = loha_bypass(x, f1, f2, 2.0, stride=2, padding=1, mode=mode)
    y_ref = F.conv2d(x, dw * 2.0, None, stride=2, padding=1)
    assert_same(y, y_ref, [x, *params])


def test_loha_bypass_mode_decides_from_shapes_and_tokens():
    assert loha_bypass_mode(4096, 1280, 1280, 16, 16) == "lowrank"  # 256 * 2560 < 1280 * 1280
    assert loha_bypass_mode(4096, 1280, 1280, 32, 32) == "rebuild"  # 1024 * 2560 > 1280 * 1280
    assert loha_bypass_mode(1, 1280, 1280, 16, 16) == "lowrank"
    assert loha_bypass_mode(4096, 640, 640, 16, 32) == "rebuild"


# ---- HadaWeight ---------------------------------------------------------------------------------------------------
def test_hada_weight_gradcheck():
    a1, b1, a2, b2 = leaf(5, 2), leaf(2, 4), leaf(5, 3), leaf(3, 4)
    assert torch.autograd.gradcheck(lambda *t: HadaWeight.apply(*t, 0.7), (a1, b1, a2, b2))


def test_hada_weight_tucker_gradcheck():
    t = (leaf(2, 2, 3, 3), leaf(2, 4), leaf(2, 3), leaf(2, 2, 3, 3), leaf(2, 4), leaf(2, 3))
    assert torch.autograd.gradcheck(lambda *u: hada_weight_tucker(*u, 1.5), t)
    ref = ref_tucker(t[0], t[1], t[2]) * ref_tucker(t[3], t[4], t[5]) * 1.5
    torch.testing.assert_close(hada_weight_tucker(*t, 1.5), ref)


def test_hada_weight_chunked_backward_on_a_tall_matrix(monkeypatch):
    import hadakron.ops.rebuild as rebuild
    monkeypatch.setattr(rebuild, "HADA_CHUNK_ELEMENTS", 4096)  # 600 rows of 250 -> 38 chunks
    a1, b1, a2, b2 = leaf(600, 3), leaf(3, 250), leaf(600, 4), leaf(4, 250)
    y = hada_weight(a1, b1, a2, b2, 0.3)
    y_ref = (a1 @ b1) * (a2 @ b2) * 0.3
    assert_same(y, y_ref, [a1, b1, a2, b2])


def test_hada_weight_saves_only_the_factors():
    a1, b1, a2, b2 = leaf(64, 2), leaf(2, 48), leaf(64, 2), leaf(2, 48)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = HadaWeight.apply(a1, b1, a2, b2, 1.0)
    assert y.numel() == 64 * 48
    assert sum(saved) <= a1.numel() + b1.numel() + a2.numel() + b2.numel()


def test_lokr_bypass_gradcheck_linear_and_conv():
    x, w1, w2a, w2b = leaf(2, 6), leaf(2, 2), leaf(3, 1), leaf(1, 3)
    assert torch.autograd.gradcheck(lambda *t: lokr_bypass_linear(t[0], t[1], LowRank(t[2], t[3]), 0.5), (x, w1, w2a, w2b))
    xc, w1c, w2c = leaf(1, 4, 4, 4), leaf(2, 2), leaf(2, 2, 3, 3)
    assert torch.autograd.gradcheck(lambda *t: lokr_bypass_conv2d(t[0], t[1], t[2], 0.5, padding=1), (xc, w1c, w2c))


# ---- dtypes -------------------------------------------------------------------------------------------------------
def test_bypass_runs_in_the_input_dtype():
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    w1, w2 = torch.randn(2, 3), torch.randn(4, 4)
    y = lokr_bypass_linear(x, w1, w2, 1.0)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.to(D), torch.kron(w1.to(torch.bfloat16).to(D), w2.to(torch.bfloat16).to(D)))
    torch.testing.assert_close(y.to(D), ref, rtol=2e-2, atol=5e-2)


# ---- fused frozen Linear + LoKr --------------------------------------------------------------------------------------
@pytest.mark.parametrize("w2_kind", ["full", "lowrank", "tucker"])
def test_lokr_linear_fused_matches_linear_plus_materialised(w2_kind):
    from hadakron.ops import lokr_linear
    a, c, b, d = 3, 4, 5, 6
    x = leaf(2, 3, c * d)
    weight, bias = leaf(a * b, c * d), leaf(a * b)
    w1 = leaf(a, c)
    if w2_kind == "full":
        t = [leaf(b, d)]
        f2, m2 = Full(t[0]), t[0]
    elif w2_kind == "lowrank":
        t = [leaf(b, 2), leaf(2, d)]
        f2, m2 = LowRank(*t), t[0] @ t[1]
    else:
        t = [leaf(2, 3), leaf(2, b), leaf(3, d)]  # a core without kernel axes
        f2, m2 = Tucker(*t), torch.einsum("ij,ip,jq->pq", t[0], t[1], t[2])
    y = lokr_linear(x, weight, bias, Full(w1), f2, 0.5)
    y_ref = F.linear(x, weight, bias) + F.linear(x, torch.kron(w1, m2) * 0.5)
    assert_same(y, y_ref, [x, weight, bias, w1, *t])


def test_lokr_linear_gradcheck_with_frozen_weight():
    from hadakron.ops import lokr_linear
    x, w1, w2a, w2b = leaf(3, 6), leaf(2, 2), leaf(3, 1), leaf(1, 3)
    weight = torch.randn(6, 6, dtype=D)
    assert torch.autograd.gradcheck(
        lambda *t: lokr_linear(t[0], weight, None, t[1], LowRank(t[2], t[3]), 0.5), (x, w1, w2a, w2b))
