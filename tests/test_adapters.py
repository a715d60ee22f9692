"""hadakron.adapters: LoHa / LoKr training modules against float64 references written here.

The references below are the plain formulas (sd-scripts / LyCORIS / ComfyUI definitions), written
independently of hadakron.ops: Hadamard of two low-rank products, Tucker rebuild by einsum, Kronecker
product by explicit index broadcasting, then F.linear / F.conv2d with the layer's own arguments.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hadakron import ops
from hadakron.adapters import AdapterModule, LoHa, LoKr
from helpers import ref_tucker

F64 = torch.float64


# ----------------------------------------------------------------------------- references
def ref_kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron of w1 (a, c) with w2 (b, d, *k): out[i*b + j, l*d + m, ...] = w1[i, l] w2[j, m, ...]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    k = tuple(w2.shape[2:])
    prod = w1[:, None, :, None].reshape(a, 1, c, 1, *([1] * len(k))) * w2[None, :, None].reshape(1, b, 1, d, *k)
    return prod.reshape(a * b, c * d, *k)


def ref_scale(alpha: float | None, rank: int | None) -> float:
    return 1.0 if alpha is None or rank is None else alpha / rank


def ref_loha_dw(p: dict, weight_shape: tuple, alpha: float | None) -> torch.Tensor:
    p = {k: v.detach().to(F64) for k, v in p.items()}
    s = ref_scale(alpha, p["hada_w1_b"].shape[0])
    if "hada_t1" in p:
        w1 = ref_tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        w2 = ref_tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    else:
        w1 = p["hada_w1_a"] @ p["hada_w1_b"]
        w2 = p["hada_w2_a"] @ p["hada_w2_b"]
    return (w1 * w2 * s).reshape(weight_shape)


def ref_lokr_dw(p: dict, weight_shape: tuple, alpha: float | None) -> torch.Tensor:
    p = {k: v.detach().to(F64) for k, v in p.items()}
    rank = None
    if "lokr_w1" in p:
        w1 = p["lokr_w1"]
    else:
        w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
        rank = p["lokr_w1_b"].shape[0]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
        if w2.dim() == 4 and len(weight_shape) == 2:
            w2 = w2[:, :, 0, 0]
    elif "lokr_t2" in p:
        w2 = ref_tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        rank = p["lokr_t2"].shape[0]
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        rank = p["lokr_w2_b"].shape[0]
    if w2.dim() == 4 and w2.shape[2:] == (1, 1) and len(weight_shape) == 4 and weight_shape[2:] == (1, 1):
        w2 = w2[:, :, 0, 0]
    return (ref_kron(w1, w2) * ref_scale(alpha, rank)).reshape(weight_shape)


def ref_dw(module: AdapterModule, params: dict | None = None) -> torch.Tensor:
    """Float64 reference dW of a module from its own factors (scalar applied as a plain multiply)."""
    params = module.factors() if params is None else params
    alpha = float(module.alpha)
    shape = module.spec.weight_shape
    dw = ref_loha_dw(params, shape, alpha) if module.algorithm == "loha" else ref_lokr_dw(params, shape, alpha)
    if module.algorithm == "lokr" and "lokr_w1" in params and "lokr_w2" in params:
        assert module.scale == 1.0
    if module.scalar is not None:
        dw = dw * float(module.scalar.detach())
    return dw


def layer_op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w)
    return F.conv2d(x, w.reshape(layer.weight.shape), None, layer.stride, layer.padding, layer.dilation, layer.groups)


def randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "scalar":
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * 0.5)


def input_for(layer: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 2, layer.in_features, generator=g, dtype=F64)
    return torch.randn(2, layer.in_channels, 7, 6, generator=g, dtype=F64)


# ----------------------------------------------------------------------------- cases
def lin(i=12, o=20):
    return nn.Linear(i, o)


def conv(i=8, o=12, k=3, **kw):
    return nn.Conv2d(i, o, k, **kw)


# (id, layer factory, class, kwargs for for_layer, expected tensor names)
CASES = [
    ("loha-linear", lambda: lin(), LoHa, dict(rank=3, alpha=2.0),
     {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("loha-conv1x1", lambda: conv(k=1), LoHa, dict(rank=3, alpha=1.5, use_tucker=True),
     {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("loha-conv3x3-flat", lambda: conv(padding=1), LoHa, dict(rank=2, alpha=3.0),
     {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("loha-conv3x3-tucker", lambda: conv(padding=1), LoHa, dict(rank=2, alpha=1.0, use_tucker=True),
     {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    ("loha-conv-stride2-pad", lambda: conv(k=3, stride=2, padding=2, dilation=2), LoHa, dict(rank=2, alpha=4.0),
     {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    ("loha-tucker-stride2", lambda: conv(k=(3, 2), stride=2, padding=1), LoHa,
     dict(rank=2, alpha=4.0, use_tucker=True),
     {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    # LoKr. Linear 64->96: factor -1 gives in (8, 8), out (8, 12); rank 2 < 12/2 -> low-rank W2.
    ("lokr-linear-lowrank", lambda: lin(64, 96), LoKr, dict(rank=2, alpha=3.0),
     {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr-linear-autofull", lambda: lin(64, 96), LoKr, dict(rank=8, alpha=3.0), {"lokr_w1", "lokr_w2"}),
    ("lokr-linear-full_matrix", lambda: lin(64, 96), LoKr, dict(rank=2, alpha=3.0, full_matrix=True),
     {"lokr_w1", "lokr_w2"}),
    # factor 4: in (4, 16), out (4, 24); rank 3 < 24/2 -> low rank
    ("lokr-linear-factor4", lambda: lin(64, 96), LoKr, dict(rank=3, alpha=2.0, factor=4),
     {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    # factor 8 with decompose_both: W1 (8, 8), rank 2 < 8/2 -> W1 low rank too
    ("lokr-linear-factor8-both", lambda: lin(64, 96), LoKr, dict(rank=2, alpha=5.0, factor=8, decompose_both=True),
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr-conv1x1-lowrank", lambda: conv(16, 24, 1), LoKr, dict(rank=1, alpha=2.0, factor=2),
     {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr-conv1x1-full", lambda: conv(16, 24, 1), LoKr, dict(rank=4, alpha=2.0), {"lokr_w1", "lokr_w2"}),
    ("lokr-conv3x3-flat", lambda: conv(16, 24, 3, padding=1), LoKr, dict(rank=2, alpha=2.0, factor=2),
     {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr-conv3x3-tucker", lambda: conv(16, 24, 3, padding=1), LoKr, dict(rank=2, alpha=2.0, factor=2, use_tucker=True),
     {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr-conv3x3-full", lambda: conv(16, 24, 3, padding=1), LoKr, dict(rank=4, alpha=2.0, use_tucker=True),
     {"lokr_w1", "lokr_w2"}),
    ("lokr-conv-stride2-pad", lambda: conv(16, 24, 3, stride=2, padding=2, dilation=2), LoKr,
     dict(rank=2, alpha=2.0, factor=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("lokr-tucker-stride2-both", lambda: conv(32, 48, 3, stride=2, padding=1), LoKr,
     dict(rank=1, alpha=2.0, factor=4, use_tucker=True, decompose_both=True),
     {"lokr_w1_a", "lokr_w1_b", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
]
IDS = [c[0] for c in CASES]


def build(case, **extra):
    _, make_layer, cls, kwargs, _ = case
    torch.manual_seed(0)
    layer = make_layer().double()
    kwargs = dict(kwargs)
    rank = kwargs.pop("rank")
    alpha = kwargs.pop("alpha")
    module = cls.for_layer(layer, rank, alpha, **kwargs, **extra)
    return layer, module


# ----------------------------------------------------------------------------- init
@pytest.mark.parametrize("use_scalar", [False, True])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_init_shapes_and_exact_zero_delta(case, use_scalar, caplog):
    layer, module = build(case, use_scalar=use_scalar)
    assert set(module.factor_names) == case[4]
    assert set(module.file_state_dict()) == case[4] | {"alpha"}
    # the base layer never shows up in the adapter's parameters or state
    names = {n for n, _ in module.named_parameters()}
    assert names == case[4] | ({"scalar"} if use_scalar else set())
    assert set(module.state_dict()) == names | {"alpha"}
    assert all(p.dtype == torch.float32 for p in module.parameters())
    dw = module.delta_weight()
    assert dw.shape == layer.weight.shape
    assert torch.equal(dw, torch.zeros_like(dw))
    x = input_for(layer).float()
    y = module(x)
    assert y.shape == layer.float()(x).shape
    assert torch.equal(y, torch.zeros_like(y))
    if use_scalar:  # the zero comes from the scalar; every factor is nonzero
        assert float(module.scalar.detach()) == 0.0
        assert all(bool(t.abs().sum() > 0) for t in module.factors().values())


def test_loha_init_distribution_follows_lycoris():
    torch.manual_seed(0)
    m = LoHa.for_layer(nn.Conv2d(64, 64, 3), 8, 4.0, use_tucker=True)
    assert torch.equal(m.hada_w2_a, torch.zeros_like(m.hada_w2_a))  # LyCORIS: w2_a = 0 (sd-scripts zeroes w1_a)
    assert abs(m.hada_w1_b.std().item() - 1.0) < 0.1
    assert abs(m.hada_w1_a.std().item() - 0.1) < 0.02
    assert abs(m.hada_t1.std().item() - 0.1) < 0.02
    lokr = LoKr.for_layer(nn.Linear(64, 96), 2, 1.0)
    state = lokr.state_dict()
    state["alpha"] = torch.tensor(3.0)
    lokr.load_state_dict(state)
    assert lokr.scale == 1.5  # the cached scale follows a loaded alpha
    assert torch.equal(lokr.lokr_w2_b, torch.zeros_like(lokr.lokr_w2_b))
    bound = 1.0 / 8 ** 0.5  # kaiming_uniform(a=sqrt 5) on (8, 8): bound = 1/sqrt(fan_in)
    top = float(lokr.lokr_w1.detach().abs().max())
    assert 0.5 * bound < top <= bound


def test_alpha_defaults_and_scale_rules():
    assert float(LoHa.for_layer(lin(), 4, None).alpha) == 4.0
    assert float(LoHa.for_layer(lin(), 4, 0).alpha) == 4.0
    assert LoHa.for_layer(lin(), 4, 2.0).scale == 0.5
    assert LoKr.for_layer(lin(64, 96), 2, 1.0).scale == 0.5
    both_full = LoKr.for_layer(lin(64, 96), 2, 1.0, full_matrix=True)
    assert float(both_full.alpha) == 2.0 and both_full.scale == 1.0
    # W1 low rank with W2 full (only from files, e.g. unbalanced factorization): alpha / rank of w1, as ComfyUI
    w1_low = AdapterModule.from_params({"lokr_w1_a": torch.ones(16, 3), "lokr_w1_b": torch.ones(3, 8),
                                        "lokr_w2": torch.ones(6, 8), "alpha": torch.tensor(1.5)}, lin(64, 96))
    assert w1_low.w2_form == "full" and not w1_low.w1_full and w1_low.scale == 0.5 and w1_low.rank == 3
    assert w1_low.factor is None  # 16 rows in W1 > 6 in W2: no factor argument gives that split
    torch.testing.assert_close(w1_low.delta_weight(), torch.full((96, 64), 3 * 0.5))


# ----------------------------------------------------------------------------- forward and gradients
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_delta_match_float64_reference(case):
    layer, module = build(case)
    module.double()
    randomize(module)
    x = input_for(layer)
    ref = ref_dw(module)
    torch.testing.assert_close(module.delta_weight(), ref, rtol=1e-10, atol=1e-12)
    y = module(x)
    torch.testing.assert_close(y, layer_op(layer, x, ref), rtol=1e-10, atol=1e-11)
    module.multiplier = -0.75
    torch.testing.assert_close(module(x), -0.75 * layer_op(layer, x, ref), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_equal_materialised_path(case):
    layer, module = build(case, use_scalar=True)
    module.double()
    randomize(module, seed=3)
    with torch.no_grad():
        module.scalar.fill_(0.8)
    x = input_for(layer).requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    y = module(x)
    upstream = torch.randn(y.shape, generator=g, dtype=F64)
    (y * upstream).sum().backward()
    got = {n: p.grad.clone() for n, p in module.named_parameters()}
    got_x = x.grad.clone()

    # the plain path: leaf copies, dW by the reference formula, layer op
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    x2 = x.detach().clone().requires_grad_(True)
    factors = {n: t for n, t in leaves.items() if n != "scalar"}
    dw = _live_ref(module, factors) * leaves["scalar"]
    (layer_op(layer, x2, dw) * upstream).sum().backward()
    torch.testing.assert_close(got_x, x2.grad, rtol=1e-9, atol=1e-10)
    for n in got:
        torch.testing.assert_close(got[n], leaves[n].grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{n}: {m}")


def _live_ref(module: AdapterModule, p: dict) -> torch.Tensor:
    """The reference formulas again, on tensors that keep their autograd graph."""
    alpha = float(module.alpha)
    shape = module.spec.weight_shape
    if module.algorithm == "loha":
        if "hada_t1" in p:
            w = ref_tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * ref_tucker(
                p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            w = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        return (w * alpha / p["hada_w1_b"].shape[0]).reshape(shape)
    rank = None
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w1" not in p:
        rank = p["lokr_w1_b"].shape[0]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2, rank = ref_tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]), p["lokr_t2"].shape[0]
    else:
        w2, rank = p["lokr_w2_a"] @ p["lokr_w2_b"], p["lokr_w2_b"].shape[0]
    return (ref_kron(w1, w2) * ref_scale(alpha, rank)).reshape(shape)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_layer_subclass_and_padding_variants():
    class CastLinear(nn.Linear):  # like comfy.ops' manual_cast.Linear
        pass

    layer = CastLinear(12, 20).double()
    m = LoHa.for_layer(layer, 2, 1.0).double()
    randomize(m)
    x = input_for(layer)
    torch.testing.assert_close(m(x), F.linear(x, ref_dw(m)), rtol=1e-10, atol=1e-12)

    for make in (lambda: nn.Conv2d(6, 8, 3, padding="same"), lambda: nn.Conv2d(6, 8, 4, padding="same"),
                 lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
                 lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2)):
        layer = make().double()
        for module in (LoHa.for_layer(layer, 2, 1.0), LoKr.for_layer(layer, 1, 1.0, factor=2)):
            module.double()
            randomize(module)
            x = input_for(layer)
            ref = layer._conv_forward(x, ref_dw(module), None)  # torch's own padding handling
            torch.testing.assert_close(module(x), ref, rtol=1e-10, atol=1e-11)
    with pytest.raises(TypeError, match="Linear and nn.Conv2d"):
        LoHa.for_layer(nn.Conv1d(4, 4, 3), 2, 1.0)


# ----------------------------------------------------------------------------- dropouts
def test_rank_dropout_masks_output_rows_with_rescale():
    torch.manual_seed(0)
    layer = nn.Linear(16, 400).double()
    m = LoHa.for_layer(layer, 2, 1.0, rank_dropout=0.25).double()
    randomize(m)
    x = input_for(layer)
    m.eval()
    full = m(x)
    assert torch.equal(full, m(x))  # eval: no dropout
    m.train()
    kept_fraction = []
    for _ in range(20):
        y = m(x)
        ratio = (y / full).reshape(-1, 400)
        # every output feature is either dropped (0) or kept and rescaled by 1/(1-p) for the whole batch
        kept = ratio[0] != 0
        torch.testing.assert_close(ratio[:, kept], torch.full_like(ratio[:, kept], 1 / 0.75))
        assert torch.equal(ratio[:, ~kept], torch.zeros_like(ratio[:, ~kept]))
        kept_fraction.append(kept.double().mean().item())
    mean_kept = sum(kept_fraction) / len(kept_fraction)
    assert abs(mean_kept - 0.75) < 0.03  # 8000 Bernoulli draws: sd ~0.005

    conv_layer = nn.Conv2d(4, 300, 3, padding=1).double()
    c = LoKr.for_layer(conv_layer, 1, 1.0, factor=2, rank_dropout=0.5).double()
    randomize(c)
    xc = input_for(conv_layer)
    c.eval()
    ref = c(xc)
    c.train()
    yc = c(xc)
    dropped = yc.abs().sum(dim=(0, 2, 3)) == 0
    assert 0.35 < dropped.double().mean().item() < 0.65
    torch.testing.assert_close(yc[:, ~dropped], 2.0 * ref[:, ~dropped])


def test_module_dropout_skips_whole_calls_in_training_only():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    m = LoKr.for_layer(layer, 1, 1.0, module_dropout=0.3).double()
    randomize(m)
    x = input_for(layer)
    m.eval()
    full = m(x)
    assert all(torch.equal(m(x), full) for _ in range(20))
    m.train()
    skipped = 0
    for _ in range(400):
        y = m(x)
        if torch.equal(y, torch.zeros_like(full)):
            skipped += 1
        else:
            assert torch.equal(y, full)
    assert 0.23 < skipped / 400 < 0.37  # binomial sd ~0.023
    always = LoKr.for_layer(nn.Conv2d(4, 6, 3, stride=2), 1, 1.0, module_dropout=1.0).double()
    randomize(always)
    xc = input_for(nn.Conv2d(4, 6, 3))
    y = always(xc)
    assert y.shape == nn.Conv2d(4, 6, 3, stride=2).double()(xc).shape and not y.any()
    with pytest.raises(ValueError, match="rank_dropout"):
        LoHa.for_layer(layer, 1, 1.0, rank_dropout=1.0)


# ----------------------------------------------------------------------------- LoKr forms
def test_auto_full_matrix_warns_with_shape_and_scale_one(caplog):
    layer = nn.Linear(64, 96)  # W2 8x12 with factor -1: full when rank >= 6
    with caplog.at_level(logging.WARNING, logger="hadakron.adapters"):
        m = LoKr.for_layer(layer, 6, 3.0)
    assert m.w2_form == "full" and m.w1_full
    assert m.scale == 1.0 and float(m.alpha) == 6.0 and m.rank == 6
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "96x64" in msgs[0] and "full matrix" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hadakron.adapters"):
        m = LoKr.for_layer(layer, 5, 3.0)  # 5 < 12/2: low rank, no warning
        LoKr.for_layer(layer, 5, 3.0, full_matrix=True)  # asked for: no warning
    assert m.w2_form == "low_rank" and m.scale == 3.0 / 5
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.WARNING, logger="hadakron.adapters"):
        c = LoKr.for_layer(nn.Conv2d(16, 24, 3), 4, 2.0, use_tucker=True)  # W2 (6, 4, 3, 3): 4 >= 3
    assert c.w2_form == "full" and tuple(c.lokr_w2.shape) == (6, 4, 3, 3)
    assert "24x16x3x3" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("factor,expected", [(-1, (8, 12, 8, 8)), (4, (4, 24, 4, 16)), (8, (8, 12, 8, 8)),
                                             (16, (6, 16, 4, 16))])
def test_lokr_factor_splits(factor, expected):
    m = LoKr.for_layer(nn.Linear(64, 96), 1, 1.0, factor=factor)
    assert (m.out_l, m.out_k, m.in_m, m.in_n) == expected
    assert m.factor == factor


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_file_state_dict_round_trips_bit_exact(case):
    layer, module = build(case)
    randomize(module, seed=7)
    sd = module.file_state_dict()
    rebuilt = AdapterModule.from_params(sd, layer)
    assert type(rebuilt) is type(module)
    assert rebuilt.algorithm == module.algorithm and rebuilt.rank == module.rank
    assert float(rebuilt.alpha) == float(module.alpha) and rebuilt.scale == module.scale
    if isinstance(module, LoKr):
        assert (rebuilt.out_l, rebuilt.out_k, rebuilt.in_m, rebuilt.in_n) == (
            module.out_l, module.out_k, module.in_m, module.in_n)
        # the factor is inferred from the shapes: -1 when that gives the same split (as LyCORIS does)
        w = module.spec
        for f in (module.factor, rebuilt.factor):
            assert (ops.factorization(w.out_dim, f)[0], ops.factorization(w.in_dim, f)[0]) == (module.out_l, module.in_m)
        assert rebuilt.w2_form == module.w2_form and rebuilt.w1_full == module.w1_full
    again = rebuilt.file_state_dict()
    assert set(again) == set(sd)
    for k in sd:
        assert again[k].dtype == sd[k].dtype and torch.equal(again[k], sd[k]), k
    x = input_for(layer).float()
    assert torch.equal(rebuilt(x), module(x))


def test_from_params_keeps_dtypes_and_odd_layouts():
    layer = nn.Conv2d(16, 24, 1).double()
    g = torch.Generator().manual_seed(0)
    # LyCORIS conv 1x1 full W2 is 4-D; sd-scripts alpha may be int64; tensors may be bf16
    params = {"lokr_w1": torch.randn(4, 4, generator=g).bfloat16(),
              "lokr_w2": torch.randn(6, 4, 1, 1, generator=g).bfloat16(),
              "alpha": torch.tensor(4, dtype=torch.int64)}
    m = AdapterModule.from_params(params, layer)
    assert isinstance(m, LoKr) and m.scale == 1.0 and m.rank == 4
    out = m.file_state_dict()
    for k in params:
        assert out[k].dtype == params[k].dtype and torch.equal(out[k], params[k])
    ref = ref_kron(params["lokr_w1"].double(), params["lokr_w2"].double()[:, :, 0, 0]).reshape(24, 16, 1, 1)
    x = input_for(layer)
    torch.testing.assert_close(m.double()(x), F.conv2d(x, ref), rtol=1e-10, atol=1e-11)


def test_missing_alpha_means_scale_one():
    layer = nn.Linear(12, 20)
    g = torch.Generator().manual_seed(0)
    params = {"hada_w1_a": torch.randn(20, 3, generator=g), "hada_w1_b": torch.randn(3, 12, generator=g),
              "hada_w2_a": torch.randn(20, 3, generator=g), "hada_w2_b": torch.randn(3, 12, generator=g)}
    m = AdapterModule.from_params(params, layer)
    assert m.scale == 1.0 and float(m.alpha) == 3.0
    torch.testing.assert_close(m.delta_weight().double(), ref_loha_dw(params, (20, 12), None), rtol=1e-5, atol=1e-6)
    out = m.file_state_dict()
    assert all(torch.equal(out[k], params[k]) for k in params) and float(out["alpha"]) == 3.0


def test_from_params_errors_name_the_tensor():
    layer = nn.Linear(12, 20)
    ok = {"hada_w1_a": torch.zeros(20, 3), "hada_w1_b": torch.zeros(3, 12),
          "hada_w2_a": torch.zeros(20, 3), "hada_w2_b": torch.zeros(3, 12)}
    with pytest.raises(ValueError, match=r"hada_w2_b: expected shape \(3, 12\).*found \(3, 11\)"):
        AdapterModule.from_params({**ok, "hada_w2_b": torch.zeros(3, 11)}, layer)
    with pytest.raises(ValueError, match="missing hada_w1_a"):
        AdapterModule.from_params({k: v for k, v in ok.items() if k != "hada_w1_a"}, layer)
    with pytest.raises(ValueError, match="unknown tensor name"):
        AdapterModule.from_params({**ok, "hada_w3": torch.zeros(1)}, layer)
    with pytest.raises(ValueError, match="not a LoHa/LoKr"):
        AdapterModule.from_params({"lora_up.weight": torch.zeros(20, 2), "lora_down.weight": torch.zeros(2, 12)},
                                  layer)
    with pytest.raises(ValueError, match="does not divide"):
        AdapterModule.from_params({"lokr_w1": torch.zeros(3, 5), "lokr_w2": torch.zeros(4, 4)}, layer)
    with pytest.raises(ValueError, match="lokr_w2: expected shape"):
        AdapterModule.from_params({"lokr_w1": torch.zeros(4, 4), "lokr_w2": torch.zeros(5, 4)}, layer)
    with pytest.raises(ValueError, match="LoKr.from_params got loha"):
        LoKr.from_params(ok, layer)


def test_scalar_is_folded_into_smallest_factor_on_save():
    for layer, module in (
        (nn.Linear(12, 20), LoHa.for_layer(nn.Linear(12, 20), 3, 2.0, use_scalar=True)),
        (nn.Conv2d(8, 12, 3), LoHa.for_layer(nn.Conv2d(8, 12, 3), 2, 2.0, use_scalar=True, use_tucker=True)),
        (nn.Linear(64, 96), LoKr.for_layer(nn.Linear(64, 96), 2, 3.0, use_scalar=True)),
        (nn.Linear(64, 96), LoKr.for_layer(nn.Linear(64, 96), 6, 3.0, use_scalar=True)),
    ):
        randomize(module, seed=11)
        with torch.no_grad():
            module.scalar.fill_(0.37)
        sd = module.file_state_dict()
        assert "scalar" not in sd
        smallest = min(module.factor_names, key=lambda n: module.factors()[n].numel())
        for n, t in module.factors().items():
            if n == smallest:
                torch.testing.assert_close(sd[n], t.detach() * 0.37)
            else:
                assert torch.equal(sd[n], t.detach())
        # every other loader reads the same dW as the module computes, bit for bit
        assert torch.equal(ops.delta_weight(sd, module.spec.weight_shape), module.delta_weight())
        torch.testing.assert_close(module.delta_weight().double(), ref_dw(module), rtol=1e-5, atol=1e-6)
        reloaded = AdapterModule.from_params(sd, layer)
        torch.testing.assert_close(reloaded.delta_weight(), module.delta_weight(), rtol=0, atol=0)


def test_dora_scale_applies_weight_norm_with_base_weight_at_call_time():
    torch.manual_seed(0)
    layer = nn.Linear(12, 20).double()
    g = torch.Generator().manual_seed(1)
    params = {"hada_w1_a": torch.randn(20, 2, generator=g, dtype=F64), "hada_w1_b": torch.randn(2, 12, generator=g, dtype=F64),
              "hada_w2_a": torch.randn(20, 2, generator=g, dtype=F64), "hada_w2_b": torch.randn(2, 12, generator=g, dtype=F64),
              "alpha": torch.tensor(1.0), "dora_scale": torch.rand(20, 1, generator=g, dtype=F64) + 0.5}
    m = AdapterModule.from_params(params, layer)
    assert "dora_scale" in dict(m.named_buffers()) and all("weight" not in n for n, _ in m.named_parameters())
    w = layer.weight.detach()

    def ref(weight, strength):
        """DoRA with strength as ComfyUI applies it: strength * (W_d - W), W_d = m (W + dW) / ||W + dW||_row."""
        dw = ref_loha_dw({k: v for k, v in params.items() if k.startswith("hada")}, (20, 12), 1.0)
        merged = weight + dw
        return strength * (params["dora_scale"] * merged / merged.norm(dim=1, keepdim=True) - weight)

    x = input_for(layer)
    torch.testing.assert_close(m.delta_weight(), ref(w, 1.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m(x), F.linear(x, ref(w, 1.0)), rtol=1e-10, atol=1e-11)
    m.multiplier = 0.5
    torch.testing.assert_close(m(x), F.linear(x, ref(w, 0.5)), rtol=1e-10, atol=1e-11)
    with torch.no_grad():  # the base weight is read at call time
        layer.weight.mul_(2.0)
    torch.testing.assert_close(m(x), F.linear(x, ref(layer.weight.detach(), 0.5)), rtol=1e-10, atol=1e-11)
    out = m.file_state_dict()
    assert torch.equal(out["dora_scale"], params["dora_scale"])


# ----------------------------------------------------------------------------- other paths
def _grads_vs_reference(module: AdapterModule, layer: nn.Module, x: torch.Tensor, ref_delta) -> None:
    """Forward and all gradients of `module` against `layer_op(x, ref_delta(leaves))` on leaf copies."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    (y * upstream).sum().backward()
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    x2 = x.detach().clone().requires_grad_(True)
    y2 = layer_op(layer, x2, ref_delta(leaves))
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-11)
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-10)
    for n, p in module.named_parameters():
        torch.testing.assert_close(p.grad, leaves[n].grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("tokens", [2, 600])  # few tokens: ops' exact rank r1*r2 form; many: HadaWeight rebuild
@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 20), lambda: nn.Conv2d(4, 6, 3, padding=1)], ids=["lin", "conv"])
def test_loha_both_bypass_forms_match_reference(tokens, make):
    layer = make().double()
    m = LoHa.for_layer(layer, 3, 2.0).double()
    randomize(m, seed=4)
    g = torch.Generator().manual_seed(2)
    if isinstance(layer, nn.Linear):
        x = torch.randn(tokens, 12, generator=g, dtype=F64)
    else:
        side = 2 if tokens == 2 else 20
        x = torch.randn(1, 4, side, side, generator=g, dtype=F64)
    out, cols = m.spec.out_dim, m.spec.in_dim * m.spec.kernel_numel
    n_tok = x.numel() // x.shape[-1] if x.dim() == 2 else x.shape[0] * x.shape[2] * x.shape[3]
    assert ops.loha_bypass_mode(n_tok, out, cols, 3, 3) == ("lowrank" if tokens == 2 else "rebuild")
    _grads_vs_reference(m, layer, x, lambda p: _live_ref(m, p))


def test_grouped_conv_and_dora_train_with_exact_gradients():
    conv_g = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()
    for m in (LoHa.for_layer(conv_g, 2, 1.0).double(), LoKr.for_layer(conv_g, 1, 1.0, factor=2).double()):
        randomize(m, seed=6)
        _grads_vs_reference(m, conv_g, input_for(conv_g), lambda p, m=m: _live_ref(m, p))

    layer = nn.Linear(64, 96).double()
    g = torch.Generator().manual_seed(3)
    params = {"lokr_w1": torch.randn(8, 8, generator=g, dtype=F64), "lokr_w2_a": torch.randn(12, 2, generator=g, dtype=F64),
              "lokr_w2_b": torch.randn(2, 8, generator=g, dtype=F64), "alpha": torch.tensor(1.0, dtype=F64),
              "dora_scale": torch.rand(1, 64, generator=g, dtype=F64) + 0.5}  # column-wise (wd_on_out=False)
    m = AdapterModule.from_params(params, layer)
    m.multiplier = 0.7
    w = layer.weight.detach()

    def dora_delta(p):
        merged = w + _live_ref(m, p)
        col_norm = merged.norm(dim=0, keepdim=True)
        return 0.7 * (params["dora_scale"] * merged / col_norm - w)

    _grads_vs_reference(m, layer, input_for(layer), dora_delta)
    assert layer.weight.grad is None  # the base weight is read, never trained


def test_from_params_with_scalar_resumes_unchanged_and_low_precision_input():
    layer = nn.Linear(64, 96)
    src = LoKr.for_layer(layer, 2, 3.0)
    randomize(src, seed=8)
    resumed = AdapterModule.from_params(src.file_state_dict(), layer, use_scalar=True, rank_dropout=0.1)
    assert float(resumed.scalar.detach()) == 1.0 and resumed.rank_dropout == 0.1
    assert torch.equal(resumed.delta_weight(), src.delta_weight())
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    resumed.eval()
    y16 = resumed(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    ref = F.linear(x.double(), ref_dw(resumed))
    torch.testing.assert_close(y16.double(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))


def test_module_pickles_and_reloads_through_torch_save(tmp_path):
    m = LoKr.for_layer(nn.Conv2d(16, 24, 3), 2, 3.0, factor=2, use_scalar=True)
    randomize(m, seed=12)
    torch.save(m, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(back.delta_weight(), m.delta_weight()) and back.scale == m.scale
    fresh = LoKr.for_layer(nn.Conv2d(16, 24, 3), 2, 3.0, factor=2, use_scalar=True)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.delta_weight(), m.delta_weight())


def test_sd_scripts_layout_lokr_conv1x1_and_loha_flat():
    """sd-scripts writes conv 1x1 LoKr W2 as 2-D and int64 alpha = dim in full mode; flat LoHa folds the kernel."""
    g = torch.Generator().manual_seed(4)
    conv1 = nn.Conv2d(16, 24, 1).double()
    params = {"lokr_w1": torch.randn(4, 4, generator=g, dtype=F64), "lokr_w2": torch.randn(6, 4, generator=g, dtype=F64),
              "alpha": torch.tensor(16)}
    m = AdapterModule.from_state_dict(params, conv1)
    assert m.scale == 1.0 and m.rank == 16 and m.w2_form == "full" and m.factor == -1
    x = input_for(conv1)
    torch.testing.assert_close(m(x), F.conv2d(x, ref_kron(params["lokr_w1"], params["lokr_w2"]).reshape(24, 16, 1, 1)))
    conv3 = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    loha = {"hada_w1_a": torch.randn(6, 2, generator=g, dtype=F64), "hada_w1_b": torch.randn(2, 36, generator=g, dtype=F64),
            "hada_w2_a": torch.randn(6, 2, generator=g, dtype=F64), "hada_w2_b": torch.randn(2, 36, generator=g, dtype=F64),
            "alpha": torch.tensor(1.0)}
    m = AdapterModule.from_state_dict(loha, conv3)
    # column index of the flat b factors = c_in * 9 + ky * 3 + kx
    dw = ((loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"]) * 0.5).reshape(6, 4, 3, 3)
    x = input_for(conv3)
    torch.testing.assert_close(m(x), F.conv2d(x, dw, None, 2, 1), rtol=1e-10, atol=1e-11)
