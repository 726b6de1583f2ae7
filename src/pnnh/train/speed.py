"""How a model runs fastest on this machine: regional compilation and a measured memory layout.

- :func:`compile_regions` compiles each block of a model's body (a PNNH layer, a residual
  block, a conv-BN-ReLU layer) instead of the whole graph. Blocks of one class and one input
  shape share their compiled code, so a 110-layer net compiles about as many graphs as it has
  distinct (block, shape) pairs (a handful) instead of one 110-layer graph.
- :func:`measured_channels_last` decides NCHW vs channels_last for a model on the CPU by timing
  a few training steps in each layout, interleaved, the first time a (machine, torch, threads,
  model, input) combination is seen; the answer is cached in ``$XDG_CACHE_HOME/pnnh/layout.json``
  (default ``~/.cache/pnnh``). Which layout is faster depends on the machine, its threads and
  its load, not only on the model's widths (results/speed/README.md), so it is measured.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnnh.io import atomic_write_text

LAYOUT_CACHE_ENV = "PNNH_LAYOUT_CACHE"  # a file path; overrides the default cache file


def compile_regions(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile every block of ``model.body`` in place (``nn.Module.compile``) and return ``model``.

    A model without a ``body`` is compiled whole. ``dynamic=False`` by default: each input shape
    gets its own static graph, which is what lets same-shaped blocks reuse one compiled graph
    instead of compiling a shape-generic one.
    """
    body = getattr(model, "body", None)
    if not isinstance(body, nn.Sequential):
        model.compile(**compile_kwargs)
        return model
    compile_kwargs.setdefault("dynamic", False)
    for block in body:
        block.compile(**compile_kwargs)
    return model


def default_layout_cache() -> Path:
    """``$PNNH_LAYOUT_CACHE``, else ``$XDG_CACHE_HOME/pnnh/layout.json`` (default ``~/.cache``)."""
    if os.environ.get(LAYOUT_CACHE_ENV):
        return Path(os.environ[LAYOUT_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pnnh" / "layout.json"


def layout_key(model: nn.Module, shape: tuple[int, ...], precision: str) -> str:
    """What the answer depends on: machine, torch build, threads, the model's structure, input, precision."""
    arch = f"{type(model).__name__}:{sum(p.numel() for p in model.parameters())}:{len(list(model.modules()))}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}|{os.cpu_count()}cpu|torch {torch.__version__}|{torch.get_num_threads()}t|{arch}|{shape}|{precision}"


def time_layouts(model: nn.Module, shape: tuple[int, ...], precision: str, rounds: int = 3) -> dict[str, float]:
    """Seconds per training step (fastest of ``rounds``) of a copy of ``model`` in each layout.

    The two layouts alternate round by round, so a change of machine load hits both; the
    fastest round is the one least disturbed by other processes.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    y = torch.randint(0, 2, (shape[0],), generator=gen)
    nets = {}
    for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        net = copy.deepcopy(model).train().to(memory_format=fmt)
        nets[name] = (net, x.contiguous(memory_format=fmt))
    best = {name: float("inf") for name in nets}
    for round_ in range(rounds + 1):  # the first round warms up the kernels; kept out of the minimum
        for name, (net, inp) in nets.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(net(inp), y)
            loss.backward()
            net.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            if round_ > 0:
                best[name] = min(best[name], seconds)
    return best


def measured_channels_last(model: nn.Module, shape: tuple[int, ...], precision: str,
                           cache: str | Path | None = None) -> bool:
    """Whether ``model`` trains faster in channels_last than NCHW on this CPU, for inputs of
    ``shape`` (N, C, H, W) in ``precision``; measured once (:func:`time_layouts`), then cached.

    An unreadable cache is measured again and rewritten; an unwritable one leaves the answer
    uncached (the next run measures again) rather than failing the run.
    """
    path = Path(cache) if cache is not None else default_layout_cache()
    key = layout_key(model, shape, precision)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key in known and isinstance(known[key].get("channels_last"), bool):
        return known[key]["channels_last"]
    seconds = time_layouts(model, shape, precision)
    answer = seconds["channels_last"] < seconds["nchw"]
    known[key] = {"channels_last": answer, "seconds_per_step": seconds, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known, indent=2) + "\n")
    except OSError:
        pass
    return answer
