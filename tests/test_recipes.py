"""The paper-scale recipes in configs/ (CIFAR ResNet/plain/PNNH-110, ImageNet ResNet/PNNH-50,
DeiT-Ti ViTs) are valid configs that build their real model and train.

Their datasets are not on this machine and their runs need GPUs, so each recipe runs one
optimizer step at batch 2 on synthetic images of its own size and channels (10 classes).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pnnh.models import create_model
from pnnh.train import load_config, train

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if p.name.startswith(("cifar", "imagenet")))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread per test process


def test_recipes_exist():
    names = {p.name for p in CONFIGS}
    for ds in ("cifar10", "cifar100"):
        assert {f"{ds}-{fam}110.yaml" for fam in ("resnet", "plain", "pnnh")} <= names
    assert {"imagenet-resnet50.yaml", "imagenet-pnnh50.yaml", "imagenet-vit-tiny.yaml",
            "imagenet-pnnh-vit-tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_builds_and_takes_a_step(path, tmp_path):
    cfg = load_config(path)
    assert cfg.lr is not None and cfg.batch_size >= 128 and cfg.epochs >= 90  # explicit, full-scale recipes
    img = cfg.img_size or 32
    # The real architecture at the recipe's image size; only the data (and so the class count) is synthetic.
    result = train(load_config(path, {"data": "synthetic", "img_size": img, "train_subset": 2, "test_subset": 2,
                                      "batch_size": 2, "epochs": 1, "max_steps": 1, "device": "cpu",
                                      "precision": "fp32", "out": str(tmp_path / "run")}), progress=False)
    assert result.status == "ok" and result.metrics["step"] == 1
    expected = create_model(cfg.model, num_classes=10, in_chans=3, img_size=img, **cfg.model_kwargs)
    assert result.params == sum(p.numel() for p in expected.parameters())
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.model, saved.optimizer, saved.lr, saved.weight_decay) == (cfg.model, cfg.optimizer, cfg.lr,
                                                                           cfg.weight_decay)
