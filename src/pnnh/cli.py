"""The ``pnnh`` command line: a thin layer over the Python API.

Each subcommand lives beside the code it drives, in a module exposing
``register(subparsers)``; that function adds the subparser and sets ``func`` to the
callable that runs it (``func(args) -> int`` exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Module paths, not imports, so `pnnh --help` stays fast and one broken command
# cannot take the others down.
COMMAND_MODULES = (
    "pnnh.models.cli",
    "pnnh.data.cli",
    "pnnh.train.cli",
    "pnnh.probe.cli",
    "pnnh.theory",
    "pnnh.experiments.cli",
    "pnnh.experiments.bench_cli",
    "pnnh.export_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pnnh",
        description="Train and compare plain, residual and PNNH networks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for path in COMMAND_MODULES:
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name == path:  # command not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
