"""Where the time of a PNNH training step goes, and which layer implementation is faster.

1. torch.profiler tables (self CPU time per op, forward + backward + SGD step) for resnet56,
   plain56 and pnnh56 training steps: bf16 autocast, channels_last, batch 128.
2. Training images/s of PNNH layer implementations, interleaved in one process
   (pnnh.experiments.bench), ratio to resnet56. Variants are applied to model instances here;
   src/pnnh/models is not changed:

   - ``pnnh56``        the current layer: the 1x1 coder as its own conv, the learner's 3x3 conv,
                       BatchNorm + ReLU on the learner tensor, one concat (0.55x resnet's FLOPs);
   - ``pnnh56-fused``  the same function as ONE conv with weight cat([K padded to 3x3, W]), then
                       BatchNorm on the learner channel slice, a concat and ReLU on the slice
                       (the FLOPs of resnet56; ``PNNHConv.forward_fused``);
   - ``pnnh56-nchw``   the current layer in the contiguous (NCHW) memory format.

3. A microbenchmark of BatchNorm + ReLU alone (forward + backward, bf16, batch 128) on the
   learner tensors of pnnh56 (half width) and the full-width tensors of resnet56, in
   channels_last and NCHW: per element, where the extra time of channels_last goes.

    python benchmarks/profile_pnnh.py [--batch-size 128] [--repeats 5] [--threads 1] [--out runs/bench/profile_pnnh]

Writes profile_<model>.txt, speed.json, speed.png and norm_act.json to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from pnnh.experiments.bench import BenchConfig, ModelBench, Setting, interleave, paired_ratio, timed
from pnnh.models.layers import PNNHConv
from pnnh.io import atomic_write_text, write_png


def norm_act_micro(repeats: int = 5, calls: int = 5) -> list[dict]:
    """ms per forward + backward of BatchNorm + ReLU (median of ``repeats``) on the three stage
    shapes of a 32x32 CIFAR net, at resnet's width and at PNNH's learner width (half)."""
    rows = []
    for full, side in ((16, 32), (32, 16), (64, 8)):
        for channels, who in ((full, "resnet (full width)"), (full // 2, "pnnh learner (half)")):
            bn = nn.BatchNorm2d(channels).to(torch.bfloat16)
            for fmt_name, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
                x = torch.randn(128, channels, side, side).to(torch.bfloat16).contiguous(memory_format=fmt)
                x.requires_grad_()
                grad = torch.randn_like(x)

                def call():
                    F.relu(bn(x * 1.0)).backward(grad)  # x * 1.0: a fresh non-leaf input, as a conv output is
                    x.grad = None
                call()
                times = [timed(call, calls, torch.device("cpu")) / calls * 1e3 for _ in range(repeats)]
                ms = statistics.median(times)
                rows.append({"stage_width": full, "channels": channels, "side": side, "who": who, "format": fmt_name,
                             "ms": ms, "ns_per_element": ms * 1e6 / x.numel()})
    return rows


def _replace_layers(model: nn.Module, make) -> None:
    for layer in model.body:
        if isinstance(layer, PNNHConv):
            make(layer)


def _fused(layer: PNNHConv) -> None:
    layer.forward = layer.forward_fused  # an instance attribute: nn.Module.__call__ uses it


VARIANTS = {  # name: (registered model, model kwargs, layer rewrite or None, channels_last or None = setting's)
    "resnet56": ("resnet56", {}, None, None),
    "plain56": ("plain56", {}, None, None),
    "pnnh56": ("pnnh56", {}, None, None),
    "pnnh56-fused": ("pnnh56", {}, _fused, None),
    "pnnh56-nchw": ("pnnh56", {}, None, False),
}


def build(name: str, setting: Setting, cfg: BenchConfig) -> ModelBench:
    model_name, kwargs, rewrite, channels_last = VARIANTS[name]
    if channels_last is not None:
        setting = Setting(setting.precision, channels_last, setting.compile)
    cfg = BenchConfig(**{**cfg.__dict__, "model_kwargs": kwargs})
    bench = ModelBench(model_name, setting, cfg, torch.device("cpu"))
    if rewrite is not None:
        _replace_layers(bench.model, rewrite)
        fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
        bench.model.to(memory_format=fmt)
        bench.optimizer = torch.optim.SGD(bench.model.parameters(), lr=1e-3, momentum=0.9)
        bench.step_model = torch.compile(bench.model) if setting.compile else bench.model
    bench.name = name
    return bench


def check_same_function(cfg: BenchConfig) -> float:
    """Max abs difference of pnnh56 and pnnh56-fused logits (same weights, train mode, fp32)."""
    torch.manual_seed(0)
    a = build("pnnh56", Setting("fp32"), cfg).model
    b = build("pnnh56-fused", Setting("fp32"), cfg).model
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    return (a(x) - b(x)).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant (slow first compile)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", default="runs/bench/profile_pnnh")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = Setting("bf16", channels_last=True, compile=args.compile)
    cfg = BenchConfig(batch_size=args.batch_size, steps=args.steps, repeats=args.repeats)
    names = args.variants.split(",")
    benches = [build(n, setting, cfg) for n in names]
    print(f"pnnh56 vs pnnh56-fused, max |logits diff| (fp32): {check_same_function(cfg):.2g}")

    for b in tqdm(benches, desc="profiling", unit="model"):
        if b.name not in ("resnet56", "plain56", "pnnh56", "pnnh56-fused"):
            continue
        b.model.train()
        b.train_step()  # warm-up outside the trace
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                b.train_step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        atomic_write_text(out / f"profile_{b.name}.txt", table + "\n")
        tqdm.write(f"\n== {b.name}: {args.profile_steps} training steps, batch {args.batch_size}, "
                   f"bf16 + channels_last ==\n{table}")

    tasks = {b.name: b.train_block for b in benches}
    with tqdm(total=len(tasks) * (1 + args.repeats), desc="train steps", unit="block") as bar:
        values = interleave(tasks, args.repeats, 1, bar)
    base = values[names[0]]
    rows = [{"variant": n, "train_images_per_s": statistics.median(v), "min": min(v), "max": max(v),
             f"ratio_to_{names[0]}": paired_ratio(v, base), "all": v} for n, v in values.items()]
    print(f"\n{'variant':<18} {'train img/s min/med/max':>24} {'x ' + names[0]:>12}")
    for r in rows:
        span = f"{r['min']:.0f}/{r['train_images_per_s']:.0f}/{r['max']:.0f}"
        print(f"{r['variant']:<18} {span:>24} {r[f'ratio_to_{names[0]}']:>12.2f}")
    meta = {"setting": setting.label, "batch_size": args.batch_size, "steps_per_block": args.steps,
            "repeats": args.repeats, "threads": torch.get_num_threads()}
    atomic_write_text(out / "speed.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")

    micro = norm_act_micro()
    print("\nBatchNorm + ReLU alone, forward + backward, bf16, batch 128 (ns per element, median of 5):")
    print(f"{'tensor':<34} {'channels_last':>14} {'nchw':>8}")
    for r in micro:
        if r["format"] == "channels_last":
            nchw = next(q for q in micro if q["format"] == "nchw" and q["channels"] == r["channels"]
                        and q["side"] == r["side"])
            label = f"{r['who']} {r['channels']}ch@{r['side']}px"
            print(f"{label:<34} {r['ns_per_element']:>14.2f} {nchw['ns_per_element']:>8.2f}")
    atomic_write_text(out / "norm_act.json", json.dumps(micro, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.4))
    med = [r["train_images_per_s"] for r in rows]
    ax.barh(range(len(rows)), med, xerr=[[m - r["min"] for m, r in zip(med, rows)],
                                         [r["max"] - m for m, r in zip(med, rows)]])
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"training images/s ({setting.label}, batch {args.batch_size}; median, min-max)")
    fig.tight_layout()
    write_png(out / "speed.png", fig)
    print(f"wrote {out}/speed.json, speed.png, norm_act.json, profile_*.txt")


if __name__ == "__main__":
    main()
