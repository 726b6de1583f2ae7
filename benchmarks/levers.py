"""Speed levers for the PNNH layer, each timed against today's layer and resnet in one process.

Variants (applied to model instances here; src/pnnh/models is not changed):

- ``resnet{D}``, ``pnnh{D}``: the zoo's models as they are (the coder a 1x1 convolution);
- ``pnnh{D}-slice``: the frozen signed coder as slice arithmetic instead of a 1x1 convolution:
  ``c = h_code + a (h_learn - roll(h_learn, -1))`` (a transition's copy coder: ``h[:, :n]``,
  strided for stride 2), with a hand-written backward (``SignedCode``); same function, checked
  here on outputs and gradients;
- with ``--compile``: ``-regional`` (pnnh.train.speed.compile_regions: every body block compiled,
  same-shaped blocks share a graph) and ``-full`` (torch.compile of the whole model) of both
  nets, with the seconds their first two steps took (compilation).

Each block is timed two ways: wall-clock images/s, and images/s of this process's CPU time
(``time.process_time``), which on a shared machine leaves out the time other jobs ran (use
``--threads 1`` for that reading to be clean).

    python benchmarks/levers.py --depth 56 --layout nchw --threads 1 [--compile] [--out runs/bench/levers]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pnnh.experiments.bench import BenchConfig, ModelBench, Setting, interleave, paired_ratio
from pnnh.io import atomic_write_text
from pnnh.models.layers import PNNHConv, dense_grad
from pnnh.train.speed import compile_regions


class SignedCode(torch.autograd.Function):
    """``x[:, :n] + a (d - roll(d, -1))`` with ``d = x[:, n:]``, and its transpose as backward."""

    @staticmethod
    def forward(ctx, x, a):
        ctx.a = a
        n = x.shape[1] // 2
        d = x[:, n:]
        return x[:, :n] + a * (d - d.roll(-1, 1))

    @staticmethod
    def backward(ctx, g):
        return torch.cat([g, ctx.a * (g - g.roll(1, 1))], 1), None


def slice_plan(layer: PNNHConv) -> tuple[str, float | int] | None:
    """("copy", n) or ("signed", a) when the layer's coder weights are exactly that sparse map."""
    w = layer.coder.weight.detach()
    n, cin = w.shape[:2]
    if w.shape[-1] != 1 or n > cin:
        return None
    R = w.reshape(n, cin)
    copy = torch.zeros(n, cin)
    copy[:, :n] = torch.eye(n)
    if torch.equal(R, copy):
        return ("copy", n)
    a = R[0, n].item() if cin == 2 * n else 0.0
    eye = torch.eye(n)
    signed = torch.cat([eye, a * (eye - eye.roll(1, 1))], 1)
    return ("signed", a) if cin == 2 * n and torch.equal(R, signed) else None


def use_slice_coder(layer: PNNHConv) -> None:
    kind, arg = slice_plan(layer)

    def forward(h):
        u = F.conv2d(h, layer.weight, None, layer.stride, layer.padding)
        x = h[..., ::layer.stride, ::layer.stride]
        c = x[:, :arg] if kind == "copy" else SignedCode.apply(x, arg)
        return torch.cat([c.to(u.dtype), dense_grad(F.relu(layer.norm.bn(u), inplace=True))], dim=1)
    layer.forward = forward  # an instance attribute: nn.Module.__call__ uses it


def build(name: str, setting: Setting, cfg: BenchConfig) -> ModelBench:
    base, _, variant = name.partition("-")
    bench = ModelBench(base, setting, cfg, torch.device("cpu"))
    if variant == "slice":
        for layer in bench.model.body:
            use_slice_coder(layer)
    elif variant == "regional":
        compile_regions(bench.model)
    elif variant == "full":
        bench.step_model = torch.compile(bench.model)
    start = time.perf_counter()
    bench.train_step()
    bench.train_step()
    bench.first_steps_s = time.perf_counter() - start
    bench.name = name
    return bench


def check_slice(depth: int) -> dict:
    """Max |difference| of logits and gradients, slice coder vs convolution coder, fp32, train mode."""
    cfg = BenchConfig(batch_size=8)
    ref, alt = (ModelBench(f"pnnh{depth}", Setting("fp32", False), cfg, torch.device("cpu")).model for _ in range(2))
    alt.load_state_dict(ref.state_dict())
    for layer in alt.body:
        use_slice_coder(layer)
    x = torch.randn(8, 3, 32, 32)
    outs = [m.train()(x) for m in (ref, alt)]
    for o in outs:
        o.square().sum().backward()
    grads = max((p.grad - q.grad).abs().max().item() for p, q in zip(ref.parameters(), alt.parameters())
                if p.grad is not None)
    return {"logits": (outs[0] - outs[1]).abs().max().item(), "grads": grads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int)
    p.add_argument("--compile", action="store_true", help="add regional and full torch.compile variants")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/bench/levers")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = args.depth
    names = [f"resnet{d}", f"pnnh{d}", f"pnnh{d}-slice"]
    if args.compile:
        names += [f"resnet{d}-regional", f"pnnh{d}-regional", f"resnet{d}-full", f"pnnh{d}-full"]
    setting = Setting(args.precision, args.layout == "channels_last")
    cfg = BenchConfig(batch_size=128, steps=2, repeats=args.repeats)
    check = check_slice(d)
    print(f"slice coder vs conv coder (fp32): max |logits diff| {check['logits']:.2g}, grads {check['grads']:.2g}")
    benches = [build(n, setting, cfg) for n in names]

    load = os.getloadavg()
    values = interleave({b.name: b.train_block_wall_and_cpu for b in benches}, cfg.repeats, 1)
    rows = []
    for b in benches:
        v = values[b.name]
        ref = values.get(b.name.replace("pnnh", "resnet"), values[f"resnet{d}"])  # resnet in the same mode
        rows.append({"variant": b.name, "setting": setting.label, "first_two_steps_s": b.first_steps_s,
                     "wall_images_per_s": statistics.median(x[0] for x in v),
                     "cpu_images_per_s": statistics.median(x[1] for x in v),
                     "cpu_ratio_to_resnet_same_mode": paired_ratio([x[1] for x in v], [x[1] for x in ref]),
                     "cpu_ratio_to_pnnh": paired_ratio([x[1] for x in v], [x[1] for x in values[f"pnnh{d}"]]),
                     "wall_all": [x[0] for x in v], "cpu_all": [x[1] for x in v]})
        r = rows[-1]
        print(f"{r['variant']:<18} {r['setting']:<20} first steps {r['first_two_steps_s']:6.1f}s  "
              f"wall {r['wall_images_per_s']:7.1f}  cpu {r['cpu_images_per_s']:7.1f} img/s  "
              f"x resnet {r['cpu_ratio_to_resnet_same_mode']:.2f}  x pnnh {r['cpu_ratio_to_pnnh']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "threads": torch.get_num_threads(), "load_avg_start": load,
              "load_avg_end": os.getloadavg(), "slice_check": check, "rows": rows}
    atomic_write_text(out / f"levers-{d}-{args.layout}-{args.precision}.json", json.dumps(record, indent=2) + "\n")
    print(f"load average {load} -> {record['load_avg_end']}")


if __name__ == "__main__":
    main()
