"""Argument plumbing shared by the file-writing commands (merge, combine, convert): `FILE[:STRENGTH]`,
the output/family/force/quiet options, the output checks and the closing report."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable

from hadakron.arch import FAMILIES, LAYOUTS
from hadakron.commands import CommandError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""`--dtype` choices -> torch dtype names."""


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


def add_layout_argument(p: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, flag: str, help: str,
                        **kwargs) -> None:
    """A key-layout option whose choices are `hadakron.arch.LAYOUTS`."""
    p.add_argument(flag, choices=LAYOUTS, help=help, **kwargs)


def add_common_arguments(p: argparse.ArgumentParser, *, family_help: str) -> None:
    """`--family`, `--force` and `--quiet`, as every writing command has them."""
    p.add_argument("--family", choices=tuple(FAMILIES), help=family_help)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse, before any work: a NUL byte in any path, an output name the file system cannot hold, an output that
    is a folder, an existing output without --force, a missing folder, or an output that is one of the inputs
    (the same path, or the same file through a symlink or hard link: writing it would replace an input)."""
    from hadakron.io.writer import OutputWriteError, check_output_path, name_limit, same_file

    for p in [out, *inputs]:
        if "\0" in str(p):
            raise CommandError(f"{str(p)!r}: the path holds a NUL byte; give a plain file name")
    for p in inputs:
        too_long = [part for part in p.parts if len(os.fsencode(part)) > name_limit(p.parent)]
        if too_long:
            raise CommandError(f"{str(p)[:80]}...: the name {too_long[0][:24]!r}... is {len(os.fsencode(too_long[0]))} "
                               f"bytes long, more than any file name here can be; check the path")
    try:
        check_output_path(out)
    except OutputWriteError as exc:
        raise CommandError(str(exc)) from None
    if out.exists() and not force:
        raise CommandError(f"{out}: already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise CommandError(f"{out}: folder {out.parent} does not exist")
    for p in inputs:
        if same_file(p, out):
            how = "" if Path(os.path.abspath(p)) == Path(os.path.abspath(out)) else " (through a link or another spelling)"
            raise CommandError(f"{out}: is also the input {p}{how}; write to another file")


def print_report(args: argparse.Namespace, lines: Iterable[str]) -> None:
    """Unless --quiet: the report lines, then `wrote OUT (size)`."""
    if args.quiet:
        return
    for line in lines:
        print(line)
    print(f"wrote {args.output} ({human_size(args.output.stat().st_size)})")


def human_size(n: int) -> str:
    """Bytes as a short human-readable size (KiB, MiB, GiB)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
