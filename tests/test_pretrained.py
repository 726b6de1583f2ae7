"""Sharing and reusing models: timm's conventions on every architecture, safetensors + config.json
folders, ``create_model(pretrained=)``, the Hub mixin's local round trip (never the network:
HF_HUB_OFFLINE=1 in conftest), and ``pnnh.load`` on runs of today and of before config.json."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import pnnh
from pnnh.models import create_model
from pnnh.models.cnn import ConvNet
from pnnh.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, save_pretrained_files
from pnnh.models.vit import ViT
from pnnh.train.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = {"depth": 2, "width": 32, "heads": 2}
# name, keyword arguments, input side, expected (channels, side) of every stage's map
FEATURES = [
    ("plain20", {}, 16, [(16, 16), (16, 16), (32, 8), (64, 4)]),
    ("resnet20", {}, 16, [(16, 16), (16, 16), (32, 8), (64, 4)]),
    ("pnnh20", {}, 16, [(16, 16), (16, 16), (32, 8), (64, 4)]),
    ("repvgg8", {}, 16, [(16, 16), (16, 16), (32, 8), (64, 4)]),
    ("residual_twin8", {}, 16, [(16, 16), (16, 16), (32, 8), (64, 4)]),
    ("resnet18", {"width": 8}, 32, [(8, 32), (8, 32), (16, 16), (32, 8), (64, 4)]),
    ("pnnh18", {"width": 8}, 72, [(8, 18), (8, 18), (16, 9), (32, 5), (64, 3)]),  # 7x7/2 stem + max-pool
    ("vit", TINY_VIT, 16, [(32, 4), (32, 4)]),
    ("pnnh_vit", TINY_VIT, 16, [(32, 4), (32, 4)]),
    ("plain_mlp", {"width": 32}, 8, [(32, 1), (32, 1)]),
    ("pnnh_mlp", {"width": 32}, 8, [(32, 1), (32, 1)]),
    ("hourglass_mlp", {"width": 32}, 8, [(32, 1), (32, 1)]),
]


@pytest.mark.parametrize("name, kwargs, side, expected", FEATURES, ids=[f[0] for f in FEATURES])
def test_features_only_gives_each_stage_map(name, kwargs, side, expected):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=2, img_size=side, **kwargs).eval()
    features = create_model(name, num_classes=3, in_chans=2, img_size=side, features_only=True, **kwargs).eval()
    features.model.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, side, side)
    maps = features(x)
    assert [(m.shape[1], m.shape[-1]) for m in maps] == expected
    assert all(m.shape[0] == 2 and m.shape[-2] == m.shape[-1] for m in maps)
    assert features.feature_info.channels() == [c for c, _ in expected]
    assert features.feature_info.reduction() == [side // s for _, s in expected]
    with torch.no_grad():
        final = model.forward_features(x)
    if not isinstance(model, ViT):  # a CNN's last map is what its head pools (a ViT normalises it first)
        torch.testing.assert_close(maps[-1], final, rtol=0, atol=0)
    picked = copy.deepcopy(create_model(name, num_classes=3, in_chans=2, img_size=side, features_only=True,
                                        out_indices=(-1, 1), **kwargs))
    assert [(m.shape[1], m.shape[-1]) for m in picked(x)] == [expected[-1], expected[1]]


def test_features_only_refuses_a_stage_the_model_lacks():
    with pytest.raises(ValueError, match=r"out_indices=\(4,\).*4 stages, use indices in 0\.\.3"):
        create_model("pnnh20", features_only=True, out_indices=(4,))
    with pytest.raises(ValueError, match="features_only=True"):
        create_model("pnnh20", out_indices=(1,))


@pytest.mark.parametrize("name, kwargs", [("pnnh20", {}), ("pnnh_vit", TINY_VIT), ("pnnh_mlp", {"width": 32})])
def test_forward_is_head_of_features_and_reset_classifier_replaces_the_head(name, kwargs):
    model = create_model(name, num_classes=10, in_chans=1, img_size=8, **kwargs).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits, rtol=0, atol=0)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (3, model.num_features) and model.get_classifier() is model.head
    model.reset_classifier(4)
    assert model(x).shape == (3, 4) and model.num_classes == 4 and model.pretrained_cfg["num_classes"] == 4
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_classes=-1 is not valid"):
        model.reset_classifier(-1)


def test_pretrained_cfg_records_the_constructor_defaults_and_the_given_shape():
    cfg = create_model("pnnh56").pretrained_cfg
    assert (cfg["model"], cfg["num_classes"], cfg["input_size"], cfg["mean"]) == ("pnnh56", 10, [3, 32, 32], None)
    assert create_model("pnnh_mlp").pretrained_cfg["input_size"] == [1, 28, 28]
    assert create_model("resnet18").pretrained_cfg["input_size"] == [3, 224, 224]
    cfg = create_model("pnnh20", num_classes=7, in_chans=1, img_size=8, coder_ratio=0.25).pretrained_cfg
    assert cfg["model_kwargs"] == {"coder_ratio": 0.25} and cfg["input_size"] == [1, 8, 8]


def _saved(tmp_path, name="pnnh20", **kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, img_size=8, **kwargs).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the buffers are checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.pretrained_cfg.update(mean=[0.3], std=[0.4])
    save_pretrained_files(model, tmp_path / "saved")
    return model, tmp_path / "saved"


def test_saved_folder_rebuilds_the_same_model_with_a_shared_coder_stored_once(tmp_path):
    model, folder = _saved(tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model"] == "pnnh20" and config["mean"] == [0.3] and config["pnnh_version"] == pnnh.__version__
    assert len(load_file(str(folder / WEIGHTS_NAME))) < len(model.state_dict())  # one copy per shared coder
    again = create_model("pnnh20", pretrained=folder).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.pretrained_cfg["std"] == [0.4]


def test_pretrained_with_another_class_count_gets_a_new_head_and_keeps_the_body(tmp_path):
    model, folder = _saved(tmp_path)
    with pytest.warns(UserWarning, match="saved head has 10 classes; a new head for num_classes=3"):
        again = create_model("pnnh20", pretrained=folder, num_classes=3).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert again(x).shape == (4, 3)
        torch.testing.assert_close(again.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    assert again.pretrained_cfg["num_classes"] == 3


@pytest.mark.parametrize("name, kwargs", [("pnnh20", {}), ("vit", TINY_VIT)])
def test_pretrained_with_other_input_channels_adapts_the_input_layer(tmp_path, name, kwargs):
    """Summed kernels on a grey image equal the saved kernels on that image in every channel."""
    model, folder = _saved(tmp_path, name, **kwargs)  # saved for 1 channel
    grey = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(grey)
        rgb = create_model(name, pretrained=folder, in_chans=3).eval()
        torch.testing.assert_close(rgb(grey.expand(-1, 3, -1, -1)), expected, rtol=1e-5, atol=1e-5)
        save_pretrained_files(rgb, tmp_path / "rgb")
        back = create_model(name, pretrained=tmp_path / "rgb", in_chans=1).eval()
        torch.testing.assert_close(back(grey), expected, rtol=1e-5, atol=1e-5)


def test_pretrained_refusals_name_the_problem(tmp_path):
    _, folder = _saved(tmp_path, "pnnh_mlp", width=32)
    with pytest.raises(ValueError, match="cannot adapt pnnh_mlp from in_chans=1 to in_chans=3.*flattened pixels"):
        create_model("pnnh_mlp", pretrained=folder, in_chans=3)
    with pytest.raises(ValueError, match="holds a 'pnnh_mlp' model, not 'plain_mlp'"):
        create_model("plain_mlp", pretrained=folder)
    with pytest.raises(ValueError, match="not a folder holding config.json and model.safetensors"):
        create_model("pnnh20", pretrained=tmp_path)
    with pytest.raises(ValueError, match="pnnh ships no weights"):
        create_model("pnnh20", pretrained=True)


def test_hub_mixin_round_trip_in_the_hub_layout(tmp_path):
    model, _ = _saved(tmp_path, "pnnh_vit", **TINY_VIT)
    model.save_pretrained(tmp_path / "hub")
    assert {p.name for p in (tmp_path / "hub").iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, "README.md"}
    x = torch.randn(2, 1, 8, 8)
    for loaded in (pnnh.from_pretrained(tmp_path / "hub"), ViT.from_pretrained(str(tmp_path / "hub"))):
        assert isinstance(loaded, ViT) and not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="num_classes=4"):
        assert pnnh.from_pretrained(tmp_path / "hub", num_classes=4)(x).shape == (2, 4)
    with pytest.raises(TypeError, match="holds a ViT \\(pnnh_vit\\), not a ConvNet"):
        ConvNet.from_pretrained(tmp_path / "hub")


def test_the_model_card_says_how_to_load_and_the_hub_stays_offline_in_tests(tmp_path):
    from huggingface_hub.errors import OfflineModeIsEnabled

    model = create_model("pnnh8", num_classes=3, in_chans=1, img_size=8)
    model.save_pretrained(tmp_path / "hub")
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "library_name: pnnh" in card and '`pnnh8`' in card and "[1, 8, 8]" in card
    assert 'pnnh.from_pretrained("OWNER/NAME")' in card
    with pytest.raises((OfflineModeIsEnabled, OSError)):  # refused before any connection is made
        pnnh.from_pretrained("pnnh-user/no-such-model")
    with pytest.raises(OfflineModeIsEnabled):
        model.push_to_hub("pnnh-user/no-such-model")


def test_without_the_hub_extra_load_works_and_the_hub_methods_say_what_to_install(tmp_path):
    import subprocess
    import sys

    _, folder = _saved(tmp_path)
    code = ("import sys; sys.modules['huggingface_hub'] = None\n"  # as if not installed
            "import pnnh\n"
            f"model = pnnh.load({str(folder)!r})\n"
            "try:\n    model.save_pretrained('unused')\nexcept ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'pnnh[hub]'" in out.stdout


# ---------------------------------------------------------------- runs: pnnh.train -> pnnh.load

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "p8"
    pnnh.train({"model": "pnnh8", "model_kwargs": {"width": 8}, "data": "digits", "epochs": 1, "batch_size": 64,
                "device": "cpu", "precision": "fp32", "seed": 0, "out": str(out)}, progress=False)
    return out


def _digits_batch():
    from pnnh.data import TensorLoader, load_dataset

    splits = load_dataset("digits", test_subset=64)
    x, _ = next(iter(TensorLoader(splits.test_x, splits.test_y, 64, mean=splits.mean, std=splits.std,
                                  train=False)))
    return splits, x


def test_a_run_loads_without_its_dataset_and_matches_its_checkpoint(digits_run, monkeypatch):
    splits, x = _digits_batch()
    assert (digits_run / WEIGHTS_NAME).is_file() and (digits_run / CONFIG_NAME).is_file()
    import pnnh.data

    def no_data(*args, **kwargs):
        raise AssertionError("pnnh.load read the dataset")

    monkeypatch.setattr(pnnh.data, "load_dataset", no_data)
    monkeypatch.setattr("pnnh.data.datasets.load_dataset", no_data)
    model = pnnh.load(digits_run)
    assert not model.training and model.pretrained_cfg["input_size"] == [1, 8, 8]
    assert model.pretrained_cfg["mean"] == pytest.approx(list(splits.mean), rel=1e-3)
    from_checkpoint = pnnh.load(digits_run / "best.pt")
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(from_checkpoint(x), logits, rtol=0, atol=0)
        torch.testing.assert_close(pnnh.load(digits_run, which="last")(x), logits, rtol=0, atol=0)  # 1 epoch
        torch.testing.assert_close(pnnh.from_pretrained(digits_run)(x), logits, rtol=0, atol=0)
    assert (logits.argmax(1) == splits.test_y).float().mean() > 0.3  # trained, not a fresh init


def test_a_run_from_before_config_json_still_loads(digits_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(digits_run, old)
    (old / WEIGHTS_NAME).unlink()
    (old / CONFIG_NAME).unlink()
    _, x = _digits_batch()
    legacy = pnnh.load(old)
    assert legacy.pretrained_cfg["input_size"] == [1, 8, 8] and legacy.pretrained_cfg["mean"] is None
    with torch.no_grad():
        torch.testing.assert_close(legacy(x), pnnh.load(digits_run)(x), rtol=0, atol=0)


def test_load_refusals_are_one_line(tmp_path, digits_run):
    with pytest.raises(CheckpointError, match="holds no trained model"):
        pnnh.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        pnnh.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="which='latest' is not valid"):
        pnnh.load(digits_run, which="latest")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_NAME).write_text((digits_run / CONFIG_NAME).read_text())
    (broken / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot load the model saved in"):
        pnnh.load(broken)
