"""``pnnh sweep``, ``pnnh report`` and ``pnnh demo``."""
from __future__ import annotations

import argparse
import shlex
import sys
import time

from pnnh.cli.train import add_config_flags, config_overrides, parse_set
from pnnh.train.config import ConfigError

DEMO = {  # plain, resnet and pnnh at a shallow and a deep depth, in well under 10 minutes on 2 CPU cores
    "models": ["plain", "resnet", "pnnh"],
    "depths": [8, 56],
    "seeds": 1,
    "train": {"epochs": 2, "train_subset": 10000, "test_subset": 2000, "batch_size": 128},
}


LAUNCHERS = ("local", "slurm", "submitit-local")
CLUSTER_FLAGS = ("partition", "gpus", "cpus", "time", "array_size", "cells_per_job")

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
    p = sub.add_parser("sweep", help="train a grid of models (variant x depth x seed) and report",
                       description="Train every cell (variant x depth x seed) through the same trainer, data, "
                                   "recipe and budget; resumable; writes the report at the end.")
    p.add_argument("--config", metavar="FILE.yaml", help="sweep recipe (see configs/); flags override it")
    p.add_argument("--models", "--families", dest="models", type=_csv(str),
                   help="model names that take depth=, e.g. plain,resnet,pnnh (replaces the recipe's variants; "
                        "--families is its old name)")
    p.add_argument("--depths", type=_csv(int), help="e.g. 8,20,56,110")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    p.add_argument("--out", required=True, help="sweep directory (re-run the same command to resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model keyword for every cell (coder_* keys reach PNNH models only), repeatable")
    p.add_argument("--retry-failed", action="store_true", help="train again the cells recorded as failed")
    p.add_argument("--only", type=_csv(str), metavar="CELLS",
                   help="train only these variants' cells or these cells, e.g. looks-linear,code-bn or "
                        "looks-linear-d56-s1 (the others stay untrained for a later run; the sweep and its "
                        "directory stay the whole recipe's)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="train only cells I, I+N, I+2N, ... (0-based): run N such processes side by side "
                        "on the same --out, e.g. with OMP_NUM_THREADS=1 each on an N-core machine")
    c = p.add_argument_group("cluster jobs (--launcher slurm or submitit-local; flags override the recipe's cluster:)")
    c.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: train here (default); slurm: submit one job per cell with submitit and return; "
                        "submitit-local: the same jobs as processes on this machine, waited for")
    c.add_argument("--partition", help="Slurm partition")
    c.add_argument("--gpus", type=int, help="GPUs per job (default 1)")
    c.add_argument("--cpus", type=int, help="CPUs per job (default 8)")
    c.add_argument("--time", type=int, metavar="MINUTES", help="time limit per job (default 240); a longer cell "
                                                                "goes on in the requeued job")
    c.add_argument("--array-size", type=int, help="at most this many jobs of the array at once")
    c.add_argument("--cells-per-job", type=int, help="cells trained one after another in one job (default 1)")
    c.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then write the report")
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
    from pnnh.experiments.sweep import load_sweep, run_sweep

    train = config_overrides(args, args.train_flags)
    try:
        spec = load_sweep(args.config, models=args.models, depths=args.depths, seeds=args.seeds,
                          train=train, model_kwargs=parse_set(args.set))
        command = "pnnh " + " ".join(shlex.quote(a) for a in _without(sys.argv[1:], ("--shard", "--only")))
        only = _only_cells(spec, args.only)
        if args.launcher != "local":
            if only is not None:
                raise ConfigError("--only picks cells for local processes; with --launcher, run the recipe's cells")
            return _submit(args, spec, command)
        records = run_sweep(spec, args.out, command=command, retry_failed=args.retry_failed, shard=args.shard,
                            only=only)
    except ConfigError as err:
        print(f"pnnh sweep: error: {err}", file=sys.stderr)
        return 2
    return _finish(args.out, records)


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` less ``flags`` and their values, given as ``--flag value`` or ``--flag=value``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in flags)):
            kept.append(arg)
    return kept


def _only_cells(spec, names: list[str] | None) -> set[str] | None:
    """The ids of the cells ``--only`` names (a variant stands for all its cells), or None for every cell."""
    if names is None:
        return None
    cells = spec.cells()
    ids = {c.id for c in cells}
    unknown = [n for n in names if n not in spec.variants and n not in ids]
    if unknown or not names:
        raise ConfigError(f"--only {','.join(names)}: {', '.join(map(repr, unknown)) or 'nothing given'}; "
                          f"this sweep's variants are {', '.join(spec.variants)}, its cells "
                          f"VARIANT-dDEPTH-sSEED, e.g. {cells[-1].id}")
    return {c.id for c in cells if c.variant in names or c.id in names}


def _submit(args, spec, command: str) -> int:
    """``pnnh sweep --launcher slurm|submitit-local``: submit the cells still to train as jobs."""
    from pnnh.experiments.launch import cluster_options, submit_sweep
    from pnnh.experiments.sweep import read_cells

    if args.shard != (0, 1):
        raise ConfigError("--shard splits a sweep over local processes; with --launcher each cell is its own job")
    options = cluster_options(spec.cluster, {k: getattr(args, k) for k in CLUSTER_FLAGS})
    cluster = "slurm" if args.launcher == "slurm" else "local"
    jobs = submit_sweep(spec, args.out, options, cluster=cluster, command=command, retry_failed=args.retry_failed)
    if not jobs:
        print(f"nothing to submit: every cell of {args.out} is recorded or being trained (`pnnh report {args.out}`)")
        return 0
    print(f"submitted {len(jobs)} job(s) to {cluster} ({', '.join(str(j.job_id) for j in jobs)}); logs in "
          f"{args.out}/.jobs/logs; progress: `pnnh report {args.out}`; after scancel or a lost node, run this "
          "command again to submit the unfinished cells")
    if cluster == "slurm" and not args.wait:
        return 0
    for job in jobs:
        try:
            job.result()
        except Exception as err:  # a job that ended without its result (killed): the cells say the rest
            print(f"pnnh sweep: job {job.job_id} ended without a result: {str(err).splitlines()[0]}", file=sys.stderr)
    return _finish(args.out, read_cells(args.out))


def _finish(out, records: list[dict], command: str = "sweep") -> int:
    """Write the report, print the table; exit status 1 when a cell failed."""
    from pnnh.experiments.report import aggregate, format_console_table, write_report
    from pnnh.experiments.sweep import failure_summary

    report = write_report(out)
    print(format_console_table(aggregate(records)))
    print(f"report: {report}")
    failed = failure_summary(records)
    if failed:  # the report is written either way; the exit status tells a script the grid is incomplete
        print(f"pnnh {command}: {failed}", file=sys.stderr)
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
    spec = load_sweep(models=DEMO["models"], depths=DEMO["depths"], seeds=DEMO["seeds"], train=train)
    print(f"pnnh demo: {', '.join(DEMO['models'])} at depths {DEMO['depths']} on {data} -> {args.out}")
    start = time.time()
    records = run_sweep(spec, args.out, command=f"pnnh demo --out {args.out} --data {data}")
    print()
    status = _finish(args.out, records, "demo")  # exit 1, naming each, when a cell failed
    print(f"({time.time() - start:.0f} s)")
    return status
