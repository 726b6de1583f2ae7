"""One sweep recipe holding every method's tuned setting (issue 19, objection 2).

Reads ``runs/tune-METHOD/best-sweep.yaml`` (written by ``pnnh tune``) for each method and writes
``configs/review-tuned-baselines.yaml``: one variant per method (``MODEL-tuned``, the cell names
of each method's own best-sweep run), depths 20, 56 and 110 (the studies ran at 56; the same
setting is used at every depth), 3 seeds, their shared budget.

    python results/review-tuned-baselines/make_recipe.py
"""
from pathlib import Path

import yaml

DEPTHS = (20, 56, 110)
METHODS = ("plain", "resnet", "pnnh", "fixup", "skipinit", "rezero", "tat", "dirac")
ROOT = Path(__file__).resolve().parents[2]

variants, train, notes = {}, None, []
for method in METHODS:
    path = ROOT / "runs" / f"tune-{method}" / "best-sweep.yaml"
    if not path.exists():
        notes.append(f"#   {method}: no finished study ({path.relative_to(ROOT)} missing)")
        continue
    text = path.read_text()
    recipe = yaml.safe_load(text)
    variants.update(recipe["sweep"]["variants"])
    assert train in (None, recipe["train"]), f"{method}: a different budget from the other studies"
    train = recipe["train"]
    notes.append("#   " + text.splitlines()[0].lstrip("# "))
header = ["# Issue 19, objection 2: every method at its tuned setting, the same budget for all (written by",
          "# results/review-tuned-baselines/make_recipe.py from the studies of configs/tune-*.yaml: 8 trials",
          "# each on the validation split, depth 56, the first trial the method's own recipe; the chosen",
          "# setting is used at every depth). The studies:",
          *notes,
          "#   OMP_NUM_THREADS=1 pnnh sweep --config configs/review-tuned-baselines.yaml --out runs/review-tuned-baselines-depths"]
recipe = {"sweep": {"depths": list(DEPTHS), "seeds": 3, "variants": variants}, "train": train}
out = ROOT / "configs" / "review-tuned-baselines.yaml"
out.write_text("\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False))
print(f"wrote {out} ({len(variants)} methods)")
