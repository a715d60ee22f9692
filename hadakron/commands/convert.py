"""`hadakron convert IN -o OUT (--layout L | --to-lora [--rank R])`: change an adapter's key layout or make it a LoRA."""
from __future__ import annotations

import argparse
from pathlib import Path

from hadakron.commands.common import DTYPES, add_common_arguments, add_layout_argument, check_output, print_report

DESCRIPTION = """Convert an adapter file, one of two ways:

  --layout L   rename every key into another layout (kohya lora_unet_/lora_te1_, lycoris, ComfyUI
               diffusion_model./text_encoders., PEFT base_model.model., diffusers). Tensors and metadata
               are carried over unchanged: lossless. Keys naming no known SDXL/Anima layer are an error.
  --to-lora    rewrite LoHa/LoKr modules as LoRA (lora_up/lora_down/alpha). Exact by default (LoHa rank
               r1*r2, LoKr rank R1*R2, capped at the layer's full rank); with --rank R a truncated SVD
               keeps the best rank-R approximation and prints the relative Frobenius error.

Exit codes: 0 done, 1 failed, 2 usage error."""

EPILOG = """examples:
  hadakron convert simpletuner_lokr.safetensors -o kohya_lokr.safetensors --layout kohya
  hadakron convert my_loha.safetensors -o my_lora.safetensors --to-lora --rank 64"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `convert` subcommand."""
    p = subparsers.add_parser("convert", help="change an adapter's key layout (lossless) or turn LoHa/LoKr into LoRA",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="adapter file (.safetensors)")
    p.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    what = p.add_mutually_exclusive_group(required=True)
    add_layout_argument(what, "--layout", "rename the keys into this layout")
    what.add_argument("--to-lora", action="store_true", help="rewrite LoHa/LoKr modules as LoRA")
    p.add_argument("--rank", type=int, help="with --to-lora: cut every layer to this rank (truncated SVD)")
    add_layout_argument(p, "--lora-layout", "with --to-lora: key layout of the output (default: the input's own)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="with --to-lora: tensor dtype (default fp32)")
    add_common_arguments(p, family_help="read keys as this family (default: detect)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip broken modules (non-float factors, bad shapes, non-scalar or negative alpha, ...) and "
                        "list them, instead of failing")
    return p


def run(args: argparse.Namespace) -> int:
    """Convert and write; 0 when the output was written."""
    from hadakron.commands import CommandError
    from hadakron.io.safetensors_header import read_header

    if args.rank is not None and not args.to_lora:
        raise CommandError("--rank applies only with --to-lora")
    if args.rank is not None and args.rank < 1:
        raise CommandError(f"--rank must be at least 1, found {args.rank}")
    check_output(args.output, args.force, [args.input])
    read_header(args.input)  # an unreadable input fails here, before torch is imported
    import torch

    from hadakron.io import read_adapter
    from hadakron.merge import convert_layout, to_lora

    adapter = read_adapter(args.input)
    if args.to_lora:
        result = to_lora(adapter, rank=args.rank, layout=args.lora_layout, dtype=getattr(torch, DTYPES[args.dtype]),
                         family=args.family, skip_bad=args.skip_bad)
        lines = result.lines()
    else:
        result = convert_layout(adapter, args.layout, family=args.family, skip_bad=args.skip_bad)
        lines = [f"{len(result.tensors)} tensors renamed: {result.source_layout or 'unknown'} -> {result.layout} layout "
                 f"(values unchanged)"] + [f"  skipped broken module {key}: {why}" for key, why in result.skipped]
    result.write(args.output, overwrite=args.force)
    print_report(args, lines)
    return 0
