"""Subcommands of the `hadakron` command line, one module each.

A command module exposes `add_parser(subparsers) -> argparse.ArgumentParser` (adds its subparser and
arguments) and `run(args) -> int` (0 done, 1 failed). To fail with a message for the user, raise
`CommandError` (or `hadakron.io.AdapterFileError`, `FileExistsError`, ...): `hadakron.cli.main` prints one
line on stderr and returns 1. `hadakron.cli.COMMANDS` lists the modules in the order `--help` shows them.
"""
from __future__ import annotations


class CommandError(Exception):
    """A failure the user can act on; its message is printed as one line and the command exits with 1."""
