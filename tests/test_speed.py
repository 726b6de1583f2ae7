"""pnnh.train.speed: regional compilation and the measured, cached layout choice."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pnnh.models import create_model
from pnnh.train import speed

SHAPE = (4, 3, 8, 8)


def tiny(name="pnnh8"):
    torch.manual_seed(0)
    return create_model(name, num_classes=3, width=4, img_size=8)


def test_layout_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "layout.json"
    model = tiny()
    first = speed.measured_channels_last(model, SHAPE, "fp32", cache=cache)
    entry = json.loads(cache.read_text())[speed.layout_key(model, SHAPE, "fp32")]
    assert entry["channels_last"] is first
    assert set(entry["seconds_per_step"]) == {"nchw", "channels_last"}
    assert all(0 < s < 60 for s in entry["seconds_per_step"].values())

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although the answer is cached")
    monkeypatch.setattr(speed, "time_layouts", no_measuring)
    assert speed.measured_channels_last(model, SHAPE, "fp32", cache=cache) is first
    entry["channels_last"] = not first  # the cached answer is what decides, whatever it is
    cache.write_text(json.dumps({speed.layout_key(model, SHAPE, "fp32"): entry}))
    assert speed.measured_channels_last(model, SHAPE, "fp32", cache=cache) is (not first)


def test_layout_key_tells_models_inputs_and_precisions_apart():
    a, b = tiny("pnnh8"), tiny("resnet8")
    keys = {speed.layout_key(a, SHAPE, "fp32"), speed.layout_key(b, SHAPE, "fp32"),
            speed.layout_key(a, (8, 3, 8, 8), "fp32"), speed.layout_key(a, SHAPE, "bf16")}
    assert len(keys) == 4


def test_a_damaged_cache_is_measured_again_and_rewritten(tmp_path):
    cache = tmp_path / "layout.json"
    cache.write_text("{not json")
    answer = speed.measured_channels_last(tiny(), SHAPE, "fp32", cache=cache)
    assert list(json.loads(cache.read_text()).values())[0]["channels_last"] is answer


def test_cache_file_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(speed.LAYOUT_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert speed.default_layout_cache() == tmp_path / "pnnh" / "layout.json"


@pytest.mark.parametrize("name", ["pnnh8", "resnet8"])
def test_compile_regions_compiles_each_block_and_keeps_the_function(name):
    eager, compiled = tiny(name), speed.compile_regions(tiny(name), backend="eager")
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in compiled.body)
    x = torch.randn(SHAPE)
    out_e, out_c = eager(x), compiled(x)
    torch.testing.assert_close(out_c, out_e)
    F.cross_entropy(out_e, torch.tensor([0, 1, 2, 0])).backward()
    F.cross_entropy(out_c, torch.tensor([0, 1, 2, 0])).backward()
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=n)


@pytest.mark.parametrize("cached", [True, False])
def test_trainer_auto_layout_follows_the_measured_answer(tmp_path, monkeypatch, cached):
    from pnnh.train import train
    from pnnh.train.config import resolve_precision

    cache = tmp_path / "layout.json"
    monkeypatch.setenv(speed.LAYOUT_CACHE_ENV, str(cache))
    model = create_model("pnnh8", num_classes=10, in_chans=1, img_size=8, width=4)
    key = speed.layout_key(model, (32, 1, 8, 8), resolve_precision("auto", "cpu"))
    cache.write_text(json.dumps({key: {"channels_last": cached}}))
    result = train({"model": "pnnh8", "model_kwargs": {"width": 4}, "data": "digits", "epochs": 1,
                    "batch_size": 32, "train_subset": 64, "test_subset": 32, "device": "cpu",
                    "out": str(tmp_path / "run")}, progress=False)
    assert yaml_load(tmp_path / "run" / "config.yaml")["channels_last"] is cached
    assert result.metrics["epoch"] == 1
    cfg = {"model": "pnnh8", "model_kwargs": {"width": 4}, "data": "digits", "epochs": 1, "batch_size": 32,
           "train_subset": 64, "test_subset": 32, "device": "cpu", "channels_last": not cached,
           "out": str(tmp_path / "forced")}
    train(cfg, progress=False)  # an explicit layout is never overridden by the cache
    assert yaml_load(tmp_path / "forced" / "config.yaml")["channels_last"] is (not cached)


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())
