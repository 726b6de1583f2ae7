"""Time to accuracy: wall-clock until pnnh56 and resnet56 first reach a test accuracy.

Both models train with ``pnnh train`` and its default recipe (every setting the trainer picks
by itself: precision, layout, compilation, threads), on the same data, at the same time, each
in its own process: run side by side, both see the same machine load for the whole
measurement, which a sequential A-then-B run on a shared machine does not give. A model's
process is stopped once its test accuracy (evaluated after every epoch) reaches ``--target``.

    python benchmarks/time_to_accuracy.py                      # Fashion-MNIST, 91%, pnnh56 vs resnet56
    python benchmarks/time_to_accuracy.py --models resnet20,pnnh20 --target 0.9 --out runs/tta20

Writes ``tta.json`` (every epoch of both runs: test accuracy, training seconds, wall seconds
since start; the times to target and their ratio) to ``--out`` after every epoch, so a run
stopped early still leaves its record. ``training seconds`` is the trainer's own clock (steps
only, evaluation excluded); ``wall`` includes evaluation and start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pnnh.io import atomic_write_text


def read_epochs(metrics: Path) -> list[dict]:
    """The epochs logged so far in a run's metrics.jsonl (none before the first)."""
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def first_reaching(epochs: list[dict], target: float) -> dict | None:
    """The first logged epoch whose test accuracy is at least ``target``."""
    return next((e for e in epochs if e.get("test_acc", 0.0) >= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet56,pnnh56", help="baseline,candidate (default resnet56,pnnh56)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--target", type=float, default=0.91, help="test accuracy to reach, a fraction (default 0.91)")
    p.add_argument("--out", default="runs/time_to_accuracy")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between reads of the metrics logs")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra flags for both `pnnh train` runs")
    args = p.parse_args(argv)
    models = args.models.split(",")
    if len(models) != 2 or not 0.0 < args.target <= 1.0:
        p.error(f"--models needs two names and --target a fraction in (0, 1]; got {args.models!r}, {args.target}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.train_args if a != "--"]
    start = time.perf_counter()
    runs = {}
    for name in models:
        cmd = [sys.executable, "-m", "pnnh", "train", "--model", name, "--data", args.data,
               "--out", str(out / name), *extra]
        log = open(out / f"{name}.log", "w")
        runs[name] = {"cmd": cmd, "proc": subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                      "epochs": [], "walls": {}}
    record = {"command": " ".join(sys.argv), "target": args.target, "data": args.data,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (torch's default)"),
              "cpus": os.cpu_count(), "runs": {}}
    while any(r["proc"].poll() is None for r in runs.values()):
        time.sleep(args.poll)
        for name, r in runs.items():
            r["epochs"] = read_epochs(out / name / "metrics.jsonl")
            for e in r["epochs"]:
                r["walls"].setdefault(e["epoch"], time.perf_counter() - start)
            hit = first_reaching(r["epochs"], args.target)
            if hit is not None and r["proc"].poll() is None:
                r["proc"].terminate()
            record["runs"][name] = {
                "command": " ".join(r["cmd"]), "finished": r["proc"].poll() is not None,
                "epochs": [{"epoch": e["epoch"], "test_acc": e.get("test_acc"), "train_seconds": e.get("seconds"),
                            "wall_seconds": round(r["walls"][e["epoch"]], 1),
                            "images_per_s": e.get("images_per_s")} for e in r["epochs"]],
                "reached": hit is not None,
                "train_seconds_to_target": hit and hit.get("seconds"),
                "wall_seconds_to_target": hit and round(r["walls"][hit["epoch"]], 1),
            }
        record["load_avg"] = os.getloadavg()
        base, cand = (record["runs"].get(m, {}) for m in models)
        if base.get("reached") and cand.get("reached"):
            record["ratio_train_seconds"] = cand["train_seconds_to_target"] / base["train_seconds_to_target"]
            record["ratio_wall_seconds"] = cand["wall_seconds_to_target"] / base["wall_seconds_to_target"]
        atomic_write_text(out / "tta.json", json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
