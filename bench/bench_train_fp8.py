"""Peak memory of training on a float8 base vs a bfloat16 base: the same SDXL UNet (ComfyUI's classes), LoKr adapters.

The UNet is built as UNETLoader builds it for `weight_dtype` fp8_e4m3fn (float8 weights, manual cast per layer) or
with bfloat16 weights; the compute dtype is ComfyUI's manual-cast dtype for the device (float32 on CPU, bfloat16 on a
GPU with bf16). Same adapters, batch, AdamW; with and without per-block gradient checkpointing (the trainer's
`checkpoint_blocks`). Each variant runs in its own process; peak = max_memory_allocated on CUDA, else the process's
peak RSS minus its RSS before the model was built. Also printed: the bytes the UNet's weights take.

Run (ComfyUI venv): COMFYUI_PATH=.../ComfyUI .../venv/bin/python bench/bench_train_fp8.py [--channels 128]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": "bfloat16", "fp8_e4m3fn": "float8_e4m3fn"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trainer_runtime():
    """The pack's nodes/trainer_runtime.py (per-block checkpointing as the trainer does it), loaded by path."""
    spec = importlib.util.spec_from_file_location("hadakron_bench_trainer_runtime", REPO / "nodes" / "trainer_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_variant(base: str, checkpoint: bool, args) -> dict:
    """Build the UNet with `base` weights, attach LoKr, run warmup + timed steps; return the figures."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    sys.path.insert(0, str(REPO))
    import conftest as cf
    import torch

    torch.set_num_threads(args.threads)
    env = cf.import_comfy()
    sys.path.append(str(REPO))  # hadakron (import_comfy takes the repo off the path: ComfyUI's nodes.py must win)
    import comfy.model_management as mm
    runtime = _trainer_runtime()

    device = mm.get_torch_device()
    weight_dtype = getattr(torch, DTYPES[base])
    cast = mm.unet_manual_cast(weight_dtype, device)
    rss0 = _rss_mb()
    cfg = dict(cf.SMALL_SDXL_UNET, model_channels=args.channels, context_dim=args.context,
               transformer_depth=[0, 0, args.depth, args.depth, args.depth, args.depth],
               transformer_depth_output=[0, 0, 0] + [args.depth] * 6, transformer_depth_middle=args.depth,
               dtype=weight_dtype)
    mc = env.comfy.supported_models.SDXL(cfg)
    mc.set_inference_dtype(weight_dtype, cast)
    with torch.no_grad():
        model = mc.get_model({}, device=device)
        g = torch.Generator().manual_seed(0)
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))
    dm = model.diffusion_model.requires_grad_(False)
    weight_bytes = sum(p.numel() * p.element_size() for p in dm.parameters())
    compute = cast or weight_dtype

    from hadakron.network import AdapterNetwork, NetworkConfig
    net = AdapterNetwork.build("sdxl", {"unet": dm}, NetworkConfig(algo="lokr", network_dim=args.rank, factor=8),
                               device=device, seed=0).attach()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    b, s = args.batch, args.size
    x = torch.randn(b, 4, s, s, generator=g).to(device, compute)
    t = (torch.rand(b, generator=g) * 999).to(device)
    ctx = torch.randn(b, 77, args.context, generator=g).to(device, compute)
    y = torch.randn(b, 2816, generator=g).to(device, compute)
    target = torch.randn(b, 4, s, s, generator=g).to(device)
    blocks = runtime.checkpoint_blocks(dm, "sdxl")

    def step() -> float:
        out = dm(x, t, context=ctx, y=y)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    with runtime.gradient_checkpointing(blocks, checkpoint):
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0)
    stored = {str(p.dtype) for p in dm.parameters()}
    return {"base": base, "checkpoint": checkpoint, "compute": str(compute), "weights_mb": weight_bytes / 2**20,
            "layers": len(net.targets), "step_s": dt, "peak_mb": peak, "device": device.type,
            "loss_finite": all(v == v and abs(v) != float("inf") for v in losses), "stored_dtypes": sorted(stored)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", choices=list(DTYPES))
    p.add_argument("--checkpoint", type=int, choices=[0, 1])
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.base:
        print("RESULT " + json.dumps(run_variant(args.base, bool(args.checkpoint), args)))
        return 0
    rows = []
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("base", "checkpoint")]
    for checkpoint in (0, 1):
        for base in DTYPES:
            proc = subprocess.run([sys.executable, __file__, f"--base={base}", f"--checkpoint={checkpoint}",
                                   *passthrough], capture_output=True, text=True, env=dict(os.environ))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            rows.append(json.loads(line[0][7:]))
    print(f"{'base':11} {'ckpt':4} {'compute':15} {'weights MB':>10} {'peak MB':>8} {'step s':>7}  vs bf16")
    for r in rows:
        bf16 = next(x for x in rows if x["base"] == "bf16" and x["checkpoint"] == r["checkpoint"])
        print(f"{r['base']:11} {'on' if r['checkpoint'] else 'off':4} {r['compute']:15} {r['weights_mb']:10.1f} "
              f"{r['peak_mb']:8.1f} {r['step_s']:7.2f}  {r['peak_mb'] / bf16['peak_mb']:.2f}x  "
              f"(stored {','.join(r['stored_dtypes'])}, {r['layers']} adapted layers, loss finite {r['loss_finite']})")
    print(f"device: {rows[0]['device']}; peak = "
          f"{'max_memory_allocated' if rows[0]['device'] == 'cuda' else 'peak RSS minus RSS before the model'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
