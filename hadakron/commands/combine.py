"""`hadakron combine A[:S] B[:S]... -o OUT [--rank R]`: several adapters into one LoRA with their exact weighted sum."""
from __future__ import annotations

import argparse
from pathlib import Path

from hadakron.commands.common import (DTYPES, adapter_spec, add_common_arguments, add_layout_argument, check_output,
                                     print_report)

DESCRIPTION = """Combine LoHa, LoKr and LoRA adapters into one LoRA file whose delta-W is exactly
sum(strength_i * delta-W_i) for every layer. Each module is rewritten in its exact LoRA form (LoHa: rank
r1*r2; LoKr: rank R1*R2 through kron(P1, P2) @ kron(Q1, Q2); never above the layer's full rank) and the
forms of one layer are stacked along the rank, strengths folded in. No averaging of factors, which would be
wrong for products. With --rank R each layer is cut to its best rank-R approximation (truncated SVD) and
the relative Frobenius error is printed per layer (worst first) and overall, and stored in the metadata.

Output: kohya lora_up.weight / lora_down.weight / alpha (alpha = rank, scale 1), loadable by ComfyUI's
LoraLoader, sd-scripts and LyCORIS. DoRA modules have no exact LoRA form and are skipped (bake them).

Exit codes: 0 done, 1 failed, 2 usage error."""

EPILOG = """examples:
  hadakron combine style_loha.safetensors:0.7 char_lokr.safetensors -o both.safetensors
  hadakron combine a.safetensors b.safetensors:-0.5 -o small.safetensors --rank 32 --dtype fp16"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `combine` subcommand."""
    p = subparsers.add_parser("combine", help="combine adapters into one LoRA with the exact weighted sum (or best rank-R)",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", type=adapter_spec, metavar="ADAPTER[:STRENGTH]",
                   help="adapter file, optionally with a strength after a colon (default 1.0)")
    p.add_argument("-o", "--output", type=Path, required=True, help="LoRA file to write")
    p.add_argument("--rank", type=int, help="cut every layer to this rank by truncated SVD (default: exact)")
    add_layout_argument(p, "--layout", "key layout of the output (default kohya)", default="kohya")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="tensor dtype of the output (default fp32)")
    add_common_arguments(p, family_help="read adapter keys as this family (default: detect)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip broken modules (non-float factors, bad shapes, non-scalar or negative alpha, ...) and "
                        "list them, instead of failing")
    return p


def run(args: argparse.Namespace) -> int:
    """Combine, write, print the report; 0 when the output was written."""
    from hadakron.commands import CommandError
    from hadakron.io.safetensors_header import read_header

    if args.rank is not None and args.rank < 1:
        raise CommandError(f"--rank must be at least 1, found {args.rank}")
    check_output(args.output, args.force, [p for p, _ in args.adapters])
    for path, _ in args.adapters:  # unreadable inputs fail here, before torch is imported
        read_header(path)
    import torch

    from hadakron.io import read_adapter
    from hadakron.merge import combine
    from hadakron.merge.progress import progress_bar

    adapters = [(read_adapter(path), strength) for path, strength in args.adapters]
    total = len({k for a, _ in adapters for k in a.modules})
    with progress_bar(total, "combining", unit="module", enabled=None if not args.quiet else False) as advance:
        result = combine(adapters, rank=args.rank, layout=args.layout, dtype=getattr(torch, DTYPES[args.dtype]),
                         family=args.family, on_module=lambda _: advance(1), skip_bad=args.skip_bad)
    result.write(args.output, overwrite=args.force)
    print_report(args, result.lines())
    return 0
