"""Benchmark: bake one LoKr into a full-size SDXL checkpoint file vs a plain read-and-write copy of that file.

The benchmark makes its own inputs in a temp folder (deleted afterwards): a full-size SDXL single-file
checkpoint with random fp16 weights (UNet 2.57B, CLIP-L, CLIP-G in OpenCLIP form, a VAE-sized block; ~6.9 GB)
and a LoKr (factor 8, rank-16 W2) on sd-scripts' default targets of the UNet and both text encoders.
Each measured phase runs in its own process so its peak RSS (ru_maxrss) is its own; RSS does not include
the page cache because both phases use read()/write(), not mmap.

    python bench/bench_merge.py [--tmpdir DIR] [--keep]

Goal (issue 6): bake time within 1.5x of the copy, peak RSS under 2 GB beyond the interpreter's baseline.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COPY_BUFFER = 16 * 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ inputs
def checkpoint_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a full-size SDXL single-file checkpoint (weights and biases of every layer, embeddings, VAE)."""
    from hadakron.arch import SDXL

    shapes: dict[str, tuple[int, ...]] = {}
    for dotted, shape in SDXL.layer_shapes("unet").items():
        shapes[f"model.diffusion_model.{dotted}.weight"] = shape
        if not any(dotted.endswith(x) for x in ("to_q", "to_k", "to_v")):
            shapes[f"model.diffusion_model.{dotted}.bias"] = (shape[0],)
    pre = "conditioner.embedders.0.transformer.text_model."
    shapes[pre + "embeddings.token_embedding.weight"] = (49408, 768)
    shapes[pre + "embeddings.position_embedding.weight"] = (77, 768)
    for dotted, shape in SDXL.layer_shapes("te1").items():
        shapes[f"conditioner.embedders.0.transformer.{dotted}.weight"] = shape
        shapes[f"conditioner.embedders.0.transformer.{dotted}.bias"] = (shape[0],)
    g = "conditioner.embedders.1.model."
    shapes[g + "token_embedding.weight"] = (49408, 1280)
    shapes[g + "positional_embedding"] = (77, 1280)
    shapes[g + "text_projection"] = (1280, 1280)
    for i in range(32):
        b = f"{g}transformer.resblocks.{i}."
        shapes[b + "attn.in_proj_weight"] = (3840, 1280)
        shapes[b + "attn.in_proj_bias"] = (3840,)
        shapes[b + "attn.out_proj.weight"] = (1280, 1280)
        shapes[b + "attn.out_proj.bias"] = (1280,)
        shapes[b + "mlp.c_fc.weight"] = (5120, 1280)
        shapes[b + "mlp.c_fc.bias"] = (5120,)
        shapes[b + "mlp.c_proj.weight"] = (1280, 5120)
        shapes[b + "mlp.c_proj.bias"] = (1280,)
        for n in ("ln_1", "ln_2"):
            shapes[b + n + ".weight"] = (1280,)
            shapes[b + n + ".bias"] = (1280,)
    for i in range(35):  # a VAE-sized block of conv weights (83.6M parameters in the real VAE)
        shapes[f"first_stage_model.decoder.block.{i}.conv.weight"] = (512, 512, 3, 3)
    shapes["first_stage_model.quant_conv.weight"] = (8, 8, 1, 1)
    return shapes


def make_checkpoint(path: Path, seed: int = 0) -> int:
    """Write the random fp16 checkpoint tensor by tensor (never the whole dict in memory); returns its size."""
    import torch

    from hadakron.io.safetensors_format import TensorEntry
    from hadakron.merge.checkpoint_stream import header_for_entries

    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(seed)) * 0.02).half()
    pool_bytes = memoryview(pool.view(torch.uint8).numpy())
    entries, offset = [], 0
    for name, shape in checkpoint_layout().items():
        nbytes = math.prod(shape) * 2
        entries.append(TensorEntry(name, "F16", tuple(shape), offset, offset + nbytes))
        offset += nbytes
    rng = torch.Generator().manual_seed(seed + 1)
    with open(path, "wb") as f:
        f.write(header_for_entries(tuple(entries), {"modelspec.title": "random full-size SDXL (hadakron bench)"}))
        for e in entries:
            left = e.end - e.begin
            start = int(torch.randint(0, len(pool_bytes) // 2, (1,), generator=rng)) * 2
            while left:
                n = min(left, len(pool_bytes) - start)
                f.write(pool_bytes[start:start + n])
                left -= n
                start = 0
    return path.stat().st_size


def make_lokr(path: Path, seed: int = 0) -> int:
    """A LoKr (factor 8, W1 full, W2 rank 16) on sd-scripts' default SDXL targets (UNet, CLIP-L, CLIP-G)."""
    import torch

    from hadakron.arch import SDXL, file_key
    from hadakron.io import write_adapter
    from hadakron.ops import factorization

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for part in ("unet", "te1", "te2"):
        shapes = SDXL.layer_shapes(part)
        for dotted in SDXL.default_targets(part):
            out_dim, in_dim = shapes[dotted][0], math.prod(shapes[dotted][1:])
            a, c = factorization(out_dim, 8)
            b, d = factorization(in_dim, 8)
            params = {
                "lokr_w1": torch.randn(a, b, generator=gen) * 0.1,
                "lokr_w2_a": torch.randn(c, 16, generator=gen) * 0.1,
                "lokr_w2_b": torch.randn(16, d, generator=gen) * 0.1,
                "alpha": torch.tensor(8.0),
            }
            for name, t in params.items():
                tensors[file_key("sdxl", part, dotted, name, "kohya")] = t.half() if name != "alpha" else t
    write_adapter(path, tensors, {"ss_network_module": "networks.lokr"})
    return path.stat().st_size


# ------------------------------------------------------------------ phases (each in its own process)
def phase(name: str, args: list[str]) -> dict:
    """Run one phase in a fresh interpreter; returns its JSON result (seconds, peak RSS)."""
    proc = subprocess.run([sys.executable, __file__, "--phase", name, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_phase(name: str, args: list[str]) -> None:
    import torch  # noqa: F401  (the baseline includes torch, as bake needs it)

    from hadakron.io import read_adapter
    from hadakron.merge import bake_checkpoint

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    extra = {}
    if name == "copy":
        src, dst = args
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            while chunk := fi.read(COPY_BUFFER):
                fo.write(chunk)
            fo.flush()
            os.fsync(fo.fileno())
    elif name == "bake":
        base, adapter, out = args
        report = bake_checkpoint(base, [(read_adapter(adapter), 1.0)], out)
        extra = {"weights_changed": report.weights_changed, "unmatched": sum(len(a.unmatched) for a in report.adapters)}
    elif name != "baseline":
        raise SystemExit(f"unknown phase {name}")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "rss_at_start_mb": rss_before / 1024, **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tmpdir", help="folder for the ~21 GB of temporary files (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.phase:
        run_phase(args.phase, rest)
        return
    sys.path.insert(0, str(ROOT))
    tmp = Path(tempfile.mkdtemp(prefix="hadakron-bench-merge-", dir=args.tmpdir))
    try:
        base, adapter = tmp / "sdxl.safetensors", tmp / "lokr.safetensors"
        t0 = time.perf_counter()
        size = make_checkpoint(base)
        asize = make_lokr(adapter)
        print(f"inputs: checkpoint {size / 1e9:.2f} GB, LoKr {asize / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s to make)")
        baseline = phase("baseline", [])
        copy1 = phase("copy", [str(base), str(tmp / "copy1.safetensors")])
        (tmp / "copy1.safetensors").unlink()
        bake = phase("bake", [str(base), str(adapter), str(tmp / "baked.safetensors")])
        (tmp / "baked.safetensors").unlink()
        copy2 = phase("copy", [str(base), str(tmp / "copy2.safetensors")])
        (tmp / "copy2.safetensors").unlink()
        copy_s = min(copy1["seconds"], copy2["seconds"])
        result = {
            "checkpoint_gb": size / 1e9, "adapter_mb": asize / 1e6,
            "copy_seconds": [copy1["seconds"], copy2["seconds"]], "bake_seconds": bake["seconds"],
            "bake_over_copy": bake["seconds"] / copy_s,
            "bake_peak_rss_mb": bake["peak_rss_mb"], "copy_peak_rss_mb": copy1["peak_rss_mb"],
            "interpreter_baseline_rss_mb": baseline["peak_rss_mb"],
            "bake_rss_beyond_baseline_mb": bake["peak_rss_mb"] - baseline["peak_rss_mb"],
            "weights_changed": bake["weights_changed"], "unmatched": bake["unmatched"],
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        }
        print(json.dumps(result, indent=2))
        ok_time = result["bake_over_copy"] <= 1.5
        ok_rss = result["bake_rss_beyond_baseline_mb"] < 2048
        print(f"bake {bake['seconds']:.1f} s vs copy {copy_s:.1f} s: {result['bake_over_copy']:.2f}x "
              f"({'within' if ok_time else 'OVER'} the 1.5x goal); peak RSS {bake['peak_rss_mb']:.0f} MB, "
              f"{result['bake_rss_beyond_baseline_mb']:.0f} MB beyond the interpreter "
              f"({'under' if ok_rss else 'OVER'} the 2 GB goal)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
