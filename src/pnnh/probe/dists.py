"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture
Similarity") on a VGG16 written here in plain torch, for the paper's own measure of
dissipating inputs.

DISTS is only meaningful with ImageNet-pretrained VGG16 weights, which pnnh never downloads:
the user supplies them (``DISTS.from_files``). Two layouts are read: torchvision's
``vgg16().state_dict()`` (keys ``features.N.weight``) and the DISTS repository's model
(keys ``stageK.N.weight``, possibly with its ``alpha``/``beta``). Without learned alpha/beta
every channel gets the same weight 1 / (2 * 1475) for both terms.

A layer's output is not an image, so it is compared through :func:`gray_image`: channel mean,
bilinear resize to the input size, min-max scaling to [0, 1] per example, three equal RGB
channels; the input goes through the same function, so both sides are treated alike.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnnh.io import UnreadableTorchFile, load_torch_file

# torchvision's VGG16 "features" layout: conv widths, "M" = 2x down-sampling.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices (in that layout) of the ReLUs DISTS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
# The DISTS repository splits the same layers in stages; stage K's module j is torchvision's
# features[_STAGE_OFFSETS[K-1] + j] (module 0 of stages 2-5 is the pooling).
_STAGE_OFFSETS = (0, 4, 9, 16, 23)
CHANNELS = (3, 64, 128, 256, 512, 512)  # the input image itself, then each tap
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class L2Pool(nn.Module):
    """DISTS's replacement for max-pooling: sqrt(blur(x^2)), stride 2 (no aliasing)."""

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([0.5, 1.0, 0.5])  # Hann window of length 5 without its zero ends
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("kernel", (kernel / kernel.sum()).expand(channels, 1, 3, 3).clone(),
                             persistent=False)

    def forward(self, x):
        out = F.conv2d(x * x, self.kernel, stride=2, padding=1, groups=x.shape[1])
        return torch.sqrt(out + 1e-12)


class DISTS(nn.Module):
    """DISTS distance between image batches in [0, 1] of shape (B, 3, H, W): 0 for equal images.

    ``alpha`` weights the texture term (feature-map means), ``beta`` the structure term
    (feature-map correlations), 1475 channel weights each; normalised to sum to 1 together,
    uniform when not given.
    """

    def __init__(self, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG16:
            if item == "M":
                layers.append(L2Pool(in_ch))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU()]
                in_ch = item
        self.features = nn.Sequential(*layers)
        n = sum(CHANNELS)
        alpha = torch.full((n,), 1.0) if alpha is None else alpha.detach().reshape(-1).double()
        beta = torch.full((n,), 1.0) if beta is None else beta.detach().reshape(-1).double()
        if alpha.numel() != n or beta.numel() != n:
            raise ValueError(f"DISTS alpha and beta need {n} weights each, got {alpha.numel()} and {beta.numel()}")
        total = alpha.sum() + beta.sum()
        self.register_buffer("alpha", (alpha / total).float())
        self.register_buffer("beta", (beta / total).float())
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, weights: str | Path, alpha_beta: str | Path | None = None) -> DISTS:
        """Load VGG16 weights (torchvision or DISTS-repository layout) and optional alpha/beta.

        ``alpha_beta`` is a torch file holding tensors ``alpha`` and ``beta`` (the DISTS
        repository's weights file); when absent, alpha/beta found in ``weights`` are used,
        else uniform ones.
        """
        state = _load_tensor_dict(weights)
        vgg = _vgg_state(state, weights)
        extra = _load_tensor_dict(alpha_beta) if alpha_beta is not None else state
        if alpha_beta is not None and not {"alpha", "beta"} <= set(extra):
            raise ValueError(f"{alpha_beta}: expected tensors 'alpha' and 'beta', found {sorted(extra)[:10]}")
        model = cls(extra.get("alpha"), extra.get("beta"))
        try:
            model.features.load_state_dict(vgg)
        except RuntimeError as err:
            raise ValueError(f"{weights}: not a complete VGG16 state_dict: {err}") from err
        return model

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The image itself and the five VGG16 feature maps DISTS compares."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DISTS needs (B, 3, H, W) images, got shape {tuple(images.shape)}")
        out = [images]
        h = (images - self.mean) / self.std
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
        return out

    def distance(self, taps_x: list[torch.Tensor], taps_y: list[torch.Tensor]) -> torch.Tensor:
        """DISTS per example from precomputed :meth:`taps` (so a fixed side is computed once)."""
        c1 = c2 = 1e-6
        structure = texture = 0.0
        alphas = torch.split(self.alpha, CHANNELS)
        betas = torch.split(self.beta, CHANNELS)
        for fx, fy, a, b in zip(taps_x, taps_y, alphas, betas):
            mx, my = fx.mean(dim=(2, 3)), fy.mean(dim=(2, 3))
            vx = fx.var(dim=(2, 3), unbiased=False)
            vy = fy.var(dim=(2, 3), unbiased=False)
            cov = (fx * fy).mean(dim=(2, 3)) - mx * my
            texture_sim = (2 * mx * my + c1) / (mx**2 + my**2 + c1)  # compares means
            structure_sim = (2 * cov + c2) / (vx + vy + c2)  # compares correlations
            texture = texture + (a * texture_sim).sum(dim=1)
            structure = structure + (b * structure_sim).sum(dim=1)
        return 1 - (structure + texture)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(self.taps(x), self.taps(y))


def gray_image(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) tensor -> (B, 3, H, W) gray image in [0, 1]: channel mean, bilinear resize,
    min-max per example (a constant map becomes 0)."""
    g = t.detach().float().mean(dim=1, keepdim=True)
    if tuple(g.shape[-2:]) != tuple(size):
        g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
    lo = g.amin(dim=(1, 2, 3), keepdim=True)
    span = g.amax(dim=(1, 2, 3), keepdim=True) - lo
    g = (g - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return g.expand(-1, 3, -1, -1)


def _load_tensor_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DISTS weights file {str(path)!r} does not exist")
    try:
        obj = load_torch_file(path)
    except UnreadableTorchFile as err:
        raise ValueError(f"{path}: not a torch state_dict file ({err.reason})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _vgg_state(state: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """``N.{weight,bias}`` tensors of the VGG16 ``features`` Sequential, from either layout."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[-1] not in ("weight", "bias") or len(parts) != 3:
            continue
        if parts[0] == "features":
            out[f"{parts[1]}.{parts[2]}"] = value
        elif parts[0].startswith("stage") and parts[0][5:].isdigit() and 1 <= int(parts[0][5:]) <= 5:
            index = _STAGE_OFFSETS[int(parts[0][5:]) - 1] + int(parts[1])
            out[f"{index}.{parts[2]}"] = value
    if not out:
        raise ValueError(f"{source}: no VGG16 weights found; expected torchvision keys like "
                         f"'features.0.weight' or DISTS keys like 'stage1.0.weight', got "
                         f"{sorted(state)[:6]}")
    return out
