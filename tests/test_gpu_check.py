"""benchmarks/gpu_check.sh --tiny: the GPU check's every path at tiny sizes, on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_writes_the_full_record(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["tiny"] and record["skipped"] == []
    measured = {(r["model"], r["compile"]) for r in record["throughput"]}
    models = {f"{f}{d}" for f in ("resnet", "plain", "pnnh") for d in (8, 18)}
    assert measured == {(m, c) for m in models for c in (False, True)}
    for r in record["throughput"]:
        assert r["precision"] == "bf16" and r["channels_last"] and r["batch_size"] == 4
        assert r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["baseline"] == r["model"].replace("plain", "resnet").replace("pnnh", "resnet")
    assert [e["model"] for e in record["epoch"]] == ["resnet56", "pnnh56"]
    assert all(e["images"] == 16 and e["images_per_s"] > 0 for e in record["epoch"])
    assert f"wrote {out}" in done.stdout
