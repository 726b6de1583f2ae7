"""Tailored Activation Transformation (TAT) for leaky-ReLU nets: the kernel-map maths.

Zhang, Botev, Martens, "Deep Learning without Shortcuts: Shaping the Kernel with Tailored
Rectifiers" (ICLR 2022). TAT trains deep plain nets (no shortcut, no normalization) by picking
the activation function from the depth, so that the whole network's kernel map stays close to
linear at initialization.

Assumptions (dks style: stated here, checked numerically in tests/test_baselines.py):

- infinite width: a pre-activation pair (u, v) of two inputs is bivariate normal;
- every weight layer preserves the squared norm of its input (scaled orthogonal init, or
  Gaussian init with variance 1/fan_in, zero biases), so it leaves the cosine similarity
  c = <x, y> / (|x| |y|) of two inputs unchanged and only the activations change it;
- q map = identity: the activation is scaled so that E[phi(z)^2] = 1 for z ~ N(0, 1). For
  leaky ReLU with negative slope alpha (-1 <= alpha <= 1), phi(x) = s max(x, alpha x) with
  s = sqrt(2 / (1 + alpha^2)).

Under these assumptions the local C map of phi (the cosine similarity after one layer as a
function of the one before) is, writing phi = s (alpha x + (1 - alpha) relu(x)) and using the
arc-cosine kernel of ReLU,

    C(c) = c + (1 - alpha)^2 / (pi (1 + alpha^2)) * (sqrt(1 - c^2) - c acos(c)),

and the C map of a net with L nonlinear layers is C composed L times. C(1) = 1, C is increasing
and convex on [-1, 1], and C(0) > 0 unless alpha = 1 (linear). TAT chooses alpha so that the
network's map sends orthogonal inputs to the target similarity: C_f(0) = eta (default 0.9).

The bracket factor k(alpha) = (1 - alpha)^2 / (1 + alpha^2) decreases strictly from 2 at
alpha = -1 (absolute value) to 0 at alpha = 1 (identity), and C_f(0) increases with k, so
C_f(0) = eta has one solution, found by bisection. A ReLU net (alpha = 0) of few layers may
still be too linear for eta (7 layers reach C_f(0) = 0.81 < 0.9); the slope is then negative,
which the same formula covers. Deeper nets need slopes closer to 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SLOPE_RANGE = (-1.0, 1.0)  # alpha = -1 is |x| (the most nonlinear), alpha = 1 the identity


def leaky_relu_scale(alpha: float) -> float:
    """s = sqrt(2 / (1 + alpha^2)): with it E[phi(z)^2] = 1 for z ~ N(0, 1) (q map = identity)."""
    return math.sqrt(2.0 / (1.0 + alpha * alpha))


def leaky_relu_cmap(c: float, alpha: float) -> float:
    """Local C map of the scaled leaky ReLU with negative slope ``alpha`` (module docstring)."""
    c = min(1.0, max(-1.0, c))  # rounding must not push sqrt/acos out of their domain
    k = (1.0 - alpha) ** 2 / (math.pi * (1.0 + alpha * alpha))
    return c + k * (math.sqrt(1.0 - c * c) - c * math.acos(c))


def network_cmap(c: float, alpha: float, layers: int) -> float:
    """C map of a net with ``layers`` nonlinear layers: the local map composed ``layers`` times."""
    for _ in range(layers):
        c = leaky_relu_cmap(c, alpha)
    return c


def tat_leaky_relu_slope(layers: int, eta: float = 0.9, tol: float = 1e-12) -> float:
    """The negative slope alpha for which a net of ``layers`` nonlinear layers has C_f(0) = eta.

    Bisection on alpha in [-1, 1], where C_f(0) decreases strictly in alpha. Raises
    ``ValueError`` when eta is out of (0, 1) or beyond what ``layers`` layers can reach.
    """
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers={layers!r} must be an int >= 1 (the number of nonlinear layers)")
    if not 0.0 < eta < 1.0:
        raise ValueError(f"eta={eta!r} must lie strictly between 0 and 1 (the target C_f(0))")
    lo, hi = SLOPE_RANGE
    reachable = network_cmap(0.0, lo, layers)
    if eta >= reachable:
        raise ValueError(f"eta={eta} is out of reach for {layers} nonlinear layer(s): even alpha=-1 "
                         f"(|x|) gives C_f(0)={reachable:.4f}; use eta < {reachable:.4f} or a deeper net")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if network_cmap(0.0, mid, layers) > eta:
            lo = mid  # still too nonlinear: move towards the identity
        else:
            hi = mid
    return 0.5 * (lo + hi)


class ScaledLeakyReLU(nn.Module):
    """phi(x) = sqrt(2 / (1 + alpha^2)) * leaky_relu(x, alpha): unit second moment on N(0, 1)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)
        self.scale = leaky_relu_scale(self.alpha)

    def forward(self, x):
        return F.leaky_relu(x, self.alpha) * self.scale

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.6f}, scale={self.scale:.6f}"


def monte_carlo_cmap(alpha: float, layers: int, c0: float = 0.0, width: int = 1024, pairs: int = 8,
                     generator: torch.Generator | None = None) -> float:
    """Cosine similarity of two inputs with similarity ``c0`` after ``layers`` random layers.

    Each layer is a fresh orthogonal ``width`` x ``width`` matrix followed by
    :class:`ScaledLeakyReLU` (the network the C map describes, at finite width). Returns the
    mean over ``pairs`` independent input pairs, each of squared norm ``width`` (q = 1).
    """
    phi = ScaledLeakyReLU(alpha)
    x = torch.randn(pairs, width, generator=generator, dtype=torch.float64)
    e = torch.randn(pairs, width, generator=generator, dtype=torch.float64)
    e = e - (e * x).sum(1, keepdim=True) / (x * x).sum(1, keepdim=True) * x  # orthogonal to x
    x, e = F.normalize(x, dim=1), F.normalize(e, dim=1)
    h = math.sqrt(width) * torch.stack([x, c0 * x + math.sqrt(1.0 - c0 * c0) * e])  # (2, pairs, width)
    for _ in range(layers):
        q, r = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
        h = phi(h @ (q * torch.sign(torch.diagonal(r))))  # sign fix: Haar-distributed orthogonal
    return F.cosine_similarity(h[0], h[1], dim=1).mean().item()
