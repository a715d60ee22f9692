"""Benchmark of hadakron.ops: delta-W rebuilds and bypass products at SDXL / Anima layer shapes.

Run: python bench/bench_ops.py [--threads 1] [--repeats 5] [--tokens 1024] [--quick] [--clock thread|wall] [--thp]

Anchors in the same run: lycoris-lora (its functional API and its default LoKr module), ComfyUI's formulas written
as ComfyUI 0.29 computes them (torch.kron of the rebuilt factors times the scale; (w1a@w1b)*(w2a@w2b)*scale), and
the write floor (torch.empty + fill_ of the output). Times are medians over interleaved repeats. The default clock
is the main thread's CPU time (time.thread_time), which with one torch thread ignores time spent descheduled on a
shared machine; use --clock wall on a quiet machine. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--thp" in sys.argv:  # must be set before torch allocates: 2 MiB pages for large CPU tensors (c10 allocator)
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hadakron.ops import (  # noqa: E402
    Full, LowRank, Tucker, delta_weight, factorization, loha_bypass, loha_bypass_mode, lokr_bypass_conv2d,
    lokr_bypass_linear, lokr_linear,
)

try:
    from lycoris.functional import loha as ly_loha, lokr as ly_lokr
    from lycoris.modules.lokr import LokrModule
except Exception:  # pragma: no cover - the bench still runs without LyCORIS
    ly_loha = ly_lokr = LokrModule = None

LINEAR = [("640x640", 640, 640), ("1280x1280", 1280, 1280), ("2048->640", 640, 2048), ("1280->10240", 10240, 1280),
          ("5120->1280", 1280, 5120), ("2048x2048", 2048, 2048), ("2048->8192", 8192, 2048)]
CONV = [("conv1280 3x3 flat", 1280, 1280, False), ("conv1280 3x3 tucker", 1280, 1280, True)]

CLOCK = time.thread_time


def measure(fns: dict, repeats: int) -> dict:
    """Median time (ms) of each callable, the callables interleaved round by round after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = CLOCK()
            f()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def gen(*shape):
    return torch.randn(*shape) * 0.1


# ---- parameter sets as sd-scripts / LyCORIS build them (factor -1) --------------------------------------------------
def lokr_params(out, inn, r, kernel=None, tucker=False):
    out_l, out_k = factorization(out)
    in_m, in_n = factorization(inn)
    k = tuple(kernel or ())
    p = {"lokr_w1": gen(out_l, in_m), "alpha": torch.tensor(r / 2)}
    if r >= max(out_k, in_n) / 2:
        p["lokr_w2"] = gen(out_k, in_n, *k)
    elif k and tucker:
        p.update(lokr_t2=gen(r, r, *k), lokr_w2_a=gen(r, out_k), lokr_w2_b=gen(r, in_n))
    else:
        p.update(lokr_w2_a=gen(out_k, r), lokr_w2_b=gen(r, in_n, *k))  # LyCORIS keeps the kernel axes on w2_b
    return p


def loha_params(out, inn, r, kernel=None, tucker=False):
    k = tuple(kernel or ())
    if k and tucker:
        return {"hada_t1": gen(r, r, *k), "hada_w1_a": gen(r, out), "hada_w1_b": gen(r, inn),
                "hada_t2": gen(r, r, *k), "hada_w2_a": gen(r, out), "hada_w2_b": gen(r, inn), "alpha": torch.tensor(r / 2)}
    cols = inn * (k[0] * k[1] if k else 1)
    return {"hada_w1_a": gen(out, r), "hada_w1_b": gen(r, cols), "hada_w2_a": gen(out, r), "hada_w2_b": gen(r, cols),
            "alpha": torch.tensor(r / 2)}


# ---- anchors ------------------------------------------------------------------------------------------------------
def comfy_lokr(p, shape):
    """ComfyUI 0.29 weight_adapter/lokr.py calculate_weight, up to the scaled diff (strength 1)."""
    w1 = p["lokr_w1"]
    dim = None
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        dim = p["lokr_w2_b"].shape[0]
        # ComfyUI passes this einsum result straight to torch.kron, which raises on it (non-contiguous); the
        # .contiguous() here is the minimal fix so the formula can be timed at all.
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"]).contiguous()
    else:
        dim = p["lokr_w2_b"].shape[0]
        w2 = torch.mm(p["lokr_w2_a"], p["lokr_w2_b"].reshape(dim, -1))
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    alpha = float(p["alpha"]) / dim if dim is not None else 1.0
    lora_diff = torch.kron(w1, w2).reshape(shape)
    return (1.0 * alpha) * lora_diff


def comfy_loha(p, shape):
    """ComfyUI 0.29 weight_adapter/loha.py calculate_weight, up to the scaled diff (strength 1)."""
    alpha = float(p["alpha"]) / p["hada_w1_b"].shape[0]
    if "hada_t1" in p:
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
    else:
        m1 = torch.mm(p["hada_w1_a"], p["hada_w1_b"])
        m2 = torch.mm(p["hada_w2_a"], p["hada_w2_b"])
    lora_diff = (m1 * m2).reshape(shape)
    return (1.0 * alpha) * lora_diff


def lycoris_lokr(p):
    g = p.get
    return ly_lokr.diff_weight(g("lokr_w1"), None, None, g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), g("lokr_t2"),
                               gamma=float(p["alpha"]), backend="torch")


def lycoris_loha(p):
    g = p.get
    return ly_loha.diff_weight(p["hada_w1_b"], p["hada_w1_a"], p["hada_w2_b"], p["hada_w2_a"], g("hada_t1"), g("hada_t2"),
                               gamma=float(p["alpha"]) / p["hada_w1_b"].shape[0], backend="torch")


# ---- sections -----------------------------------------------------------------------------------------------------
def cases(quick):
    for name, out, inn in LINEAR:
        yield name, out, inn, None, False
    for name, out, inn, tucker in CONV:
        yield name, out, inn, (3, 3), tucker


RESULTS: dict = {}


def bench_delta(args):
    print("\n## Delta-W rebuild (ms; ratios: ours/floor, lycoris/ours, comfy/ours)")
    hdr = f"{'shape':22s} {'r':>3s} {'alg':5s} {'floor':>8s} {'ours':>8s} {'lycoris':>8s} {'comfy':>8s}  {'ours/fl':>7s} {'ly/ours':>7s} {'cf/ours':>7s}"
    print(hdr)
    for name, out, inn, k, tucker in cases(args.quick):
        shape = (out, inn, *k) if k else (out, inn)
        for r in args.ranks:
            for alg, make, ly, cf in (("lokr", lokr_params, lycoris_lokr, comfy_lokr),
                                      ("loha", loha_params, lycoris_loha, comfy_loha)):
                p = make(out, inn, r, k, tucker)
                fns = {"floor": lambda: torch.empty(shape).fill_(1.0),
                       "ours": lambda: delta_weight(p, shape)}
                if ly_lokr is not None:
                    fns["lycoris"] = lambda: ly(p)
                fns["comfy"] = lambda: cf(p, shape)
                reps = args.repeats * 3 if name == "1280->10240" and alg == "lokr" else args.repeats
                t = measure(fns, reps)
                RESULTS[("delta", name, r, alg)] = t
                lyt = t.get("lycoris", float("nan"))
                note = "" if reps == args.repeats else f" ({reps} repeats)"
                if alg == "lokr":
                    note += " w2 " + ("full" if "lokr_w2" in p else "tucker" if "lokr_t2" in p else "low-rank")
                    if "lokr_t2" in p:
                        note += " (comfy* raises in 0.29; timed with .contiguous())"
                print(f"{name:22s} {r:3d} {alg:5s} {t['floor']:8.1f} {t['ours']:8.1f} {lyt:8.1f} {t['comfy']:8.1f}  "
                      f"{t['ours'] / t['floor']:7.2f} {lyt / t['ours']:7.2f} {t['comfy'] / t['ours']:7.2f}{note}")


def _factors_lokr(p):
    w1 = Full(p["lokr_w1"])
    if "lokr_w2" in p:
        return w1, Full(p["lokr_w2"])
    if "lokr_t2" in p:
        return w1, Tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    return w1, LowRank(p["lokr_w2_a"], p["lokr_w2_b"])


def bench_bypass(args):
    print(f"\n## Bypass forward+backward (ms; {args.tokens} tokens, conv input 1x1280x32x32, grads for x and every factor)")
    print(f"{'shape':22s} {'r':>3s} {'alg':5s} {'ours':>8s} {'lycoris':>8s} {'ly/ours':>7s}  note")
    for name, out, inn, k, tucker in cases(args.quick):
        if args.quick and name not in ("1280x1280", "1280->10240", "conv1280 3x3 flat"):
            continue
        for r in args.ranks:
            if k:
                x = torch.randn(1, inn, 32, 32, requires_grad=True)
            else:
                x = torch.randn(args.tokens, inn, requires_grad=True)
            for alg in ("lokr", "loha"):
                p = {kk: v.clone().requires_grad_(kk != "alpha") for kk, v in
                     (lokr_params if alg == "lokr" else loha_params)(out, inn, r, k, tucker).items()}
                leaves = [x] + [v for kk, v in p.items() if kk != "alpha"]
                scale = float(p["alpha"]) / r
                extra = {"padding": 1} if k else {}
                note = ""
                if alg == "lokr":
                    w1, w2 = _factors_lokr(p)
                    s = scale if "lokr_w2" not in p else 1.0
                    if k:
                        ours = lambda: lokr_bypass_conv2d(x, w1, w2, s, padding=1)  # noqa: E731
                    else:
                        ours = lambda: lokr_bypass_linear(x, w1, w2, s)  # noqa: E731
                    g = p.get
                    ly = lambda: ly_lokr.bypass_forward_diff(  # noqa: E731
                        x, None, g("lokr_w1"), None, None, g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), g("lokr_t2"),
                        gamma=float(p["alpha"]), extra_args=extra, backend="torch")
                else:
                    if "hada_t1" in p:
                        f1 = Tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
                        f2 = Tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
                    else:
                        f1 = LowRank(p["hada_w1_a"], p["hada_w1_b"])
                        f2 = LowRank(p["hada_w2_a"], p["hada_w2_b"])
                    kw = dict(kernel_size=k, padding=1) if k else {}
                    ours = lambda: loha_bypass(x, f1, f2, scale, **kw)  # noqa: E731
                    g = p.get
                    ly = lambda: ly_loha.bypass_forward_diff(  # noqa: E731
                        x, None, p["hada_w1_b"].reshape(r, -1) if not k or "hada_t1" in p else p["hada_w1_b"].reshape(r, inn, *k),
                        p["hada_w1_a"], p["hada_w2_b"].reshape(r, -1) if not k or "hada_t1" in p else p["hada_w2_b"].reshape(r, inn, *k),
                        p["hada_w2_a"], g("hada_t1"), g("hada_t2"), gamma=torch.tensor(scale), extra_args=extra, backend="torch")
                    tokens = x.shape[0] * (32 * 32 if k else 1)
                    cols = inn * (9 if k else 1)
                    note = "mode " + loha_bypass_mode(tokens, out, cols, r, r)

                def step(fn):
                    def run():
                        y = fn()
                        grads = torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
                        return grads
                    return run

                fns = {"ours": step(ours)}
                if ly_lokr is not None:
                    try:
                        step(ly)()
                        fns["lycoris"] = step(ly)
                    except Exception as e:  # LyCORIS 4.1.3's Tucker LoKr bypass uses w2_a untransposed
                        note += f" lycoris fails: {type(e).__name__}: {str(e)[:70]}"
                t = measure(fns, max(3, args.repeats // 2))
                lyt = t.get("lycoris", float("nan"))
                print(f"{name:22s} {r:3d} {alg:5s} {t['ours']:8.1f} {lyt:8.1f} {lyt / t['ours']:7.2f}  {note}")


def bench_training_step(args):
    n, dim, r = 4096, 1280, 16
    print(f"\n## LoKr training step, forward+backward, {n} tokens, Linear {dim}x{dim}, rank {r} (ms)")
    lin = nn.Linear(dim, dim)
    lin.requires_grad_(False)
    x = torch.randn(n, dim, requires_grad=True)
    g = torch.randn(n, dim)
    p = lokr_params(dim, dim, r)
    w1 = p["lokr_w1"].clone().requires_grad_()
    w2a = p["lokr_w2_a"].clone().requires_grad_()
    w2b = p["lokr_w2_b"].clone().requires_grad_()
    s = float(p["alpha"]) / r

    def frozen():
        lin(x).backward(g)
        x.grad = None

    def ours_additive():
        (lin(x) + lokr_bypass_linear(x, Full(w1), LowRank(w2a, w2b), s)).backward(g)
        x.grad = w1.grad = w2a.grad = w2b.grad = None

    def ours_fused():
        lokr_linear(x, lin.weight, lin.bias, Full(w1), LowRank(w2a, w2b), s).backward(g)
        x.grad = w1.grad = w2a.grad = w2b.grad = None

    fns = {"frozen Linear": frozen, "frozen + lokr_bypass_linear": ours_additive, "lokr_linear (fused)": ours_fused}
    if LokrModule is not None:
        mod = LokrModule("bench", lin, multiplier=1.0, lora_dim=r, alpha=r / 2)
        with torch.no_grad():
            mod.lokr_w2_b.normal_()

        def lycoris():
            mod(x).backward(g)
            x.grad = None
            for q in mod.parameters():
                q.grad = None
        fns["LyCORIS LokrModule (default)"] = lycoris
    t = measure(fns, args.repeats * 2)
    RESULTS["step"] = t
    base = t["frozen Linear"]
    for k, v in t.items():
        print(f"{k:32s} {v:8.1f}  {v / base:5.2f}x")


def main(argv=None) -> int:
    global CLOCK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--quick", action="store_true", help="fewer bypass shapes")
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread")
    ap.add_argument("--only", choices=("delta", "bypass", "step"), nargs="+")
    ap.add_argument("--thp", action="store_true",
                    help="THP_MEM_ALLOC_ENABLE=1: huge pages for large tensors, so fresh outputs cost their writes "
                         "rather than 4 KiB page faults (which otherwise dominate every large rebuild on CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} thread(s), clock {args.clock}, median of {args.repeats}, "
          f"lycoris {'present' if ly_lokr is not None else 'absent'}, huge pages {'on' if args.thp else 'off'}")
    sections = args.only or ("delta", "bypass", "step")
    with torch.no_grad():
        if "delta" in sections:
            bench_delta(args)
    if "bypass" in sections:
        bench_bypass(args)
    if "step" in sections:
        bench_training_step(args)
    summary()
    return 0


def summary():
    """The issue's performance goals against this run's numbers."""
    print("\n## Goals (this run)")
    for r in (16, 32):
        t = RESULTS.get(("delta", "1280->10240", r, "lokr"))
        if t:
            ly = t.get("lycoris", float("nan")) / t["ours"]
            print(f"LoKr delta-W 1280->10240 r{r}: ours/floor {t['ours'] / t['floor']:.2f} (goal <= 1.3), "
                  f"lycoris/ours {ly:.2f}, comfy/ours {t['comfy'] / t['ours']:.2f} (goal >= 2)")
    loha = [(k[1], k[2], v["ours"] / v["floor"]) for k, v in RESULTS.items() if k[0] == "delta" and k[3] == "loha"]
    if loha:
        worst = max(loha, key=lambda e: e[2])
        within = sum(1 for e in loha if e[2] <= 3.0)
        print(f"LoHa delta-W ours/floor: {within}/{len(loha)} cases within 3x (goal); worst {worst[2]:.2f} at "
              f"{worst[0]} r{worst[1]}")
    t = RESULTS.get("step")
    if t:
        base = t["frozen Linear"]
        print(f"LoKr training step: lokr_linear {t['lokr_linear (fused)'] / base:.2f}x, additive "
              f"{t['frozen + lokr_bypass_linear'] / base:.2f}x the frozen Linear (goal <= 1.15)")


if __name__ == "__main__":
    raise SystemExit(main())
