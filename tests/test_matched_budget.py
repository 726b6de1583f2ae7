"""benchmarks/matched_budget.py on a real (tiny) sweep: accuracy joined with parameters, FLOPs and
measured training time, one record per variant."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pnnh.experiments.sweep import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_budget_table_joins_a_sweeps_accuracy_with_measured_cost(tmp_path):
    train = {"data": "digits", "epochs": 1, "batch_size": 64, "precision": "fp32", "val_size": 200,
             "train_subset": 600}
    variants = {"resnet-w4": {"model": "resnet", "model_kwargs": {"width": 4}},
                "pnnh-w4": {"model": "pnnh", "model_kwargs": {"width": 4}},
                "pnnh-w8": {"model": "pnnh", "model_kwargs": {"width": 8}}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sweep": {"variants": variants, "depths": [8], "seeds": 2}, "train": train}, sort_keys=False))
    spec = load_sweep(recipe)
    sweep = tmp_path / "sweep"
    cells = run_sweep(spec, sweep, command="test", progress=False)
    out = tmp_path / "budget"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "matched_budget.py"), str(sweep), "--threads", "1",
                           "--img-size", "8", "--batch-size", "16", "--repeats", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "budget.json").read_text())
    rows = {r["variant"]: r for r in record["variants"]}
    assert set(rows) == set(variants) and record["reference"] == "resnet-w4-d8"
    for name, row in rows.items():
        mine = [c for c in cells if c["variant"] == name]
        assert row["seeds"] == [0, 1] and row["params"] == mine[0]["params"]
        assert sorted(row["val_acc"]) == sorted(100 * c["val_acc"] for c in mine)
        assert row["cpu_images_per_s"] > 0
        assert row["train_seconds"] == pytest.approx(600 / row["cpu_images_per_s"])
    # the half-width learner: fewer training FLOPs than the ResNet of the same width, more when widened
    assert rows["pnnh-w4"]["train_flops_per_image"] < rows["resnet-w4"]["train_flops_per_image"]
    assert rows["pnnh-w8"]["train_flops_per_image"] > rows["pnnh-w4"]["train_flops_per_image"]
    assert rows["resnet-w4"]["cpu_ratio"] == 1.0
    table = (out / "budget.md").read_text()
    assert table.count("\n") == 2 + len(variants) and "| pnnh-w8-d8 |" in table
    assert (out / "budget.png").stat().st_size > 5000


def test_a_directory_without_finished_cells_is_refused(tmp_path):
    (tmp_path / "sweep.yaml").write_text("sweep: {}\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "matched_budget.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no finished cell" in done.stderr
