"""What every model of the zoo shares: timm's conventions and the Hugging Face Hub mixin.

An architecture (``ConvNet``, ``ViT``) defines ``forward_features`` (input -> unpooled features),
``pool_features`` (features -> one vector per image), ``feature_points`` (the per-stage modules of
``features_only``) and sets ``head`` and ``num_features``; :class:`Classifier` adds the rest:

- ``forward = forward_head(forward_features(x))``; ``forward_head(x, pre_logits=True)`` stops
  before the head;
- ``reset_classifier(n)`` (a new head, or none for ``n = 0``), ``get_classifier()``;
- ``pretrained_cfg`` (name, keyword arguments, classes, input size, mean/std), set by
  ``create_model``;
- ``save_pretrained(dir)``, ``push_to_hub(repo)`` and ``from_pretrained(dir_or_repo)`` from
  ``huggingface_hub.PyTorchModelHubMixin`` (``pip install 'pnnh[hub]'``), in the layout of
  :mod:`pnnh.models.pretrained`. ``from_pretrained`` builds whatever model the folder holds,
  so ``pnnh.from_pretrained`` and ``SomeFamily.from_pretrained`` read the same folders.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pnnh.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, save_pretrained_files

HUB_HINT = "pip install 'pnnh[hub]' (huggingface_hub)"
# The README.md that save_pretrained writes beside the weights (a Jinja template of huggingface_hub).
MODEL_CARD = """---
{{ card_data }}
---

`{{ model }}`, an image classifier of the pnnh library (paper: {{ paper_url }}):
{{ num_classes }} classes, inputs of shape {{ input_size }} normalised as `(pixels / 255 - mean) / std`
with the `mean` and `std` in `config.json`.

```python
import pnnh
model = pnnh.from_pretrained("{{ repo_id | default('OWNER/NAME', true) }}")  # pip install 'pnnh[hub]'
```
"""

try:
    from huggingface_hub import PyTorchModelHubMixin as _HubMixin
except ImportError:  # the optional extra is not installed: the methods say how to get it
    class _HubMixin:
        def __init_subclass__(cls, **card):  # the mixin's model-card keywords, unused here
            super().__init_subclass__()

        def save_pretrained(self, *args, **kwargs):
            raise ImportError(f"save_pretrained needs huggingface_hub: {HUB_HINT}")

        def push_to_hub(self, *args, **kwargs):
            raise ImportError(f"push_to_hub needs huggingface_hub: {HUB_HINT}")

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ImportError(f"from_pretrained needs huggingface_hub: {HUB_HINT} "
                              "(pnnh.load reads a local folder without it)")


def stage_points(stem: nn.Module, layers) -> list[tuple[str, nn.Module]]:
    """A CNN's ``feature_points``: the stem, then each stage's last layer (the one before a
    downsampling layer, and the last); ``layers`` are the body's, named ``body.N``."""
    layers = list(layers)
    ends = [n for n in range(len(layers)) if n == len(layers) - 1 or _downsamples(layers[n + 1])]
    return [("stem", stem)] + [(f"body.{n}", layers[n]) for n in ends]


def _downsamples(module: nn.Module) -> bool:
    """Whether any convolution or pooling inside ``module`` has a stride above 1."""
    return any(s > 1 for m in module.modules() for s in _pair(getattr(m, "stride", 1)))


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class Classifier(nn.Module, _HubMixin, library_name="pnnh", tags=["pnnh", "image-classification"],
                 paper_url="https://arxiv.org/abs/2402.08645",
                 pipeline_tag="image-classification", license="apache-2.0", model_card_template=MODEL_CARD):
    """Base of every zoo model (see the module docstring)."""

    head: nn.Module
    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool_features(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feature_points(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def feature_map(self, output: torch.Tensor) -> torch.Tensor:
        """A feature point's output as a (B, C, H, W) map (a CNN's already is)."""
        return output

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.pool_features(features)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def num_classes(self) -> int:
        return self.head.out_features if isinstance(self.head, nn.Linear) else 0

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised linear head for ``num_classes`` (0: no head, ``forward`` returns
        the pooled features), on the old head's device and dtype."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} is not valid: use an int >= 0 (0 removes the head)")
        old = next(self.head.parameters(), None)
        factory = {"device": old.device, "dtype": old.dtype} if old is not None else {}
        self.head = nn.Linear(self.num_features, num_classes, **factory) if num_classes else nn.Identity()
        if getattr(self, "pretrained_cfg", None):
            self.pretrained_cfg["num_classes"] = num_classes

    # ---- huggingface_hub.PyTorchModelHubMixin hooks (used only when it is installed)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_pretrained_files(self, save_directory)

    def generate_model_card(self, *args, **kwargs):
        cfg = getattr(self, "pretrained_cfg", None) or {}
        facts = {k: cfg.get(k) for k in ("model", "num_classes", "input_size")}
        return super().generate_model_card(*args, **{**facts, **kwargs})

    def push_to_hub(self, repo_id: str, *args, model_card_kwargs: dict | None = None, **kwargs):
        """The mixin's upload, with ``repo_id`` in the model card's loading snippet."""
        card = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, *args, model_card_kwargs=card, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         config: dict | None = None, map_location: str = "cpu", **kwargs):
        """The mixin's loader: fetch the two files (a local folder is read in place), then build
        with ``create_model(config["model"], pretrained=folder, **kwargs)``."""
        from pnnh.models.registry import create_model

        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import hf_hub_download

            fetched = [hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                       force_download=force_download, local_files_only=local_files_only)
                       for name in (CONFIG_NAME, WEIGHTS_NAME)]
            folder = Path(fetched[1]).parent
        if not config or "model" not in config:
            raise ValueError(f"{model_id} has no pnnh {CONFIG_NAME} naming its model")
        # The mixin copies config values that match constructor arguments into kwargs; only
        # values that differ from the saved ones are requests (e.g. another num_classes).
        requests = {k: v for k, v in kwargs.items() if config.get(k, config["model_kwargs"].get(k)) != v}
        model = create_model(config["model"], pretrained=folder, **requests)
        if not isinstance(model, cls):
            raise TypeError(f"{model_id} holds a {type(model).__name__} ({config['model']}), not a {cls.__name__}; "
                            "use pnnh.from_pretrained to load any model")
        return model.to(map_location).eval()
