"""Benchmark: patch a full-size SDXL UNet with a LoHa and a LoKr through hadakron's lazy patches vs ComfyUI's own
adapters (LoraLoader's path, `comfy.sd.load_lora_for_models`) for the same file.

Run in the ComfyUI venv (docs/comfyui-env.md):
    COMFYUI_PATH=/work/ComfyUI /work/comfyui-venv/bin/python bench/bench_loader.py [--rank 16] [--factor 8]

Each case runs in its own subprocess (so peak RSS is per case): build the full-size SDXL UNet with ComfyUI's
classes in bf16 (weights zero-filled; the math does not depend on values), attach the adapter's patches, then
compute every patched weight the way ComfyUI does when it loads the model
(`ModelPatcher.patch_weight_to_device(key, return_weight=True)`: fp32 copy -> calculate_weight -> bf16).
Reported: wall time of that loop, peak RSS above the built model, and for a sample of keys the max difference
between the two implementations.
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

FULL_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _import_comfy(path: str):
    sys.path[:] = [path] + [p for p in sys.path if p not in ("", ".", str(REPO))]
    import comfy.options  # noqa: F401
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_dynamic_vram = True
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.supported_models  # noqa: F401
    return comfy


def make_adapter(algo: str, rank: int, factor: int, seed: int = 0) -> dict:
    """kohya-named LoHa (rank r) or LoKr (factor f, w2 low-rank r) for SDXL's default UNet targets."""
    import torch
    from hadakron.arch import get_family
    from hadakron.ops import factorization

    fam = get_family("sdxl")
    shapes = fam.layer_shapes("unet")
    g = torch.Generator().manual_seed(seed)
    out: dict = {}
    for d in fam.default_targets("unet"):
        o, i = shapes[d][0], shapes[d][1]
        mk = "lora_unet_" + d.replace(".", "_")
        if algo == "loha":
            p = {"hada_w1_a": torch.randn(o, rank, generator=g) * 0.1, "hada_w1_b": torch.randn(rank, i, generator=g) * 0.1,
                 "hada_w2_a": torch.randn(o, rank, generator=g) * 0.1, "hada_w2_b": torch.randn(rank, i, generator=g) * 0.1}
        else:
            a, c = factorization(o, factor)
            b, e = factorization(i, factor)
            p = {"lokr_w1": torch.randn(a, b, generator=g) * 0.1,
                 "lokr_w2_a": torch.randn(c, rank, generator=g) * 0.1, "lokr_w2_b": torch.randn(rank, e, generator=g) * 0.1}
        p["alpha"] = torch.tensor(float(rank) / 2)
        for k, v in p.items():
            out[f"{mk}.{k}"] = v.to(torch.bfloat16) if v.dim() else v
    return out


def _attach(comfy, patcher, impl: str, algo: str, tensors: dict):
    """Clone `patcher` and add the adapter's patches through hadakron's loader or ComfyUI's LoraLoader path."""
    if impl == "hadakron":
        import importlib
        import importlib.util
        name = "hadakron_pack_bench"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                          submodule_search_locations=[str(REPO)])
            pack = importlib.util.module_from_spec(spec)
            sys.modules[name] = pack
            spec.loader.exec_module(pack)
        loader = importlib.import_module(name + ".nodes.loader")
        from hadakron.io import AdapterFile
        adapter = AdapterFile(path=Path(f"bench_{algo}.safetensors"), tensors=tensors, metadata={})
        patched, _clip, report = loader.apply_adapter(patcher, None, adapter, 1.0, 0.0)
        return patched, len(report.matched)
    patched, _clip = comfy.sd.load_lora_for_models(patcher, None, tensors, 1.0, 0.0)
    return patched, len(patched.patches)


def _build_full_sdxl(comfy):
    import torch
    cfg = dict(FULL_SDXL_UNET, dtype=torch.bfloat16)
    mc = comfy.supported_models.SDXL(cfg)
    mc.set_inference_dtype(torch.bfloat16, None)
    model = mc.get_model({})
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def run_paired(comfy_path: str, algo: str, rank: int, factor: int) -> dict:
    """Both implementations in one process, timed key by key in alternating order (robust to a busy machine)."""
    import torch
    comfy = _import_comfy(comfy_path)
    patcher = _build_full_sdxl(comfy)
    tensors = make_adapter(algo, rank, factor)
    cpu = torch.device("cpu")
    attached, attach_s, modules = {}, {}, {}
    for impl in ("hadakron", "comfyui"):
        t0 = time.perf_counter()
        attached[impl], modules[impl] = _attach(comfy, patcher, impl, algo, tensors)
        attach_s[impl] = round(time.perf_counter() - t0, 2)
    keys = sorted(attached["hadakron"].patches)
    assert keys == sorted(attached["comfyui"].patches)
    total = {"hadakron": 0.0, "comfyui": 0.0}
    max_diff = 0.0
    for i, key in enumerate(keys):
        order = ("hadakron", "comfyui") if i % 2 == 0 else ("comfyui", "hadakron")
        out = {}
        for impl in order:
            t0 = time.perf_counter()
            out[impl] = attached[impl].patch_weight_to_device(key, device_to=cpu, return_weight=True)
            total[impl] += time.perf_counter() - t0
        max_diff = max(max_diff, (out["hadakron"].float() - out["comfyui"].float()).abs().max().item())
    return {"mode": "paired", "algo": algo, "modules": modules, "keys": len(keys),
            "patch_s": {k: round(v, 1) for k, v in total.items()},
            "ratio_hadakron_over_comfyui": round(total["hadakron"] / total["comfyui"], 3),
            "attach_s": attach_s, "max_abs_diff_bf16": max_diff}


def run_case(comfy_path: str, impl: str, algo: str, rank: int, factor: int, sample_out: str | None) -> dict:
    """One measurement in this process: build, patch, compute every patched weight."""
    import torch
    comfy = _import_comfy(comfy_path)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    patcher = _build_full_sdxl(comfy)
    cpu = torch.device("cpu")
    build_s = time.perf_counter() - t0
    tensors = make_adapter(algo, rank, factor)
    file_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    patched, n_matched = _attach(comfy, patcher, impl, algo, tensors)
    attach_s = time.perf_counter() - t0

    keys = sorted(patched.patches)
    t0 = time.perf_counter()
    sample = {}
    for i, key in enumerate(keys):
        w = patched.patch_weight_to_device(key, device_to=cpu, return_weight=True)
        if sample_out and i % 97 == 0:
            sample[key] = w.float().clone()
        del w
    patch_s = time.perf_counter() - t0
    if sample_out:
        torch.save(sample, sample_out)
    return {"impl": impl, "algo": algo, "modules": n_matched, "patched_keys": len(keys),
            "adapter_mb": round(file_mb, 1), "build_s": round(build_s, 1), "attach_s": round(attach_s, 2),
            "patch_s": round(patch_s, 1), "peak_rss_over_model_mb": round(_rss_mb() - base_rss),
            "model_rss_mb": round(base_rss)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "/work/ComfyUI"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--algos", default="loha,lokr")
    ap.add_argument("--impls", default="hadakron,comfyui")
    ap.add_argument("--hada-chunk", type=int, default=0,
                    help="override hadakron.ops.rebuild.HADA_CHUNK_ELEMENTS (LoHa rebuild chunk) for a what-if run")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: impl:algo:sample_path
    args = ap.parse_args(argv)
    if args.case:
        impl, algo, sample = args.case.split(":", 2)
        if args.hada_chunk:
            import hadakron.ops.rebuild
            hadakron.ops.rebuild.HADA_CHUNK_ELEMENTS = args.hada_chunk
        if impl == "paired":
            print(json.dumps(run_paired(args.comfyui, algo, args.rank, args.factor)))
        else:
            print(json.dumps(run_case(args.comfyui, impl, algo, args.rank, args.factor, sample or None)))
        return 0
    import tempfile
    results, paired_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos.split(","):
            samples = {}
            for impl in ["paired"] + args.impls.split(","):
                sample = os.path.join(tmp, f"{impl}_{algo}.pt")
                cmd = [sys.executable, __file__, "--comfyui", args.comfyui, "--rank", str(args.rank),
                       "--factor", str(args.factor), "--hada-chunk", str(args.hada_chunk),
                       "--case", f"{impl}:{algo}:{sample}"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    return 1
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                if impl == "paired":
                    print(json.dumps(res), flush=True)
                    paired_rows.append(res)
                    continue
                results.append(res)
                samples[impl] = sample
                print(json.dumps(res), flush=True)
            if len(samples) < 2:
                continue
            import torch
            a, b = torch.load(samples["hadakron"]), torch.load(samples["comfyui"])
            diff = max((a[k] - b[k]).abs().max().item() for k in a)
            print(json.dumps({"algo": algo, "sampled_keys": len(a), "max_abs_diff_hadakron_vs_comfyui": diff}), flush=True)
    print("\nPaired (same process, keys alternated): time to compute every patched weight")
    print("| algo | hadakron (s) | ComfyUI (s) | ratio | max abs diff (bf16 out) |")
    print("|---|---|---|---|---|")
    for r in paired_rows:
        print(f"| {r['algo']} | {r['patch_s']['hadakron']} | {r['patch_s']['comfyui']} | "
              f"{r['ratio_hadakron_over_comfyui']} | {r['max_abs_diff_bf16']} |")
    print("\nSeparate processes (peak RSS is per process; times here are noisy on a shared machine)")
    print("| algo | impl | modules | patch all weights (s) | peak RSS over model (MB) | attach (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['algo']} | {r['impl']} | {r['modules']} | {r['patch_s']} | {r['peak_rss_over_model_mb']} | {r['attach_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
