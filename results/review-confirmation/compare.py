"""Issue 19 at the confirmation budget: the review sweeps' cells beside the confirmation study's.

The review confirmation configs (configs/review-*-confirmation.yaml) hold the default pnnh and the
usual resnet as reference variants; those cells are the confirmation study's (same recipe, seeds,
data order and --compile: configs/pnnh-confirmation.yaml, results/confirmation/results.csv), so
run.sh leaves them out (--only) and this script pairs the new variants with the recorded pnnh,
resnet and plain cells by seed (and a few new variants with other new ones: ALSO), on
test accuracy (the confirmation protocol has no validation split; it is the final comparison, the
screening runs chose the variants).

    python results/review-confirmation/compare.py runs/review-*-confirmation > results/review-confirmation/compare.md

It also draws the new cells' test accuracy and training loss per epoch into curves.png here (the
confirmation study's own curves: results/confirmation/learning_curves.png).
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIRMATION = HERE.parent / "confirmation" / "results.csv"
REFERENCES = ("pnnh", "resnet", "plain")  # the confirmation study's variants each new cell is paired with
# new variants also paired with other new ones at the same depth (where both exist): what the change
# of setting did, and, for the strict plain forms, the strongest ResNet-110 (objection 4's zero-init)
ALSO = {"resnet-zero-init-tuned": ("resnet-zero-init",), "code-bn": ("looks-linear", "resnet-zero-init"),
        "looks-linear": ("resnet-zero-init",)}


def recorded() -> dict[tuple[str, int], dict[int, dict]]:
    """(variant, depth) -> seed -> {test, loss} from the confirmation study."""
    rows: dict = {}
    for r in csv.DictReader(CONFIRMATION.open()):
        rows.setdefault((r["variant"], int(r["depth"])), {})[int(r["seed"])] = {"test": float(r["test_acc"]) * 100,
                                                                                "src": "confirmation"}
    return rows


def new_cells(sweeps: list[Path]) -> dict[tuple[str, int], dict[int, dict]]:
    rows: dict = {}
    for sweep in sweeps:
        for file in sorted(sweep.glob("cells/*/cell.json")):
            r = json.loads(file.read_text())
            if r["status"] != "ok":
                rows.setdefault((r["variant"], r["depth"]), {})[r["seed"]] = {"test": None, "src": r["status"]}
                continue
            curve = [json.loads(line) for line in (file.parent / "metrics.jsonl").read_text().splitlines()]
            rows.setdefault((r["variant"], r["depth"]), {})[r["seed"]] = {
                "test": r["test_acc"] * 100, "loss": r["metrics"]["train_loss"], "src": sweep.name,
                "curve": [(c["epoch"], c["test_acc"] * 100, c["train_loss"]) for c in curve if "train_loss" in c]}
    return rows


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(sweeps: list[Path]) -> None:
    old, new = recorded(), new_cells(sweeps)
    print("| variant | depth | test % per seed (0 / 1 / 2) | mean ± std | last train loss | source |")
    print("|---|---:|---|---:|---|---|")
    for key in sorted(new, key=lambda k: (k[1], k[0])):
        seeds = new[key]
        per = " / ".join(f"{seeds[s]['test']:.2f}" if s in seeds and seeds[s]["test"] is not None
                         else (seeds[s]["src"] if s in seeds else "not run") for s in range(3))
        losses = " / ".join(f"{seeds[s]['loss']:.3f}" if s in seeds and "loss" in seeds[s] else "—" for s in range(3))
        done = [v["test"] for v in seeds.values() if v["test"] is not None]
        print(f"| {key[0]} | {key[1]} | {per} | {fmt(done)} | {losses} | runs/{next(iter(seeds.values()))['src']} |")
    for key in sorted({(v, d) for v, d in old if v in REFERENCES and any(k[1] == d for k in new)},
                      key=lambda k: (k[1], k[0])):
        seeds = old[key]
        per = " / ".join(f"{seeds[s]['test']:.2f}" for s in range(3))
        print(f"| {key[0]} (recorded) | {key[1]} | {per} "
              f"| {fmt([seeds[s]['test'] for s in range(3)])} | in results/confirmation/README.md | results/confirmation |")
    print()
    print("Paired by seed (new variant minus the recorded one, or minus another new variant), "
          "mean [min, max] over the seeds both have:")
    print()
    for key in sorted(new, key=lambda k: (k[1], k[0])):
        others = [(ref, old) for ref in REFERENCES] + [(ref, new) for ref in ALSO.get(key[0], ())]
        for ref, rows in others:
            theirs = rows.get((ref, key[1]), {})
            diffs = [new[key][s]["test"] - theirs[s]["test"] for s in sorted(new[key])
                     if new[key][s]["test"] is not None and theirs.get(s, {}).get("test") is not None]
            if diffs:
                print(f"- {key[0]}-{key[1]} − {ref}-{key[1]}: {statistics.mean(diffs):+.2f} "
                      f"[{min(diffs):+.2f}, {max(diffs):+.2f}] over {len(diffs)} seed(s)")


def plot(new: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for (variant, depth), seeds in sorted(new.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for seed, cell in sorted(seeds.items()):
            if "curve" not in cell:
                continue
            epochs, test, train_loss = zip(*cell["curve"])
            label = f"{variant}-{depth}" if seed == min(seeds) else None
            colour = f"C{sorted(new).index((variant, depth)) % 10}"
            acc.plot(epochs, test, color=colour, alpha=0.8, label=label)
            loss.plot(epochs, train_loss, color=colour, alpha=0.8, label=label)
    acc.set(xlabel="epoch", ylabel="test accuracy %", ylim=(70, 95), title="one line per seed")
    loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
    plot(new_cells([Path(p) for p in sys.argv[1:]]), HERE / "curves.png")
