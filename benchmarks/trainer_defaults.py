"""PNNH vs ResNet training speed in the settings ``pnnh train`` picks by itself, at depths 20/56/110.

For each model the trainer resolves precision (``auto``) and layout (``channels_last: auto``:
measured on this machine and cached, pnnh.train.speed); the model is then timed in that
setting. For reference pnnh also runs in the layout of the old width rule
(``prefers_channels_last_on_cpu``). All models of a depth are interleaved in one process
(pnnh.experiments.bench); two figures per block:

- ``wall``: images/s of wall-clock time, what a user waits for;
- ``cpu``: images/s of this process's CPU time (``time.process_time``). On a machine shared with
  other jobs the wall clock also counts the time the scheduler gave to them; with one thread the
  CPU time counts only this process's own work (with several, also OpenMP's spin-waiting).

    python benchmarks/trainer_defaults.py [--depths 20,56,110] [--threads N] [--out runs/bench/defaults]

Writes defaults.json (every block's figures, the paired ratios, the load) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from pnnh.experiments.bench import BenchConfig, ModelBench, Setting, interleave, paired_ratio, trainer_bench
from pnnh.io import atomic_write_text
from pnnh.train.config import resolve_precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="20,56,110")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, as the trainer)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="runs/bench/defaults")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", "cpu")
    cfg = BenchConfig(batch_size=args.batch_size, repeats=args.repeats, steps=args.steps)
    record = {"threads": torch.get_num_threads(), "precision": precision, "batch_size": args.batch_size,
              "load_avg_start": os.getloadavg(), "depths": {}}
    for depth in map(int, args.depths.split(",")):
        benches = {}
        for family in ("resnet", "pnnh"):
            name = f"{family}{depth}"
            default = benches[f"{name} default"] = trainer_bench(name, cfg)
            rule = default.model.prefers_channels_last_on_cpu
            if family == "pnnh" and default.setting.channels_last != rule:
                benches[f"{name} width-rule"] = ModelBench(name, Setting(precision, rule), cfg, torch.device("cpu"))
        values = interleave({k: b.train_block_wall_and_cpu for k, b in benches.items()}, args.repeats, 1)
        base = values[f"resnet{depth} default"]
        rows = {}
        for key, vals in values.items():
            wall, cpu = [v[0] for v in vals], [v[1] for v in vals]
            rows[key] = {"setting": benches[key].setting.label, "wall_images_per_s": statistics.median(wall),
                         "cpu_images_per_s": statistics.median(cpu),
                         "wall_ratio": paired_ratio(wall, [b[0] for b in base]),
                         "cpu_ratio": paired_ratio(cpu, [b[1] for b in base]), "wall_all": wall, "cpu_all": cpu}
            print(f"{key:<22} {rows[key]['setting']:<20} wall {rows[key]['wall_images_per_s']:7.1f} img/s "
                  f"x{rows[key]['wall_ratio']:.2f}   cpu {rows[key]['cpu_images_per_s']:7.1f} img/s "
                  f"x{rows[key]['cpu_ratio']:.2f}", flush=True)
        record["depths"][depth] = rows
        record["load_avg_end"] = os.getloadavg()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "defaults.json", json.dumps(record, indent=2) + "\n")
    print(f"load average at start {record['load_avg_start']}, at end {record['load_avg_end']}")


if __name__ == "__main__":
    main()
