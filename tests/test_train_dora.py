"""DoRA training (`dora_wd`, issue 13): a trainable magnitude per output row (LyCORIS `wd_on_output`) or per input
column, trained in bypass form with the base weight only read, saved as `dora_scale`.

After a few steps the saved tensors are applied by three consumers and compared at float64:
(1) ours (`ops.patched_weight`, the loader/bake path, and a module rebuilt from the file), (2) LyCORIS 4.x's module
loading the same state dict (its forward is the anchor, as in test_adapters_lycoris.py), (3) ComfyUI's
`weight_decompose` written out here. Row-wise, ComfyUI divides by ||W|| (the base weight) where LyCORIS and the
DoRA paper take ||W + dW||: that file differs in ComfyUI by the per-row factor ||W + dW|| / ||W||, checked exactly.
Column-wise (wd_on_output=False) all three agree.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hadakron import ops
from hadakron.adapters import AdapterModule, LoHa, LoKr
from hadakron.network import AdapterNetwork, NetworkConfig

lyco_loha = pytest.importorskip("lycoris.modules.loha")
lyco_lokr = pytest.importorskip("lycoris.modules.lokr")

F64 = torch.float64
EPS = torch.finfo(F64).eps

# (id, layer factory, our kwargs, LyCORIS class and kwargs)
CASES = [
    ("loha-linear", lambda: nn.Linear(12, 16), "loha", dict(rank=3, alpha=2.0)),
    ("loha-conv3x3", lambda: nn.Conv2d(6, 8, 3, padding=1), "loha", dict(rank=2, alpha=1.0)),
    ("lokr-linear", lambda: nn.Linear(24, 32), "lokr", dict(rank=2, alpha=3.0, factor=4)),
    ("lokr-conv3x3", lambda: nn.Conv2d(8, 16, 3, padding=1), "lokr", dict(rank=2, alpha=1.0, factor=2)),
]


def _layer(factory) -> nn.Module:
    """A float64 layer whose weight is an inference tensor, as ComfyUI hands them to a node."""
    torch.manual_seed(0)
    with torch.inference_mode():
        return factory().double().requires_grad_(False)


def _ours(layer: nn.Module, algo: str, kw: dict, on_output: bool, **extra) -> AdapterModule:
    kw = dict(kw)
    rank, alpha = kw.pop("rank"), kw.pop("alpha")
    cls = LoHa if algo == "loha" else LoKr
    return cls.for_layer(layer, rank, alpha, dora_wd=True, wd_on_output=on_output, dtype=F64, **kw, **extra)


def _input(layer: nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(5, layer.in_features, generator=g, dtype=F64)
    return torch.randn(2, layer.in_channels, 7, 6, generator=g, dtype=F64)


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, padding=layer.padding)


def _train(adapter: AdapterModule, layer: nn.Module, steps: int = 4) -> dict[str, float]:
    """A few SGD steps on the bypass output (the layer frozen); the largest gradient per parameter of step 1."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # w2_a / w2_b start at 0: nudge every factor so all of them get gradients
        for name, p in adapter.named_parameters():
            if name != "dora_scale":
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.05)
    first: dict[str, float] = {}
    for step in range(steps):
        x = _input(layer, g)
        target = torch.randn_like(layer(x))
        loss = (layer(x) + adapter(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first = {n: float(p.grad.abs().max()) for n, p in adapter.named_parameters()}
        opt.step()
    return first


# ---------------------------------------------------------------- independent float64 references
def _ref_delta(sd: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """s * dW from the file's tensors, as ComfyUI's loha.py / lokr.py rebuild it (non-Tucker forms)."""
    t = {k: v.to(F64) for k, v in sd.items()}
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2, rank = t["lokr_w2"], None
        else:
            w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
            w1 = w1[:, :, None, None]
        dw = torch.kron(w1, w2)
    scale = float(t["alpha"]) / rank if rank is not None else 1.0
    return (dw * scale).reshape(shape)


def _comfy_patched(weight: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """ComfyUI's `weight_adapter.base.weight_decompose` at strength 1, written out (float64)."""
    w = weight.to(F64)
    ds = sd["dora_scale"].to(F64)
    calc = w + _ref_delta(sd, tuple(w.shape))
    if ds.shape[0] == calc.shape[0]:  # ComfyUI's row-wise form: the norm of the base weight W
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
    return calc * (ds / (norm + EPS))


def _paper_patched(weight: torch.Tensor, sd: dict[str, torch.Tensor], on_output: bool) -> torch.Tensor:
    """DoRA as LyCORIS and the paper define it: (W + dW) * m / ||W + dW|| (rows or columns)."""
    w = weight.to(F64)
    calc = w + _ref_delta(sd, tuple(w.shape))
    if on_output:
        norm = calc.reshape(calc.shape[0], -1).norm(dim=1).reshape(calc.shape[0], *[1] * (calc.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1).reshape(1, calc.shape[1],
                                                                                   *[1] * (calc.dim() - 2))
    return calc * (sd["dora_scale"].to(F64) / (norm + EPS))


def _lycoris(layer: nn.Module, algo: str, kw: dict, on_output: bool, sd: dict) -> nn.Module:
    kw = dict(kw)
    rank, alpha = kw.pop("rank"), kw.pop("alpha")
    cls = lyco_loha.LohaModule if algo == "loha" else lyco_lokr.LokrModule
    lyco = cls("lycoris_test", layer, lora_dim=rank, alpha=alpha, weight_decompose=True, wd_on_out=on_output,
               **kw).double()
    lyco.load_state_dict(sd)
    return lyco


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("on_output", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dora_trains_and_consumers_agree(case, on_output, caplog):
    _, factory, algo, kw = case
    layer = _layer(factory)
    base = layer.weight.clone()
    adapter = _ours(layer, algo, kw, on_output)
    assert "weight" not in dict(adapter.named_parameters())
    expected_shape = (base.shape[0],) + (1,) * (base.dim() - 1) if on_output else (1, base.shape[1]) + (1,) * (base.dim() - 2)
    assert tuple(adapter.dora_scale.shape) == expected_shape
    init = adapter.dora_scale.detach().clone()
    grads = _train(adapter, layer)
    assert all(v > 0 for v in grads.values()), grads  # the magnitude and every factor get gradients
    assert "dora_scale" in grads
    assert torch.equal(layer.weight, base)  # the frozen weight is read, never written
    assert not torch.equal(adapter.dora_scale.detach(), init)

    sd = adapter.file_state_dict()
    assert set(sd) >= {"dora_scale", "alpha"}
    paper = _paper_patched(base, sd, on_output)
    # (1) ours: the loader / bake path, and a module rebuilt from the file
    ours_w = ops.patched_weight(base, sd, 1.0, dtype=F64)
    assert (ours_w - paper).abs().max() < 1e-10
    rebuilt = AdapterModule.from_params(sd, layer)
    assert (rebuilt.delta_weight() - (paper - base)).abs().max() < 1e-10
    assert (adapter.delta_weight() - (paper - base)).abs().max() < 1e-10
    # (2) LyCORIS' module from PyPI, its forward as the anchor
    x = _input(layer, torch.Generator().manual_seed(9))
    y_base = layer(x)
    with caplog.at_level(logging.ERROR):
        lyco = _lycoris(layer, algo, kw, on_output, sd)
    lyco.apply_to()
    try:
        y_lyco = layer(x) - y_base
    finally:
        lyco.restore()
    assert (y_lyco - _apply(layer, x, paper - base)).abs().max() < 1e-10
    assert (rebuilt(x) - y_lyco).abs().max() < 1e-10
    # (3) ComfyUI's formula
    comfy = _comfy_patched(base, sd)
    if not on_output:
        assert (comfy - paper).abs().max() < 1e-10
    else:  # ComfyUI: (W + dW) * m / ||W||; the others: / ||W + dW||. Exactly that factor per row apart:
        calc = base + _ref_delta(sd, tuple(base.shape))
        rows = calc.reshape(calc.shape[0], -1).norm(dim=1) + EPS
        ratio = (rows / (base.reshape(base.shape[0], -1).norm(dim=1) + EPS)).reshape(expected_shape)
        assert (comfy - paper * ratio).abs().max() < 1e-10
        assert (comfy - paper).abs().max() > 1e-6  # a trained dW changes row norms: ComfyUI really differs


def test_dora_init_is_the_row_norm_and_the_term_starts_near_zero():
    layer = _layer(lambda: nn.Conv2d(4, 6, 3))
    adapter = LoHa.for_layer(layer, 2, 1.0, dora_wd=True, dtype=F64)
    norm = layer.weight.reshape(6, -1).norm(dim=1).reshape(6, 1, 1, 1)
    assert torch.equal(adapter.dora_scale.detach(), norm)
    assert isinstance(adapter.dora_scale, nn.Parameter)
    x = _input(layer, torch.Generator().manual_seed(1))
    assert adapter(x).abs().max() < 1e-12  # dW = 0 and m = ||W||: W_d = W up to eps


def test_dora_network_trains_saves_and_loads_back():
    """`dora_wd` through NetworkConfig on the small SDXL UNet: the magnitudes are in the optimizer groups, a step
    leaves every base weight bit for bit, the file holds `dora_scale` per module, and it loads back (resume)."""
    from models import SDXLUNet

    torch.manual_seed(0)
    unet = SDXLUNet().requires_grad_(False)  # (inference-tensor weights: the layer tests above)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    config = NetworkConfig(algo="lokr", network_dim=2, factor=4, dora_wd=True,
                           exclude_patterns=[r"(?!middle_block\.).*"])
    net = AdapterNetwork.build("sdxl", {"unet": unet}, config, seed=1)
    grouped = {id(p) for g in net.param_groups(unet_lr=1e-3) for p in g["params"]}
    magnitudes = [a.dora_scale for a in net.adapters.values()]
    assert magnitudes and all(id(m) in grouped for m in magnitudes)
    opt = torch.optim.AdamW([p for g in net.param_groups(unet_lr=1e-3) for p in g["params"]], lr=1e-2)
    net.attach()
    try:
        g = torch.Generator().manual_seed(2)
        x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10.0])
        ctx, y = torch.randn(1, 5, 16, generator=g), torch.randn(1, 12, generator=g)
        for _ in range(2):
            loss = unet(x, t, ctx, y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        net.detach()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    sd = net.file_state_dict()
    dora_keys = [k for k in sd if k.endswith(".dora_scale")]
    assert len(dora_keys) == len(net.adapters)
    fresh = AdapterNetwork.build("sdxl", {"unet": unet}, config, seed=5)
    fresh.load_file_state(sd, strict=True)
    for key, adapter in fresh.adapters.items():
        assert torch.equal(adapter.dora_scale.detach(), net.adapters[key].dora_scale.detach())
        assert torch.equal(adapter.delta_weight(), net.adapters[key].delta_weight())


def test_rs_lora_stores_alpha_times_sqrt_rank_like_lycoris():
    layer = nn.Linear(64, 96).double()
    for algo, cls, lyco_cls in (("loha", LoHa, lyco_loha.LohaModule), ("lokr", LoKr, lyco_lokr.LokrModule)):
        kw = {} if algo == "loha" else {"factor": 8}  # W2 12x8 low rank: alpha counts
        ours = cls.for_layer(layer, 4, 2.0, rs_lora=True, dtype=F64, **kw)
        lyco = lyco_cls("t", layer, lora_dim=4, alpha=2.0, rs_lora=True, **kw)
        assert math.isclose(float(ours.alpha), 2.0 * 2.0) and math.isclose(float(lyco.alpha), float(ours.alpha))
        assert math.isclose(ours.scale, 2.0 / math.sqrt(4)) and math.isclose(lyco.scale, ours.scale)


def test_rank_dropout_scale_divides_by_the_mask_mean():
    layer = nn.Linear(8, 64).double()
    adapter = LoKr.for_layer(layer, 2, 1.0, rank_dropout=0.5, rank_dropout_scale=True, dtype=F64)
    y = torch.ones(3, 64, dtype=F64)
    torch.manual_seed(4)
    out = adapter._apply_rank_dropout(y)
    torch.manual_seed(4)
    keep = (torch.rand(64) > 0.5).to(F64)
    torch.testing.assert_close(out, y * keep / keep.mean(), rtol=0, atol=0)
    plain = LoKr.for_layer(layer, 2, 1.0, rank_dropout=0.5, dtype=F64)
    torch.manual_seed(4)
    torch.testing.assert_close(plain._apply_rank_dropout(y), y * keep / 0.5, rtol=0, atol=0)


def test_network_args_round_trip_the_new_options():
    c = NetworkConfig(algo="loha", dora_wd=True, wd_on_output=False, rs_lora=True, rank_dropout_scale=True)
    args = c.network_args()
    assert args["dora_wd"] == "true" and args["wd_on_output"] == "false"
    assert args["rs_lora"] == "true" and args["rank_dropout_scale"] == "true"
    back = NetworkConfig.from_network_args(args)
    assert (back.dora_wd, back.wd_on_output, back.rs_lora, back.rank_dropout_scale) == (True, False, True, True)
