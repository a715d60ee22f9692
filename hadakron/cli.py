"""The `hadakron` command: builds argparse from the command modules in `COMMANDS` and runs one of them.

Exit codes: 0 done, 1 failed (one line on stderr, no traceback), 2 usage error.
Set HADAKRON_DEBUG=1 to get the full traceback of a failure.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from hadakron import __version__

COMMANDS: tuple[str, ...] = ("inspect", "merge", "combine", "convert", "demo")
"""Subcommand names; each is the module `hadakron.commands.<name>` with `add_parser` and `run`."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of `COMMANDS`; `only` (one of them) builds just that
    subparser (what `main` does when the first argument names a command: the other command modules are not imported,
    and that command's parsing, help and errors are the same as with the full parser)."""
    parser = argparse.ArgumentParser(
        prog="hadakron", description="LoHa and LoKr adapter files for SDXL and Anima: inspect, merge, convert.")
    parser.add_argument("--version", action="version", version=f"hadakron {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        module = importlib.import_module(f"hadakron.commands.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the command, return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    prog = f"hadakron {args.command}"
    try:
        return int(args._run(args))
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        sys.stderr.close()
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # every failure reaches the user as one line; HADAKRON_DEBUG shows the traceback
        if os.environ.get("HADAKRON_DEBUG"):
            raise
        from hadakron.commands import CommandError
        from hadakron.io import AdapterFileError
        writer = sys.modules.get("hadakron.io.writer")  # only loaded (with torch) when something was written
        write_error = getattr(writer, "OutputWriteError", None)

        known = (CommandError, AdapterFileError, FileExistsError, FileNotFoundError, PermissionError, ValueError,
                 *((write_error,) if write_error is not None else ()))
        message = _one_line(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {_one_line(exc)}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
