"""The ``pnnh`` command line: a thin layer over the Python API, the top layer of the package.

Every subcommand is one module of this package exposing ``register(subparsers)``, which adds
the subparser and sets ``func`` to the callable that runs it. ``func(args)`` returns the exit
status: 0 done, 1 the work failed (a diverged run, a failed check), 2 bad input (an invalid
argument, config or file), reported as one line ``pnnh COMMAND: error: ...`` on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pnnh.io import os_error_line

# In the order `pnnh --help` lists them.
COMMAND_MODULES = ("models", "data", "train", "probe", "theory", "sweep", "tune", "bench", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pnnh",
        description="Train and compare plain, residual and PNNH networks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"pnnh.cli.{name}").register(sub)
    return parser


def add_import_flag(parser: argparse.ArgumentParser, dest: str = "cli_imports", note: str = "") -> None:
    """``--import MODULE`` (repeatable) for a command that builds models by name. ``main`` imports
    ``args.cli_imports`` before the command runs; ``pnnh train``, ``sweep`` and ``tune`` pass
    ``dest="imports"``, the config field, so the run's config keeps it and every process imports it."""
    parser.add_argument("--import", dest=dest, action="append", default=None, metavar="MODULE",
                        help=f"import this module or .py file first, so the models it registers are known "
                             f"(repeatable{note}), e.g. --import mynet")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "cli_imports", None):
        from pnnh.models.registry import ModelImportError, import_models

        try:
            import_models(args.cli_imports)
        except ModelImportError as err:
            print(f"pnnh {args.command}: error: {err}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except OSError as err:  # the machine said no (full disk, read-only, no permission): the user's to fix
        print(f"pnnh {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 2

