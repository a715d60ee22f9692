"""hadakron.delta_norms: ||dW||_F from the factors (numpy) against the dense float64 dW of hadakron.ops.delta_weight,
for every LoHa/LoKr form; the LoHa bound is >= the exact value; block cells and text bars."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from hadakron import delta_norms as dn
from hadakron.ops import delta_weight, module_scale


def _t(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def forms(g: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """One module per factor form (shapes as docs/CONTRACTS.md), alpha included."""
    a = torch.tensor(3.0, dtype=torch.float64)
    return {
        "loha": {"hada_w1_a": _t(g, 12, 4), "hada_w1_b": _t(g, 4, 20), "hada_w2_a": _t(g, 12, 4),
                 "hada_w2_b": _t(g, 4, 20), "alpha": a},
        "loha_r1_r2_differ": {"hada_w1_a": _t(g, 9, 2), "hada_w1_b": _t(g, 2, 7), "hada_w2_a": _t(g, 9, 5),
                              "hada_w2_b": _t(g, 5, 7)},
        "loha_flat_conv": {"hada_w1_a": _t(g, 8, 3), "hada_w1_b": _t(g, 3, 6 * 9), "hada_w2_a": _t(g, 8, 3),
                           "hada_w2_b": _t(g, 3, 6 * 9), "alpha": a},
        "loha_tucker": {"hada_t1": _t(g, 3, 3, 3, 3), "hada_w1_a": _t(g, 3, 8), "hada_w1_b": _t(g, 3, 6),
                        "hada_t2": _t(g, 3, 3, 3, 3), "hada_w2_a": _t(g, 3, 8), "hada_w2_b": _t(g, 3, 6), "alpha": a},
        "lokr_full_full": {"lokr_w1": _t(g, 3, 4), "lokr_w2": _t(g, 5, 6), "alpha": a},
        "lokr_full_lowrank": {"lokr_w1": _t(g, 3, 4), "lokr_w2_a": _t(g, 5, 2), "lokr_w2_b": _t(g, 2, 6), "alpha": a},
        "lokr_both_lowrank": {"lokr_w1_a": _t(g, 6, 2), "lokr_w1_b": _t(g, 2, 4), "lokr_w2_a": _t(g, 5, 2),
                              "lokr_w2_b": _t(g, 2, 7), "alpha": a},
        "lokr_conv_full": {"lokr_w1": _t(g, 2, 3), "lokr_w2": _t(g, 4, 5, 3, 3)},
        "lokr_conv_flat_lowrank": {"lokr_w1": _t(g, 2, 3), "lokr_w2_a": _t(g, 4, 2), "lokr_w2_b": _t(g, 2, 5 * 9),
                                   "alpha": a},
        "lokr_tucker": {"lokr_w1": _t(g, 2, 3), "lokr_t2": _t(g, 2, 2, 3, 3), "lokr_w2_a": _t(g, 2, 4),
                        "lokr_w2_b": _t(g, 2, 5), "alpha": a},
    }


FORMS = list(forms(torch.Generator().manual_seed(0)))


def _np(params):
    return {k: v.numpy() for k, v in params.items()}


@pytest.mark.parametrize("form", FORMS)
def test_norm_times_scale_equals_the_dense_delta(form):
    params = forms(torch.Generator().manual_seed(1))[form]
    dense = delta_weight(params, dtype=torch.float64)  # scaled by ops.module_scale
    ref = float(torch.linalg.vector_norm(dense.reshape(-1)))
    got = dn.delta_norm(_np(params))
    assert got.exact, got
    assert math.isclose(got.value * dn.module_scale(_np(params)), ref, rel_tol=1e-12), (got, ref)


@pytest.mark.parametrize("form", FORMS)
def test_scale_rule_is_the_one_ops_applies(form):
    params = forms(torch.Generator().manual_seed(2))[form]
    assert dn.module_scale(_np(params)) == module_scale(params)


def test_loha_bound_when_the_gram_form_is_too_costly():
    g = torch.Generator().manual_seed(3)
    params = forms(g)["loha"]
    dense = float(torch.linalg.vector_norm(delta_weight(params, dtype=torch.float64).reshape(-1)))
    scale = dn.module_scale(_np(params))
    bound = dn.delta_norm(_np(params), exact_flops=0)
    assert not bound.exact and bound.method == "hadamard-bound"
    w1 = params["hada_w1_a"] @ params["hada_w1_b"]
    w2 = params["hada_w2_a"] @ params["hada_w2_b"]
    ref_bound = float(torch.linalg.matrix_norm(w1) * torch.linalg.matrix_norm(w2))
    assert math.isclose(bound.value, ref_bound, rel_tol=1e-12)
    assert bound.value * scale > dense * 1.01  # a bound, and not tight for random factors


def test_exact_loha_of_a_large_layer_uses_the_gram_form():
    """A 2000 x 3000 LoHa of rank 2: exact from (r1*r2)^2 Grams over out + in rows (the product is never needed)."""
    g = torch.Generator().manual_seed(4)
    p = {"hada_w1_a": _t(g, 2000, 2), "hada_w1_b": _t(g, 2, 3000), "hada_w2_a": _t(g, 2000, 2),
         "hada_w2_b": _t(g, 2, 3000)}
    got = dn.delta_norm(_np(p))
    ref = float(torch.linalg.vector_norm(((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]))))
    assert got.exact and got.method == "hadamard-gram"
    assert math.isclose(got.value, ref, rel_tol=1e-11)


def test_not_loha_or_lokr_is_refused():
    with pytest.raises(ValueError, match="not a LoHa or LoKr"):
        dn.delta_norm({"lora_up.weight": np.ones((2, 1)), "lora_down.weight": np.ones((1, 2))})


def test_block_cells_sum_squares_with_scale_and_strength():
    n1, n2, n3 = dn.DeltaNorm(3.0, True, "x"), dn.DeltaNorm(4.0, True, "x"), dn.DeltaNorm(2.0, False, "x")
    cells = dn.block_norms([("unet", "IN04", n1, 0.5), ("unet", "IN04", n2, -0.5), ("te1", "TE1", n3, 2.0),
                            ("unet", "OTHER", n1, 1.0)],
                           [("unet", "IN04"), ("unet", "M00"), ("te1", "TE1")])
    assert [(c.part, c.block) for c in cells] == [("unet", "IN04"), ("unet", "M00"), ("te1", "TE1"), ("unet", "OTHER")]
    assert math.isclose(cells[0].norm, math.hypot(1.5, 2.0)) and cells[0].modules == 2 and cells[0].exact
    assert cells[1].norm == 0.0 and cells[1].modules == 0
    assert cells[2].norm == 4.0 and not cells[2].exact
    payload = dn.heatmap_payload(cells)
    assert payload["exact"] is False and payload["max"] == 4.0 and len(payload["cells"]) == 4


def test_text_bars():
    cells = [dn.BlockNorm("unet", "IN04", 2.0, 3, True), dn.BlockNorm("unet", "M00", 0.0, 0, True),
             dn.BlockNorm("te1", "TE1", 1.0, 1, False), dn.BlockNorm("te2", "TE2", 0.001, 1, True)]
    lines = dn.text_bars(cells, width=10)
    assert lines == ["unet IN04  ##########  2  3 modules",
                     "unet M00   ..........  -",
                     "te1 TE1    #####.....  1 (bound)  1 module",
                     "te2 TE2    #.........  0.001  1 module"]
    assert len(dn.text_bars(cells, width=10, skip_empty=True)) == 3


def test_module_imports_without_torch():
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'): raise ImportError('torch imported')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import hadakron.delta_norms as m; print(m.delta_norm({'lokr_w1': [[2.0]], 'lokr_w2': [[3.0, 4.0]]}).value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "10.0"
