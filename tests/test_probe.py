"""The dissipating-inputs probe: metrics, hooks, state preservation, plots, DISTS and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import yaml
from sklearn.datasets import load_digits

from pnnh.cli import main
from pnnh.models import create_model
from pnnh.probe import (DISTS, crossing_layer, feature_layers, linear_cka, plot_probe, probe_model,
                        probe_summary)
from pnnh.probe.dists import _STAGE_OFFSETS, gray_image
from pnnh.probe.metrics import activation_stats, count_sketch, gram, cka_from_grams, ridge_recoverability

DIGITS = {"in_chans": 1, "img_size": 8, "num_classes": 10}


@pytest.fixture(scope="module")
def digits():
    """256 sklearn digits, normalised, as (256, 1, 8, 8) images and labels."""
    data = load_digits()
    x = torch.tensor(data.images[:256], dtype=torch.float32)[:, None]
    return (x - x.mean()) / x.std(), torch.tensor(data.target[:256])


def small(name: str, width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, width=width, **DIGITS)


# --- metrics -------------------------------------------------------------------------------

def test_linear_cka_identity_invariances_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g) @ torch.randn(30, 30, generator=g)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    y = torch.relu(x @ torch.randn(30, 50, generator=g))
    base = linear_cka(x, y)
    assert 0.2 < base < 0.99
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-6)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-9)
    # independent noise: only the finite-sample bias remains, and it shrinks with n
    big = torch.randn(2000, 30, generator=g) @ torch.randn(30, 30, generator=g)
    assert linear_cka(big, torch.randn(2000, 50, generator=g)) < 0.03


def test_linear_cka_gram_and_feature_forms_agree():
    g = torch.Generator().manual_seed(1)
    narrow = torch.randn(300, 5, generator=g)  # p, q << n: feature form
    wide = torch.randn(20, 400, generator=g)  # p, q >> n: Gram form
    for x in (narrow, wide):
        y = torch.tanh(x @ torch.randn(x.shape[1], x.shape[1], generator=g))
        assert linear_cka(x, y) == pytest.approx(cka_from_grams(gram(x), gram(y)), abs=1e-10)


def test_linear_cka_rejects_mismatched_or_tiny_batches():
    with pytest.raises(ValueError, match="same number of examples"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))


def test_count_sketch_approximates_the_exact_cka():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 50, generator=g)
    f = torch.relu(x @ torch.randn(50, 30000, generator=g))
    sketched = count_sketch(f, 4096, torch.Generator().manual_seed(0))
    assert sketched.shape == (64, 4096)
    assert linear_cka(x, sketched) == pytest.approx(linear_cka(x, f), abs=0.02)


def test_ridge_recoverability_of_invertible_and_unrelated_features():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 20, generator=g)
    perm = torch.randperm(256, generator=g)
    train, test = perm[:128], perm[128:]
    mixed = x @ torch.randn(20, 40, generator=g)
    assert ridge_recoverability(gram(mixed), x, train, test) > 0.99
    assert ridge_recoverability(gram(3.0 * mixed), x, train, test) == pytest.approx(
        ridge_recoverability(gram(mixed), x, train, test), abs=1e-9)
    unrelated = gram(torch.randn(256, 500, generator=g))
    loo = ridge_recoverability(unrelated, x, train, test)
    assert -0.1 < loo < 0.05
    # a fixed tiny penalty interpolates the noise and scores far below "no information"
    assert ridge_recoverability(unrelated, x, train, test, ridge=1e-6) < loo - 0.3


def test_activation_stats_by_layout():
    f = torch.tensor([[[[1.0, -1.0]], [[0.0, 2.0]]],
                      [[[3.0, -2.0]], [[0.0, 4.0]]]])  # (B=2, C=2, H=1, W=2)
    s = activation_stats(f)
    assert s["survival"] == pytest.approx(4 / 8)
    assert s["dead"] == pytest.approx(2 / 4)  # units (c0, w1) and (c1, w0) never > 0
    # channel 0 values 1, -1, 3, -2: mean 0.25; channel 1: 0, 2, 0, 4: mean 1.5
    assert s["sq_channel_mean"] == pytest.approx((0.25**2 + 1.5**2) / 2)
    var0 = torch.tensor([1.0, -1.0, 3.0, -2.0]).var(unbiased=False)
    var1 = torch.tensor([0.0, 2.0, 0.0, 4.0]).var(unbiased=False)
    assert s["channel_var"] == pytest.approx(float(var0 + var1) / 2)
    tokens = f.permute(0, 2, 3, 1).reshape(2, 2, 2)  # (B, tokens, dim): channels are last
    assert activation_stats(tokens)["sq_channel_mean"] == pytest.approx(s["sq_channel_mean"])
    assert activation_stats(tokens)["channel_var"] == pytest.approx(s["channel_var"])
    with pytest.raises(ValueError, match="not supported"):
        activation_stats(torch.zeros(2, 1, 1, 1, 1))


# --- feature layers and hooks ----------------------------------------------------------------

class Chain(nn.Module):
    """A model without feature_layers(): the probe falls back to its activations."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(64, 32), nn.GELU()
        self.fc2, self.act2 = nn.Linear(32, 32), nn.Tanh()
        self.head = nn.Linear(32, 10)
        self.reuse = reuse

    def forward(self, x):
        h = self.act2(self.fc2(self.act1(self.fc1(x.flatten(1)))))
        return self.head(self.act1(h) if self.reuse else h)


def test_feature_layers_prefers_the_model_and_falls_back_to_activations():
    model = small("resnet20")
    assert feature_layers(model) == model.feature_layers()
    chain = Chain()
    assert feature_layers(chain) == [("act1", chain.act1), ("act2", chain.act2)]
    with pytest.raises(ValueError, match="Linear"):
        feature_layers(nn.Linear(3, 3))


def test_probe_on_a_model_without_feature_layers_and_on_token_features(digits):
    x, y = digits
    r = probe_model(Chain(), x, y)
    assert r["layers"] == ["act1", "act2"] and r["shapes"] == [[32], [32]]
    vit = create_model("plain_vit", depth=2, width=16, heads=2, patch_size=4, **DIGITS)
    r = probe_model(vit, x[:64], y[:64])
    assert r["shapes"][0] == [16, 2, 2] and r["shapes"][1] == [4, 16]  # conv map, then tokens
    assert all(0 <= c <= 1 for c in r["cka"])
    mlp = create_model("plain_mlp", depth=4, width=16, **DIGITS)
    r = probe_model(mlp, x, y)
    assert r["shapes"] == [[16, 1, 1]] * 3 and r["cka"][0] > 0.5


def test_sketched_features_give_nearly_the_exact_measures(digits):
    x, y = digits
    model = small("plain8", width=16)  # 1024 features per example in the first stage
    exact = probe_model(model, x, y, grad=False, max_features=None)
    sketched = probe_model(model, x, y, grad=False, max_features=512)
    assert sketched["cka"] == pytest.approx(exact["cka"], abs=0.05)
    assert sketched["recoverability"] == pytest.approx(exact["recoverability"], abs=0.05)
    assert sketched["cka"] != exact["cka"]  # the sketch did run


def test_a_layer_run_twice_is_an_error_and_hooks_are_removed(digits):
    chain = Chain(reuse=True)
    with pytest.raises(RuntimeError, match="act1.*more than once"):
        probe_model(chain, digits[0])
    assert all(not m._forward_hooks for m in chain.modules())


# --- probe_model ---------------------------------------------------------------------------

def test_probe_model_returns_one_value_per_layer(digits):
    x, y = digits
    model = small("plain20")
    r = probe_model(model, x, y)
    n = len(model.feature_layers())
    keys = ("cka", "cka_noise", "cka_noise_self", "recoverability", "recoverability_noise",
            "recoverability_noise_self", "survival", "dead", "sq_channel_mean", "channel_var", "grad_norm")
    assert all(len(r[k]) == n for k in keys) and len(r["layers"]) == n
    assert all(0 <= v <= 1 for k in ("cka", "cka_noise", "cka_noise_self", "survival", "dead") for v in r[k])
    assert r["cka"][0] > 0.9 and r["recoverability"][0] > 0.9  # first conv keeps the digit
    # the floor: features of noise carry nothing of the digits
    assert max(r["recoverability_noise"]) < 0.05 and r["cka_noise"][0] < 0.3
    assert r["recoverability_noise_self"][0] > 0.5  # but the first layer keeps its own noise input
    assert all(g > 0 for g in r["grad_norm"])
    assert 0.3 < r["survival"][5] < 0.7  # ReLU after BN: about half survive
    json.dumps(r)  # JSON-able as is
    lean = probe_model(model, x, noise=False, grad=False)
    assert "cka_noise" not in lean and "grad_norm" not in lean
    assert lean["cka"] == pytest.approx(r["cka"])


def test_noise_floor_definitions_on_a_layer_that_is_the_input(digits):
    """Features = input pins the keys down: the floor compares the input with the features of
    noise (unrelated: low), the "self" keys compare the noise with its own features (equal)."""

    class Identity(nn.Module):
        def __init__(self):
            super().__init__()
            self.keep, self.head = nn.Identity(), nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.keep(x).flatten(1))

        def feature_layers(self):
            return [("keep", self.keep)]

    r = probe_model(Identity(), *digits)
    assert r["cka"][0] == pytest.approx(1) and r["cka_noise_self"][0] == pytest.approx(1)
    assert r["cka_noise"][0] < 0.2
    assert r["recoverability"][0] > 0.99 and r["recoverability_noise_self"][0] > 0.99
    assert abs(r["recoverability_noise"][0]) < 0.05


def test_residual_keeps_the_input_longer_than_plain_at_depth_56(digits):
    x, y = digits
    plain = probe_model(small("plain56"), x, y, grad=False, noise=False)
    resnet = probe_model(small("resnet56"), x, y, grad=False, noise=False)
    assert resnet["cka"][-1] > plain["cka"][-1] + 0.05
    assert resnet["recoverability"][len(resnet["layers"]) // 2] > plain["recoverability"][len(plain["layers"]) // 2]


def test_batch_statistics_mode_normalises_with_the_batch(digits):
    x = digits[0] + 3.0  # far from BN's initial running mean 0

    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, h):
            return self.bn(self.conv(h)).mean(dim=(2, 3))

        def feature_layers(self):
            return [("bn", self.bn)]

    model = ConvBN()
    batch = probe_model(model, x, grad=False, noise=False)
    assert batch["sq_channel_mean"][0] < 1e-10 and batch["channel_var"][0] == pytest.approx(1, abs=1e-3)
    running = probe_model(model, x, grad=False, noise=False, bn_stats="running")
    assert running["sq_channel_mean"][0] > 1e-3


def _snapshot(model: nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["modes"] == b["modes"]
    assert a["requires_grad"] == b["requires_grad"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
        assert (a["grads"][k] is None) == (b["grads"][k] is None), k
        if a["grads"][k] is not None:
            assert torch.equal(a["grads"][k], b["grads"][k]), k
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), k


@pytest.mark.parametrize("bn_stats", ["batch", "running"])
def test_probe_leaves_the_model_exactly_as_it_was(digits, bn_stats):
    x, y = digits[0][:64], digits[1][:64]
    model = small("resnet20")
    model.train()
    model.body[1].eval()  # mixed modes must come back as they were
    params = list(model.parameters())
    for i, p in enumerate(params):
        if i % 3 == 0:
            p.grad = torch.randn_like(p)
        if i % 4 == 1:
            p.requires_grad_(False)
    with torch.no_grad():
        model(x[:32] + 1)  # non-trivial running stats
    before = _snapshot(model)
    probe_model(model, x, y, bn_stats=bn_stats)
    _assert_same(before, _snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())


def test_model_is_restored_when_the_probe_fails_midway(digits):
    x = digits[0][:64]
    model = small("plain20")
    before = _snapshot(model)
    bad_labels = torch.full((len(x),), 99)  # cross-entropy fails after the forward pass
    with pytest.raises((IndexError, RuntimeError)):
        probe_model(model, x, bad_labels)
    _assert_same(before, _snapshot(model))
    assert all(not m._forward_hooks for m in model.modules())


def test_frozen_model_still_gets_feature_gradients(digits):
    x, y = digits
    model = small("plain8").requires_grad_(False)
    r = probe_model(model, x, y, noise=False)
    assert all(g > 0 for g in r["grad_norm"])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"x": torch.zeros(3, 1, 8, 8)}, "at least 4"),
    ({"y": torch.zeros(5, dtype=torch.long)}, "shape"),
    ({"max_features": 0}, "max_features"),
    ({"ridge": -1.0}, "ridge"),
    ({"bn_stats": "frozen"}, "bn_stats"),
])
def test_probe_model_rejects_bad_arguments(digits, kwargs, match):
    args = {"x": digits[0][:16], "y": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        probe_model(small("plain8"), args.pop("x"), args.pop("y"), **args)


def test_crossing_layer_definition():
    r = {"cka": [0.9, 0.5, 0.2, 0.1], "cka_noise": [0.1, 0.1, 0.19, 0.15],
         "recoverability": [0.8, 0.3, 0.01, 0.0], "recoverability_noise": [-0.01] * 4}
    assert crossing_layer(r) == 2  # 0.2 <= 0.19 + 0.02
    assert crossing_layer(r, margin=0.0) == 3
    assert crossing_layer(r, measure="recoverability") == 2
    assert crossing_layer({"cka": [0.9, 0.8], "cka_noise": [0.1, 0.1]}) is None
    with pytest.raises(ValueError, match="noise=True"):
        crossing_layer({"cka": [0.5]})
    with pytest.raises(ValueError, match="measure"):
        crossing_layer(r, measure="dists")


def test_probe_summary_is_small_and_json_able(digits):
    x, y = digits[0][:128], digits[1][:128]
    model = small("pnnh20")
    s = probe_summary(model, x, y)
    full = probe_model(model, x, y, grad=False)
    assert json.loads(json.dumps(s)) == s
    assert s["layers"] == len(full["layers"])
    assert s["final_cka"] == pytest.approx(full["cka"][-1])
    assert s["crossing_layer"] == crossing_layer(full)
    assert s["crossing_layer_recoverability"] == crossing_layer(full, measure="recoverability")
    assert s["mean_survival"] == pytest.approx(sum(full["survival"]) / len(full["survival"]))


# --- plots -----------------------------------------------------------------------------------

def test_plot_probe_writes_pngs(digits, tmp_path):
    x, y = digits[0][:64], digits[1][:64]
    results = {name: probe_model(small(name), x, y) for name in ("plain8", "resnet8")}
    paths = plot_probe(results, tmp_path / "plots", title="digits")
    assert sorted(p.name for p in paths) == ["grad_norm.png", "signal.png", "similarity.png", "survival.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least one"):
        plot_probe({}, tmp_path)


# --- DISTS -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Randomly initialised VGG16 weights in torchvision's layout (tests the code path only)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    state = {f"features.{k}": v for k, v in DISTS().features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored, as in a full torchvision file
    torch.save(state, path)
    return path


def test_dists_is_zero_for_equal_images_positive_and_symmetric(vgg_file):
    dists = DISTS.from_files(vgg_file)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    assert dists(a, a).abs().max() < 1e-5
    d = dists(a, b)
    assert d.shape == (3,) and bool((d > 0.01).all())
    assert torch.allclose(d, dists(b, a), atol=1e-6)
    assert float(dists(a, a * 0.9 + b * 0.1).mean()) < float(d.mean())


def test_dists_reads_the_dists_repository_layout_and_alpha_beta(vgg_file, tmp_path):
    state = torch.load(vgg_file, weights_only=True)
    stage_state = {}
    for key, value in state.items():
        if key.startswith("features."):
            index, name = int(key.split(".")[1]), key.split(".")[2]
            stage = max(s for s, off in enumerate(_STAGE_OFFSETS) if off <= index)
            stage_state[f"stage{stage + 1}.{index - _STAGE_OFFSETS[stage]}.{name}"] = value
    alpha = torch.rand(1, 1475, 1, 1)
    beta = torch.rand(1, 1475, 1, 1)
    torch.save({**stage_state, "alpha": alpha, "beta": beta}, tmp_path / "dists.pt")
    from_repo = DISTS.from_files(tmp_path / "dists.pt")
    torch.save({"alpha": alpha, "beta": beta}, tmp_path / "ab.pt")
    separate = DISTS.from_files(vgg_file, tmp_path / "ab.pt")
    assert float(from_repo.alpha.sum() + from_repo.beta.sum()) == pytest.approx(1.0)
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    learned = from_repo(a, b)
    assert torch.allclose(learned, separate(a, b), atol=1e-6)
    assert not torch.allclose(learned, DISTS.from_files(vgg_file)(a, b), atol=1e-4)


def test_dists_rejects_bad_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        DISTS.from_files(tmp_path / "junk.pt")
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no VGG16 weights"):
        DISTS.from_files(tmp_path / "other.pt")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match="not a complete VGG16"):
        DISTS.from_files(tmp_path / "part.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        DISTS.from_files(tmp_path / "missing.pt")


def test_probe_with_dists(vgg_file, digits):
    x, y = digits
    r = probe_model(small("plain8", width=4), x[:32], y[:32], dists=DISTS.from_files(vgg_file),
                    dists_examples=8, grad=False)
    assert len(r["dists"]) == len(r["layers"]) == len(r["dists_noise"])
    assert all(isinstance(d, float) and math.isfinite(d) and d >= -1e-6 for d in r["dists"])
    img = gray_image(x[:2], (8, 8))
    assert img.shape == (2, 3, 8, 8) and float(img.min()) == 0.0 and float(img.max()) == 1.0


# --- CLI -------------------------------------------------------------------------------------

def test_cli_writes_probe_json_plots_and_table(tmp_path, capsys, vgg_file):
    out = tmp_path / "probe"
    rc = main(["probe", "--models", "plain8,resnet8", "--data", "digits", "--out", str(out),
               "--width", "4", "--batch-size", "64", "--dists-weights", str(vgg_file)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "plain8" in text and "resnet8" in text and "noise floor" in text and "crossing" in text
    payload = json.loads((out / "probe.json").read_text())
    assert set(payload) >= {"models", "data", "command", "versions"}
    assert list(payload["models"]) == ["plain8", "resnet8"]
    plain = payload["models"]["plain8"]
    assert len(plain["cka"]) == len(plain["layers"]) == len(plain["dists"]) == 7
    assert payload["data"]["name"] == "digits" and payload["data"]["examples"] == 64
    assert payload["command"].startswith("pnnh probe --models plain8,resnet8")
    for name in ("similarity.png", "survival.png", "signal.png", "grad_norm.png", "summary.csv"):
        assert (out / name).is_file()


def test_cli_loads_a_trained_checkpoint(tmp_path, digits):
    from pnnh.train.trainer import train

    run = tmp_path / "run"
    train({"model": "plain8", "data": "digits", "epochs": 1, "max_steps": 2, "batch_size": 64,
           "model_kwargs": {"width": 4}, "out": str(run)}, progress=False)
    out = tmp_path / "probe"
    assert main(["probe", "--models", "plain8", "--checkpoint", str(run), "--out", str(out),
                 "--batch-size", "64"]) == 0
    payload = json.loads((out / "probe.json").read_text())
    assert payload["data"]["name"] == "digits"  # taken from the run's config.yaml
    trained = payload["models"]["plain8"]
    assert trained["checkpoint"] == str(run / "model.safetensors")  # pnnh.load's rule: the best epoch
    assert main(["probe", "--models", "plain8", "--data", "digits", "--width", "4", "--out",
                 str(tmp_path / "init"), "--batch-size", "64"]) == 0
    init = json.loads((tmp_path / "init" / "probe.json").read_text())["models"]["plain8"]
    assert trained["grad_norm"] != pytest.approx(init["grad_norm"])


def test_cli_rejects_bad_input_without_touching_earlier_results(tmp_path, capsys):
    out = tmp_path / "probe"
    out.mkdir()
    (out / "probe.json").write_text('{"kept": true}')
    base = ["probe", "--data", "digits", "--out", str(out)]
    cases = [
        (["--models", "plain8,resnet9"], "resnet9"),
        (["--models", "plain8", "--batch-size", "2"], "batch-size"),
        (["--models", "plain8,resnet8", "--checkpoint", str(tmp_path)], "one run directory per model"),
        (["--models", "plain8", "--checkpoint", str(tmp_path / "nope")], "does not exist"),
        (["--models", "plain8", "--dists-weights", str(tmp_path / "vgg.pth")], "vgg.pth"),
        (["--models", "plain8", "--data", "imagenet-xl"], "imagenet-xl"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert json.loads((out / "probe.json").read_text()) == {"kept": True}


def test_cli_checkpoint_must_match_the_model_name(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "resnet8", "data": "digits",
                                                      "model_kwargs": {"width": 4}}))
    torch.save({"model": small("resnet8", width=4).state_dict()}, run / "last.pt")
    assert main(["probe", "--models", "plain8", "--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "'resnet8'" in capsys.readouterr().err
