"""How much of a training step does the on-device loader cost? (target: under 5%)

In one process, after warm-up, alternates timed blocks of (a) producing augmented
train batches with `TensorLoader` alone and (b) full ResNet-20 training steps
(forward + backward + SGD step, bf16 autocast, channels_last, batch 128) on a batch
produced beforehand. Interleaving exposes both to the same machine load; medians
over blocks resist the noise of a shared CPU.

    python benchmarks/loader_share.py [--rounds 6] [--steps 8] [--out runs/bench/loader_share]

Writes loader_share.json and loader_share.png to --out and prints the table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from tqdm import tqdm

import pnnh
from pnnh.data import TensorLoader, load_dataset
from pnnh.io import atomic_write_text, write_png


matplotlib.use("Agg")  # files only, no display


def endless(loader: TensorLoader):
    """Batches forever, moving to the next epoch as real training does."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved (loader, train) block pairs")
    parser.add_argument("--steps", type=int, default=8, help="batches / training steps per block")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="runs/bench/loader_share")
    args = parser.parse_args()

    try:
        splits, data = load_dataset("fashion-mnist"), "fashion-mnist"
    except FileNotFoundError:  # same image shape, so the model costs the same
        splits, data = load_dataset("digits", img_size=28), "digits (28x28)"
    loader = TensorLoader(splits.train_x, splits.train_y, args.batch_size, mean=splits.mean, std=splits.std,
                          train=True, crop_pad=2, hflip=splits.hflip, channels_last=True)
    batches = endless(loader)
    model = pnnh.create_model("resnet20", num_classes=splits.num_classes, in_chans=splits.in_chans)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x, y = next(batches)

    def load_block() -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        return (time.perf_counter() - t) / args.steps

    def train_block() -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t) / args.steps

    load_block(), train_block()  # warm-up: allocator, autocast caches, first-epoch plan
    loads, steps = [], []
    for _ in tqdm(range(args.rounds), desc="loader vs train step", unit="round"):
        loads.append(load_block())
        steps.append(train_block())
    load_ms, step_ms = 1e3 * statistics.median(loads), 1e3 * statistics.median(steps)
    result = {
        "data": data, "model": "resnet20", "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "rounds": args.rounds, "steps_per_block": args.steps,
        "loader_ms_per_batch": load_ms, "train_step_ms": step_ms,
        "loader_share": load_ms / (load_ms + step_ms),
        "loader_ms_per_block": [1e3 * v for v in loads], "train_step_ms_per_block": [1e3 * v for v in steps],
    }
    print(f"{'':24}{'ms/batch':>10}\n{'loader (crop+flip)':24}{load_ms:10.2f}\n"
          f"{'ResNet-20 train step':24}{step_ms:10.2f}\n"
          f"loader share of a training step: {100 * result['loader_share']:.2f}% (target < 5%) on {data}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "loader_share.json", json.dumps(result, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.barh(["loader batch", "ResNet-20 step"], [load_ms, step_ms], color=["tab:orange", "tab:blue"])
    ax.set_xlabel("ms per batch of %d (median of %d blocks)" % (args.batch_size, args.rounds))
    ax.set_title(f"loader share {100 * result['loader_share']:.2f}% ({data})")
    fig.tight_layout()
    write_png(out / "loader_share.png", fig, dpi=120)
    print(f"wrote {out / 'loader_share.json'} and {out / 'loader_share.png'}")


if __name__ == "__main__":
    main()
