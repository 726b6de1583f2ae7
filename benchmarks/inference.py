"""Inference of the folded nets: folded pnnh{D} vs folded resnet{D}, eager / TorchScript / ONNX Runtime.

``pnnh.fold`` turns a PNNH net into a plain chain (one conv + one channel-wise max per layer) and
folds a ResNet's BatchNorms into its convolutions (its additions stay). For depths 20/56/110,
at batch 1 and 128 (fp32, 32x32x3 inputs, NCHW), pnnh and resnet run interleaved in one
process in each runtime (pnnh.experiments.bench.interleave): images/s, median of the rounds,
and pnnh's paired ratio. Peak memory is measured for eager forwards the way ``pnnh bench``
measures it on the CPU (live tensors: weights + input + torch.profiler's allocation peak): a
chain can free each activation once the next layer has it, a ResNet keeps its shortcut tensor.

    python benchmarks/inference.py [--depths 20,56,110] [--threads 1] [--out runs/bench/inference]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pnnh.experiments.bench import allocation_peak, interleave, paired_ratio
from pnnh.experiments.export import _write_export
from pnnh.io import atomic_write_text
from pnnh.models import create_model
from pnnh.models.fold import fold

RUNTIMES = ("eager", "torchscript", "onnx")


def eager_runner(model):
    def run(x):
        with torch.no_grad():
            return model(x)
    return run


def peak_forward_bytes(model, x) -> int:
    """Weights + input + the peak of torch's allocations during one no-grad forward."""
    with torch.no_grad():
        peak = allocation_peak(lambda: model(x))
    return peak + sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), x])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="20,56,110")
    p.add_argument("--batches", default="1,128")
    p.add_argument("--threads", type=int)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/bench/inference")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(), "rows": []}
    tmp = Path(tempfile.mkdtemp(prefix="pnnh-inference-"))
    for depth in map(int, args.depths.split(",")):
        folded = {}
        for family in ("resnet", "pnnh"):
            torch.manual_seed(0)
            folded[family] = fold(create_model(f"{family}{depth}", num_classes=10).eval()).eval()
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, 3, 32, 32)
            tasks, runners = {}, {}
            for family, net in folded.items():
                for runtime in RUNTIMES:
                    run = (eager_runner(net) if runtime == "eager" else
                           _write_export(net, x, runtime, tmp / f"{family}{depth}.{runtime}", {}))
                    run(x)
                    steps = max(1, 256 // batch)

                    def task(run=run, steps=steps):
                        start = time.perf_counter()
                        for _ in range(steps):
                            run(x)
                        return batch * steps / (time.perf_counter() - start)
                    tasks[(family, runtime)] = task
                    runners[(family, runtime)] = run
            values = interleave(tasks, args.repeats, 1)
            for runtime in RUNTIMES:
                for family in folded:
                    v = values[(family, runtime)]
                    row = {"depth": depth, "batch": batch, "runtime": runtime, "model": f"{family}{depth} folded",
                           "images_per_s": statistics.median(v), "all": v,
                           "ratio_to_resnet": paired_ratio(v, values[("resnet", runtime)]),
                           "peak_memory_bytes": peak_forward_bytes(folded[family], x) if runtime == "eager" else None}
                    record["rows"].append(row)
                    mem = f"{row['peak_memory_bytes'] / 2**20:7.1f} MB" if row["peak_memory_bytes"] else ""
                    print(f"d{depth:<4} batch {batch:<4} {runtime:<12} {family:<7} {row['images_per_s']:9.1f} img/s "
                          f"x{row['ratio_to_resnet']:.2f} {mem}", flush=True)
            record["load_avg_end"] = os.getloadavg()
            atomic_write_text(out / "inference.json", json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
