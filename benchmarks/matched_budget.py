"""Accuracy at matched parameters, FLOPs and training time: the variants of finished sweeps, side by side.

A sweep gives each variant's accuracy (mean and spread over seeds); its cells' own images/s are
not comparable when the cells ran at different times or under different machine load. This
script measures what the accuracy cost, in one process and interleaved (pnnh.experiments.bench):
for every variant, in the precision and layout ``pnnh train`` picks (measured, cached), its
training images/s by this process's CPU time and by the wall clock, its training FLOPs per image
(forward + backward, ``FlopCounterMode``) and its parameters. Training time for the sweep's budget
is then (training images x epochs) / images/s. Plots accuracy against parameters, training FLOPs
and training time; the first variant of the first sweep is the reference of the ratios.

    OMP_NUM_THREADS=1 python benchmarks/matched_budget.py runs/review-matched-params \\
        runs/review-plain-forms-plain --threads 1 --out results/review-matched-params/budget

Writes ``budget.json`` (every figure), ``budget.md`` (the table) and ``budget.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pnnh.experiments.bench import BenchConfig, interleave, paired_ratio, trainer_bench  # noqa: E402
from pnnh.experiments.sweep import read_cells  # noqa: E402
from pnnh.io import atomic_write_text  # noqa: E402
from pnnh.train.config import resolve_precision  # noqa: E402

KIND_COLORS = {"resnet": "tab:blue", "pnnh": "tab:red", "plain": "tab:gray"}


def variants_of(sweep: Path) -> list[dict]:
    """One entry per (variant, depth) of a sweep with at least one finished cell, in the recipe's
    order: its model, keywords, the per-seed validation and test accuracy (%), and the sweep's training budget."""
    saved = yaml.safe_load((sweep / "sweep.yaml").read_text()) or {}
    train = saved.get("train") or {}
    order = list((saved.get("sweep") or {}).get("variants") or {})
    groups: dict[tuple, list[dict]] = {}
    for cell in read_cells(sweep):
        if cell["status"] == "ok" and cell.get("val_acc") is not None:
            groups.setdefault((cell["variant"], cell["depth"]), []).append(cell)
    if not groups:
        raise SystemExit(f"{sweep}: no finished cell with a validation accuracy (is it a sweep directory?)")
    out = []
    for (variant, depth), cells in sorted(groups.items(), key=lambda kv: (
            order.index(kv[0][0]) if kv[0][0] in order else len(order), kv[0][1])):
        cells.sort(key=lambda c: c["seed"])
        out.append({"sweep": str(sweep), "variant": variant, "model": cells[0]["model"], "depth": depth,
                    "model_kwargs": dict(cells[0].get("model_kwargs") or {}), "seeds": [c["seed"] for c in cells],
                    "val_acc": [100 * c["val_acc"] for c in cells], "test_acc": [100 * c["test_acc"] for c in cells],
                    "params": cells[0]["params"], "train_images": train.get("train_subset"),
                    "epochs": train.get("epochs")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", help="sweep directories (pnnh sweep --out); the first variant is the reference")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, as the trainer)")
    p.add_argument("--img-size", type=int, default=28, help="input side (default 28: Fashion-MNIST)")
    p.add_argument("--in-chans", type=int, default=1, help="input channels (default 1: Fashion-MNIST)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/matched_budget")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [v for s in args.sweeps for v in variants_of(Path(s))]
    precision = resolve_precision("auto", "cpu")
    cfg = BenchConfig(batch_size=args.batch_size, repeats=args.repeats, img_size=args.img_size,
                      in_chans=args.in_chans)
    benches = {}
    for r in rows:
        key = f"{r['variant']}-d{r['depth']}"
        benches[key] = trainer_bench(r["model"], dataclasses.replace(cfg, model_kwargs={"depth": r["depth"],
                                                                                      **r["model_kwargs"]}))
        r.update(key=key, setting=benches[key].setting.label, train_flops_per_image=benches[key].train_flops_per_image)
    load_start = os.getloadavg()
    values = interleave({k: b.train_block_wall_and_cpu for k, b in benches.items()}, args.repeats, 1)
    ref = rows[0]["key"]
    for r in rows:
        wall, cpu = ([v[i] for v in values[r["key"]]] for i in (0, 1))
        r.update(wall_images_per_s=statistics.median(wall), cpu_images_per_s=statistics.median(cpu),
                 cpu_ratio=paired_ratio(cpu, [v[1] for v in values[ref]]),
                 wall_ratio=paired_ratio(wall, [v[0] for v in values[ref]]))
        seen = (r["train_images"] or 0) * (r["epochs"] or 0)
        r["train_seconds"] = seen / r["cpu_images_per_s"] if seen else None
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": torch.get_num_threads(),
              "precision": precision, "batch_size": args.batch_size, "img_size": args.img_size,
              "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "reference": ref, "variants": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "budget.json", json.dumps(record, indent=2) + "\n")
    header = ["variant", "params", "train GFLOPs/img", "img/s (cpu)", f"x {ref}", "train s (budget)", "seeds",
         "val % mean ± std", "test % mean"]
    body = [[r["key"], f"{r['params']:,}", f"{r['train_flops_per_image'] / 1e9:.3f}", f"{r['cpu_images_per_s']:.0f}",
          f"{r['cpu_ratio']:.2f}", f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-", len(r["seeds"]),
          f"{statistics.fmean(r['val_acc']):.2f} ± {statistics.pstdev(r['val_acc']):.2f}",
          f"{statistics.fmean(r['test_acc']):.2f}"] for r in rows]
    table = "\n".join(["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|",
                       *("| " + " | ".join(map(str, row)) + " |" for row in body)])
    atomic_write_text(out / "budget.md", table + "\n")
    print(table)
    plot(rows, out / "budget.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Validation accuracy (mean, min-max over seeds) against parameters, training FLOPs per image
    and measured training time, one colour per kind of net (resnet, pnnh, plain)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    axes_x = (("params", "parameters"), ("train_flops_per_image", "training FLOPs per image"),
              ("train_seconds", "training seconds for the budget (measured img/s)"))
    for ax, (field, label) in zip(axes, axes_x):
        for r in rows:
            if r[field] is None:
                continue
            mean = statistics.fmean(r["val_acc"])
            color = next((c for k, c in KIND_COLORS.items() if r["model"].startswith(k)), "tab:green")
            ax.errorbar([r[field]], [mean], yerr=[[mean - min(r["val_acc"])], [max(r["val_acc"]) - mean]],
                        fmt="o", color=color, capsize=3)
            ax.annotate(r["key"], (r[field], mean), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set(xlabel=label, xscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    fig.suptitle("Accuracy at matched parameters, FLOPs and training time (colour: resnet blue, pnnh red, plain grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
