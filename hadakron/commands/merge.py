"""`hadakron merge BASE ADAPTER[:STRENGTH]... -o OUT`: bake adapters into a checkpoint file."""
from __future__ import annotations

import argparse
from pathlib import Path

from hadakron.commands import CommandError
from hadakron.commands.common import adapter_spec, add_common_arguments, check_output, print_report


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
    add_common_arguments(p, family_help="read adapter keys as this family (default: detect)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip broken modules (non-float factors, bad shapes, non-scalar or negative alpha, ...) and "
                        "list them, instead of failing")
    return p


def run(args: argparse.Namespace) -> int:
    """Bake, print the report; 0 when the output was written."""
    from hadakron.io.safetensors_header import read_header

    check_output(args.output, args.force, [args.base] + [p for p, _ in args.adapters])
    if not args.base.is_file():
        raise CommandError(f"{args.base}: no such checkpoint file")
    for path, _ in args.adapters:  # unreadable inputs fail here, before torch is imported
        read_header(path)
    total = sum(e.end - e.begin for e in read_header(args.base).entries)
    from hadakron.io import read_adapter
    from hadakron.merge import bake_checkpoint
    from hadakron.merge.progress import progress_bar

    adapters = [(read_adapter(path), strength) for path, strength in args.adapters]
    for adapter, _ in adapters:
        for problem in adapter.problems[:5]:
            if not args.quiet:
                print(f"warning: {adapter.path.name}: {problem}")
    with progress_bar(total, "baking", unit="B", enabled=None if not args.quiet else False) as advance:
        report = bake_checkpoint(args.base, adapters, args.output, overwrite=args.force, family=args.family,
                                 on_tensor=lambda e: advance(e.end - e.begin), skip_bad=args.skip_bad)
    print_report(args, report.lines())
    return 0
