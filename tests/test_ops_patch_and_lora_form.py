"""patched_weight (plain and DoRA) and lora_form exactness, against float64 references written here."""

import pytest
import torch

from hadakron.ops import delta_weight, lora_form, patched_weight

D = torch.float64


def rnd(*shape, seed=[100]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]), dtype=D)


def loha_params(out=6, cols=5, r=2, alpha=1.0):
    return {"hada_w1_a": rnd(out, r), "hada_w1_b": rnd(r, cols), "hada_w2_a": rnd(out, r), "hada_w2_b": rnd(r, cols),
            "alpha": torch.tensor(alpha)}


def ref_loha(p):
    s = float(p["alpha"]) / p["hada_w1_b"].shape[0]
    return torch.einsum("pi,iq->pq", p["hada_w1_a"], p["hada_w1_b"]) * torch.einsum(
        "pi,iq->pq", p["hada_w2_a"], p["hada_w2_b"]) * s


# ---- patched_weight --------------------------------------------------------------------------------------------
def test_patched_weight_plain_with_strength():
    p = loha_params()
    w = rnd(6, 5)
    out = patched_weight(w, p, 0.7, dtype=D)
    torch.testing.assert_close(out, w + 0.7 * ref_loha(p))
    assert torch.equal(w, w.clone())  # input untouched is checked below
    w0 = w.clone()
    patched_weight(w, p, 1.0, dtype=D)
    assert torch.equal(w, w0)


def test_patched_weight_casts_and_returns_requested_dtype():
    p = {k: v.to(torch.bfloat16) for k, v in loha_params().items()}
    w = rnd(6, 5).to(torch.bfloat16)
    out = patched_weight(w, p, 1.0, dtype=torch.float32)
    assert out.dtype == torch.float32
    ref = w.to(D) + ref_loha({k: v.to(D) for k, v in p.items()})
    torch.testing.assert_close(out.to(D), ref, rtol=1e-5, atol=1e-5)


def test_dora_row_wise_uses_norm_of_patched_weight():
    p = loha_params(alpha=2.0)
    w = rnd(6, 5)
    ds = rnd(6, 1).abs() + 0.5
    p["dora_scale"] = ds
    merged = w + ref_loha(p)
    eps = torch.finfo(D).eps
    norms = torch.stack([merged[i].pow(2).sum().sqrt() for i in range(6)]).reshape(6, 1)
    ref = merged * ds / (norms + eps)
    torch.testing.assert_close(patched_weight(w, p, 1.0, dtype=D), ref)
    # strength interpolates between W and the DoRA weight, as ComfyUI applies it
    torch.testing.assert_close(patched_weight(w, p, 0.3, dtype=D), w + 0.3 * (ref - w))


def test_dora_column_wise_on_a_conv_weight():
    out_c, in_c = 4, 3
    p = {"lokr_w1": rnd(2, 1), "lokr_w2": rnd(2, 3, 3, 3)}
    w = rnd(out_c, in_c, 3, 3)
    ds = rnd(1, in_c, 1, 1).abs() + 0.5
    p["dora_scale"] = ds
    merged = w + torch.kron(p["lokr_w1"][:, :, None, None], p["lokr_w2"])
    norms = torch.tensor([merged[:, j].pow(2).sum().sqrt().item() for j in range(in_c)], dtype=D)
    ref = merged * ds / (norms.reshape(1, in_c, 1, 1) + torch.finfo(D).eps)
    torch.testing.assert_close(patched_weight(w, p, dtype=D), ref)


def test_dora_matches_lycoris_weight_decompose():
    general = pytest.importorskip("lycoris.functional.general")
    p = loha_params(alpha=2.0)
    w = rnd(6, 5)
    ds = rnd(6, 1).abs() + 0.5
    merged = w + ref_loha(p)
    ly = general.weight_decompose(merged, ds, 1.0, True, backend="torch")
    torch.testing.assert_close(patched_weight(w, dict(p, dora_scale=ds), dtype=D), ly)


def test_dora_scale_of_wrong_size_is_refused():
    p = dict(loha_params(), dora_scale=rnd(7, 1))
    with pytest.raises(ValueError, match="dora_scale"):
        patched_weight(rnd(6, 5), p, dtype=D)


# ---- lora_form --------------------------------------------------------------------------------------------------
def check_form(p, shape, max_rank):
    up, down = lora_form(p, shape, dtype=D)
    out = shape[0]
    assert up.shape[0] == out and down.shape[1] == torch.Size(shape[1:]).numel()
    assert up.shape[1] == down.shape[0] <= max_rank
    torch.testing.assert_close(up @ down, delta_weight(p, shape, dtype=D).reshape(out, -1), rtol=1e-10, atol=1e-10)
    return up.shape[1]


def test_lora_form_loha_is_rank_r1_r2_and_exact():
    p = loha_params(out=30, cols=40, r=3, alpha=1.5)
    assert check_form(p, (30, 40), 9) == 9
    # against the explicit reference, not only delta_weight
    up, down = lora_form(p, (30, 40), dtype=D)
    torch.testing.assert_close(up @ down, ref_loha(p))


def test_lora_form_loha_tucker_and_flat_conv():
    r = 2
    pt = {"hada_t1": rnd(r, r, 3, 3), "hada_w1_a": rnd(r, 8), "hada_w1_b": rnd(r, 6),
          "hada_t2": rnd(r, r, 3, 3), "hada_w2_a": rnd(r, 8), "hada_w2_b": rnd(r, 6), "alpha": torch.tensor(1.0)}
    assert check_form(pt, (8, 6, 3, 3), 4) == 4
    pf = loha_params(out=8, cols=6 * 9, r=2)
    assert check_form(pf, (8, 6, 3, 3), 4) == 4


def test_lora_form_loha_falls_back_to_trivial_form_when_r1r2_is_large():
    p = loha_params(out=5, cols=7, r=3)
    assert check_form(p, (5, 7), 5) == 5


def test_lora_form_lokr_low_rank_w2_rank_is_min_side_of_w1_times_r():
    # W1 (4, 6), W2 = (10, r=2) @ (2, 12): R = min(4, 6) * 2 = 8
    p = {"lokr_w1": rnd(4, 6), "lokr_w2_a": rnd(10, 2), "lokr_w2_b": rnd(2, 12), "alpha": torch.tensor(1.0)}
    assert check_form(p, (40, 72), 8) == 8
    up, down = lora_form(p, (40, 72), dtype=D)
    torch.testing.assert_close(up @ down, torch.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"]) * 0.5)


def test_lora_form_lokr_full_and_tucker_and_decomposed_w1():
    pf = {"lokr_w1": rnd(2, 3), "lokr_w2": rnd(10, 12)}  # R = 2 * 10 = 20
    assert check_form(pf, (20, 36), 20) == 20
    pt = {"lokr_w1": rnd(2, 3), "lokr_t2": rnd(2, 2, 3, 3), "lokr_w2_a": rnd(2, 10), "lokr_w2_b": rnd(2, 8),
          "alpha": torch.tensor(4.0)}
    assert check_form(pt, (20, 24, 3, 3), 4) == 4
    pd = {"lokr_w1_a": rnd(12, 1), "lokr_w1_b": rnd(1, 10), "lokr_w2_a": rnd(9, 2), "lokr_w2_b": rnd(2, 8),
          "alpha": torch.tensor(1.0)}
    assert check_form(pd, (108, 80), 2) == 2
    pc = {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(6, 2), "lokr_w2_b": rnd(2, 5 * 9)}
    assert check_form(pc, (12, 10, 3, 3), 4) == 4


def test_lora_form_lora_passthrough_with_mid():
    p = {"lora_up.weight": rnd(6, 2), "lora_down.weight": rnd(2, 9), "alpha": torch.tensor(1.0)}
    assert check_form(p, (6, 9), 2) == 2
    pm = {"lora_up.weight": rnd(6, 2, 1, 1), "lora_mid.weight": rnd(2, 2, 3, 3), "lora_down.weight": rnd(2, 4, 1, 1),
          "alpha": torch.tensor(2.0)}
    assert check_form(pm, (6, 4, 3, 3), 2) == 2


def test_lora_form_half_inputs_compute_in_float32():
    p = {k: v.to(torch.float16) for k, v in loha_params(out=20, cols=30, r=2).items()}
    up, down = lora_form(p, (20, 30))
    assert up.dtype == torch.float32 and down.dtype == torch.float32
    torch.testing.assert_close((up.to(D) @ down.to(D)), ref_loha({k: v.to(D) for k, v in p.items()}), rtol=1e-5, atol=1e-5)


def test_results_can_be_modified_in_place_with_grad_mode_on():
    p = loha_params()
    w = rnd(6, 5).requires_grad_()
    out = patched_weight(w, p, 0.5, dtype=D)
    assert not out.requires_grad
    out.add_(1.0)
    dw = delta_weight(p, (6, 5, 1, 1), dtype=D)
    dw.mul_(2.0)  # a reshaped result is not a no_grad view
    torch.testing.assert_close(dw[:, :, 0, 0], 2 * ref_loha(p))
