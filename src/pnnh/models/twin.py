"""The explicit residual twin of the default PNNH net: what the frozen coder computes, written out.

In the default PNNH layer (layers.PNNHConv: frozen 1x1 coder, code channels skip BN and ReLU) the
input h_l = [x_l, a_l] holds m code channels x_l and the previous learner's output a_l. The frozen
coder reads K = [I | D] at init (``signed``: D = a(I - shift), ``accumulate``: D = a[I I ...],
``copy``: D = 0), so one PNNH layer computes

    x_{l+1} = x_l + D a_l                        a residual stream of width m (C/2 by default)
    a_{l+1} = ReLU(BN(W_l * [x_l, a_l]))         the branch: the layer's learner

that is, c_{l+1} = c_l + D·ReLU(BN(W_{l-1} h_{l-1})): each branch output is added to the stream
one layer after it is computed, through the fixed projection D. This module builds that recurrence
as a residual network (an addition of a tensor from the previous layer, the twin of the PNNH
net's concatenation in one convolution); ``load_pnnh_weights`` copies a PNNH net's weights into it
and ``tests/test_twin.py`` checks that both compute the same outputs and gradients. Stage
transitions (stride or width change) have no identity: their coder is a fixed 1x1 selection P of
[x, a] (``copy``), which here is a fixed projection shortcut.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnnh.models.base import Classifier, stage_points
from pnnh.models.cnn import CIFAR_DEPTHS, cifar_stages
from pnnh.models.layers import ConvBNAct, CoderSpec, code_read_matrix, he_normal_
from pnnh.models.registry import register_model

STREAM_INITS = ("signed", "accumulate", "copy")  # coders whose code part is the identity: K = [I | D]


class TwinLayer(nn.Module):
    """One step of the recurrence: ``(x, a) -> (x + D a, ReLU(BN(W * [x, a])))``.

    A transition layer replaces ``x + D a`` by ``P [x, a]`` (strided), P its fixed copy coder.
    ``in_code`` is the width of the stream ``x`` this layer reads.
    """

    def __init__(self, spec: CoderSpec, in_ch: int, out_ch: int, kernel: int, stride: int, in_code: int):
        super().__init__()
        self.stride, self.padding, self.in_code = stride, kernel // 2, in_code
        n_code = spec.code_channels(out_ch)
        self.identity = stride == 1 and in_ch == out_ch
        if self.identity:
            read = code_read_matrix(spec, n_code, in_ch, in_code)  # [I | D]
            self.register_buffer("proj", read[:, in_code:, None, None], persistent=False)  # D
        else:
            read = code_read_matrix(replace(spec, init="copy"), n_code, in_ch, in_ch)
            self.register_buffer("proj", read[:, :, None, None], persistent=False)  # P
        self.weight = nn.Parameter(he_normal_(torch.empty(out_ch - n_code, in_ch, kernel, kernel)))
        self.bn = nn.BatchNorm2d(out_ch - n_code)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([x, a], dim=1)
        branch = F.relu(self.bn(F.conv2d(h, self.weight, None, self.stride, self.padding)))
        if self.identity:
            return x + F.conv2d(a, self.proj), branch
        return F.conv2d(h, self.proj, None, self.stride), branch

    def coder_matrix(self) -> torch.Tensor:
        """The PNNH coder this layer stands for, K = [I | D] or P, as (n_code, in_ch)."""
        proj = self.proj[:, :, 0, 0]
        if self.identity:
            return torch.cat([torch.eye(proj.shape[0], self.in_code, dtype=proj.dtype), proj], dim=1)
        return proj


class ResidualTwinNet(Classifier):
    """stem -> the twin recurrence over (stream, branch) -> [x, a] -> pool -> linear head."""

    arch = "cnn"

    def __init__(self, stem: nn.Module, layers: list[TwinLayer], out_ch: int, num_classes: int,
                 in_chans: int | None = None, img_size: int | None = None):
        super().__init__()
        self.in_chans, self.img_size, self.num_features = in_chans, img_size, out_ch
        self.stem = stem
        self.body = nn.ModuleList(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(out_ch, num_classes)

    def forward_features(self, img):
        h = self.stem(img)
        x, a = h[:, : self.body[0].in_code], h[:, self.body[0].in_code:]
        for layer in self.body:
            x, a = layer(x, a)
        return torch.cat([x, a], dim=1)

    def pool_features(self, features):
        return torch.flatten(self.pool(features), 1)

    def feature_points(self) -> list[tuple[str, nn.Module]]:
        return stage_points(self.stem, self.body)

    def feature_map(self, output):
        """A layer's (x, a) as the PNNH layer's output [x, a]."""
        return torch.cat(output, dim=1) if isinstance(output, tuple) else output


def twin_cifar_net(depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16, img_size: int = 32,
                   **kwargs) -> ResidualTwinNet:
    """The twin of ``pnnh{depth}`` with the same ``coder_*`` keywords (partial form, concat fusion,
    unnormalised code, frozen coder: the designs in which the code is a stream)."""
    spec = CoderSpec.from_kwargs(kwargs)
    if kwargs:
        raise TypeError(f"unexpected keyword arguments for residual_twin: {sorted(kwargs)}")
    design = (spec.init, spec.form, spec.fusion, spec.norm, spec.trainable)
    if design[0] not in STREAM_INITS or design[1:] != ("partial", "concat", "none", False):
        raise ValueError(f"residual_twin needs coder_init in {STREAM_INITS}, coder_form='partial', coder_fusion='concat', "
                         f"coder_norm='none' and a frozen coder; got init, form, fusion, norm, trainable = {design}")
    layers = []
    for blocks in cifar_stages(depth, width):
        for in_ch, out_ch, kernel, stride in (c for block in blocks for c in block):
            in_code = min(in_ch, spec.code_channels(out_ch))
            layers.append(TwinLayer(spec, in_ch, out_ch, kernel, stride, in_code))
    return ResidualTwinNet(ConvBNAct(in_chans, width), layers, 4 * width, num_classes, in_chans, img_size)


def load_pnnh_weights(twin: ResidualTwinNet, pnnh_net: nn.Module) -> None:
    """Copy a PNNH net's stem, learners, BatchNorms and head into its twin.

    Raises ``ValueError`` when a PNNH coder is not the fixed projection the twin computes (a
    trained or randomly initialised coder has no residual twin).
    """
    state = {}
    for key, value in pnnh_net.state_dict().items():
        if key.endswith(".coder.weight"):
            n = int(key.split(".")[1])
            k = value.shape[-1]
            centre = value[..., k // 2, k // 2]
            off_centre = value.clone()
            off_centre[..., k // 2, k // 2] = 0
            expected = twin.body[n].coder_matrix().to(value.dtype)
            if off_centre.any() or not torch.equal(centre, expected):
                raise ValueError(f"{key} is not the fixed identity-initialised coder the twin stands for")
            continue
        state[key.replace(".norm.bn.", ".bn.")] = value
    twin.load_state_dict(state)


def _register():
    register_model("residual_twin", lambda depth=56, **kw: twin_cifar_net(depth, **kw))
    for depth in CIFAR_DEPTHS:
        register_model(f"residual_twin{depth}", lambda **kw: twin_cifar_net(**kw), depth=depth)


_register()
