"""One CUDA GPU, under 5 minutes: throughput of every default pair, and one epoch of pnnh56 / resnet56.

Writes one JSON record (``--out``, default runs/gpu_check/gpu_check.json):

- ``throughput``: training and inference images/s, peak memory and the ratio to the resnet of
  each group, for resnet / plain / pnnh at depths 20, 56, 110 (CIFAR shape) and 18, 50
  (ImageNet layouts at 32 px), bf16 autocast + channels_last, eager and compiled, batch 256,
  models interleaved in one process (``pnnh.experiments.bench``);
- ``epoch``: one epoch (50,000 synthetic 32x32 images, batch 256, SGD + nesterov momentum, bf16,
  channels_last, eager) of pnnh56 and of resnet56: wall seconds and images/s;
- ``skipped``: what the ``--budget-s`` guard left out (a group is started only while the time
  spent is under the budget), so a slow machine still ends in time with a partial record.

    bash benchmarks/gpu_check.sh                 # on a CUDA machine
    bash benchmarks/gpu_check.sh --tiny          # seconds on a CPU: every path, tiny sizes

``--tiny`` keeps both settings and the epoch but shrinks everything (the CIFAR-shape trio at depth
8 and the ImageNet-layout one at 18, width 4, 8 px, batch 4, one round of one step, an epoch of
16 images, torch.compile with the ``eager`` backend: Dynamo
traces every model but generates no code) and allows the CPU; tests/test_gpu_check.py runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pnnh.experiments.bench import BenchConfig, Setting, run_benchmark
from pnnh.io import atomic_write_text
from pnnh.models import create_model

def pairs(*depths: int) -> dict[str, tuple[str, ...]]:
    return {f"d{d}": (f"resnet{d}", f"plain{d}", f"pnnh{d}") for d in depths}



SETTINGS = [Setting("bf16", channels_last=True, compile=False), Setting("bf16", channels_last=True, compile=True)]
FULL = {"groups": pairs(20, 56, 110, 18, 50), "batch_size": 256, "repeats": 3, "warmup": 1, "steps": 5, "img_size": 32, "matmul_size": 4096,
        "epoch_images": 50_000, "model_kwargs": {}, "compile_backend": "inductor"}
TINY = {"groups": pairs(8, 18), "batch_size": 4, "repeats": 1, "warmup": 0, "steps": 1, "img_size": 8, "matmul_size": 64,
        "epoch_images": 16, "model_kwargs": {"width": 4}, "compile_backend": "eager"}


def one_epoch(name: str, sizes: dict, device: torch.device) -> dict:
    """Wall seconds of one training epoch of ``name`` on synthetic data already on ``device``."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, img_size=sizes["img_size"], **sizes["model_kwargs"])
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n, side, batch = sizes["epoch_images"], sizes["img_size"], sizes["batch_size"]
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, n - batch + 1, batch):  # full batches only, as the trainer's loader
        x = (images[i:i + batch].float() / 255).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), labels[i:i + batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    steps = n // batch
    return {"model": name, "images": steps * batch, "batch_size": batch, "seconds": seconds,
            "images_per_s": steps * batch / seconds, "final_loss": loss.item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="shrink everything; runs on a CPU in seconds")
    p.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="the JSON record")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no further group after this many seconds (default 240)")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TINY if args.tiny else FULL
    start = time.perf_counter()
    record = {"command": " ".join(sys.argv), "tiny": args.tiny, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "sizes": sizes, "throughput": [], "epoch": [], "skipped": []}
    for group, models in sizes["groups"].items():
        for setting in SETTINGS:
            if time.perf_counter() - start > args.budget_s:
                record["skipped"].append({"group": group, "setting": setting.label})
                continue
            cfg = BenchConfig(groups={group: models}, settings=[setting], device=str(device),
                              **{k: v for k, v in sizes.items() if k not in ("groups", "epoch_images")})
            record["throughput"] += run_benchmark(cfg, progress=False)
            print(f"{time.perf_counter() - start:6.0f}s {group} {setting.label}", flush=True)
    for name in ("resnet56", "pnnh56"):
        record["epoch"].append(one_epoch(name, sizes, device))
    record["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    for r in record["throughput"]:
        print(f"{r['model']:<10} {Setting(r['precision'], r['channels_last'], r['compile']).label:<28} "
              f"train {r['train_images_per_s']:8.0f} img/s  x{r['train_ratio']:.2f}  "
              f"infer {r['infer_images_per_s']:8.0f} img/s  x{r['infer_ratio']:.2f}")
    for e in record["epoch"]:
        print(f"epoch {e['model']:<10} {e['seconds']:7.1f}s  {e['images_per_s']:8.0f} img/s")
    print(f"wrote {out} ({record['seconds']:.0f}s; skipped {len(record['skipped'])})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    sys.exit(main())
