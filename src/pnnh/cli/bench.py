"""``pnnh bench``: training and inference throughput, peak memory and FLOPs of models side by side.

Models of a group share depth and width and are measured interleaved in one process (see
``pnnh.experiments.bench``); ratios are to the group's first model.

    pnnh bench                                  # every default group, fp32 and bf16
    pnnh bench --group cifar56 --precision bf16 --compile both
    pnnh bench --models resnet20,pnnh20 --set width=32 --json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from pnnh.cli import add_import_flag
from pnnh.experiments.bench import GROUPS, PRECISIONS, QUICK, BenchConfig, Setting

CHOICES = {"on": (True,), "off": (False,), "both": (False, True)}


def _names(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated model names, got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by ``pnnh bench`` and benchmarks/throughput.py)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--models", type=_names, metavar="A,B,C",
                       help="one group of models, baseline first (e.g. resnet56,plain56,pnnh56)")
    which.add_argument("--group", action="append", choices=list(GROUPS),
                       help="a predefined group, repeatable (default: all: "
                            + "; ".join(f"{g} = {'/'.join(m)}" for g, m in GROUPS.items()) + ")")
    p.add_argument("--precision", choices=[*PRECISIONS, "both"], default="both",
                   help="autocast precision (default both)")
    p.add_argument("--channels-last", choices=list(CHOICES), default="on",
                   help="channels_last memory format (default on)")
    p.add_argument("--compile", choices=list(CHOICES), default="off", help="torch.compile the models (default off)")
    p.add_argument("--batch-size", type=int, help="images per step (default 128)")
    p.add_argument("--repeats", type=int, help="timed rounds; min/median/max are over these (default 5)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    p.add_argument("--steps", type=int, help="steps per timed block (default 2)")
    p.add_argument("--img-size", type=int, help="synthetic input side in pixels (default 32; 3 channels)")
    p.add_argument("--matmul-size", type=int, help="side of the square matmul giving the FLOP/s ceiling (default 2048)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model keyword argument for every model, e.g. --set width=32 (repeatable)")
    p.add_argument("--quick", action="store_true", help="smoke test: width 12, 16 px, batch 8, one round")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list instead of the table")
    p.add_argument("--out", help="directory for bench.json/.csv/.png/.txt (default runs/bench/<timestamp>)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def register(sub) -> None:
    p = sub.add_parser("bench", help="throughput, memory and FLOPs of models side by side",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    add_import_flag(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` the flags describe: defaults, then ``--quick``, then explicit flags."""
    from pnnh.models import list_models
    from pnnh.cli.train import parse_set

    groups = {"custom": args.models} if args.models else {g: GROUPS[g] for g in args.group or GROUPS}
    known = set(list_models())
    unknown = [m for models in groups.values() for m in models if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; `pnnh models` lists the valid names")
    values = dict(QUICK) if args.quick else {}
    flags = {"batch_size": args.batch_size, "repeats": args.repeats, "warmup": args.warmup, "steps": args.steps,
             "img_size": args.img_size, "matmul_size": args.matmul_size, "threads": args.threads}
    values.update({k: v for k, v in flags.items() if v is not None})
    values["model_kwargs"] = {**values.get("model_kwargs", {}), **parse_set(args.set)}
    precisions = PRECISIONS if args.precision == "both" else (args.precision,)
    settings = [Setting(p, c, k) for p in precisions
                for c in CHOICES[args.channels_last] for k in CHOICES[args.compile]]
    return BenchConfig(groups=groups, settings=settings, device=args.device, **values)


def run(args: argparse.Namespace) -> int:
    from pnnh.experiments.bench import format_table, run_benchmark, write_results
    from pnnh.train.config import ConfigError

    try:
        cfg = config_from_args(args)
        records = run_benchmark(cfg, progress=args.progress)
    except (ValueError, TypeError, ConfigError) as err:
        print(f"pnnh bench: error: {err}", file=sys.stderr)
        return 2
    out = args.out or f"runs/bench/throughput-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = write_results(records, out, command=shlex.join(sys.argv))
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(format_table(records))
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0
