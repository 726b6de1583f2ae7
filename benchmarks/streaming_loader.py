"""What does the streaming loader cost? Decoded images/s per worker, and its share of a training step.

Writes a folder of generated ImageNet-sized JPEGs (500x375, quality 90, like an ImageNet
photo) unless --data-dir names a folder dataset, then, in one process:

1. decode rate: `StreamingLoader` with 0 workers (decoding in this process, one core) for
   the training transform (random-resized crop + flip) and the evaluation transform
   (resize + centre crop), images/s;
2. loader share at --workers worker processes: alternating timed blocks of (a) training
   steps fed by the streaming loader and (b) the same steps on a batch decoded beforehand
   (--model, bf16 autocast, channels_last, SGD); share = 1 - t(b)/t(a), what feeding costs a
   step, including the cores the workers take from the model on a small CPU (medians over
   blocks; a machine whose load drifts between blocks makes it noisy); and the wait share,
   the time the loop spent in ``next(loader)`` over the fed blocks' time (measured inside
   the same steps, so load drift cancels, but blind to stolen cores).

    python benchmarks/streaming_loader.py [--img-size 128] [--model resnet18] [--workers 2]
        [--out results/streaming]

Writes streaming_loader.json and streaming_loader.png to --out and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from tqdm import tqdm

import pnnh
from pnnh.data import StreamingLoader, load_streaming
from pnnh.data.streaming import make_image_folder
from pnnh.io import atomic_write_text, write_png

from loader_share import endless  # beside this script: batches forever, epoch after epoch

matplotlib.use("Agg")  # files only, no display


def decode_rate(splits, args, train: bool) -> float:
    """Images/s of one process decoding and transforming (0 workers), after one warm-up batch."""
    loader = StreamingLoader(splits.train, args.batch_size, img_size=args.img_size, mean=splits.mean,
                             std=splits.std, train=train, workers=0, drop_last=True)
    batches = endless(loader)
    next(batches)
    t, n = time.perf_counter(), 0
    for _ in range(args.decode_batches):
        n += len(next(batches)[1])
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="a folder dataset (train/ and val/); default: generated JPEGs")
    parser.add_argument("--images", type=int, default=600, help="generated train images")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--decode-batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved (fed, pre-decoded) block pairs")
    parser.add_argument("--steps", type=int, default=3, help="training steps per block")
    parser.add_argument("--out", default="runs/bench/streaming")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # the machine may be shared: say how loaded it was

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or make_image_folder(Path(tmp) / "jpegs", train=args.images, test=10,
                                                      size=(500, 375), ext=".jpg")
        splits = load_streaming(data_dir, img_size=args.img_size)
        rates = {"train": decode_rate(splits, args, True), "eval": decode_rate(splits, args, False)}
        print(f"decoded images/s in one process: train transform {rates['train']:.0f}, eval {rates['eval']:.0f}")

        loader = StreamingLoader(splits.train, args.batch_size, img_size=args.img_size, mean=splits.mean,
                                 std=splits.std, train=True, workers=args.workers, channels_last=True)
        batches = endless(loader)
        model = pnnh.create_model(args.model, num_classes=splits.num_classes, img_size=args.img_size)
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fixed = next(batches)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        waits = []  # seconds the training loop waited for each fed batch

        def block(fed: bool) -> float:
            t = time.perf_counter()
            for _ in range(args.steps):
                w = time.perf_counter()
                batch = next(batches) if fed else fixed
                if fed:
                    waits.append(time.perf_counter() - w)
                step(*batch)
            return (time.perf_counter() - t) / args.steps

        block(True), block(False)  # warm-up: workers' queues full, allocator, autocast caches
        waits.clear()
        fed, pre = [], []
        for _ in tqdm(range(args.rounds), desc="fed vs pre-decoded steps", unit="round"):
            fed.append(block(True))
            pre.append(block(False))
    fed_ms, pre_ms = 1e3 * statistics.median(fed), 1e3 * statistics.median(pre)
    result = {
        "data": args.data_dir or f"{args.images} generated 500x375 JPEGs (quality 90)", "img_size": args.img_size,
        "model": args.model, "batch_size": args.batch_size, "workers": args.workers,
        "threads": torch.get_num_threads(), "load_avg_1min": [load_before, os.getloadavg()[0]],
        "rounds": args.rounds, "steps_per_block": args.steps,
        "decoded_images_per_s_per_worker": rates,
        "fed_step_ms": fed_ms, "predecoded_step_ms": pre_ms, "loader_share": 1 - pre_ms / fed_ms,
        "wait_share": sum(waits) / (args.steps * sum(fed)), "wait_ms_per_step": [1e3 * w for w in waits],
        "fed_step_ms_per_block": [1e3 * v for v in fed], "predecoded_step_ms_per_block": [1e3 * v for v in pre],
    }
    print(f"{'':34}{'ms/step':>10}\n{'step fed by the streaming loader':34}{fed_ms:10.1f}\n"
          f"{'step on a pre-decoded batch':34}{pre_ms:10.1f}\n"
          f"loader share of a training step at {args.workers} workers: {100 * result['loader_share']:.1f}% "
          f"({args.model}, {args.img_size} px, batch {args.batch_size}); the loop waited for data "
          f"{100 * result['wait_share']:.1f}% of the fed steps' time")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "streaming_loader.json", json.dumps(result, indent=2) + "\n")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    a.bar(["train transform", "eval transform"], [rates["train"], rates["eval"]], color=["tab:orange", "tab:green"])
    a.set_ylabel("decoded images/s, one worker")
    b.barh(["pre-decoded batch", "streaming loader"], [pre_ms, fed_ms], color=["tab:blue", "tab:orange"])
    b.set_xlabel(f"ms per {args.model} step (batch {args.batch_size}, median of {args.rounds} blocks)")
    b.set_title(f"loader share {100 * result['loader_share']:.1f}% at {args.workers} workers")
    fig.tight_layout()
    write_png(out / "streaming_loader.png", fig)
    print(f"wrote {out / 'streaming_loader.json'} and {out / 'streaming_loader.png'}")


if __name__ == "__main__":
    main()
