"""The inference form of a trained network: BatchNorm folded into the convolutions.

``fold(model)`` returns a new module (the model is left untouched) that computes the same
function as ``model.eval()`` with fewer operations:

- every ``Conv2d`` directly followed by a ``BatchNorm2d`` in a ``Sequential`` becomes one
  ``Conv2d(bias=True)``; the BatchNorm is replaced by ``nn.Identity`` so module indices (and
  methods that use them, such as ``feature_layers``) stay valid;
- every PNNH layer (``PNNHConv``) becomes ``Sequential(Conv2d(bias=True), activation)``: its
  weight is ``cat([K, W])`` (``cat([K, -K, W])`` looks-linear) with the layer's BatchNorm or
  PartialBatchNorm folded in, so a PNNH net becomes a straight chain of conv + channel-wise
  activation layers, with no coder left to share; the partial ReLU becomes
  :class:`ChannelFloor`, one elementwise max (one ONNX ``Max`` node per layer);
- ResNet blocks fold the BatchNorms of their convolutions and keep their addition: the
  shortcut is part of the function they compute.

MLPs are 1x1-convolution nets and fold by the same rules. ViTs normalise with LayerNorm,
whose statistics depend on each input token, so there is nothing to fold: the result is an
eval-mode copy. A BatchNorm that follows no convolution stays as it is (in eval mode it is
already a fixed per-channel affine map).

Folding uses the running statistics: ``y = gamma (x - mean) / sqrt(var + eps) + beta`` is
``s x + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - s mean``; a convolution
``W * h + b`` followed by it is ``(s W) * h + (s b + t)``. The arithmetic runs in float64
and is rounded once to the weight's dtype.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from pnnh.models.layers import PartialBatchNorm, PartialReLU, PNNHConv

__all__ = ["fold", "bn_scale_shift", "fold_conv_bn", "ChannelFloor"]


def bn_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(s, t)`` (float64) with ``norm(x) == s x + t`` in eval mode.

    ``norm`` is a ``BatchNorm2d`` or a ``PartialBatchNorm`` (identity on its first channels).
    """
    if isinstance(norm, PartialBatchNorm):
        s, t = bn_scale_shift(norm.bn)
        dtype, device = s.dtype, s.device
        return (torch.cat([torch.ones(norm.start, dtype=dtype, device=device), s]),
                torch.cat([torch.zeros(norm.start, dtype=dtype, device=device), t]))
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"cannot fold {type(norm).__name__}: expected BatchNorm2d or PartialBatchNorm")
    if norm.running_mean is None:
        raise ValueError(f"cannot fold {norm}: it has no running statistics (track_running_stats=False), "
                         "so its eval-mode output depends on the batch")
    inv_std = (norm.running_var.double() + norm.eps).rsqrt()
    gamma = norm.weight.detach().double() if norm.affine else torch.ones_like(inv_std)
    beta = norm.bias.detach().double() if norm.affine else torch.zeros_like(inv_std)
    s = gamma * inv_std
    return s, beta - s * norm.running_mean.double()


def fold_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight', bias')`` of one convolution equal to the convolution followed by ``norm`` (eval)."""
    s, t = bn_scale_shift(norm)
    if s.numel() != weight.shape[0]:
        raise ValueError(f"cannot fold a norm over {s.numel()} channels into a convolution with "
                         f"{weight.shape[0]} output channels")
    w = weight.detach().double() * s.view(-1, *([1] * (weight.dim() - 1)))
    b = t if bias is None else s * bias.detach().double() + t
    return w.to(weight.dtype), b.to(weight.dtype)


def _conv_with_bias(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A ``Conv2d`` with ``conv``'s geometry and the given weight and bias."""
    out = nn.Conv2d(conv.in_channels, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                    device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


class ChannelFloor(nn.Module):
    """``max(y, floor)`` with one floor per channel: :class:`PartialReLU` as one elementwise op.

    The floor is -inf on the first ``start`` (coder) channels, which pass unchanged, and 0 on
    the others, where ``max(y, 0)`` is the ReLU: the same numbers as ``PartialReLU(start)``
    (``torch.equal``; only a -0.0 may come out as +0.0).
    Its point is the exported graph: a max against a constant is one ONNX ``Max`` node, where
    the in-place ReLU on a channel slice exports as Slice + Relu + ScatterND (+ Transposes).
    Training keeps ``PartialReLU``, which touches only the learner channels.
    """

    def __init__(self, start: int, channels: int):
        super().__init__()
        self.start = start
        floor = torch.zeros(1, channels, 1, 1)
        floor[:, :start] = -torch.inf
        self.register_buffer("floor", floor)

    def forward(self, y):
        return y.clamp_min_(self.floor)  # in place: y is the fresh convolution output

    def extra_repr(self):
        return f"start={self.start}, channels={self.floor.shape[1]}"


def _inference_act(act: nn.Module, channels: int) -> nn.Module:
    """The layer's activation in its one-op form (a copy: the trained model keeps its own)."""
    if isinstance(act, PartialReLU):
        return ChannelFloor(act.start, channels)
    return copy.deepcopy(act)


def _fold_pnnh(layer: PNNHConv) -> nn.Sequential:
    with torch.no_grad():
        weight, bias = fold_conv_bn(layer.fused_weight(), None, layer.norm)
    out_ch, in_ch, kernel, _ = weight.shape
    conv = nn.Conv2d(in_ch, out_ch, kernel, layer.stride, layer.padding, bias=True,
                     device=weight.device, dtype=weight.dtype)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    return nn.Sequential(conv, _inference_act(layer.act, out_ch).to(weight.device))


def _fold_sequential(seq: nn.Sequential) -> None:
    """Fold every (Conv2d, BatchNorm) pair of ``seq`` in place, the BatchNorm becoming Identity."""
    names = list(seq._modules)
    for name, nxt in zip(names, names[1:]):
        conv, norm = seq._modules[name], seq._modules[nxt]
        if isinstance(conv, nn.Conv2d) and isinstance(norm, (nn.BatchNorm2d, PartialBatchNorm)):
            with torch.no_grad():
                weight, bias = fold_conv_bn(conv.weight, conv.bias, norm)
            seq._modules[name] = _conv_with_bias(conv, weight, bias)
            seq._modules[nxt] = nn.Identity()


def _fold_children(module: nn.Module) -> None:
    for name, child in list(module._modules.items()):
        if isinstance(child, PNNHConv):
            module._modules[name] = _fold_pnnh(child)
        elif callable(getattr(child, "fold", None)):  # modules that know their inference form (RepVGG)
            module._modules[name] = child.fold()
        else:
            _fold_children(child)
    if isinstance(module, nn.Sequential):
        _fold_sequential(module)


def fold(model: nn.Module) -> nn.Module:
    """The inference form of ``model``: a new eval-mode module computing ``model.eval()``'s function
    with every BatchNorm that follows a convolution folded into it (see the module docstring).

    ``model`` is not modified. The result is for inference: its folded weights are new
    parameters, and training it would not train ``model``.
    """
    folded = copy.deepcopy(model).eval()
    if isinstance(folded, PNNHConv):
        return _fold_pnnh(folded).eval()
    if callable(getattr(folded, "fold", None)):
        return folded.fold().eval()
    _fold_children(folded)
    return folded.eval()
