"""The residual twin (models/twin.py) computes exactly what the default PNNH net computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.data import load_dataset
from pnnh.models.twin import load_pnnh_weights


@pytest.fixture(scope="module")
def digits():
    """Real images and labels: sklearn digits at 8x8, normalised (1 channel), in float64."""
    splits = load_dataset("digits", img_size=8)
    x = splits.train_x[:32].double() / 255
    return (x - splits.mean[0]) / splits.std[0], splits.train_y[:32]


def twins(depth: int, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = pnnh.create_model("pnnh", depth=depth, num_classes=10, in_chans=1, **kwargs).double()
    # give every BatchNorm non-trivial affine parameters, as training would
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    twin = pnnh.create_model("residual_twin", depth=depth, num_classes=10, in_chans=1, **kwargs).double()
    load_pnnh_weights(twin, net)
    return net, twin


@pytest.mark.parametrize("depth,kwargs", [(14, {}), (8, {"coder_init": "accumulate", "coder_scale": 0.5}),
                                          (8, {"coder_ratio": 0.25})])
def test_twin_matches_pnnh_outputs_and_gradients(digits, depth, kwargs):
    x, y = digits
    net, twin = twins(depth, **kwargs)
    assert not pnnh.find_shortcuts(net) and pnnh.find_shortcuts(twin)  # one chain, one residual net
    named = dict(twin.named_parameters())
    assert len(named) == sum(1 for n, p in net.named_parameters() if p.requires_grad)

    for model in (net, twin):  # train mode: batch statistics, and running statistics updated
        model.train()
        nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(twin(x), net(x), rtol=1e-10, atol=1e-10)
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(named[name.replace(".norm.bn.", ".bn.")].grad, p.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(twin.eval()(x), net.eval()(x), rtol=1e-10, atol=1e-10)  # running statistics


def test_twin_refuses_a_coder_that_is_not_its_projection():
    net = pnnh.create_model("pnnh20", num_classes=10, in_chans=1)
    twin = pnnh.create_model("residual_twin20", num_classes=10, in_chans=1)
    with torch.no_grad():
        net.body[3].coder.weight.add_(0.01)  # a coder that moved: no longer [I | D]
    with pytest.raises(ValueError, match=r"body\.\d+\.coder\.weight is not"):
        load_pnnh_weights(twin, net)
    with pytest.raises(ValueError, match="coder_norm='none'"):
        pnnh.create_model("residual_twin20", coder_norm="bn")
    with pytest.raises(ValueError, match="coder_init in"):
        pnnh.create_model("residual_twin20", coder_init="kaiming")
