"""Initialisation schemes a built model can be re-initialised with (``init=`` on every CNN and MLP).

Xiao et al., "Dynamical Isometry and a Mean Field Theory of CNNs", ICML 2018:
:func:`apply_init` re-initialises a built model's convolutions with ``delta_orthogonal`` (3x3
kernels zero except an orthogonal centre tap) or ``orthogonal`` (the MLPs' linear maps, which
are 1x1 convolutions here); ``he_normal`` is the zoo's default (:func:`pnnh.models.layers.he_normal_`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from pnnh.models.layers import PNNHConv, he_normal_

INITS = ("he_normal", "orthogonal", "delta_orthogonal")


def delta_orthogonal_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Delta-orthogonal init in place: zero everywhere but the kernel's centre tap, which is a
    ``gain``-scaled orthogonal (out, in) matrix (orthonormal rows if out <= in, else columns).

    A convolution so initialised maps every pixel's channel vector by the same orthogonal
    matrix, so it preserves norms exactly, as a deep linear chain needs (Xiao et al. 2018).
    """
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"delta-orthogonal init needs odd kernel sizes (a centre tap), "
                         f"got weight shape {tuple(weight.shape)}")
    with torch.no_grad():
        weight.zero_()
        centre = (slice(None), slice(None), *(k // 2 for k in weight.shape[2:]))
        weight[centre] = nn.init.orthogonal_(torch.empty(weight.shape[:2]), gain)  # QR in float32
    return weight


def q_preserving_gain(fan_in: int, fan_out: int) -> float:
    """Gain of an orthogonal (fan_out, fan_in) map that keeps the mean square per unit (the q map).

    Orthonormal rows (fan_out <= fan_in) already keep it for isotropic inputs; orthonormal
    columns keep the total norm, spread over more units, so they need sqrt(fan_out / fan_in).
    """
    return math.sqrt(max(1.0, fan_out / fan_in))


def apply_init(model: nn.Module, name: str, gain: float = math.sqrt(2.0)) -> nn.Module:
    """Re-initialise every convolution weight of ``model`` by ``name`` and return ``model``.

    ``name``: ``he_normal`` (the zoo's default), ``orthogonal`` (the weight flattened to
    (out, in * k * k); for the MLPs' 1x1 convolutions exactly an orthogonal matrix) or
    ``delta_orthogonal``. ``gain`` sqrt(2) keeps the second moment through a ReLU, like He init.
    Covers ``nn.Conv2d`` and the learner weights of PNNH layers; PNNH coders keep their
    ``coder_init`` and the linear head keeps its default init (it reads out, it propagates nothing).
    """
    inits: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "he_normal": he_normal_,
        "orthogonal": lambda w: nn.init.orthogonal_(w, gain),
        "delta_orthogonal": lambda w: delta_orthogonal_(w, gain),
    }
    if name not in inits:
        raise ValueError(f"init={name!r} is not valid; choose one of {INITS}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, PNNHConv)):
            inits[name](module.weight)
    return model
