"""Trainer options of the baselines issue: gradient noise, guidance, Fixup's scalar learning rate."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pnnh.data import load_dataset
from pnnh.models import create_model
from pnnh.train import ConfigError, load_config, train
from pnnh.train.optim import param_groups
from pnnh.train.regularizers import GradientNoise, Guidance, build_guide, differentiable_cka
from pnnh.probe.metrics import linear_cka

TINY = {"model": "plain8", "model_kwargs": {"width": 8}, "data": "digits", "train_subset": 768,
        "test_subset": 256, "epochs": 2, "batch_size": 32, "device": "cpu", "precision": "fp32", "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread per test process


def epoch_losses(out) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_gradient_noise_follows_the_annealed_variance_schedule():
    noise = GradientNoise(0.3, seed=1)
    for step in (0, 9, 99):
        assert math.isclose(noise.variance(step), 0.3 / (1 + step) ** 0.55)
        p = torch.nn.Parameter(torch.zeros(400_000))
        p.grad = torch.zeros_like(p)
        noise.add_([p], step)
        assert abs(p.grad.var().item() / noise.variance(step) - 1) < 0.02
        assert abs(p.grad.mean().item()) < 4 * math.sqrt(noise.variance(step) / p.numel())
    grads = []
    for step in (5, 5, 6):  # a pure function of (seed, step): resume and every rank agree
        p = torch.nn.Parameter(torch.zeros(100))
        p.grad = torch.zeros_like(p)
        noise.add_([p], step)
        grads.append(p.grad)
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])
    with pytest.raises(ValueError, match="eta"):
        GradientNoise(0.0)


def test_training_with_gradient_noise_learns_and_differs_from_without(tmp_path):
    noisy = train({**TINY, "grad_noise": 0.01, "out": str(tmp_path / "noisy")}, progress=False)
    clean = train({**TINY, "out": str(tmp_path / "clean")}, progress=False)
    losses = epoch_losses(tmp_path / "noisy")
    assert losses[1] < losses[0] and noisy.metrics["test_acc"] > 0.5
    assert noisy.metrics["test_acc"] != clean.metrics["test_acc"] or epoch_losses(tmp_path / "clean") != losses


def test_differentiable_cka_equals_the_probe_cka():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4, 5, 5), torch.randn(64, 30)
    y[:, :10] += x.reshape(64, -1)[:, :10]
    assert math.isclose(differentiable_cka(x, y).item(), linear_cka(x, y), rel_tol=1e-4)
    assert math.isclose(differentiable_cka(x, 3 * x).item(), 1.0, rel_tol=1e-5)


def test_guidance_loss_reduces_the_cka_distance_to_the_guide():
    torch.manual_seed(0)
    splits = load_dataset("digits", train_subset=256)
    x = splits.train_x.float().div(255).sub(0.5)
    target = create_model("plain20", num_classes=10, in_chans=1, img_size=8, width=8)
    guide = build_guide("resnet8", num_classes=10, in_chans=1, img_size=8)
    guidance = Guidance(target, guide, weight=1.0)
    buffers = {k: v.clone() for k, v in guide.state_dict().items()}
    from pnnh.probe.hooks import feature_layers
    n, m = len(feature_layers(target)), len(feature_layers(guide))
    assert n > m and len(guidance.pairs) == n  # every target layer, paired by relative depth
    assert guidance.pairs[0] == (0, 0) and guidance.pairs[-1] == (n - 1, m - 1)
    target(x)
    before = guidance.distances(x).mean().item()
    opt = torch.optim.Adam(target.parameters(), lr=3e-3)
    for _ in range(30):
        target(x)
        loss = guidance.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    target(x)
    after = guidance.distances(x).mean().item()
    assert after < 0.7 * before, (before, after)
    assert all(not p.requires_grad for p in guide.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in guide.state_dict().items())  # running stats untouched
    guidance.remove()
    assert not target._forward_hooks and all(not m._forward_hooks for m in target.modules())


def test_training_with_a_guide_from_a_trained_run(tmp_path):
    guide_run = tmp_path / "guide"
    train({**TINY, "model": "resnet8", "out": str(guide_run)}, progress=False)
    guided = train({**TINY, "guide": f"resnet8:{guide_run}", "guide_weight": 0.5, "out": str(tmp_path / "t")},
                   progress=False)
    losses = epoch_losses(tmp_path / "t")
    assert losses[1] < losses[0] and guided.metrics["test_acc"] > 0.4
    assert load_config(tmp_path / "t" / "config.yaml").guide == f"resnet8:{guide_run}"


@pytest.mark.parametrize("guide, match", [(":runs/x", "MODEL or MODEL:CHECKPOINT"), ("resnet8:/no/such/run", "does not exist"),
                                          ("nosuchnet", "cannot build guide model"), ("resnet20:{run}", "holds a 'resnet8' model, not 'resnet20'")])
def test_bad_guides_are_clear_config_errors(tmp_path, guide, match):
    run = tmp_path / "r8"
    if "{run}" in guide:
        train({**TINY, "model": "resnet8", "epochs": 1, "out": str(run)}, progress=False)
    with pytest.raises(ConfigError, match=match):
        train({**TINY, "guide": guide.format(run=run), "out": str(tmp_path / "t")}, progress=False)
    assert not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match="without compile"):
        load_config({**TINY, "guide": "resnet8", "compile": True})


def test_fixup_scalars_get_their_own_learning_rate():
    model = create_model("fixup_resnet8", width=8)
    groups = {g["name"]: g for g in param_groups(model, lr=0.2, weight_decay=5e-4, scalar_lr_scale=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    scalars = {names[id(p)] for p in groups["scalar"]["params"]}
    assert scalars == {n for n in names.values() if "fixup_scalar" in n} and len(scalars) > 10
    assert math.isclose(groups["scalar"]["lr"], 0.02) and groups["scalar"]["weight_decay"] == 0.0
    assert not any("fixup_scalar" in names[id(p)] for g in groups.values() if g["name"] != "scalar"
                   for p in g["params"])
    assert "scalar" not in {g["name"] for g in param_groups(create_model("resnet8"), 0.1, 5e-4)}
