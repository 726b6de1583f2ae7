"""``pnnh models [PATTERN]``: list registered models, with parameter counts."""
from __future__ import annotations

import argparse
import sys

from pnnh.cli import add_import_flag
from pnnh.io import format_table


def register(sub) -> None:
    p = sub.add_parser("models", help="list registered models",
                       description="List registered models (shell-style PATTERN) with their parameter counts.")
    p.add_argument("pattern", nargs="?", default="*", help="e.g. 'pnnh*' (default: all)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--img-size", type=int, default=32)
    add_import_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pnnh.models import count_params, create_model, find_shortcuts, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"pnnh models: error: no model matches {args.pattern!r}; `pnnh models` lists them all",
              file=sys.stderr)
        return 2
    rows = []
    for name in names:
        model = create_model(name, num_classes=args.num_classes, in_chans=args.in_chans, img_size=args.img_size)
        rows.append((name, f"{count_params(model):,}", len(find_shortcuts(model))))
    print(format_table(("model", "params", "shortcuts"), rows, align="<>>"))
    return 0
