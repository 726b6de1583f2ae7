"""pnnh bench: interleaving, FLOP counts, memory, ratios and the JSON/CSV/PNG outputs.

No timing assertions: the machine is shared, so only structure and arithmetic are checked.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.cli import bench as bench_cli
from pnnh.experiments.bench import BenchConfig, ModelBench, Setting, count_flops, interleave

ROOT = Path(__file__).resolve().parents[1]


def test_interleave_runs_models_in_turn_and_drops_warmup_rounds():
    calls = []

    def task(key):
        def run():
            calls.append(key)
            return float(len(calls))  # the call's position, so kept values show which rounds were kept
        return run

    keys = [("a", "train"), ("a", "infer"), ("b", "train"), ("b", "infer"), "matmul"]
    values = interleave({k: task(k) for k in keys}, repeats=3, warmup=2)
    assert calls == keys * 5  # A B A B ..., never A A A B B B
    assert values[("a", "train")] == [11.0, 16.0, 21.0]
    assert values["matmul"] == [15.0, 20.0, 25.0]


def test_count_flops_of_a_tiny_conv_net_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    x = torch.randn(2, 3, 8, 8)
    conv = 2 * (4 * 8 * 8) * (3 * 3 * 3)  # 2 FLOPs per multiply-add; per output element 27 of them
    linear = 2 * (4 * 8 * 8) * 10
    assert count_flops(net.eval(), x) == 2 * (conv + linear)
    # Backward: weight gradients of both layers, input gradient of the linear layer only
    # (the image needs none), so a little less than 3x the forward.
    assert count_flops(net.train(), x, backward=True) == 2 * (conv + linear + conv + 2 * linear)
    assert all(p.grad is None for p in net.parameters())


def test_model_bench_flops_per_image_of_plain8_by_hand():
    cfg = BenchConfig(img_size=8, batch_size=4, model_kwargs={"width": 4})
    bench = ModelBench("plain8", Setting("fp32"), cfg, torch.device("cpu"))

    def conv(out_ch, side, in_ch, k=3):
        return 2 * out_ch * side * side * in_ch * k * k

    by_hand = (conv(4, 8, 3)                       # stem, 8x8
               + 2 * conv(4, 8, 4)                 # stage 1: 4 -> 4, 8x8
               + conv(8, 4, 4) + conv(8, 4, 8)     # stage 2: stride 2 to 4x4, width 8
               + conv(16, 2, 8) + conv(16, 2, 16)  # stage 3: stride 2 to 2x2, width 16
               + 2 * 16 * 10)                      # linear head
    assert bench.flops_per_image == by_hand == 106304


def test_peak_memory_grows_with_the_batch_and_covers_the_resident_tensors():
    def peak(batch):
        cfg = BenchConfig(img_size=16, batch_size=batch, model_kwargs={"width": 8})
        bench = ModelBench("resnet8", Setting("fp32"), cfg, torch.device("cpu"))
        bench.train_step()  # momentum buffers exist from here on, as in a real run
        params = sum(p.numel() * 4 for p in bench.model.parameters())
        return bench.peak_train_memory(), params

    (small, params), (large, _) = peak(4), peak(64)
    # params + momentum + gradients at least; activations grow with the batch
    assert small > 3 * params
    assert large > small + 60 * 16 * 16 * 8 * 4  # at least one saved 8-channel activation per extra image


def _parse(argv):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_quick_and_select_settings():
    cfg = bench_cli.config_from_args(_parse(["--quick", "--group", "cifar20", "--batch-size", "4",
                                             "--channels-last", "both", "--precision", "bf16", "--set", "width=8"]))
    assert cfg.groups == {"cifar20": ("resnet20", "pnnh20")}
    assert cfg.batch_size == 4 and cfg.repeats == 1 and cfg.img_size == 16
    assert cfg.model_kwargs == {"width": 8}
    assert cfg.settings == [Setting("bf16", False), Setting("bf16", True)]


def test_bad_input_names_the_value(capsys, tmp_path):
    assert bench_cli.run(_parse(["--models", "resnet8,pnnh9", "--out", str(tmp_path)])) == 2
    assert "pnnh9" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size=1"):
        BenchConfig(batch_size=1)
    with pytest.raises(ValueError, match="precision='fp16'"):
        Setting("fp16")


REQUIRED = {"model": str, "precision": str, "params": int, "train_images_per_s": float,
            "infer_images_per_s": float, "peak_memory_bytes": int, "flops_per_image": int, "train_flops_per_image": int,
            "matmul_fraction": float, "train_images_per_s_min": float, "train_images_per_s_max": float,
            "infer_images_per_s_min": float, "infer_images_per_s_max": float, "train_ratio": float,
            "infer_ratio": float, "baseline": str, "channels_last": bool, "compile": bool}


def test_bench_script_json_schema_ratios_and_files(tmp_path):
    """The real script in a real process: one record per model and setting, ratios to the first model."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--models", "resnet8,plain8,pnnh8",
         "--precision", "fp32", "--channels-last", "both", "--repeats", "2", "--json", "--no-progress",
         "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [(r["model"], r["channels_last"]) for r in records] == [
        (m, cl) for cl in (False, True) for m in ("resnet8", "plain8", "pnnh8")]
    for r in records:
        for key, kind in REQUIRED.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["baseline"] == "resnet8" and r["precision"] == "fp32"
        assert r["train_images_per_s_min"] <= r["train_images_per_s"] <= r["train_images_per_s_max"]
        assert len(r["train_images_per_s_all"]) == len(r["infer_images_per_s_all"]) == 2
        assert r["peak_memory_bytes"] > 4 * r["params"]
        assert r["train_flops_per_image"] > 2 * r["flops_per_image"]
        assert r["matmul_fraction"] == pytest.approx(
            r["train_flops_per_image"] * r["train_images_per_s"] / r["matmul_flops_per_s"])
        base = next(b for b in records if b["model"] == "resnet8" and b["channels_last"] == r["channels_last"])
        for kind in ("train", "infer"):
            pairs = zip(r[f"{kind}_images_per_s_all"], base[f"{kind}_images_per_s_all"])
            assert r[f"{kind}_ratio"] == pytest.approx(statistics.median(a / b for a, b in pairs))
    assert all(r["train_ratio"] == r["infer_ratio"] == 1.0 for r in records if r["model"] == "resnet8")
    for r in records[:3]:  # --quick builds the models at width 12 on 16 px images
        assert r["params"] == pnnh.count_params(pnnh.create_model(r["model"], width=12, img_size=16))

    assert json.loads((out / "bench.json").read_text()) == records
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [r["model"] for r in records]
    assert float(rows[2]["train_ratio"]) == pytest.approx(records[2]["train_ratio"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench.txt").read_text()
    assert "throughput.py" in table.splitlines()[0] and "pnnh8" in table
