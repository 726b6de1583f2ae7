"""The tuned-baselines table of the README (issue 19, objection 2), from the studies and the sweep.

    python results/review-tuned-baselines/table.py [SWEEP_DIR]   # default runs/review-tuned-baselines-depths

Per method: the tuned setting (the study's best trial), the study's score of the method's own
recipe (trial 0) and of its best trial (seed 0, validation), then the tuned setting on 3 seeds
(validation per seed, mean ± sample std, test mean) from the sweep at depth 56, where the studies
ran. Then the same settings at every depth of the sweep (20, 56, 110): validation mean ± std per
depth, and each method minus tuned pnnh at that depth, paired by seed (mean [min, max]; a diverged
seed counts as missing and the pairing uses the seeds both finished).
"""
import json
import statistics
import sys
from pathlib import Path

import optuna

METHODS = {"plain": "plain", "resnet": "resnet", "pnnh": "pnnh", "fixup": "fixup_resnet",
           "skipinit": "skipinit_resnet", "rezero": "rezero_resnet", "tat": "tat_plain", "dirac": "dirac_ncrelu"}
ROOT = Path(__file__).resolve().parents[2]
sweep = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "review-tuned-baselines-depths"
optuna.logging.set_verbosity(optuna.logging.WARNING)
cells = json.loads((sweep / "results.json").read_text())["cells"]


def val_by_seed(model: str, depth: int) -> dict[int, float | None]:
    """Validation % per seed of ``model``'s tuned cells at ``depth`` (None: diverged or failed)."""
    return {c["seed"]: 100 * c["val_acc"] if c["status"] == "ok" and c["val_acc"] is not None else None
            for c in cells if c["variant"] == f"{model}-tuned" and c["depth"] == depth}


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` of the seeds that finished; one value alone; ``—`` for none."""
    if len(values) > 1:
        return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    return f"{values[0]:.2f}" if values else "—"


print("| method (depth 56) | tuned setting | study: own recipe → best (val %, seed 0) | tuned, val % per seed | val mean ± std | test mean |")
print("|---|---|---:|---:|---:|---:|")
for method, model in METHODS.items():
    db = ROOT / "runs" / f"tune-{method}" / "study.db"
    if not db.exists():
        print(f"| {method} | no study | | | | |")
        continue
    study = optuna.load_study(study_name="pnnh-tune", storage=f"sqlite:///{db}")
    first = study.trials[0]
    recipe = "diverged" if "diverged" in first.user_attrs else f"{100 * (first.value or 0):.2f}"
    best = study.best_trial
    setting = ", ".join(f"{k.replace('model_kwargs.', '')} {v:.3g}" if isinstance(v, float) else f"{k.replace('model_kwargs.', '')} {v}"
                        for k, v in best.params.items())
    vals = [v for _, v in sorted(val_by_seed(model, 56).items())]
    per_seed = " / ".join("diverged" if v is None else f"{v:.2f}" for v in vals)
    mean = mean_std([v for v in vals if v is not None])
    tests = [100 * c["test_acc"] for c in cells if c["variant"] == f"{model}-tuned" and c["depth"] == 56
             and c["status"] == "ok" and c["test_acc"] is not None]
    test = f"{statistics.fmean(tests):.2f}" if tests else "—"
    print(f"| {method} ({model}) | {setting} | {recipe} → {100 * best.value:.2f} | {per_seed} | {mean} | {test} |")


depths = sorted({c["depth"] for c in cells})
print()
print("| method, tuned at 56 | " + " | ".join(f"depth {d}: val % mean ± std" for d in depths)
      + " | " + " | ".join(f"− pnnh at {d}, paired" for d in depths) + " |")
print("|---|" + "---:|" * (2 * len(depths)))
for method, model in METHODS.items():
    means, diffs = [], []
    for depth in depths:
        mine, ref = val_by_seed(model, depth), val_by_seed("pnnh", depth)
        lost = sum(v is None for v in mine.values())
        text = mean_std([v for v in mine.values() if v is not None]) + (f" ({lost} diverged)" if lost else "")
        means.append(text if mine else "not run")
        pairs = [mine[s] - ref[s] for s in mine if mine[s] is not None and ref.get(s) is not None]
        diffs.append("—" if model == "pnnh" or not pairs else
                     f"{statistics.fmean(pairs):+.2f} [{min(pairs):+.2f}, {max(pairs):+.2f}]")
    print(f"| {method} | " + " | ".join(means) + " | " + " | ".join(diffs) + " |")
