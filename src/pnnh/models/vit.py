"""Vision Transformers: pre-LN residual ViT, plain ViT, and the PNNH ViT (PNNH.md section 3).

Every sub-layer (attention, MLP) combines its input h with f = Attn or MLP; the three kinds
(residual, plain, PNNH) differ only in how:

- residual: h + f(LN(h))                 (:class:`SubLayer`)
- plain:    f(LN(h))                     (:class:`SubLayer`)
- pnnh:     concat(K h, f(LN(h)))        (:class:`pnnh.models.layers.PNNHLinear`) with K (r d x d)
            shared by all blocks, identity-initialised, and f projecting to the remaining (1 - r) d.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnnh.models.base import Classifier
from pnnh.models.layers import CoderSpec, PNNHLinear, make_coder
from pnnh.models.registry import register_model

MODES = ("residual", "plain", "pnnh")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, out_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class SubLayer(nn.Module):
    """One residual or plain Transformer sub-layer (see the module docstring)."""

    def __init__(self, mode: str, fn: nn.Module, dim: int):
        super().__init__()
        self.mode, self.fn = mode, fn
        self.norm = nn.LayerNorm(dim)

    def forward(self, h):
        y = self.fn(self.norm(h))
        return h + y if self.mode == "residual" else y


class ViT(Classifier):
    """Patch embedding, ``depth`` blocks of (attention, MLP) sub-layers, LayerNorm, mean-pool, head.

    ``width`` is the embedding dimension (ViT-Tiny: 192, 3 heads, 12 blocks, the defaults).
    """

    arch = "vit"

    def __init__(self, mode: str, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 patch_size: int = 4, depth: int = 12, width: int = 192, heads: int = 3,
                 mlp_ratio: float = 4.0, **kwargs):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose one of {MODES}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}; "
                             f"valid sizes are multiples of {patch_size}")
        if depth < 1:
            raise ValueError(f"depth={depth!r} is not valid for a ViT: use a number of blocks >= 1")
        dim = width
        out_dim, coders, spec = dim, (None, None), None
        if mode == "pnnh":
            spec = CoderSpec.from_kwargs(kwargs)
            if spec.form != "partial" or spec.fusion != "concat":  # its code is never normalised
                raise ValueError("the PNNH ViT supports coder_ratio, coder_init, coder_scale, coder_sharing "
                                 "and coder_trainable only")
            n_code = spec.code_channels(dim)
            out_dim = dim - n_code
            make = lambda: make_coder(spec, dim, dim, None)  # noqa: E731
            coders = (make(), make()) if spec.sharing == "stage" else None
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for a ViT: {sorted(kwargs)}")
        self.in_chans, self.img_size, self.num_features = in_chans, img_size, dim
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, dim))

        def sublayer(fn, coder):
            return PNNHLinear(dim, fn=fn, spec=spec, coder=coder) if mode == "pnnh" else SubLayer(mode, fn, dim)

        layers = []
        for _ in range(depth):
            ka, km = coders if coders else (make(), make())
            layers.append(sublayer(Attention(dim, heads, out_dim), ka))
            layers.append(sublayer(FeedForward(dim, int(dim * mlp_ratio), out_dim), km))
        self.blocks = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(h))

    def pool_features(self, features):
        return features.mean(dim=1)

    def feature_points(self) -> list[tuple[str, nn.Module]]:
        """The end of every block (its MLP sub-layer): the token grids, as timm's ViTs give them."""
        return [(f"blocks.{n}", m) for n, m in enumerate(self.blocks) if n % 2]

    def feature_map(self, output):
        """(B, tokens, dim) -> (B, dim, H / patch, W / patch)."""
        side = self.img_size // self.patch_embed.stride[0]
        return output.transpose(1, 2).unflatten(2, (side, side))

    def feature_layers(self) -> list[tuple[str, nn.Module]]:
        return [("patch_embed", self.patch_embed)] + [(f"blocks.{n}", m) for n, m in enumerate(self.blocks)]


NAMES = {"residual": "vit", "plain": "plain_vit", "pnnh": "pnnh_vit"}
for _mode, _name in NAMES.items():
    register_model(_name, lambda mode=_mode, **kw: ViT(mode, **kw))
    register_model(f"{_name}_tiny", lambda mode=_mode, **kw: ViT(mode, **kw))  # ViT-Ti: 192 wide, 3 heads, 12 blocks
