"""Where the time of a PNNH training step goes, and which layer implementation would be faster.

1. torch.profiler tables (self CPU time per op, forward + backward + SGD step) for resnet56,
   plain56 and pnnh56 training steps: bf16 autocast, channels_last, batch 128.
2. Training images/s of candidate PNNH layer implementations, interleaved in one process
   (pnnh.experiments.bench), ratio to resnet56. Candidates are applied to model instances
   here; src/pnnh/models is not changed:

   - ``pnnh56``           the current layer: cat([K, W]) every step, BN, in-place ReLU on the
                          learner channel slice (autograd records it as CopySlices);
   - ``pnnh56-clamp``     the same function with the partial ReLU as one dense op,
                          ``clamp(y, min=floor)``, floor = -inf on coder channels, 0 on learners;
   - ``pnnh56-nocat``     every layer holds its own copy of cat([K, W]) (no sharing, no cat):
                          isolates what the per-step cat costs (a speed bound, not PNNH);
   - ``pnnh56-fullrelu``  ReLU on every channel (a speed bound, not PNNH);
   - ``pnnh56-ll``        the looks-linear form (coder_form="looks-linear"), a vanilla
                          conv-BN-ReLU chain by construction;
   - ``pnnh56-nchw``      the current layer in the contiguous (NCHW) memory format, where a
                          channel slice is one contiguous block per image instead of a strided
                          piece of every pixel.

3. A microbenchmark of the activation alone (forward + backward, bf16, batch 128, the three
   stage shapes of a CIFAR net) for each implementation, in channels_last and NCHW.

    python benchmarks/profile_pnnh.py [--batch-size 128] [--repeats 5] [--threads 1] [--out runs/bench/profile_pnnh]

Writes profile_<model>.txt, speed.json, speed.png and activation.json to --out.
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
from pnnh.models.layers import PartialReLU, PNNHConv
from pnnh.train.checkpoint import atomic_write, atomic_write_text


class ClampPartialReLU(nn.Module):
    """``clamp(y, min=floor)``: identity on coder channels (floor -inf), ReLU on the learner channels
    (floor 0). One dense elementwise op: no strided channel slice, no CopySlices in backward."""

    def __init__(self, start: int, channels: int):
        super().__init__()
        floor = torch.zeros(1, channels, 1, 1)
        floor[:, :start] = float("-inf")
        self.register_buffer("floor", floor)

    def forward(self, y):
        return torch.clamp(y, min=self.floor.to(y.dtype))  # same dtype: no promotion to fp32 under autocast


class OwnWeight(nn.Module):
    """A PNNH layer whose fused weight is a parameter of its own (no per-step cat, no sharing)."""

    def __init__(self, layer: PNNHConv):
        super().__init__()
        self.weight = nn.Parameter(layer.fused_weight().detach().clone())
        self.stride, self.padding, self.norm, self.act = layer.stride, layer.padding, layer.norm, layer.act

    def forward(self, h):
        return self.act(self.norm(F.conv2d(h, self.weight, None, self.stride, self.padding)))


class MaskedIdentity(torch.autograd.Function):
    """Partial ReLU as ``y * (y > floor)`` with the boolean mask saved for a one-op backward."""

    @staticmethod
    def forward(ctx, y, floor):
        mask = y > floor
        ctx.save_for_backward(mask)
        return y * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def activation_micro(repeats: int = 5, calls: int = 5) -> list[dict]:
    """ms per forward + backward of each partial-ReLU implementation (median of ``repeats``)."""
    rows = []
    for channels, side in ((16, 32), (32, 16), (64, 8)):
        start = channels // 2
        floor = torch.zeros(1, channels, 1, 1, dtype=torch.bfloat16)
        floor[:, :start] = float("-inf")
        slope = (torch.arange(channels) < start).to(torch.bfloat16)  # prelu: slope 1 = identity, 0 = ReLU
        impls = {
            "slice relu_ (current)": PartialReLU(start),
            "clamp floor": lambda y: torch.clamp(y, min=floor),
            "autograd mask": lambda y: MaskedIdentity.apply(y, floor),
            "prelu 0/1 slope": lambda y: F.prelu(y, slope),
            "full relu (bound)": nn.ReLU(inplace=True),
        }
        for fmt_name, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
            x = torch.randn(128, channels, side, side).to(torch.bfloat16).contiguous(memory_format=fmt)
            x.requires_grad_()
            grad = torch.randn_like(x)
            for name, act in impls.items():
                def call():
                    act(x * 1.0).backward(grad)  # x * 1.0: a fresh non-leaf input, as BN's output is
                    x.grad = None
                call()
                times = [timed(call, calls, torch.device("cpu")) / calls * 1e3 for _ in range(repeats)]
                rows.append({"channels": channels, "side": side, "format": fmt_name, "impl": name,
                             "ms": statistics.median(times)})
    return rows


def _replace_layers(model: nn.Module, make) -> None:
    for i, layer in enumerate(model.body):
        if isinstance(layer, PNNHConv):
            model.body[i] = make(layer)


def _clamp(layer: PNNHConv) -> PNNHConv:
    assert isinstance(layer.act, PartialReLU)
    layer.act = ClampPartialReLU(layer.act.start, layer.norm.num_features)
    return layer


def _full_relu(layer: PNNHConv) -> PNNHConv:
    layer.act = nn.ReLU(inplace=True)
    return layer


VARIANTS = {  # name: (registered model, model kwargs, layer rewrite or None, channels_last or None = setting's)
    "resnet56": ("resnet56", {}, None, None),
    "plain56": ("plain56", {}, None, None),
    "pnnh56": ("pnnh56", {}, None, None),
    "pnnh56-clamp": ("pnnh56", {}, _clamp, None),
    "pnnh56-nocat": ("pnnh56", {}, OwnWeight, None),
    "pnnh56-fullrelu": ("pnnh56", {}, _full_relu, None),
    "pnnh56-ll": ("pnnh56", {"coder_form": "looks-linear"}, None, None),
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
    """Max abs difference of pnnh56 and pnnh56-clamp logits (same weights, train mode, fp32)."""
    torch.manual_seed(0)
    a = build("pnnh56", Setting("fp32"), cfg).model
    b = build("pnnh56-clamp", Setting("fp32"), cfg).model
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
    print(f"pnnh56 vs pnnh56-clamp, max |logits diff| (fp32): {check_same_function(cfg):.2g}")

    for b in tqdm(benches, desc="profiling", unit="model"):
        if b.name not in ("resnet56", "plain56", "pnnh56", "pnnh56-clamp"):
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

    micro = activation_micro()
    print("\nactivation alone, forward + backward, bf16, batch 128 (ms, median of 5):")
    print(f"{'impl':<24} " + " ".join(f"{c}ch@{s}px {f[:5]:>5}" for c, s, f in
                                       dict.fromkeys((r["channels"], r["side"], r["format"]) for r in micro)))
    for impl in dict.fromkeys(r["impl"] for r in micro):
        print(f"{impl:<24} " + " ".join(f"{r['ms']:>16.2f}" for r in micro if r["impl"] == impl))
    atomic_write_text(out / "activation.json", json.dumps(micro, indent=2) + "\n")

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
    atomic_write(out / "speed.png", lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {out}/speed.json, speed.png, profile_*.txt")


if __name__ == "__main__":
    main()
