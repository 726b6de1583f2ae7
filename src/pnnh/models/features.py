"""timm's ``features_only``: a model that returns its per-stage feature maps instead of logits.

    net = pnnh.create_model("pnnh20", features_only=True, out_indices=(1, 3))
    maps = net(x)                       # [(B, 16, 32, 32), (B, 64, 8, 8)]
    net.feature_info.channels()         # [16, 64]; .reduction() -> [1, 4]

The stages are the points a model lists in ``feature_points()`` (a CNN: its stem and the last
layer before each downsampling; a ViT: every block). Forward hooks on those modules, in place
only during the call, collect their outputs in one ``forward_features`` pass, so no architecture needs
a forward of its own and a copy of the extractor (``copy.deepcopy``) holds no stale hook.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn


class FeatureInfo(list):
    """One dict per returned map (``module``, ``num_chs``, ``reduction``), as timm's ``feature_info``."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


class FeatureExtractor(nn.Module):
    """``model``'s feature maps at ``out_indices`` (default all stages), each (B, C, H, W)."""

    def __init__(self, model: nn.Module, out_indices: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        points = model.feature_points()
        n = len(points)
        indices = tuple(range(n)) if out_indices is None else tuple(out_indices)
        if not indices or any(not isinstance(i, int) or not -n <= i < n for i in indices):
            raise ValueError(f"out_indices={out_indices!r} is not valid for {getattr(model, 'model_name', 'this model')}: "
                             f"it has {n} stages, use indices in 0..{n - 1} (or -{n}..-1)")
        self.model = model
        self.out_indices = tuple(i % n for i in indices)
        self.feature_info = FeatureInfo(self._describe([points[i][0] for i in self.out_indices]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        points = self.model.feature_points()
        maps: dict[int, torch.Tensor] = {}
        handles = [points[i][1].register_forward_hook(partial(_keep, maps, i)) for i in self.out_indices]
        try:
            self.model.forward_features(x)
        finally:
            for handle in handles:
                handle.remove()
        return [self.model.feature_map(maps[i]) for i in self.out_indices]

    @torch.no_grad()
    def _describe(self, names: list[str]) -> list[dict]:
        """Channels and reduction of each map, from one forward of a blank image in eval mode."""
        size = self.model.pretrained_cfg.get("input_size") if hasattr(self.model, "pretrained_cfg") else None
        if not size:
            raise ValueError("features_only needs the model's input size: build it with pnnh.create_model")
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()  # a blank image must not move BatchNorm's running statistics
        try:
            maps = self(torch.zeros(1, *size, device=param.device, dtype=param.dtype))
        finally:
            self.model.train(was_training)
        return [{"module": name, "num_chs": m.shape[1], "reduction": size[-1] // m.shape[-1]}
                for name, m in zip(names, maps)]


def _keep(store: dict, index: int, module: nn.Module, inputs, output) -> None:
    store[index] = output
