"""Throughput, peak memory and FLOPs of models at matched depth and width, measured side by side.

Everything runs in ONE process, so all models see the same machine, and interleaved: after
``warmup`` discarded rounds, each of ``repeats`` rounds runs, for every model of a group in
turn (A B C A B C ...), a block of ``steps`` training steps and a block of ``steps``
inference forwards, then one block of dense matmuls (the ceiling). How each figure is taken:

- **images/s**: batch x steps / block wall time; min / median / max over rounds. A training
  step is forward + cross-entropy + backward + SGD step (momentum 0.9), the trainer's step;
  inference is an eval-mode forward under ``torch.no_grad``. Input: a fixed synthetic batch.
- **ratios** to the first model of the group: the median over rounds of the per-round ratio.
  The blocks of one round run seconds apart, so slow drifts of a shared machine's load cancel.
- **peak memory** of a training step, in bytes of live tensors (the gradients of the previous
  step are freed first). CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the
  tensors alive when the step starts (parameters, optimizer state, batch) plus the peak of the
  running sum of allocations minus frees that ``torch.profiler`` (``profile_memory=True``)
  records during the step. Not the process RSS: the allocator keeps freed blocks, so RSS shows
  the process's history, not what a step needs.
- **FLOPs** per image from ``torch.utils.flop_counter.FlopCounterMode`` on the eager model:
  ``flops_per_image`` is one forward; ``train_flops_per_image`` is forward + backward as
  counted (about 3x the forward, a little less since the input needs no gradient). Only
  matmuls, convolutions and attention count (norms, activations and the optimizer do not).
- **matmul ceiling**: FLOP/s of a square ``matmul_size`` matmul in the same dtype (fp32, or
  bf16 tensors for bf16), timed in every round. ``matmul_fraction`` = train FLOPs/image x
  train images/s / ceiling (``infer_matmul_fraction`` likewise for inference), both medians.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from pnnh.io import atomic_write_text, format_table as _format_table, write_csv, write_png

GROUPS: dict[str, tuple[str, ...]] = {
    "cifar56": ("resnet56", "plain56", "pnnh56"),
    "cifar20": ("resnet20", "pnnh20"),
    "vit_tiny": ("vit_tiny", "pnnh_vit_tiny"),
    "resnet18": ("resnet18", "pnnh18"),
}
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Tiny widths and one round: exercises every code path in seconds (tests, smoke checks).
QUICK = {"batch_size": 8, "repeats": 1, "warmup": 1, "steps": 1, "img_size": 16, "matmul_size": 256,
         "model_kwargs": {"width": 12}}
MEMORY_METHODS = {"cuda": "torch.cuda.max_memory_allocated",
                  "cpu": "resident tensors + torch.profiler allocation peak"}


@dataclass(frozen=True)
class Setting:
    """How the models run: autocast precision, memory format, torch.compile."""

    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not valid; choose one of {PRECISIONS}")

    @property
    def label(self) -> str:
        return " ".join([self.precision] + ["channels_last"] * self.channels_last + ["compiled"] * self.compile)


@dataclass
class BenchConfig:
    """What to measure. ``groups`` maps a group name to its models, the baseline first."""

    groups: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(GROUPS))
    settings: list[Setting] = field(default_factory=lambda: [Setting(p) for p in PRECISIONS])
    batch_size: int = 128
    repeats: int = 5
    warmup: int = 1
    steps: int = 2
    device: str = "cpu"
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10
    model_kwargs: dict = field(default_factory=dict)
    matmul_size: int = 2048
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    compile_backend: str = "inductor"  # torch.compile backend; "eager" traces without code generation

    def __post_init__(self):
        for name in ("batch_size", "repeats", "steps", "img_size", "in_chans", "num_classes", "matmul_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; it must be an int >= 1")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads={self.threads!r} is not valid; it must be an int >= 1 or None")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r} is not valid; it must be an int >= 0")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} is not valid: BatchNorm needs >= 2 images")
        if not self.groups or not all(self.groups.values()):
            raise ValueError(f"groups={self.groups!r} is not valid: give at least one group of at least one model")
        if not self.settings:
            raise ValueError("settings is empty: give at least one Setting")


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall time covers the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Wall seconds of ``steps`` calls of ``fn``."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - start


def interleave(tasks: dict[Hashable, Callable[[], float]], repeats: int, warmup: int,
               progress: tqdm | None = None) -> dict[Hashable, list[float]]:
    """Run every task once per round, in ``tasks``' order, for ``warmup + repeats`` rounds;
    return each task's values from the last ``repeats`` rounds."""
    values: dict[Hashable, list[float]] = {key: [] for key in tasks}
    for round_ in range(warmup + repeats):
        for key, task in tasks.items():
            value = task()
            if round_ >= warmup:
                values[key].append(value)
            if progress is not None:
                progress.update()
    return values


def count_flops(model: nn.Module, x: torch.Tensor, *, backward: bool = False) -> int:
    """FLOPs of one forward of ``model`` on ``x`` (plus its backward when ``backward``), as
    ``FlopCounterMode`` counts them. ``model`` is used in its current train/eval mode."""
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            out = model(x)
            if backward:
                F.cross_entropy(out, torch.zeros(len(out), dtype=torch.long, device=out.device)).backward()
    if backward:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_block(precision: str, size: int, device: torch.device, reps: int = 3) -> Callable[[], float]:
    """A task returning the FLOP/s of ``reps`` square ``size`` matmuls in ``precision``'s dtype."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device, DTYPES[precision]) for _ in range(2))

    def task() -> float:
        return reps * 2 * size**3 / timed(lambda: a @ b, reps, device)
    return task


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class ModelBench:
    """One model under one setting: its training and inference steps, FLOPs and peak memory."""

    def __init__(self, name: str, setting: Setting, cfg: BenchConfig, device: torch.device, seed: int = 0):
        from pnnh.models import count_params, create_model

        torch.manual_seed(seed)
        model = create_model(name, num_classes=cfg.num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size,
                             **cfg.model_kwargs).to(device)
        self.name, self.setting, self.device, self.steps = name, setting, device, cfg.steps
        self.params = count_params(model)
        # Two images: BatchNorm in train mode needs more than one value per channel. Every
        # counted op's FLOPs are proportional to the batch, so halving is exact.
        probe = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
        self.flops_per_image = count_flops(model.eval(), probe) // 2
        self.train_flops_per_image = count_flops(model.train(), probe, backward=True) // 2
        fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.step_model = torch.compile(model, backend=cfg.compile_backend) if setting.compile else model
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
        self.x = x.to(device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.setting.precision == "bf16")

    def train_step(self) -> None:
        with self._autocast():
            loss = F.cross_entropy(self.step_model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def infer_step(self) -> None:
        with torch.no_grad(), self._autocast():
            self.step_model(self.x)

    def train_block(self) -> float:
        """images/s of ``steps`` training steps."""
        self.step_model.train()
        return len(self.x) * self.steps / timed(self.train_step, self.steps, self.device)

    def infer_block(self) -> float:
        """images/s of ``steps`` inference forwards."""
        self.step_model.eval()
        return len(self.x) * self.steps / timed(self.infer_step, self.steps, self.device)

    def train_block_wall_and_cpu(self) -> tuple[float, float]:
        """images/s of ``steps`` training steps by the wall clock and by this process's CPU time.

        On a machine shared with other jobs the wall clock also counts the time they ran; the
        CPU time (``time.process_time``) counts this process's work only (with one thread; with
        several it also counts OpenMP's spin-waiting)."""
        self.step_model.train()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(self.steps):
            self.train_step()
        sync(self.device)
        images = len(self.x) * self.steps
        return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)

    def peak_train_memory(self) -> int:
        """Bytes of live tensors at the peak of one training step (see the module docstring)."""
        self.step_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.train_step()
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        state = [v for s in self.optimizer.state.values() for v in s.values()]
        resident = _tensor_bytes([*self.model.parameters(), *self.model.buffers(), *state, self.x, self.y])
        return resident + allocation_peak(self.train_step)


def trainer_bench(name: str, cfg: BenchConfig) -> ModelBench:
    """Model ``name`` (with ``cfg.model_kwargs``) on the CPU in the setting ``pnnh train`` picks by
    itself: precision ``auto`` and the layout measured on this machine for this model and input
    (``pnnh.train.speed.measured_channels_last``, cached)."""
    from pnnh.models import create_model
    from pnnh.train.config import resolve_precision
    from pnnh.train.speed import measured_channels_last

    precision = resolve_precision("auto", "cpu")
    model = create_model(name, num_classes=cfg.num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size,
                         **cfg.model_kwargs)
    layout = measured_channels_last(model, (cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size), precision)
    return ModelBench(name, Setting(precision, layout), cfg, torch.device("cpu"))


def allocation_peak(fn: Callable[[], object]) -> int:
    """Bytes: the peak of the running sum of CPU allocations minus frees that ``torch.profiler``
    (``profile_memory=True``) records while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def paired_ratio(values: list[float], baseline: list[float]) -> float:
    """Median over rounds of ``values[i] / baseline[i]``."""
    return statistics.median(v / b for v, b in zip(values, baseline))


def _spread(prefix: str, values: list[float]) -> dict:
    return {prefix: statistics.median(values), f"{prefix}_min": min(values), f"{prefix}_max": max(values),
            f"{prefix}_all": list(values)}


def bench_group(group: str, models: tuple[str, ...], setting: Setting, cfg: BenchConfig, device: torch.device,
                progress: tqdm | None = None) -> list[dict]:
    """Measure the ``models`` of one group under one ``setting``; one record per model."""
    if setting.compile:
        # Every model's forward is one code object: compiled models of earlier groups count
        # against Dynamo's recompile limit (8), past which it silently runs the rest eagerly.
        torch._dynamo.reset()
    benches = [ModelBench(name, setting, cfg, device) for name in models]
    # Peak memory first, one step each: the profiler would distort timed blocks.
    memory = [b.peak_train_memory() for b in benches]
    tasks: dict[Hashable, Callable[[], float]] = {}
    for b in benches:
        tasks[(b.name, "train")] = b.train_block
        tasks[(b.name, "infer")] = b.infer_block
    tasks["matmul"] = matmul_block(setting.precision, cfg.matmul_size, device)
    load = os.getloadavg()[0]
    values = interleave(tasks, cfg.repeats, cfg.warmup, progress)
    ceiling = statistics.median(values["matmul"])
    base = benches[0].name
    records = []
    for b, peak in zip(benches, memory):
        train, infer = values[(b.name, "train")], values[(b.name, "infer")]
        records.append({
            "group": group, "model": b.name, "baseline": base, **dataclasses.asdict(setting),
            "device": str(device), "batch_size": cfg.batch_size, "img_size": cfg.img_size,
            "steps_per_block": cfg.steps, "repeats": cfg.repeats, "threads": torch.get_num_threads(),
            "load_avg_1min": load, "params": b.params,
            "flops_per_image": b.flops_per_image, "train_flops_per_image": b.train_flops_per_image,
            **_spread("train_images_per_s", train), **_spread("infer_images_per_s", infer),
            "train_ratio": paired_ratio(train, values[(base, "train")]),
            "infer_ratio": paired_ratio(infer, values[(base, "infer")]),
            "peak_memory_bytes": peak, "peak_memory_method": MEMORY_METHODS[device.type],
            "matmul_flops_per_s": ceiling, "matmul_flops_per_s_all": values["matmul"],
            "matmul_fraction": b.train_flops_per_image * statistics.median(train) / ceiling,
            "infer_matmul_fraction": b.flops_per_image * statistics.median(infer) / ceiling,
        })
    return records


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    """Every group under every setting; a list of records (see ``bench_group``)."""
    from pnnh.train.config import resolve_device

    device = torch.device(resolve_device(cfg.device))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    blocks_per_round = sum(2 * len(models) + 1 for models in cfg.groups.values())
    total = len(cfg.settings) * blocks_per_round * (cfg.warmup + cfg.repeats)
    records = []
    with tqdm(total=total, desc="bench", unit="block", disable=not progress, dynamic_ncols=True) as bar:
        for setting in cfg.settings:
            for group, models in cfg.groups.items():
                bar.set_postfix_str(f"{group} {setting.label}")
                records += bench_group(group, models, setting, cfg, device, bar)
    return records


def format_table(records: list[dict]) -> str:
    """A fixed-width table: min / median / max images/s and the ratio to each group's first model."""
    header = ("group", "model", "setting", "params", "GFLOP/img", "train img/s min/med/max", "x base",
              "infer img/s min/med/max", "x base", "peak MB", "matmul%")
    rows = []
    for r in records:
        spans = [f"{r[f'{k}_min']:.0f}/{r[k]:.0f}/{r[f'{k}_max']:.0f}"
                 for k in ("train_images_per_s", "infer_images_per_s")]
        rows.append((r["group"], r["model"], Setting(r["precision"], r["channels_last"], r["compile"]).label,
                     f"{r['params']:,}", f"{r['flops_per_image'] / 1e9:.3f}", spans[0], f"{r['train_ratio']:.2f}",
                     spans[1], f"{r['infer_ratio']:.2f}", f"{r['peak_memory_bytes'] / 2**20:.1f}",
                     f"{100 * r['matmul_fraction']:.1f}"))
    return _format_table(header, rows, align="<<<" + ">" * 8)


CSV_FIELDS = ("group", "model", "baseline", "precision", "channels_last", "compile", "device", "batch_size",
              "params", "flops_per_image", "train_flops_per_image", "train_images_per_s", "train_images_per_s_min",
              "train_images_per_s_max", "train_ratio", "infer_images_per_s", "infer_images_per_s_min",
              "infer_images_per_s_max", "infer_ratio", "peak_memory_bytes", "matmul_flops_per_s",
              "matmul_fraction", "infer_matmul_fraction", "load_avg_1min")


def write_results(records: list[dict], out: str | Path, command: str = "") -> list[Path]:
    """Write bench.json, bench.csv, bench.png and bench.txt (the table and the command) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"bench.{ext}" for ext in ("json", "csv", "png", "txt")]
    atomic_write_text(paths[0], json.dumps(records, indent=2) + "\n")
    write_csv(paths[1], records, CSV_FIELDS)

    groups = list(dict.fromkeys(r["group"] for r in records))
    labels = [f"{r['group']}: {r['model']} ({Setting(r['precision'], r['channels_last'], r['compile']).label})"
              for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(records) + 1.5), sharey=True)
    for ax, key in zip(axes, ("train_images_per_s", "infer_images_per_s")):
        med = [r[key] for r in records]
        err = [[m - r[f"{key}_min"] for m, r in zip(med, records)], [r[f"{key}_max"] - m for m, r in zip(med, records)]]
        ax.barh(range(len(records)), med, xerr=err, color=[f"C{groups.index(r['group']) % 10}" for r in records])
        ax.set_xlabel(f"{key.split('_')[0]} images/s (median, min-max)")
    axes[0].invert_yaxis()  # the axes share y: invert once, first record on top
    axes[0].set_yticks(range(len(records)), labels, fontsize=8)
    fig.suptitle(f"batch {records[0]['batch_size']}, {records[0]['img_size']}px, {records[0]['device']}", fontsize=9)
    fig.tight_layout()
    write_png(paths[2], fig)
    plt.close(fig)
    atomic_write_text(paths[3], (f"$ {command}\n" if command else "") + format_table(records) + "\n")
    return paths
