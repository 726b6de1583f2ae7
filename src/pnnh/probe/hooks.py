"""Finding a model's hidden layers, capturing their outputs, and leaving the model untouched."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
               nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh, nn.Hardtanh, nn.Sigmoid,
               nn.Softplus)
BN_STATS = ("batch", "running")


def feature_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Ordered (name, module) pairs whose forward output is a hidden representation.

    ``model.feature_layers()`` when the model defines it (every pnnh model does: one entry per
    weight layer, post-activation); otherwise every leaf activation module in registration
    order.
    """
    if callable(getattr(model, "feature_layers", None)):
        layers = list(model.feature_layers())
    else:
        layers = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, ACTIVATIONS) and not any(m.children())]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no feature layers: it defines no "
                         "feature_layers() and contains no activation module (ReLU, GELU, ...)")
    return layers


@contextmanager
def preserved_state(model: nn.Module, bn_stats: str = "batch") -> Iterator[None]:
    """Run the body with dropout & co. in eval mode and BatchNorm as ``bn_stats`` asks, then
    restore every module's train/eval flag and every buffer, even on an exception.

    ``bn_stats="batch"`` (default) normalises with the batch's own statistics (train mode): at
    initialisation the running statistics are still mean 0 / var 1, so eval-mode BN would show
    a network that never exists in training. The running-stat updates this causes are undone
    by restoring the buffers (running_mean, running_var, num_batches_tracked) in place.
    ``"running"`` puts the whole model in eval mode: right for a trained checkpoint.
    """
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        model.eval()
        if bn_stats == "batch":
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.training = True
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


@contextmanager
def capture(layers: list[tuple[str, nn.Module]],
            on_output: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call ``on_output(index, output)`` for each layer's forward output; hooks are removed on
    exit. A layer must run exactly once per forward: one output per layer is what a per-layer
    measure means, so a reused module (or one skipped by forward) is an error, not a guess."""
    calls = [0] * len(layers)

    def hook(index: int):
        def fn(module, inputs, output):
            calls[index] += 1
            if calls[index] > 1:
                raise RuntimeError(f"feature layer {layers[index][0]!r} ran more than once in one "
                                   "forward pass; probe layers that run once")
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"feature layer {layers[index][0]!r} returned "
                                f"{type(output).__name__}, expected a tensor")
            on_output(index, output)
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    missing = [layers[i][0] for i, c in enumerate(calls) if c == 0]
    if missing:
        raise RuntimeError(f"feature layers never ran in forward: {missing}")
