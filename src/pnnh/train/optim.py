"""Optimizer parameter groups and the learning-rate schedule.

Parameter groups (one list, at most five groups, empty ones dropped, in this order):

=================  ===========================  =========================
name               parameters                   lr / weight decay
=================  ===========================  =========================
``decay``          weights (ndim >= 2)          lr / weight_decay
``no_decay``       norm scales, biases (ndim<=1) lr / 0
``coder``          PNNH coder weights           lr*coder_lr_scale / coder_weight_decay
``coder_no_decay`` coder norms and biases       lr*coder_lr_scale / 0
``scalar``         Fixup scalars                lr*scalar_lr_scale / 0
=================  ===========================  =========================

A parameter belongs to the coder when its name contains "coder" (the models' convention for
the weights PNNH shares across layers); a shared Parameter appears once, under its first name.
A parameter is a Fixup scalar when its name contains "fixup_scalar" (pnnh.models.baselines):
the Fixup paper trains its scalar biases and multipliers at 1/10 of the base rate.
Decaying a norm scale or bias only pulls it towards zero without regularising the function
(with BatchNorm the output is invariant to the scale of the weight before it, not of these).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pnnh.train.config import TrainConfig


GROUP_OF = {  # (is coder, decays) -> group name
    (False, True): "decay",
    (False, False): "no_decay",
    (True, True): "coder",
    (True, False): "coder_no_decay",
}


def param_groups(model: nn.Module, lr: float, weight_decay: float, coder_lr_scale: float = 1.0,
                 coder_weight_decay: float | None = None, scalar_lr_scale: float = 0.1) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into the groups in the module docstring."""
    coder_wd = weight_decay if coder_weight_decay is None else coder_weight_decay
    specs = {
        "decay": (lr, weight_decay),
        "no_decay": (lr, 0.0),
        "coder": (lr * coder_lr_scale, coder_wd),
        "coder_no_decay": (lr * coder_lr_scale, 0.0),
        "scalar": (lr * scalar_lr_scale, 0.0),
    }
    members: dict[str, list[nn.Parameter]] = {name: [] for name in specs}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = "scalar" if "fixup_scalar" in name else GROUP_OF[("coder" in name, p.ndim > 1)]
        members[group].append(p)
    return [
        {"name": name, "params": members[name], "lr": g_lr, "weight_decay": wd}
        for name, (g_lr, wd) in specs.items()
        if members[name]
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW (momentum = beta1) over ``param_groups``."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.coder_lr_scale, cfg.coder_weight_decay,
                          cfg.scalar_lr_scale)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup_steps to 1, then ``cosine`` decay to 0, ``onecycle``
    (linear decay to 0) or ``constant``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up length in steps; never more than half the run, so short runs still anneal."""
    return min(round(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (call ``.step()`` after every optimizer step)."""
    warm = warmup_steps(cfg, steps_per_epoch, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warm, total_steps, cfg.schedule)
    )
