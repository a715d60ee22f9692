"""delta_weight / module_scale / module_rank against float64 references written here (einsum, loops, torch.kron)."""

import itertools

import pytest
import torch

from hadakron.ops import algorithm_of, delta_weight, loha_delta, lokr_delta, module_rank, module_scale
from hadakron.ops import Full, LowRank
from helpers import ref_tucker

D = torch.float64


def rnd(*shape, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(*shape, generator=g, dtype=D)


# ---- independent references -------------------------------------------------------------------------------
def ref_product(a, b):
    """a (p, i) @ b (i, q...) by an explicit einsum over the shared index."""
    return torch.einsum("pi,iq->pq", a, b.reshape(b.shape[0], -1))


def ref_kron_loops(w1, w2):
    """kron by its index map: out[i1*b + i2, j1*d + j2, ...] = w1[i1, j1] * w2[i2, j2, ...]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = torch.zeros((a * b, c * d) + tuple(w2.shape[2:]), dtype=D)
    for i1, j1, i2, j2 in itertools.product(range(a), range(c), range(b), range(d)):
        out[i1 * b + i2, j1 * d + j2] = w1[i1, j1] * w2[i2, j2]
    return out


# ---- LoHa ----------------------------------------------------------------------------------------------------
def test_loha_linear_scale_alpha_over_rank():
    p = {"hada_w1_a": rnd(12, 3), "hada_w1_b": rnd(3, 10), "hada_w2_a": rnd(12, 3), "hada_w2_b": rnd(3, 10),
         "alpha": torch.tensor(1.5)}
    ref = ref_product(p["hada_w1_a"], p["hada_w1_b"]) * ref_product(p["hada_w2_a"], p["hada_w2_b"]) * 0.5
    assert algorithm_of(p) == "loha" and module_rank(p) == 3 and module_scale(p) == pytest.approx(0.5)
    out = delta_weight(p, (12, 10), dtype=D)
    assert out.dtype == D and out.shape == (12, 10)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_loha_missing_alpha_is_scale_one_and_conv1x1_shape():
    p = {"hada_w1_a": rnd(8, 2), "hada_w1_b": rnd(2, 6), "hada_w2_a": rnd(8, 2), "hada_w2_b": rnd(2, 6)}
    assert module_scale(p) == 1.0
    ref = ref_product(p["hada_w1_a"], p["hada_w1_b"]) * ref_product(p["hada_w2_a"], p["hada_w2_b"])
    out = delta_weight(p, (8, 6, 1, 1), dtype=D)
    assert out.shape == (8, 6, 1, 1)
    torch.testing.assert_close(out[:, :, 0, 0], ref)


def test_loha_flat_conv_folds_kernel_into_columns():
    out_c, in_c, r = 6, 4, 3
    p = {"hada_w1_a": rnd(out_c, r), "hada_w1_b": rnd(r, in_c * 9), "hada_w2_a": rnd(out_c, r),
         "hada_w2_b": rnd(r, in_c * 9), "alpha": torch.tensor(6.0)}
    flat = ref_product(p["hada_w1_a"], p["hada_w1_b"]) * ref_product(p["hada_w2_a"], p["hada_w2_b"]) * 2.0
    out = delta_weight(p, (out_c, in_c, 3, 3), dtype=D)
    for o, c, y, x in itertools.product(range(out_c), range(in_c), range(3), range(3)):
        assert out[o, c, y, x].item() == pytest.approx(flat[o, c * 9 + y * 3 + x].item(), rel=1e-12, abs=1e-12)


def test_loha_tucker_matches_reference_einsum():
    out_c, in_c, r = 7, 5, 3
    p = {"hada_t1": rnd(r, r, 3, 3), "hada_w1_a": rnd(r, out_c), "hada_w1_b": rnd(r, in_c),
         "hada_t2": rnd(r, r, 3, 3), "hada_w2_a": rnd(r, out_c), "hada_w2_b": rnd(r, in_c), "alpha": torch.tensor(1.0)}
    ref = ref_tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * ref_tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]) / 3
    assert module_rank(p) == 3
    torch.testing.assert_close(delta_weight(p, (out_c, in_c, 3, 3), dtype=D), ref, rtol=1e-12, atol=1e-12)


def test_loha_chunked_rebuild_matches_on_a_tall_matrix(monkeypatch):
    import hadakron.ops.rebuild as rebuild
    monkeypatch.setattr(rebuild, "HADA_CHUNK_ELEMENTS", 4096)  # 700 rows of 300 -> many row chunks, last one short
    a1, b1, a2, b2 = rnd(700, 4), rnd(4, 300), rnd(700, 5), rnd(5, 300)
    ref = ref_product(a1, b1) * ref_product(a2, b2) * 0.25
    torch.testing.assert_close(loha_delta(LowRank(a1, b1), LowRank(a2, b2), 0.25), ref, rtol=1e-12, atol=1e-12)


# ---- LoKr ----------------------------------------------------------------------------------------------------
def test_kron_writer_matches_index_map_and_torch_kron():
    w1, w2 = rnd(3, 4), rnd(2, 5)
    out = lokr_delta(Full(w1), Full(w2), 1.0)
    torch.testing.assert_close(out, ref_kron_loops(w1, w2))
    torch.testing.assert_close(out, torch.kron(w1, w2))
    w2k = rnd(2, 3, 3, 3)
    torch.testing.assert_close(lokr_delta(Full(w1), Full(w2k), 0.5), ref_kron_loops(w1, w2k) * 0.5)


def test_lokr_both_full_ignores_alpha():
    p = {"lokr_w1": rnd(3, 4), "lokr_w2": rnd(5, 6), "alpha": torch.tensor(123.0)}
    assert module_rank(p) is None and module_scale(p) == 1.0
    torch.testing.assert_close(delta_weight(p, (15, 24), dtype=D), ref_kron_loops(p["lokr_w1"], p["lokr_w2"]))


def test_lokr_low_rank_w2_scale():
    p = {"lokr_w1": rnd(3, 4), "lokr_w2_a": rnd(5, 2), "lokr_w2_b": rnd(2, 6), "alpha": torch.tensor(1.0)}
    assert module_rank(p) == 2 and module_scale(p) == 0.5
    ref = torch.kron(p["lokr_w1"], ref_product(p["lokr_w2_a"], p["lokr_w2_b"])) * 0.5
    torch.testing.assert_close(delta_weight(p, (15, 24), dtype=D), ref)


def test_lokr_low_rank_w1_with_full_w2_scales_by_w1_rank():
    p = {"lokr_w1_a": rnd(6, 2), "lokr_w1_b": rnd(2, 8), "lokr_w2": rnd(3, 2), "alpha": torch.tensor(3.0)}
    assert module_rank(p) == 2
    ref = torch.kron(ref_product(p["lokr_w1_a"], p["lokr_w1_b"]), p["lokr_w2"]) * 1.5
    torch.testing.assert_close(delta_weight(p, dtype=D), ref)


def test_lokr_both_decomposed_uses_w2_rank_first():
    p = {"lokr_w1_a": rnd(4, 2), "lokr_w1_b": rnd(2, 4), "lokr_w2_a": rnd(6, 3), "lokr_w2_b": rnd(3, 5),
         "alpha": torch.tensor(6.0)}
    assert module_rank(p) == 3 and module_scale(p) == 2.0
    ref = torch.kron(ref_product(p["lokr_w1_a"], p["lokr_w1_b"]), ref_product(p["lokr_w2_a"], p["lokr_w2_b"])) * 2.0
    torch.testing.assert_close(delta_weight(p, (24, 20), dtype=D), ref)


def test_lokr_tucker_rank_is_core_size():
    # w2_a is (r, out_k) in the Tucker layout: its shape[1] (5) is not the rank (3).
    p = {"lokr_w1": rnd(2, 3), "lokr_t2": rnd(3, 3, 3, 3), "lokr_w2_a": rnd(3, 5), "lokr_w2_b": rnd(3, 4),
         "alpha": torch.tensor(1.5)}
    assert module_rank(p) == 3 and module_scale(p) == 0.5
    w2 = ref_tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    ref = ref_kron_loops(p["lokr_w1"], w2) * 0.5
    torch.testing.assert_close(delta_weight(p, (10, 12, 3, 3), dtype=D), ref)


def test_lokr_flat_conv_low_rank_w2():
    a, c, b, d, r = 2, 3, 4, 2, 2
    p = {"lokr_w1": rnd(a, c), "lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d * 9), "alpha": torch.tensor(2.0)}
    w2 = ref_product(p["lokr_w2_a"], p["lokr_w2_b"]).reshape(b, d, 3, 3)
    ref = ref_kron_loops(p["lokr_w1"], w2)
    torch.testing.assert_close(delta_weight(p, (a * b, c * d, 3, 3), dtype=D), ref)
    # LyCORIS keeps w2_b 4-D (r, d, kh, kw): same delta.
    p4 = dict(p, lokr_w2_b=p["lokr_w2_b"].reshape(r, d, 3, 3))
    torch.testing.assert_close(delta_weight(p4, (a * b, c * d, 3, 3), dtype=D), ref)


def test_lokr_full_conv_w2_and_lycoris_1x1_full_mode():
    p = {"lokr_w1": rnd(2, 3), "lokr_w2": rnd(4, 5, 3, 3)}
    torch.testing.assert_close(delta_weight(p, (8, 15, 3, 3), dtype=D), ref_kron_loops(p["lokr_w1"], p["lokr_w2"]))
    # LyCORIS 1x1 conv in full mode stores lokr_w2 as (k, n, 1, 1); sd-scripts stores it 2-D.
    p4 = {"lokr_w1": rnd(2, 3), "lokr_w2": rnd(4, 5, 1, 1)}
    ref = ref_kron_loops(p4["lokr_w1"], p4["lokr_w2"][:, :, 0, 0])
    torch.testing.assert_close(delta_weight(p4, (8, 15, 1, 1), dtype=D)[:, :, 0, 0], ref)
    p2 = {"lokr_w1": p4["lokr_w1"], "lokr_w2": p4["lokr_w2"][:, :, 0, 0]}
    torch.testing.assert_close(delta_weight(p2, (8, 15, 1, 1), dtype=D)[:, :, 0, 0], ref)


# ---- LoRA passthrough -----------------------------------------------------------------------------------------
def test_lora_plain_and_mid():
    p = {"lora_up.weight": rnd(6, 2), "lora_down.weight": rnd(2, 5), "alpha": torch.tensor(1.0)}
    assert algorithm_of(p) == "lora" and module_scale(p) == 0.5
    torch.testing.assert_close(delta_weight(p, dtype=D), ref_product(p["lora_up.weight"], p["lora_down.weight"]) * 0.5)
    up, mid, down = rnd(6, 2, 1, 1), rnd(2, 2, 3, 3), rnd(2, 4, 1, 1)
    pm = {"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "alpha": torch.tensor(4.0)}
    # dW[o, c, y, x] = sum_ij up[o, i] mid[i, j, y, x] down[j, c]
    ref = torch.einsum("oi,ijyx,jc->ocyx", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * 2.0
    torch.testing.assert_close(delta_weight(pm, (6, 4, 3, 3), dtype=D), ref)


# ---- errors --------------------------------------------------------------------------------------------------
def test_inner_dimensions_that_do_not_multiply_out_name_the_tensor():
    p = {"hada_w1_a": rnd(8, 2), "hada_w1_b": rnd(3, 6), "hada_w2_a": rnd(8, 2), "hada_w2_b": rnd(2, 6)}
    with pytest.raises(ValueError, match=r"hada_w1_b.*\(3, 6\).*hada_w1_a"):
        delta_weight(p)
    p = {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(4, 3), "lokr_w2_b": rnd(2, 4)}
    with pytest.raises(ValueError, match="lokr_w2_b"):
        delta_weight(p)
    p = {"lokr_w1": rnd(2, 2), "lokr_t2": rnd(3, 3, 3, 3), "lokr_w2_a": rnd(2, 5), "lokr_w2_b": rnd(3, 4)}
    with pytest.raises(ValueError, match="lokr_w2_a"):
        delta_weight(p)


def test_layer_shape_mismatch_names_expected_and_found():
    p = {"lokr_w1": rnd(2, 3), "lokr_w2": rnd(4, 5)}
    with pytest.raises(ValueError, match=r"\(8, 15\).*\(8, 16\)"):
        delta_weight(p, (8, 16))
    with pytest.raises(ValueError, match=r"\(15, 8\)"):
        delta_weight(p, (15, 8))


def test_missing_and_unknown_tensors():
    with pytest.raises(ValueError, match="hada_w2_b"):
        delta_weight({"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(2, 4), "hada_w2_a": rnd(4, 2)})
    with pytest.raises(ValueError, match="lokr_w2"):
        delta_weight({"lokr_w1": rnd(2, 2)})
    with pytest.raises(ValueError, match="not a LoHa, LoKr or LoRA"):
        delta_weight({"foo": rnd(2, 2)})


# ---- dtypes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_close_to_float64_reference(low):
    p = {"hada_w1_a": rnd(16, 4), "hada_w1_b": rnd(4, 12), "hada_w2_a": rnd(16, 4), "hada_w2_b": rnd(4, 12),
         "alpha": torch.tensor(2.0)}
    lowp = {k: v.to(low) for k, v in p.items()}
    exact = {k: v.to(D) for k, v in lowp.items()}  # the half values, exactly, in float64
    ref = ref_product(exact["hada_w1_a"], exact["hada_w1_b"]) * ref_product(exact["hada_w2_a"], exact["hada_w2_b"]) / 2
    out = delta_weight(lowp, (16, 12))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.to(D), ref, rtol=1e-5, atol=1e-5)
    pk = {"lokr_w1": rnd(3, 2).to(low), "lokr_w2_a": rnd(4, 2).to(low), "lokr_w2_b": rnd(2, 5).to(low)}
    ek = {k: v.to(D) for k, v in pk.items()}
    out = delta_weight(pk)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.to(D), torch.kron(ek["lokr_w1"], ek["lokr_w2_a"] @ ek["lokr_w2_b"]), rtol=1e-5, atol=1e-5)
    assert delta_weight(pk, dtype=low).dtype == low


def test_float64_inputs_compute_in_float64():
    p = {"lora_up.weight": rnd(4, 2) * 1e8, "lora_down.weight": rnd(2, 3) * 1e-8}
    out = delta_weight(p, dtype=D)
    torch.testing.assert_close(out, ref_product(p["lora_up.weight"], p["lora_down.weight"]), rtol=1e-14, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_factors_device():
    p = {"lokr_w1": rnd(2, 3).cuda(), "lokr_w2": rnd(4, 5).cuda()}
    out = delta_weight(p)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu().to(D), torch.kron(p["lokr_w1"].cpu(), p["lokr_w2"].cpu()), rtol=1e-6, atol=1e-6)


# ---- LyCORIS functional anchors (where LyCORIS is right) -------------------------------------------------------
def test_agrees_with_lycoris_loha_diff_weight():
    loha = pytest.importorskip("lycoris.functional.loha")
    w1a, w1b, w2a, w2b = rnd(10, 3), rnd(3, 7), rnd(10, 3), rnd(3, 7)
    p = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(2.0)}
    ly = loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=2.0 / 3, backend="torch")
    torch.testing.assert_close(delta_weight(p, dtype=D), ly)
    t1, t2, a1, b1, a2, b2 = rnd(3, 3, 3, 3), rnd(3, 3, 3, 3), rnd(3, 6), rnd(3, 4), rnd(3, 6), rnd(3, 4)
    pt = {"hada_t1": t1, "hada_w1_a": a1, "hada_w1_b": b1, "hada_t2": t2, "hada_w2_a": a2, "hada_w2_b": b2,
          "alpha": torch.tensor(1.0)}
    ly = loha.diff_weight(b1, a1, b2, a2, t1, t2, gamma=1.0 / 3, backend="torch")
    torch.testing.assert_close(delta_weight(pt, dtype=D), ly)


def test_agrees_with_lycoris_lokr_diff_weight_except_tucker_scale():
    lokr = pytest.importorskip("lycoris.functional.lokr")
    w1, w2a, w2b = rnd(3, 4), rnd(5, 2), rnd(2, 6)
    p = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(3.0)}
    ly = lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=3.0, backend="torch")
    torch.testing.assert_close(delta_weight(p, dtype=D), ly)
    w2 = rnd(5, 6)
    pf = {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)}
    ly = lokr.diff_weight(w1, None, None, w2, None, None, None, gamma=7.0, backend="torch")
    torch.testing.assert_close(delta_weight(pf, dtype=D), ly)
    # Tucker: LyCORIS divides alpha by w2_a.shape[1] (= out_k, 5), hadakron by the core size (3).
    t2, ta, tb = rnd(3, 3, 3, 3), rnd(3, 5), rnd(3, 4)
    pt = {"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": ta, "lokr_w2_b": tb, "alpha": torch.tensor(3.0)}
    ly = lokr.diff_weight(w1, None, None, None, ta, tb, t2, gamma=3.0, backend="torch")
    torch.testing.assert_close(delta_weight(pt, dtype=D) * (3 / 5), ly)


def test_scale_edge_cases_missing_alpha_zero_alpha_and_lora_rank():
    p = {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(4, 2), "lokr_w2_b": rnd(2, 4)}
    assert module_rank(p) == 2 and module_scale(p) == 1.0  # no alpha: scale 1 whatever the rank
    torch.testing.assert_close(delta_weight(p, dtype=D), torch.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"]))
    assert module_scale(dict(p, alpha=torch.tensor(0.0))) == 0.0  # ComfyUI's rule: alpha 0 means scale 0
    lora = {"lora_up.weight": rnd(3, 5, 1, 1), "lora_down.weight": rnd(5, 2, 3, 3), "alpha": torch.tensor(2.5)}
    assert module_rank(lora) == 5 and module_scale(lora) == pytest.approx(0.5)
    assert algorithm_of({"alpha": torch.tensor(1.0)}) is None and module_rank({}) is None


def test_agrees_with_lycoris_lokr_conv_and_decompose_both():
    lokr = pytest.importorskip("lycoris.functional.lokr")
    w1, w2a, w2b = rnd(2, 3), rnd(4, 2), rnd(2, 5, 3, 3)  # LyCORIS flat conv keeps w2_b 4-D
    p = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}
    ly = lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=1.0, backend="torch")
    torch.testing.assert_close(delta_weight(p, (8, 15, 3, 3), dtype=D), ly.reshape(8, 15, 3, 3))
    # both factors decomposed with the same rank: LyCORIS's w1-first and ComfyUI's w2-first rank agree
    w1a, w1b, w2a, w2b = rnd(6, 2), rnd(2, 4), rnd(5, 2), rnd(2, 7)
    pb = {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(3.0)}
    ly = lokr.diff_weight(None, w1a, w1b, None, w2a, w2b, None, gamma=3.0, backend="torch")
    torch.testing.assert_close(delta_weight(pb, dtype=D), ly)
