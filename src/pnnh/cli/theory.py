"""``pnnh theory``: the paper's neuron-response formulas against exact moments and Monte Carlo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pnnh.io import atomic_write_text, write_csv
from pnnh.theory import INPUT_DISTS, format_table, plot_table, theory_table


def register(subparsers) -> None:
    """Add the ``pnnh theory`` subcommand."""
    p = subparsers.add_parser(
        "theory",
        help="Thm 3.2/3.3 moments and survival bound vs Monte Carlo",
        description="Compare the paper's neuron-response formulas (Thm 3.2), the exact "
                    "moments and the Cantelli survival bound (Thm 3.3) with a Monte-Carlo "
                    "estimate, at He-normal init, for plain (y = Wx) and residual "
                    "(y = x + Wx) layers.")
    p.add_argument("--mu", type=float, default=0.4, help="input mean (default 0.4 ≈ ReLU(N(0,1)))")
    p.add_argument("--sigma", type=float, default=0.58,
                   help="input standard deviation, > 0 (default 0.58 ≈ ReLU(N(0,1)))")
    p.add_argument("--width", type=int, default=512, help="layer width n = fan_in (default 512)")
    p.add_argument("--samples", type=int, default=1000,
                   help="Monte-Carlo draws of (W, x); each gives `width` neurons (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--input-dist", choices=INPUT_DISTS, default="normal",
                   help="distribution of the input elements (default normal)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--out", type=Path, default=None,
                   help="also write theory.json, theory.csv and theory.png into this directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pnnh theory``."""
    try:
        rows = theory_table(args.mu, args.sigma, args.width, args.samples, args.seed,
                            args.input_dist, progress=sys.stderr.isatty())
    except ValueError as err:
        print(f"pnnh theory: error: {err}", file=sys.stderr)
        return 2
    settings = {"mu": args.mu, "sigma": args.sigma, "width": args.width,
                "samples": args.samples, "seed": args.seed, "input_dist": args.input_dist}
    print(json.dumps({"settings": settings, "rows": rows}, indent=2) if args.json
          else format_table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"settings": settings, "rows": rows}, indent=2)
        atomic_write_text(args.out / "theory.json", payload)
        write_csv(args.out / "theory.csv", rows)
        plot_table(rows, f"He-normal init, μ={args.mu}, σ={args.sigma}, n={args.width}, "
                         f"{args.input_dist} input", args.out / "theory.png")
    return 0
