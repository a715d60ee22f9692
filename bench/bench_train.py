"""Training step time and peak memory: hadakron's bypass adapters vs ComfyUI's "Train LoRA" weight-wrapper path.

Same small SDXL UNet built from ComfyUI's classes, same Linear layers adapted, same algorithm and adapter
size (LoKr: full w1/w2 with the same factor, as ComfyUI's trainer makes them; LoHa: the same rank), same
batch, AdamW, fp32, no gradient checkpointing. Each variant runs in its own process (peak RSS on CPU,
max_memory_allocated on CUDA), all in one invocation.

Run (ComfyUI venv): COMFYUI_PATH=/work/ComfyUI /work/comfyui-venv/bin/python bench/bench_train.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(variant: str, algo: str, args) -> dict:
    """Build the model, attach one kind of adapters, time `args.steps` training steps; return the figures."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    sys.path.insert(0, str(REPO))
    import conftest as cf  # the integration fixtures' builders (ComfyUI imported in CPU mode unless CUDA)
    import torch

    torch.set_num_threads(args.threads)
    env = cf.import_comfy()
    import comfy.model_management as mm
    from comfy.weight_adapter import adapter_maps

    cfg = dict(cf.SMALL_SDXL_UNET, model_channels=args.channels, dtype=torch.float32)
    mc = env.comfy.supported_models.SDXL(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    cf.randomize_(model, 0)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    mp = env.comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    dm = model.diffusion_model
    dm.requires_grad_(False)

    from hadakron.network import AdapterNetwork, NetworkConfig
    config = NetworkConfig(algo=algo, network_dim=args.rank if algo == "loha" else 100000, network_alpha=1.0,
                           factor=args.factor, full_matrix=(algo == "lokr"))
    net = AdapterNetwork.build("sdxl", {"unet": dm}, config)  # picks the layers; on CPU until moved
    names = [t.name for t in net.targets]
    if variant == "hadakron":
        mm.load_models_gpu([mp], force_full_load=True)
        net.to(device).attach()
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        del net
        mp = mp.clone()
        params = []
        layers = dict(dm.named_modules())
        for name in names:
            w = layers[name].weight
            rank = args.factor if algo == "lokr" else args.rank
            adapter = adapter_maps["LoKr" if algo == "lokr" else "LoHa"].create_train(w, rank=rank, alpha=1.0)
            adapter.train()
            mp.add_weight_wrapper(f"diffusion_model.{name}.weight", adapter)
            params += list(adapter.parameters())
        mm.load_models_gpu([mp], force_full_load=True)
        for p in params:
            p.data = p.data.to(device)
    n_params = sum(p.numel() for p in params if p.requires_grad)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.size
    x = torch.randn(b, 4, s, s, generator=g).to(device)
    t = (torch.rand(b, generator=g) * 999).to(device)
    ctx = torch.randn(b, 77, 64, generator=g).to(device)
    y = torch.randn(b, 2816, generator=g).to(device)
    target = torch.randn(b, 4, s, s, generator=g).to(device)

    def step():
        out = dm(x, t, context=ctx, y=y)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "algo": algo, "layers": len(names), "adapter_params": n_params,
            "step_s": dt, "peak_mb": peak, "rss_before_timing_mb": base_rss, "device": device.type}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=["hadakron", "comfy"])
    p.add_argument("--algo", choices=["lokr", "loha"])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--factor", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.algo, args)))
        return 0
    rows = []
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "algo")]
    for algo in ("lokr", "loha"):
        for variant in ("comfy", "hadakron"):
            proc = subprocess.run([sys.executable, __file__, f"--variant={variant}", f"--algo={algo}", *passthrough],
                                  capture_output=True, text=True, env=dict(os.environ))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            rows.append(json.loads(line[0][7:]))
    print(f"{'algo':5} {'variant':9} {'layers':>6} {'params':>9} {'step ms':>8} {'peak MB':>8}  speed-up")
    for algo in ("lokr", "loha"):
        comfy = next(r for r in rows if r["algo"] == algo and r["variant"] == "comfy")
        for r in (x for x in rows if x["algo"] == algo):
            ratio = comfy["step_s"] / r["step_s"]
            print(f"{algo:5} {r['variant']:9} {r['layers']:6d} {r['adapter_params']:9d} {r['step_s'] * 1000:8.1f} "
                  f"{r['peak_mb']:8.1f}  {ratio:.2f}x")
    print(f"device: {rows[0]['device']}; peak = {'max_memory_allocated' if rows[0]['device'] == 'cuda' else 'process peak RSS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
