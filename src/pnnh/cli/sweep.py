"""``pnnh sweep``, ``pnnh report`` and ``pnnh demo``."""
from __future__ import annotations

import argparse
import shlex
import sys
import time

from pnnh.cli.train import add_config_flags, config_overrides, parse_set
from pnnh.train.config import ConfigError

DEMO = {  # plain, resnet and pnnh at a shallow and a deep depth, in well under 10 minutes on 2 CPU cores
    "families": ["plain", "resnet", "pnnh"],
    "depths": [8, 56],
    "seeds": 1,
    "train": {"epochs": 2, "train_subset": 10000, "test_subset": 2000, "batch_size": 128},
}


# TrainConfig fields each cell sets itself (seed from --seeds, out under the sweep's --out).
CELL_FIELDS = ("model", "seed", "out")


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/2)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= I < N (e.g. 0/2 and 1/2 for two processes)")
    return i, n


def register(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of models (family x depth x seed) and report",
                       description="Train every cell (variant x depth x seed) through the same trainer, data, "
                                   "recipe and budget; resumable; writes the report at the end.")
    p.add_argument("--config", metavar="FILE.yaml", help="sweep recipe (see configs/); flags override it")
    p.add_argument("--families", type=_csv(str), help="e.g. plain,resnet,pnnh (replaces the recipe's variants)")
    p.add_argument("--depths", type=_csv(int), help="e.g. 8,20,56,110")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    p.add_argument("--out", required=True, help="sweep directory (re-run the same command to resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model keyword for every cell (coder_* keys reach PNNH families only), repeatable")
    p.add_argument("--retry-failed", action="store_true", help="train again the cells recorded as failed")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="train only cells I, I+N, I+2N, ... (0-based): run N such processes side by side "
                        "on the same --out, e.g. with OMP_NUM_THREADS=1 each on an N-core machine")
    # Every training setting a cell does not set itself, for every cell (overrides the recipe's train:).
    p.set_defaults(func=run_sweep_command, train_flags=add_config_flags(p.add_argument_group("training (every cell)"),
                                                                        skip=CELL_FIELDS))

    r = sub.add_parser("report", help="write report.md, results.csv/json and plots for a sweep directory")
    r.add_argument("dir")
    r.add_argument("--reference", metavar="VARIANT",
                   help="compare every variant with this one, seed by seed (default: resnet when present)")
    r.set_defaults(func=run_report)

    d = sub.add_parser("demo", help="the README's main job: a small plain/resnet/pnnh depth sweep (<10 min)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default=None, help="default: fashion-mnist if installed, else digits")
    d.set_defaults(func=run_demo)


def run_sweep_command(args) -> int:
    from pnnh.experiments.report import aggregate, format_console_table, write_report
    from pnnh.experiments.sweep import failure_summary, load_sweep, run_sweep

    train = config_overrides(args, args.train_flags)
    try:
        spec = load_sweep(args.config, families=args.families, depths=args.depths, seeds=args.seeds,
                          train=train, model_kwargs=parse_set(args.set))
        argv = sys.argv[1:]
        if "--shard" in argv:  # every shard runs the same sweep: record the command without it
            k = argv.index("--shard")
            argv = argv[:k] + argv[k + 2:]
        command = "pnnh " + " ".join(shlex.quote(a) for a in argv)
        records = run_sweep(spec, args.out, command=command, retry_failed=args.retry_failed, shard=args.shard)
    except ConfigError as err:
        print(f"pnnh sweep: error: {err}", file=sys.stderr)
        return 2
    report = write_report(args.out)
    print(format_console_table(aggregate(records)))
    print(f"report: {report}")
    failed = failure_summary(records)
    if failed:  # the report is written either way; the exit status tells a script the grid is incomplete
        print(f"pnnh sweep: {failed}", file=sys.stderr)
        return 1
    return 0


def run_report(args) -> int:
    from pnnh.experiments.report import aggregate, format_console_table, write_report
    from pnnh.experiments.sweep import read_cells

    try:
        report = write_report(args.dir, reference=args.reference)
    except (FileNotFoundError, ValueError) as err:
        print(f"pnnh report: error: {err}", file=sys.stderr)
        return 2
    print(format_console_table(aggregate(read_cells(args.dir))))
    print(f"report: {report}")
    return 0


def run_demo(args) -> int:
    from pnnh.data import load_dataset
    from pnnh.experiments.report import aggregate, format_console_table, write_report
    from pnnh.experiments.sweep import load_sweep, run_sweep

    data = args.data
    if data is None:
        try:
            load_dataset("fashion-mnist")
            data = "fashion-mnist"
        except FileNotFoundError as err:
            print(f"Fashion-MNIST is not available ({str(err).splitlines()[0]}); the demo uses sklearn digits.")
            data = "digits"
    train = {**DEMO["train"], "data": data}
    if data == "digits":
        train.update(train_subset=None, test_subset=None, epochs=10, img_size=16)
    spec = load_sweep(families=DEMO["families"], depths=DEMO["depths"], seeds=DEMO["seeds"], train=train)
    print(f"pnnh demo: {', '.join(DEMO['families'])} at depths {DEMO['depths']} on {data} -> {args.out}")
    start = time.time()
    records = run_sweep(spec, args.out, command=f"pnnh demo --out {args.out} --data {data}")
    report = write_report(args.out)
    print()
    print(format_console_table(aggregate(records)))
    print(f"\nreport with plots: {report}  ({time.time() - start:.0f} s)")
    return 0
