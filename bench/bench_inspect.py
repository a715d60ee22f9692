"""Benchmark: `hadakron inspect --json` calls per second, old path vs new, with the bare-python floor, same run.

    python bench/bench_inspect.py [--runs 7] [--old-rev 9ddbb0e] [--prev-rev REV] [--keep DIR]

Files (made once, torch, not timed): a full-size SDXL LoHa (rank 16, every default UNet + both CLIP targets,
bf16) and a full-size Anima LoKr (factor 8, w2 rank 16, DiT + Qwen3 targets, bf16), kohya names.
Timed, each a fresh process, the median (and the minimum) of `--runs`, the commands taking turns:
- floor: `python -c "import numpy, safetensors"` (what any header+numpy reader pays to start);
- old CLI: `python -m hadakron inspect FILE --json` from `--old-rev` (the commit before the torch-free inspect,
  extracted with `git archive`, nothing in the repository changes), which imports torch and loads every tensor;
- prev CLI (only with `--prev-rev`): the same command from another commit (e.g. the torch-free inspect before a
  speed-up), extracted the same way, so a before/after is timed in one run;
- new CLI: the same command from this tree (no torch: header by hand, alpha bytes, numpy memmap NaN/Inf scan in a
  background thread while the module checks and family detection run).
Every timed process runs with byte-code caches (a PYTHONPYCACHEPREFIX in the temporary folder, written by the warm-up
run), as an installed package has them; PYTHONDONTWRITEBYTECODE is dropped for the timed runs.
Also in one process (imports already paid): `read_adapter` + `describe` (torch) vs `inspect_file` (torch-free).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_files(folder: Path) -> dict[str, Path]:
    """The full-size SDXL LoHa and Anima LoKr files (kohya layout, bf16 factors, fp32 alpha)."""
    import safetensors.torch
    import torch

    from hadakron.arch import file_key, get_family
    from hadakron.ops import factorization

    g = torch.Generator().manual_seed(0)
    out = {}
    for family, algo in (("sdxl", "loha"), ("anima", "lokr")):
        path = folder / f"{family}_{algo}_full.safetensors"
        out[f"{family} {algo}"] = path
        if path.exists():
            continue
        fam = get_family(family)
        tensors: dict[str, torch.Tensor] = {}
        for part in fam.parts:
            shapes = fam.layer_shapes(part)
            for dotted in fam.default_targets(part):
                o, i = shapes[dotted][0], 1
                for d in shapes[dotted][1:]:
                    i *= d
                r = 16
                if algo == "loha":
                    p = {"hada_w1_a": (o, r), "hada_w1_b": (r, i), "hada_w2_a": (o, r), "hada_w2_b": (r, i)}
                else:
                    a, c = factorization(o, 8)
                    b, e = factorization(i, 8)
                    p = {"lokr_w1": (a, b), "lokr_w2_a": (c, r), "lokr_w2_b": (r, e)}
                for name, shape in p.items():
                    tensors[file_key(fam, part, dotted, name, "kohya")] = (
                        torch.randn(shape, generator=g) * 0.1).to(torch.bfloat16)
                tensors[file_key(fam, part, dotted, "alpha", "kohya")] = torch.tensor(8.0)
        safetensors.torch.save_file(tensors, str(path), {"ss_network_dim": "16", "ss_network_alpha": "8"})
    return out


def old_tree(rev: str, folder: Path) -> Path:
    """`hadakron/` as of `rev`, extracted into `folder` (git archive: the repository is not touched)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "hadakron"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(folder)
    return folder


def timed(cases: list[tuple[list[str], dict]], runs: int) -> list[tuple[float, float]]:
    """(median, min) wall seconds of each `(cmd, env)` over `runs` fresh processes, the commands taking turns (one
    warm-up round first), so load that comes and goes on a shared machine falls on all of them alike."""
    times: list[list[float]] = [[] for _ in cases]
    for i in range(runs + 1):
        for (cmd, env), out in zip(cases, times):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=env["BENCH_CWD"])
            if i:
                out.append(time.perf_counter() - start)
    return [(statistics.median(t), min(t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--old-rev", default="9ddbb0e", help="commit with the torch inspect (default: before the change)")
    ap.add_argument("--prev-rev", help="also time the CLI of this commit (a before/after in the same run)")
    ap.add_argument("--keep", type=Path, help="folder for the test files (kept between runs)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))  # this tree's hadakron in this process too (not an installed copy)
    tmp = tempfile.TemporaryDirectory()
    folder = args.keep or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    files = make_files(folder)
    old = old_tree(args.old_rev, Path(tmp.name) / "old")
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    base_env.setdefault("OMP_NUM_THREADS", "1")
    # byte-code caches as an installed package has them (the warm-up run writes them, outside the repository):
    # without them every timed run would compile hadakron's modules afresh (~40 ms), which no user pays
    base_env["PYTHONPYCACHEPREFIX"] = str(Path(tmp.name) / "pycache")
    base_env["BENCH_CWD"] = str(folder)  # not the repository: `python -m` puts the working folder first on sys.path
    new_env = dict(base_env, PYTHONPATH=str(REPO))
    old_env = dict(base_env, PYTHONPATH=str(old))
    prev_env = None
    if args.prev_rev:
        prev_env = dict(base_env, PYTHONPATH=str(old_tree(args.prev_rev, Path(tmp.name) / "prev")))

    cases = [("floor: python -c 'import numpy, safetensors'", [sys.executable, "-c", "import numpy, safetensors"],
              base_env)]
    for label, path in files.items():
        size = path.stat().st_size / 2**20
        cmd = [sys.executable, "-m", "hadakron", "inspect", str(path), "--json"]
        cases.append((f"old CLI ({args.old_rev}) {label} {size:.0f} MiB", cmd, old_env))
        if prev_env is not None:
            cases.append((f"prev CLI ({args.prev_rev}) {label} {size:.0f} MiB", cmd, prev_env))
        cases.append((f"new CLI {label} {size:.0f} MiB", cmd, new_env))
    rows = [(name, *t) for (name, _, _), t in zip(cases, timed([(c, e) for _, c, e in cases], args.runs))]
    floor, floor_min = rows[0][1], rows[0][2]

    print(f"{'case (median of ' + str(args.runs) + ', min)':<58} {'seconds':>8} {'calls/s':>8} {'x floor':>8} "
          f"{'min s':>8} {'x floor':>8}")
    for name, sec, low in rows:
        print(f"{name:<58} {sec:8.3f} {1 / sec:8.2f} {sec / floor:8.2f} {low:8.3f} {low / floor_min:8.2f}", flush=True)

    from hadakron.commands.inspect import describe, inspect_file
    from hadakron.io import read_adapter

    in_process = []
    for label, path in files.items():
        for name, fn in (("read_adapter + describe (torch)", lambda p: describe(read_adapter(p))),
                         ("inspect_file (no torch)", inspect_file)):
            fn(path)
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                fn(path)
                times.append(time.perf_counter() - start)
            in_process.append((f"in-process {name} {label}", statistics.median(times)))
        assert describe(read_adapter(path)) == inspect_file(path), f"{label}: reports differ"

    for name, sec in in_process:
        print(f"{name:<58} {sec:8.3f} {1 / sec:8.2f} {'':>8}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
