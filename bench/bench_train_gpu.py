"""Training s/step and peak memory at full size: hadakron's adapters vs ComfyUI core's train-step math vs LyCORIS.

Models: tests/models.py's SDXLUNet (SDXLConfig.full(): model_channels 320, real depths, context 2048, adm 2816)
at 1024x1024 images (128x128 latents, batch 1, 77 context tokens) and AnimaDiT (AnimaConfig.full(): 2048
channels, 28 blocks, 16 heads; 1024x1024 images = 4096 patch tokens of 68, 256 context tokens of 1024). These
are hadakron's own builders with the real module names and widths (not ComfyUI's classes; COMFYUI_PATH is not
used): weights are random (normal, std fan_in**-0.5), built on the meta device and materialised on the device.
`--quick` uses tiny widths, one transformer block per level (SDXL) / 2 blocks (Anima), 8x8 latents / 16 tokens
(CPU, a few seconds).

The same layers are adapted for every method (the ones hadakron selects, convs included) and every method
trains through the same loop (hadakron.train.train: AdamW, flow-matching MSE, bf16 autocast, fp32 adapters):
- ours: hadakron.network.AdapterNetwork (bypass: y = layer(x) + adapter(x), weights untouched);
- core: ComfyUI core's train step math written in pure torch (ComfyUI is not imported): as its weight wrapper
  (comfy/weight_adapter lokr.py LokrDiff / loha.py LohaDiff `__call__`, as nodes_train.py's TrainLoraNode installs
  it), each forward casts the base weight to the compute dtype and adds the materialised delta-W:
  LoKr W + kron(w1, w2) with full w1/w2 from `create_train` (`rank` used as the factor, alpha has no effect),
  LoHa W + (w1a w1b)*(w2a w2b)*alpha/rank through the factor-saving HadaWeight autograd (as ComfyUI's);
- lycoris: lycoris-lora's LokrModule (full_matrix, same factor) / LohaModule (same rank), `apply_to()`.
Base dtypes: bf16 (all weights bf16), fp8 (Linear/Conv2d weights float8_e4m3fn; the layers no method adapts are
upcast to bf16 per layer in their forward, as comfy.ops does; adapted layers are left to the method: core upcasts
as ComfyUI does, ours and LyCORIS run on the fp8 weight as they can, and a failure is reported as "n/a (...)").
Timing: median over `--steps` steps after `--warmup` steps (torch.cuda.synchronize on CUDA). Memory: CUDA
max_memory_allocated over the timed steps (model included); CPU: peak RSS over the timed steps (VmHWM after a
clear_refs reset) minus RSS before the run, labelled as such.

Run: python bench/bench_train_gpu.py [--quick] [--json PATH] [--models sdxl,anima] [--steps 5] [--warmup 2]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_train import _rss_mb  # noqa: E402
from hadakron.network import AdapterNetwork, NetworkConfig  # noqa: E402
from hadakron.ops import factorization  # noqa: E402
from hadakron.ops.autograd import HadaWeight  # noqa: E402
from hadakron.train import Batch, FlowMatchingObjective, TrainCallbacks, TrainConfig, train  # noqa: E402
from tests.models import AnimaConfig, AnimaDiT, SDXLConfig, SDXLUNet  # noqa: E402

COMPUTE = torch.bfloat16
FP8 = getattr(torch, "float8_e4m3fn", None)
MODELS, ALGOS, METHODS, BASES = ("sdxl", "anima"), ("lokr", "loha"), ("ours", "core", "lycoris"), ("bf16", "fp8")
FP8_NA = "n/a (fp8 base not supported in this build)"
QUICK_SDXL = SDXLConfig(transformer_depth=(0, 1, 1), middle_depth=1, num_res_blocks=1)  # tiny widths, shallow
QUICK_ANIMA = AnimaConfig(num_blocks=2, adapter_blocks=1)


@dataclass
class Setup:
    """One base model on the device, with its example batch and the layers every method adapts."""

    family: str
    model: nn.Module
    x0: torch.Tensor
    call: object
    targets: list[nn.Module] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- models
def _init_(model: nn.Module) -> None:
    """Random weights: matrices normal with std fan_in**-0.5, biases 0, norm scales 1, embeddings normal."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, (p.numel() // p.shape[0]) ** -0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def _build(family: str, quick: bool, device: torch.device) -> nn.Module:
    """The model at full (or tiny) size with random weights, fp32 on `device`."""
    cfg = (QUICK_SDXL if quick else SDXLConfig.full()) if family == "sdxl" else \
        (QUICK_ANIMA if quick else AnimaConfig.full())
    with torch.device("meta"):
        model = SDXLUNet(cfg) if family == "sdxl" else AnimaDiT(cfg)
    model.to_empty(device=device)
    _init_(model)
    return model.requires_grad_(False)


def _inputs(family: str, model: nn.Module, quick: bool, device: torch.device):
    """(x0, model_call) for one 1024x1024 image (or a tiny one with --quick), batch 1."""
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    if family == "sdxl":
        s = 8 if quick else 128
        x0 = torch.randn(1, cfg.in_channels, s, s, generator=g).to(device)
        ctx = torch.randn(1, 77, cfg.context_dim, generator=g).to(device)
        y = torch.randn(1, cfg.adm_in_channels, generator=g).to(device)
        return x0, lambda noisy, t, batch: model(noisy, t * 999.0, ctx, y)
    tokens, ctx_len = (16, 8) if quick else (4096, 256)
    x0 = torch.randn(1, tokens, cfg.patch_out, generator=g).to(device)
    ctx = torch.randn(1, ctx_len, cfg.crossattn_dim, generator=g).to(device)
    pad = torch.zeros(1, tokens, cfg.patch_in - cfg.patch_out, device=device)  # Anima's padding-mask channels
    return x0, lambda noisy, t, batch: model(torch.cat([noisy, pad.to(noisy.dtype)], -1), t, ctx)


def _network_config(algo: str, rank: int, factor: int) -> NetworkConfig:
    """Ours: LoKr with full w1/w2 at `factor` (as ComfyUI's create_train), LoHa at `rank`; convs included."""
    if algo == "lokr":
        return NetworkConfig(algo="lokr", network_dim=rank, network_alpha=1.0, conv_dim=rank, conv_alpha=1.0,
                             factor=factor, full_matrix=True)
    return NetworkConfig(algo="loha", network_dim=rank, network_alpha=1.0, conv_dim=rank, conv_alpha=1.0)


def _cast_forward(layer: nn.Module, wrap: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """comfy.ops' forward: the weight cast to the compute dtype (fp8 upcast per layer), then its wrapper, then the op."""
    w = layer.weight.to(COMPUTE)
    w = wrap(w) if wrap is not None else w
    b = layer.bias.to(COMPUTE) if layer.bias is not None else None
    x = x.to(COMPUTE)
    return F.linear(x, w, b) if isinstance(layer, nn.Linear) else layer._conv_forward(x, w, b)


def setup(family: str, base: str, args, device: torch.device) -> Setup:
    """Build the base model in `base` dtype and pick the adapted layers (hadakron's selection)."""
    model = _build(family, args.quick, device).to(COMPUTE)
    probe = AdapterNetwork.build(family, {"unet": model}, _network_config("loha", 1, args.factor))
    targets = [t.layer for t in probe.targets]
    del probe
    if base == "fp8":
        chosen = {id(m) for m in targets}
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight = nn.Parameter(m.weight.data.to(FP8), requires_grad=False)
                if id(m) not in chosen:
                    m.forward = functools.partial(_cast_forward, m, None)
    x0, call = _inputs(family, model, args.quick, device)
    return Setup(family, model, x0, call, targets)


# ---------------------------------------------------------------------------------------------------- methods
class CoreLoKr(nn.Module):
    """ComfyUI's LokrDiff from create_train(weight, rank=factor): W_eff = W + kron(w1, w2) (scale 1)."""

    def __init__(self, weight: torch.Tensor, factor: int) -> None:
        super().__init__()
        out_l, out_k = factorization(weight.shape[0], factor)
        in_m, in_n = factorization(weight.shape[1], factor)
        dev = weight.device
        self.lokr_w1 = nn.Parameter(torch.zeros(out_l, in_m, device=dev))
        self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, *weight.shape[2:], device=dev))
        nn.init.kaiming_uniform_(self.lokr_w2, a=5 ** 0.5)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w1 = self.lokr_w1
        for _ in range(self.lokr_w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        return w + torch.kron(w1, self.lokr_w2).reshape(w.shape).to(w)


class CoreLoHa(nn.Module):
    """ComfyUI's LohaDiff from create_train(weight, rank, alpha=1): W_eff = W + HadaWeight(...) * alpha/rank."""

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        out, cols, dev = weight.shape[0], weight.shape[1:].numel(), weight.device
        self.hada_w1_a = nn.Parameter(torch.randn(out, rank, device=dev) + 0.1)
        self.hada_w1_b = nn.Parameter(torch.zeros(rank, cols, device=dev))
        self.hada_w2_a = nn.Parameter(torch.randn(out, rank, device=dev) + 0.1)
        self.hada_w2_b = nn.Parameter(torch.randn(rank, cols, device=dev) + 0.01)
        self.scale = 1.0 / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        diff = HadaWeight.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
        return (w.to(diff) + diff.reshape(w.shape)).to(w.dtype)


def attach(method: str, algo: str, s: Setup, args) -> nn.Module:
    """Put one method's adapters on the target layers; return a module holding their trainable parameters."""
    if method == "ours":
        net = AdapterNetwork.build(s.family, {"unet": s.model}, _network_config(algo, args.rank, args.factor),
                                   device=s.x0.device)
        return net.attach()
    holder = nn.ModuleList()
    for i, layer in enumerate(s.targets):
        if method == "core":
            a = CoreLoKr(layer.weight, args.factor) if algo == "lokr" else CoreLoHa(layer.weight, args.rank)
            layer.forward = functools.partial(_cast_forward, layer, a)
        else:
            a = _lycoris_module(algo, f"m{i}", layer, args).to(s.x0.device)
            a.apply_to()
        holder.append(a)
    return holder


def _lycoris_module(algo: str, name: str, layer: nn.Module, args) -> nn.Module:
    """LyCORIS' LokrModule (full matrices at the same factor) or LohaModule (same rank) for one layer."""
    if algo == "lokr":
        from lycoris.modules.lokr import LokrModule
        return LokrModule(name, layer, multiplier=1.0, lora_dim=args.rank, alpha=1.0, factor=args.factor,
                          full_matrix=True)
    from lycoris.modules.loha import LohaModule
    return LohaModule(name, layer, multiplier=1.0, lora_dim=args.rank, alpha=1.0)


# ---------------------------------------------------------------------------------------------------- measuring
class _StaticBatches:
    """The same batch every step."""

    def __init__(self, x0: torch.Tensor) -> None:
        self.batch = Batch(x0=x0)

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        return self.batch


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))


def measure(holder: nn.Module, s: Setup, args, device: torch.device) -> dict:
    """Train `warmup + steps` steps through hadakron.train.train; median step seconds and peak memory."""
    stamps: list[float] = []
    rss0 = _rss_mb() if device.type == "cpu" else 0.0

    def on_step(step: int, loss: float, lr: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if step == args.warmup:
            _reset_peak(device)

    config = TrainConfig(steps=args.warmup + args.steps, batch_size=1, learning_rate=1e-5, dtype="bf16")
    result = train(holder, s.call, _StaticBatches(s.x0), FlowMatchingObjective(), config, TrainCallbacks(loss=on_step))
    if result.stop_reason != "completed":
        raise RuntimeError(result.message or result.stop_reason)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else _hwm_mb() - rss0
    times = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    n_params = sum(p.numel() for p in holder.parameters() if p.requires_grad)
    return {"s_per_step": statistics.median(times), "peak_mib": peak, "adapter_params": n_params,
            "loss": result.losses[-1]}


def _restore(s: Setup, saved: list) -> None:
    """Put every target layer's forward back as it was before a method was attached."""
    for layer, fwd in zip(s.targets, saved):
        layer.__dict__.pop("forward", None)
        if fwd is not None:
            layer.forward = fwd


def _na(method: str, base: str, exc: BaseException) -> str:
    """The note of a row that could not run."""
    if isinstance(exc, ImportError):
        return "n/a (lycoris-lora not installed)"
    if base == "fp8" and method == "ours":
        return FP8_NA
    msg = str(exc).strip().splitlines()[0][:80] if str(exc).strip() else type(exc).__name__
    return f"n/a ({'fp8 base: ' if base == 'fp8' else ''}{type(exc).__name__}: {msg})"


def run_row(method: str, algo: str, s: Setup, base: str, args, device: torch.device) -> dict:
    """One table row: attach, measure, detach; a failure becomes an n/a note."""
    row = {"model": s.family, "algo": algo, "method": method, "base": base}
    saved = [layer.__dict__.get("forward") for layer in s.targets]
    holder = None
    try:
        holder = attach(method, algo, s, args)
        row.update(measure(holder, s, args, device), note="")
    except Exception as exc:  # noqa: BLE001 - any failure of a method is a table entry, not a crash
        row.update(s_per_step=None, peak_mib=None, adapter_params=None, note=_na(method, base, exc))
    finally:
        if isinstance(holder, AdapterNetwork):
            holder.detach()
        _restore(s, saved)
        del holder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------- output
def table(rows: list[dict], device: torch.device) -> str:
    """The markdown table of every row, with what the memory column is."""
    mem = "peak VRAM MiB (max_memory_allocated)" if device.type == "cuda" else "peak RSS delta MiB (CPU)"
    out = [f"| model | algo | method | base | s/step | {mem} | adapter params | note |",
           "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ok = r["s_per_step"] is not None
        sps = f"{r['s_per_step']:.4f}" if ok else "n/a"
        peak = f"{r['peak_mib']:.1f}" if ok else "n/a"
        params = f"{r['adapter_params']:,}" if ok else "n/a"
        out.append(f"| {r['model']} | {r['algo']} | {r['method']} | {r['base']} | {sps} | {peak} | {params} | "
                   f"{r['note']} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up + 1 timed step: seconds on CPU")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5, --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, --quick 1)")
    p.add_argument("--rank", type=int, default=8, help="LoHa rank (LyCORIS lora_dim)")
    p.add_argument("--factor", type=int, default=8, help="LoKr factor (ComfyUI create_train's rank)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    args.steps = args.steps or (1 if args.quick else 5)
    args.warmup = max(1, args.warmup or (1 if args.quick else 2))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:  # the shallow quick models lack most of the family's layers: expected, not news
        warnings.filterwarnings("ignore", message=".*selected layers are not in the given module")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for family in args.models.split(","):
        for base in BASES:
            s = setup(family, base, args, device)
            for algo in ALGOS:
                for method in METHODS:
                    rows.append(run_row(method, algo, s, base, args, device))
                    print("row " + json.dumps(rows[-1]), file=sys.stderr, flush=True)  # survives a wall-time kill
            del s
    text = table(rows, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{text}\n\ndevice: {name}; torch {torch.__version__}; {'tiny (--quick)' if args.quick else 'full'} size; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "quick": args.quick, "rows": rows}, indent=1))
    return 0 if all(r["s_per_step"] is None or math.isfinite(r["s_per_step"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
