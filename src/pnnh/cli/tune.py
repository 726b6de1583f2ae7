"""``pnnh tune``: Optuna search of a method's training settings on the validation split."""
from __future__ import annotations

import sys

from pnnh.cli.train import add_config_flags, config_overrides
from pnnh.train.config import ConfigError


def register(sub) -> None:
    p = sub.add_parser("tune", help="search a method's lr, warm-up, ... on the validation split (Optuna, resumable)",
                       description="Run (or continue) an Optuna study over a tune file's search space: each trial "
                                   "trains with pnnh train and is scored, and pruned, on validation accuracy. The "
                                   "study is OUT/study.db; re-run the command to continue a stopped one. Writes "
                                   "OUT/best.yaml (for pnnh train --config) and OUT/best-sweep.yaml (pnnh sweep).")
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="tune file with tune: and train: (configs/tune-*.yaml)")
    p.add_argument("--out", required=True, help="study directory (re-run the same command to resume)")
    p.add_argument("--trials", type=int, help="complete or pruned trials to end with (default: the file's tune.trials)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    p.set_defaults(func=run_tune, train_flags=add_config_flags(p.add_argument_group("training (every trial)"),
                                                               skip=("out",)))


def run_tune(args) -> int:
    try:
        from pnnh.experiments.tune import tune
    except ImportError as err:
        print(f"pnnh tune: error: {err}; install Optuna with: pip install 'pnnh[tune]'", file=sys.stderr)
        return 2
    try:
        study = tune(args.config, args.out, trials=args.trials, overrides=config_overrides(args, args.train_flags),
                     seed=args.sampler_seed)
    except ConfigError as err:
        print(f"pnnh tune: error: {err}", file=sys.stderr)
        return 2
    best = study.best_trial
    print(f"best trial {best.number}: val_acc {best.value:.4f} with {best.params}")
    print(f"config: {args.out}/best.yaml (pnnh train --config), {args.out}/best-sweep.yaml (pnnh sweep --config)")
    return 0
