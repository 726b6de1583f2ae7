"""Layers shared by the models: the plain layer, the residual block and the PNNH layer.

The PNNH layer (docs/PNNH.md section 2) is one plain layer split in two channel groups::

    c  = K_s * h                      coder: weights shared by every layer of a stage, frozen
    u  = W_l * h                      learner: weights of this layer only
    h' = concat( c, act(N(u)) )       N = BatchNorm, act = ReLU, on the learner channels only

It is one convolution with weight ``cat([K_s, W_l])``, one channel-wise normalisation and one
channel-wise activation (both the identity on coder channels). With the default 1x1 coder under a
3x3 learner the two parts run as two convolutions (the coder's is 1x1, so the layer costs about
(1 - r) of a plain layer's FLOPs), then one concatenation; ``pnnh.fold`` merges them back into
one convolution for inference. Nothing is added to a tensor from
an earlier layer: the internal path lives inside the weights. The default coder (chosen on
validation accuracy over 3 seeds, results/screening.md) is ``signed``: code channel i keeps its
value and adds learner channel i minus learner channel i+1, a zero-mean increment, so the code
channels carry a running sum of learner outputs like a ResNet's stream; it is never trained.
The other choices of the design space stay available as ``coder_*`` arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

# The narrowest PNNH learner (output channels of a layer's own weights) for which channels_last
# is the faster CPU layout: measured faster at 32 (pnnh18), slower at 8 (pnnh20, pnnh56).
PNNH_CHANNELS_LAST_MIN_LEARNER = 32

CODER_INITS = ("signed", "accumulate", "copy", "kaiming", "orthogonal")
CODER_FORMS = ("partial", "looks-linear")
SHARINGS = ("stage", "none")
FUSIONS = ("concat", "sum")
CODER_NORMS = ("none", "bn", "stage_end")


def he_normal_(weight: torch.Tensor) -> torch.Tensor:
    """W ~ N(0, 2 / fan_in): the initialisation the paper's theory assumes."""
    return nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")


class ConvBNAct(nn.Sequential):
    """The plain layer: convolution, BatchNorm, ReLU (``act=False`` drops the ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, act: bool = True):
        layers = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        he_normal_(self[0].weight)


class FlattenToChannels(nn.Module):
    """(B, C, H, W) -> (B, C*H*W, 1, 1): an MLP's input as a 1x1 image, so its layers are 1x1 convolutions."""

    def forward(self, x):
        return torch.flatten(x, 1)[:, :, None, None]


class ResidualBlock(nn.Module):
    """``relu(F(x) + shortcut(x))`` with F a chain of conv-BN(-ReLU) layers (basic or bottleneck).

    The shortcut is the identity, or a 1x1 convolution + BN where the shape changes.
    ``zero_init_residual`` starts the last BN scale at 0 so the block is the identity at init.
    """

    def __init__(self, convs: list[tuple[int, int, int, int]], zero_init_residual: bool = False):
        super().__init__()
        self.branch = nn.Sequential(
            *[ConvBNAct(i, o, k, s, act=n < len(convs) - 1) for n, (i, o, k, s) in enumerate(convs)]
        )
        in_ch, out_ch = convs[0][0], convs[-1][1]
        stride = math.prod(s for *_, s in convs)
        self.shortcut = (
            nn.Identity() if in_ch == out_ch and stride == 1 else ConvBNAct(in_ch, out_ch, 1, stride, act=False)
        )
        self.act = nn.ReLU(inplace=True)
        if zero_init_residual:
            nn.init.zeros_(self.branch[-1][1].weight)

    def forward(self, x):
        return self.act(self.branch(x) + self.shortcut(x))

    def feature_layers(self, prefix: str) -> list[tuple[str, nn.Module]]:
        inner = [(f"{prefix}.branch.{n}", m) for n, m in enumerate(self.branch) if len(m) == 3]
        return inner + [(prefix, self)]


def as_annotated(name: str, value: Any, kind: Any) -> Any:
    """``value`` as the annotated ``kind`` (``float`` / ``int``, or their names) when it is text
    spelling a number: YAML 1.1 reads ``1e-3`` as a string, the argument's type says what it meant."""
    kind = getattr(kind, "__name__", kind)
    if not isinstance(value, str) or kind not in ("float", "int"):
        return value
    try:
        return float(value) if kind == "float" else int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not valid: it must be a number ({kind})") from None


@dataclass(frozen=True)
class CoderSpec:
    """The PNNH design space (PNNH.md section 2); each field is a constructor argument."""

    ratio: float = 0.5             # r: share of each layer's channels that are coder channels
    sharing: str = "stage"         # stage: one K_s per stage and shape | none: a coder per layer
    init: str = "signed"           # signed | accumulate | copy | kaiming | orthogonal
    form: str = "partial"          # partial: identity on coder channels | looks-linear: (+c, -c) pairs
    kernel: int = 1                # coder kernel size (1 or 3); a frozen identity-initialised 3x3
                                   # coder computes exactly what a 1x1 one does, with 9x the weights
    fusion: str = "concat"         # concat: disjoint channel groups | sum: N(c) + act(N(u))
    norm: str = "none"             # none | bn | stage_end: BatchNorm on the coder channels in no
                                   # layer, every layer, or only the last layer of each stage
    scale: float = 1.0             # a: signed and accumulate add a x learner increments to the code
    trainable: bool = False        # the coder keeps its initial weights; a trained shared coder
                                   # drifts from the identity and its drift compounds over the
                                   # stage (results/screening.md: 64% vs 83% val at depth 56)

    def __post_init__(self):
        for field, valid in (("sharing", SHARINGS), ("init", CODER_INITS), ("form", CODER_FORMS),
                             ("fusion", FUSIONS), ("norm", CODER_NORMS)):
            if getattr(self, field) not in valid:
                raise ValueError(f"coder_{field}={getattr(self, field)!r} is not valid; choose one of {valid}")
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"coder_ratio={self.ratio!r} must lie strictly between 0 and 1")
        if self.kernel not in (1, 3):
            raise ValueError(f"coder_kernel={self.kernel!r} must be 1 or 3")
        if not isinstance(self.trainable, bool):
            raise ValueError(f"coder_trainable={self.trainable!r} must be True or False")
        if self.fusion == "sum" and self.form != "partial":
            raise ValueError("coder_fusion='sum' needs coder_form='partial'")

    @classmethod
    def from_kwargs(cls, kwargs: dict, base: "CoderSpec | None" = None) -> "CoderSpec":
        """Pop ``coder_*`` keyword arguments (``coder_ratio=0.25`` ...) out of ``kwargs``.

        A number given as text (YAML 1.1 reads ``1e-3`` as a string) becomes the field's type."""
        fields = {f: as_annotated(f"coder_{f}", kwargs.pop(f"coder_{f}"), spec.type)
                  for f, spec in cls.__dataclass_fields__.items() if f"coder_{f}" in kwargs}
        return replace(base, **fields) if base is not None else cls(**fields)

    def code_channels(self, out_ch: int) -> int:
        """Coder output channels of a layer with ``out_ch`` channels (all of them for ``sum``)."""
        if self.fusion == "sum":
            return out_ch
        m = max(1, round(self.ratio * out_ch))
        if self.form == "looks-linear":
            m = max(2, m - m % 2)
        if m >= out_ch:
            raise ValueError(f"coder_ratio={self.ratio} leaves no learner channel at width {out_ch}")
        return m


def code_read_matrix(spec: CoderSpec, n_code: int, in_ch: int, in_code: int) -> torch.Tensor:
    """The linear map (n_code x in_ch) a coder applies at init, read at the kernel's centre.

    The input holds ``in_code`` code channels then learner channels. In the looks-linear form
    the input code is stored as pairs (+c, -c) and read back as relu(+c) - relu(-c) = c.
    ``copy`` reads the code; ``accumulate`` also adds ``scale`` x learner channel j to code
    j mod n_code (a running sum of learner outputs: a residual stream inside the weights);
    ``signed`` adds learner j and subtracts learner j+1 so increments have zero mean.
    """
    R = torch.zeros(n_code, in_ch)
    if spec.form == "looks-linear" and in_code:
        half = in_code // 2
        for i in range(min(n_code, half)):
            R[i, i], R[i, half + i] = 1.0, -1.0
    else:
        for i in range(min(n_code, in_code)):
            R[i, i] = 1.0
    learners = list(range(in_code, in_ch))
    if spec.init == "accumulate":
        for j, ch in enumerate(learners):
            R[j % n_code, ch] += spec.scale
    elif spec.init == "signed" and len(learners) > 1:
        for i in range(min(n_code, len(learners))):
            R[i, learners[i]] += spec.scale
            R[i, learners[(i + 1) % len(learners)]] -= spec.scale
    return R


class Coder(nn.Module):
    """Coder weights K, (n_code, in_ch, k, k) or (n_code, in_ch) for ``kernel=None`` (a linear
    coder, as in the PNNH Transformer). One instance is shared by the layers of a stage."""

    def __init__(self, spec: CoderSpec, n_code: int, in_ch: int, in_code: int, kernel: int | None):
        super().__init__()
        shape = (n_code, in_ch) if kernel is None else (n_code, in_ch, kernel, kernel)
        self.weight = nn.Parameter(torch.zeros(shape))
        if spec.init in ("kaiming", "orthogonal"):
            init = he_normal_ if spec.init == "kaiming" else nn.init.orthogonal_
            init(self.weight)
        else:
            centre = (...,) if kernel is None else (..., kernel // 2, kernel // 2)
            with torch.no_grad():
                self.weight[centre] = code_read_matrix(spec, n_code, in_ch, in_code)
        self.weight.requires_grad_(spec.trainable)
        self.spec = spec  # the design it was built for: a layer given this coder defaults to it


class _DenseGrad(torch.autograd.Function):
    """Identity forward; backward hands on its gradient dense in the forward tensor's layout.

    The gradient of one part of a channel concatenation is a channel slice, which in
    channels_last is strided; CPU BatchNorm and ReLU backward kernels are several times slower
    on strided tensors than one copy to a dense tensor (benchmarks/profile_pnnh.py)."""

    @staticmethod
    def forward(ctx, x):
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)


def dense_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, with its gradient made dense in backward (:class:`_DenseGrad`); one fx leaf."""
    return _DenseGrad.apply(x)


torch.fx.wrap("dense_grad")  # fx records the call instead of tracing the Function's layout test


class PartialReLU(nn.Module):
    """ReLU on channels ``start:`` only, in place: the coder channels pass unchanged.

    In place on a channel slice is the cheapest form measured (PNNH.md: no extra copy).
    """

    def __init__(self, start: int):
        super().__init__()
        self.start = start

    def forward(self, y):
        y[:, self.start:].relu_()
        return y

    def extra_repr(self):
        return f"start={self.start}"


class PartialBatchNorm(nn.Module):
    """BatchNorm on channels ``start:`` only; the first ``start`` channels pass unnormalised.

    A channel-wise op like :class:`PartialReLU` (its concat joins disjoint channels of one
    tensor), so shortcut detection treats it as one leaf op (``fx_leaf``).
    """

    fx_leaf = True

    def __init__(self, channels: int, start: int):
        super().__init__()
        self.start = start
        self.bn = nn.BatchNorm2d(channels - start)

    def forward(self, y):
        return torch.cat([y[:, : self.start], self.bn(y[:, self.start:])], dim=1)


class SumFusion(nn.Module):
    """``N(c) + relu(N(u))`` for the ``sum`` fusion: c, u are the two halves of one conv output."""

    def forward(self, y):
        c, u = y.chunk(2, dim=1)
        return c + torch.relu(u)


class PNNHConv(nn.Module):
    """One PNNH layer: one convolution with weight ``cat([K, W])``, one norm, a partial activation.

    ``PNNHConv(16, 16)`` is a 3x3 layer with a coder of its own; ``coder=other.coder`` shares
    another layer's coder (:class:`PNNHStage` does that for a run of layers). The design comes
    from ``spec`` and/or ``coder_*`` keywords (``coder_ratio=0.25``), else from the given coder.
    ``weight`` is this layer's learner W. ``norm_code=False`` leaves the coder channels
    unnormalised (default: ``coder_norm != "none"``). Output layout: ``n_code`` coder channels
    (``2 n_code`` as (+c, -c) pairs in the looks-linear form), then the learner channels.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, *, spec: CoderSpec | None = None,
                 coder: Coder | None = None, norm_code: bool | None = None, **coder_kwargs):
        super().__init__()
        _check_sizes(in_ch=in_ch, out_ch=out_ch, kernel=kernel, stride=stride)
        spec = coder_spec(spec, coder, **coder_kwargs)
        if coder is None:
            coder = make_coder(spec, in_ch, out_ch, kernel, stride)
        _check_coder(coder, spec, in_ch, out_ch, kernel)
        if norm_code is None:
            norm_code = spec.norm != "none"
        self.spec, self.coder, self.stride, self.padding = spec, coder, stride, kernel // 2
        self.coder_pad = (kernel - coder.weight.shape[-1]) // 2  # a 1x1 coder sits at the 3x3 centre
        n_code = coder.weight.shape[0]
        self.n_code_out = 2 * n_code if spec.form == "looks-linear" else n_code
        learner_out = out_ch if spec.fusion == "sum" else out_ch - self.n_code_out
        self.weight = nn.Parameter(he_normal_(torch.empty(learner_out, in_ch, kernel, kernel)))
        norm_ch = self.n_code_out + learner_out
        if not norm_code:
            self.norm = PartialBatchNorm(norm_ch, self.n_code_out)
        else:
            self.norm = nn.BatchNorm2d(norm_ch)
        if spec.fusion == "sum":
            self.act = SumFusion()
        elif spec.form == "looks-linear":
            self.act = nn.ReLU(inplace=True)
        else:
            self.act = PartialReLU(self.n_code_out)

    def fused_weight(self) -> torch.Tensor:
        """``cat([K, W])`` (``cat([K, -K, W])`` looks-linear), the coder padded to the learner's kernel."""
        k = self.coder.weight
        if self.coder_pad:
            k = F.pad(k, (self.coder_pad,) * 4)
        parts = [k, -k, self.weight] if self.spec.form == "looks-linear" else [k, self.weight]
        return torch.cat(parts, dim=0)

    def forward(self, h):
        if not self.coder_pad:
            return self.forward_fused(h)
        # A coder kernel smaller than the learner's (the default 1x1 coder under a 3x3 learner):
        # its own convolution costs 1/k^2 of a k x k one, so the layer costs about (1 - r) of a
        # plain layer's FLOPs instead of all of them. Same function as forward_fused.
        c = F.conv2d(h, self.coder.weight, None, self.stride, 0)
        u = F.conv2d(h, self.weight, None, self.stride, self.padding)
        if self.spec.form == "looks-linear":
            c = torch.cat([c, -c], dim=1)
        if isinstance(self.norm, PartialBatchNorm) and isinstance(self.act, PartialReLU):
            # the default layer: norm and activation on the learner tensor alone, no channel slices
            return torch.cat([c, dense_grad(F.relu(self.norm.bn(u), inplace=True))], dim=1)
        return self.act(self.norm(torch.cat([c, u], dim=1)))

    def forward_fused(self, h):
        """The layer as ONE convolution with weight :meth:`fused_weight` (the folded form)."""
        y = F.conv2d(h, self.fused_weight(), None, self.stride, self.padding)
        return self.act(self.norm(y))

    def forward_two_calls(self, h):
        """The same layer as separate coder and learner convolutions (reference for tests)."""
        w = self.fused_weight()
        n = self.n_code_out
        c = F.conv2d(h, w[:n], None, self.stride, self.padding)
        u = F.conv2d(h, w[n:], None, self.stride, self.padding)
        return self.act(self.norm(torch.cat([c, u], dim=1)))


def coder_spec(spec: CoderSpec | None = None, coder: Coder | None = None, **coder_kwargs) -> CoderSpec:
    """The design of a layer: ``spec`` (else ``coder``'s, else the default) with ``coder_*`` keywords applied."""
    base = spec if spec is not None else coder.spec if coder is not None else CoderSpec()
    spec = CoderSpec.from_kwargs(coder_kwargs, base)
    if coder_kwargs:
        valid = ", ".join(f"coder_{f}" for f in CoderSpec.__dataclass_fields__)
        raise TypeError(f"unexpected keyword arguments {sorted(coder_kwargs)}; the PNNH options are {valid}")
    return spec


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TypeError(f"{name}={value!r} must be a positive int (the design goes in spec= or coder_* keywords)")
    if sizes.get("kernel", 1) % 2 == 0:
        raise ValueError(f"kernel={sizes['kernel']} must be odd (padding kernel // 2 keeps the size)")


def make_coder(spec: CoderSpec, in_ch: int, out_ch: int, kernel: int | None = 3, stride: int = 1) -> Coder:
    """A new coder for a layer ``in_ch -> out_ch`` (``kernel=None``: a linear coder).

    A layer that keeps width and resolution gets ``spec``'s coder, initialised for the layout a
    PNNH layer produces (code channels first). A transition (stride or width change) gets a coder
    that copies the first input channels (PNNH.md: dirac onto the first channels).
    """
    n_code = spec.code_channels(out_ch) // (2 if spec.form == "looks-linear" else 1)
    coder_kernel = None if kernel is None else min(spec.kernel, kernel)
    if stride != 1 or in_ch != out_ch:
        init = spec.init if spec.init in ("kaiming", "orthogonal") else "copy"
        return Coder(replace(spec, init=init, form="partial"), n_code, in_ch, in_ch, coder_kernel)
    in_code = in_ch if spec.fusion == "sum" else min(in_ch, spec.code_channels(out_ch))
    return Coder(spec, n_code, in_ch, in_code, coder_kernel)


def _check_coder(coder: Coder, spec: CoderSpec, in_ch: int, out_ch: int, kernel: int | None) -> None:
    """A shared coder must fit the layer: its shape follows from the layer's sizes and ``spec``."""
    n_code = spec.code_channels(out_ch) // (2 if spec.form == "looks-linear" else 1)
    shape = tuple(coder.weight.shape)
    fits = shape[:2] == (n_code, in_ch) and (
        len(shape) == 2 if kernel is None else len(shape) == 4 and shape[2] == shape[3] <= kernel)
    if not fits:
        raise ValueError(f"a coder of shape {shape} does not fit a PNNH layer {in_ch} -> {out_ch} "
                         f"(coder_ratio={spec.ratio}: {n_code} code channels read from {in_ch})")


def pnnh_layers(spec: CoderSpec, stages: list[list[tuple[int, int, int, int]]]) -> list[PNNHConv]:
    """PNNH layers for (in_ch, out_ch, kernel, stride) specs, given stage by stage.

    With ``sharing='stage'`` the stride-1 layers of a stage with equal (in, out, kernel) share one
    coder, initialised for the layout those layers produce (the first layer reads its input with
    the same weights). Transitions (stride or width change) get a coder of their own that copies
    the first input channels (PNNH.md: dirac onto the first channels).
    """
    layers = []
    for convs in stages:
        shared: dict[tuple, Coder] = {}
        for n, (in_ch, out_ch, kernel, stride) in enumerate(convs):
            norm_code = spec.norm == "bn" or (spec.norm == "stage_end" and n == len(convs) - 1)
            key = (in_ch, out_ch, kernel)
            transition = stride != 1 or in_ch != out_ch
            coder = shared.get(key) if not transition else None
            if coder is None:
                coder = make_coder(spec, in_ch, out_ch, kernel, stride)
                if not transition and spec.sharing == "stage":
                    shared[key] = coder
            layers.append(PNNHConv(in_ch, out_ch, kernel, stride, spec=spec, coder=coder, norm_code=norm_code))
    return layers


class PNNHStage(nn.Sequential):
    """A stage: ``depth`` PNNH layers sharing one coder, ``in_ch -> out_ch`` (with ``stride``) then
    ``out_ch -> out_ch``. The design comes from ``spec`` and/or ``coder_*`` keywords.

        stage = PNNHStage(16, 32, depth=6, stride=2, coder_ratio=0.5)
    """

    def __init__(self, in_ch: int, out_ch: int, depth: int, kernel: int = 3, stride: int = 1, *,
                 spec: CoderSpec | None = None, **coder_kwargs):
        _check_sizes(in_ch=in_ch, out_ch=out_ch, depth=depth, kernel=kernel, stride=stride)
        convs = [(in_ch, out_ch, kernel, stride)] + [(out_ch, out_ch, kernel, 1)] * (depth - 1)
        super().__init__(*pnnh_layers(coder_spec(spec, **coder_kwargs), [convs]))


class PNNHLinear(nn.Module):
    """The PNNH layer over features (the last dimension): a Transformer sub-layer or an MLP layer.

        h' = concat( K h, fn(LN(h)) )      K: frozen coder, n_code x in_dim (PNNH.md section 3)

    ``fn`` is the learner, mapping ``in_dim`` to ``learner_dim = out_dim - n_code`` features: an
    attention or MLP sub-layer whose output projection is that narrow, or by default
    ``Linear(in_dim, learner_dim)`` + ReLU. ``coder=other.coder`` shares a coder (the PNNH ViT
    shares one among its attention sub-layers and one among its MLPs); ``norm`` replaces the
    LayerNorm. The code is never normalised, so only the partial / concat design applies.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, fn: nn.Module | None = None, *,
                 spec: CoderSpec | None = None, coder: Coder | None = None, norm: nn.Module | None = None,
                 **coder_kwargs):
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        _check_sizes(in_dim=in_dim, out_dim=out_dim)
        spec = coder_spec(spec, coder, **coder_kwargs)
        if spec.form != "partial" or spec.fusion != "concat":
            raise ValueError(f"coder_form={spec.form!r}, coder_fusion={spec.fusion!r}: a PNNH linear layer "
                             "supports coder_form='partial' with coder_fusion='concat' only")
        self.learner_dim = out_dim - spec.code_channels(out_dim)
        if fn is None:
            fn = nn.Sequential(nn.Linear(in_dim, self.learner_dim), nn.ReLU())
            he_normal_(fn[0].weight)
            nn.init.zeros_(fn[0].bias)
        if coder is None:
            coder = make_coder(spec, in_dim, out_dim, None)
        _check_coder(coder, spec, in_dim, out_dim, None)
        self.fn, self.coder = fn, coder
        self.norm = norm if norm is not None else nn.LayerNorm(in_dim)

    def forward(self, h):
        return torch.cat([F.linear(h, self.coder.weight), self.fn(self.norm(h))], dim=-1)
