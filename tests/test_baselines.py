"""The alternatives to residual learning (the baselines): each method's defining property, the zoo's
forward/backward checks on every new name, and that each method trains on digits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pnnh
from pnnh.data import TensorLoader, load_dataset
from pnnh.models.baselines import (CIFAR_BASELINES, RESIDUAL_BASELINES, DiracConv2d, FixedRandomLift, RepVGGBlock,
                                   ScaledResidualBlock, fixup_scale)
from pnnh.models.init import apply_init, delta_orthogonal_, q_preserving_gain
from pnnh.models.cnn import CIFAR_DEPTHS
from pnnh.models.tat import (leaky_relu_cmap, leaky_relu_scale, monte_carlo_cmap, network_cmap,
                             tat_leaky_relu_slope)

NEW_NAMES = [n for base in CIFAR_BASELINES for n in [base] + [f"{base}{d}" for d in CIFAR_DEPTHS]] + ["hourglass_mlp"]


def small_kwargs(name: str) -> dict:
    return {"width": 16, "depth": 6} if "mlp" in name else {"width": 4}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", img_size=16)


@pytest.fixture(scope="module")
def digit_batch(digits):
    loader = TensorLoader(digits.train_x, digits.train_y, 64, mean=digits.mean, std=digits.std, train=False)
    return next(iter(loader))[0]


def block_io(model: nn.Module, x: torch.Tensor, kind: type[nn.Module]) -> list[tuple[nn.Module, torch.Tensor, ...]]:
    """(block, input, output) of every ``kind`` module in one forward pass of ``x``."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((mod, i[0].detach().clone(), o.detach().clone())))
             for m in model.modules() if isinstance(m, kind)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def is_delta(w: torch.Tensor) -> bool:
    """Every tap but the kernel's centre is exactly zero."""
    off = w.detach().clone()
    off[:, :, w.shape[2] // 2, w.shape[3] // 2] = 0
    return bool(off.abs().sum() == 0)


# ----------------------------------------------------------------------------- the zoo's checks

def test_every_name_is_registered_with_its_arch():
    assert set(NEW_NAMES) <= set(pnnh.list_models())
    for name in ("skipinit_resnet20", "tat_plain56", "repvgg110", "hourglass_mlp"):
        model = pnnh.create_model(name, **small_kwargs(name))
        assert model.arch == ("mlp" if "mlp" in name else "cnn")


@pytest.mark.parametrize("name", NEW_NAMES)
@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_forward_backward_every_new_model(name, in_chans, size):
    """As tests/test_models.py, except that gradient may need a few steps to reach a parameter:
    SkipInit/ReZero scalars, Fixup's zero last conv and zero head block it at step 0 by design."""
    torch.manual_seed(0)
    model = pnnh.create_model(name, num_classes=7, in_chans=in_chans, img_size=size, **small_kwargs(name))
    x, y = torch.randn(3, in_chans, size, size), torch.tensor([0, 3, 6])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reached = set()
    for _ in range(3):
        out = model(x)
        assert out.shape == (3, 7) and torch.isfinite(out).all()
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        reached |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    missing = [n for n, _ in model.named_parameters() if n not in reached]
    assert not missing, f"{name}: no gradient reaches {missing[:5]} in 3 steps"


@pytest.mark.parametrize("base", list(CIFAR_BASELINES) + ["hourglass_mlp"])
def test_shortcuts_and_feature_layers(base):
    name = base if base == "hourglass_mlp" else f"{base}20"
    model = pnnh.create_model(name, in_chans=3, img_size=32, **small_kwargs(name))
    found = pnnh.find_shortcuts(model, torch.randn(2, 3, 32, 32))
    # RepVGG's training-time sum adds BN(x): the BN is a weight layer, so it is no shortcut.
    assert bool(found) == (base in RESIDUAL_BASELINES), found
    depth = small_kwargs(name).get("depth", 20)
    assert len(model.feature_layers()) == depth - 1  # one per weight layer, the head excluded


@pytest.mark.parametrize("base", list(CIFAR_BASELINES))
def test_invalid_depth_and_keyword(base):
    with pytest.raises(ValueError, match=r"depth=21 .*6n\+2"):
        pnnh.create_model(base, depth=21)
    with pytest.raises(TypeError, match="coder_init"):
        pnnh.create_model(f"{base}20", coder_init="copy")


# ----------------------------------------------------------------------------- SkipInit, ReZero, Fixup

@pytest.mark.parametrize("name,act", [("skipinit_resnet20", torch.relu), ("rezero_resnet20", lambda t: t),
                                      ("fixup_resnet20", torch.relu)])
def test_residual_blocks_are_the_identity_path_at_init(name, act, digit_batch):
    """SkipInit: relu(shortcut(x)); Fixup: the same (last conv zero); ReZero: shortcut(x).
    Where the shape is kept the shortcut is the identity, so the block returns its input."""
    torch.manual_seed(0)
    model = pnnh.create_model(name, in_chans=1, img_size=16, width=8)
    io = block_io(model, digit_batch, ScaledResidualBlock)
    assert len(io) == 9
    identity_blocks = 0
    for block, x, out in io:
        with torch.no_grad():
            assert torch.equal(out, act(block.shortcut(x)))
        if isinstance(block.shortcut, nn.Identity):
            identity_blocks += 1
            assert torch.equal(out, x)
    assert identity_blocks == 7
    # The property is not vacuous: once the branch scale moves, the blocks stop being identities.
    for block, _, _ in io:
        scale = block.gain.value if name != "fixup_resnet20" else block.branch[1].conv.weight
        with torch.no_grad():
            scale.fill_(0.5)
    moved = block_io(model, digit_batch, ScaledResidualBlock)
    assert not any(torch.equal(out, o) for (_, _, out), (_, _, o) in zip(io, moved))


def test_fixup_scale_and_init():
    assert fixup_scale(27, 2) == pytest.approx(27 ** -0.5)
    assert fixup_scale(16, 3) == pytest.approx(0.5)  # bottleneck branches: m = 3 -> L^(-1/4)
    with pytest.raises(ValueError, match="m >= 2"):
        fixup_scale(9, 1)
    torch.manual_seed(0)
    stds = {}
    for depth in (20, 110):
        model = pnnh.create_model(f"fixup_resnet{depth}", width=16)
        blocks = [m for m in model.body if isinstance(m, ScaledResidualBlock)]
        assert all(b.branch[1].conv.weight.abs().sum() == 0 for b in blocks)  # last conv of each branch
        assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
        # First conv of each branch: He std sqrt(2 / fan_in) times L^(-1/2), L = 3n branches.
        w = torch.cat([b.branch[0].conv.weight.flatten() for b in blocks if b.branch[0].conv.in_channels == 64])
        expected = math.sqrt(2 / (64 * 9)) * len(blocks) ** -0.5
        assert w.std().item() == pytest.approx(expected, rel=0.03)
        stds[depth] = w.std().item()
    assert stds[110] / stds[20] == pytest.approx(math.sqrt(9 / 54), rel=0.03)


def test_fixup_scalars_are_named_for_their_own_learning_rate():
    model = pnnh.create_model("fixup_resnet20", width=4)
    scalars = [n for n, p in model.named_parameters() if p.numel() == 1]
    assert scalars and all("fixup_scalar" in n for n in scalars)
    assert len(scalars) == 9 * 5 + 2  # 4 biases + 1 multiplier per branch, stem bias, head bias
    assert all(p.numel() > 1 for n, p in model.named_parameters() if "fixup_scalar" not in n)


# ----------------------------------------------------------------------------- DiracNet

def test_dirac_conv_is_the_identity_with_beta_zero():
    torch.manual_seed(0)
    model = pnnh.create_model("dirac20", in_chans=1, width=8)
    assert pnnh.find_shortcuts(model, torch.randn(2, 1, 28, 28)) == []
    convs = [m for m in model.modules() if isinstance(m, DiracConv2d)]
    assert len(convs) == 18
    for conv in convs:
        w = conv.combined_weight().detach()
        assert not torch.equal(w, conv.dirac)  # beta starts small but not zero
        with torch.no_grad():
            conv.beta.zero_()
        if conv.stride == 1 and conv.weight.shape[0] == conv.weight.shape[1]:
            xc = torch.randn(4, conv.weight.shape[1], 10, 10)
            torch.testing.assert_close(conv(xc), xc, rtol=0, atol=1e-6)
    first = convs[0]
    with torch.no_grad():
        first.alpha.zero_()
        first.beta.fill_(1.0)
    norms = first.combined_weight().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # W normalised per output filter


# ----------------------------------------------------------------------------- TAT

@pytest.mark.parametrize("c,alpha", [(0.0, 0.0), (0.3, 0.2), (-0.5, -0.4), (0.8, 0.7)])
def test_leaky_relu_cmap_matches_bivariate_normal_sampling(c, alpha):
    """The closed form against E[phi(u) phi(v)] for (u, v) standard normal with correlation c."""
    g = torch.Generator().manual_seed(0)
    u, e = torch.randn(2, 2_000_000, generator=g, dtype=torch.float64)
    v = c * u + math.sqrt(1 - c * c) * e
    phi = lambda t: leaky_relu_scale(alpha) * F.leaky_relu(t, alpha)
    assert (phi(u) ** 2).mean().item() == pytest.approx(1.0, abs=3e-3)  # q map = identity
    assert (phi(u) * phi(v)).mean().item() == pytest.approx(leaky_relu_cmap(c, alpha), abs=3e-3)


@pytest.mark.parametrize("layers", [7, 19, 55, 109])
@pytest.mark.parametrize("eta", [0.5, 0.9])
def test_tat_slope_reaches_the_target(layers, eta):
    alpha = tat_leaky_relu_slope(layers, eta)
    assert -1 <= alpha < 1
    assert abs(network_cmap(0.0, alpha, layers) - eta) < 1e-6


def test_tat_slope_is_monotone_in_depth_and_eta():
    slopes = [tat_leaky_relu_slope(d - 1) for d in CIFAR_DEPTHS]
    assert all(a < b for a, b in zip(slopes, slopes[1:])), slopes  # deeper -> closer to linear
    assert tat_leaky_relu_slope(19, 0.5) > tat_leaky_relu_slope(19, 0.9)  # lower target -> more linear
    with pytest.raises(ValueError, match=r"eta=0.9 is out of reach for 3 nonlinear"):
        tat_leaky_relu_slope(3, 0.9)
    with pytest.raises(ValueError, match="eta=1.2"):
        tat_leaky_relu_slope(19, 1.2)


@pytest.mark.parametrize("layers,c0", [(7, 0.0), (5, 0.5)])
def test_cmap_matches_a_wide_random_net(layers, c0):
    alpha = tat_leaky_relu_slope(layers)
    predicted = network_cmap(c0, alpha, layers)
    measured = monte_carlo_cmap(alpha, layers, c0=c0, width=1024, pairs=8, generator=torch.Generator().manual_seed(0))
    assert measured == pytest.approx(predicted, abs=0.03)
    assert abs(predicted - c0) > 0.1  # the map is far from the identity: the comparison has teeth


def test_tat_plain_model_uses_the_slope_and_q_preserving_init():
    model = pnnh.create_model("tat_plain32", width=8, eta=0.8)
    assert model.tat_slope == pytest.approx(tat_leaky_relu_slope(31, 0.8))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for layer in model.body:
        w = layer[0].weight
        centre = w[:, :, 1, 1]
        assert is_delta(w)
        gain = q_preserving_gain(w.shape[1], w.shape[0])
        small = centre @ centre.T if w.shape[0] <= w.shape[1] else centre.T @ centre
        torch.testing.assert_close(small, gain ** 2 * torch.eye(min(w.shape[:2])), atol=1e-5, rtol=0)
        assert layer[1].alpha == model.tat_slope


# ----------------------------------------------------------------------------- RepVGG

def test_repvgg_folds_to_an_equivalent_plain_3x3_chain(digit_batch):
    torch.manual_seed(0)
    model = pnnh.create_model("repvgg20", in_chans=1, img_size=16, width=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.2, 0.2)
                m.momentum = None  # running statistics = the average over the forwards below
        for _ in range(3):
            model(digit_batch)  # train mode: running statistics away from (0, 1)
    assert sum(isinstance(m, RepVGGBlock) and m.identity is not None for m in model.modules()) == 16
    model.eval()
    folded = model.fold()
    with torch.no_grad():
        diff = (folded(digit_batch) - model(digit_batch)).abs().max().item()
    assert diff < 1e-4
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.kernel_size == (3, 3) for c in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert pnnh.find_shortcuts(folded, digit_batch[:2]) == []
    assert len(folded.feature_layers()) == 19


# ----------------------------------------------------------------------------- initialisation

@pytest.mark.parametrize("shape,gain", [((8, 16, 3, 3), 1.0), ((16, 16, 3, 3), math.sqrt(2)), ((32, 16, 3, 3), 1.0),
                                        ((8, 16, 1, 1), 2.0)])
def test_delta_orthogonal(shape, gain):
    w = delta_orthogonal_(torch.empty(shape), gain)
    k = shape[-1] // 2
    centre = w[:, :, k, k]
    assert is_delta(w)
    out, inp = shape[:2]
    small = centre @ centre.T if out <= inp else centre.T @ centre
    torch.testing.assert_close(small, gain ** 2 * torch.eye(min(out, inp)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="odd kernel"):
        delta_orthogonal_(torch.empty(4, 4, 2, 2))


def test_delta_orthogonal_linear_chain_preserves_every_pixel_norm():
    """Why it helps: 20 delta-orthogonal 3x3 convolutions (gain 1) keep each pixel's norm exactly."""
    torch.manual_seed(0)
    convs = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1, bias=False) for _ in range(20)])
    apply_init(convs, "delta_orthogonal", gain=1.0)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(convs(x).norm(dim=1), x.norm(dim=1), rtol=1e-4, atol=1e-5)


def test_apply_init_on_plain_cnn_and_mlp():
    torch.manual_seed(0)
    cnn = apply_init(pnnh.create_model("plain56", width=4), "delta_orthogonal")
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55
    assert all(is_delta(conv.weight) for conv in convs)
    mlp = apply_init(pnnh.create_model("plain_mlp", width=32, depth=6), "orthogonal")
    for conv in (m for m in mlp.modules() if isinstance(m, nn.Conv2d)):
        w = conv.weight.flatten(1)
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(small, 2 * torch.eye(min(w.shape)), atol=1e-5, rtol=0)
    pnnh_net = pnnh.create_model("pnnh20", width=8)
    coder = pnnh_net.body[1].coder.weight.detach().clone()
    apply_init(pnnh_net, "delta_orthogonal")
    assert torch.equal(pnnh_net.body[1].coder.weight, coder)  # coders keep their coder_init
    assert is_delta(pnnh_net.body[1].weight)
    with pytest.raises(ValueError, match="init='xavier' is not valid.*delta_orthogonal"):
        apply_init(cnn, "xavier")


# ----------------------------------------------------------------------------- hourglass MLP

def test_hourglass_lift_is_fixed_and_blocks_are_residual(digits):
    torch.manual_seed(0)
    model = pnnh.create_model("hourglass_mlp", in_chans=1, img_size=16, width=64, depth=8)
    lift = model.stem[1]
    assert isinstance(lift, FixedRandomLift)
    assert not any(t is lift.weight for t in model.parameters()) and "stem.1.weight" in model.state_dict()
    before = lift.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = digits.train_x[:32].float() / 255
    F.cross_entropy(model(x), digits.train_y[:32]).backward()
    opt.step()
    assert torch.equal(lift.weight, before)
    blocks = [m for m in model.body if isinstance(m, ScaledResidualBlock)]
    assert len(blocks) == 3
    for block in blocks:
        down, up = block.branch[0][1], block.branch[1]
        assert down.weight.shape[:2] == (16, 64) and up.weight.shape[:2] == (64, 16)  # wide -> narrow -> wide
        with torch.no_grad():
            up.weight.zero_()
            up.bias.zero_()
        z = torch.randn(4, 64, 1, 1)
        assert torch.equal(block(z), z)  # a zero branch leaves the skip path: residual


# ----------------------------------------------------------------------------- each trains

# Learning rates: the normalization-free nets (SkipInit, ReZero, Fixup, TAT) need smaller ones.
TRAIN = [("skipinit_resnet20", {}, None, 0.1), ("rezero_resnet20", {}, None, 0.03), ("fixup_resnet20", {}, None, 0.1),
         ("dirac20", {}, None, 0.05), ("tat_plain20", {}, None, 0.01), ("repvgg20", {}, None, 0.05),
         ("hourglass_mlp", {"width": 64, "depth": 6}, None, 0.05), ("plain20", {}, "delta_orthogonal", 0.05),
         ("plain_mlp", {"width": 64, "depth": 6}, "orthogonal", 0.05)]


@pytest.mark.parametrize("name,kwargs,init,lr", TRAIN, ids=[f"{t[0]}-{t[2]}" for t in TRAIN])
def test_each_method_trains_on_digits(name, kwargs, init, lr, digits):
    torch.manual_seed(0)
    model = pnnh.create_model(name, num_classes=digits.num_classes, in_chans=1, img_size=16, **({"width": 8} | kwargs))
    if init:
        apply_init(model, init)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = TensorLoader(digits.train_x, digits.train_y, 64, mean=digits.mean, std=digits.std, train=True)
    losses: list[float] = []
    epoch = 0
    while len(losses) < 50:
        loader.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == 50:
                break
    assert all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    # Chance level holds the loss at ln(10) = 2.30 +- 0.02 per batch: 0.05 is a real decrease.
    assert last < first - 0.05, (first, last)
