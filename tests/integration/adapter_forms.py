"""Random LoHa/LoKr parameter dicts in every file form, and an independent float64 delta-W reference.

Used by the loader integration tests; pure torch (no ComfyUI, no hadakron.ops) so the reference is independent.
"""
from __future__ import annotations

import math

import torch

LINEAR_FORMS = ("loha", "lokr_full", "lokr_lowrank", "lokr_both")
CONV_FORMS = ("loha", "loha_tucker", "lokr_full", "lokr_lowrank", "lokr_both", "lokr_tucker")


def _split(n: int) -> tuple[int, int]:
    """(small, large) with small * large == n, small in {4, 2, 1} (the Kronecker w1 side)."""
    for a in (4, 2):
        if n % a == 0 and n // a >= 1:
            return a, n // a
    return 1, n


def make_params(form: str, shape: tuple[int, ...], g: torch.Generator, *, rank: int = 3, alpha: float = 2.0,
                dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Nonzero random factors of `form` for a layer weight of `shape` ((out, in) or (out, in, kh, kw))."""
    out, cin = shape[0], shape[1]
    k = tuple(shape[2:])
    kk = math.prod(k) if k else 1

    def rnd(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype)

    p: dict[str, torch.Tensor] = {}
    if form == "loha":
        p = {"hada_w1_a": rnd(out, rank), "hada_w1_b": rnd(rank, cin * kk),
             "hada_w2_a": rnd(out, rank), "hada_w2_b": rnd(rank, cin * kk)}
    elif form == "loha_tucker":
        assert k, "Tucker needs a conv kernel"
        p = {"hada_t1": rnd(rank, rank, *k), "hada_w1_a": rnd(rank, out), "hada_w1_b": rnd(rank, cin),
             "hada_t2": rnd(rank, rank, *k), "hada_w2_a": rnd(rank, out), "hada_w2_b": rnd(rank, cin)}
    else:
        a, c = _split(out)
        b, d = _split(cin)
        if form == "lokr_full":
            p = {"lokr_w1": rnd(a, b), "lokr_w2": rnd(c, d, *k)}
        elif form == "lokr_lowrank":
            p = {"lokr_w1": rnd(a, b), "lokr_w2_a": rnd(c, rank), "lokr_w2_b": rnd(rank, d * kk)}
        elif form == "lokr_both":
            p = {"lokr_w1_a": rnd(a, rank), "lokr_w1_b": rnd(rank, b),
                 "lokr_w2_a": rnd(c, rank), "lokr_w2_b": rnd(rank, d * kk)}
        elif form == "lokr_tucker":
            assert k, "Tucker needs a conv kernel"
            p = {"lokr_w1": rnd(a, b), "lokr_t2": rnd(rank, rank, *k), "lokr_w2_a": rnd(rank, c),
                 "lokr_w2_b": rnd(rank, d)}
        else:
            raise ValueError(form)
    p["alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return p


def reference_delta(params: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Scaled delta-W in float64 from the LyCORIS definitions (independent of hadakron.ops)."""
    P = {k: v.to(torch.float64) for k, v in params.items()}
    alpha = float(P["alpha"]) if "alpha" in P else None
    if "hada_w1_a" in P:
        rank = P["hada_w1_b"].shape[0]
        if "hada_t1" in P:
            m1 = torch.einsum("ijkl,jr,ip->prkl", P["hada_t1"], P["hada_w1_b"], P["hada_w1_a"])
            m2 = torch.einsum("ijkl,jr,ip->prkl", P["hada_t2"], P["hada_w2_b"], P["hada_w2_a"])
        else:
            m1 = P["hada_w1_a"] @ P["hada_w1_b"]
            m2 = P["hada_w2_a"] @ P["hada_w2_b"]
        scale = alpha / rank if alpha is not None else 1.0
        return (m1 * m2 * scale).reshape(shape)
    rank = None
    if "lokr_w1" in P:
        w1 = P["lokr_w1"]
    else:
        w1 = P["lokr_w1_a"] @ P["lokr_w1_b"]
        rank = P["lokr_w1_b"].shape[0]
    if "lokr_w2" in P:
        w2 = P["lokr_w2"]
    elif "lokr_t2" in P:
        w2 = torch.einsum("ijkl,jr,ip->prkl", P["lokr_t2"], P["lokr_w2_b"], P["lokr_w2_a"])
        rank = P["lokr_t2"].shape[0]
    else:
        w2 = P["lokr_w2_a"] @ P["lokr_w2_b"]
        rank = P["lokr_w2_b"].shape[0]
    scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # torch.kron needs contiguous inputs here (the einsum result is not: the bug ComfyUI 0.29 trips on)
    return (torch.kron(w1.contiguous(), w2.contiguous()) * scale).reshape(shape)
