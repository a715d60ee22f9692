"""`hadakron demo`: train, save, inspect, bake, combine and convert on a tiny SDXL-structured model (CPU, no downloads)."""
from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """Run hadakron's whole file workflow on a tiny SDXL-structured UNet, on CPU, in well under a
minute, with no downloads:

  1. build the model (real SDXL module names) and a synthetic target that differs by a known low-rank change
  2. train a LoKr and a LoHa to reproduce it (hadakron.train) and save them with kohya metadata
  3. inspect both files
  4. bake them into an SDXL-layout checkpoint and check the baked weights and outputs
  5. combine them into one LoRA, exactly and at rank 2 (with the reported error)
  6. convert the LoKr to LoRA (exact and rank 2) and to the ComfyUI key layout

Each step prints what it produced: losses, file sizes, delta-W errors and timings.
Exit codes: 0 done, 1 failed, 2 usage error."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `demo` subcommand."""
    p = subparsers.add_parser("demo", help="train, save, inspect, bake, combine and convert on a tiny model (CPU)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, default=Path("hadakron-demo"),
                   help="folder for the files it writes (default ./hadakron-demo; must be new or empty)")
    p.add_argument("--steps", type=int, default=120, help="training steps per adapter (default 120)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder, replacing files")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every step finished."""
    from hadakron.commands import CommandError
    from hadakron.demo import run_demo

    if args.steps < 5:
        raise CommandError(f"--steps must be at least 5, found {args.steps}")
    run_demo(args.output, steps=args.steps, seed=args.seed, overwrite=args.force, echo=lambda line: print(line, flush=True))
    return 0
