"""Convolutional nets: plain, residual (ResNet) and PNNH, all of one shape.

Every kind of net (plain, resnet, pnnh) is built from the same list of convolutions (in_ch, out_ch, kernel, stride), so
plain{D}, resnet{D} and pnnh{D} differ only in how each convolution is wrapped:

- plain:  a chain of conv-BN-ReLU layers;
- resnet: the same convolutions grouped in blocks with a shortcut addition;
- pnnh:   a chain of PNNH layers (layers.PNNHConv), no addition anywhere.

Depth counts weight layers as in ResNet naming: CIFAR-style nets have 6n+2 (stem, 3 stages of
2n convolutions, linear head); ImageNet-shaped nets are the 18/34/50-layer ResNet layouts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pnnh.models.init import apply_init
from pnnh.models.base import Classifier, stage_points
from pnnh.models.layers import PNNH_CHANNELS_LAST_MIN_LEARNER, ConvBNAct, CoderSpec, ResidualBlock, pnnh_layers
from pnnh.models.registry import register_model

KINDS = ("plain", "resnet", "pnnh")
CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110)
Conv = tuple[int, int, int, int]  # in_ch, out_ch, kernel, stride


def basic_block(in_ch: int, out_ch: int, stride: int) -> list[Conv]:
    return [(in_ch, out_ch, 3, stride), (out_ch, out_ch, 3, 1)]


def bottleneck_block(in_ch: int, out_ch: int, stride: int, expansion: int = 4) -> list[Conv]:
    return [(in_ch, out_ch, 1, 1), (out_ch, out_ch, 3, stride), (out_ch, out_ch * expansion, 1, 1)]


def stage_blocks(block, widths, blocks_per_stage, in_ch, first_stride=1) -> list[list[list[Conv]]]:
    """Blocks of convolutions, stage by stage; every stage after the first halves the resolution."""
    stages = []
    for s, (width, n) in enumerate(zip(widths, blocks_per_stage)):
        blocks = []
        for b in range(n):
            stride = (first_stride if s == 0 else 2) if b == 0 else 1
            convs = block(in_ch, width, stride)
            blocks.append(convs)
            in_ch = convs[-1][1]
        stages.append(blocks)
    return stages


class ConvNet(Classifier):
    """stem -> body -> global average pool -> linear head, for every kind of CNN.

    ``in_chans`` and ``img_size`` record the input the net was built for (its pretrained_cfg).
    """

    arch = "cnn"  # the training recipe (pnnh.train.config.ARCH_DEFAULTS)
    # The trainer's channels_last="auto" uses channels_last on CPU only for models that run faster
    # in it. PNNH nets with narrow learners (pnnh20/56: 8-32 channels) train 1.3x faster in NCHW
    # on CPU, wide ones (pnnh18: 32-256) 1.3x faster in channels_last (bf16, 2 threads, idle;
    # python benchmarks/throughput.py, README "Speed"; with 1 thread under load channels_last wins
    # for every net): see PNNH_CHANNELS_LAST_MIN_LEARNER. On CUDA every CNN uses channels_last.
    prefers_channels_last_on_cpu = True

    def __init__(self, stem: nn.Module, body: list[nn.Module], out_ch: int, num_classes: int,
                 in_chans: int | None = None, img_size: int | None = None):
        super().__init__()
        self.in_chans, self.img_size, self.num_features = in_chans, img_size, out_ch
        self.stem = stem
        self.body = nn.Sequential(*body)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(out_ch, num_classes)

    def forward_features(self, x):
        return self.body(self.stem(x))

    def pool_features(self, features):
        return torch.flatten(self.pool(features), 1)

    def feature_points(self) -> list[tuple[str, nn.Module]]:
        return stage_points(self.stem, self.body)

    def feature_layers(self) -> list[tuple[str, nn.Module]]:
        """One (name, module) per hidden weight layer; the module's output is its representation."""
        layers = [("stem", self.stem)]
        for n, m in enumerate(self.body):
            name = f"body.{n}"
            layers += m.feature_layers(name) if hasattr(m, "feature_layers") else [(name, m)]
        return layers


def build_cnn(kind: str, stages: list[list[list[Conv]]], stem: nn.Module, num_classes: int,
              kwargs: dict, net_class: type[ConvNet] = ConvNet, in_chans: int | None = None,
              img_size: int | None = None) -> ConvNet:
    """Wrap the convolutions of ``stages`` as the ``kind`` asks; ``kwargs`` are that kind's options
    (``init=`` re-initialises the convolutions: he_normal, orthogonal or delta_orthogonal);
    ``in_chans`` and ``img_size`` are recorded on the net."""
    init = kwargs.pop("init", None)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not valid; choose one of {KINDS}")
    if kind == "pnnh":
        spec = CoderSpec.from_kwargs(kwargs)
        _no_extra(kwargs, kind)
        body = pnnh_layers(spec, [[c for block in blocks for c in block] for blocks in stages])
    elif kind == "resnet":
        zero_init = kwargs.pop("zero_init_residual", False)
        _no_extra(kwargs, kind)
        body = [ResidualBlock(convs, zero_init) for blocks in stages for convs in blocks]
    else:
        _no_extra(kwargs, kind)
        body = [ConvBNAct(*c) for blocks in stages for convs in blocks for c in convs]
    net = net_class(stem, body, stages[-1][-1][-1][1], num_classes, in_chans, img_size)
    if kind == "pnnh":
        narrowest = min(layer.weight.shape[0] for layer in body)
        net.prefers_channels_last_on_cpu = narrowest >= PNNH_CHANNELS_LAST_MIN_LEARNER
    if init is not None:
        apply_init(net, init)
    return net


def _no_extra(kwargs: dict, kind: str) -> None:
    if kwargs:
        hint = (" (PNNH options: coder_ratio, coder_sharing, coder_init, coder_form, coder_kernel, "
                "coder_fusion, coder_norm, coder_scale)")
        raise TypeError(f"unexpected keyword arguments for a {kind} model: {sorted(kwargs)}{hint}")


def cifar_stages(depth: int, width: int) -> list[list[list[Conv]]]:
    """The convolutions of a CIFAR-style net of depth 6n+2: stages of widths (w, 2w, 4w), n blocks each."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth!r} is not valid for a CIFAR-style net: use 6n+2 with n >= 1 "
                         f"(8, 14, 20, 26, 32, ..., e.g. {', '.join(map(str, CIFAR_DEPTHS))})")
    n = (depth - 2) // 6
    return stage_blocks(basic_block, (width, 2 * width, 4 * width), (n, n, n), width)


def cifar_net(kind: str, depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16,
              img_size: int = 32, **kwargs) -> ConvNet:
    """CIFAR-style net of depth 6n+2: 3x3 stem, then :func:`cifar_stages`."""
    return build_cnn(kind, cifar_stages(depth, width), ConvBNAct(in_chans, width), num_classes, kwargs,
                     in_chans=in_chans, img_size=img_size)


IMAGENET_LAYOUTS = {
    18: (basic_block, (2, 2, 2, 2)),
    34: (basic_block, (3, 4, 6, 3)),
    50: (bottleneck_block, (3, 4, 6, 3)),
}


def imagenet_net(kind: str, depth: int, num_classes: int = 1000, in_chans: int = 3, width: int = 64,
                 img_size: int = 224, **kwargs) -> ConvNet:
    """ResNet-18/34/50 layouts. Images of 64 px or less get a 3x3 stride-1 stem without max-pool
    (the usual CIFAR adaptation); larger ones the 7x7 stride-2 stem and max-pool."""
    if depth not in IMAGENET_LAYOUTS:
        raise ValueError(f"depth={depth!r} is not valid for an ImageNet-shaped net; use one of {sorted(IMAGENET_LAYOUTS)}")
    block, blocks = IMAGENET_LAYOUTS[depth]
    if img_size <= 64:
        stem = ConvBNAct(in_chans, width, 3, 1)
    else:
        stem = nn.Sequential(ConvBNAct(in_chans, width, 7, 2), nn.MaxPool2d(3, 2, 1))
    stages = stage_blocks(block, tuple(width * 2**i for i in range(4)), blocks, width)
    return build_cnn(kind, stages, stem, num_classes, kwargs, in_chans=in_chans, img_size=img_size)


def _register():
    for kind in KINDS:
        register_model(kind, lambda kind=kind, depth=56, **kw: cifar_net(kind, depth, **kw))
        for depth in CIFAR_DEPTHS:
            register_model(f"{kind}{depth}", lambda kind=kind, **kw: cifar_net(kind, **kw), depth=depth)
        for depth in IMAGENET_LAYOUTS:
            register_model(f"{kind}{depth}", lambda kind=kind, **kw: imagenet_net(kind, **kw), depth=depth)


_register()
