"""`hadakron merge BASE ADAPTER[:STRENGTH]... -o OUT`: bake adapters into a checkpoint file.

Also holds the argument helpers shared by combine and convert (`FILE[:STRENGTH]`, output checks).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hadakron.commands import CommandError


def adapter_with_strength(text: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]` -> (path, strength); a trailing `:number` is the strength (default 1.0)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def adapter_spec(text: str) -> tuple[Path, float]:
    """argparse type for `FILE[:STRENGTH]`; a missing file is reported when it is read (exit code 1)."""
    if not text:
        raise argparse.ArgumentTypeError("empty adapter argument (expected FILE or FILE:STRENGTH)")
    return adapter_with_strength(text)


def check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an existing output without --force, a missing folder, or an output that is one of the inputs."""
    if out.exists() and not force:
        raise CommandError(f"{out}: already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise CommandError(f"{out}: folder {out.parent} does not exist")
    for p in inputs:
        if p.exists() and out.exists() and out.resolve() == p.resolve():
            raise CommandError(f"{out}: is also an input; write to another file")


def human_size(n: int) -> str:
    """Bytes as a short human-readable size (KiB, MiB, GiB)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# ------------------------------------------------------------------ the merge command

DESCRIPTION = """Bake one or more LoHa/LoKr/LoRA adapters into a checkpoint: W' = W + sum(strength * delta-W)
for every weight an adapter module matches, computed in float32 and stored in each weight's own dtype.

BASE is a safetensors SDXL single-file checkpoint (model.diffusion_model.*, conditioner.embedders.0/1.*,
CLIP-G in OpenCLIP form included), an Anima diffusion-model file (bare, net. or model.diffusion_model.
prefix) or a Qwen3 text-encoder file. Adapters may be in any key layout hadakron reads (kohya, LyCORIS,
ComfyUI, PEFT, diffusers). The file is streamed tensor by tensor (memory stays near one tensor plus the
adapters) and written atomically; the base's metadata is kept and the baked adapters and strengths are
recorded under 'hadakron.baked_adapters'. Modules that match no weight are listed.

Exit codes: 0 done, 1 failed, 2 usage error."""

EPILOG = """examples:
  hadakron merge sdxl_base.safetensors style.safetensors:0.8 detail.safetensors:-0.3 -o sdxl_style.safetensors
  hadakron merge anima.safetensors character_lokr.safetensors -o anima_character.safetensors --force"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `merge` subcommand."""
    p = subparsers.add_parser("merge", help="bake adapters into a checkpoint file (W + s*dW), streamed and exact",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="checkpoint (.safetensors): SDXL single file, Anima DiT or Qwen3 TE")
    p.add_argument("adapters", nargs="+", type=adapter_spec, metavar="ADAPTER[:STRENGTH]",
                   help="adapter file, optionally with a strength after a colon (default 1.0; negative subtracts)")
    p.add_argument("-o", "--output", type=Path, required=True, help="checkpoint file to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--family", choices=("sdxl", "anima"), help="read adapter keys as this family (default: detect)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def run(args: argparse.Namespace) -> int:
    """Bake, print the report; 0 when the output was written."""
    from hadakron.io import read_adapter
    from hadakron.io.safetensors_format import read_header
    from hadakron.merge import bake_checkpoint
    from hadakron.merge.progress import progress_bar

    if not args.base.is_file():
        raise CommandError(f"{args.base}: no such checkpoint file")
    check_output(args.output, args.force, [args.base] + [p for p, _ in args.adapters])
    adapters = [(read_adapter(path), strength) for path, strength in args.adapters]
    for adapter, _ in adapters:
        for problem in adapter.problems[:5]:
            if not args.quiet:
                print(f"warning: {adapter.path.name}: {problem}")
    total = sum(e.end - e.begin for e in read_header(args.base).entries)
    with progress_bar(total, "baking", unit="B", enabled=None if not args.quiet else False) as advance:
        report = bake_checkpoint(args.base, adapters, args.output, overwrite=args.force, family=args.family,
                                 on_tensor=lambda e: advance(e.end - e.begin))
    if not args.quiet:
        for line in report.lines():
            print(line)
        print(f"wrote {args.output} ({human_size(args.output.stat().st_size)})")
    return 0
