"""MLPs: plain, residual and PNNH, for fast checks of the theory on flattened inputs.

An MLP here is the CNN of :mod:`pnnh.models.cnn` on a 1x1 "image": the flattened input becomes
(batch, features, 1, 1) and every layer is a 1x1 convolution, i.e. a linear map. The three
kinds (plain, residual, PNNH) therefore share the layers, the shortcut and the PNNH coder with the CNNs.
Depth counts weight layers: input layer, depth - 2 hidden layers, linear head.
"""
from __future__ import annotations

import torch.nn as nn

from pnnh.models.cnn import KINDS, ConvNet, build_cnn
from pnnh.models.layers import ConvBNAct, FlattenToChannels
from pnnh.models.registry import register_model


class MLP(ConvNet):
    arch = "mlp"


def mlp(kind: str, depth: int = 8, width: int = 256, num_classes: int = 10, in_chans: int = 1,
        img_size: int = 28, **kwargs) -> MLP:
    if not isinstance(depth, int) or depth < 4 or depth % 2:
        raise ValueError(f"depth={depth!r} is not valid for an MLP: use an even number >= 4 (4, 6, 8, ...)")
    stem = nn.Sequential(FlattenToChannels(), ConvBNAct(in_chans * img_size * img_size, width, 1))
    stages = [[[(width, width, 1, 1), (width, width, 1, 1)] for _ in range((depth - 2) // 2)]]
    return build_cnn(kind, stages, stem, num_classes, kwargs, MLP, in_chans, img_size)


NAMES = {"plain": "plain_mlp", "resnet": "residual_mlp", "pnnh": "pnnh_mlp"}
for _kind in KINDS:
    register_model(NAMES[_kind], lambda kind=_kind, **kw: mlp(kind, **kw))
