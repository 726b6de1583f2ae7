"""pnnh.fold: the folded (inference) form computes the trained network's function."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.data import load_dataset
from pnnh.models.fold import ChannelFloor, fold, fold_conv_bn
from pnnh.models.layers import Coder, PartialBatchNorm, PartialReLU, PNNHConv

IMG = 16


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Real images: sklearn digits at 16x16, normalised (1 channel)."""
    splits = load_dataset("digits", img_size=IMG)
    x = splits.train_x[:96].float() / 255
    return (x - splits.mean[0]) / splits.std[0]


def trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as training would:
    random gamma/beta, then train-mode forwards on real images (cumulative averages)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    model.train()
    with torch.no_grad():
        for batch in x.split(32):
            model(batch)
    return model.eval()


def assert_folds(name: str, x: torch.Tensor, **kwargs) -> tuple[nn.Module, nn.Module]:
    model = trained_like(pnnh.create_model(name, in_chans=1, img_size=x.shape[-1], **kwargs), x)
    before = copy.deepcopy(model.state_dict())
    folded = fold(model)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert expected.abs().max() > 0.05, "logits too small for the comparison to mean anything"
    assert (expected - got).abs().max().item() < 1e-4
    assert not folded.training
    assert not any(isinstance(m, (nn.BatchNorm2d, PartialBatchNorm, PNNHConv, Coder)) for m in folded.modules())
    after = model.state_dict()  # the model is left untouched
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return model, folded


@pytest.mark.parametrize("name", ["plain8", "resnet8", "pnnh8", "plain_mlp", "residual_mlp", "pnnh_mlp"])
def test_fold_matches_every_kind_and_architecture(name, digits):
    assert_folds(name, digits, width=8)


@pytest.mark.parametrize("name", ["resnet18", "pnnh18"])
def test_fold_matches_imagenet_layouts_with_projection_shortcuts_and_maxpool_stem(name, digits):
    x = nn.functional.interpolate(digits[:48], size=72)  # > 64 px: 7x7 stride-2 stem + max-pool
    assert_folds(name, x, width=4)


# Each differs from the default (the default layer is folded by the tests above).
PNNH_OPTIONS = [
    {"coder_sharing": "none"},
    {"coder_init": "copy"},
    {"coder_init": "signed", "coder_scale": 0.5},
    {"coder_init": "kaiming"},
    {"coder_init": "orthogonal"},
    {"coder_form": "looks-linear"},
    {"coder_kernel": 3},
    {"coder_fusion": "sum"},
    {"coder_norm": "bn"},
    {"coder_norm": "stage_end"},
    {"coder_ratio": 0.25},
]


@pytest.mark.parametrize("options", PNNH_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fold_matches_every_pnnh_design_option(options, digits):
    model, folded = assert_folds("pnnh", digits, depth=14, width=8, **options)
    for layer, folded_layer in zip(model.body, folded.body, strict=True):
        conv, act = folded_layer  # a straight chain of conv(+bias) + the layer's activation
        assert isinstance(conv, nn.Conv2d) and conv.bias is not None
        expected = ChannelFloor if isinstance(layer.act, PartialReLU) else type(layer.act)
        assert type(act) is expected and act is not layer.act


def test_channel_floor_equals_partial_relu():
    """The folded form of the partial ReLU gives the same numbers, also for inf, NaN and -0.0
    (equal as numbers: a learner channel's -0.0 may come out as +0.0)."""
    y = torch.randn(4, 6, 5, 5)
    y[0, :, 0, 0] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, float("-inf"), float("nan")])
    for layout in (torch.contiguous_format, torch.channels_last):
        y = y.contiguous(memory_format=layout)
        expected, got = PartialReLU(2)(y.clone()), ChannelFloor(2, 6)(y.clone())
        nan = expected.isnan()
        assert torch.equal(nan, got.isnan()) and torch.equal(expected[~nan], got[~nan])
        assert torch.allclose(got[:, :2], y[:, :2], rtol=0, atol=0, equal_nan=True)  # coder channels pass
        assert got.is_contiguous(memory_format=layout)


def test_fold_dirac_net_merges_dirac_kernel_and_batchnorm(digits):
    from pnnh.models.baselines import DiracConv2d

    model, folded = assert_folds("dirac8", digits, width=8)
    assert any(isinstance(m, DiracConv2d) for m in model.modules())
    assert not any(isinstance(m, DiracConv2d) for m in folded.modules())


def test_folded_pnnh56_is_a_plain_chain_with_fewer_ops(digits):
    model = trained_like(pnnh.create_model("pnnh56", in_chans=1, img_size=IMG), digits[:64])
    folded = fold(model)
    assert pnnh.find_shortcuts(folded) == []
    # One conv per weight layer, no norm: 55 convolutions + the head.
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55
    with torch.no_grad():
        assert (model(digits) - folded(digits)).abs().max().item() < 1e-4


def test_fold_keeps_residual_blocks_and_their_feature_layers(digits):
    model = trained_like(pnnh.create_model("resnet8", in_chans=1, img_size=IMG, width=8), digits)
    folded = fold(model)
    assert len(pnnh.find_shortcuts(folded)) == len(pnnh.find_shortcuts(model)) > 0
    assert [n for n, _ in folded.feature_layers()] == [n for n, _ in model.feature_layers()]


def test_fold_vit_is_an_eval_copy(digits):
    model = pnnh.create_model("pnnh_vit_tiny", in_chans=1, img_size=IMG, width=24, depth=2).train()
    folded = fold(model)
    assert folded is not model and model.training and not folded.training
    with torch.no_grad():
        assert torch.equal(model.eval()(digits), folded(digits))


def test_fold_conv_bn_by_hand():
    conv = nn.Conv2d(1, 2, 1, bias=True)
    norm = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([1.0, 0.5]))
        norm.running_mean.copy_(torch.tensor([3.0, -0.5]))
        norm.running_var.copy_(torch.tensor([4.0 - norm.eps, 1.0 - norm.eps]))
        norm.weight.copy_(torch.tensor([0.5, 2.0]))
        norm.bias.copy_(torch.tensor([1.0, 0.0]))
    w, b = fold_conv_bn(conv.weight, conv.bias, norm)
    # channel 0: 0.5 * (2x + 1 - 3) / 2 + 1 = 0.5x + 0.5; channel 1: 2 * (-x + 0.5 + 0.5) = -2x + 2
    assert torch.allclose(w.flatten(), torch.tensor([0.5, -2.0]))
    assert torch.allclose(b, torch.tensor([0.5, 2.0]))


def test_fold_refuses_batchnorm_without_running_stats():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold(model)
