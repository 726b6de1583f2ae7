"""Two trainer options from the baselines issue: annealed gradient noise and guidance.

- :class:`GradientNoise` (``--grad-noise ETA``): after the backward pass every gradient gets
  Gaussian noise of variance ``eta / (1 + t)^gamma`` at optimizer step t, gamma = 0.55
  (Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks", 2015).
  The noise of step t is drawn from a generator seeded with (seed, t) alone, so a resumed run
  and every rank of a distributed run add the same noise.
- :class:`Guidance` (``--guide MODEL[:CHECKPOINT]``): an extra loss
  ``weight x mean_l (1 - CKA(target layer l, guide layer g(l)))`` that pulls the target's layer
  representations towards those of a frozen guide network, trained (a checkpoint) or untrained
  (Subramaniam et al., "Training the Untrainable: Introducing Inductive Bias via
  Representational Alignment", 2024). Target layer l of L is paired with guide layer
  round(l (G - 1) / (L - 1)) of G, so nets of different depths pair by relative depth. CKA is
  linear CKA on the flattened activations of the training batch (differentiable, float32).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from pnnh.probe.metrics import center_gram
from pnnh.train.config import ConfigError, parse_guide

GRAD_NOISE_GAMMA = 0.55  # the paper's decay exponent


class GradientNoise:
    """Add N(0, eta / (1 + step)^gamma) to every gradient, reproducibly per step."""

    def __init__(self, eta: float, gamma: float = GRAD_NOISE_GAMMA, seed: int = 0):
        if not eta > 0:
            raise ValueError(f"grad_noise eta={eta!r} must be > 0")
        self.eta, self.gamma, self.seed = float(eta), float(gamma), int(seed)

    def variance(self, step: int) -> float:
        """The noise variance at optimizer step ``step`` (0-based)."""
        return self.eta / (1.0 + step) ** self.gamma

    @torch.no_grad()
    def add_(self, params: Iterable[nn.Parameter], step: int) -> None:
        """Add the noise of ``step`` to the ``.grad`` of ``params`` in place."""
        std = self.variance(step) ** 0.5
        generators: dict[torch.device, torch.Generator] = {}
        for p in params:
            if p.grad is None:
                continue
            gen = generators.get(p.grad.device)
            if gen is None:
                gen = generators[p.grad.device] = torch.Generator(device=p.grad.device)
                gen.manual_seed((self.seed * 1_000_003 + step) % 2**63)
            noise = torch.randn(p.grad.shape, generator=gen, device=p.grad.device, dtype=torch.float32)
            p.grad.add_(noise.to(p.grad.dtype), alpha=std)


def differentiable_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Linear CKA of two batches (rows = examples, other dims flattened), as a tensor with grad."""
    x = x.reshape(x.shape[0], -1).float()
    y = y.reshape(y.shape[0], -1).float()
    kx, ky = center_gram(x @ x.T), center_gram(y @ y.T)
    return (kx * ky).sum() / (kx.norm() * ky.norm() + eps)


def build_guide(spec: str, *, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """The frozen guide network of ``spec`` (``MODEL[:CHECKPOINT]``); untrained without a checkpoint.

    CHECKPOINT is what ``pnnh.load`` reads (a ``pnnh train`` run directory: its best epoch's
    weights; or a checkpoint file of one). A trained guide keeps its own head (only its layers
    are compared) but must take this run's images: same channels and size.
    """
    from pnnh.models import create_model
    from pnnh.train.load import load

    name, ckpt = parse_guide(spec)
    if ckpt is None:
        try:
            guide = create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"cannot build guide model {name!r}: {err}") from err
    else:
        guide = load(ckpt)  # a CheckpointError is a ConfigError, naming the path
        saved = guide.pretrained_cfg
        if saved["model"] != name:
            raise ConfigError(f"guide checkpoint {ckpt} holds a {saved['model']!r} model, not {name!r}")
        if (saved["in_chans"], saved["img_size"]) != (in_chans, img_size):
            raise ConfigError(f"guide checkpoint {ckpt} was trained on {saved['in_chans']}-channel "
                              f"{saved['img_size']} px images; this run's are {in_chans}-channel {img_size} px")
    guide.requires_grad_(False)
    return guide


class Guidance:
    """Representational-alignment loss of ``target`` towards a frozen ``guide`` (module docstring).

    Use as: ``loss = task_loss + guidance.loss(x)`` right after ``target(x)`` ran, in the same
    autograd graph; the target's layer outputs are captured by forward hooks installed here.
    The guide runs without gradients, in eval mode except that its BatchNorms normalise with the
    batch's statistics (which an untrained guide needs) and never update their running ones: set
    up once here, since the guide belongs to this object and nothing else switches its modes.
    """

    def __init__(self, target: nn.Module, guide: nn.Module, weight: float = 1.0):
        from pnnh.probe.hooks import feature_layers

        if not weight > 0:
            raise ValueError(f"guide_weight={weight!r} must be > 0")
        self.guide, self.weight = guide, float(weight)
        guide.eval()
        for m in guide.modules():
            if isinstance(m, _BatchNorm):
                m.train()
                m.track_running_stats = False  # batch statistics, running buffers left untouched
        t_layers, g_layers = feature_layers(target), feature_layers(guide)
        n, m = len(t_layers), len(g_layers)
        self.pairs = [(i, round(i * (m - 1) / max(1, n - 1))) for i in range(n)]
        self.pair_names = [(t_layers[i][0], g_layers[j][0]) for i, j in self.pairs]
        self._target_out: dict[int, torch.Tensor] = {}
        self._guide_out: dict[int, torch.Tensor] = {}
        wanted_guide = {j for _, j in self.pairs}
        self._handles = [m.register_forward_hook(self._keep(self._target_out, i)) for i, (_, m) in enumerate(t_layers)]
        self._handles += [m.register_forward_hook(self._keep(self._guide_out, j))
                          for j, (_, m) in enumerate(g_layers) if j in wanted_guide]

    @staticmethod
    def _keep(store: dict, index: int):
        def hook(module, inputs, output):
            store[index] = output
        return hook

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """``1 - CKA`` per layer pair, for the target outputs of the last forward on ``x``."""
        if len(self._target_out) < len(self.pairs):
            raise RuntimeError("Guidance.loss needs the target's forward on the same batch first")
        with torch.no_grad():
            self.guide(x)
        d = torch.stack([1.0 - differentiable_cka(self._target_out[i], self._guide_out[j]) for i, j in self.pairs])
        self._target_out.clear()
        self._guide_out.clear()
        return d

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """``weight x mean(1 - CKA)`` over the layer pairs."""
        return self.weight * self.distances(x).mean()

    def remove(self) -> None:
        """Remove the forward hooks (the target model is left as it was)."""
        for h in self._handles:
            h.remove()
        self._handles = []
