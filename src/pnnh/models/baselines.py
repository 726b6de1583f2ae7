"""The other ways to train deep nets, as registered models of the same shapes as plain/resnet/pnnh.

CIFAR-style nets of depth 6n+2 (registered as ``NAME{D}`` for D in 8, 20, 32, 44, 56, 110, and
as ``NAME`` with ``depth=``), built from the same stage layout as :mod:`pnnh.models.cnn`:

- ``skipinit_resnet``: ResNet without BatchNorm, each branch times a scalar that starts at 0
  (De & Smith, "Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep
  Networks", NeurIPS 2020).
- ``rezero_resnet``: x + a F(x) with a = 0 at init, pre-activation branches, no normalization
  (Bachlechner et al., "ReZero is All You Need: Fast Convergence at Large Depth", UAI 2021).
- ``fixup_resnet``: no normalization; branch convolutions He-initialised and scaled by
  L^(-1/(2m-2)), the last one and the head zero-initialised, scalar biases and multipliers
  (Zhang, Dauphin, Ma, "Fixup Initialization: Residual Learning Without Normalization",
  ICLR 2019). Every Fixup scalar has ``fixup_scalar`` in its parameter name
  (``body.3.branch.0.fixup_scalar_bias_in.value``, ``pool.fixup_scalar_bias.value``, ...), so a
  trainer selects them with ``"fixup_scalar" in name`` to give them their own learning rate
  (the paper: 1/10 of the base rate).
- ``dirac``: plain conv-BN-ReLU chain whose convolutions are diag(a) I + diag(b) W/|W|
  (Zagoruyko & Komodakis, "DiracNets: Training Very Deep Neural Networks Without
  Skip-Connections", 2017). No shortcut: the identity lives inside the weight. ``ncrelu=True``
  (registered as ``dirac_ncrelu{D}``) is the paper's form: NCReLU -> Dirac conv -> BN.
- ``tat_plain``: plain chain of convolutions and tailored leaky ReLUs, no normalization,
  delta-orthogonal init (Zhang, Botev, Martens, "Deep Learning without Shortcuts: Shaping the
  Kernel with Tailored Rectifiers", ICLR 2022); the maths is in :mod:`pnnh.models.tat`.
- ``repvgg``: plain at inference; in training each layer sums 3x3 conv-BN, 1x1 conv-BN and an
  identity BN (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021).
  ``model.fold()`` returns the deploy net of single 3x3 convolutions. ``find_shortcuts`` finds
  none even in the training form: every summed branch, the identity one included, passes a
  BatchNorm, which is a weight layer (it has parameters), so no operand skips all weights.

and one MLP, ``hourglass_mlp``: wide-narrow-wide residual blocks after a fixed random lift
(Chen, Lee, Liao, Shiu, "Rethinking the shape convention of an MLP", 2025).

Every CNN and MLP also takes ``init=`` (he_normal, orthogonal, delta_orthogonal): see
:mod:`pnnh.models.init`.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnnh.models.cnn import CIFAR_DEPTHS, Conv, ConvNet, cifar_stages
from pnnh.models.fold import fold_conv_bn
from pnnh.models.init import delta_orthogonal_, q_preserving_gain
from pnnh.models.layers import ConvBNAct, FlattenToChannels, he_normal_
from pnnh.models.registry import register_model
from pnnh.models.tat import ScaledLeakyReLU, tat_leaky_relu_slope

def _conv(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, bias: bool = True,
          init: Callable[[torch.Tensor], torch.Tensor] = he_normal_) -> nn.Conv2d:
    """A convolution for nets without normalization: ``init`` weight, zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=bias)
    with torch.no_grad():
        init(conv.weight)
        if bias:
            conv.bias.zero_()
    return conv


# ----------------------------------------------------------------------------- residual blocks without BN

class Scale(nn.Module):
    """x * value, one learnable scalar."""

    def __init__(self, init: float):
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x):
        return x * self.value


class Shift(nn.Module):
    """x + value, one learnable scalar (Fixup's bias), zero at init."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.value


class ScaledResidualBlock(nn.Module):
    """``act(shortcut(x) + gain(second(first(x))))``: a residual block without normalization.

    ``first`` is the branch up to its first activation (a hidden representation), ``second``
    the rest. SkipInit, ReZero, Fixup and the hourglass MLP block differ only in these parts.
    """

    def __init__(self, first: nn.Module, second: nn.Module, shortcut: nn.Module, gain: nn.Module, act: nn.Module):
        super().__init__()
        self.branch = nn.Sequential(first, second)
        self.shortcut, self.gain, self.act = shortcut, gain, act

    def forward(self, x):
        return self.act(self.shortcut(x) + self.gain(self.branch(x)))

    def feature_layers(self, prefix: str) -> list[tuple[str, nn.Module]]:
        return [(f"{prefix}.branch.0", self.branch[0]), (prefix, self)]


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 projection (no BN) where the block changes shape."""
    return nn.Identity() if in_ch == out_ch and stride == 1 else _conv(in_ch, out_ch, 1, stride, bias=False)


def skipinit_block(convs: list[Conv]) -> ScaledResidualBlock:
    """relu(x + alpha conv(relu(conv(x)))), alpha = 0: the block is relu(shortcut(x)) at init."""
    (i, m, k, s), (_, o, k2, s2) = convs
    return ScaledResidualBlock(nn.Sequential(_conv(i, m, k, s), nn.ReLU(inplace=True)), _conv(m, o, k2, s2),
                               _shortcut(i, o, s * s2), Scale(0.0), nn.ReLU(inplace=True))


def rezero_block(convs: list[Conv]) -> ScaledResidualBlock:
    """x + a conv(relu(conv(relu(x)))), a = 0 (pre-activation: the stream is never rectified)."""
    (i, m, k, s), (_, o, k2, s2) = convs
    first = nn.Sequential(nn.ReLU(), _conv(i, m, k, s), nn.ReLU(inplace=True))  # not in place: x feeds the shortcut
    return ScaledResidualBlock(first, _conv(m, o, k2, s2), _shortcut(i, o, s * s2), Scale(0.0), nn.Identity())


def fixup_scale(num_branches: int, layers_per_branch: int = 2) -> float:
    """Fixup's factor L^(-1/(2m-2)) on the He init of a branch's layers (L branches of m layers)."""
    if num_branches < 1 or layers_per_branch < 2:
        raise ValueError(f"Fixup needs L >= 1 branches of m >= 2 layers, got L={num_branches}, m={layers_per_branch}")
    return num_branches ** (-1.0 / (2 * layers_per_branch - 2))


def fixup_block(convs: list[Conv], num_branches: int) -> ScaledResidualBlock:
    """relu(x + scale * conv2(relu(conv1(x + b1) + b2) + b3) + b4), conv2 = 0 at init."""
    (i, m, k, s), (_, o, k2, s2) = convs
    factor = fixup_scale(num_branches, len(convs))
    first = nn.Sequential(OrderedDict(
        fixup_scalar_bias_in=Shift(),
        conv=_conv(i, m, k, s, bias=False, init=lambda w: he_normal_(w).mul_(factor)),
        fixup_scalar_bias_mid=Shift(),
        act=nn.ReLU(inplace=True)))
    second = nn.Sequential(OrderedDict(
        fixup_scalar_bias_in=Shift(),
        conv=_conv(m, o, k2, s2, bias=False, init=nn.init.zeros_),
        fixup_scalar_scale=Scale(1.0),
        fixup_scalar_bias_out=Shift()))
    return ScaledResidualBlock(first, second, _shortcut(i, o, s * s2), nn.Identity(), nn.ReLU(inplace=True))


def _residual_net(block: Callable[[list[Conv]], nn.Module], stem: nn.Module, stages: list[list[list[Conv]]],
                  num_classes: int, in_chans: int, img_size: int) -> ConvNet:
    out_ch = stages[-1][-1][-1][1]
    body = [block(convs) for blocks in stages for convs in blocks]
    return ConvNet(stem, body, out_ch, num_classes, in_chans, img_size)


def skipinit_resnet(depth: int = 56, num_classes: int = 10, in_chans: int = 3, width: int = 16,
                    img_size: int = 32) -> ConvNet:
    """SkipInit ResNet (De & Smith 2020): basic blocks, no BatchNorm, branch scalar alpha = 0."""
    stem = nn.Sequential(_conv(in_chans, width), nn.ReLU(inplace=True))
    return _residual_net(skipinit_block, stem, cifar_stages(depth, width), num_classes, in_chans, img_size)


def rezero_resnet(depth: int = 56, num_classes: int = 10, in_chans: int = 3, width: int = 16,
                  img_size: int = 32) -> ConvNet:
    """ReZero ResNet (Bachlechner et al. 2020): x + a F(x), a = 0 at init, no normalization."""
    stem = nn.Sequential(_conv(in_chans, width), nn.ReLU(inplace=True))
    return _residual_net(rezero_block, stem, cifar_stages(depth, width), num_classes, in_chans, img_size)


def fixup_resnet(depth: int = 56, num_classes: int = 10, in_chans: int = 3, width: int = 16,
                 img_size: int = 32) -> ConvNet:
    """Fixup ResNet (Zhang, Dauphin, Ma 2019): no normalization, L = 3n branches scaled by
    L^(-1/2), zero-init last branch conv and head, scalar biases before every conv, activation
    and the head, a scalar multiplier per branch (parameter names contain ``fixup_scalar``)."""
    stages = cifar_stages(depth, width)
    num_branches = sum(len(blocks) for blocks in stages)
    stem = nn.Sequential(OrderedDict(conv=_conv(in_chans, width, bias=False), fixup_scalar_bias=Shift(),
                                     act=nn.ReLU(inplace=True)))
    net = _residual_net(lambda convs: fixup_block(convs, num_branches), stem, stages, num_classes, in_chans, img_size)
    net.pool = nn.Sequential(OrderedDict(avg=net.pool, fixup_scalar_bias=Shift()))
    nn.init.zeros_(net.head.weight)
    nn.init.zeros_(net.head.bias)
    return net


# ----------------------------------------------------------------------------- plain nets

class DiracConv2d(nn.Module):
    """Convolution with weight diag(alpha) I + diag(beta) W / |W| (Zagoruyko & Komodakis 2017).

    I is the Dirac (identity) kernel, onto the first min(in, out) channels; W is normalised per
    output filter. alpha starts at 1 and beta small, so the layer starts close to the identity;
    it is still ONE convolution, with no addition on the data.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, beta_init: float = 0.1,
                 ncrelu_input: bool = False):
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.weight = nn.Parameter(he_normal_(torch.empty(out_ch, in_ch, kernel, kernel)))
        self.alpha = nn.Parameter(torch.ones(out_ch))
        self.beta = nn.Parameter(torch.full((out_ch,), float(beta_init)))
        # Reading [relu(x), -relu(-x)] (NCReLU), I is [I | I], which sums the halves back to x.
        halves = 2 if ncrelu_input else 1
        eye = nn.init.dirac_(torch.empty(out_ch, in_ch // halves, kernel, kernel)).repeat(1, halves, 1, 1)
        self.register_buffer("dirac", eye, persistent=False)

    def combined_weight(self) -> torch.Tensor:
        """The convolution's actual kernel, diag(alpha) I + diag(beta) W / |W|."""
        direction = F.normalize(self.weight.flatten(1), dim=1).view_as(self.weight)
        return self.alpha.view(-1, 1, 1, 1) * self.dirac + self.beta.view(-1, 1, 1, 1) * direction

    def forward(self, x):
        return F.conv2d(x, self.combined_weight(), None, self.stride, self.padding)

    def fold(self) -> nn.Conv2d:
        """The same convolution as an ``nn.Conv2d`` holding the combined kernel (``pnnh.fold``
        then folds the BatchNorm after it)."""
        weight = self.combined_weight().detach()
        out_ch, in_ch, k, _ = weight.shape
        conv = nn.Conv2d(in_ch, out_ch, k, self.stride, self.padding, bias=False, device=weight.device,
                         dtype=weight.dtype)
        conv.weight.data.copy_(weight)
        return conv


class NCReLU(nn.Module):
    """[relu(x), -relu(-x)] on the channel axis (DiracNets' negative-concatenated ReLU): no
    information is lost, and a [I | I] kernel reads x back."""

    def forward(self, x):
        return torch.cat([F.relu(x), -F.relu(-x)], dim=1)


def dirac(depth: int = 56, num_classes: int = 10, in_chans: int = 3, width: int = 16, img_size: int = 32,
          beta_init: float = 0.1, ncrelu: bool = False) -> ConvNet:
    """DiracNet-style plain net (Zagoruyko & Komodakis 2017): Dirac conv -> BN -> ReLU chain.

    ``ncrelu=True`` is the form the paper trains: each layer is NCReLU -> Dirac conv -> BN, so
    the Dirac part of the kernel passes x itself, not relu(x) (the identity path skips the
    nonlinearity); the convolutions read 2x the channels, so they hold 2x the weights. A ReLU
    precedes the pooled head, as in the paper's net.
    """
    if ncrelu:
        layers = [nn.Sequential(NCReLU(), DiracConv2d(2 * i, o, k, s, beta_init, ncrelu_input=True), nn.BatchNorm2d(o))
                  for blocks in cifar_stages(depth, width) for convs in blocks for i, o, k, s in convs]
        layers.append(nn.ReLU())
    else:
        layers = [nn.Sequential(DiracConv2d(i, o, k, s, beta_init), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
                  for blocks in cifar_stages(depth, width) for convs in blocks for i, o, k, s in convs]
    return ConvNet(ConvBNAct(in_chans, width), layers, 4 * width, num_classes, in_chans, img_size)


def tat_plain(depth: int = 56, num_classes: int = 10, in_chans: int = 3, width: int = 16, img_size: int = 32,
              eta: float = 0.9) -> ConvNet:
    """TAT plain net (Zhang, Botev, Martens 2022): conv -> scaled leaky ReLU, no normalization,
    delta-orthogonal convolutions (an orthogonal 3x3 stem), each scaled by
    :func:`q_preserving_gain` so that with the q-preserving activation q = 1 throughout. The negative
    slope makes the C map of the depth - 1 nonlinear layers send 0 to ``eta``; it is stored
    as ``model.tat_slope``."""
    stages = cifar_stages(depth, width)
    alpha = tat_leaky_relu_slope(depth - 1, eta)

    # A delta-orthogonal stem would read one pixel of a 1-3 channel image: it mixes 3x3 patches instead.
    # (_conv runs init at once, so the lambdas see this iteration's i and o.)
    convs = [_conv(in_chans, width, init=lambda w: nn.init.orthogonal_(w, q_preserving_gain(9 * in_chans, width)))]
    convs += [_conv(i, o, k, s, init=lambda w: delta_orthogonal_(w, q_preserving_gain(i, o)))
              for blocks in stages for block in blocks for i, o, k, s in block]
    stem, *body = [nn.Sequential(conv, ScaledLeakyReLU(alpha)) for conv in convs]
    net = ConvNet(stem, body, 4 * width, num_classes, in_chans, img_size)
    net.tat_slope = alpha
    return net


class RepVGGBlock(nn.Module):
    """relu(BN(conv3x3 x) + BN(conv1x1 x) + BN(x)) (Ding et al. 2021); the identity BN only where
    the shape allows. :meth:`fold` turns the three branches into one 3x3 convolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv3 = ConvBNAct(in_ch, out_ch, 3, stride, act=False)
        self.conv1 = ConvBNAct(in_ch, out_ch, 1, stride, act=False)
        self.identity = nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv3(x) + self.conv1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    def fold(self) -> nn.Sequential:
        """Sequential(3x3 Conv2d with bias, ReLU) equal to this block in eval mode (running stats)."""
        conv = self.conv3[0]
        with torch.no_grad():
            weight, bias = fold_conv_bn(conv.weight, None, self.conv3[1])
            w1, b1 = fold_conv_bn(self.conv1[0].weight, None, self.conv1[1])
            weight, bias = weight + F.pad(w1, (1, 1, 1, 1)), bias + b1
            if self.identity is not None:
                eye = nn.init.dirac_(torch.empty_like(conv.weight))
                wi, bi = fold_conv_bn(eye, None, self.identity)
                weight, bias = weight + wi, bias + bi
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=True,
                           device=weight.device, dtype=weight.dtype)
        folded.weight.data.copy_(weight)
        folded.bias.data.copy_(bias)
        return nn.Sequential(folded, nn.ReLU(inplace=True))


class RepVGGNet(ConvNet):
    """A chain of :class:`RepVGGBlock` layers; :meth:`fold` gives the plain deploy net."""

    def fold(self) -> ConvNet:
        """The inference form (eval mode): stem and every block folded to one 3x3 conv + ReLU."""
        deploy = ConvNet(self.stem.fold(), [block.fold() for block in self.body], self.head.in_features,
                         self.head.out_features, self.in_chans, self.img_size)
        deploy.head = copy.deepcopy(self.head)
        return deploy.to(self.head.weight.device).eval()


def repvgg(depth: int = 56, num_classes: int = 10, in_chans: int = 3, width: int = 16,
           img_size: int = 32) -> RepVGGNet:
    """RepVGG (Ding et al. 2021) of CIFAR shape: every layer a training-time 3-branch block."""
    layers = [RepVGGBlock(i, o, s) for blocks in cifar_stages(depth, width) for convs in blocks
              for i, o, _, s in convs]
    return RepVGGNet(RepVGGBlock(in_chans, width), layers, 4 * width, num_classes, in_chans, img_size)


# ----------------------------------------------------------------------------- hourglass MLP

class FixedRandomLift(nn.Module):
    """(B, F, 1, 1) -> (B, out, 1, 1) by a fixed Gaussian matrix, entries N(0, 1/F).

    A buffer, never trained, saved in the state dict so a checkpoint keeps the same lift.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(out_features, in_features) / math.sqrt(in_features))

    def forward(self, x):
        return F.conv2d(x, self.weight[:, :, None, None])


class HourglassMLP(ConvNet):
    arch = "mlp"


def hourglass_mlp(depth: int = 8, width: int = 512, narrow: int | None = None, num_classes: int = 10,
                  in_chans: int = 1, img_size: int = 28) -> HourglassMLP:
    """Hourglass MLP (Chen et al. 2025): a fixed random lift to ``width``, then pre-norm residual
    blocks z + W2 relu(W1 BN(z)) going wide -> ``narrow`` (default width // 4) -> wide.

    Depth counts weight layers like the other MLPs: the lift, 2 per block, the linear head.
    """
    if not isinstance(depth, int) or depth < 4 or depth % 2:
        raise ValueError(f"depth={depth!r} is not valid for an MLP: use an even number >= 4 (4, 6, 8, ...)")
    narrow = max(1, width // 4) if narrow is None else narrow
    if not isinstance(narrow, int) or not 1 <= narrow <= width:
        raise ValueError(f"narrow={narrow!r} must be an int in [1, width={width}]: "
                         "the blocks go wide -> narrow -> wide")
    stem = nn.Sequential(FlattenToChannels(), FixedRandomLift(in_chans * img_size * img_size, width))
    blocks = [ScaledResidualBlock(
        nn.Sequential(nn.BatchNorm2d(width), _conv(width, narrow, 1, bias=False), nn.ReLU(inplace=True)),
        _conv(narrow, width, 1), nn.Identity(), nn.Identity(), nn.Identity()) for _ in range((depth - 2) // 2)]
    return HourglassMLP(stem, blocks, width, num_classes, in_chans, img_size)


# ----------------------------------------------------------------------------- registry

CIFAR_BASELINES: dict[str, Callable[..., nn.Module]] = {
    "skipinit_resnet": skipinit_resnet,
    "rezero_resnet": rezero_resnet,
    "fixup_resnet": fixup_resnet,
    "dirac": dirac,
    "tat_plain": tat_plain,
    "repvgg": repvgg,
}
RESIDUAL_BASELINES = ("skipinit_resnet", "rezero_resnet", "fixup_resnet", "hourglass_mlp")

for _name, _fn in CIFAR_BASELINES.items():
    register_model(_name, _fn)
    for _depth in CIFAR_DEPTHS:
        register_model(f"{_name}{_depth}", _fn, depth=_depth)
register_model("hourglass_mlp", hourglass_mlp)
register_model("dirac_ncrelu", lambda **kw: dirac(ncrelu=True, **kw))
for _depth in CIFAR_DEPTHS:
    register_model(f"dirac_ncrelu{_depth}", lambda **kw: dirac(ncrelu=True, **kw), depth=_depth)
